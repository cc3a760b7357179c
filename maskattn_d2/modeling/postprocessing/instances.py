"""The instance methods (INSTANCE_METHODS): thing pixels -> one instance label map at network
resolution, with each instance's class and score."""
from typing import Dict, Tuple

import math

import torch
import torch.nn.functional as F

from ..losses import LOG_BANDWIDTH_RANGE
from .ascent import ascent_roots, ridge_joined_pairs, same_region_edges
from .clustering import _greedy_suppression, assign_to_seeds, cluster_embeddings, find_seeds
from .components import _component_maxima, label_map_components

__all__ = [
    "INSTANCE_METHODS",
    "SEED_ASSIGNMENTS",
    "connected_component_instance_map",
    "embedding_instance_map",
    "spatial_instance_map",
]

INSTANCE_METHODS = ("spatial_embedding", "embedding", "connected_components")
# How "spatial_embedding" gives each pixel a seed.
SEED_ASSIGNMENTS = ("offsets", "seed_ascent", "bandwidth")
# "bandwidth": rounds of seeding among the pixels no cluster has claimed.
BANDWIDTH_ROUNDS = 2


def _mean_class_probability(
    instance_map: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """
    Mean over each instance's pixels of the softmax probability of the instance's class,
    from the logits of the instance pixels only (no softmax of the whole K-class map).

    Args:
        instance_map: (h * w,) int64, instance index in [0, M) or -1 for none.
        logits: (K, h, w) class logits, channel planes or channels-last (a view of (h, w, K)).
        classes: (M,) int64 class of each instance.

    Returns:
        (M,) float (0 for an instance without pixels).
    """
    num_instances = classes.numel()
    pixels = torch.nonzero(instance_map >= 0).squeeze(1)
    instance = instance_map.index_select(0, pixels)
    pixel_class = classes.index_select(0, instance)
    channels_last = logits.permute(1, 2, 0)
    # Gather and reduce along the layout's contiguous axis: per-pixel rows of K logits
    # (channels last) or, from channel planes, a (K, n) block reduced over its first axis.
    if channels_last.is_contiguous():
        class_dim = 1
        pixel_logits = channels_last.reshape(-1, logits.shape[0]).index_select(0, pixels)
    else:
        class_dim = 0
        pixel_logits = logits.flatten(1).index_select(1, pixels)
    pixel_logits = pixel_logits.float()
    chosen = pixel_logits.gather(class_dim, pixel_class.unsqueeze(class_dim)).squeeze(class_dim)
    pixel_prob = (chosen - torch.logsumexp(pixel_logits, dim=class_dim)).exp_()
    prob_sum = pixel_prob.new_zeros(num_instances).index_add_(0, instance, pixel_prob)
    areas = torch.bincount(instance, minlength=num_instances)
    return prob_sum / areas.clamp(min=1)


def embedding_instance_map(
    sem: torch.Tensor,
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    similarity_threshold: float,
    min_instance_area: int,
    max_instances: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances by class-agnostic clustering of the embeddings of thing pixels.

    Clustering is class-agnostic (:func:`cluster_embeddings`) so that a pixel misclassified
    between two thing classes still joins its object; each cluster then takes the majority
    class of the semantic prediction over its pixels. Touching objects of one class are
    separated by their embeddings, not by the semantic map.

    Args:
        sem: (h, w) int64 semantic argmax.
        logits: (K, h, w) class logits.
        embeddings: (D, h, w) pixel embeddings (renormalised here).
        is_thing: (K,) bool, True for thing classes.
        similarity_threshold: cosine similarity to a cluster centre to join it.
        min_instance_area: clusters with fewer pixels are dropped.
        max_instances: most clusters formed.

    Returns:
        (h * w,) int64 instance map in [-1, M), classes (M,) int64 and scores (M,) float where
        a score is the cluster's mean probability of its class times its confidence (mean
        cosine similarity of its pixels to its centre, clamped to [0, 1]); in no particular
        order.
    """
    num_classes = logits.shape[0]
    sem = sem.flatten()
    thing_pixels = torch.nonzero(is_thing.index_select(0, sem)).squeeze(1)
    # Contiguous rows: normalising and gathering a transposed view is ~10x slower.
    points = embeddings.flatten(1).index_select(1, thing_pixels).float().t().contiguous()
    labels, confidence = cluster_embeddings(
        F.normalize(points, dim=1),
        similarity_threshold=similarity_threshold,
        min_cluster_size=min_instance_area,
        max_clusters=max_instances,
    )
    num_clusters = confidence.numel()
    instance_map = torch.full_like(sem, -1).index_copy_(0, thing_pixels, labels)
    if num_clusters == 0:
        return instance_map, sem.new_zeros(0), logits.new_zeros(0, dtype=torch.float32)
    # Majority class of each cluster; unclustered pixels vote in a dropped extra bin.
    ballot = torch.where(
        labels >= 0, labels * num_classes + sem.index_select(0, thing_pixels), -1
    )
    votes = torch.bincount(ballot + 1, minlength=num_clusters * num_classes + 1)[1:]
    classes = votes.view(num_clusters, num_classes).argmax(dim=1)
    mean_prob = _mean_class_probability(instance_map, logits, classes)
    return instance_map, classes, mean_prob * confidence.clamp(0, 1)


def connected_component_instance_map(
    sem: torch.Tensor,
    logits: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int,
    connectivity: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances as the connected components of the semantic map, per thing class (the paper's
    official inference). Touching objects of one class become one instance.

    Args:
        sem: (h, w) int64 semantic argmax.
        logits: (K, h, w) class logits.
        is_thing: (K,) bool, True for thing classes.
        min_instance_area: components with fewer pixels are dropped.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        (h * w,) int64 instance map in [-1, M), classes (M,) int64 and scores (M,) float (mean
        probability of the component's class over its pixels); in no particular order.
    """
    components = label_map_components(sem, is_thing[sem], connectivity).flatten()
    sem = sem.flatten()
    num_components = int(components.max()) if components.numel() else 0
    areas = torch.bincount(components, minlength=num_components + 1)
    # All pixels of a component share its class (slot 0, the background, is unused).
    classes = torch.zeros_like(areas).scatter_(0, components, sem)
    keep = areas >= max(min_instance_area, 1)
    keep[0] = False
    # Renumber the kept components 0..M-1 (by their largest raster index), the rest -1.
    new_index = torch.where(keep, torch.cumsum(keep, dim=0) - 1, -1)
    instance_map = new_index.index_select(0, components)
    classes = classes[keep]
    return instance_map, classes, _mean_class_probability(instance_map, logits, classes)


def merge_split_instances(
    spatial: torch.Tensor,
    seed_of_point: torch.Tensor,
    seed_groups: torch.Tensor,
    num_seeds: int,
    merge_ratio: float,
) -> torch.Tensor:
    """
    Merge the instances of seeds whose pixels point at one place: two seeds on one object
    (a flat or ridged seed map) split it, but the offsets of both halves point at the same
    centre, whereas two touching objects point at centres about the sum of their radii apart.
    Instances i, j of one group merge (transitively) when the distance between the means of
    their pixels' spatial embeddings is below ``merge_ratio`` times the larger of their
    equivalent radii ``sqrt(area / pi)``.

    Args:
        spatial: (N, 2) spatial embeddings of the points.
        seed_of_point: (N,) int64 seed of each point in [0, S), or -1.
        seed_groups: (S,) int64 group (component) of each seed.
        num_seeds: S.
        merge_ratio: see above (> 0).

    Returns:
        (N,) int64 seed index of each point's merged instance (the largest seed index of its
        merged set), or -1.
    """
    assigned = seed_of_point >= 0
    slot = torch.where(assigned, seed_of_point, num_seeds)
    area = torch.bincount(slot, minlength=num_seeds + 1)[:num_seeds].float()
    sums = spatial.new_zeros(num_seeds + 1, 2).index_add_(0, slot, spatial)[:num_seeds]
    centre = sums / area.clamp(min=1)[:, None]
    radius = (area / math.pi).sqrt()
    close = torch.cdist(centre, centre) < merge_ratio * torch.maximum(
        radius[:, None], radius[None, :]
    )
    close &= seed_groups[:, None] == seed_groups[None, :]
    # A seed left without pixels (its basin went to a stronger seed) has no centre: it sits at
    # the origin and would chain instances there together.
    has_pixels = area > 0
    close &= has_pixels[:, None] & has_pixels[None, :]
    u, v = torch.nonzero(close.triu_(diagonal=1), as_tuple=True)
    return _join_seeds(seed_of_point, num_seeds, u, v)


def _join_seeds(
    seed_of_point: torch.Tensor, num_seeds: int, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Each point's seed (or -1) replaced by the largest seed index of its set, the seeds
    joined transitively by the pairs (a, b)."""
    root = _component_maxima(num_seeds, a, b)
    return torch.where(seed_of_point >= 0, root.index_select(0, seed_of_point.clamp(min=0)), -1)


def _climb_to_seeds(
    seed_map: torch.Tensor,
    components: torch.Tensor,
    thing: torch.Tensor,
    seeds: torch.Tensor,
    thing_pixels: torch.Tensor,
    saddle_depth: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The climb of the "seed_ascent" assignment of :func:`spatial_instance_map` (step 3):
    the seed each thing pixel climbs to (-1: none), and the pairs (a, b) of seeds whose basins
    meet on a ridge."""
    num_seeds = seeds.numel()
    regions = torch.where(thing, components, -1)
    edges = same_region_edges(regions)
    roots = ascent_roots(seed_map, regions, edges)
    # A seed names the basin of its own root: on a plateau (equal neighbouring maxima)
    # find_seeds keeps the first pixel while the climb drains to the last. Seeds sharing a
    # basin give it to the strongest (lowest index).
    root_seed = torch.full_like(roots, num_seeds).scatter_reduce_(
        0, roots.index_select(0, seeds), torch.arange(num_seeds, device=seeds.device), "amin"
    )
    root_seed = torch.where(root_seed < num_seeds, root_seed, -1)
    climbed = root_seed.index_select(0, roots.index_select(0, thing_pixels))
    a, b = ridge_joined_pairs(seed_map, regions, roots, root_seed, saddle_depth, edges)
    return climbed, a, b


def _bandwidth_log_likelihood(
    points: torch.Tensor,
    point_groups: torch.Tensor,
    seed_points: torch.Tensor,
    seed_log_bandwidth: torch.Tensor,
    seed_groups: torch.Tensor,
) -> torch.Tensor:
    """(N, S) ``log phi_s(point) = -|point - seed|^2 / (2 s^2)``, -inf for another group's
    seed; ``log s`` clamped to the training loss's range."""
    variance = torch.exp(2 * seed_log_bandwidth.float().clamp(*LOG_BANDWIDTH_RANGE))
    log_phi = -torch.cdist(points, seed_points).square() / (2 * variance[None, :])
    return log_phi.masked_fill(point_groups[:, None] != seed_groups[None, :], -math.inf)


def _bandwidth_clusters(
    seed_map: torch.Tensor,
    thing: torch.Tensor,
    spatial: torch.Tensor,
    log_bandwidth: torch.Tensor,
    groups: torch.Tensor,
    thing_pixels: torch.Tensor,
    row_of_pixel: torch.Tensor,
    first_seeds: torch.Tensor,
    *,
    seed_threshold: float,
    max_instances: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The "bandwidth" assignment of :func:`spatial_instance_map` (Neven et al.'s clustering,
    in parallel rounds): the seeds (flat pixel indices) and each thing pixel's seed.

    Each round takes the seeds (:func:`find_seeds`) among the thing pixels no cluster has
    claimed yet, drops a seed that lies inside a stronger seed's cluster, and lets every
    unclaimed pixel whose spatial embedding lies inside a seed's cluster (``phi > 0.5``,
    with the seed's own bandwidth) claim the most likely one. Where a large object's seed
    map has no peak of its own beside a stronger neighbour, the neighbour's cluster leaves
    its pixels unclaimed and the next round seeds them. Pixels unclaimed after
    ``BANDWIDTH_ROUNDS`` join the most likely seed of their group (-1 if it has none).
    ``first_seeds`` are the first round's (:func:`find_seeds` on all thing pixels);
    ``row_of_pixel`` maps a flat pixel index to its row of ``spatial``.
    """
    seed_of_point = torch.full_like(groups, -1)
    all_seeds = thing_pixels.new_zeros(0)
    unclaimed = thing.clone()
    half = math.log(0.5)
    for round_index in range(BANDWIDTH_ROUNDS):
        seeds = first_seeds if round_index == 0 else find_seeds(
            seed_map,
            unclaimed,
            threshold=seed_threshold,
            max_seeds=max_instances - all_seeds.numel(),
        )
        if seeds.numel() == 0:
            break
        rows = row_of_pixel.index_select(0, seeds)
        seed_points, seed_groups = spatial.index_select(0, rows), groups.index_select(0, rows)
        seed_log_s = log_bandwidth.index_select(0, seeds)
        # A seed inside a stronger seed's cluster is that cluster's second peak.
        inside = _bandwidth_log_likelihood(
            seed_points, seed_groups, seed_points, seed_log_s, seed_groups
        ) > half
        kept, _ = _greedy_suppression(inside.tril(diagonal=-1).float(), sweeps=8)
        seeds = seeds[kept]
        open_rows = torch.nonzero(unclaimed.flatten().index_select(0, thing_pixels)).squeeze(1)
        log_phi = _bandwidth_log_likelihood(
            spatial.index_select(0, open_rows),
            groups.index_select(0, open_rows),
            seed_points[kept],
            seed_log_s[kept],
            seed_groups[kept],
        )
        best, choice = log_phi.max(dim=1)
        claimed = best > half
        seed_of_point.index_copy_(
            0, open_rows, torch.where(claimed, choice + all_seeds.numel(), -1)
        )
        all_seeds = torch.cat([all_seeds, seeds])
        unclaimed.view(-1)[thing_pixels.index_select(0, open_rows[claimed])] = False
        # The seeds themselves are claimed, even outside their own cluster.
        unclaimed.view(-1)[seeds] = False
    left = torch.nonzero(seed_of_point < 0).squeeze(1)
    if all_seeds.numel() > 0 and left.numel() > 0:
        rows = row_of_pixel.index_select(0, all_seeds)
        log_phi = _bandwidth_log_likelihood(
            spatial.index_select(0, left),
            groups.index_select(0, left),
            spatial.index_select(0, rows),
            log_bandwidth.index_select(0, all_seeds),
            groups.index_select(0, rows),
        )
        best, choice = log_phi.max(dim=1)
        seed_of_point.index_copy_(0, left, torch.where(best > -math.inf, choice, -1))
    # The seeds' own pixels join their own seed.
    seed_of_point.index_copy_(
        0,
        row_of_pixel.index_select(0, all_seeds),
        torch.arange(all_seeds.numel(), device=thing.device),
    )
    return all_seeds, seed_of_point


def spatial_instance_map(
    sem: torch.Tensor,
    logits: torch.Tensor,
    head_outputs: Dict[str, torch.Tensor],
    is_thing: torch.Tensor,
    *,
    seed_threshold: float,
    seed_min_distance: float,
    embedding_weight: float,
    min_instance_area: int,
    max_instances: int,
    within_components: bool = True,
    merge_ratio: float = 0.0,
    assignment: str = "offsets",
    saddle_depth: float = 0.02,
    connectivity: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances from the spatial embeddings, grouped inside the semantic components.

    1. The thing pixels are split into connected components of equal semantic class
       (``connectivity`` 8 or 4), so an instance never spans two classes or two separate blobs. With
       ``within_components`` False (the ablation) a pixel may join any seed.
    2. Seeds are the local maxima of the seed map above ``seed_threshold`` on thing pixels
       (:func:`find_seeds`), at most ``max_instances``. A flat or noisy top gives one
       instance several maxima whose offsets point at the same place: a seed whose spatial
       embedding lies within ``seed_min_distance`` pixels of a stronger seed's is dropped
       (greedy suppression, strongest first).
    3. Every thing pixel's spatial embedding is ``position + offset`` (where it points the
       centre of its instance is); it joins the seed of its component whose embedding is
       nearest (:func:`assign_to_seeds`). With ``embedding_weight`` > 0 the learned
       embeddings join the distance: ``w * (1 - cosine)`` is added, in squared pixels.
       With ``assignment="seed_ascent"`` a pixel first climbs the seed map (to its highest
       neighbour, step by step, inside its component: :func:`ascent_roots`): if it ends where
       a seed's own climb ends (the seed itself or its plateau) it joins that seed, and only
       pixels that reach no seed keep their offset-nearest seed (a maximum below the
       threshold, suppressed in 2, beyond ``max_instances``, or no peak for find_seeds, whose
       window also sees other thing classes). Seeds whose basins meet on a ridge, less than
       ``saddle_depth`` below the lower of the two maxima (:func:`ridge_joined_pairs`), are
       one instance. The seed map dips where two objects touch, which locates their boundary
       better than offsets that change smoothly across it. (With ``within_components`` False
       only the pixels that fall back to offsets may join another component's seed.)
       With ``assignment="bandwidth"`` (needs ``head_outputs["log_bandwidth"]``, a model
       trained with the "lovasz" offset loss) the seeds and pixels are clustered as Neven et
       al. do, each seed's cluster the pixels within its own bandwidth
       (:func:`_bandwidth_clusters`); ``seed_min_distance`` and ``embedding_weight`` are
       not used.
    4. With ``merge_ratio`` > 0, instances of one component whose pixels point at one place
       are merged (:func:`merge_split_instances`): a second seed on one object splits it.
    5. A component without a seed becomes one instance (as connected components would).

    Returns:
        (h * w,) int64 instance map in [-1, M), classes (M,) int64 and scores (M,) float: the
        mean probability of the instance's class times its seed value (for seedless
        components, the largest seed value in them).
    """
    if assignment not in SEED_ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {SEED_ASSIGNMENTS}, got '{assignment}'.")
    h, w = sem.shape
    device = sem.device
    offsets, seed_map = head_outputs["offsets"], torch.sigmoid(head_outputs["seed_logits"][0])
    thing = is_thing.index_select(0, sem.flatten()).view(h, w)
    components = label_map_components(sem, thing, connectivity).flatten()
    seeds = find_seeds(seed_map, thing, threshold=seed_threshold, max_seeds=max_instances)
    thing_pixels = torch.nonzero(thing.flatten()).squeeze(1)
    ys = torch.div(thing_pixels, w, rounding_mode="floor").float()
    xs = (thing_pixels % w).float()
    spatial = torch.stack([ys, xs], dim=1) + offsets.flatten(1).index_select(1, thing_pixels).t()
    # Seeds are thing pixels: their rows in ``spatial`` by a lookup of flat index -> row.
    row_of_pixel = torch.full((h * w,), -1, dtype=torch.long, device=device)
    row_of_pixel[thing_pixels] = torch.arange(thing_pixels.numel(), device=device)
    seed_rows = row_of_pixel.index_select(0, seeds)
    if seeds.numel() > 1 and seed_min_distance > 0 and assignment != "bandwidth":
        seed_spatial = spatial.index_select(0, seed_rows)
        stronger_close = (torch.cdist(seed_spatial, seed_spatial) < seed_min_distance).tril_(-1)
        # Undecided after the sweeps (long chains of close seeds): dropped, like suppressed.
        kept, _ = _greedy_suppression(stronger_close.float(), sweeps=8)
        seeds, seed_rows = seeds[kept], seed_rows[kept]
    points, seed_points = spatial, spatial.index_select(0, seed_rows)
    if embedding_weight > 0:
        # Squared distance of unit vectors is 2 (1 - cosine): scaling by sqrt(w / 2) adds
        # w (1 - cosine) to the squared spatial distance.
        learned = head_outputs["embeddings"].flatten(1).index_select(1, thing_pixels).t()
        learned = F.normalize(learned.float(), dim=1) * (embedding_weight / 2) ** 0.5
        points = torch.cat([spatial, learned], dim=1)
        seed_points = points.index_select(0, seed_rows)
    point_groups = components.index_select(0, thing_pixels)
    groups = point_groups if within_components else torch.zeros_like(point_groups)
    num_seeds = seeds.numel()
    seed_groups = groups.index_select(0, seed_rows)
    if assignment == "bandwidth":
        seeds, seed_of_point = _bandwidth_clusters(
            seed_map,
            thing,
            spatial,
            head_outputs["log_bandwidth"][0].flatten(),
            groups,
            thing_pixels,
            row_of_pixel,
            seeds,
            seed_threshold=seed_threshold,
            max_instances=max_instances,
        )
        seed_rows = row_of_pixel.index_select(0, seeds)
        num_seeds = seeds.numel()
        seed_groups = groups.index_select(0, seed_rows)
    elif assignment == "seed_ascent" and num_seeds > 0:
        seed_of_point, a, b = _climb_to_seeds(
            seed_map, components.view(h, w), thing, seeds, thing_pixels, saddle_depth
        )
        # Offsets only for the pixels whose climb reached no seed.
        fallback = torch.nonzero(seed_of_point < 0).squeeze(1)
        seed_of_point.index_copy_(
            0,
            fallback,
            assign_to_seeds(
                points.index_select(0, fallback),
                groups.index_select(0, fallback),
                seed_points,
                seed_groups,
            ),
        )
        if a.numel() > 0:
            seed_of_point = _join_seeds(seed_of_point, num_seeds, a, b)
    else:
        seed_of_point = assign_to_seeds(points, groups, seed_points, seed_groups)
    if merge_ratio > 0 and num_seeds > 1:
        seed_of_point = merge_split_instances(
            spatial, seed_of_point, seed_groups, num_seeds, merge_ratio
        )
    # Seedless components become instances num_seeds + (their component label).
    label = torch.where(seed_of_point >= 0, seed_of_point, num_seeds + point_groups)
    num_labels = num_seeds + int(components.max()) + 1 if components.numel() else num_seeds
    areas = torch.bincount(label, minlength=num_labels)
    keep = areas >= max(min_instance_area, 1)
    new_index = torch.where(keep, torch.cumsum(keep, dim=0) - 1, -1)
    instance_map = torch.full((h * w,), -1, dtype=torch.long, device=device)
    instance_map.index_copy_(0, thing_pixels, new_index.index_select(0, label))
    sem_flat = sem.flatten()
    # Every pixel of an instance has its component's class.
    classes = torch.zeros(num_labels, dtype=torch.long, device=device).index_copy_(
        0, label, sem_flat.index_select(0, thing_pixels)
    )[keep]
    seed_values = seed_map.flatten()
    label_seed = torch.zeros(num_labels, dtype=seed_values.dtype, device=device)
    label_seed = label_seed.scatter_reduce(
        0, label, seed_values.index_select(0, thing_pixels), "amax", include_self=True
    )
    # A seeded (possibly merged) instance scores the strongest seed among its pixels' seeds.
    label_seed[:num_seeds] = seed_values.new_zeros(num_seeds).scatter_reduce(
        0, seed_of_point.index_select(0, seed_rows), seed_values.index_select(0, seeds), "amax"
    )
    mean_prob = _mean_class_probability(instance_map, logits, classes)
    return instance_map, classes, mean_prob * label_seed[keep]
