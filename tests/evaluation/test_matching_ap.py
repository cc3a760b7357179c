"""The DSB 2018 matching mAP (maskattn_d2/evaluation/matching_ap.py) against hand-computed
values on tiny hand-made images, and through the evaluator on panoptic files."""
import math

import numpy as np
import pytest
import torch
from panopticapi.utils import id2rgb
from PIL import Image

from detectron2.config import get_cfg
from detectron2.evaluation import DatasetEvaluators

from maskattn_d2 import add_maskattn_config
from maskattn_d2.evaluation import build_evaluator, format_results_summary
from maskattn_d2.evaluation import matching_ap as matching_ap_module
from maskattn_d2.evaluation.matching_ap import (
    IOU_THRESHOLDS,
    MatchingAPEvaluator,
    image_matching_counts,
    matching_ap_from_counts,
)

NUCLEUS, BACKGROUND = 0, 1  # contiguous ids: one thing, one stuff


def _thing(seg_id, category=NUCLEUS, crowd=0):
    return {"id": seg_id, "category_id": category, "isthing": True, "iscrowd": crowd}


def _stuff(seg_id, category=BACKGROUND):
    return {"id": seg_id, "category_id": category, "isthing": False}


def _score(gt, gt_segments, pred, pred_segments):
    counts = image_matching_counts(np.asarray(gt), gt_segments, np.asarray(pred), pred_segments)
    return counts, matching_ap_from_counts([counts])


def test_thresholds_are_the_competition_ones():
    assert IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_perfect_prediction_is_100():
    gt = np.ones((6, 6), dtype=np.int64)
    gt[0:2, 0:2], gt[3:6, 3:6] = 2, 3
    segments = [_stuff(1), _thing(2), _thing(3)]
    # Same segmentation under other ids.
    pred = np.select([gt == 1, gt == 2, gt == 3], [1001, 5, 7])
    counts, res = _score(gt, segments, pred, [_stuff(1001), _thing(5), _thing(7)])
    assert counts.tolist() == [[2, 0, 0]] * 10
    assert res == {"mAP": 100.0, "AP50": 100.0, "AP75": 100.0}


def test_one_object_split_in_two_and_iou_exactly_at_a_threshold():
    # Ground truth: one nucleus of 10 pixels. Prediction: 6 + 4 pixels of it, IoU 0.6 / 0.4.
    gt = np.ones((4, 6), dtype=np.int64)
    gt[1, 0:5], gt[2, 0:5] = 2, 2
    pred = np.ones((4, 6), dtype=np.int64)
    pred[1, 0:5], pred[2, 0] = 10, 10  # 6 pixels
    pred[2, 1:5] = 11  # 4 pixels
    counts, res = _score(gt, [_stuff(1), _thing(2)], pred, [_stuff(1), _thing(10), _thing(11)])
    # t = 0.5, 0.55: the 6-pixel part matches (TP 1, FP 1, FN 0) -> 1/2. t = 0.6: IoU exactly
    # 0.6 is not > 0.6, so from there nothing matches (TP 0, FP 2, FN 1) -> 0.
    assert counts.tolist() == [[1, 1, 0]] * 2 + [[0, 2, 1]] * 8
    assert res["mAP"] == pytest.approx(100 * (0.5 + 0.5) / 10)
    assert res["AP50"] == pytest.approx(50.0)
    assert res["AP75"] == 0.0


def test_iou_of_exactly_three_quarters():
    gt = np.zeros((2, 4), dtype=np.int64)
    gt[0, :] = 5  # 4 pixels
    pred = np.zeros((2, 4), dtype=np.int64)
    pred[0, :3] = 9  # 3 of them: IoU 0.75
    gt_segments = [_thing(5)]
    counts, res = _score(gt, gt_segments, pred, [_thing(9)])
    # Matched at 0.5 ... 0.7 (5 thresholds), not at 0.75 ... 0.95.
    assert counts.tolist() == [[1, 0, 0]] * 5 + [[0, 1, 1]] * 5
    assert res == {"mAP": pytest.approx(50.0), "AP50": 100.0, "AP75": 0.0}


