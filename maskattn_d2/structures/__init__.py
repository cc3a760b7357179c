"""Data structures and their geometry (as detectron2's ``structures``)."""
from .label_maps import label_map_boxes, resize_label_map

__all__ = ["label_map_boxes", "resize_label_map"]
