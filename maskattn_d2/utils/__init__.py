"""Utilities shared by the demo, the tools and the tests.

- :mod:`.visualization`: pictures of pixel embeddings (PCA -> RGB) and attention gates.
"""
from .visualization import (
    GATE_LAYOUTS,
    embeddings_to_rgb,
    gate_probability_maps,
    render_gate_heatmaps,
)

__all__ = ["GATE_LAYOUTS", "embeddings_to_rgb", "gate_probability_maps", "render_gate_heatmaps"]
