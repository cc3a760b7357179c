"""Grouping pixels into instances: embedding clustering and connected components.

Both are vectorised torch code (no per-pixel Python loops) that runs on CPU and CUDA.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["cluster_embeddings", "connected_components"]


def _evenly_spaced(indices: torch.Tensor, max_count: int) -> torch.Tensor:
    """At most ``max_count`` evenly spaced entries of ``indices`` (all of them if fewer)."""
    if indices.numel() <= max_count:
        return indices
    positions = torch.linspace(0, indices.numel() - 1, max_count, device=indices.device)
    return indices[positions.long()]


def cluster_embeddings(
    embeddings: torch.Tensor,
    *,
    similarity_threshold: float = 0.7,
    min_cluster_size: int = 8,
    max_clusters: int = 100,
    num_seed_candidates: int = 1024,
    refine_iters: int = 2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Greedy seeded clustering of L2-normalised embeddings by cosine similarity.

    Repeatedly: among a subsample of at most ``num_seed_candidates`` unassigned points (evenly
    spaced in input order, rebuilt from the unassigned points when exhausted), pick as seed the
    one with the most unassigned subsample neighbours (cosine similarity > threshold); refine
    the centre ``refine_iters`` times as the renormalised mean of the unassigned points within
    the threshold; assign those points to the cluster. A cluster smaller than
    ``min_cluster_size`` is discarded (its points stay unclustered and are not reconsidered).
    Stops after ``max_clusters`` kept clusters, when fewer than ``min_cluster_size`` points are
    unassigned, or after ``2 * max_clusters`` seeds. Seeds come in order of decreasing density,
    so large, coherent clusters come first. Per seed the cost is O(N * D) plus a matrix-vector
    product with the (num_seed_candidates)^2 candidate similarity matrix.

    Args:
        embeddings: (N, D) L2-normalised embeddings (float).
        similarity_threshold: cosine similarity above which a point joins a centre, in (-1, 1).
        min_cluster_size: clusters with fewer points are discarded.
        max_clusters: most clusters returned.
        num_seed_candidates: size of the subsample used to rank seeds by density.
        refine_iters: mean-shift refinements of each centre.

    Returns:
        labels: (N,) int64 cluster index in [0, M), or -1 for unclustered points.
        confidence: (M,) float mean cosine similarity of each cluster's points to its centre.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(embeddings.shape)}.")
    if not -1.0 < similarity_threshold < 1.0:
        raise ValueError(f"similarity_threshold must be in (-1, 1), got {similarity_threshold}.")
    device = embeddings.device
    num_points = embeddings.shape[0]
    labels = torch.full((num_points,), -1, dtype=torch.long, device=device)
    unassigned = torch.ones(num_points, dtype=torch.bool, device=device)
    num_unassigned = num_points
    confidences = []
    candidates = candidate_adjacency = None
    min_size = max(min_cluster_size, 1)
    for _ in range(2 * max_clusters):
        if len(confidences) >= max_clusters or num_unassigned < min_size:
            break
        candidate_free = None if candidates is None else unassigned[candidates]
        if candidate_free is None or not bool(candidate_free.any()):
            candidates = _evenly_spaced(torch.nonzero(unassigned).squeeze(1), num_seed_candidates)
            candidate_embeddings = embeddings[candidates]
            candidate_adjacency = (
                candidate_embeddings @ candidate_embeddings.t() > similarity_threshold
            ).float()
            candidate_free = torch.ones(candidates.numel(), dtype=torch.bool, device=device)
        density = candidate_adjacency @ candidate_free.float()
        density = density.masked_fill(~candidate_free, -1.0)
        seed = candidates[density.argmax()]
        centre = embeddings[seed]
        similarity = embeddings @ centre
        members = unassigned & (similarity > similarity_threshold)
        for _ in range(refine_iters):
            # Normalised sum = normalised mean; a matrix-vector product avoids a masked copy.
            refined = F.normalize(members.to(embeddings.dtype) @ embeddings, dim=0)
            refined_similarity = embeddings @ refined
            refined_members = unassigned & (refined_similarity > similarity_threshold)
            if not bool(refined_members.any()):
                break  # the mean drifted away from every point: keep the previous centre
            centre, similarity, members = refined, refined_similarity, refined_members
        members[seed] = True  # guarantees progress even for an isolated seed
        size = int(members.sum())
        unassigned &= ~members
        num_unassigned -= size
        if size < min_size:
            continue
        labels = torch.where(members, len(confidences), labels)
        confidences.append((similarity * members).sum() / size)
    if confidences:
        confidence = torch.stack(confidences)
    else:
        confidence = embeddings.new_zeros(0)
    return labels, confidence


def _neighbourhood_max(labels: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Max of each pixel's label and its neighbours'. labels: (C, h, w), int or float."""
    if connectivity == 8:
        return F.max_pool2d(labels[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    padded = F.pad(labels, (1, 1, 1, 1))
    h, w = labels.shape[-2:]
    return torch.stack(
        [
            labels,
            padded[:, :-2, 1 : w + 1],
            padded[:, 2:, 1 : w + 1],
            padded[:, 1 : h + 1, :-2],
            padded[:, 1 : h + 1, 2:],
        ]
    ).amax(dim=0)


def connected_components(masks: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """
    Connected components of each channel of a stack of binary masks.

    Label propagation: every foreground pixel starts with a unique id, then repeatedly takes
    the largest id among its same-channel foreground neighbours (max pooling) and jumps to the
    id of the pixel its id points to (pointer jumping, which shortens long chains), until no
    label changes. At most h * w rounds; a 128 x 128 map converges in a few dozen.

    Args:
        masks: (C, h, w) bool; components never cross channels.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        (C, h, w) int64 labels: 0 for background, components numbered 1..n consecutively over
        all channels (channel-major, then by their largest raster index).
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (C, h, w), got {tuple(masks.shape)}.")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    num_channels, h, w = masks.shape
    masks = masks.bool()
    if not bool(masks.any()):
        return torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
    # float64 holds every id up to 2**53 exactly and max_pool2d supports it on both devices.
    ids = torch.arange(1, num_channels * h * w + 1, device=masks.device, dtype=torch.float64)
    labels = ids.view(num_channels, h, w) * masks
    for _ in range(h * w):
        new = _neighbourhood_max(labels, connectivity) * masks
        # A label is the 1-based flat index of a pixel of the same component whose own label
        # is at least as large, so adopting that pixel's label stays within the component.
        flat = new.flatten()
        pointed = flat[(flat.long() - 1).clamp(min=0)]
        new = torch.where(masks, pointed.view_as(new).maximum(new), new)
        if torch.equal(new, labels):
            break
        labels = new
    values, compact = torch.unique(labels.long(), return_inverse=True)
    if int(values[0]) > 0:
        compact = compact + 1  # no background pixel: components still start at 1
    return compact.view(num_channels, h, w)
