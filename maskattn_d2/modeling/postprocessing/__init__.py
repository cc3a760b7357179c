"""Inference postprocessing of MaskAttn-UNet: logits + embedding-head outputs -> detectron2's
standard outputs, one job per module:

- :mod:`.processor`: :class:`MaskAttnPostProcessor`, the steps in order;
- :mod:`.instances`: the instance methods (``INSTANCE_METHODS``), each giving one instance
  label map;
- :mod:`.clustering`: embedding clustering, seeds of the seed map, assignment to seeds;
- :mod:`.ascent`: climbing the seed map to its maxima, and ridges between their basins;
- :mod:`.components`: connected components of label maps;
- :mod:`.merge`: the panoptic merge of instances and stuff;
- :mod:`.upsample`: the segment map at the output size with smooth thing boundaries.

Label-map geometry shared with evaluation and tools (``resize_label_map``) lives in
:mod:`maskattn_d2.structures.label_maps`.
"""
from ...structures.label_maps import resize_label_map
from .clustering import assign_to_seeds, cluster_embeddings, find_seeds
from .components import label_map_components
from .instances import (
    INSTANCE_METHODS,
    connected_component_instance_map,
    embedding_instance_map,
    spatial_instance_map,
)
from .merge import merge_instance_map, segment_id_map
from .processor import MaskAttnPostProcessor
from .upsample import upsample_segment_map

__all__ = [
    "INSTANCE_METHODS",
    "MaskAttnPostProcessor",
    "assign_to_seeds",
    "cluster_embeddings",
    "connected_component_instance_map",
    "embedding_instance_map",
    "find_seeds",
    "label_map_components",
    "merge_instance_map",
    "resize_label_map",
    "segment_id_map",
    "spatial_instance_map",
    "upsample_segment_map",
]
