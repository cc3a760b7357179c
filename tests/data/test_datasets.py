"""Dataset registration (synthetic, COCO sample, ADE20K), loading and file checks."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools.coco import COCO

from maskattn_d2.data.datasets import (
    check_panoptic_dataset,
    ensure_instances_json,
    load_panoptic_json,
    panoptic_metadata,
    register_ade20k_panoptic,
    register_all_maskattn_datasets,
    register_coco_mini_panoptic,
    register_panoptic_dataset,
    register_synthetic_panoptic,
)
from maskattn_d2.data.datasets.ade20k_categories import ADE20K_150_CATEGORIES
from maskattn_d2.data.datasets.panoptic_conversion import convert_panoptic_annotations
from maskattn_d2.data.target_generator import panoptic_to_semantic

COCO_MINI = Path(__file__).resolve().parents[2] / "datasets" / "coco_panoptic_val2017_mini"
STANDARD = _get_builtin_metadata("coco_panoptic_standard")


@pytest.fixture
def unregister():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _check_evaluator_metadata(meta, num_classes, num_things):
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    assert len(meta.stuff_classes) == len(meta.stuff_colors) == num_classes
    assert len(meta.thing_classes) == len(meta.thing_colors) == num_things
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(num_things))
    assert sorted(meta.stuff_dataset_id_to_contiguous_id.values()) == list(range(num_classes))
    for key in ("panoptic_root", "panoptic_json", "json_file", "sem_seg_root", "image_root"):
        assert isinstance(meta.get(key), str)


# ----------------------------------------------------------------------------- metadata
def test_panoptic_metadata_puts_things_first():
    cats = [
        {"id": 5, "name": "wall", "isthing": 0, "color": [1, 2, 3]},
        {"id": 9, "name": "cat", "isthing": 1, "color": [4, 5, 6]},
        {"id": 2, "name": "sky", "isthing": 0},
        {"id": 7, "name": "dog", "isthing": 1, "color": [7, 8, 9]},
    ]
    meta = panoptic_metadata(cats)
    assert meta["thing_classes"] == ["cat", "dog"]
    assert meta["stuff_classes"] == ["cat", "dog", "wall", "sky"]
    assert meta["thing_dataset_id_to_contiguous_id"] == {9: 0, 7: 1}
    assert meta["stuff_dataset_id_to_contiguous_id"] == {9: 0, 7: 1, 5: 2, 2: 3}
    assert meta["thing_colors"] == [[4, 5, 6], [7, 8, 9]]
    assert len(meta["stuff_colors"][3]) == 3  # colour made up for "sky"
    with pytest.raises(ValueError, match="unique"):
        panoptic_metadata(cats + [cats[0]])


def test_coco_metadata_matches_detectron2_standard():
    meta = panoptic_metadata(COCO_CATEGORIES)
    thing_map = STANDARD["thing_dataset_id_to_contiguous_id"]
    assert meta["thing_dataset_id_to_contiguous_id"] == thing_map
    stuff = STANDARD["stuff_dataset_id_to_contiguous_id"]
    assert {k: meta["stuff_dataset_id_to_contiguous_id"][k] for k in stuff} == stuff
    assert meta["stuff_classes"] == STANDARD["stuff_classes"]
    assert meta["thing_classes"] == STANDARD["thing_classes"][:80]
    # The sample's own category file defines the same classes.
    sample = json.loads((COCO_MINI / "annotations" / "panoptic_coco_categories.json").read_text())
    assert panoptic_metadata(sample) == meta


# ---------------------------------------------------------------------------- registration
def test_register_all_is_idempotent_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    register_all_maskattn_datasets()
    register_all_maskattn_datasets()
    names = set(DatasetCatalog.list())
    for name in (
        "maskattn_synthetic_panoptic_train",
        "maskattn_synthetic_panoptic_val",
        "coco_mini_panoptic_val",
        "ade20k_panoptic_train",
        "ade20k_panoptic_val",
    ):
        assert name in names
    for name in ("coco_2017_val_panoptic", "cityscapes_fine_panoptic_val"):
        assert name in names  # detectron2's own, untouched
    assert MetadataCatalog.get("coco_2017_val_panoptic").thing_classes == STANDARD["thing_classes"]
    assert list(tmp_path.iterdir()) == []  # registration reads and writes no file
    _check_evaluator_metadata(MetadataCatalog.get("maskattn_synthetic_panoptic_val"), 6, 3)
    _check_evaluator_metadata(MetadataCatalog.get("ade20k_panoptic_val"), 150, 100)


def test_tiny_synthetic_registration(tmp_path, unregister):
    root = tmp_path / "synthetic"
    names = register_synthetic_panoptic("test_tiny_synth", str(root), num_train=5, num_val=3)
    unregister += names
    assert names == ["test_tiny_synth_train", "test_tiny_synth_val"]
    assert not root.exists()  # generated on first use

    dicts = DatasetCatalog.get("test_tiny_synth_train")
    assert len(dicts) == 5
    meta = MetadataCatalog.get("test_tiny_synth_train")
    _check_evaluator_metadata(meta, 6, 3)
    assert meta.thing_classes == ["circle", "square", "triangle"]
    assert meta.stuff_classes == ["circle", "square", "triangle", "sky", "grass", "road"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert meta.panoptic_root == str(root / "annotations" / "panoptic_train")
    assert meta.panoptic_json == str(root / "annotations" / "panoptic_train.json")
    assert meta.json_file == str(root / "annotations" / "instances_train.json")
    for d in dicts:
        assert set(d) >= {
            "file_name", "image_id", "height", "width", "pan_seg_file_name", "segments_info"
        }
        with Image.open(d["file_name"]) as img:
            assert img.size == (d["width"], d["height"])
        for seg in d["segments_info"]:
            assert 0 <= seg["category_id"] < 6
            assert seg["isthing"] == (seg["category_id"] < 3)
            assert set(seg) >= {"id", "iscrowd", "area", "bbox"}
    assert check_panoptic_dataset("test_tiny_synth_val", read_files=True) == 3

    path = ensure_instances_json("test_tiny_synth_val")
    assert path == MetadataCatalog.get("test_tiny_synth_val").json_file
    assert len(COCO(path).getImgIds()) == 3


def test_synthetic_paths_follow_the_cache_variable(tmp_path, monkeypatch, unregister):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "first"))
    unregister += register_synthetic_panoptic("test_lazy_synth", num_train=2, num_val=1)
    assert MetadataCatalog.get("test_lazy_synth_val").json_file.startswith(str(tmp_path / "first"))
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "second"))
    dicts = DatasetCatalog.get("test_lazy_synth_val")
    assert dicts[0]["file_name"].startswith(str(tmp_path / "second"))
    meta = MetadataCatalog.get("test_lazy_synth_val")
    assert meta.json_file.startswith(str(tmp_path / "second"))  # metadata follows the data
    assert Path(meta.json_file).is_file()
    assert not (tmp_path / "first").exists()


def test_coco_mini_registration(tmp_path, monkeypatch):
    register_all_maskattn_datasets()
    # Set after registration: resolved again when the dataset is loaded.
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    dicts = DatasetCatalog.get("coco_mini_panoptic_val")
    meta = MetadataCatalog.get("coco_mini_panoptic_val")
    assert len(dicts) == 3
    _check_evaluator_metadata(meta, 133, 80)
    assert meta.thing_dataset_id_to_contiguous_id == STANDARD["thing_dataset_id_to_contiguous_id"]
    assert meta.panoptic_json == str(COCO_MINI / "annotations" / "panoptic_val2017.json")
    assert meta.json_file.startswith(str(tmp_path / "cache"))
    assert check_panoptic_dataset("coco_mini_panoptic_val", read_files=True) == 3

    panoptic = json.loads(Path(meta.panoptic_json).read_text())
    thing_segments = [
        s
        for a in panoptic["annotations"]
        for s in a["segments_info"]
        if s["category_id"] in STANDARD["thing_dataset_id_to_contiguous_id"]
    ]
    coco = COCO(ensure_instances_json("coco_mini_panoptic_val"))
    assert len(coco.getCatIds()) == 80
    assert len(coco.getAnnIds(iscrowd=None)) == len(thing_segments) == 48
    assert len(coco.getAnnIds(iscrowd=True)) == 3

    for d in dicts:  # derived semantic PNGs agree with the panoptic annotation
        ids = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        np.testing.assert_array_equal(sem, panoptic_to_semantic(ids, d["segments_info"]))
        assert (d["height"], d["width"]) == sem.shape


def test_coco_mini_root_override(tmp_path, monkeypatch, unregister):
    copy = tmp_path / "mini_copy"
    shutil.copytree(COCO_MINI, copy)
    monkeypatch.setenv("MASKATTN_D2_COCO_MINI", str(copy))
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    register_coco_mini_panoptic("test_coco_mini_copy")
    unregister.append("test_coco_mini_copy")
    dicts = DatasetCatalog.get("test_coco_mini_copy")
    assert all(d["file_name"].startswith(str(copy)) for d in dicts)


# ---------------------------------------------------------------------------------- ADE20K
def _write_ade20k_panoptic_tree(datasets_root: Path):
    """Two validation images in Mask2Former's ADE20K panoptic layout, written by hand."""
    base = datasets_root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "ade20k_panoptic_val").mkdir()
    (base / "ade20k_panoptic_semseg_val").mkdir()
    images, annotations = [], []
    # per image: list of (segment id, ADE category id, rows, cols)
    layouts = {
        "ADE_val_00000001": (
            (40, 60),
            [(1, 0, slice(0, 40), slice(0, 60)), (2, 7, slice(5, 20), slice(5, 30))],
        ),
        "ADE_val_00000002": (
            (50, 70),
            [
                (1, 2, slice(0, 25), slice(0, 70)),
                (2, 6, slice(25, 50), slice(0, 70)),
                (3, 12, slice(10, 40), slice(30, 40)),
                (4, 12, slice(10, 40), slice(50, 60)),
            ],
        ),
    }
    for stem, ((h, w), segs) in layouts.items():
        pan = np.zeros((h, w), dtype=np.int32)
        for seg_id, _, rows, cols in segs:
            pan[rows, cols] = seg_id
        Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(
            base / "images" / "validation" / f"{stem}.jpg"
        )
        Image.fromarray(id2rgb(pan)).save(base / "ade20k_panoptic_val" / f"{stem}.png")
        Image.fromarray(np.zeros((h, w), np.uint8)).save(
            base / "ade20k_panoptic_semseg_val" / f"{stem}.png"
        )
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": h, "width": w})
        annotations.append(
            {
                "image_id": stem,
                "file_name": f"{stem}.png",
                "segments_info": [
                    {"id": s, "category_id": c, "iscrowd": 0, "area": int((pan == s).sum())}
                    for s, c, _, _ in segs
                ],
            }
        )
    panoptic = {"images": images, "annotations": annotations}
    panoptic["categories"] = ADE20K_150_CATEGORIES
    (base / "ade20k_panoptic_val.json").write_text(json.dumps(panoptic))
    (base / "ade20k_instance_val.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": []})
    )
    return base


