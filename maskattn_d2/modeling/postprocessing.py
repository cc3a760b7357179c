"""Inference postprocessing of MaskAttn-UNet: logits + embeddings -> detectron2 outputs.

The work is done at network resolution (h, w); only the final maps are resized to the
image's original size (H, W). Everything is vectorised torch that runs on CPU and CUDA:
instances travel as one label map rather than a stack of masks until the output is built,
and the host reads device values a few times per image, not once per instance (Python
only builds the ``segments_info`` dicts, from one copy of the per-segment numbers).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ..structures.label_maps import boxes_from_projections, label_map_boxes, resize_label_map
from .clustering import (
    _component_maxima,
    _greedy_suppression,
    assign_to_seeds,
    cluster_embeddings,
    find_seeds,
    label_map_components,
)

__all__ = [
    "MaskAttnPostProcessor",
    "embedding_instances",
    "connected_component_instances",
    "merge_semantic_and_instances",
    "resize_label_map",
    "masks_to_boxes",
    "upsample_segment_map",
]

INSTANCE_METHODS = ("spatial_embedding", "embedding", "connected_components")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """
    Tight boxes around binary masks, detectron2's ``BitMasks.get_bounding_boxes`` convention
    (x1, y1 inclusive, x2, y2 exclusive, absolute pixels), vectorised over masks.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float32 XYXY boxes; all zeros for an empty mask.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    return boxes_from_projections(masks.any(dim=2), masks.any(dim=1))


def _grow_by_one_pixel(labels: torch.Tensor) -> torch.Tensor:
    """Labels >= 0 kept; each -1 pixel takes the largest label among its 8 neighbours."""
    neighbours = F.max_pool2d(labels[None, None].float(), 3, stride=1, padding=1)[0, 0].long()
    return torch.where(labels >= 0, labels, neighbours)


def upsample_segment_map(
    segment_map: torch.Tensor, num_things: int, thing_prob: torch.Tensor, size: Tuple[int, int]
) -> torch.Tensor:
    """
    Resize a segment map to the output size with the boundaries of things where the
    bilinearly upsampled probability of "any thing class" crosses 0.5, rather than along the
    network pixels' blocks: a nucleus of a few network pixels becomes a rounded blob at the
    original size instead of a staircase, which matters for IoU-based scores of small objects.

    Pixels are first resized by nearest neighbour (:func:`resize_label_map`); then a pixel
    where the upsampled thing probability is > 0.5 and that lies within one network pixel of a
    thing takes that thing, and a thing pixel where it is <= 0.5 takes a neighbouring stuff
    segment if there is one (else it stays). Stuff-stuff and void boundaries are unchanged.

    Args:
        segment_map: (h, w) int64 segment index, -1 void; segments [0, num_things) are things.
        num_things: number of thing segments.
        thing_prob: (h, w) float, summed probability of the thing classes.
        size: (H, W) output size.

    Returns:
        (H, W) int64 segment map.
    """
    if tuple(size) == tuple(segment_map.shape):
        return segment_map
    nearest = resize_label_map(segment_map, size)
    if num_things == 0:
        return nearest
    is_thing = (segment_map >= 0) & (segment_map < num_things)
    things = _grow_by_one_pixel(torch.where(is_thing, segment_map, -1))
    stuff = _grow_by_one_pixel(torch.where(is_thing | (segment_map < 0), -1, segment_map))
    foreground = F.interpolate(
        thing_prob[None, None].float(), size=size, mode="bilinear", align_corners=False
    )[0, 0] > 0.5
    things, stuff = resize_label_map(things, size), resize_label_map(stuff, size)
    nearest_is_thing = (nearest >= 0) & (nearest < num_things)
    out = torch.where(foreground & (things >= 0), things, nearest)
    return torch.where(~foreground & nearest_is_thing & (stuff >= 0), stuff, out)


