"""Small convolutional building blocks shared by the UNet backbone, the attention modules and
the heads."""
from typing import Optional

from torch import nn

from detectron2.layers import NaiveSyncBatchNorm, get_norm

__all__ = ["get_activation", "get_norm_layer", "group_norm_groups", "ConvBlock"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
_NORMS = ("BN", "GN", "SyncBN", "NaiveSyncBN", "")


def get_activation(name: str) -> nn.Module:
    """Return a fresh activation module.

    Args:
        name: "relu", "gelu" or "silu".

    Returns:
        nn.Module: the activation.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups``.

    detectron2's "GN" always uses 32 groups, which fails for widths such as 8 or 48 that
    small UNets use; this keeps GroupNorm valid for any width.
    """
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(f"channels must be positive, got {channels}")


def get_norm_layer(norm: str, channels: int) -> Optional[nn.Module]:
    """Build a 2-D normalisation layer for ``channels`` channels.

    Args:
        norm: "BN", "GN", "SyncBN", "NaiveSyncBN" or "" (no normalisation).
        channels: number of channels normalised.

    Returns:
        The layer, or None for "".
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {list(_NORMS)}")
    if norm == "GN":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    if norm == "NaiveSyncBN":
        return NaiveSyncBatchNorm(channels)
    # "BN", "SyncBN" and "" mean the same as in detectron2.
    return get_norm(norm, channels)


class ConvBlock(nn.Sequential):
    """``num_convs`` x [conv(kernel_size) - norm - activation], spatial size preserved.

    Input (B, in_channels, H, W) -> output (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int = 2,
        norm: str = "BN",
        activation: str = "relu",
        kernel_size: int = 3,
    ):
        """
        Args:
            in_channels: channels of the input.
            out_channels: channels of every conv output.
            num_convs: number of conv-norm-act units (>= 1).
            norm: see :func:`get_norm_layer`.
            activation: see :func:`get_activation`.
            kernel_size: odd conv kernel size (3 in the UNet, 1 for channel mixing).
        """
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channels must be positive, got in={in_channels}, out={out_channels}"
            )
        layers = []
        for i in range(num_convs):
            norm_layer = get_norm_layer(norm, out_channels)
            layers.append(
                nn.Conv2d(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size,
                    padding=kernel_size // 2,
                    # A bias right before a normalisation layer is redundant.
                    bias=norm_layer is None,
                )
            )
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(get_activation(activation))
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
