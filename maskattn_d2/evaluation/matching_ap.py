"""The DSB 2018 competition metric: mean average precision over IoU thresholds, from matching.

For one image and one IoU threshold t, a predicted thing segment is a true positive when it
matches a ground-truth thing segment of the same class with IoU > t (for t >= 0.5 a segment
can match at most one other, so the matching is one-to-one without any assignment step);
unmatched predictions are false positives and unmatched ground truth false negatives, and

    precision(t) = TP(t) / (TP(t) + FP(t) + FN(t)).

The image's score is the mean of precision(t) over t = 0.5, 0.55, ..., 0.95, and the metric
("mAP") is the mean of the image scores; "AP50" and "AP75" are the means of precision(0.5) and
precision(0.75). All are reported in percent. An image with neither ground-truth nor predicted
things scores 100 (nothing to find, nothing found).

Void and crowd regions are treated as panopticapi treats them for PQ: crowd ground truth is
never a false negative and cannot be matched; predicted pixels on void do not count in the
union; a prediction lying more than half on void or on crowd of its own class is not a false
positive. Ground-truth pixels whose id is not listed in segments_info count as void.

Everything is computed per image from one intersection matrix (a single ``np.bincount`` over
the joint ids of ground truth and prediction), at the ground truth's original size.
"""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.datasets.panoptic_conversion import read_panoptic_ids

__all__ = [
    "IOU_THRESHOLDS",
    "MatchingAPEvaluator",
    "image_matching_counts",
    "matching_ap_from_counts",
]

logger = logging.getLogger(__name__)

# 0.5, 0.55, ..., 0.95 (rounded so that e.g. 0.75 is exactly the float 0.75).
IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)

# Segment kinds in the ground truth (after compaction).
_VOID, _THING, _CROWD, _STUFF = 0, 1, 2, 3


