"""Evaluators on real-format data: perfect predictions score 100, corrupted ones score less."""
import json
import logging
import os
from typing import Dict, Optional, Sequence, Set, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.structures import BitMasks, Instances

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.data.datasets import register_coco_mini_panoptic
from maskattn_d2.data.datasets.panoptic_conversion import read_panoptic_ids
from maskattn_d2.data.target_generator import panoptic_to_semantic
from maskattn_d2.evaluation import (
    InstanceSegEvaluator,
    PanopticEvaluator,
    PanopticSemSegEvaluator,
    PaperProtocolPanopticEvaluator,
    build_evaluator,
    fast_coco_eval_available,
    format_results_summary,
    load_sem_seg_gt,
    resize_ids_nearest,
)
from maskattn_d2.evaluation import build as build_module

PANOPTIC_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


# ----------------------------------------------------------------------------- helpers
def make_cfg(tmp_path, evaluators=("panoptic", "instance", "semantic"), paper_protocol=False):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.EVALUATORS = list(evaluators)
    cfg.TEST.PAPER_PROTOCOL = paper_protocol
    return cfg


def evaluator_types(evaluator) -> Sequence[type]:
    if isinstance(evaluator, DatasetEvaluators):
        return [type(e) for e in evaluator._evaluators]
    return [type(evaluator)]


def model_outputs(
    record: Dict,
    thing_ids: Set[int],
    num_classes: int,
    relabel: Optional[Dict[int, int]] = None,
    panoptic_ids: Optional[np.ndarray] = None,
) -> Tuple[Dict, Dict]:
    """A dataset dict's (input, output) pair, the output built from its ground truth.

    Args:
        record: detectron2 panoptic dataset dict (contiguous category ids).
        thing_ids: contiguous ids of the thing classes.
        num_classes: K, the number of unified classes.
        relabel: segment id -> new contiguous class (a corrupted prediction).
        panoptic_ids: predicted id map to use instead of the ground truth PNG.

    Returns:
        The model input dict and the model output dict (sem_seg one-hot scores, instances of
        the non-crowd thing segments with score 1, panoptic_seg with all segments).
    """
    relabel = relabel or {}
    ids = read_panoptic_ids(record["pan_seg_file_name"]) if panoptic_ids is None else panoptic_ids
    present = set(np.unique(ids).tolist())
    segments = [
        dict(s, category_id=relabel.get(s["id"], s["category_id"]))
        for s in record["segments_info"]
        if s["id"] in present
    ]
    height, width = ids.shape

    labels = panoptic_to_semantic(ids, segments, ignore_label=num_classes)
    labels[labels == num_classes] = 0  # void: any class, the ground truth ignores it
    # SemSegEvaluator and the Cityscapes one only argmax the scores: uint8 saves memory.
    sem_seg = torch.zeros((num_classes, height, width), dtype=torch.uint8)
    sem_seg.scatter_(0, torch.from_numpy(labels)[None], 1)

    things = [s for s in segments if s["category_id"] in thing_ids and not s.get("iscrowd", 0)]
    masks = torch.from_numpy(ids[None] == np.array([s["id"] for s in things]).reshape(-1, 1, 1))
    instances = Instances((height, width))
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor([s["category_id"] for s in things], dtype=torch.long)
    instances.scores = torch.ones(len(things))

    segments_info = [
        {"id": s["id"], "category_id": s["category_id"], "isthing": s["category_id"] in thing_ids}
        for s in segments
    ]
    panoptic = (torch.from_numpy(ids.astype(np.int32)), segments_info)
    inputs = {
        "file_name": record["file_name"],
        "image_id": record["image_id"],
        "height": height,
        "width": width,
    }
    return inputs, {"sem_seg": sem_seg, "instances": instances, "panoptic_seg": panoptic}