def test_ade20k_registration(tmp_path, monkeypatch):
    base = _write_ade20k_panoptic_tree(tmp_path)
    register_ade20k_panoptic()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("ade20k_panoptic_val")
    assert [d["image_id"] for d in dicts] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert dicts[0]["file_name"] == str(base / "images" / "validation" / "ADE_val_00000001.jpg")
    assert (dicts[1]["height"], dicts[1]["width"]) == (50, 70)
    # Things first: bed (ADE 7) -> 0, person (ADE 12) -> 3; wall (0) -> 100, sky (2) -> 102.
    cats = [(s["category_id"], s["isthing"]) for s in dicts[0]["segments_info"]]
    assert cats == [(100, False), (0, True)]
    cats = [(s["category_id"], s["isthing"]) for s in dicts[1]["segments_info"]]
    assert cats == [(102, False), (106, False), (3, True), (3, True)]

    meta = MetadataCatalog.get("ade20k_panoptic_val")
    _check_evaluator_metadata(meta, 150, 100)
    assert meta.panoptic_json == str(base / "ade20k_panoptic_val.json")
    assert meta.stuff_classes[100] == "wall" and meta.thing_classes[3] == "person"
    assert ensure_instances_json("ade20k_panoptic_val") == str(base / "ade20k_instance_val.json")
    assert check_panoptic_dataset("ade20k_panoptic_val", read_files=True) == 2

    with pytest.raises(FileNotFoundError, match="ade20k_panoptic_train.json"):
        DatasetCatalog.get("ade20k_panoptic_train")
    with pytest.raises(FileNotFoundError, match="ade20k_instance_train.json"):
        ensure_instances_json("ade20k_panoptic_train")


