"""Geometry of integer label maps (semantic, instance, segment and panoptic id maps), shared
by the model's postprocessing, the evaluators and the tools: one resize rule (nearest with
pixel-centre alignment) and boxes without per-label masks."""
from typing import Tuple

import torch

__all__ = ["resize_label_map", "label_map_boxes", "boxes_from_projections"]


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
    pixels; all zeros for an absent label), without forming the masks: the occupied rows and
    columns of every label come from one bincount per axis.

    Args:
        label_map: (H, W) int64 labels in [-1, num_labels).
        labels: (N,) int64 labels in [0, num_labels).
        num_labels: number of labels.

    Returns:
        (N, 4) float32 XYXY boxes.
    """
    h, w = label_map.shape
    slot = label_map + 1  # slot 0: label -1
    num_slots = num_labels + 1
    device = label_map.device
    cols = torch.bincount(
        (slot * w + torch.arange(w, device=device)).flatten(), minlength=num_slots * w
    ).view(num_slots, w)
    rows = torch.bincount(
        (slot * h + torch.arange(h, device=device)[:, None]).flatten(), minlength=num_slots * h
    ).view(num_slots, h)
    selected = labels + 1
    return boxes_from_projections(
        rows.index_select(0, selected) > 0, cols.index_select(0, selected) > 0
    )


def boxes_from_projections(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (N, 4) float32 of masks given by their occupied rows (N, H) and columns
    (N, W), bool; all zeros for an empty mask."""
    h, w = rows.shape[1], cols.shape[1]
    xs = torch.arange(w, device=cols.device)
    ys = torch.arange(h, device=rows.device)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y1 = torch.where(rows, ys, h).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
