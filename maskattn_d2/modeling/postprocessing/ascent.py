"""Grouping pixels by climbing the seed map: every pixel steps to its highest neighbour until it
reaches a local maximum (a watershed, as Cellpose follows its flows to their sinks), and
basins whose maxima are joined by a ridge are one instance. Vectorised torch (pointer jumping
over the grid's edges, no per-pixel Python loops) on CPU and CUDA."""
import math
from typing import Optional, Tuple

import torch

from .components import _component_maxima, _grid_edges

__all__ = ["ascent_roots", "ridge_joined_pairs", "same_region_edges"]


def same_region_edges(regions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (u, v) of the 8-neighbour pairs of an (h, w) region map whose two pixels
    lie in the same region (regions >= 0; -1 is outside every region)."""
    h, w = regions.shape
    u, v = _grid_edges(h, w, 8, regions.device)
    flat = regions.flatten()
    region_u = flat.index_select(0, u)
    inside = (region_u >= 0) & (region_u == flat.index_select(0, v))
    edge = torch.nonzero(inside).squeeze(1)
    return u.index_select(0, edge), v.index_select(0, edge)


def ascent_roots(
    seed_map: torch.Tensor,
    regions: torch.Tensor,
    edges: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """
    The local maximum each pixel reaches by climbing the seed map inside its region.

    A pixel's next step is the pixel of largest (value, raster index) among itself and its
    8 neighbours of the same region (the highest neighbour; the raster index breaks ties, so
    no path loops). Following these steps by pointer jumping (each jump doubles the distance
    covered) takes ceil(log2(h * w)) gathers. A flat top (a plateau of equal maxima, e.g. a
    saturated sigmoid) can still end several paths; its pixels are joined into one root, the
    plateau's largest raster index (connected components, a few host syncs, only where equal
    neighbouring maxima exist). NaN values are their own roots.

    Args:
        seed_map: (h, w) float.
        regions: (h, w) int64, e.g. semantic connected components; pixels < 0 take part in
            nothing and are their own roots.
        edges: :func:`same_region_edges` of ``regions``, if already computed.

    Returns:
        (h * w,) int64 flat index of each pixel's root (a local maximum of its region).
    """
    if seed_map.shape != regions.shape or seed_map.dim() != 2:
        raise ValueError(
            f"seed_map and regions must be the same (h, w) shape, got {tuple(seed_map.shape)} "
            f"and {tuple(regions.shape)}."
        )
    num_pixels = seed_map.numel()
    u, v = same_region_edges(regions) if edges is None else edges
    # Both directions of every edge: (from, to).
    source, target = torch.cat([u, v]), torch.cat([v, u])
    values = seed_map.flatten()
    # The largest value around each pixel, then the largest index holding it (no sort).
    target_values = values.index_select(0, target)
    best_value = values.clone().scatter_reduce_(0, source, target_values, "amax")
    index = torch.arange(num_pixels, device=values.device)
    parent = torch.where(values == best_value, index, -1)
    holds_best = target_values == best_value.index_select(0, source)
    parent.scatter_reduce_(0, source[holds_best], target[holds_best], "amax")
    parent = torch.where(parent < 0, index, parent)  # NaN: equal to nothing, not even itself
    for _ in range(max(1, math.ceil(math.log2(max(num_pixels, 2))))):
        parent = parent.index_select(0, parent)
    # Flat tops: neighbouring pixels of equal value with no higher neighbour are one root.
    top = values == best_value
    flat = (
        top.index_select(0, u)
        & top.index_select(0, v)
        & (values.index_select(0, u) == values.index_select(0, v))
    )
    if bool(flat.any()):
        plateau = _component_maxima(num_pixels, u[flat], v[flat])
        parent = plateau.index_select(0, parent)
    return parent


def ridge_joined_pairs(
    seed_map: torch.Tensor,
    regions: torch.Tensor,
    roots: torch.Tensor,
    root_seed: torch.Tensor,
    saddle_depth: float,
    edges: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Pairs of seeds whose basins meet on a ridge: two neighbouring pixels of one region, in the
    basins of seeds a and b, both with seed values above ``min(peak_a, peak_b) - saddle_depth``.
    Such maxima are one object with a ridged top (a valley between two objects dips deeper).

    Args:
        seed_map: (h, w) float.
        regions: (h, w) int64 region map (as :func:`ascent_roots`).
        roots: (h * w,) int64 root of each pixel (:func:`ascent_roots`).
        root_seed: (h * w,) int64 seed index of a root pixel, -1 for pixels that are no seed.
        saddle_depth: see above (>= 0).
        edges: :func:`same_region_edges` of ``regions``, if already computed.

    Returns:
        (a, b) int64 seed indices of the joined pairs (possibly repeated).
    """
    u, v = same_region_edges(regions) if edges is None else edges
    root_u, root_v = roots.index_select(0, u), roots.index_select(0, v)
    seed_u, seed_v = root_seed.index_select(0, root_u), root_seed.index_select(0, root_v)
    between = (seed_u >= 0) & (seed_v >= 0) & (seed_u != seed_v)
    values = seed_map.flatten()
    saddle = torch.minimum(values.index_select(0, u[between]), values.index_select(0, v[between]))
    lower_peak = torch.minimum(
        values.index_select(0, root_u[between]), values.index_select(0, root_v[between])
    )
    ridge = lower_peak - saddle < saddle_depth
    return seed_u[between][ridge], seed_v[between][ridge]