def _argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """
    ``scores.argmax(dim=0)`` of a (K, h, w) tensor (the first maximal channel), computed as the
    largest reversed channel index among the channels equal to the maximum: on CPU ``argmax``
    over a leading dimension is not vectorised (3-10x slower than this). A pixel whose scores
    are NaN gets channel K - 1. Other devices use ``argmax``.

    Returns:
        (h, w) int64.
    """
    if scores.device.type != "cpu":
        return scores.argmax(dim=0)
    num_channels = scores.shape[0]
    best = scores.amax(dim=0, keepdim=True)
    # The narrowest integer type that holds the channel count keeps the product cheap.
    if num_channels < 2**8:
        dtype = torch.uint8
    elif num_channels < 2**15:
        dtype = torch.int16
    else:
        dtype = torch.int32
    reversed_index = torch.arange(num_channels, 0, -1, device=scores.device).to(dtype)
    # >= is the same test as == here (nothing exceeds the max) and cheaper on CPU.
    first = num_channels - ((scores >= best) * reversed_index.view(-1, 1, 1)).amax(dim=0).long()
    return first.clamp_(max=num_channels - 1)


def _label_map_masks(instance_map: torch.Tensor, num_instances: int) -> torch.Tensor:
    """(M, h, w) bool masks of the instances [0, M) of an (h, w) label map."""
    ids = torch.arange(num_instances, device=instance_map.device)
    return instance_map[None] == ids[:, None, None]


