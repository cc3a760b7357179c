"""Geometry of integer label maps (semantic, instance, segment and panoptic id maps), shared
by the model's postprocessing, the evaluators and the tools: one resize rule (nearest with
pixel-centre alignment) and boxes without per-label masks."""
from typing import Tuple

import torch

__all__ = ["resize_label_map", "label_map_boxes"]


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


def label_map_boxes(
    label_map: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> torch.Tensor:
    """
    Tight boxes around the masks ``label_map == label`` for each of ``labels``, detectron2's
    ``BitMasks.get_bounding_boxes`` convention (x1, y1 inclusive, x2, y2 exclusive, absolute
    pixels; all zeros for an absent label), without forming the masks: the extreme
    coordinates of the selected labels' pixels, two scatter reductions.

    Args:
        label_map: (H, W) int64 labels in [-1, num_labels).
        labels: (N,) int64 distinct labels in [0, num_labels).
        num_labels: number of labels.

    Returns:
        (N, 4) float32 XYXY boxes.
    """
    h, w = label_map.shape
    device = label_map.device
    n = labels.numel()
    # Row of each pixel's label among ``labels`` (n: not selected, nor label -1).
    row_of_label = torch.full((num_labels + 1,), n, dtype=torch.long, device=device)
    row_of_label[labels + 1] = torch.arange(n, device=device)
    row = row_of_label.index_select(0, label_map.flatten() + 1)
    pixels = torch.nonzero(row < n).squeeze(1)
    row = row.index_select(0, pixels)[:, None].expand(-1, 2)
    ys = torch.div(pixels, w, rounding_mode="floor")
    xy = torch.stack([pixels - ys * w, ys], dim=1)
    top_left = torch.full((n, 2), max(h, w), dtype=torch.long, device=device)
    top_left.scatter_reduce_(0, row, xy, "amin")
    bottom_right = torch.full((n, 2), -1, dtype=torch.long, device=device)
    bottom_right = bottom_right.scatter_reduce_(0, row, xy, "amax") + 1
    boxes = torch.cat([top_left, bottom_right], dim=1).float()
    return torch.where(bottom_right[:, :1] > 0, boxes, torch.zeros_like(boxes))
