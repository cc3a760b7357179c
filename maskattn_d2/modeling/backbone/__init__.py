from .blocks import ConvBlock, get_activation, get_norm_layer
from .unet import MaskAttnUNetBackbone, UNet, build_maskattn_unet_backbone

__all__ = [
    "ConvBlock",
    "get_activation",
    "get_norm_layer",
    "UNet",
    "MaskAttnUNetBackbone",
    "build_maskattn_unet_backbone",
]
