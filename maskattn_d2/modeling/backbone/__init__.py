from .unet import MaskAttnUNetBackbone, UNet, build_maskattn_unet_backbone

__all__ = [
    "UNet",
    "MaskAttnUNetBackbone",
    "build_maskattn_unet_backbone",
]
