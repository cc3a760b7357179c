"""Model components. Importing this package registers the backbone, heads and meta-architecture
with detectron2's registries."""
from . import attention, backbone, heads  # noqa: F401  (registration)
from .backbone import MaskAttnUNetBackbone, UNet, build_maskattn_unet_backbone
from .heads import EMBED_HEAD_REGISTRY, MaskAttnEmbedHead, MaskAttnSemSegHead, build_embed_head
from .meta_arch import MaskAttnUNet
from .postprocessing import MaskAttnPostProcessor

__all__ = [
    "EMBED_HEAD_REGISTRY",
    "MaskAttnEmbedHead",
    "MaskAttnPostProcessor",
    "MaskAttnSemSegHead",
    "MaskAttnUNet",
    "MaskAttnUNetBackbone",
    "UNet",
    "build_embed_head",
    "build_maskattn_unet_backbone",
]
