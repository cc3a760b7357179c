"""Tests of the mask attention module (MAM)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from maskattn_d2.modeling.attention.mask_attention import (
    MaskAttention,
    key_gated_attention,
    key_grid_size,
)
from maskattn_d2.modeling.backbone.unet import UNet


def _mha_from(module: MaskAttention) -> nn.MultiheadAttention:
    """nn.MultiheadAttention holding the same projection weights as ``module``."""
    c = module.channels
    mha = nn.MultiheadAttention(c, module.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight])
        )
        mha.in_proj_bias.copy_(
            torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias])
        )
        mha.out_proj.weight.copy_(module.out_proj.weight)
        mha.out_proj.bias.copy_(module.out_proj.bias)
    return mha.eval()


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (LayerNorm affine included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("size", [(6, 5), (12, 10)])
def test_none_matches_multihead_attention(size):
    """Plain kind == LN + nn.MultiheadAttention + residual + LN + FFN + residual.

    (12, 10) with max_tokens=30 exercises spatial reduction: the reference then attends to
    the 2x2 average-pooled normalised tokens.
    """
    torch.manual_seed(0)
    h, w = size
    module = _randomise(MaskAttention(16, num_heads=4, mask_kind="none", max_tokens=30)).eval()
    mha = _mha_from(module)
    x = torch.randn(2, 16, h, w)

    normed = module.norm1(_tokens(x))
    kv = normed
    if h * w > 30:
        assert key_grid_size(h, w, 30) == (6, 5)
        kv = _tokens(F.avg_pool2d(normed.transpose(1, 2).reshape(2, 16, h, w), 2))
    ref_attn, ref_probs = mha(normed, kv, kv, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(module.attend(normed, (h, w)), ref_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.attention_probs(x), ref_probs, atol=1e-5, rtol=1e-5)

    ref = _tokens(x) + ref_attn
    ref = ref + module.ffn(module.norm2(ref))
    y, gate_logits = module(x)
    assert gate_logits is None
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(2, 16, h, w), atol=1e-5, rtol=1e-5)


def test_ffn_structure():
    module = MaskAttention(16, num_heads=4, ffn_ratio=2.0)
    linears = [m for m in module.ffn if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 16), (16, 32)]
    assert any(isinstance(m, nn.GELU) for m in module.ffn)


def test_key_grid_size():
    assert key_grid_size(128, 128, 256) == (16, 16)
    assert key_grid_size(32, 32, 256) == (16, 16)
    assert key_grid_size(16, 16, 256) == (16, 16)
    assert key_grid_size(8, 8, 256) == (8, 8)
    # Smallest r with ceil(10/r) * ceil(7/r) <= 5 is r = 5.
    assert key_grid_size(10, 7, 5) == (2, 2)
    with pytest.raises(ValueError, match="max_tokens"):
        key_grid_size(4, 4, 0)


def _gated_module(kind: str, closed: torch.Tensor, logit: float) -> tuple:
    """Module whose gate logit is -logit at ``closed`` positions and +logit elsewhere.

    Channel 0 of the returned input carries the +-1 indicator and the gate conv reads only it.
    """
    torch.manual_seed(1)
    module = _randomise(MaskAttention(8, num_heads=2, mask_kind=kind, max_tokens=64)).eval()
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.weight[0, 0] = logit
        module.gate.bias.zero_()
    x = torch.randn(1, 8, 6, 6)
    x[:, 0] = torch.where(closed, -1.0, 1.0)
    return module, x


def _closed_mask():
    closed = torch.zeros(6, 6, dtype=torch.bool)
    closed[1:4, 2:5] = True
    closed[5, 0] = True
    return closed


def test_gate_closes_keys():
    closed = _closed_mask()
    module, x = _gated_module("gate", closed, 30.0)
    probs = module.attention_probs(x)  # (1, heads, 36, 36)
    closed_keys = closed.flatten()
    assert probs[..., closed_keys].max() < 1e-6
    torch.testing.assert_close(probs[..., ~closed_keys].sum(-1), torch.ones(1, 2, 36))

    y, gate_logits = module(x)
    assert gate_logits.shape == (1, 1, 6, 6)
    torch.testing.assert_close(gate_logits[0, 0], torch.where(closed, -30.0, 30.0))
    # Values at closed keys do not reach the other pixels.
    x2 = x.clone()
    x2[:, 1:, closed] = torch.randn(7, int(closed.sum())) * 10
    y2, _ = module(x2)
    torch.testing.assert_close(y2[..., ~closed], y[..., ~closed], atol=1e-5, rtol=1e-5)


def test_hard_mask_zeroes_closed_keys_exactly():
    closed = _closed_mask()
    # |logit| = 1: a soft gate would barely change the weights, the hard mask removes keys.
    module, x = _gated_module("hard", closed, 1.0)
    probs = module.attention_probs(x)
    closed_keys = closed.flatten()
    assert torch.all(probs[..., closed_keys] == 0)

    # Open keys keep plain-attention weights renormalised over the open set.
    plain = MaskAttention(8, num_heads=2, mask_kind="none", max_tokens=64).eval()
    plain.load_state_dict(module.state_dict(), strict=False)
    ref = plain.attention_probs(x).masked_fill(closed_keys, 0.0)
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)


def test_hard_mask_guard_when_all_keys_closed():
    closed = torch.ones(6, 6, dtype=torch.bool)
    module, x = _gated_module("hard", closed, 5.0)
    plain = MaskAttention(8, num_heads=2, mask_kind="none", max_tokens=64).eval()
    plain.load_state_dict(module.state_dict(), strict=False)
    y, _ = module(x)
    assert torch.isfinite(y).all()
    # Every key stays open, so the module behaves as plain attention.
    torch.testing.assert_close(module.attention_probs(x), plain.attention_probs(x))
    torch.testing.assert_close(y, plain(x)[0])


@pytest.mark.parametrize("kind", ["gate", "hard"])
def test_gate_conv_gets_gradients(kind):
    closed = _closed_mask()
    module, x = _gated_module(kind, closed, 1.0)
    module.train()
    y, gate_logits = module(x)
    (y * torch.randn_like(y)).sum().backward()
    grad = module.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gate", "hard"])
def test_key_gated_attention_equals_masked_softmax_in_value_and_gradient(kind):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 6, generator=g) for _ in range(3))
    key_logits = 4 * torch.randn(2, 1, 1, 7, generator=g)
    k, v = k[:, :, :7], v[:, :, :7]
    weights = torch.randn(2, 3, 10, 6, generator=g)
    results = []
    for gated in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, key_logits)]
        qq, kk, vv, logits = leaves
        mask = F.logsigmoid(logits)
        if kind == "hard":  # as MaskAttention builds it: -inf on closed keys, straight-through
            mask = torch.zeros_like(mask).masked_fill(logits < 0, float("-inf")) + (
                mask - mask.detach()
            )
        if gated:
            out = key_gated_attention(qq, kk, vv, mask)
        else:
            scores = qq @ kk.transpose(-2, -1) / 6**0.5 + mask
            out = scores.softmax(dim=-1) @ vv
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_module_trains_through_key_gated_attention_like_masked_attention(monkeypatch):
    # Training (mask needs a gradient, CPU) takes the gated path; its output equals that of
    # the masked path the module takes without gradients.
    from maskattn_d2.modeling.attention import mask_attention

    calls = []

    def spy(*args):
        calls.append(1)
        return key_gated_attention(*args)

    monkeypatch.setattr(mask_attention, "key_gated_attention", spy)
    torch.manual_seed(4)
    module = _randomise(MaskAttention(8, num_heads=2, mask_kind="gate", max_tokens=16)).train()
    x = torch.randn(2, 8, 6, 6)
    y, _ = module(x)
    with torch.no_grad():
        expected, _ = module(x)
    assert len(calls) == 1
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    (y * torch.randn_like(y)).sum().backward()
    assert module.gate.weight.grad.abs().sum() > 0


def test_gate_logits_pooled_for_reduced_keys():
    """With reduction, the key mask uses the gate logits pooled like the keys."""
    torch.manual_seed(2)
    module = _randomise(MaskAttention(8, num_heads=2, mask_kind="gate", max_tokens=16)).eval()
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.weight[0, 0] = 30.0
        module.gate.bias.zero_()
    x = torch.randn(1, 8, 8, 8)
    closed = torch.zeros(8, 8, dtype=torch.bool)
    closed[:4, :4] = True  # exactly the 2x2 key cells of the top-left 2x2 block
    x[:, 0] = torch.where(closed, -1.0, 1.0)
    probs = module.attention_probs(x)
    assert probs.shape == (1, 2, 64, 16)
    closed_keys = torch.zeros(4, 4, dtype=torch.bool)
    closed_keys[:2, :2] = True
    assert probs[..., closed_keys.flatten()].max() < 1e-6
    _, gate_logits = module(x)
    assert gate_logits.shape == (1, 1, 8, 8)


def test_bias_kind_and_grid_mismatch():
    torch.manual_seed(3)
    # 12x12 input, max_tokens 36 -> 2x2 pooling -> 6x6 key grid.
    module = MaskAttention(8, num_heads=2, mask_kind="bias", max_tokens=36, grid_size=(6, 6))
    assert module.bias_table.shape == (2, 11 * 11)
    x = torch.randn(2, 8, 12, 12)
    y, gate_logits = module(x)
    assert y.shape == x.shape and gate_logits is None
    y.sum().backward()
    assert module.bias_table.grad is not None and module.bias_table.grad.abs().sum() > 0

    # A large bias on offset (0, 0) makes each query attend to its own key cell.
    with torch.no_grad():
        module.bias_table.zero_()
        module.bias_table[:, 5 * 11 + 5] = 50.0
    probs = module.attention_probs(x)  # (2, 2, 144, 36)
    ys, xs = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    own_cell = ((ys // 2) * 6 + xs // 2).flatten()
    assert torch.equal(probs.argmax(-1), own_cell.expand(2, 2, 144))
    assert probs.max(-1).values.min() > 0.99

    with pytest.raises(ValueError, match="bias table"):
        module(torch.randn(1, 8, 10, 10))  # 5x5 key grid
    with pytest.raises(ValueError, match="grid_size"):
        MaskAttention(8, num_heads=2, mask_kind="bias")
    with pytest.raises(ValueError, match="grid_size"):
        MaskAttention(8, num_heads=2, mask_kind="gate", grid_size=(4, 4))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        MaskAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="mask_kind"):
        MaskAttention(8, mask_kind="soft")
    with pytest.raises(ValueError, match="max_tokens"):
        MaskAttention(8, max_tokens=0)
    module = MaskAttention(8, num_heads=2)
    with pytest.raises(ValueError, match="expects"):
        module(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="expects"):
        module(torch.randn(8, 6, 6))


class _LargestOutput(TorchDispatchMode):
    """Records the largest output of any aten op and any output with N x N trailing dims."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.largest = 0
        self.quadratic = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.n * self.n or tuple(t.shape[-2:]) == (self.n, self.n):
                    self.quadratic.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["gate", "hard", "bias", "none"])
def test_no_quadratic_tensor_at_full_resolution(kind):
    """MAM at stride 1 of a 128x128 input: no op output is N x N (N = 16384)."""
    torch.manual_seed(4)
    num_heads, max_tokens = 4, 256
    model = UNet(
        channels=(8, 16, 32, 64),
        encoder_attention_scales=(1,),
        decoder_attention_scales=(),
        num_heads=num_heads,
        mask_kind=kind,
        max_tokens=max_tokens,
    )
    n = 128 * 128
    x = torch.randn(1, 3, 128, 128)
    with _LargestOutput(n) as rec:
        features, gates = model.forward_with_gates(x)
        features["dec1"].sum().backward()
    assert rec.quadratic == []
    # The largest intermediate is at most the (heads, N, max_tokens) attention logits.
    assert rec.largest <= num_heads * n * max_tokens
    assert sorted(gates) == (["enc1"] if kind in ("gate", "hard") else [])
