"""Training targets from a panoptic annotation: a semantic map and an instance-id map.

Pure numpy functions (no config, no I/O). Every pixel is labelled through a lookup table over
the segments of ``segments_info``: each pixel finds its segment in a table indexed by id (ids
up to 2^16) or by a binary search in the few sorted segment ids (COCO's RGB-coded ids), both
cheaper than ``np.unique`` over the pixels (a sort of the whole map); no Python loop over
pixels.
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


# Largest segment id for which pixels are looked up in a dense table indexed by id (a few
# hundred KiB at most); COCO-style ids (the RGB code, up to 2^24) are searched instead.
_DENSE_TABLE_MAX_ID = 1 << 16


def _segment_index(pan_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Per pixel of ``pan_ids`` (flattened), the index of its id in ``segment_ids``, or
    ``len(segment_ids)`` (the void slot) for 0 and ids that ``segment_ids`` does not list."""
    flat = pan_ids.reshape(-1)
    num_segments = len(segment_ids)
    max_id = int(segment_ids.max()) if num_segments else 0
    if max_id <= _DENSE_TABLE_MAX_ID:
        # table[id] = segment index; ids above max_id (and below 0) land on the void entry.
        table = np.full(max_id + 2, num_segments, dtype=np.int64)
        table[segment_ids] = np.arange(num_segments)
        return table[np.clip(flat, 0, max_id + 1)]
    flat = flat.astype(np.int64, copy=False)
    order = np.argsort(segment_ids, kind="stable")
    # One entry past the ids catches pixels above the largest id; it maps to the void slot.
    sorted_ids = np.append(segment_ids[order], 0)
    index = np.append(order, num_segments)
    pos = np.searchsorted(sorted_ids[:num_segments], flat)
    return np.where(sorted_ids[pos] == flat, index[pos], num_segments)


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
    index = _segment_index(pan_ids, seg_ids)
    sem_lut = np.append(categories, ignore_label)  # the last entry is the void slot
    return sem_lut[index].reshape(pan_ids.shape)


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
    thing_set = {int(i) for i in thing_ids}
    is_thing = np.array([int(c) in thing_set for c in categories], dtype=bool)

    index = _segment_index(pan_ids, seg_ids)
    num_segments = len(seg_ids)
    counts = np.bincount(index, minlength=num_segments + 1)[:num_segments]
    usable = is_thing & ~crowd & (counts >= max(min_instance_pixels, 1))
    # Instances 1..n in segments_info order; the last entry of each table is the void slot.
    inst_lut = np.zeros(num_segments + 1, dtype=np.int64)
    inst_lut[:num_segments][usable] = np.arange(1, int(usable.sum()) + 1)
    sem_lut = np.append(categories, ignore_label)
    shape = pan_ids.shape
    return sem_lut[index].reshape(shape), inst_lut[index].reshape(shape)
