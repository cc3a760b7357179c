"""Evaluation edge cases: no predicted instance, void-only ground truth, a class never
predicted, a dataset without things. Hand-made predictions on hand-made data, so every
expected number is computed by hand."""
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.evaluation import PQStat

from maskattn_d2.evaluation import build_evaluator, format_results_summary, undefined_pq_is_nan

from ..panoptic_factory import CONTIGUOUS, DISC, NUM_CLASSES, write_panoptic_dataset
from ..panoptic_factory import unregister as unregister_names
from .test_evaluators import make_cfg, model_outputs

BOX_SEGMENT = 12  # the box of scene "things"


@pytest.fixture
def dataset(tmp_path):
    """register(scenes) -> a registered dataset name; unregistered after the test."""
    names = []

    def register(*scenes):
        name = f"maskattn_test_edge_{len(names)}_{'_'.join(scenes)}"
        write_panoptic_dataset(tmp_path / name, scenes, name=name)
        names.append(name)
        return name

    yield register
    unregister_names(names)


def run(name, tmp_path, change=None):
    """Evaluate with all three evaluators; ``change(scene_index, inputs, outputs)`` edits the
    perfect prediction of an image."""
    evaluator = build_evaluator(make_cfg(tmp_path), name, str(tmp_path / "eval" / name))
    metadata = MetadataCatalog.get(name)
    thing_ids = set(metadata.thing_dataset_id_to_contiguous_id.values())
    evaluator.reset()
    for index, record in enumerate(DatasetCatalog.get(name)):
        inputs, outputs = model_outputs(record, thing_ids, NUM_CLASSES)
        if change is not None:
            change(index, record, outputs)
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def drop_instances(index, record, outputs):
    """The model finds no instance: empty Instances, thing pixels void in panoptic_seg."""
    instances = outputs["instances"]
    outputs["instances"] = instances[torch.zeros(len(instances), dtype=torch.bool)]
    ids, segments = outputs["panoptic_seg"]
    things = [s["id"] for s in segments if s["isthing"]]
    ids = ids.clone()
    ids[torch.isin(ids, torch.tensor(things, dtype=ids.dtype))] = 0
    outputs["panoptic_seg"] = (ids, [s for s in segments if not s["isthing"]])


def test_perfect_predictions_with_void_and_stuff_only_images(dataset, tmp_path):
    results = run(dataset("things", "stuff_only", "void"), tmp_path)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ_th"] == pytest.approx(100)
    assert results["segm"]["AP"] == pytest.approx(100)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100)


def test_zero_predicted_instances_score_zero_not_nan(dataset, tmp_path):
    results = run(dataset("things", "stuff_only"), tmp_path, change=drop_instances)
    panoptic = results["panoptic_seg"]
    # Both thing classes are all false negatives, both stuff classes perfect.
    assert panoptic["PQ_th"] == 0 and panoptic["PQ_st"] == pytest.approx(100)
    assert panoptic["PQ"] == pytest.approx(50)
    for task in ("segm", "bbox"):  # COCOEvaluator alone would say NaN ("no predictions")
        assert results[task]["AP"] == 0 and results[task]["AP-disc"] == 0
    assert results["sem_seg"]["mIoU"] == pytest.approx(100)


