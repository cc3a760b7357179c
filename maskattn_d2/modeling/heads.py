"""Prediction heads on the UNet features: semantic logits and pixel embeddings.

The heads only predict; losses live in ``maskattn_d2.modeling.losses`` and are applied by
the meta-architecture.
"""
import math
from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.registry import Registry

from ..layers import ConvBlock, l2_normalize_channels
from .losses import FOCAL_PRIOR

__all__ = [
    "EMBED_HEAD_REGISTRY",
    "MaskAttnSemSegHead",
    "MaskAttnEmbedHead",
    "build_embed_head",
]

EMBED_HEAD_REGISTRY = Registry("EMBED_HEAD")
EMBED_HEAD_REGISTRY.__doc__ = """
Registry for pixel-embedding heads, which predict per-pixel embeddings from backbone
features.

The registered object is called with ``obj(cfg, input_shape)``, where ``input_shape`` is
the backbone's ``output_shape()`` (Dict[str, ShapeSpec]). It must return an ``nn.Module``
whose ``forward(features: Dict[str, Tensor])`` returns a dict with ``"embeddings"``:
(B, D, H, W), D = ``cfg.MODEL.EMBED_HEAD.EMBED_DIM``, L2-normalised along dim 1, and, when it
predicts spatial embeddings, ``"offsets"``: (B, 2, H, W) (dy, dx) from each pixel to the centre
of its instance in pixels, and ``"seed_logits"``: (B, 1, H, W) logits of the seed
(centre-ness) map.
"""


def single_in_feature(cfg_node, key: str) -> str:
    """The one backbone feature named by a head's IN_FEATURES list (detectron2's key is a
    list; the semantic head reads exactly one feature, the embedding head one or more)."""
    names = list(cfg_node.IN_FEATURES)
    if len(names) != 1:
        raise ValueError(
            f"{key}.IN_FEATURES must name exactly one backbone feature (the head reads one), "
            f"got {names}."
        )
    return names[0]


def _check_in_feature(input_shape: Dict[str, ShapeSpec], in_feature: str) -> ShapeSpec:
    if in_feature not in input_shape:
        raise ValueError(
            f"in_feature {in_feature!r} is not a backbone output (add it to "
            f"MODEL.MASK_ATTN_UNET.OUT_FEATURES); have {sorted(input_shape)}"
        )
    return input_shape[in_feature]


class _ConvPredictor(nn.Module):
    """``num_convs`` x conv3x3-norm-ReLU then a 1x1 predictor, on one named feature."""

    def __init__(
        self, in_channels: int, out_channels: int, convs_dim: int, norm: str, num_convs: int = 1
    ):
        super().__init__()
        if out_channels < 1 or convs_dim < 1:
            raise ValueError(
                f"out_channels and convs_dim must be positive, got {out_channels}, {convs_dim}"
            )
        self.conv = ConvBlock(
            in_channels, convs_dim, num_convs=num_convs, norm=norm, activation="relu"
        )
        self.predictor = nn.Conv2d(convs_dim, out_channels, kernel_size=1)
        # Small initial outputs, as detectron2's semantic heads do.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.conv(x))


@SEM_SEG_HEADS_REGISTRY.register()
class MaskAttnSemSegHead(nn.Module):
    """Semantic head: one backbone feature -> (B, num_classes, H_f, W_f) logits.

    Unlike detectron2's ``SemSegFPNHead`` it computes no loss and returns logits at the
    feature's resolution.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_feature: str,
        convs_dim: int = 64,
        norm: str = "BN",
    ):
        """
        Args:
            input_shape: backbone output shapes.
            num_classes: classes predicted (stuff + things).
            in_feature: name of the backbone feature the head reads.
            convs_dim: channels of the hidden 3x3 conv.
            norm: normalisation after the hidden conv ("BN", "GN", "SyncBN",
                "NaiveSyncBN" or "").
        """
        super().__init__()
        shape = _check_in_feature(input_shape, in_feature)
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.head = _ConvPredictor(shape.channels, num_classes, convs_dim, norm)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": h.NUM_CLASSES,
            "in_feature": single_in_feature(h, "MODEL.SEM_SEG_HEAD"),
            "convs_dim": h.CONVS_DIM,
            "norm": h.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: backbone outputs; ``features[in_feature]`` is (B, C, H_f, W_f).

        Returns:
            (B, num_classes, H_f, W_f) logits.
        """
        return self.head(features[self.in_feature])