def _compact(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(values, inverse): the sorted distinct ids and each pixel's index into them."""
    flat = ids.reshape(-1)
    if flat.size and flat.min() >= 0 and flat.max() < max(4 * flat.size, 1 << 16):
        # Small non-negative ids (model outputs, DSB, COCO-style class*1000+k): a lookup table
        # instead of np.unique's sort.
        present = np.bincount(flat) > 0
        values = np.flatnonzero(present)
        lut = np.cumsum(present) - 1
        return values, lut[flat]
    values, inverse = np.unique(flat, return_inverse=True)
    return values, inverse.reshape(-1)


def image_matching_counts(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> np.ndarray:
    """TP, FP and FN of one image at each IoU threshold.

    Args:
        gt_ids: (H, W) ground-truth segment ids (0 or unlisted ids = void).
        gt_segments: dicts with "id", "category_id", "isthing" and optionally "iscrowd".
        pred_ids: (H, W) predicted segment ids, same size (ids not listed = unlabelled).
        pred_segments: dicts with "id", "category_id" and "isthing".
        thresholds: IoU thresholds, each >= 0.5 (a match needs IoU > t).

    Returns:
        (T, 3) int64 array of (TP, FP, FN) per threshold.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.size and thresholds.min() < 0.5:
        raise ValueError(f"IoU thresholds must be >= 0.5 for a unique matching, got {thresholds}")
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"prediction of size {pred_ids.shape} against ground truth of size {gt_ids.shape}"
        )
    gt_values, gt_index = _compact(np.asarray(gt_ids, dtype=np.int64))
    pred_values, pred_index = _compact(np.asarray(pred_ids, dtype=np.int64))

    # Kind and class of each distinct ground-truth id.
    by_id = {int(s["id"]): s for s in gt_segments}
    gt_kind = np.full(len(gt_values), _VOID, dtype=np.int64)
    gt_class = np.full(len(gt_values), -1, dtype=np.int64)
    for k, value in enumerate(gt_values.tolist()):
        seg = by_id.get(value)
        if seg is None or value == 0:
            continue
        gt_class[k] = int(seg["category_id"])
        if not seg.get("isthing", False):
            gt_kind[k] = _STUFF
        elif seg.get("iscrowd", 0):
            gt_kind[k] = _CROWD
        else:
            gt_kind[k] = _THING
    # Class of each distinct predicted id (-1: not a thing prediction).
    pred_by_id = {int(s["id"]): s for s in pred_segments}
    pred_class = np.full(len(pred_values), -1, dtype=np.int64)
    for k, value in enumerate(pred_values.tolist()):
        seg = pred_by_id.get(value)
        if seg is not None and seg.get("isthing", False):
            pred_class[k] = int(seg["category_id"])

    num_gt, num_pred = len(gt_values), len(pred_values)
    inter = np.bincount(gt_index * num_pred + pred_index, minlength=num_gt * num_pred)
    inter = inter.reshape(num_gt, num_pred)
    gt_area = inter.sum(axis=1)
    pred_area = inter.sum(axis=0)
    pred_on_void = inter[gt_kind == _VOID].sum(axis=0)

    gt_things = np.flatnonzero(gt_kind == _THING)
    pred_things = np.flatnonzero(pred_class >= 0)
    # IoU of every (ground-truth thing, predicted thing) pair of the same class.
    pair = inter[np.ix_(gt_things, pred_things)].astype(np.float64)
    union = gt_area[gt_things, None] + (pred_area - pred_on_void)[None, pred_things] - pair
    same_class = gt_class[gt_things, None] == pred_class[None, pred_things]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(same_class & (union > 0), pair / np.maximum(union, 1), 0.0)

    # Predictions mostly on void or on crowd of their own class are never false positives.
    crowd_same = (gt_kind[:, None] == _CROWD) & (gt_class[:, None] == pred_class[None, :])
    ignored_area = pred_on_void + (inter * crowd_same).sum(axis=0)
    ignorable = ignored_area[pred_things] > 0.5 * pred_area[pred_things]

    counts = np.zeros((len(thresholds), 3), dtype=np.int64)
    for i, t in enumerate(thresholds):
        matched = iou > t
        pred_matched = matched.any(axis=0)
        tp = int(pred_matched.sum())
        counts[i] = (tp, int((~pred_matched & ~ignorable).sum()), len(gt_things) - tp)
    return counts


def matching_ap_from_counts(
    counts: Sequence[np.ndarray], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> Dict[str, float]:
    """Metric (percent) from the per-image (T, 3) TP/FP/FN arrays of ``image_matching_counts``.

    Returns:
        {"mAP", "AP50", "AP75"} (AP50 / AP75 only when 0.5 / 0.75 are among the thresholds);
        NaN when there is no image.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if len(counts) == 0:
        precision = np.full((1, len(thresholds)), np.nan)
    else:
        stacked = np.stack([np.asarray(c, dtype=np.float64) for c in counts])  # (N, T, 3)
        total = stacked.sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(total > 0, stacked[..., 0] / np.maximum(total, 1), 1.0)
    results = {"mAP": 100.0 * float(precision.mean(axis=1).mean())}
    for name, t in (("AP50", 0.5), ("AP75", 0.75)):
        hit = np.flatnonzero(np.isclose(thresholds, t))
        if hit.size:
            results[name] = 100.0 * float(precision[:, hit[0]].mean())
    return results


class MatchingAPEvaluator(DatasetEvaluator):
    """The DSB 2018 matching mAP (see the module docstring) of ``panoptic_seg`` outputs.

    The ground truth comes from the dataset's dicts (``pan_seg_file_name`` and
    ``segments_info`` with contiguous category ids and "isthing", as detectron2's and
    maskattn_d2's panoptic loaders write them), matched to the inputs by "image_id".
    Predictions at the original size, as ``COCOPanopticEvaluator`` reads them; with
    ``segments_info`` None the ids are ``category * label_divisor + k`` (-1 void), as
    detectron2's convention. Works in several processes: the per-image counts are gathered to
    the main process, which returns ``{"matching_ap": {"mAP", "AP50", "AP75"}}``.
    """

    RESULT_KEY = "matching_ap"

    def __init__(self, dataset_name: str, thresholds: Sequence[float] = IOU_THRESHOLDS):
        self._dataset_name = dataset_name
        self._thresholds = np.asarray(thresholds, dtype=np.float64)
        meta = MetadataCatalog.get(dataset_name)
        self._thing_ids = set((meta.get("thing_dataset_id_to_contiguous_id") or {}).values())
        self._label_divisor = meta.get("label_divisor")
        self._gt: Dict = {}
        for record in DatasetCatalog.get(dataset_name):
            if "pan_seg_file_name" not in record or "segments_info" not in record:
                raise ValueError(
                    f"Dataset '{dataset_name}' has a dict without 'pan_seg_file_name' / "
                    f"'segments_info' (file {record.get('file_name')}); it is not panoptic"
                )
            self._gt[record["image_id"]] = (record["pan_seg_file_name"], record["segments_info"])
        self._counts: List[np.ndarray] = []

    def reset(self):
        self._counts = []

    def _gt_segments(self, segments: Sequence[Mapping]) -> List[Mapping]:
        return [
            s if "isthing" in s else dict(s, isthing=int(s["category_id"]) in self._thing_ids)
            for s in segments
        ]

    def _prediction(self, output: Mapping) -> Tuple[np.ndarray, List[Mapping]]:
        ids, segments = output["panoptic_seg"]
        ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
        ids = ids.astype(np.int64)
        if segments is None:
            if self._label_divisor is None:
                raise ValueError(
                    f"panoptic_seg without segments_info needs metadata 'label_divisor' for "
                    f"'{self._dataset_name}'"
                )
            segments = [
                {
                    "id": int(value),
                    "category_id": int(value) // self._label_divisor,
                    "isthing": int(value) // self._label_divisor in self._thing_ids,
                }
                for value in np.unique(ids).tolist()
                if value >= 0
            ]
            ids = np.where(ids < 0, -1, ids)
        else:
            segments = [
                s if "isthing" in s else dict(s, isthing=int(s["category_id"]) in self._thing_ids)
                for s in segments
            ]
        return ids, segments

    def process(self, inputs, outputs):
        for inp, output in zip(inputs, outputs):
            if "panoptic_seg" not in output:
                continue
            image_id = inp["image_id"]
            if image_id not in self._gt:
                raise KeyError(f"image_id {image_id} is not in dataset '{self._dataset_name}'")
            png, gt_segments = self._gt[image_id]
            gt_ids = read_panoptic_ids(png)
            pred_ids, pred_segments = self._prediction(output)
            if pred_ids.shape != gt_ids.shape:
                raise ValueError(
                    f"panoptic_seg of image {inp.get('file_name', image_id)} is "
                    f"{pred_ids.shape}, its ground truth {png} is {gt_ids.shape}: predictions "
                    "must be at the original size"
                )
            # -1 (detectron2's void in predictions) would break the joint index: shift by 1.
            self._counts.append(
                image_matching_counts(
                    gt_ids,
                    self._gt_segments(gt_segments),
                    pred_ids + 1,
                    [dict(s, id=int(s["id"]) + 1) for s in pred_segments],
                    self._thresholds,
                )
            )

    def evaluate(self):
        counts = self._counts
        if comm.get_world_size() > 1:
            comm.synchronize()
            counts = list(itertools.chain(*comm.gather(counts, dst=0)))
            if not comm.is_main_process():
                return None
        if not counts:
            logger.warning(
                "MatchingAPEvaluator on '%s' got no panoptic_seg prediction", self._dataset_name
            )
        results = matching_ap_from_counts(counts, self._thresholds)
        logger.info(
            "Matching mAP@[.5:.95] on %s (%d images): mAP %.3f  AP50 %.3f  AP75 %.3f",
            self._dataset_name,
            len(counts),
            results["mAP"],
            results.get("AP50", float("nan")),
            results.get("AP75", float("nan")),
        )
        return OrderedDict({self.RESULT_KEY: results})
