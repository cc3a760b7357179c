"""Tests of the UNet backbone, its blocks and its detectron2 adapter."""
import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.modeling.attention.hybrid_attention import HybridAttention, MultiScaleFusion
from maskattn_d2.modeling.attention.mask_attention import MaskAttention
from maskattn_d2.layers import (
    ConvBlock,
    get_activation,
    get_norm_layer,
    group_norm_groups,
)
from maskattn_d2.modeling.backbone.unet import (
    MaskAttnUNetBackbone,
    UNet,
    build_maskattn_unet_backbone,
)

CHANNELS = (8, 16, 32, 64)  # strides 1, 2, 4, 8
VARIANTS = {
    "plain": dict(encoder_attention_scales=(), decoder_attention_scales=()),
    "hybrid": dict(
        encoder_attention_scales=(),
        decoder_attention_scales=(),
        skip_attention=True,
        multiscale_fusion=True,
    ),
    "maskattn": dict(encoder_attention_scales=(4, 8), decoder_attention_scales=(2, 4)),
    "maskattn_hybrid": dict(
        encoder_attention_scales=(4, 8),
        decoder_attention_scales=(2, 4),
        skip_attention=True,
        multiscale_fusion=True,
    ),
}
EXPECTED_CHANNELS = {"enc1": 8, "enc2": 16, "enc4": 32, "enc8": 64, "dec4": 32, "dec2": 16, "dec1": 8}


def _unet(**kwargs):
    kwargs.setdefault("encoder_attention_scales", (4, 8))
    kwargs.setdefault("decoder_attention_scales", (2, 4))
    kwargs.setdefault("num_heads", 4)
    kwargs.setdefault("max_tokens", 64)
    return UNet(channels=CHANNELS, **kwargs)


