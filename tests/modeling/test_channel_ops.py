"""Tests of the channel reductions of maskattn_d2.layers against torch's own."""
import pytest
import torch
import torch.nn.functional as F

from maskattn_d2.layers import (
    argmax_channels,
    l2_normalize_channels,
    softmax_channels,
)


@pytest.mark.parametrize("dim", [0, 1, -3])
def test_argmax_channels_picks_the_first_maximum_like_torch(dim):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 5, 6, 7), generator=g).float()  # many ties
    assert torch.equal(argmax_channels(scores, dim=dim), scores.argmax(dim=dim))


@pytest.mark.parametrize("num_channels", [3, 133])
def test_argmax_channels_of_channels_last_maps_picks_the_first_maximum_like_torch(num_channels):
    # Channels innermost (a (K, h, w) view of (h, w, K), or a channels-last batch) take the
    # row-wise path; ties must still go to the first channel.
    g = torch.Generator().manual_seed(num_channels)
    rows = torch.randint(0, 3, (9, 11, num_channels), generator=g).float()
    view = rows.permute(2, 0, 1)
    assert torch.equal(argmax_channels(view, dim=0), view.argmax(dim=0))
    batch = torch.randn(2, num_channels, 9, 11, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    assert torch.equal(argmax_channels(batch, dim=1), batch.argmax(dim=1))
    assert argmax_channels(batch, dim=1).dtype == torch.int64


def test_l2_normalize_channels_equals_f_normalize_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 4, generator=g)
    x[0, :, 0, 0] = 0.0  # a zero vector: both divide by eps
    x[1, :, 0, 0] = 1e-9
    weights = torch.randn(3, 8, 5, 4, generator=g)
    ours, reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = l2_normalize_channels(ours, 1e-6)
    expected = F.normalize(reference, dim=1, eps=1e-6)
    torch.testing.assert_close(out, expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad)


@pytest.mark.parametrize("dim", [0, 1])
def test_softmax_channels_equals_softmax(dim):
    g = torch.Generator().manual_seed(1)
    scores = 20 * torch.randn(7, 5, 6, generator=g)
    scores[:, 0, 0] = 1e4  # large equal logits: no overflow
    torch.testing.assert_close(softmax_channels(scores, dim=dim), scores.softmax(dim=dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_l2_normalize_channels_in_half_precision_stays_finite(dtype):
    # Squares of half-precision values above 256 overflow and eps^2 underflows to zero.
    x = torch.tensor([[[[300.0]], [[400.0]]], [[[0.0]], [[0.0]]]], dtype=dtype)
    out = l2_normalize_channels(x, 1e-6)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, F.normalize(x, dim=1, eps=1e-6))
    torch.testing.assert_close(out[0].float().flatten(), torch.tensor([0.6, 0.8]), atol=1e-2, rtol=0)
