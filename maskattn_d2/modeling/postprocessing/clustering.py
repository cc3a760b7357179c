"""Grouping points into instances: seeded clustering of embeddings by cosine similarity, seeds
of a seed map and the assignment of points to seeds. Vectorised torch (no per-pixel Python
loops) that runs on CPU and CUDA.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["assign_to_seeds", "cluster_embeddings", "find_seeds"]


def _greedy_suppression(denser: torch.Tensor, sweeps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Greedy non-maximum suppression in parallel sweeps.

    Items are in priority order; going through them in that order, an item is selected unless
    a selected item is adjacent to it. Each sweep (two matrix-vector products) selects every
    undecided item with no undecided adjacent item before it and suppresses the items after it
    that are adjacent to a new selection. After enough sweeps (at most the number of items)
    this is the greedy result; with fewer, some items are still undecided. The sweeps stop
    early once every item is decided (one host sync per sweep).

    Args:
        denser: (K, K) float, ``denser[i, j] = 1`` if j < i and j is adjacent to i, else 0
            (the strictly lower triangle of a 0 / 1 adjacency matrix).
        sweeps: number of parallel sweeps.

    Returns:
        selected, undecided: (K,) bool.
    """
    # 0 / 1 floats throughout: the matrix products need them, and conversions cost.
    undecided = torch.ones(denser.shape[0], dtype=denser.dtype, device=denser.device)
    selected = torch.zeros_like(undecided)
    for _ in range(sweeps):
        new = undecided * (denser @ undecided == 0)
        selected += new
        undecided = (undecided - new) * (denser @ new == 0)
        # Usually decided after 2-3 sweeps: stopping then saves most of the small ops.
        if not bool(undecided.any()):
            break
    return selected > 0, undecided > 0


def _density_seeds(candidates: torch.Tensor, similarity_threshold: float, sweeps: int):
    """
    Seeds among candidate points: greedy non-maximum suppression by density.

    A candidate's density is the number of candidates within the threshold (cosine similarity
    above it, itself included). In order of decreasing density (ties: lower index first), a
    candidate is a seed unless a seed is within the threshold, resolved in ``sweeps`` parallel
    sweeps (:func:`_greedy_suppression`); candidates still undecided are not seeds.

    Args:
        candidates: (C, D) L2-normalised points.

    Returns:
        (S,) int64 indices into ``candidates`` of the seeds, densest first.
    """
    # In-place comparisons keep the float dtype (1.0 / 0.0), which the matrix products need;
    # recomputing the product in the new order is cheaper than permuting rows and columns.
    density = (candidates @ candidates.t()).gt_(similarity_threshold).sum(dim=1)
    order = torch.argsort(density, descending=True, stable=True)
    ordered = candidates[order]
    denser = (ordered @ ordered.t()).gt_(similarity_threshold).tril_(diagonal=-1)
    seeds, _ = _greedy_suppression(denser, max(sweeps, 1))  # the densest is always a seed
    return order[seeds]


def _refine_centres(
    points: torch.Tensor, centres: torch.Tensor, similarity_threshold: float
) -> torch.Tensor:
    """
    One mean-shift step of all centres at once: every point joins its most similar centre if
    the similarity exceeds the threshold, and each centre becomes the renormalised mean of its
    points (a centre without points stays where it is).
    """
    num_centres = centres.shape[0]
    best, nearest = (points @ centres.t()).max(dim=1)
    slot = torch.where(best > similarity_threshold, nearest, num_centres)  # last: no centre
    sums = points.new_zeros(num_centres + 1, points.shape[1]).index_add_(0, slot, points)[:-1]
    norms = sums.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, sums / norms.clamp(min=1e-12), centres)