def test_missing_object_and_extra_prediction():
    gt = np.ones((4, 8), dtype=np.int64)
    gt[0:2, 0:2], gt[0:2, 4:6] = 2, 3
    pred = np.ones((4, 8), dtype=np.int64)
    pred[0:2, 0:2] = 2  # the first nucleus, exactly; the second one is missed
    counts, res = _score(gt, [_stuff(1), _thing(2), _thing(3)], pred, [_stuff(1), _thing(2)])
    assert counts.tolist() == [[1, 0, 1]] * 10
    assert res["mAP"] == pytest.approx(50.0)
    # Plus a prediction on the background: 1 / (1 + 1 + 1).
    pred[3, 6:8] = 4
    counts, res = _score(
        gt, [_stuff(1), _thing(2), _thing(3)], pred, [_stuff(1), _thing(2), _thing(4)]
    )
    assert counts.tolist() == [[1, 1, 1]] * 10
    assert res["mAP"] == pytest.approx(100 / 3)


def test_class_and_kind_must_agree():
    gt = np.zeros((2, 2), dtype=np.int64)
    gt[:] = 3
    # A thing prediction of another class, and a stuff prediction, on a nucleus: no match.
    counts, _ = _score(gt, [_thing(3)], gt, [_thing(3, category=2)])
    assert counts.tolist() == [[0, 1, 1]] * 10
    counts, res = _score(gt, [_thing(3)], gt, [_stuff(3)])
    assert counts.tolist() == [[0, 0, 1]] * 10
    assert res["mAP"] == 0.0


def test_void_pixels_do_not_count_against_a_prediction():
    gt = np.zeros((3, 4), dtype=np.int64)  # 0 = void
    gt[0, :] = 1  # background stuff
    gt[1, 0:2] = 2  # a 2-pixel nucleus; row 1, columns 2-3 and row 2 are void
    pred = np.zeros((3, 4), dtype=np.int64)
    pred[1, 0:4], pred[2, :] = 7, 7  # the nucleus + 6 void pixels
    counts, res = _score(gt, [_stuff(1), _thing(2)], pred, [_thing(7)])
    assert res["mAP"] == 100.0
    # An id missing from segments_info is void too.
    gt[2, :] = 99
    assert _score(gt, [_stuff(1), _thing(2)], pred, [_thing(7)])[1]["mAP"] == 100.0
    # The same extra pixels on background do count: IoU 2 / 8.
    gt[1, 2:4], gt[2, :] = 1, 1
    counts, res = _score(gt, [_stuff(1), _thing(2)], pred, [_thing(7)])
    assert counts.tolist() == [[0, 1, 1]] * 10


def test_crowd_is_neither_missed_nor_a_false_positive():
    gt = np.ones((4, 4), dtype=np.int64)
    gt[0:2, 0:2] = 2  # crowd region of nuclei
    gt[2:4, 2:4] = 3  # a nucleus
    segments = [_stuff(1), _thing(2, crowd=1), _thing(3)]
    pred = np.ones((4, 4), dtype=np.int64)
    pred[2:4, 2:4] = 5
    pred[0:2, 0:2] = 6  # a prediction on the crowd: not a false positive
    counts, res = _score(gt, segments, pred, [_stuff(1), _thing(5), _thing(6)])
    assert counts.tolist() == [[1, 0, 0]] * 10
    # A crowd alone, predicted or not: nothing to find, nothing wrongly found.
    assert _score(gt * (gt != 3) + (gt == 3), segments, pred * (pred != 5) + (pred == 5),
                  [_stuff(1), _thing(6)])[1]["mAP"] == 100.0
    # A prediction of another class on the crowd is a false positive.
    counts, _ = _score(gt, segments, pred, [_stuff(1), _thing(5), _thing(6, category=2)])
    assert counts.tolist() == [[1, 1, 0]] * 10


def test_empty_image_and_mean_over_images():
    empty = np.ones((3, 3), dtype=np.int64)
    counts, res = _score(empty, [_stuff(1)], empty, [_stuff(1)])
    assert counts.tolist() == [[0, 0, 0]] * 10 and res["mAP"] == 100.0
    # An empty image (100) and one with TP 1, FN 1 at every threshold (50).
    assert matching_ap_from_counts([np.zeros((10, 3)), np.stack([[1, 0, 1]] * 10)])["mAP"] == 75.0
    assert math.isnan(matching_ap_from_counts([])["mAP"])