@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 128, 128)])
@pytest.mark.parametrize("norm", ["BN", "GN"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unet_variants_forward_backward(variant, norm, shape):
    torch.manual_seed(0)
    cfg = VARIANTS[variant]
    model = _unet(norm=norm, **cfg)
    assert any(isinstance(m, MaskAttention) for m in model.modules()) == variant.startswith(
        "maskattn"
    )
    has_hybrid = variant.endswith("hybrid")
    assert any(isinstance(m, HybridAttention) for m in model.modules()) == has_hybrid
    assert any(isinstance(m, MultiScaleFusion) for m in model.modules()) == has_hybrid

    b, h, w = shape
    features, gates = model.forward_with_gates(torch.randn(b, 3, h, w))
    assert sorted(features) == sorted(EXPECTED_CHANNELS)
    for name, channels in EXPECTED_CHANNELS.items():
        stride = int(name[3:])
        assert features[name].shape == (b, channels, h // stride, w // stride), name
        assert torch.isfinite(features[name]).all()
    expected_gates = [f"enc{s}" for s in cfg["encoder_attention_scales"]]
    expected_gates += [f"dec{s}" for s in cfg["decoder_attention_scales"]]
    assert sorted(gates) == sorted(expected_gates)
    for name, g in gates.items():
        assert g.shape == (b, 1) + features[name].shape[-2:]

    # The heads read dec1 only; every parameter must still get a gradient (DDP needs it).
    features["dec1"].square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("kind", ["gate", "hard", "bias", "none"])
def test_unet_mask_kinds(kind):
    torch.manual_seed(1)
    model = _unet(
        encoder_attention_scales=(2, 8),
        decoder_attention_scales=(4,),
        mask_kind=kind,
        input_size=(64, 64),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    features, gates = model.forward_with_gates(x)
    assert sorted(gates) == (["dec4", "enc2", "enc8"] if kind in ("gate", "hard") else [])
    torch.testing.assert_close(model(x)["dec1"], features["dec1"])
    if kind == "bias":
        # enc2 sees 32x32 pixels -> 64 tokens max -> 8x8 key grid.
        assert model.encoder_attention["enc2"].grid_size == (8, 8)
        with pytest.raises(ValueError, match="bias table"):
            model(torch.randn(1, 3, 32, 32))


def test_forward_is_deterministic_in_eval():
    torch.manual_seed(2)
    model = _unet(**VARIANTS["maskattn_hybrid"]).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_bad_inputs_raise():
    model = _unet()
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="60x64"):
        model(torch.randn(1, 3, 60, 64))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="scale 3"):
        _unet(encoder_attention_scales=(3,))
    with pytest.raises(ValueError, match="scale 16"):
        _unet(encoder_attention_scales=(16,))
    with pytest.raises(ValueError, match="scale 8"):
        _unet(decoder_attention_scales=(8,))  # the bottleneck has no decoder stage
    with pytest.raises(ValueError, match="num_heads"):
        _unet(num_heads=3)
    with pytest.raises(ValueError, match="channels"):
        UNet(channels=(8,))
    with pytest.raises(ValueError, match="divisible"):
        _unet(mask_kind="bias", input_size=(100, 100))


def test_default_unet_layout():
    model = UNet()
    assert model.size_divisibility == 16
    assert sorted(model.encoder_attention) == ["enc16", "enc4", "enc8"]
    assert sorted(model.decoder_attention) == ["dec4", "dec8"]
    widths = {1: 32, 2: 64, 4: 128, 8: 256, 16: 512}
    expected = {f"enc{s}": c for s, c in widths.items()}
    expected.update({f"dec{s}": c for s, c in widths.items() if s < 16})
    assert model.feature_channels == expected
    # Light enough for 128x128 inputs.
    assert sum(p.numel() for p in model.parameters()) < 12_000_000


def test_blocks():
    assert isinstance(get_activation("relu"), nn.ReLU)
    assert isinstance(get_activation("gelu"), nn.GELU)
    assert isinstance(get_activation("silu"), nn.SiLU)
    with pytest.raises(ValueError, match="activation"):
        get_activation("tanh")
    assert [group_norm_groups(c) for c in (8, 48, 64, 100)] == [8, 24, 32, 25]
    assert get_norm_layer("GN", 48).num_groups == 24
    assert isinstance(get_norm_layer("BN", 8), nn.BatchNorm2d)
    assert isinstance(get_norm_layer("SyncBN", 8), nn.SyncBatchNorm)
    assert isinstance(get_norm_layer("NaiveSyncBN", 8), NaiveSyncBatchNorm)
    assert get_norm_layer("", 8) is None
    with pytest.raises(ValueError, match="norm"):
        get_norm_layer("LN2d", 8)

    block = ConvBlock(3, 12, num_convs=3, norm="GN", activation="silu")
    assert sum(isinstance(m, nn.Conv2d) for m in block) == 3
    assert all(m.bias is None for m in block if isinstance(m, nn.Conv2d))
    assert block(torch.randn(2, 3, 9, 7)).shape == (2, 12, 9, 7)
    no_norm = ConvBlock(3, 4, num_convs=1, norm="")
    assert no_norm[0].bias is not None and len(no_norm) == 2
    with pytest.raises(ValueError, match="num_convs"):
        ConvBlock(3, 4, num_convs=0)


def _small_cfg():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.MASK_ATTN_UNET.CHANNELS = list(CHANNELS)
    cfg.MODEL.MASK_ATTN_UNET.OUT_FEATURES = ["dec1", "dec2", "enc8"]
    cfg.MODEL.MASK_ATTN.ENCODER_SCALES = [4, 8]
    cfg.MODEL.MASK_ATTN.DECODER_SCALES = [4]
    cfg.MODEL.MASK_ATTN.MAX_TOKENS = 64
    cfg.MODEL.HYBRID_ATTN.SKIP_ATTENTION = True
    cfg.MODEL.HYBRID_ATTN.MULTISCALE_FUSION = True
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_registry_names():
    assert "build_maskattn_unet_backbone" in BACKBONE_REGISTRY
    assert "MaskAttnUNetBackbone" in BACKBONE_REGISTRY


def test_backbone_adapter_from_config():
    torch.manual_seed(3)
    cfg = _small_cfg()
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MaskAttnUNetBackbone)
    assert backbone.size_divisibility == 8
    shapes = backbone.output_shape()
    assert shapes == {
        "dec1": ShapeSpec(channels=8, stride=1),
        "dec2": ShapeSpec(channels=16, stride=2),
        "enc8": ShapeSpec(channels=64, stride=8),
    }
    x = torch.randn(2, 3, 64, 64)
    features = backbone(x)
    assert sorted(features) == sorted(shapes)
    for name, spec in shapes.items():
        assert features[name].shape == (2, spec.channels, 64 // spec.stride, 64 // spec.stride)
    features, gates = backbone.forward_with_gates(x)
    assert sorted(features) == sorted(shapes)
    assert sorted(gates) == ["dec4", "enc4", "enc8"]

    # The registered class and function build the same architecture.
    by_class = BACKBONE_REGISTRY.get("MaskAttnUNetBackbone")(cfg, ShapeSpec(channels=3))
    by_func = build_maskattn_unet_backbone(cfg, ShapeSpec(channels=3))
    n_params = sum(p.numel() for p in backbone.parameters())
    assert sum(p.numel() for p in by_class.parameters()) == n_params
    assert sum(p.numel() for p in by_func.parameters()) == n_params


def test_backbone_adapter_default_config_and_syncbn():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.MASK_ATTN_UNET.NORM = "SyncBN"
    backbone = build_backbone(cfg)  # builds on a CPU-only machine
    assert any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())
    assert backbone.output_shape() == {"dec1": ShapeSpec(channels=32, stride=1)}
    assert backbone.size_divisibility == 16


def test_backbone_adapter_bad_config():
    cfg = _small_cfg()
    cfg.MODEL.MASK_ATTN_UNET.OUT_FEATURES = ["dec8"]  # the bottleneck is enc8
    with pytest.raises(ValueError, match="out_features"):
        build_backbone(cfg)
    cfg = _small_cfg()
    with pytest.raises(ValueError, match="IN_CHANNELS"):
        build_maskattn_unet_backbone(cfg, ShapeSpec(channels=1))
    cfg = _small_cfg()
    cfg.MODEL.MASK_ATTN.DECODER_SCALES = [5]
    with pytest.raises(ValueError, match="scale 5"):
        build_backbone(cfg)
