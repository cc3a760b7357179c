"""Panoptic merge (Panoptic-DeepLab style) of disjoint instances, given as one label map, with
the stuff of the semantic map."""
from typing import Dict, List, Tuple

import torch

__all__ = ["merge_instance_map", "segment_id_map"]


def merge_instance_map(
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
    Panoptic-DeepLab style merge of disjoint instances, given as one label map, and the
    semantic map.

    Things first, in painting order (highest score first): an instance with fewer than
    ``min_instance_area`` pixels is dropped. Then stuff: each stuff class gets one segment from
    its pixels no instance took if they number at least ``stuff_area``, otherwise they are
    void. Thing-class pixels no instance claimed are void.

    Segment ids are ``category_id * label_divisor + index`` with ``index`` counting the
    instances of a class from 1, and 1 for a stuff segment, so that 0 is always void (also for
    a stuff class with contiguous id 0).

    Args:
        sem: (h, w) int64 semantic argmax.
        instance_map: (h, w) int64 instance of each pixel in [0, N) (painting order), or -1.
        classes, scores: (N,) of the instances.
        is_thing: (K,) bool.
        min_instance_area: least pixels of a kept instance.
        stuff_area: least pixels of a stuff segment.
        label_divisor: id multiplier of the class; must exceed the instances of any class.

    Returns:
        segment_map: (h, w) int64 index into ``segments_info`` of each pixel, -1 for void.
        segments_info: one dict per segment, things first in painting order:
            ``{"id", "isthing", "category_id", "area"}`` plus ``"score"`` for things.
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


def segment_id_map(segment_map: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Panoptic ids (int32, 0 = void) of a segment index map (-1 = void)."""
    lookup = torch.cat([segment_ids.new_zeros(1), segment_ids])
    return lookup.index_select(0, segment_map.flatten() + 1).view(segment_map.shape)
