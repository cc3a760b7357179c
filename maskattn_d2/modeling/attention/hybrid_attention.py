"""Hybrid channel + spatial attention and multi-scale fusion (the second paper, CBAM style).

``F' = F * w_c * w_s`` with ``w_c = sigmoid(W2 ReLU(W1 GAP(F)))`` (one weight per channel)
and ``w_s = sigmoid(conv([max_c(F), mean_c(F)]))`` (one weight per position).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import ConvBlock

__all__ = ["ChannelAttention", "SpatialAttention", "HybridAttention", "MultiScaleFusion"]


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention: ``F * sigmoid(W2 ReLU(W1 GAP(F)))``.

    With ``use_max_pool=True`` the shared MLP also sees the global max-pooled descriptor
    and the two outputs are summed before the sigmoid, as in CBAM. The default follows the
    second paper's formula (average pooling only).
    """

    def __init__(self, channels: int, reduction: int = 16, *, use_max_pool: bool = False):
        """
        Args:
            channels: C, channels of the input.
            reduction: bottleneck ratio; the hidden width is ``max(C // reduction, 8)``.
            use_max_pool: add CBAM's max-pool branch.
        """
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        hidden = max(channels // reduction, 8)
        self.use_max_pool = use_max_pool
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 1, 1) channel weights in (0, 1)."""
        logits = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        if self.use_max_pool:
            logits = logits + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) reweighted features."""
        return x * self.weights(x)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``F * sigmoid(conv([max_c(F), mean_c(F)]))``."""

    def __init__(self, kernel_size: int = 7):
        """
        Args:
            kernel_size: odd size of the 2 -> 1 channel conv.
        """
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W) spatial weights in (0, 1)."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) reweighted features."""
        return x * self.weights(x)


class HybridAttention(nn.Module):
    """Channel attention followed by spatial attention; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        """
        Args:
            channels: C, channels of the input.
            reduction: see :class:`ChannelAttention`.
            spatial_kernel: see :class:`SpatialAttention`.
        """
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class MultiScaleFusion(nn.Module):
    """Fuse decoder outputs of several scales into one map at the finest resolution.

    Every input is bilinearly upsampled to the first (finest) input's size, the maps are
    concatenated along channels and mixed by a 1x1 conv-norm-activation.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        *,
        norm: str = "BN",
        activation: str = "relu",
    ):
        """
        Args:
            in_channels: channels of each input, finest first.
            out_channels: channels of the fused output.
            norm: normalisation after the 1x1 conv (see ``maskattn_d2.layers.get_norm_layer``).
            activation: activation after the norm (see ``maskattn_d2.layers.get_activation``).
        """
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("MultiScaleFusion needs at least one input")
        self.in_channels: List[int] = [int(c) for c in in_channels]
        self.mix = ConvBlock(
            sum(self.in_channels),
            out_channels,
            num_convs=1,
            norm=norm,
            activation=activation,
            kernel_size=1,
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: (B, C_i, H_i, W_i) maps, finest first, C_i == in_channels[i].

        Returns:
            (B, out_channels, H_0, W_0).
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} inputs, got {len(features)}")
        channels = [f.shape[1] for f in features]
        if channels != self.in_channels:
            raise ValueError(f"expected input channels {self.in_channels}, got {channels}")
        size = features[0].shape[-2:]
        resized = [features[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f in features[1:]
        ]
        return self.mix(torch.cat(resized, dim=1))
