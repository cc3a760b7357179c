"""Connected components of label maps: OpenCV's single-pass labelling on CPU (all values at
once where no two foreground values touch, else a few values' masks stacked into one image),
hooking and pointer jumping in vectorised torch (no per-pixel Python loops) elsewhere and on
CUDA; all number the components the same way."""
import functools
from typing import Tuple

import cv2
import numpy as np
import torch

__all__ = ["label_map_components"]


@functools.lru_cache(maxsize=16)
def _grid_edges(h: int, w: int, connectivity: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (u, v), u < v, of every pair of neighbouring pixels of an h x w grid
    (cached: every image of a network size has the same grid; callers must not modify them)."""
    index = torch.arange(h * w, device=device).view(h, w)
    pairs = [(index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])]
    if connectivity == 8:
        pairs += [(index[:-1, :-1], index[1:, 1:]), (index[:-1, 1:], index[1:, :-1])]
    u = torch.cat([a.flatten() for a, _ in pairs])
    v = torch.cat([b.flatten() for _, b in pairs])
    return u, v


def _component_maxima(num_nodes: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """
    For every node of the graph with edges (u, v), the largest node of its component.

    Hooking and pointer jumping (Shiloach-Vishkin style): ``parent[x]`` is always a node of
    x's component with ``parent[x] >= x``. Each round, for every edge whose endpoints have
    different parents, the smaller parent is pointed at the larger one (one scatter-max), then
    every node jumps twice to its parent's parent. Every round strictly raises a parent of each
    unfinished edge, and once all edges agree every component points at its largest node.
    Long paths take O(log n) rounds rather than O(n); one host sync per round.
    """
    parent = torch.arange(num_nodes, device=u.device)
    for _ in range(num_nodes + 1):
        # index_select: much faster than advanced indexing for 1-d gathers on CPU.
        pu, pv = parent.index_select(0, u), parent.index_select(0, v)
        if not bool((pu != pv).any()):
            break
        parent.scatter_reduce_(0, torch.minimum(pu, pv), torch.maximum(pu, pv), "amax")
        parent = parent.index_select(0, parent)
        parent = parent.index_select(0, parent)
    return parent


def _number_components(parent: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Labels 1..n of the components (ordered by their largest node), 0 for background."""
    roots = foreground & (parent == torch.arange(parent.numel(), device=parent.device))
    rank = torch.cumsum(roots, dim=0)
    return torch.where(foreground, rank.index_select(0, parent), 0)


def label_map_components(
    label_map: torch.Tensor, foreground: torch.Tensor, connectivity: int = 8
) -> torch.Tensor:
    """
    Connected components of the regions of equal value of a label map.

    Foreground pixels join their foreground neighbours of the same value, so that every value
    gets its own components in one pass over the map, with no stack of per-value masks.

    Args:
        label_map: (h, w) integer map (e.g. the semantic argmax).
        foreground: (h, w) bool, the pixels to label.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        (h, w) int64 labels: 0 for background, components numbered 1..n by their largest
        raster index.
    """
    if label_map.dim() != 2 or foreground.shape != label_map.shape:
        raise ValueError(
            f"label_map must be (h, w) and foreground the same shape, got "
            f"{tuple(label_map.shape)} and {tuple(foreground.shape)}."
        )
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    if label_map.device.type == "cpu" and label_map.numel() > 0:
        return _opencv_components(label_map, foreground.bool(), connectivity)
    return _torch_components(label_map, foreground, connectivity)


def _torch_components(
    label_map: torch.Tensor, foreground: torch.Tensor, connectivity: int
) -> torch.Tensor:
    """:func:`label_map_components` by hooking and pointer jumping over the grid's edges (any
    device; a few host syncs)."""
    h, w = label_map.shape
    values = label_map.flatten()
    inside = foreground.bool().flatten()
    u, v = _grid_edges(h, w, connectivity, label_map.device)
    same = values.index_select(0, u) == values.index_select(0, v)
    edge = torch.nonzero(same & inside.index_select(0, u) & inside.index_select(0, v)).squeeze(1)
    parent = _component_maxima(h * w, u.index_select(0, edge), v.index_select(0, edge))
    return _number_components(parent, inside).view(h, w)


def _opencv_labels(mask: np.ndarray, connectivity: int) -> Tuple[int, np.ndarray]:
    """cv2's (h, w) int32 labels (0: background) of a bool mask, and their count with the
    background. SAUF (``CCL_WU``) scans pixel by pixel, so labels follow the raster order of
    each component's first pixel (the block-based default follows 2 x 2 blocks instead)."""
    return cv2.connectedComponentsWithAlgorithm(
        mask.view(np.uint8), connectivity, cv2.CV_32S, cv2.CCL_WU
    )


def _values_meet(values: np.ndarray, inside: np.ndarray, connectivity: int) -> bool:
    """True if two neighbouring inside pixels have different values."""
    shifts = [(np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])]
    if connectivity == 8:
        shifts += [(np.s_[:-1, :-1], np.s_[1:, 1:]), (np.s_[:-1, 1:], np.s_[1:, :-1])]
    return any(((values[a] != values[b]) & inside[a] & inside[b]).any() for a, b in shifts)