def test_class_never_predicted(dataset, tmp_path):
    """The box is predicted as a disc, so class "box" is never predicted."""

    def box_as_disc(index, record, outputs):
        disc = CONTIGUOUS[DISC]
        ids, segments = outputs["panoptic_seg"]
        segments = [dict(s, category_id=disc) if s["id"] == BOX_SEGMENT else s for s in segments]
        outputs["panoptic_seg"] = (ids, segments)
        outputs["instances"].pred_classes[:] = disc
        box_pixels = ids == BOX_SEGMENT
        outputs["sem_seg"][:, box_pixels] = 0
        outputs["sem_seg"][disc, box_pixels] = 1

    results = run(dataset("things", "stuff_only"), tmp_path, change=box_as_disc)
    panoptic = results["panoptic_seg"]
    # disc: 1 TP (IoU 1) + 1 FP -> PQ 1 / (1 + 0.5); box: 1 FN -> 0; sky, grass: 1 each.
    assert panoptic["PQ_th"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert panoptic["PQ"] == pytest.approx(100 * (2 / 3 + 0 + 1 + 1) / 4)
    semantic = results["sem_seg"]
    # disc: 8x8 true pixels, predicted on 8x8 + 8x10 pixels; box: never predicted.
    assert semantic["IoU-disc"] == pytest.approx(100 * 64 / (64 + 80))
    assert semantic["IoU-box"] == 0
    assert semantic["mIoU"] == pytest.approx(100 * (64 / 144 + 0 + 1 + 1) / 4)
    assert results["segm"]["AP-box"] == 0
    assert results["segm"]["AP-disc"] < 100  # one false positive among the discs


def test_predictions_on_void_ground_truth_are_ignored(dataset, tmp_path):
    """Anything predicted on an all-void image changes neither PQ nor mIoU."""
    name = dataset("things", "stuff_only", "void")
    perfect = run(name, tmp_path)

    def paint_void_image(index, record, outputs):
        if record["segments_info"]:
            return
        ids = torch.full(outputs["panoptic_seg"][0].shape, 2001, dtype=torch.int32)
        ids[:8, :8] = 1
        segments = [
            {"id": 2001, "category_id": 2, "isthing": False},
            {"id": 1, "category_id": 0, "isthing": True},
        ]
        outputs["panoptic_seg"] = (ids, segments)
        outputs["sem_seg"][:] = 0
        outputs["sem_seg"][2] = 1

    painted = run(name, tmp_path, change=paint_void_image)
    for task, metric in [("panoptic_seg", "PQ"), ("panoptic_seg", "PQ_th"), ("sem_seg", "mIoU")]:
        assert painted[task][metric] == pytest.approx(perfect[task][metric])


def test_all_void_dataset_gives_nan_not_an_exception(dataset, tmp_path, caplog):
    name = dataset("void", "void")
    results = run(name, tmp_path)
    assert all(math.isnan(v) for v in results["panoptic_seg"].values())
    assert math.isnan(results["segm"]["AP"])  # no ground-truth instance: AP undefined
    assert math.isnan(results["sem_seg"]["mIoU"])
    assert "PQ over All is undefined (NaN)" in caplog.text
    assert "nan" in format_results_summary(results)


def test_dataset_without_things(dataset, tmp_path):
    """No thing in the ground truth nor in the predictions: PQ_th is undefined, the rest is
    scored (panopticapi alone raises ZeroDivisionError)."""
    results = run(dataset("stuff_only", "stuff_only"), tmp_path)
    panoptic = results["panoptic_seg"]
    assert panoptic["PQ"] == pytest.approx(100) and panoptic["PQ_st"] == pytest.approx(100)
    assert math.isnan(panoptic["PQ_th"]) and math.isnan(panoptic["SQ_th"])
    assert math.isnan(results["segm"]["AP"])


def test_undefined_pq_patch_is_scoped():
    original = PQStat.pq_average
    categories = {1: {"isthing": 1}}
    with pytest.raises(ZeroDivisionError):
        PQStat().pq_average(categories, isthing=True)
    with pytest.raises(RuntimeError):
        with undefined_pq_is_nan():
            result, per_class = PQStat().pq_average(categories, isthing=True)
            assert math.isnan(result["pq"]) and result["n"] == 0
            assert per_class == {1: {"pq": 0.0, "sq": 0.0, "rq": 0.0}}
            raise RuntimeError("leaving the block by an exception restores it too")
    assert PQStat.pq_average is original


def test_summary_names_the_one_evaluated_dataset():
    """Issue 11 item 8: the summary of a one-dataset run (results without dataset key) named
    the dataset "-"; with the evaluated names (cfg.DATASETS.TEST) it names it."""
    results = {"panoptic_seg": {"PQ": 50.0}, "sem_seg": {"mIoU": 60.0}}
    row = format_results_summary(results, dataset_names=("my_val",)).splitlines()[2]
    assert row.startswith("| my_val ") and "50.00" in row and "60.00" in row
    several = {"a_val": results, "b_val": results}
    rows = format_results_summary(several, dataset_names=("a_val", "b_val")).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["a_val", "b_val"]
