"""Geometry of integer label maps (semantic, instance, segment and panoptic id maps), shared
by the model's postprocessing, the evaluators and the tools: one resize rule (nearest with
pixel-centre alignment) and boxes without per-label masks."""
from typing import Tuple

import torch

__all__ = ["pixel_boxes", "resize_label_map", "selected_label_pixels"]


def resize_label_map(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """
    Nearest-neighbour resize of an integer map with pixel-centre alignment (the same geometry
    as bilinear with ``align_corners=False``), done by indexing so ids stay exact in any dtype.

    Args:
        labels: (h, w) integer map.
        size: (H, W) output size.

    Returns:
        (H, W) map of the same dtype.
    """
    h, w = labels.shape
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return labels
    # Output pixel i samples input pixel floor((i + 0.5) * h / out_h) (PIL's NEAREST rule),
    # in float64 so that exact boundaries round the same way on every device.
    device = labels.device
    ys = torch.arange(out_h, device=device, dtype=torch.float64).add_(0.5).mul_(h).div_(out_h)
    xs = torch.arange(out_w, device=device, dtype=torch.float64).add_(0.5).mul_(w).div_(out_w)
    ys, xs = ys.long().clamp_(max=h - 1), xs.long().clamp_(max=w - 1)
    return labels[ys[:, None], xs[None, :]]


def selected_label_pixels(
    label_map: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The pixels of ``labels`` in a label map, without forming per-label masks.

    Args:
        label_map: (H, W) int64 labels in [-1, num_labels).
        labels: (N,) int64 distinct labels in [0, num_labels).
        num_labels: number of labels.

    Returns:
        rows, pixels: (P,) int64 each; ``pixels`` the flat indices of the pixels whose label is
        one of ``labels`` and ``rows`` the position of that label in ``labels``.
    """
    n = labels.numel()
    device = label_map.device
    # Row of each pixel's label among ``labels`` (n: not selected, nor label -1).
    row_of_label = torch.full((num_labels + 1,), n, dtype=torch.long, device=device)
    row_of_label[labels + 1] = torch.arange(n, device=device)
    row = row_of_label.index_select(0, label_map.flatten() + 1)
    pixels = torch.nonzero(row < n).squeeze(1)
    return row.index_select(0, pixels), pixels


def pixel_boxes(
    rows: torch.Tensor, pixels: torch.Tensor, n: int, shape: Tuple[int, int]
) -> torch.Tensor:
    """
    Tight XYXY boxes (n, 4) float32 of n masks given as pixel lists (the output of
    :func:`selected_label_pixels` on a map of ``shape`` (H, W)), detectron2's
    ``BitMasks.get_bounding_boxes`` convention (x1, y1 inclusive, x2, y2 exclusive; all zeros
    for an empty mask): the extreme coordinates by two scatter reductions.
    """
    h, w = shape
    device = pixels.device
    rows = rows[:, None].expand(-1, 2)
    ys = torch.div(pixels, w, rounding_mode="floor")
    xy = torch.stack([pixels - ys * w, ys], dim=1)
    top_left = torch.full((n, 2), max(h, w), dtype=torch.long, device=device)
    top_left.scatter_reduce_(0, rows, xy, "amin")
    bottom_right = torch.full((n, 2), -1, dtype=torch.long, device=device)
    bottom_right = bottom_right.scatter_reduce_(0, rows, xy, "amax") + 1
    boxes = torch.cat([top_left, bottom_right], dim=1).float()
    return torch.where(bottom_right[:, :1] > 0, boxes, torch.zeros_like(boxes))
