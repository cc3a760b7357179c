"""Building blocks shared by the backbone, the attention modules and the heads (as
detectron2's ``layers``): no registration, no config."""
from .blocks import ConvBlock, get_activation, get_norm_layer, group_norm_groups
from .channel_ops import (
    argmax_channels,
    l2_normalize_channels,
    softmax_channels,
)

__all__ = [
    "ConvBlock",
    "argmax_channels",
    "get_activation",
    "get_norm_layer",
    "group_norm_groups",
    "l2_normalize_channels",
    "softmax_channels",
]
