"""Reductions over the channel dimension of (..., K, H, W) maps, written for speed on CPU:
torch's own ``argmax`` and ``F.normalize`` reduce over a non-innermost dimension with a
strided loop there (10x slower than the elementwise forms below at (8, 6, 128, 128))."""
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "argmax_channels",
    "l2_normalize_channels",
    "softmax_channels",
]


def argmax_channels(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """
    ``scores.argmax(dim)`` (the first maximal channel) of a CPU map, fast in either memory
    layout. Channels innermost (channels-last, e.g. a (K, h, w) view of an (h, w, K) map):
    NumPy's vectorised row argmax (133 x 128 x 128: ~1 ms, torch's ~5 ms). Otherwise: the
    largest reversed channel index among the channels equal to the maximum, elementwise
    over whole channel planes. Positions whose scores are NaN get an unspecified channel.
    Other devices use ``argmax``.

    Returns:
        int64 tensor of ``scores``' shape without ``dim``.
    """
    if scores.device.type != "cpu":
        return scores.argmax(dim=dim)
    dim = dim % scores.dim()
    num_channels = scores.shape[dim]
    channels_last = scores.movedim(dim, -1)
    if scores.dtype in (torch.float32, torch.float64) and channels_last.is_contiguous():
        rows = channels_last.detach().reshape(-1, num_channels).numpy()
        return torch.from_numpy(rows.argmax(axis=1).astype(np.int64, copy=False)).view(
            channels_last.shape[:-1]
        )
    # The narrowest integer type that holds the channel count keeps the product cheap.
    if num_channels < 2**8:
        dtype = torch.uint8
    elif num_channels < 2**15:
        dtype = torch.int16
    else:
        dtype = torch.int32
    shape = [1] * scores.dim()
    shape[dim] = num_channels
    reversed_index = torch.arange(num_channels, 0, -1, device=scores.device).to(dtype).view(shape)
    # >= is the same test as == here (nothing exceeds the max) and cheaper on CPU.
    at_max = scores >= scores.amax(dim=dim, keepdim=True)
    first = num_channels - (at_max * reversed_index).amax(dim=dim).long()
    return first.clamp_(max=num_channels - 1)


def l2_normalize_channels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.normalize(x, dim=1, eps=eps)`` of a (B, C, ...) tensor: ``x / max(||x||, eps)``,
    on CPU in float32 as ``x * rsqrt(max(||x||^2, eps^2))`` (same values, gradient within
    float rounding). Other devices and dtypes use ``F.normalize``: in half precision the
    squares would overflow (|x| > 256) and eps^2 underflow to zero."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.normalize(x, dim=1, eps=eps)
    squared_norm = (x * x).sum(dim=1, keepdim=True)
    return x * torch.rsqrt(squared_norm.clamp(min=eps * eps))


def softmax_channels(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``scores.softmax(dim)`` as ``exp(x - max) / sum`` with reductions over ``dim``: on CPU
    1.4x faster than torch's strided softmax over a leading dimension (133 x 128 x 128);
    equal within float rounding. Other devices use ``softmax``."""
    if scores.device.type != "cpu":
        return scores.softmax(dim=dim)
    exp = (scores - scores.amax(dim=dim, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=dim, keepdim=True))

