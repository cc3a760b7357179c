"""Tests of the hybrid channel/spatial attention and the multi-scale fusion."""
import pytest
import torch
import torch.nn.functional as F

from maskattn_d2.modeling.attention.hybrid_attention import (
    ChannelAttention,
    HybridAttention,
    MultiScaleFusion,
    SpatialAttention,
)


def _channel_reference(module: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    w1, b1 = module.mlp[0].weight.flatten(1), module.mlp[0].bias
    w2, b2 = module.mlp[2].weight.flatten(1), module.mlp[2].bias

    def mlp(v):  # (B, C) -> (B, C)
        return F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)

    logits = mlp(x.mean(dim=(2, 3)))
    if module.use_max_pool:
        logits = logits + mlp(x.amax(dim=(2, 3)))
    return x * torch.sigmoid(logits)[:, :, None, None]


@pytest.mark.parametrize("use_max_pool", [False, True])
def test_channel_attention_formula(use_max_pool):
    torch.manual_seed(0)
    module = ChannelAttention(64, reduction=4, use_max_pool=use_max_pool)
    assert module.mlp[0].out_channels == 16
    x = torch.randn(2, 64, 5, 7)
    torch.testing.assert_close(module(x), _channel_reference(module, x))


def test_channel_attention_hidden_width_floor():
    # hidden = max(C // reduction, 8)
    assert ChannelAttention(32, reduction=16).mlp[0].out_channels == 8
    assert ChannelAttention(512, reduction=16).mlp[0].out_channels == 32


def test_spatial_attention_formula():
    torch.manual_seed(1)
    module = SpatialAttention(kernel_size=7)
    x = torch.randn(2, 6, 9, 11)
    pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
    w_s = torch.sigmoid(F.conv2d(pooled, module.conv.weight, module.conv.bias, padding=3))
    torch.testing.assert_close(module(x), x * w_s)
    assert module.weights(x).shape == (2, 1, 9, 11)


def test_hybrid_is_channel_then_spatial_and_trains():
    torch.manual_seed(2)
    module = HybridAttention(16, reduction=2, spatial_kernel=3)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = module(x)
    torch.testing.assert_close(y, module.spatial(module.channel(x)))
    # Every weight is a product of sigmoids, so |y| <= |x| elementwise.
    assert torch.all(y.abs() <= x.abs() + 1e-7)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        SpatialAttention(4)
    with pytest.raises(ValueError, match="reduction"):
        ChannelAttention(16, reduction=0)
    with pytest.raises(ValueError, match="at least one"):
        MultiScaleFusion([], 8)


def test_multiscale_fusion_matches_manual():
    torch.manual_seed(3)
    fusion = MultiScaleFusion([4, 6, 8], 5, norm="", activation="relu")
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 8, 4, 4)]
    up = [feats[0]] + [
        F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False) for f in feats[1:]
    ]
    conv = fusion.mix[0]
    ref = F.relu(F.conv2d(torch.cat(up, dim=1), conv.weight, conv.bias))
    out = fusion(feats)
    assert out.shape == (2, 5, 16, 16)
    torch.testing.assert_close(out, ref)

    with pytest.raises(ValueError, match="inputs"):
        fusion(feats[:2])
    with pytest.raises(ValueError, match="channels"):
        fusion([feats[0], feats[2], feats[1]])


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_multiscale_fusion_norms(norm):
    fusion = MultiScaleFusion([8, 16], 8, norm=norm)
    out = fusion([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