def evaluate(evaluator, dataset_name: str, **output_kwargs_by_image) -> Dict:
    """reset / process every image of the dataset (one at a time) / evaluate."""
    metadata = MetadataCatalog.get(dataset_name)
    thing_ids = set(metadata.thing_dataset_id_to_contiguous_id.values())
    num_classes = len(metadata.stuff_classes)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset_name):
        kwargs = output_kwargs_by_image.get(str(record["image_id"]), {})
        inputs, outputs = model_outputs(record, thing_ids, num_classes, **kwargs)
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def largest_thing_relabel(dataset_name: str) -> Dict[str, Dict]:
    """Corruption: the largest non-crowd thing segment of the first image gets another class."""
    metadata = MetadataCatalog.get(dataset_name)
    thing_ids = sorted(set(metadata.thing_dataset_id_to_contiguous_id.values()))
    record = DatasetCatalog.get(dataset_name)[0]
    things = [
        s for s in record["segments_info"] if s["category_id"] in thing_ids and not s["iscrowd"]
    ]
    target = max(things, key=lambda s: s["area"])
    wrong = next(c for c in thing_ids if c != target["category_id"])
    return {str(record["image_id"]): {"relabel": {target["id"]: wrong}}}


# --------------------------------------------------------------------- pure functions
def test_load_sem_seg_gt_returns_writable_array(tmp_path):
    labels = np.array([[0, 1], [255, 3]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "gt.png")
    loaded = load_sem_seg_gt(str(tmp_path / "gt.png"), dtype=int)
    assert loaded.dtype == np.dtype(int)
    np.testing.assert_array_equal(loaded, labels)
    loaded[loaded == 255] = 4  # SemSegEvaluator edits the array in place
    assert loaded[1, 0] == 4
    assert load_sem_seg_gt(str(tmp_path / "gt.png")).dtype == np.uint8


@pytest.mark.parametrize(
    "src, dst", [((37, 53), (16, 16)), ((480, 640), (128, 128)), ((5, 7), (12, 13))]
)
def test_resize_ids_nearest_matches_pil_nearest(src, dst):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=src)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    pil = np.asarray(Image.fromarray(rgb).resize(dst[::-1], Image.NEAREST), dtype=np.int64)
    expected = pil[..., 0] + 256 * pil[..., 1] + 65536 * pil[..., 2]
    np.testing.assert_array_equal(resize_ids_nearest(ids, dst), expected)


