"""The conversion functions of datasets/prepare_*.py on tiny hand-made inputs."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools.coco import COCO

from maskattn_d2.data.datasets import (
    check_panoptic_dataset,
    load_panoptic_json,
    panoptic_metadata,
)
from maskattn_d2.data.datasets.ade20k_categories import ADE20K_150_CATEGORIES

SCRIPTS = Path(__file__).resolve().parents[2] / "datasets"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


ade = _load_script("prepare_ade20k_panoptic")
coco_sem = _load_script("prepare_coco_semantic_from_panoptic")


# ---------------------------------------------------------------------------------- ADE20K
def _ade_sample():
    """6x8 semantic + instance maps: wall/sky stuff, a bed partly without instance, 2 people."""
    semantic = np.zeros((6, 8), dtype=np.uint8)
    semantic[0:3, :] = 1  # wall (ADE id 0)
    semantic[3:6, :] = 3  # sky (ADE id 2)
    semantic[0:3, 4:8] = 8  # bed (ADE id 7, a thing)
    semantic[5, 3] = 0  # "other": void
    instance = np.zeros((6, 8, 3), dtype=np.uint8)
    instance[0:2, 4:8] = (1, 1, 0)  # instance class 1 = bed, index 1 (row 2 has none)
    instance[4:6, 0:2] = (4, 1, 0)  # instance class 4 = person (ADE id 12), index 1
    instance[4:6, 6:8] = (4, 2, 0)  # person, index 2
    return semantic, instance


def test_ade20k_to_panoptic():
    pan, segments = ade.ade20k_to_panoptic(*_ade_sample())
    expected = np.array(
        [
            [1, 1, 1, 1, 3, 3, 3, 3],
            [1, 1, 1, 1, 3, 3, 3, 3],
            [1, 1, 1, 1, 0, 0, 0, 0],  # bed pixels without an instance are void
            [2, 2, 2, 2, 2, 2, 2, 2],
            [4, 4, 2, 2, 2, 2, 5, 5],
            [4, 4, 2, 0, 2, 2, 5, 5],
        ]
    )
    np.testing.assert_array_equal(pan, expected)
    assert [(s["id"], s["category_id"]) for s in segments] == [
        (1, 0), (2, 2), (3, 7), (4, 12), (5, 12)
    ]
    assert all(s["iscrowd"] == 0 for s in segments)


def test_ade20k_to_panoptic_rejects_bad_input():
    semantic, instance = _ade_sample()
    instance[0, 0] = (101, 1, 0)
    with pytest.raises(ValueError, match="instance class 101"):
        ade.ade20k_to_panoptic(semantic, instance)
    with pytest.raises(ValueError, match="expected"):
        ade.ade20k_to_panoptic(semantic, instance[..., 0])


def _write_raw_ade20k(root: Path, split_dir: str, stems):
    semantic, instance = _ade_sample()
    for sub in ("images", "annotations", "annotations_instance"):
        (root / sub / split_dir).mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(stems):
        sem = np.roll(semantic, k, axis=1)  # make the images differ
        ins = np.roll(instance, k, axis=1)
        image = Image.fromarray(np.full((6, 8, 3), 90, np.uint8))
        image.save(root / "images" / split_dir / f"{stem}.jpg")
        Image.fromarray(sem).save(root / "annotations" / split_dir / f"{stem}.png")
        Image.fromarray(ins).save(root / "annotations_instance" / split_dir / f"{stem}.png")


@pytest.mark.parametrize("workers", [1, 2])
def test_convert_ade20k_split(tmp_path, workers):
    root = tmp_path / "ADEChallengeData2016"
    _write_raw_ade20k(root, "validation", ["ADE_val_00000001", "ADE_val_00000002"])
    assert ade.convert_ade20k_split(str(root), "val", workers=workers) == 2

    panoptic = json.loads((root / "ade20k_panoptic_val.json").read_text())
    assert panoptic["categories"] == ADE20K_150_CATEGORIES
    assert [img["id"] for img in panoptic["images"]] == ["ADE_val_00000001", "ADE_val_00000002"]
    meta = panoptic_metadata(ADE20K_150_CATEGORIES)
    dicts = load_panoptic_json(
        str(root / "ade20k_panoptic_val.json"),
        str(root / "images" / "validation"),
        str(root / "ade20k_panoptic_val"),
        meta,
        sem_seg_root=str(root / "ade20k_panoptic_semseg_val"),
    )
    assert check_panoptic_dataset(dicts, read_files=True) == 2
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(root / "ade20k_panoptic_val" / ann["file_name"])))
        for seg in ann["segments_info"]:
            assert seg["area"] == int((ids == seg["id"]).sum())

    # semantic PNG: things first (bed -> 0, person -> 3), wall -> 100, sky -> 102, void 255
    sem = np.asarray(Image.open(root / "ade20k_panoptic_semseg_val" / "ADE_val_00000001.png"))
    assert sem[0, 0] == 100 and sem[0, 4] == 0 and sem[2, 4] == 255
    assert sem[3, 3] == 102 and sem[4, 0] == 3 and sem[5, 3] == 255

    coco = COCO(str(root / "ade20k_instance_val.json"))
    assert len(coco.getCatIds()) == 100
    anns = coco.loadAnns(coco.getAnnIds(imgIds=["ADE_val_00000001"]))
    assert sorted(a["category_id"] for a in anns) == [7, 12, 12]
    assert sorted(a["area"] for a in anns) == [4, 4, 8]
    assert len({a["id"] for a in coco.loadAnns(coco.getAnnIds())}) == 6  # unique ids


def test_convert_ade20k_split_reports_missing_files(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write_raw_ade20k(root, "training", ["ADE_train_00000001"])
    (root / "annotations_instance" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001.png"):
        ade.convert_ade20k_split(str(root), "train")
    with pytest.raises(FileNotFoundError, match="validation"):
        ade.convert_ade20k_split(str(root), "val")


# ---------------------------------------------------------------- COCO panoptic -> semantic
def _write_tiny_coco_panoptic(coco_root: Path):
    """COCO panoptic val2017 with 2 images; categories interleave things and stuff."""
    pan_dir = coco_root / "panoptic_val2017"
    pan_dir.mkdir(parents=True)
    (coco_root / "annotations").mkdir()
    a = np.zeros((4, 5), dtype=np.int32)
    a[:2] = 100  # stuff 92
    a[2:, :3] = 200  # thing 5
    a[2:, 3:] = 300  # crowd of thing 3
    b = np.full((3, 3), 400, dtype=np.int32)  # thing 3
    b[1, 1] = 500  # an id without a segment: void
    Image.fromarray(id2rgb(a)).save(pan_dir / "a.png")
    Image.fromarray(id2rgb(b)).save(pan_dir / "b.png")
    data = {
        "images": [],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "a.png",
                "segments_info": [
                    {"id": 100, "category_id": 92, "iscrowd": 0},
                    {"id": 200, "category_id": 5, "iscrowd": 0},
                    {"id": 300, "category_id": 3, "iscrowd": 1},
                ],
            },
            {
                "image_id": 2,
                "file_name": "b.png",
                "segments_info": [{"id": 400, "category_id": 3, "iscrowd": 0}],
            },
        ],
        "categories": [
            {"id": 3, "name": "c", "isthing": 1},
            {"id": 92, "name": "b", "isthing": 0},
            {"id": 5, "name": "a", "isthing": 1},
        ],
    }
    (coco_root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    # things first in json order: 3 -> 0, 5 -> 1; then stuff 92 -> 2
    expected_a = np.array([[2] * 5, [2] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    expected_b = np.array([[0, 0, 0], [0, 255, 0], [0, 0, 0]])
    return expected_a, expected_b


@pytest.mark.parametrize("workers", [1, 2])
def test_convert_panoptic_to_semantic(tmp_path, workers):
    expected_a, expected_b = _write_tiny_coco_panoptic(tmp_path / "coco")
    out = tmp_path / "out"
    count = coco_sem.convert_panoptic_to_semantic(
        str(tmp_path / "coco" / "annotations" / "panoptic_val2017.json"),
        str(tmp_path / "coco" / "panoptic_val2017"),
        str(out),
        workers=workers,
    )
    assert count == 2
    a = np.asarray(Image.open(out / "a.png"))
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b.png")), expected_b)


def test_coco_semantic_main_uses_the_coco_layout(tmp_path):
    expected_a, _ = _write_tiny_coco_panoptic(tmp_path / "coco")
    coco_sem.main(["--root", str(tmp_path / "coco"), "--splits", "val2017", "--workers", "1"])
    written = np.asarray(Image.open(tmp_path / "coco" / "panoptic_semseg_val2017" / "a.png"))
    np.testing.assert_array_equal(written, expected_a)


def test_coco_semantic_rejects_unknown_category(tmp_path):
    _write_tiny_coco_panoptic(tmp_path / "coco")
    json_file = tmp_path / "coco" / "annotations" / "panoptic_val2017.json"
    data = json.loads(json_file.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 77
    json_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"b\.png.*unknown category id 77"):
        coco_sem.convert_panoptic_to_semantic(
            str(json_file), str(tmp_path / "coco" / "panoptic_val2017"), str(tmp_path / "out")
        )
