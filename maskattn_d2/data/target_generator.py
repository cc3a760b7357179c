"""Training targets from a panoptic annotation: a semantic map and an instance-id map.

Pure numpy functions (no config, no I/O). Every pixel is labelled through a lookup table over
the unique segment ids of the panoptic map, so the cost is one ``np.unique`` per image and no
Python loop over pixels.
"""
from typing import Iterable, Mapping, Sequence, Tuple

import numpy as np

__all__ = ["panoptic_to_semantic", "panoptic_to_targets"]


def _segment_table(segments_info: Sequence[Mapping]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment ids, category ids and crowd flags of ``segments_info`` as arrays."""
    ids = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    categories = np.asarray([int(s["category_id"]) for s in segments_info], dtype=np.int64)
    crowd = np.asarray([bool(s.get("iscrowd", 0)) for s in segments_info], dtype=bool)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"segments_info has duplicate segment ids: {sorted(ids.tolist())}")
    if (ids <= 0).any():
        raise ValueError(f"segment ids must be positive (0 is void), got {sorted(ids.tolist())}")
    return ids, categories, crowd


def _match_segments(unique_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """For each id in ``unique_ids``, its index in ``segment_ids`` or -1 when absent."""
    if len(segment_ids) == 0:
        return np.full(len(unique_ids), -1, dtype=np.int64)
    order = np.argsort(segment_ids)
    sorted_ids = segment_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, unique_ids), 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == unique_ids
    return np.where(found, order[pos], -1)


def _check_pan_ids(pan_ids: np.ndarray) -> None:
    if not isinstance(pan_ids, np.ndarray) or pan_ids.ndim != 2:
        raise ValueError(
            f"pan_ids must be a (H, W) integer array, got {type(pan_ids).__name__} "
            f"with shape {getattr(pan_ids, 'shape', None)}"
        )
    if not np.issubdtype(pan_ids.dtype, np.integer):
        raise ValueError(f"pan_ids must hold integers, got dtype {pan_ids.dtype}")


def panoptic_to_semantic(
    pan_ids: np.ndarray, segments_info: Sequence[Mapping], *, ignore_label: int = 255
) -> np.ndarray:
    """Semantic map of a panoptic annotation.

    Args:
        pan_ids: (H, W) integer array of segment ids (``rgb2id`` of a COCO panoptic PNG);
            0 and ids absent from ``segments_info`` are void.
        segments_info: dicts with "id" and "category_id" (the label written for the segment,
            e.g. a contiguous class id) and optionally "iscrowd" (crowd keeps its class).
        ignore_label: label of void pixels.

    Returns:
        (H, W) int64 array of labels.
    """
    _check_pan_ids(pan_ids)
    seg_ids, categories, _ = _segment_table(segments_info)
    unique_ids, inverse = np.unique(pan_ids, return_inverse=True)
    index = _match_segments(unique_ids.astype(np.int64), seg_ids)
    lut = np.full(len(unique_ids), ignore_label, dtype=np.int64)
    lut[index >= 0] = categories[index[index >= 0]]
    return lut[inverse.reshape(-1)].reshape(pan_ids.shape)


def panoptic_to_targets(
    pan_ids: np.ndarray,
    segments_info: Sequence[Mapping],
    *,
    thing_ids: Iterable[int],
    ignore_label: int = 255,
    min_instance_pixels: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """Semantic and instance-id targets of one (already resized) panoptic annotation.

    Args:
        pan_ids: (H, W) integer array of segment ids at network resolution; 0 and ids that
            are not in ``segments_info`` are void.
        segments_info: dicts with "id", contiguous "category_id" and optionally "iscrowd".
        thing_ids: contiguous category ids of thing classes.
        ignore_label: semantic label of void pixels.
        min_instance_pixels: thing segments covering fewer pixels of ``pan_ids`` get no
            instance id (the contrastive loss cannot sample them reliably).

    Returns:
        sem_seg: (H, W) int64, the contiguous class of every pixel, ``ignore_label`` for void.
            Crowd pixels keep their class.
        instance_ids: (H, W) int64, 0 where no usable instance is (stuff, void, crowd, small
            instances), else 1..n, numbered consecutively in ``segments_info`` order.
    """
    _check_pan_ids(pan_ids)
    if min_instance_pixels < 0:
        raise ValueError(f"min_instance_pixels must be >= 0, got {min_instance_pixels}")
    seg_ids, categories, crowd = _segment_table(segments_info)
    is_thing = np.isin(categories, np.asarray(list(thing_ids), dtype=np.int64))

    unique_ids, inverse = np.unique(pan_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, minlength=len(unique_ids))
    index = _match_segments(unique_ids.astype(np.int64), seg_ids)
    known = index >= 0

    sem_lut = np.full(len(unique_ids), ignore_label, dtype=np.int64)
    sem_lut[known] = categories[index[known]]

    # index -1 (unknown id) picks an appended "not a usable thing" entry.
    usable = (
        np.append(is_thing, False)[index]
        & ~np.append(crowd, True)[index]
        & (counts >= max(min_instance_pixels, 1))
    )
    inst_lut = np.zeros(len(unique_ids), dtype=np.int64)
    usable_pos = np.flatnonzero(usable)
    # Number instances 1..n in segments_info order, independent of the id values.
    inst_lut[usable_pos[np.argsort(index[usable_pos], kind="stable")]] = np.arange(
        1, len(usable_pos) + 1
    )
    shape = pan_ids.shape
    return sem_lut[inverse].reshape(shape), inst_lut[inverse].reshape(shape)

