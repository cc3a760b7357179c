"""Data structures and their geometry (as detectron2's ``structures``)."""
from .label_maps import boxes_from_projections, label_map_boxes, resize_label_map

__all__ = ["boxes_from_projections", "label_map_boxes", "resize_label_map"]