# Where foreground values touch, up to this many values are labelled with OpenCV, their masks
# stacked into one image; more go to the torch path.
_MAX_VALUES_LABELLED_APART = 8


def _opencv_components(
    label_map: torch.Tensor, foreground: torch.Tensor, connectivity: int
) -> torch.Tensor:
    """
    :func:`label_map_components` on CPU with OpenCV: one labelling pass instead of a few
    rounds over every edge of the grid.

    cv2 labels bool masks: where no two foreground values touch (one thing class, or things
    apart) the foreground is one mask; where they touch, each of a few values gets a mask of
    its own, the masks stacked into one image (more values: the torch path). The map is
    rotated by 180 degrees so that the raster order of each component's first pixel, cv2's
    numbering, becomes the numbering by largest raster index.
    """
    values = label_map.flip(0, 1).numpy()
    inside = foreground.flip(0, 1).numpy()
    if not _values_meet(values, inside, connectivity):
        count, labels = _opencv_labels(inside, connectivity)
        # The k-th component met in the rotated raster has the k-th largest last pixel.
        renumbered = np.where(labels > 0, count - labels, 0)
        return torch.from_numpy(renumbered[::-1, ::-1].astype(np.int64))
    present = np.unique(values[inside])
    if present.size > _MAX_VALUES_LABELLED_APART:
        return _torch_components(label_map, foreground, connectivity)
    # One cv2 pass over the values' masks stacked vertically with a blank row after each, so
    # that no component reaches from one value's mask into the next; the masks are disjoint,
    # so their label planes sum to one map.
    h, w = values.shape
    stacked = np.zeros((present.size, h + 1, w), dtype=bool)
    np.equal(values[None], present[:, None, None], out=stacked[:, :h])
    stacked[:, :h] &= inside
    count, stacked_labels = _opencv_labels(stacked.reshape(-1, w), connectivity)
    labels = stacked_labels.reshape(present.size, h + 1, w)[:, :h].sum(axis=0, dtype=np.int64)
    num_components = count - 1
    # Number all values' components together by their first pixel in the rotated raster.
    flat = torch.from_numpy(labels.reshape(-1))
    first = torch.full((num_components + 1,), flat.numel(), dtype=torch.long).scatter_reduce_(
        0, flat, torch.arange(flat.numel()), "amin"
    )
    order = torch.argsort(first[1:])
    number = torch.zeros(num_components + 1, dtype=torch.long)
    number[order + 1] = torch.arange(num_components, 0, -1)
    renumbered = number.index_select(0, flat).view(values.shape)
    return renumbered.flip(0, 1)