def test_shapes_must_agree_and_thresholds_allow_unique_matching():
    with pytest.raises(ValueError, match="size"):
        image_matching_counts(np.zeros((2, 2)), [], np.zeros((2, 3)), [])
    with pytest.raises(ValueError, match="0.5"):
        image_matching_counts(np.zeros((2, 2)), [], np.zeros((2, 2)), [], thresholds=[0.3])


def test_large_ids_take_the_sorting_path():
    # RGB-encoded ids up to 2^24 (not the lookup-table path): same result as small ids.
    gt = np.full((3, 3), 1, dtype=np.int64)
    gt[0, 0:2] = 16_000_000
    pred = np.zeros((3, 3), dtype=np.int64)
    pred[0, 0:2] = 9_000_000
    counts, res = _score(gt, [_stuff(1), _thing(16_000_000)], pred, [_thing(9_000_000)])
    assert counts.tolist() == [[1, 0, 0]] * 10


# ----------------------------------------------------------------------- the evaluator
def _write_gt(tmp_path, name, ids):
    path = tmp_path / f"{name}.png"
    Image.fromarray(id2rgb(ids)).save(path)
    return str(path)


@pytest.fixture
def tiny_panoptic(tmp_path, register_dataset):
    """Two images: a nucleus + background each; registered with a one-thing metadata."""
    gt_a = np.ones((4, 6), dtype=np.int64)
    gt_a[1:3, 0:5] = 2
    gt_b = np.ones((4, 4), dtype=np.int64)
    gt_b[0:2, 0:2], gt_b[2:4, 2:4] = 2, 3
    records = [
        {
            "file_name": "a.png",
            "image_id": 1,
            "pan_seg_file_name": _write_gt(tmp_path, "a", gt_a),
            "segments_info": [_stuff(1), _thing(2)],
        },
        {
            "file_name": "b.png",
            "image_id": 2,
            "pan_seg_file_name": _write_gt(tmp_path, "b", gt_b),
            "segments_info": [_stuff(1), _thing(2), _thing(3)],
        },
    ]
    name = register_dataset(
        "maskattn_test_matching_ap",
        records,
        evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id={1: 0},
        stuff_dataset_id_to_contiguous_id={1: 0, 2: 1},
        thing_classes=["nucleus"],
        stuff_classes=["nucleus", "background"],
        label_divisor=1000,
        ignore_label=255,
    )
    return name, gt_a, gt_b


def test_evaluator_on_panoptic_files(tiny_panoptic):
    name, gt_a, gt_b = tiny_panoptic
    evaluator = MatchingAPEvaluator(name)
    evaluator.reset()
    # Image a: the 10-pixel nucleus split 6 + 4 (0.5 / 0.5 / 0 ...); image b: exact (1.0).
    pred_a = np.full(gt_a.shape, 1001)
    pred_a[1, 0:5], pred_a[2, 0] = 1, 1
    pred_a[2, 1:5] = 2
    pred_b = np.select([gt_b == 1, gt_b == 2, gt_b == 3], [1001, 1, 2])
    segs = [
        {"id": 1, "category_id": 0, "isthing": True},
        {"id": 2, "category_id": 0, "isthing": True},
        {"id": 1001, "category_id": 1, "isthing": False},
    ]
    evaluator.process(
        [{"image_id": 1, "file_name": "a.png"}, {"image_id": 2, "file_name": "b.png"}],
        [
            {"panoptic_seg": (torch.from_numpy(pred_a).int(), segs)},
            {"panoptic_seg": (torch.from_numpy(pred_b).int(), segs)},
        ],
    )
    res = evaluator.evaluate()["matching_ap"]
    assert res["mAP"] == pytest.approx((10.0 + 100.0) / 2)
    assert res["AP50"] == pytest.approx((50.0 + 100.0) / 2)
    assert res["AP75"] == pytest.approx(50.0)

    # detectron2's convention without segments_info: id = class * label_divisor + k, -1 void.
    evaluator.reset()
    pred = np.where(gt_b == 1, -1, np.where(gt_b == 2, 1, 2))  # class 0 things 1, 2
    evaluator.process([{"image_id": 2}], [{"panoptic_seg": (torch.from_numpy(pred), None)}])
    assert evaluator.evaluate()["matching_ap"]["mAP"] == 100.0

    # A prediction at another size than the ground truth is refused, naming the image.
    evaluator.reset()
    with pytest.raises(ValueError, match="b.png"):
        evaluator.process(
            [{"image_id": 2, "file_name": "b.png"}],
            [{"panoptic_seg": (torch.zeros(8, 8, dtype=torch.int32), [])}],
        )


