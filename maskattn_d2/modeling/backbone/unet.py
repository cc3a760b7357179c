"""UNet backbone with mask attention modules and optional hybrid attention.

:class:`UNet` is a plain, config-free module; :class:`MaskAttnUNetBackbone` adapts it to
detectron2's :class:`Backbone` interface and is built from a config.

Layout for ``channels=(c0, ..., cL)`` (stage i has stride 2**i)::

    enc1 = ConvBlock(x)                       stride 1, c0 channels
    enc2 = ConvBlock(maxpool2x2(enc1))        stride 2, c1 channels
    ...                                       (+ MaskAttention after listed strides)
    enc{2**L}                                 the bottleneck
    dec{S} = ConvBlock(cat[up(dec{2S}), skip(enc{S})])   for S = 2**(L-1), ..., 1
             up = bilinear x2 + 1x1 conv, skip = HybridAttention or identity
                                              (+ MaskAttention after listed strides)
    dec1 = MultiScaleFusion(dec1, dec2, ...)  when multiscale_fusion
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..attention.hybrid_attention import HybridAttention, MultiScaleFusion
from ..attention.mask_attention import MaskAttention, key_grid_size
from ...layers import ConvBlock

__all__ = [
    "UNet",
    "MaskAttnUNetBackbone",
    "build_maskattn_unet_backbone",
    "unet_kwargs_from_config",
]


class _UpBlock(nn.Module):
    """Decoder stage: upsample x2, concat the (attended) skip, ConvBlock."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        num_convs: int,
        norm: str,
        activation: str,
        skip_attention: Optional[nn.Module],
    ):
        super().__init__()
        # Bilinear + 1x1 conv rather than a transposed conv: no checkerboard artefacts.
        self.reduce = nn.Conv2d(in_channels, skip_channels, kernel_size=1)
        self.skip_attention = skip_attention if skip_attention is not None else nn.Identity()
        self.block = ConvBlock(2 * skip_channels, out_channels, num_convs, norm, activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, h, w), skip: (B, C_skip, 2h, 2w) -> (B, C_out, 2h, 2w)."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([self.reduce(x), self.skip_attention(skip)], dim=1)
        return self.block(x)


