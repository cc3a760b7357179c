"""Connected components of label maps, by hooking and pointer jumping: vectorised torch (no
per-pixel Python loops) that runs on CPU and CUDA."""
import functools
from typing import Tuple

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
    h, w = label_map.shape
    values = label_map.flatten()
    inside = foreground.bool().flatten()
    u, v = _grid_edges(h, w, connectivity, label_map.device)
    same = values.index_select(0, u) == values.index_select(0, v)
    edge = torch.nonzero(same & inside.index_select(0, u) & inside.index_select(0, v)).squeeze(1)
    parent = _component_maxima(h * w, u.index_select(0, edge), v.index_select(0, edge))
    return _number_components(parent, inside).view(h, w)