def _mean_class_probability(
    instance_map: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """
    Mean over each instance's pixels of the probability of the instance's class.

    Args:
        instance_map: (h * w,) int64, instance index in [0, M) or -1 for none.
        probs: (K, h, w) class probabilities.
        classes: (M,) int64 class of each instance.

    Returns:
        (M,) float (0 for an instance without pixels).
    """
    num_instances = classes.numel()
    slot = instance_map + 1  # slot 0: no instance
    pixel_class = torch.cat([classes.new_zeros(1), classes]).index_select(0, slot)
    pixel_prob = probs.flatten(1).gather(0, pixel_class[None])[0]
    prob_sum = probs.new_zeros(num_instances + 1).index_add_(0, slot, pixel_prob)[1:]
    areas = torch.bincount(slot, minlength=num_instances + 1)[1:]
    return prob_sum / areas.clamp(min=1)


def _embedding_instance_map(
    sem: torch.Tensor,
    probs: torch.Tensor,
    embeddings: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    similarity_threshold: float,
    min_instance_area: int,
    max_instances: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`embedding_instances` as an (h * w,) instance map in [-1, M), classes, scores."""
    num_classes = probs.shape[0]
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
        return instance_map, sem.new_zeros(0), probs.new_zeros(0)
    # Majority class of each cluster; unclustered pixels vote in a dropped extra bin.
    ballot = torch.where(
        labels >= 0, labels * num_classes + sem.index_select(0, thing_pixels), -1
    )
    votes = torch.bincount(ballot + 1, minlength=num_clusters * num_classes + 1)[1:]
    classes = votes.view(num_clusters, num_classes).argmax(dim=1)
    mean_prob = _mean_class_probability(instance_map, probs, classes)
    return instance_map, classes, mean_prob * confidence.clamp(0, 1)


def embedding_instances(
    sem: torch.Tensor,
    probs: torch.Tensor,
    embeddings: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    similarity_threshold: float = 0.9,
    min_instance_area: int = 8,
    max_instances: int = 100,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances by class-agnostic clustering of the embeddings of thing pixels.

    Clustering is class-agnostic (:func:`cluster_embeddings`) so that a pixel misclassified
    between two thing classes still joins its object; each cluster then takes the majority
    class of the semantic prediction over its pixels. Touching objects of one class are
    separated by their embeddings, not by the semantic map.

    Args:
        sem: (h, w) int64 semantic argmax.
        probs: (K, h, w) class probabilities.
        embeddings: (D, h, w) pixel embeddings (renormalised here).
        is_thing: (K,) bool, True for thing classes.
        similarity_threshold: cosine similarity to a cluster centre to join it.
        min_instance_area: clusters with fewer pixels are dropped.
        max_instances: most clusters formed.

    Returns:
        masks (M, h, w) bool, classes (M,) int64, scores (M,) float where a score is the
        cluster's mean probability of its class times its confidence (mean cosine similarity
        of its pixels to its centre, clamped to [0, 1]); in no particular order.
    """
    instance_map, classes, scores = _embedding_instance_map(
        sem,
        probs,
        embeddings,
        is_thing,
        similarity_threshold=similarity_threshold,
        min_instance_area=min_instance_area,
        max_instances=max_instances,
    )
    return _label_map_masks(instance_map.view(sem.shape), classes.numel()), classes, scores


def _connected_component_instance_map(
    sem: torch.Tensor,
    probs: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int,
    connectivity: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`connected_component_instances` as an (h * w,) instance map, classes, scores."""
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
    return instance_map, classes, _mean_class_probability(instance_map, probs, classes)


def _merge_split_instances(
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
    u, v = torch.nonzero(close.triu_(diagonal=1), as_tuple=True)
    root = _component_maxima(num_seeds, u, v)
    return torch.where(assigned, root.index_select(0, seed_of_point.clamp(min=0)), -1)


def _spatial_instance_map(
    sem: torch.Tensor,
    probs: torch.Tensor,
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances from the spatial embeddings, grouped inside the semantic components.

    1. The thing pixels are split into connected components of equal semantic class
       (8-connected), so an instance never spans two classes or two separate blobs. With
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
    4. With ``merge_ratio`` > 0, instances of one component whose pixels point at one place
       are merged (:func:`_merge_split_instances`): a second seed on one object splits it.
    5. A component without a seed becomes one instance (as connected components would).

    Returns:
        (h * w,) int64 instance map in [-1, M), classes (M,) int64 and scores (M,) float: the
        mean probability of the instance's class times its seed value (for seedless
        components, the largest seed value in them).
    """
    h, w = sem.shape
    device = sem.device
    offsets, seed_map = head_outputs["offsets"], torch.sigmoid(head_outputs["seed_logits"][0])
    thing = is_thing.index_select(0, sem.flatten()).view(h, w)
    components = label_map_components(sem, thing, connectivity=8).flatten()
    seeds = find_seeds(seed_map, thing, threshold=seed_threshold, max_seeds=max_instances)
    thing_pixels = torch.nonzero(thing.flatten()).squeeze(1)
    ys = torch.div(thing_pixels, w, rounding_mode="floor").float()
    xs = (thing_pixels % w).float()
    spatial = torch.stack([ys, xs], dim=1) + offsets.flatten(1).index_select(1, thing_pixels).t()
    # Seeds are thing pixels: their rows in ``spatial`` by a lookup of flat index -> row.
    row_of_pixel = torch.full((h * w,), -1, dtype=torch.long, device=device)
    row_of_pixel[thing_pixels] = torch.arange(thing_pixels.numel(), device=device)
    seed_rows = row_of_pixel.index_select(0, seeds)
    if seeds.numel() > 1 and seed_min_distance > 0:
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
    seed_of_point = assign_to_seeds(
        points, groups, seed_points, groups.index_select(0, seed_rows)
    )
    num_seeds = seeds.numel()
    seed_groups = groups.index_select(0, seed_rows)
    if merge_ratio > 0 and num_seeds > 1:
        seed_of_point = _merge_split_instances(
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
    mean_prob = _mean_class_probability(instance_map, probs, classes)
    return instance_map, classes, mean_prob * label_seed[keep]


def connected_component_instances(
    sem: torch.Tensor,
    probs: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int = 8,
    connectivity: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances as the connected components of the semantic map, per thing class (the paper's
    official inference). Touching objects of one class become one instance.

    Args:
        sem: (h, w) int64 semantic argmax.
        probs: (K, h, w) class probabilities.
        is_thing: (K,) bool, True for thing classes.
        min_instance_area: components with fewer pixels are dropped.
        connectivity: 8 (default: diagonal neighbours connect) or 4.

    Returns:
        masks (M, h, w) bool, classes (M,) int64, scores (M,) float (mean probability of the
        component's class over its pixels); in no particular order.
    """
    instance_map, classes, scores = _connected_component_instance_map(
        sem, probs, is_thing, min_instance_area=min_instance_area, connectivity=connectivity
    )
    return _label_map_masks(instance_map.view(sem.shape), classes.numel()), classes, scores


def _paint_instances(masks: torch.Tensor, min_area: int) -> torch.Tensor:
    """
    The instance painted on each pixel when the masks are painted in order on the pixels not
    yet taken, and a mask whose visible area there is below ``min_area`` paints nothing.

    Whether a mask is kept depends only on the kept masks before it, so the kept set is the
    unique fixed point of "a mask is kept iff its pixels that no kept earlier mask covers
    number at least ``min_area``". Iterating that map from "all kept" fixes at least one more
    mask per step; it stops after one step when no mask is dropped (e.g. disjoint masks with
    enough pixels), usually after two otherwise. Each step is a few (N, h, w) ops.

    Args:
        masks: (N, h, w) bool, N >= 1, painting order.
        min_area: least visible pixels of a kept mask.

    Returns:
        (h, w) int64 index of the mask painted on each pixel, -1 for none.
    """
    num_masks = masks.shape[0]
    device = masks.device
    index = torch.arange(num_masks, device=device).view(num_masks, 1, 1)
    kept = torch.ones(num_masks, dtype=torch.bool, device=device)
    for _ in range(num_masks + 1):
        # First kept mask on each pixel (num_masks: none), as a max of reversed indices.
        first = num_masks - torch.where(masks & kept[:, None, None], num_masks - index, 0).amax(0)
        visible = (masks & (first[None] >= index)).sum(dim=(1, 2))
        new_kept = visible >= min_area
        if torch.equal(new_kept, kept):
            break
        kept = new_kept
    return torch.where(first < num_masks, first, -1)


def _merge_instance_map(
    sem: torch.Tensor,
    instance_map: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int,
    stuff_area: int,
    label_divisor: int,
) -> Tuple[torch.Tensor, List[Dict], torch.Tensor]:
    """
    :func:`merge_semantic_and_instances` for disjoint instances given as one label map.

    Args:
        sem: (h, w) int64 semantic argmax.
        instance_map: (h, w) int64 instance of each pixel in [0, N) (painting order), or -1.
        classes, scores: (N,) of the instances.
        is_thing: (K,) bool.

    Returns:
        segment_map: (h, w) int64 index into ``segments_info`` of each pixel, -1 for void.
        segments_info: as :func:`merge_semantic_and_instances`.
        segment_ids: (S,) int32 id of each segment.
    """
    num_classes = is_thing.shape[0]
    num_instances = classes.shape[0]
    device = sem.device
    shape = sem.shape
    sem = sem.flatten()
    slot = instance_map.flatten() + 1  # slot 0: no instance
    areas = torch.bincount(slot, minlength=num_instances + 1)[1:]
    kept = areas >= max(min_instance_area, 1)
    kept_slot = torch.cat([kept.new_zeros(1), kept])
    taken = kept_slot.index_select(0, slot)
    stuff_pixels = ~taken & ~is_thing.index_select(0, sem)
    stuff_areas = torch.bincount(
        torch.where(stuff_pixels, sem, num_classes), minlength=num_classes + 1
    )[:num_classes]
    kept_stuff = (stuff_areas >= max(stuff_area, 1)) & ~is_thing
    # Every number the segments_info dicts need, in one copy to the host.
    host = torch.cat(
        [t.double() for t in (areas, kept, classes, scores, stuff_areas, kept_stuff)]
    ).tolist()
    n, k = num_instances, num_classes
    areas_h, kept_h, classes_h, scores_h = (host[i * n : (i + 1) * n] for i in range(4))
    stuff_areas_h, kept_stuff_h = host[4 * n : 4 * n + k], host[4 * n + k :]
    segments_info = []
    instances_per_class: Dict[int, int] = {}
    for area, keep, category, score in zip(areas_h, kept_h, classes_h, scores_h):
        if not keep:
            continue
        category = int(category)
        index = instances_per_class.get(category, 0) + 1
        instances_per_class[category] = index
        segments_info.append(
            {
                "id": category * label_divisor + index,
                "isthing": True,
                "category_id": category,
                "area": int(area),
                "score": score,
            }
        )
    num_things = len(segments_info)
    for category, (area, keep) in enumerate(zip(stuff_areas_h, kept_stuff_h)):
        if keep:
            segments_info.append(
                {
                    "id": category * label_divisor + 1,
                    "isthing": False,
                    "category_id": category,
                    "area": int(area),
                }
            )
    thing_segment = torch.cat(
        [kept.new_full((1,), -1, dtype=torch.long), torch.cumsum(kept, dim=0) - 1]
    ).index_select(0, slot)
    stuff_segment = (num_things + torch.cumsum(kept_stuff, dim=0) - 1).index_select(0, sem)
    painted_stuff = stuff_pixels & kept_stuff.index_select(0, sem)
    segment_map = torch.where(taken, thing_segment, torch.where(painted_stuff, stuff_segment, -1))
    segment_ids = torch.tensor(
        [s["id"] for s in segments_info], dtype=torch.int32, device=device
    )
    return segment_map.view(shape), segments_info, segment_ids


def _segment_id_map(segment_map: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Panoptic ids (int32, 0 = void) of a segment index map (-1 = void)."""
    lookup = torch.cat([segment_ids.new_zeros(1), segment_ids])
    return lookup.index_select(0, segment_map.flatten() + 1).view(segment_map.shape)


def merge_semantic_and_instances(
    sem: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int = 8,
    stuff_area: int = 16,
    label_divisor: int = 1000,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic-DeepLab style merge of instances and the semantic map.

    Things first: instances are painted in the given order (highest score first) on pixels not
    yet taken; one whose visible area falls below ``min_instance_area`` is dropped (and paints
    nothing). Then stuff:
    each stuff class gets one segment from its untaken pixels if they number at least
    ``stuff_area``, otherwise they are void. Thing-class pixels no instance claimed are void.

    Segment ids are ``category_id * label_divisor + index`` with ``index`` counting the
    instances of a class from 1, and 1 for a stuff segment, so that 0 is always void (also for
    a stuff class with contiguous id 0).

    Vectorised: the painting is resolved for all instances at once (:func:`_paint_instances`),
    with the same result as painting them one by one.

    Args:
        sem: (h, w) int64 semantic argmax.
        masks: (N, h, w) bool instance masks, painting order.
        classes: (N,) int64 instance classes (thing classes).
        scores: (N,) float instance scores.
        is_thing: (K,) bool, True for thing classes.
        min_instance_area: least visible pixels of a kept instance.
        stuff_area: least pixels of a stuff segment.
        label_divisor: id multiplier of the class; must exceed the instances of any class.

    Returns:
        panoptic: (h, w) int32 segment ids, 0 = void.
        segments_info: one dict per segment, things first in painting order:
            ``{"id", "isthing", "category_id", "area"}`` plus ``"score"`` for things.
    """
    if masks.shape[0] != classes.shape[0] or masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"masks {tuple(masks.shape)}, classes {tuple(classes.shape)} and scores "
            f"{tuple(scores.shape)} must have the same length."
        )
    if masks.shape[0] and masks.shape[1:] != sem.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not match sem {tuple(sem.shape)}.")
    if masks.shape[0]:
        instance_map = _paint_instances(masks.bool(), max(min_instance_area, 1))
    else:
        instance_map = torch.full(sem.shape, -1, dtype=torch.long, device=sem.device)
    segment_map, segments_info, segment_ids = _merge_instance_map(
        sem,
        instance_map,
        classes,
        scores,
        is_thing,
        min_instance_area=min_instance_area,
        stuff_area=stuff_area,
        label_divisor=label_divisor,
    )
    return _segment_id_map(segment_map, segment_ids), segments_info


class MaskAttnPostProcessor:
    """
    Turns one image's semantic logits and pixel embeddings into detectron2's standard outputs:
    ``"sem_seg"``, ``"instances"`` and ``"panoptic_seg"``.

    Steps: softmax and argmax at network resolution; instances from the thing pixels, either by
    clustering their embeddings (:func:`embedding_instances`) or as connected components of
    the semantic map (:func:`connected_component_instances`); ranking by score (threshold,
    top ``max_instances``); merging with stuff (:func:`merge_semantic_and_instances`); finally
    the panoptic map is resized (nearest) to the output size, and the instance masks, boxes and
    segment areas are derived from the resized map, so instances and panoptic agree exactly.
    Areas thresholds (``min_instance_area``, ``stuff_area``) apply at network resolution.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        thing_ids: Sequence[int],
        instance_method: str = "spatial_embedding",
        similarity_threshold: float = 0.9,
        seed_threshold: float = 0.4,
        seed_min_distance: float = 3.0,
        embedding_weight: float = 0.0,
        within_components: bool = True,
        merge_ratio: float = 1.0,
        upsample_thing_boundaries: bool = True,
        min_instance_area: int = 8,
        max_instances: int = 100,
        stuff_area: int = 16,
        score_threshold: float = 0.0,
        label_divisor: int = 1000,
    ):
        """
        Args:
            num_classes: K, number of contiguous classes (stuff + things).
            thing_ids: contiguous ids of the thing classes, each in [0, K).
            instance_method: "spatial_embedding" (seeds and offsets to the instance centre,
                inside the semantic components), "embedding" (cluster the learned pixel
                embeddings by cosine similarity) or "connected_components" (8-connected
                components of the semantic map per class).
            similarity_threshold: "embedding": cosine similarity to join a cluster, in (-1, 1).
            seed_threshold: "spatial_embedding": least seed value of a seed, in [0, 1).
            seed_min_distance: "spatial_embedding": a seed whose offset-pointed centre is
                closer than this (pixels) to a stronger seed's is dropped (>= 0).
            embedding_weight: "spatial_embedding": weight (squared pixels) of the learned
                embeddings' cosine distance beside the spatial distance; 0 ignores them.
            within_components: "spatial_embedding": a pixel joins only seeds of its own
                semantic connected component (False: any seed; the ablation).
            merge_ratio: "spatial_embedding": instances of one component whose pixels point
                at centres closer than this times the larger equivalent radius are merged
                (>= 0; 0 disables).
            upsample_thing_boundaries: resize the panoptic map with thing boundaries from the
                upsampled thing probability (:func:`upsample_segment_map`); False: nearest.
            min_instance_area: instances with fewer pixels (network resolution) are dropped.
            max_instances: most instances per image, highest scores first.
            stuff_area: stuff segments with fewer pixels (network resolution) become void.
            score_threshold: instances scoring below it are dropped.
            label_divisor: panoptic id = class * label_divisor + index; > max_instances.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        thing_ids = [int(i) for i in thing_ids]
        bad = [i for i in thing_ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"thing_ids {bad} are outside [0, num_classes={num_classes}).")
        if instance_method not in INSTANCE_METHODS:
            raise ValueError(
                f"instance_method must be one of {INSTANCE_METHODS}, got '{instance_method}'."
            )
        if not -1.0 < similarity_threshold < 1.0:
            raise ValueError(
                f"similarity_threshold must be in (-1, 1), got {similarity_threshold}."
            )
        if not 0.0 <= seed_threshold < 1.0:
            raise ValueError(f"seed_threshold must be in [0, 1), got {seed_threshold}.")
        if seed_min_distance < 0:
            raise ValueError(f"seed_min_distance must be >= 0, got {seed_min_distance}.")
        if merge_ratio < 0:
            raise ValueError(f"merge_ratio must be >= 0, got {merge_ratio}.")
        if embedding_weight < 0:
            raise ValueError(f"embedding_weight must be >= 0, got {embedding_weight}.")
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}.")
        if label_divisor <= max_instances:
            raise ValueError(
                f"label_divisor ({label_divisor}) must exceed max_instances ({max_instances}) "
                "so that segment ids of different classes cannot collide."
            )
        self.num_classes = num_classes
        self.thing_ids = sorted(set(thing_ids))
        self.instance_method = instance_method
        self.similarity_threshold = similarity_threshold
        self.seed_threshold = seed_threshold
        self.seed_min_distance = seed_min_distance
        self.embedding_weight = embedding_weight
        self.within_components = within_components
        self.upsample_thing_boundaries = upsample_thing_boundaries
        self.merge_ratio = merge_ratio
        self.min_instance_area = min_instance_area
        self.max_instances = max_instances
        self.stuff_area = stuff_area
        self.score_threshold = score_threshold
        self.label_divisor = label_divisor

    @classmethod
    def from_config(cls, cfg, thing_ids: Sequence[int]):
        post = cfg.MODEL.MASK_ATTN_POSTPROCESS
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "thing_ids": thing_ids,
            "instance_method": post.INSTANCE_METHOD,
            "similarity_threshold": post.SIMILARITY_THRESHOLD,
            "seed_threshold": post.SEED_THRESHOLD,
            "seed_min_distance": post.SEED_MIN_DISTANCE,
            "embedding_weight": post.EMBEDDING_WEIGHT,
            "within_components": post.WITHIN_COMPONENTS,
            "merge_ratio": post.MERGE_RATIO,
            "upsample_thing_boundaries": post.UPSAMPLE_THING_BOUNDARIES,
            "min_instance_area": post.MIN_INSTANCE_AREA,
            "max_instances": post.MAX_INSTANCES,
            "stuff_area": post.STUFF_AREA,
            "score_threshold": post.SCORE_THRESHOLD,
            "label_divisor": post.LABEL_DIVISOR,
        }

    def _is_thing(self, device: torch.device) -> torch.Tensor:
        is_thing = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        is_thing[self.thing_ids] = True
        return is_thing

    def _ranked_instance_map(
        self,
        sem: torch.Tensor,
        probs: torch.Tensor,
        head_outputs: Optional[Dict[str, torch.Tensor]],
        is_thing: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Instances at network resolution, ranked: score >= threshold, highest first, at most
        ``max_instances``.

        Args:
            sem: (h, w) int64 semantic argmax.
            probs: (K, h, w) class probabilities.
            head_outputs: the embedding head's outputs of the image (unused by
                "connected_components").
            is_thing: (K,) bool.

        Returns:
            (h * w,) int64 rank of each pixel's instance (-1: none), classes (M,) int64 and
            scores (M,) float in rank order.
        """
        if self.instance_method == "spatial_embedding":
            instance_map, classes, scores = _spatial_instance_map(
                sem,
                probs,
                head_outputs,
                is_thing,
                seed_threshold=self.seed_threshold,
                seed_min_distance=self.seed_min_distance,
                embedding_weight=self.embedding_weight,
                within_components=self.within_components,
                merge_ratio=self.merge_ratio,
                min_instance_area=self.min_instance_area,
                max_instances=self.max_instances,
            )
        elif self.instance_method == "embedding":
            instance_map, classes, scores = _embedding_instance_map(
                sem,
                probs,
                head_outputs["embeddings"],
                is_thing,
                similarity_threshold=self.similarity_threshold,
                min_instance_area=self.min_instance_area,
                max_instances=self.max_instances,
            )
        else:
            instance_map, classes, scores = _connected_component_instance_map(
                sem, probs, is_thing, min_instance_area=self.min_instance_area, connectivity=8
            )
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] >= self.score_threshold][: self.max_instances]
        rank = torch.full((scores.numel() + 1,), -1, dtype=torch.long, device=sem.device)
        rank[order + 1] = torch.arange(order.numel(), device=sem.device)
        return rank.index_select(0, instance_map + 1), classes[order], scores[order]

    def __call__(
        self,
        sem_logits: torch.Tensor,
        head_outputs: Optional[Dict[str, torch.Tensor]],
        output_size: Tuple[int, int],
        *,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
    ) -> Dict:
        """
        Args:
            sem_logits: (K, h, w) semantic logits at network resolution.
            head_outputs: the embedding head's outputs of this image at network resolution:
                ``"embeddings"`` (D, h, w) and, for "spatial_embedding", ``"offsets"``
                (2, h, w) and ``"seed_logits"`` (1, h, w); may be None with
                ``instance_method="connected_components"`` or when only ``semantic_on``.
            output_size: (H, W) size of the original image.
            semantic_on, instance_on, panoptic_on: which outputs to compute and return.

        Returns:
            dict with the requested keys:
            ``"sem_seg"``: (K, H, W) float class probabilities (bilinear);
            ``"instances"``: ``Instances((H, W))`` with ``pred_masks`` (N, H, W) bool,
            ``pred_boxes`` (Boxes, XYXY absolute), ``pred_classes`` (N,) int64 contiguous ids
            and ``scores`` (N,) float, sorted by score;
            ``"panoptic_seg"``: ((H, W) int32 segment ids, 0 = void, segments_info list).
        """
        self._check_inputs(sem_logits, head_outputs, output_size, instance_on or panoptic_on)
        output_size = (int(output_size[0]), int(output_size[1]))
        probs = F.softmax(sem_logits.float(), dim=0)
        results = {}
        if semantic_on:
            if output_size == tuple(probs.shape[1:]):
                results["sem_seg"] = probs  # bilinear resampling to the same size is the identity
            else:
                results["sem_seg"] = F.interpolate(
                    probs[None], size=output_size, mode="bilinear", align_corners=False
                )[0]
        if not (instance_on or panoptic_on):
            return results
        sem = _argmax_channels(probs)
        is_thing = self._is_thing(sem.device)
        instance_map, classes, scores = self._ranked_instance_map(
            sem, probs, head_outputs, is_thing
        )
        segment_map, segments_info, segment_ids = _merge_instance_map(
            sem,
            instance_map.view(sem.shape),
            classes,
            scores,
            is_thing,
            min_instance_area=self.min_instance_area,
            stuff_area=self.stuff_area,
            label_divisor=self.label_divisor,
        )
        if self.upsample_thing_boundaries:
            num_things = sum(1 for info in segments_info if info["isthing"])
            thing_prob = probs.index_select(0, torch.nonzero(is_thing).squeeze(1)).sum(dim=0)
            segment_map = upsample_segment_map(segment_map, num_things, thing_prob, output_size)
        else:
            segment_map = resize_label_map(segment_map, output_size)
        # Areas at the output size; segments that vanished in the resize are removed.
        areas = torch.bincount(
            segment_map.flatten() + 1, minlength=len(segments_info) + 1
        )[1:].tolist()
        present = [i for i, area in enumerate(areas) if area > 0]
        if panoptic_on:
            results["panoptic_seg"] = (
                _segment_id_map(segment_map, segment_ids),
                [dict(segments_info[i], area=areas[i]) for i in present],
            )
        if instance_on:
            things = [i for i in present if segments_info[i]["isthing"]]
            results["instances"] = self._instances_from_segments(
                segment_map,
                len(segments_info),
                things,
                [segments_info[i] for i in things],
                output_size,
            )
        return results

    # The embedding head outputs each instance method needs, with their channel counts
    # (None: any).
    _NEEDED_OUTPUTS = {
        "spatial_embedding": {"offsets": 2, "seed_logits": 1},
        "embedding": {"embeddings": None},
        "connected_components": {},
    }

    def needed_head_outputs(self, needs_instances: bool) -> Dict[str, Optional[int]]:
        """The embedding head outputs a call reads, with their channel counts (None: any):
        empty for "connected_components" or when no instances are wanted (semantic only),
        so the caller can skip the head."""
        if not needs_instances:
            return {}
        needed = dict(self._NEEDED_OUTPUTS[self.instance_method])
        if self.instance_method == "spatial_embedding" and self.embedding_weight > 0:
            needed["embeddings"] = None
        return needed

    def _check_inputs(self, sem_logits, head_outputs, output_size, needs_instances: bool) -> None:
        if sem_logits.dim() != 3 or sem_logits.shape[0] != self.num_classes:
            raise ValueError(
                f"sem_logits must have shape (K={self.num_classes}, h, w), got "
                f"{tuple(sem_logits.shape)}."
            )
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"output_size must be (H, W) with H, W >= 1, got {output_size}.")
        for key, channels in self.needed_head_outputs(needs_instances).items():
            value = None if head_outputs is None else head_outputs.get(key)
            if value is None:
                hint = (
                    " (set MODEL.EMBED_HEAD.SPATIAL_ON True and train with it)"
                    if key in ("offsets", "seed_logits")
                    else ""
                )
                raise ValueError(
                    f'instance_method "{self.instance_method}" needs the embedding head '
                    f'output "{key}", which is missing{hint}.'
                )
            if value.dim() != 3 or value.shape[1:] != sem_logits.shape[1:] or (
                channels is not None and value.shape[0] != channels
            ):
                raise ValueError(
                    f'"{key}" must have shape ({channels or "D"}, h, w) with (h, w) = '
                    f"{tuple(sem_logits.shape[1:])}, got {tuple(value.shape)}."
                )

    @staticmethod
    def _instances_from_segments(
        segment_map: torch.Tensor,
        num_segments: int,
        indices: List[int],
        things: List[Dict],
        output_size: Tuple[int, int],
    ) -> Instances:
        """Instances of the thing segments ``indices`` (with dicts ``things``) of the map of
        segment indices in [-1, num_segments)."""
        device = segment_map.device
        ids = torch.tensor(indices, dtype=torch.long, device=device)
        instances = Instances(output_size)
        instances.pred_masks = segment_map[None] == ids[:, None, None]
        instances.pred_boxes = Boxes(label_map_boxes(segment_map, ids, num_segments))
        instances.pred_classes = torch.tensor(
            [s["category_id"] for s in things], dtype=torch.long, device=device
        )
        instances.scores = torch.tensor(
            [s["score"] for s in things], dtype=torch.float32, device=device
        )
        return instances