# -------------------------------------------------------------------- COCO sample
def test_coco_sample_perfect_predictions_score_100(coco_mini, tmp_path):
    evaluator = build_evaluator(make_cfg(tmp_path), coco_mini)
    assert evaluator_types(evaluator) == [
        PanopticEvaluator,
        InstanceSegEvaluator,
        PanopticSemSegEvaluator,
    ]
    results = evaluate(evaluator, coco_mini)
    for key in PANOPTIC_KEYS:
        assert results["panoptic_seg"][key] == pytest.approx(100.0), key
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert results["sem_seg"]["pACC"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    # Per-class tables are labelled with the 80 thing names, not the 133 unified ones.
    assert sum(k.startswith("AP-") for k in results["segm"]) == 80


def test_coco_sample_corrupted_prediction_scores_lower(coco_mini, tmp_path):
    evaluator = build_evaluator(make_cfg(tmp_path), coco_mini)
    results = evaluate(evaluator, coco_mini, **largest_thing_relabel(coco_mini))
    assert 50.0 < results["panoptic_seg"]["PQ"] < 100.0
    assert results["panoptic_seg"]["PQ_th"] < 100.0
    assert results["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert 50.0 < results["sem_seg"]["mIoU"] < 100.0
    assert 50.0 < results["sem_seg"]["pACC"] < 100.0
    assert 50.0 < results["segm"]["AP"] < 100.0


def test_instance_evaluator_handles_interleaved_unified_ids(coco_mini_interleaved, tmp_path):
    name = coco_mini_interleaved
    thing_ids = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id.values()
    assert sorted(thing_ids) != list(range(80))  # things interleave with stuff
    # detectron2's COCOEvaluator cannot evaluate this space.
    with pytest.raises(AssertionError):
        evaluate(COCOEvaluator(name, output_dir=str(tmp_path / "plain")), name)

    evaluator = InstanceSegEvaluator(name, output_dir=str(tmp_path / "ours"), tasks=("segm",))
    assert evaluate(evaluator, name)["segm"]["AP"] == pytest.approx(100.0)


def test_instance_evaluator_drops_stuff_and_maps_to_dense_things(coco_mini_interleaved):
    metadata = MetadataCatalog.get(coco_mini_interleaved)
    evaluator = InstanceSegEvaluator(coco_mini_interleaved)
    unified = metadata.thing_dataset_id_to_contiguous_id
    person, dog = unified[1], unified[18]  # COCO dataset ids of "person" and "dog"
    wall = metadata.stuff_dataset_id_to_contiguous_id[199]  # "wall-other-merged"
    instances = Instances((4, 4))
    instances.pred_classes = torch.tensor([dog, wall, person])
    instances.scores = torch.tensor([0.9, 0.8, 0.7])
    converted = evaluator._to_thing_space(instances)
    dense = evaluator._metadata.thing_dataset_id_to_contiguous_id
    assert converted.pred_classes.tolist() == [dense[18], dense[1]]
    assert converted.scores.tolist() == pytest.approx([0.9, 0.7])
    assert sorted(dense.values()) == list(range(80))
    assert instances.pred_classes.tolist() == [dog, wall, person]  # the model's output is kept


@pytest.mark.skipif(fast_coco_eval_available(), reason="detectron2._C is built here")
def test_instance_evaluator_uses_official_cocoeval_without_detectron2_C(coco_mini):
    assert InstanceSegEvaluator(coco_mini)._use_fast_impl is False


# -------------------------------------------------------------------- paper protocol
def test_paper_protocol_perfect_predictions_and_standard_numbers_unchanged(coco_mini, tmp_path):
    cfg = make_cfg(tmp_path, evaluators=["panoptic"], paper_protocol=True)
    evaluator = build_evaluator(cfg, coco_mini)
    assert evaluator_types(evaluator) == [PanopticEvaluator, PaperProtocolPanopticEvaluator]
    corrupted = largest_thing_relabel(coco_mini)
    results = evaluate(evaluator, coco_mini, **corrupted)
    assert set(results) == {"panoptic_seg", "panoptic_seg_paper_protocol"}
    standard = evaluate(COCOPanopticEvaluator(coco_mini), coco_mini, **corrupted)
    assert results["panoptic_seg"] == standard["panoptic_seg"]

    perfect = evaluate(evaluator, coco_mini)
    for key in PANOPTIC_KEYS:
        assert perfect["panoptic_seg_paper_protocol"][key] == pytest.approx(100.0), key
    assert "PQ paper protocol" in format_results_summary(perfect)  # the summary finds it


@pytest.mark.parametrize("size", [(128, 128), (64, 96)])
def test_paper_protocol_scores_predictions_made_at_network_size(coco_mini, size, caplog):
    """A prediction made at the network size and upsampled is perfect only in the paper's view."""
    outputs = {}
    for record in DatasetCatalog.get(coco_mini):
        gt = read_panoptic_ids(record["pan_seg_file_name"])
        small = resize_ids_nearest(gt, size)
        outputs[str(record["image_id"])] = {"panoptic_ids": resize_ids_nearest(small, gt.shape)}
    paper = PaperProtocolPanopticEvaluator(coco_mini, size)
    with caplog.at_level(logging.INFO, logger="maskattn_d2"):
        both = DatasetEvaluators([COCOPanopticEvaluator(coco_mini), paper])
        results = evaluate(both, coco_mini, **outputs)
    assert results["panoptic_seg_paper_protocol"]["PQ"] == pytest.approx(100.0)
    assert results["panoptic_seg"]["PQ"] < 100.0
    assert f"PQ (paper protocol, {size[0]}x{size[1]})" in caplog.text


def test_paper_protocol_rejects_bad_size(coco_mini):
    with pytest.raises(ValueError, match="network_size"):
        PaperProtocolPanopticEvaluator(coco_mini, (0, 128))


# ------------------------------------------------------------------------ Cityscapes
def test_cityscapes_fixture_matches_create_panoptic_imgs(cityscapes_root, tmp_path):
    create_panoptic_imgs = pytest.importorskip("cityscapesscripts.preparation.createPanopticImgs")
    gt_fine = cityscapes_root / "cityscapes" / "gtFine"
    create_panoptic_imgs.convert2panoptic(str(gt_fine), str(tmp_path), setNames=["val"])
    with open(tmp_path / "cityscapes_panoptic_val.json") as f:
        reference = json.load(f)
    with open(gt_fine / "cityscapes_panoptic_val.json") as f:
        ours = json.load(f)
    assert ours == reference
    for ann in reference["annotations"]:
        name = ann["file_name"]
        ref_png = np.asarray(Image.open(tmp_path / "cityscapes_panoptic_val" / name))
        our_png = np.asarray(Image.open(gt_fine / "cityscapes_panoptic_val" / name))
        np.testing.assert_array_equal(our_png, ref_png)


def test_cityscapes_panoptic_perfect_pq(cityscapes_panoptic, tmp_path):
    evaluator = build_evaluator(make_cfg(tmp_path, evaluators=["panoptic"]), cityscapes_panoptic)
    assert evaluator_types(evaluator) == [PanopticEvaluator]
    results = evaluate(evaluator, cityscapes_panoptic)
    for key in PANOPTIC_KEYS:
        assert results["panoptic_seg"][key] == pytest.approx(100.0), key


def test_cityscapes_evaluators_perfect_predictions(cityscapes_panoptic, tmp_path):
    pytest.importorskip("cityscapesscripts")
    evaluator = build_evaluator(make_cfg(tmp_path, paper_protocol=True), cityscapes_panoptic)
    from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

    assert evaluator_types(evaluator) == [
        PanopticEvaluator,
        CityscapesInstanceEvaluator,
        CityscapesSemSegEvaluator,
        PaperProtocolPanopticEvaluator,
    ]
    results = evaluate(evaluator, cityscapes_panoptic)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["panoptic_seg_paper_protocol"]["PQ"] == pytest.approx(100.0)
    assert results["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_cityscapes_evaluators_corrupted_prediction_scores_lower(cityscapes_panoptic, tmp_path):
    pytest.importorskip("cityscapesscripts")
    cfg = make_cfg(tmp_path, evaluators=["instance", "semantic"])
    evaluator = build_evaluator(cfg, cityscapes_panoptic)
    # First frame: the car 26001 (train id 13) is predicted as a truck (train id 14).
    results = evaluate(
        evaluator, cityscapes_panoptic, frankfurt_000000_000294={"relabel": {26001: 14}}
    )
    assert 0.0 < results["sem_seg"]["IoU"] < 100.0
    assert 0.0 < results["segm"]["AP"] < 100.0


def test_cityscapes_without_cityscapesscripts_falls_back(
    cityscapes_panoptic, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(build_module, "_cityscapesscripts_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="maskattn_d2"):
        evaluator = build_evaluator(make_cfg(tmp_path), cityscapes_panoptic)
    assert evaluator_types(evaluator) == [PanopticEvaluator, PanopticSemSegEvaluator]
    assert "cityscapesscripts is not installed" in caplog.text
    results = evaluate(evaluator, cityscapes_panoptic)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_panoptic_semseg_equals_semseg_evaluator_on_label_pngs(
    cityscapes_panoptic, register_dataset
):
    """Cityscapes dicts carry labelTrainIds PNGs too: both ground truths must agree exactly."""
    metadata = MetadataCatalog.get(cityscapes_panoptic)
    records = DatasetCatalog.get(cityscapes_panoptic)
    # detectron2's SemSegEvaluator cannot use the unified metadata itself (its stuff map lacks
    # the things), so the reference runs on a plain semantic registration of the same files.
    semantic_name = register_dataset(
        "maskattn_test_cityscapes_label_pngs",
        records,
        stuff_classes=metadata.stuff_classes,
        ignore_label=metadata.ignore_label,
    )
    reference = SemSegEvaluator(
        semantic_name, distributed=False, sem_seg_loading_fn=load_sem_seg_gt
    )
    ours = PanopticSemSegEvaluator(cityscapes_panoptic, distributed=False)
    assert set(vars(reference)) <= set(vars(ours))
    for evaluator in (reference, ours):
        evaluator.reset()
    generator = torch.Generator().manual_seed(0)
    for record in records:
        height, width = np.asarray(Image.open(record["sem_seg_file_name"])).shape
        outputs = [{"sem_seg": torch.rand((19, height, width), generator=generator)}]
        for evaluator in (reference, ours):
            evaluator.process([record], outputs)
    np.testing.assert_array_equal(ours._conf_matrix, reference._conf_matrix)
    assert ours._conf_matrix[:-1, :-1].sum() > 0
    np.testing.assert_equal(ours.evaluate(), reference.evaluate())  # NaN == NaN here


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": "pan_seg_file_name"}, "not panoptic"),
        ({"metadata": {"ignore_label": 3}}, "is a class id"),
        ({"metadata": {"stuff_classes": None}}, "needs metadata 'stuff_classes'"),
        ({"category_id": 19}, "outside \\[0, 19\\)"),
    ],
)
def test_panoptic_semseg_rejects_bad_datasets(
    cityscapes_panoptic, register_dataset, change, message
):
    metadata = MetadataCatalog.get(cityscapes_panoptic)
    records = [dict(r) for r in DatasetCatalog.get(cityscapes_panoptic)]
    if "drop" in change:
        del records[0][change["drop"]]
    if "category_id" in change:
        records[0]["segments_info"] = [dict(records[0]["segments_info"][0], category_id=19)]
    fields = {"stuff_classes": metadata.stuff_classes, "ignore_label": 255}
    fields.update(change.get("metadata", {}))
    name = register_dataset(
        "maskattn_test_bad_panoptic", records, **{k: v for k, v in fields.items() if v is not None}
    )
    with pytest.raises(ValueError, match=message):
        PanopticSemSegEvaluator(name)


# ---------------------------------------------------------------------- dispatch
def test_build_evaluator_unknown_type_raises(register_dataset, tmp_path):
    name = register_dataset("maskattn_test_unknown_type", [], evaluator_type="lvis_magic")
    with pytest.raises(ValueError, match="maskattn_test_unknown_type.*lvis_magic"):
        build_evaluator(make_cfg(tmp_path), name)


def test_build_evaluator_rejects_unknown_evaluator_names(coco_mini, tmp_path):
    with pytest.raises(ValueError, match="panoptics"):
        build_evaluator(make_cfg(tmp_path, evaluators=["panoptics"]), coco_mini)
    with pytest.raises(ValueError, match="selects no evaluator"):
        build_evaluator(make_cfg(tmp_path, evaluators=[]), coco_mini)


def test_build_evaluator_sem_seg_type(cityscapes_panoptic, register_dataset, tmp_path):
    records = [
        {"file_name": r["file_name"], "sem_seg_file_name": r["sem_seg_file_name"]}
        for r in DatasetCatalog.get(cityscapes_panoptic)
    ]
    metadata = MetadataCatalog.get(cityscapes_panoptic)
    name = register_dataset(
        "maskattn_test_sem_seg",
        records,
        evaluator_type="sem_seg",
        stuff_classes=metadata.stuff_classes,
        ignore_label=255,
    )
    evaluator = build_evaluator(make_cfg(tmp_path, paper_protocol=True), name)
    assert type(evaluator) is SemSegEvaluator
    assert evaluator.sem_seg_loading_fn is load_sem_seg_gt
    evaluator.reset()
    for record in records:
        labels = torch.from_numpy(load_sem_seg_gt(record["sem_seg_file_name"], dtype=np.int64))
        scores = torch.nn.functional.one_hot(labels.clamp(max=18), 19).permute(2, 0, 1).float()
        evaluator.process([record], [{"sem_seg": scores}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize("has_scripts", [True, False])
def test_build_evaluator_cityscapes_sem_seg_type(
    cityscapes_panoptic, register_dataset, has_scripts, tmp_path, monkeypatch
):
    if has_scripts:
        pytest.importorskip("cityscapesscripts")
    from detectron2.evaluation import CityscapesSemSegEvaluator

    monkeypatch.setattr(build_module, "_cityscapesscripts_available", lambda: has_scripts)
    metadata = MetadataCatalog.get(cityscapes_panoptic)
    name = register_dataset(
        "maskattn_test_cityscapes_sem_seg",
        [dict(r) for r in DatasetCatalog.get(cityscapes_panoptic)],
        evaluator_type="cityscapes_sem_seg",
        stuff_classes=metadata.stuff_classes,
        ignore_label=255,
        gt_dir=metadata.gt_dir,
    )
    evaluator = build_evaluator(make_cfg(tmp_path), name)
    assert type(evaluator) is (CityscapesSemSegEvaluator if has_scripts else SemSegEvaluator)


def test_build_evaluator_coco_instances_type(
    coco_mini, coco_mini_instances_json, register_dataset, tmp_path
):
    """A things-only ("coco") metadata: predicted classes are already 0..79."""
    name = register_dataset(
        "maskattn_test_coco_instances",
        DatasetCatalog.get(coco_mini),
        evaluator_type="coco",
        json_file=coco_mini_instances_json,
        **_get_builtin_metadata("coco"),
    )
    # coco_panoptic_standard numbers the 80 things 0..79 first, as the "coco" metadata does.
    things_first = MetadataCatalog.get(coco_mini).thing_dataset_id_to_contiguous_id
    assert things_first == MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator = build_evaluator(make_cfg(tmp_path), name)
    assert type(evaluator) is InstanceSegEvaluator
    evaluator.reset()
    for record in DatasetCatalog.get(coco_mini):
        inputs, outputs = model_outputs(record, set(range(80)), 133)
        evaluator.process([inputs], [{"instances": outputs["instances"]}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_build_evaluator_on_the_data_packages_coco_sample(tmp_path, monkeypatch):
    """The data package's registration: its instances json is derived on demand."""
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    name = "maskattn_test_coco_mini_data_package"
    assert register_coco_mini_panoptic(name)
    try:
        json_file = MetadataCatalog.get(name).json_file
        assert json_file.startswith(str(tmp_path)) and not os.path.exists(json_file)
        evaluator = build_evaluator(make_cfg(tmp_path), name)
        assert os.path.isfile(json_file)
        assert evaluator_types(evaluator) == [
            PanopticEvaluator,
            InstanceSegEvaluator,
            PanopticSemSegEvaluator,
        ]
        results = evaluate(evaluator, name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize("json_file", [None, "missing/instances.json"])
def test_build_evaluator_skips_instances_without_json(
    register_coco_sample, json_file, tmp_path, caplog
):
    name = register_coco_sample(
        "maskattn_test_coco_mini_no_json",
        _get_builtin_metadata("coco_panoptic_standard"),
        None if json_file is None else str(tmp_path / json_file),
    )
    with caplog.at_level(logging.WARNING, logger="maskattn_d2"):
        evaluator = build_evaluator(make_cfg(tmp_path), name)
    assert evaluator_types(evaluator) == [PanopticEvaluator, PanopticSemSegEvaluator]
    assert "instance ap is skipped" in caplog.text.lower()