def test_evaluator_gathers_from_all_processes(tiny_panoptic, monkeypatch):
    name, _, gt_b = tiny_panoptic
    evaluator = MatchingAPEvaluator(name)
    evaluator.reset()
    pred_b = np.select([gt_b == 1, gt_b == 2, gt_b == 3], [1001, 1, 2])
    segs = [
        {"id": 1, "category_id": 0, "isthing": True},
        {"id": 2, "category_id": 0, "isthing": True},
        {"id": 1001, "category_id": 1, "isthing": False},
    ]
    evaluator.process([{"image_id": 2}], [{"panoptic_seg": (torch.from_numpy(pred_b), segs)}])
    # Another rank saw one image with nothing found (TP 0, FN 1): the mean is over both.
    other_rank = [np.stack([[0, 0, 1]] * 10)]
    comm = matching_ap_module.comm
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data, other_rank])
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    assert evaluator.evaluate()["matching_ap"]["mAP"] == pytest.approx(50.0)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert evaluator.evaluate() is None


def _cfg(evaluators):
    cfg = _cfg_default()
    cfg.TEST.EVALUATORS = evaluators
    return cfg


def test_build_evaluator_opt_in(tiny_panoptic, tmp_path):
    name = tiny_panoptic[0]
    cfg = _cfg(["matching_ap"])
    cfg.OUTPUT_DIR = str(tmp_path)
    assert isinstance(build_evaluator(cfg, name), MatchingAPEvaluator)
    assert "matching_ap" not in _cfg_default().TEST.EVALUATORS  # opt-in
    both = build_evaluator(_cfg(["panoptic", "matching_ap"]), name, str(tmp_path))
    assert isinstance(both, DatasetEvaluators)
    assert any(isinstance(e, MatchingAPEvaluator) for e in both._evaluators)


def _cfg_default():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    return cfg


def test_summary_shows_the_matching_map():
    table = format_results_summary(
        {"panoptic_seg": {"PQ": 50.0}, "matching_ap": {"mAP": 12.5, "AP50": 40.0, "AP75": 5.0}}
    )
    header, _, row = table.splitlines()
    assert "matching mAP" in header and "12.50" in row


# ------------------------------------------------------- real-format data (crowd, void)
def test_coco_sample_perfect_and_corrupted(coco_mini):
    from .test_evaluators import evaluate, largest_thing_relabel

    evaluator = MatchingAPEvaluator(coco_mini)
    assert evaluate(evaluator, coco_mini)["matching_ap"] == {
        "mAP": 100.0, "AP50": 100.0, "AP75": 100.0
    }
    # The largest thing of one image gets another class: one FN and one FP there.
    corrupted = evaluate(evaluator, coco_mini, **largest_thing_relabel(coco_mini))
    assert 50.0 < corrupted["matching_ap"]["mAP"] < 100.0


def test_cityscapes_panoptic_perfect(cityscapes_panoptic):
    from .test_evaluators import evaluate

    # String image ids, crowd segments and void labels of the Cityscapes layout.
    result = evaluate(MatchingAPEvaluator(cityscapes_panoptic), cityscapes_panoptic)
    assert result["matching_ap"]["mAP"] == 100.0



def test_matching_ap_after_the_panoptic_evaluator_sees_the_model_outputs(coco_mini, tmp_path):
    """build_evaluator runs the panoptic evaluator first; detectron2's COCOPanopticEvaluator
    rewrites segments_info in place (drops "isthing", maps to dataset ids), which made matching
    AP score every prediction as missed. Together they give the numbers of each alone."""
    from detectron2.evaluation import DatasetEvaluators

    from maskattn_d2.evaluation import PanopticEvaluator

    from .test_evaluators import evaluate

    both = DatasetEvaluators(
        [PanopticEvaluator(coco_mini, output_dir=str(tmp_path)), MatchingAPEvaluator(coco_mini)]
    )
    results = evaluate(both, coco_mini)
    assert results["matching_ap"]["mAP"] == 100.0
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