@EMBED_HEAD_REGISTRY.register()
class MaskAttnEmbedHead(nn.Module):
    """Embedding head: backbone features -> unit-norm pixel embeddings and, optionally,
    spatial embeddings (offsets to the instance centre and a seed map), from shared convs.
    With several features, the coarser ones are resized (bilinear) to the first one's
    resolution and concatenated to it: the decoder's coarser outputs see more of the image
    than its last one, which the seed of a large or crowded object needs.

    The spatial part follows Neven et al. (CVPR 2019) and Panoptic-DeepLab: a pixel's offset
    points at the centre of its instance, so ``position + offset`` is an embedding in which
    the pixels of one instance gather at one point whatever the instance looks like; the seed
    map is high at instance centres and picks one seed per instance at inference.
    """

    # Lower bound on the norm before dividing; large enough to stay non-zero in fp16.
    EPS = 1e-6
    # The bandwidth everywhere at initialisation, in pixels: about a small nucleus's radius at
    # 128x128.
    INITIAL_BANDWIDTH = 2.0

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: Union[str, Sequence[str]],
        embed_dim: int,
        convs_dim: int = 64,
        num_convs: int = 1,
        norm: str = "BN",
        coord_conv: bool = True,
        spatial: bool = True,
        seed_prior: float = 0.5,
        bandwidth: bool = False,
    ):
        """
        Args:
            input_shape: backbone output shapes.
            in_features: names of the backbone features the head reads (or one name); the
                first sets the output resolution and must have the smallest stride.
            embed_dim: D, dimension of the embeddings.
            convs_dim: channels of the hidden 3x3 convs.
            num_convs: number of hidden 3x3 conv-norm-ReLU layers (>= 1).
            norm: normalisation after each hidden conv (as :class:`MaskAttnSemSegHead`).
            coord_conv: append the pixel's normalised (y, x) in [-1, 1] to the feature.
                Convolutions are translation-equivariant, so without position two identical
                objects at different places get the same embedding and merge into one
                cluster; with it the head can make embeddings position-dependent.
            spatial: also predict "offsets" (to the instance centre, in pixels) and
                "seed_logits".
            seed_prior: the seed map's value everywhere at initialisation, in (0, 1): 0.5
                for the binary cross-entropy, 0.1 for the focal loss (CenterNet's prior: its
                loss on the many background pixels starts small instead of swamping the
                rest).
            bandwidth: with ``spatial``, also predict "log_bandwidth", the log of each pixel's
                clustering bandwidth in pixels (Neven et al.; see
                :func:`~maskattn_d2.modeling.losses.bandwidth_instance_loss`).
        """
        super().__init__()
        names = [in_features] if isinstance(in_features, str) else list(in_features)
        if not names:
            raise ValueError("in_features must name at least one backbone feature.")
        shapes = [_check_in_feature(input_shape, name) for name in names]
        if any(shape.stride < shapes[0].stride for shape in shapes[1:]):
            raise ValueError(
                f"in_features {names}: the first feature sets the output resolution and must "
                f"have the smallest stride, got strides {[shape.stride for shape in shapes]}."
            )
        self.in_features = names
        self.embed_dim = embed_dim
        self.coord_conv = coord_conv
        self.spatial = spatial
        in_channels = sum(shape.channels for shape in shapes) + (2 if coord_conv else 0)
        self.head = _ConvPredictor(in_channels, embed_dim, convs_dim, norm, num_convs)
        # Embeddings are normalised, so the predictor's tiny init would only slow learning.
        nn.init.kaiming_normal_(self.head.predictor.weight, mode="fan_in", nonlinearity="linear")
        if spatial:
            if not 0 < seed_prior < 1:
                raise ValueError(f"seed_prior must be in (0, 1), got {seed_prior}.")
            # Offsets and seed read the same hidden features; they start at zero offset and a
            # seed map of seed_prior everywhere.
            self.offset_predictor = nn.Conv2d(convs_dim, 2, kernel_size=1)
            self.seed_predictor = nn.Conv2d(convs_dim, 1, kernel_size=1)
            for layer in (self.offset_predictor, self.seed_predictor):
                nn.init.normal_(layer.weight, std=0.001)
                nn.init.zeros_(layer.bias)
            nn.init.constant_(self.seed_predictor.bias, math.log(seed_prior / (1 - seed_prior)))
        self.bandwidth = spatial and bandwidth
        if self.bandwidth:
            self.bandwidth_predictor = nn.Conv2d(convs_dim, 1, kernel_size=1)
            nn.init.normal_(self.bandwidth_predictor.weight, std=0.001)
            nn.init.constant_(self.bandwidth_predictor.bias, math.log(self.INITIAL_BANDWIDTH))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.EMBED_HEAD
        if not h.IN_FEATURES:
            raise ValueError(
                "MODEL.EMBED_HEAD.IN_FEATURES must name at least one backbone feature."
            )
        if h.NUM_CONVS < 1:
            raise ValueError(f"MODEL.EMBED_HEAD.NUM_CONVS must be >= 1, got {h.NUM_CONVS}.")
        return {
            "input_shape": input_shape,
            "in_features": list(h.IN_FEATURES),
            "embed_dim": h.EMBED_DIM,
            "convs_dim": h.CONVS_DIM,
            "num_convs": h.NUM_CONVS,
            "norm": h.NORM,
            "coord_conv": h.COORD_CONV,
            "spatial": h.SPATIAL_ON,
            "seed_prior": FOCAL_PRIOR if h.SEED_LOSS == "focal" else 0.5,
            "bandwidth": h.OFFSET_LOSS == "lovasz",
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: backbone outputs; ``features[in_feature]`` is (B, C, H_f, W_f).

        Returns:
            ``"embeddings"``: (B, embed_dim, H_f, W_f) with unit L2 norm along dim 1; with
            ``spatial``, ``"offsets"``: (B, 2, H_f, W_f) (dy, dx) in pixels and
            ``"seed_logits"``: (B, 1, H_f, W_f) (the seed map is their sigmoid); with
            ``bandwidth``, ``"log_bandwidth"``: (B, 1, H_f, W_f).
        """
        x = features[self.in_features[0]]
        if len(self.in_features) > 1:
            size = x.shape[-2:]
            coarser = [
                F.interpolate(features[name], size=size, mode="bilinear", align_corners=False)
                for name in self.in_features[1:]
            ]
            x = torch.cat([x] + coarser, dim=1)
        if self.coord_conv:
            x = torch.cat([x, coordinate_channels(x)], dim=1)
        hidden = self.head.conv(x)
        predictors = [self.head.predictor]
        if self.spatial:
            predictors += [self.offset_predictor, self.seed_predictor]
        if self.bandwidth:
            predictors.append(self.bandwidth_predictor)
        # The predictors read the same features: one 1x1 conv with all their output channels
        # costs a third of three separate ones on CPU (training step, 128x128).
        predicted = F.conv2d(
            hidden,
            torch.cat([p.weight for p in predictors]),
            torch.cat([p.bias for p in predictors]),
        )
        split = predicted.split([p.out_channels for p in predictors], dim=1)
        outputs = {"embeddings": l2_normalize_channels(split[0], self.EPS)}
        if self.spatial:
            outputs["offsets"], outputs["seed_logits"] = split[1], split[2]
        if self.bandwidth:
            outputs["log_bandwidth"] = split[3]
        return outputs


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) normalised (y, x) pixel coordinates in [-1, 1], like x's dtype/device."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
    return grid.unsqueeze(0).expand(b, -1, -1, -1)


def build_embed_head(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the embedding head named by ``cfg.MODEL.EMBED_HEAD.NAME``."""
    return EMBED_HEAD_REGISTRY.get(cfg.MODEL.EMBED_HEAD.NAME)(cfg, input_shape)