class UNet(nn.Module):
    """UNet encoder-decoder with mask attention modules (MAM) and hybrid-attention skips.

    The four variants of the papers are configurations of this class: plain UNet
    (no attention scales, no skip attention), UNet + hybrid (``skip_attention`` and
    ``multiscale_fusion``), MaskAttn-UNet (attention scales) and MaskAttn-UNet + hybrid.
    Downsampling is a 2x2 max-pool; upsampling is bilinear x2 followed by a 1x1 conv.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        convs_per_stage: int = 2,
        norm: str = "BN",
        activation: str = "relu",
        encoder_attention_scales: Sequence[int] = (4, 8, 16),
        decoder_attention_scales: Sequence[int] = (4, 8),
        num_heads: int = 4,
        mask_kind: str = "gate",
        max_tokens: int = 256,
        ffn_ratio: float = 2.0,
        dropout: float = 0.0,
        skip_attention: bool = False,
        multiscale_fusion: bool = False,
        channel_reduction: int = 16,
        spatial_kernel: int = 7,
        input_size: Tuple[int, int] = (128, 128),
    ):
        """
        Args:
            in_channels: channels of the input image.
            channels: channels of each encoder stage, shallowest first (>= 2 stages);
                decoder stage of stride S has the same width as encoder stage S.
            convs_per_stage: conv-norm-act units per stage.
            norm: "BN", "GN", "SyncBN", "NaiveSyncBN" or "".
            activation: "relu", "gelu" or "silu".
            encoder_attention_scales: strides of encoder stages followed by a MAM.
            decoder_attention_scales: strides of decoder stages followed by a MAM (each
                smaller than the bottleneck stride).
            num_heads, mask_kind, max_tokens, ffn_ratio, dropout: see :class:`MaskAttention`.
            skip_attention: put a :class:`HybridAttention` on every skip connection.
            multiscale_fusion: replace "dec1" by a :class:`MultiScaleFusion` of all
                decoder outputs.
            channel_reduction, spatial_kernel: see :class:`HybridAttention`.
            input_size: (H, W) the network runs at; only mask_kind "bias" depends on it
                (its bias tables are built for the key grid of that size).
        """
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs >= 2 positive stage widths, got {channels}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        strides = [2**i for i in range(len(channels))]
        deepest = strides[-1]
        for name, scales in (
            ("encoder_attention_scales", encoder_attention_scales),
            ("decoder_attention_scales", decoder_attention_scales),
        ):
            for s in scales:
                if s not in strides:
                    raise ValueError(f"{name} has scale {s}, which is not a stage stride {strides}")
        for s in decoder_attention_scales:
            if s >= deepest:
                raise ValueError(
                    f"decoder_attention_scales has scale {s}, but decoder strides are < {deepest}"
                )
        input_size = (int(input_size[0]), int(input_size[1]))
        if mask_kind == "bias" and (input_size[0] % deepest or input_size[1] % deepest):
            raise ValueError(
                f"mask_kind 'bias' needs input_size {input_size} divisible by {deepest}"
            )

        self.in_channels = in_channels
        self.channels = channels
        self.strides = strides
        self.size_divisibility = deepest
        self.multiscale_fusion = multiscale_fusion

        def make_mam(stride: int, width: int) -> MaskAttention:
            grid = None
            if mask_kind == "bias":
                grid = key_grid_size(input_size[0] // stride, input_size[1] // stride, max_tokens)
            return MaskAttention(
                width,
                num_heads=num_heads,
                mask_kind=mask_kind,
                max_tokens=max_tokens,
                ffn_ratio=ffn_ratio,
                dropout=dropout,
                grid_size=grid,
            )

        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.encoder = nn.ModuleList()
        self.encoder_attention = nn.ModuleDict()
        for i, (stride, width) in enumerate(zip(strides, channels)):
            prev = in_channels if i == 0 else channels[i - 1]
            self.encoder.append(ConvBlock(prev, width, convs_per_stage, norm, activation))
            if stride in encoder_attention_scales:
                self.encoder_attention[f"enc{stride}"] = make_mam(stride, width)

        # decoder[j] produces stride strides[-2 - j]: deepest decoder stage first.
        self.decoder = nn.ModuleList()
        self.decoder_attention = nn.ModuleDict()
        for i in range(len(channels) - 2, -1, -1):
            hybrid = None
            if skip_attention:
                hybrid = HybridAttention(channels[i], channel_reduction, spatial_kernel)
            self.decoder.append(
                _UpBlock(
                    channels[i + 1],
                    channels[i],
                    channels[i],
                    num_convs=convs_per_stage,
                    norm=norm,
                    activation=activation,
                    skip_attention=hybrid,
                )
            )
            if strides[i] in decoder_attention_scales:
                self.decoder_attention[f"dec{strides[i]}"] = make_mam(strides[i], channels[i])

        self.fusion = None
        if multiscale_fusion:
            self.fusion = MultiScaleFusion(
                channels[:-1], channels[0], norm=norm, activation=activation
            )

        self.feature_strides: Dict[str, int] = {}
        self.feature_channels: Dict[str, int] = {}
        for stride, width in zip(strides, channels):
            self.feature_strides[f"enc{stride}"] = stride
            self.feature_channels[f"enc{stride}"] = width
        for stride, width in zip(strides[:-1], channels[:-1]):
            self.feature_strides[f"dec{stride}"] = stride
            self.feature_channels[f"dec{stride}"] = width

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, in_channels, H, W) images, H and W divisible by ``size_divisibility``.

        Returns:
            dict: "enc{S}" (B, channels[i], H/S, W/S) for every stage stride S = 2**i, and
            "dec{S}" likewise for every decoder stride S below the bottleneck's.
        """
        return self.forward_with_gates(x)[0]

    def forward_with_gates(
        self, x: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Like :meth:`forward`, also returning the gate logits of the mask attention.

        Returns:
            features: as :meth:`forward`.
            gates: "enc{S}"/"dec{S}" -> (B, 1, H/S, W/S) gate logits of every MAM that has
                one (mask kinds "gate" and "hard"); empty otherwise.
        """
        self._check_input(x)
        features: Dict[str, torch.Tensor] = {}
        gates: Dict[str, torch.Tensor] = {}

        def attend(modules: nn.ModuleDict, name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in modules:
                return t
            t, gate_logits = modules[name](t)
            if gate_logits is not None:
                gates[name] = gate_logits
            return t

        for i, (stride, block) in enumerate(zip(self.strides, self.encoder)):
            x = block(x if i == 0 else self.pool(x))
            x = attend(self.encoder_attention, f"enc{stride}", x)
            features[f"enc{stride}"] = x

        for j, up in enumerate(self.decoder):
            stride = self.strides[-2 - j]
            x = up(x, features[f"enc{stride}"])
            x = attend(self.decoder_attention, f"dec{stride}", x)
            features[f"dec{stride}"] = x

        if self.fusion is not None:
            features["dec1"] = self.fusion([features[f"dec{s}"] for s in self.strides[:-1]])
        return features, gates

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects a (B, {self.in_channels}, H, W) tensor, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        d = self.size_divisibility
        if h % d or w % d:
            raise ValueError(f"input size {h}x{w} is not divisible by {d}")
        # Metadata only: a finiteness check would cost a pass and a host sync per forward;
        # training stops on a non-finite loss and MaskAttnUNet.inference checks its images.
        if not x.is_floating_point():
            raise ValueError(f"UNet expects a floating-point tensor, got {x.dtype}")


@BACKBONE_REGISTRY.register()
class MaskAttnUNetBackbone(Backbone):
    """detectron2 :class:`Backbone` around :class:`UNet`, returning ``out_features``."""

    @configurable
    def __init__(self, *, unet: UNet, out_features: Sequence[str]):
        """
        Args:
            unet: the network.
            out_features: names of the UNet features ``forward`` returns ("dec1", "enc4", ...).
        """
        super().__init__()
        unknown = [f for f in out_features if f not in unet.feature_strides]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {sorted(unet.feature_strides)}, "
                f"got {list(out_features)}"
            )
        self.unet = unet
        self._out_features = list(out_features)
        self._out_feature_strides = {f: unet.feature_strides[f] for f in self._out_features}
        self._out_feature_channels = {f: unet.feature_channels[f] for f in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        u = cfg.MODEL.MASK_ATTN_UNET
        if input_shape is not None and input_shape.channels not in (None, u.IN_CHANNELS):
            raise ValueError(
                f"input_shape has {input_shape.channels} channels but "
                f"MODEL.MASK_ATTN_UNET.IN_CHANNELS is {u.IN_CHANNELS}"
            )
        return {"unet": UNet(**unet_kwargs_from_config(cfg)), "out_features": list(u.OUT_FEATURES)}

    @property
    def size_divisibility(self) -> int:
        return self.unet.size_divisibility

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) images -> {name: (B, C_f, H/S_f, W/S_f)} for ``out_features``."""
        return self.forward_with_gates(x)[0]

    def forward_with_gates(
        self, x: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Returns (``out_features`` dict, gate logits dict as :meth:`UNet.forward_with_gates`)."""
        features, gates = self.unet.forward_with_gates(x)
        return {f: features[f] for f in self._out_features}, gates


@BACKBONE_REGISTRY.register()
def build_maskattn_unet_backbone(cfg, input_shape: ShapeSpec) -> MaskAttnUNetBackbone:
    """Build :class:`MaskAttnUNetBackbone` from ``cfg.MODEL.MASK_ATTN_UNET`` and friends."""
    return MaskAttnUNetBackbone(cfg, input_shape)


def unet_kwargs_from_config(cfg) -> Dict:
    """:class:`UNet`'s arguments from ``cfg.MODEL.MASK_ATTN_UNET``, ``MASK_ATTN``,
    ``HYBRID_ATTN`` and ``INPUT.NETWORK_SIZE``."""
    u, m, hy = cfg.MODEL.MASK_ATTN_UNET, cfg.MODEL.MASK_ATTN, cfg.MODEL.HYBRID_ATTN
    return {
        "in_channels": u.IN_CHANNELS,
        "channels": tuple(u.CHANNELS),
        "convs_per_stage": u.CONVS_PER_STAGE,
        "norm": u.NORM,
        "activation": u.ACTIVATION,
        "encoder_attention_scales": tuple(m.ENCODER_SCALES),
        "decoder_attention_scales": tuple(m.DECODER_SCALES),
        "num_heads": m.NUM_HEADS,
        "mask_kind": m.MASK_KIND,
        "max_tokens": m.MAX_TOKENS,
        "ffn_ratio": m.FFN_RATIO,
        "dropout": m.DROPOUT,
        "skip_attention": hy.SKIP_ATTENTION,
        "multiscale_fusion": hy.MULTISCALE_FUSION,
        "channel_reduction": hy.CHANNEL_REDUCTION,
        "spatial_kernel": hy.SPATIAL_KERNEL,
        "input_size": tuple(cfg.INPUT.NETWORK_SIZE),
    }
