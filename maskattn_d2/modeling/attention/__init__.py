from .hybrid_attention import ChannelAttention, HybridAttention, MultiScaleFusion, SpatialAttention
from .mask_attention import MASK_KINDS, MaskAttention, key_grid_size

__all__ = [
    "ChannelAttention",
    "SpatialAttention",
    "HybridAttention",
    "MultiScaleFusion",
    "MASK_KINDS",
    "MaskAttention",
    "key_grid_size",
]
