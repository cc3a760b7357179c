"""Building blocks shared by the backbone, the attention modules and the heads (as
detectron2's ``layers``): no registration, no config."""
from .blocks import ConvBlock, get_activation, get_norm_layer, group_norm_groups

__all__ = ["ConvBlock", "get_activation", "get_norm_layer", "group_norm_groups"]
