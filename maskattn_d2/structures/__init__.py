"""Data structures and their geometry (as detectron2's ``structures``)."""
from .label_maps import pixel_boxes, resize_label_map, selected_label_pixels

__all__ = ["pixel_boxes", "resize_label_map", "selected_label_pixels"]
