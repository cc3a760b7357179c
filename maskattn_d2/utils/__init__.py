"""Utilities shared by the demo, the tools and the tests.

- :mod:`.visualization`: pictures of pixel embeddings (PCA -> RGB) and attention gates.
- :mod:`.peers`: the peer models of the benchmark (Panoptic-DeepLab, Mask2Former); import it
  explicitly (it imports detectron2's Panoptic-DeepLab project and, lazily, ``transformers``).
"""
from .visualization import (
    GATE_LAYOUTS,
    embeddings_to_rgb,
    gate_probability_maps,
    render_gate_heatmaps,
)

__all__ = ["GATE_LAYOUTS", "embeddings_to_rgb", "gate_probability_maps", "render_gate_heatmaps"]