# ------------------------------------------------------------------------------- bad data
@pytest.fixture
def tiny_panoptic(tmp_path):
    """One 8x10 image in COCO panoptic format (category 1 thing, 2 stuff)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "pan").mkdir()
    pan = np.full((8, 10), 7, dtype=np.int32)
    pan[2:5, 2:6] = 9
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(id2rgb(pan)).save(tmp_path / "pan" / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 10}],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "a.png",
                "segments_info": [{"id": 7, "category_id": 2}, {"id": 9, "category_id": 1}],
            }
        ],
        "categories": [
            {"id": 1, "name": "thing", "isthing": 1},
            {"id": 2, "name": "stuff", "isthing": 0},
        ],
    }
    json_file = tmp_path / "panoptic.json"
    json_file.write_text(json.dumps(data))

    def load(mutate=None):
        d = json.loads(json.dumps(data))
        if mutate:
            mutate(d)
        json_file.write_text(json.dumps(d))
        return load_panoptic_json(
            str(json_file),
            str(tmp_path / "images"),
            str(tmp_path / "pan"),
            panoptic_metadata(data["categories"]),
        )

    return tmp_path, load


def test_loader_builds_contiguous_dicts(tiny_panoptic):
    root, load = tiny_panoptic
    (d,) = load()
    assert d["file_name"] == str(root / "images" / "a.jpg")
    assert [(s["id"], s["category_id"], s["isthing"]) for s in d["segments_info"]] == [
        (7, 1, False),
        (9, 0, True),
    ]
    assert check_panoptic_dataset([d], read_files=True) == 1
    assert "sem_seg_file_name" not in d

    sem_dir = root / "sem"

    def load_with_semantic_root():
        return load_panoptic_json(
            str(root / "panoptic.json"),
            str(root / "images"),
            str(root / "pan"),
            panoptic_metadata([{"id": 1, "name": "t", "isthing": 1}, {"id": 2, "name": "s"}]),
            sem_seg_root=str(sem_dir),
        )

    assert "sem_seg_file_name" not in load_with_semantic_root()[0]  # no such folder yet
    sem_dir.mkdir()
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(sem_dir / "a.png")
    assert load_with_semantic_root()[0]["sem_seg_file_name"] == str(sem_dir / "a.png")


def test_loader_and_checks_name_the_bad_file(tiny_panoptic):
    root, load = tiny_panoptic

    def unknown_category(d):
        d["annotations"][0]["segments_info"][0]["category_id"] = 55

    with pytest.raises(ValueError, match=r"panoptic\.json.*a\.png.*unknown category id 55"):
        load(unknown_category)

    (d,) = load()
    with pytest.raises(ValueError, match=r"a\.png.*unknown category id 5"):
        bad = dict(d, segments_info=[dict(d["segments_info"][0], category_id=5)])
        check_panoptic_dataset([bad], num_classes=2)
    absent = dict(d, segments_info=d["segments_info"] + [{"id": 11, "category_id": 0}])
    with pytest.raises(ValueError, match=r"a\.png.*\[11\] do not occur"):
        check_panoptic_dataset([absent], read_files=True)
    (root / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"a\.jpg"):
        check_panoptic_dataset([d], read_files=True)
    (root / "images" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.jpg"):
        load()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "images" / "a.jpg")
    (root / "pan" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        load()
    with pytest.raises(ValueError, match="empty"):
        check_panoptic_dataset([])


def test_register_own_dataset_as_in_the_readme(tiny_panoptic, unregister):
    root, _ = tiny_panoptic
    data = json.loads((root / "panoptic.json").read_text())
    convert_panoptic_annotations(data, str(root / "pan"), instances_json=str(root / "inst.json"))
    paths = {
        "image_root": str(root / "images"),
        "panoptic_root": str(root / "pan"),
        "panoptic_json": str(root / "panoptic.json"),
        "json_file": str(root / "inst.json"),
    }
    assert register_panoptic_dataset("test_own_ds", panoptic_metadata(data["categories"]), paths)
    unregister.append("test_own_ds")
    assert not register_panoptic_dataset("test_own_ds", {}, paths)  # already there: no-op
    (d,) = DatasetCatalog.get("test_own_ds")
    assert "sem_seg_file_name" not in d
    assert ensure_instances_json("test_own_ds") == str(root / "inst.json")
    assert len(COCO(str(root / "inst.json")).getAnnIds()) == 1
    with pytest.raises(ValueError, match="unknown"):
        register_panoptic_dataset("test_bad_paths", {}, dict(paths, images="x"))
    assert "test_bad_paths" not in DatasetCatalog.list()