def cluster_embeddings(
    embeddings: torch.Tensor,
    *,
    similarity_threshold: float,
    min_cluster_size: int = 8,
    max_clusters: int = 100,
    num_seed_candidates: int = 384,
    refine_iters: int = 2,
    max_rounds: int = 4,
    nms_iters: int = 4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Seeded clustering of L2-normalised embeddings by cosine similarity, many seeds at once.

    At most ``max_rounds`` rounds over the points not yet consumed ("free"), each:

    1. Seeds: among a subsample of at most ``num_seed_candidates`` free points (evenly spaced
       in input order), greedy non-maximum suppression by density (the number of candidates
       with cosine similarity > threshold): in order of decreasing density, a candidate is a
       seed unless a seed is within the threshold (:func:`_density_seeds`, ``nms_iters``
       parallel sweeps; candidates left undecided wait for the next round).
    2. Centres: all centres are refined together ``refine_iters`` times on the candidates
       (every candidate joins its most similar centre if the similarity exceeds the threshold;
       each centre becomes the renormalised mean of its candidates, see
       :func:`_refine_centres`). After the first refinement, a centre within the threshold of
       a denser one is dropped: seeds of one spread-out cluster converge to the same centre.
    3. Assignment: every free point joins its most similar centre if the similarity exceeds the
       threshold. These points and the seeds are consumed. A cluster of fewer than
       ``min_cluster_size`` points is discarded (its points stay unclustered and are not
       reconsidered); free points near no centre wait for the next round.

    Rounds stop when fewer than ``min_cluster_size`` points are free, or after a round whose
    clusters were all too small (its seeds were the densest candidates left). Clusters are
    numbered by decreasing size (ties: in the order found) and only the ``max_clusters``
    largest are kept. Per round the cost is O(N * D * S) for S seeds plus
    O(C^2 * (D + nms_iters) + C * D * S * refine_iters) for the C candidates, in a fixed
    number of vectorised ops; the host waits for the device four times per round and once at
    the end (the greedy one-seed-at-a-time loop this replaces waited several times per seed).

    Args:
        embeddings: (N, D) L2-normalised embeddings (float).
        similarity_threshold: cosine similarity above which a point joins a centre, in (-1, 1).
        min_cluster_size: clusters with fewer points are discarded.
        max_clusters: most clusters returned (the largest).
        num_seed_candidates: size of the subsample in which seeds are chosen by density.
        refine_iters: mean-shift refinements of the centres.
        max_rounds: most seeding rounds.
        nms_iters: parallel sweeps of the seeds' non-maximum suppression per round.

    Returns:
        labels: (N,) int64 cluster index in [0, M), or -1 for unclustered points.
        confidence: (M,) float mean cosine similarity of each cluster's points to its centre.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(embeddings.shape)}.")
    if not -1.0 < similarity_threshold < 1.0:
        raise ValueError(f"similarity_threshold must be in (-1, 1), got {similarity_threshold}.")
    embeddings = embeddings.contiguous()
    device = embeddings.device
    num_points = embeddings.shape[0]
    min_size = max(min_cluster_size, 1)
    free = torch.ones(num_points, dtype=torch.bool, device=device)
    # Provisional clusters of all rounds: label of each point (-1: none), size and similarity sum.
    provisional = torch.full((num_points,), -1, dtype=torch.long, device=device)
    sizes, similarity_sums = [], []
    num_provisional = 0
    for round_index in range(max(max_rounds, 1)):
        if round_index == 0:  # every point is free
            free_idx, points = None, embeddings
        else:
            free_idx = torch.nonzero(free).squeeze(1)
            points = embeddings.index_select(0, free_idx)
        num_free = points.shape[0]
        if num_free < min_size:
            break
        if num_free > num_seed_candidates:  # evenly spaced subsample
            candidates = torch.linspace(
                0, num_free - 1, num_seed_candidates, device=device
            ).long()
            candidate_points = points.index_select(0, candidates)
        else:
            candidates, candidate_points = None, points
        seeds = _density_seeds(candidate_points, similarity_threshold, nms_iters)
        centres = candidate_points.index_select(0, seeds)
        if candidates is not None:
            seeds = candidates.index_select(0, seeds)
        for step in range(refine_iters):
            # The candidates are a fair sample of the free points: refining on them is as
            # good and costs O(C * S) instead of O(N * S).
            centres = _refine_centres(candidate_points, centres, similarity_threshold)
            if step == 0:
                # Seeds of one spread-out cluster: their centres converge. A centre close to a
                # denser one is dropped; its points go to the denser one or wait for the next
                # round.
                close = (centres @ centres.t()).gt_(similarity_threshold).tril_(diagonal=-1)
                centres = centres[close.sum(dim=1) == 0]
        best, nearest = (points @ centres.t()).max(dim=1)
        inside = best > similarity_threshold
        num_centres = centres.shape[0]
        slot = torch.where(inside, nearest, num_centres)  # slot num_centres: no cluster
        size = torch.bincount(slot, minlength=num_centres + 1)[:num_centres]
        sizes.append(size)
        similarity_sums.append(best.new_zeros(num_centres + 1).index_add_(0, slot, best)[:-1])
        round_labels = torch.where(inside, nearest + num_provisional, -1)
        num_provisional += num_centres
        consumed = inside.index_fill(0, seeds, True)  # a seed is consumed even if it drifted
        if free_idx is None:
            provisional, free = round_labels, ~consumed
        else:
            provisional.index_copy_(0, free_idx, round_labels)
            free.index_copy_(0, free_idx, ~consumed)
        # Its seeds were the densest free candidates: when none of them made a large enough
        # cluster, the free points left are too sparse for another round.
        if not bool((size >= min_size).any()):
            break
    if num_provisional == 0:
        return provisional, embeddings.new_zeros(0)
    size = torch.cat(sizes)
    similarity_sum = torch.cat(similarity_sums)
    # Largest first (stable: ties in the order found), discarded ones last.
    order = torch.argsort(torch.where(size >= min_size, size, -1), descending=True, stable=True)
    num_kept = min(int((size >= min_size).sum()), max_clusters)
    order = order[:num_kept]
    new_label = torch.full((num_provisional + 1,), -1, dtype=torch.long, device=device)
    new_label[order + 1] = torch.arange(num_kept, device=device)
    labels = new_label[provisional + 1]
    confidence = similarity_sum[order] / size[order].clamp(min=1)
    return labels, confidence


def _window_max(values: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Max over the ``kernel_size`` x ``kernel_size`` window around each pixel of a (h, w) map
    (``max_pool2d`` with stride 1 and same padding), as maxima of shifted views along each
    axis: on CPU several times faster than max_pool2d's indexed kernel for one small map."""
    radius = kernel_size // 2
    if radius == 0:
        return values
    h, w = values.shape
    padded = F.pad(values[None], (radius, radius, radius, radius), value=float("-inf"))[0]
    rows = padded[:, radius : radius + w]
    for dx in range(-radius, radius + 1):
        if dx:
            rows = torch.maximum(rows, padded[:, radius + dx : radius + dx + w])
    out = rows[radius : radius + h]
    for dy in range(-radius, radius + 1):
        if dy:
            out = torch.maximum(out, rows[radius + dy : radius + dy + h])
    return out


def find_seeds(
    seed_map: torch.Tensor, allowed: torch.Tensor, *, threshold: float, max_seeds: int,
    kernel_size: int = 3,
) -> torch.Tensor:
    """
    Seeds: local maxima of a seed map (max-pooling non-maximum suppression, as
    Panoptic-DeepLab finds centres) on allowed pixels, above a threshold, the strongest first.

    Args:
        seed_map: (h, w) float seed (centre-ness) map.
        allowed: (h, w) bool, pixels that may be seeds.
        threshold: least seed value of a seed.
        max_seeds: most seeds returned.
        kernel_size: odd size of the max-pooling window.

    Returns:
        (S,) int64 flat indices of the seeds, by decreasing seed value (ties: raster order).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}.")
    masked = torch.where(allowed, seed_map, torch.full_like(seed_map, -1.0))
    pooled = _window_max(masked, kernel_size)
    # Every pixel of a plateau (equal neighbouring maxima) is a peak here; the pairs are
    # resolved below, after the strongest peaks are chosen.
    flat = masked.flatten()
    peaks = allowed.flatten() & (flat >= pooled.flatten()) & (flat > threshold)
    candidates = torch.nonzero(peaks).squeeze(1)
    values = flat.index_select(0, candidates)
    order = torch.argsort(values, descending=True, stable=True)[:max_seeds]
    seeds = candidates.index_select(0, order)
    if seeds.numel() > 1:
        # Equal maxima next to each other are both peaks: keep the first of such a pair.
        h, w = seed_map.shape
        ys, xs = seeds // w, seeds % w
        near = ((ys[:, None] - ys[None, :]).abs() <= kernel_size // 2) & (
            (xs[:, None] - xs[None, :]).abs() <= kernel_size // 2
        )
        seed_values = values.index_select(0, order)
        earlier_twin = (near & (seed_values[:, None] == seed_values[None, :])).tril(diagonal=-1)
        seeds = seeds[~earlier_twin.any(dim=1)]
    return seeds


def assign_to_seeds(
    points: torch.Tensor,
    point_groups: torch.Tensor,
    seed_points: torch.Tensor,
    seed_groups: torch.Tensor,
) -> torch.Tensor:
    """
    Each point joins the nearest seed (squared Euclidean distance) of its own group.

    Args:
        points: (N, E) float embeddings of the points.
        point_groups: (N,) int64 group of each point (e.g. its connected component).
        seed_points: (S, E) float embeddings of the seeds.
        seed_groups: (S,) int64 group of each seed.

    Returns:
        (N,) int64 seed index in [0, S), or -1 where the point's group has no seed.
    """
    num_seeds = seed_points.shape[0]
    if num_seeds == 0 or points.shape[0] == 0:
        return torch.full_like(point_groups, -1)
    # Each point reads the run of its group's seeds among the seeds sorted by group (stable,
    # so equal distances still go to the lowest seed index).
    order = torch.argsort(seed_groups, stable=True)
    sorted_groups = seed_groups.index_select(0, order)
    start = torch.searchsorted(sorted_groups, point_groups)
    count = torch.searchsorted(sorted_groups, point_groups, right=True) - start
    # A group with one seed needs no distances: most groups of a trained model.
    result = torch.where(count > 0, order.index_select(0, start.clamp(max=num_seeds - 1)), -1)
    longest = int(count.max())
    if longest <= 1:
        return result
    # The points of groups with several seeds against their group's run, padded to the
    # longest run: M x (most seeds in a group) distances instead of N x S.
    contested = torch.nonzero(count > 1).squeeze(1)
    count = count.index_select(0, contested)
    slot = torch.arange(longest, device=points.device)
    candidate = (start.index_select(0, contested)[:, None] + slot).clamp_(max=num_seeds - 1)
    candidate = order.index_select(0, candidate.flatten()).view(-1, longest)
    # Summed one embedding dimension at a time: 1-d gathers, and no sum over a short
    # innermost axis (both several times slower on CPU than the elementwise ops).
    flat_candidate = candidate.flatten()
    seed_columns = seed_points.t().contiguous()
    point_columns = points.index_select(0, contested).t()
    distance = torch.zeros(candidate.shape, dtype=points.dtype, device=points.device)
    for seed_column, point_column in zip(seed_columns, point_columns):
        difference = seed_column.index_select(0, flat_candidate).view(candidate.shape)
        distance.add_(difference.sub_(point_column[:, None]).square_())
    distance.masked_fill_(slot[None, :] >= count[:, None], float("inf"))
    nearest = distance.argmin(dim=1)
    return result.index_copy_(0, contested, candidate.gather(1, nearest[:, None])[:, 0])
