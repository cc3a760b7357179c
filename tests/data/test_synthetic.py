"""The synthetic panoptic generator: determinism, COCO panoptic conventions, reuse."""
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO

from maskattn_d2.data.datasets import (
    SYNTHETIC_CATEGORIES,
    generate_synthetic_panoptic,
    panoptic_metadata,
    render_scene,
)
from detectron2.data import DatasetCatalog, MetadataCatalog

from maskattn_d2.data.datasets import register_all_maskattn_datasets, register_synthetic_panoptic
from maskattn_d2.data.datasets.panoptic_conversion import build_directory_once
from maskattn_d2.data.datasets.register_synthetic import synthetic_root as cache_root
from maskattn_d2.data.target_generator import panoptic_to_semantic

SMALL = dict(num_train=8, num_val=4, seed=0)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_panoptic(str(root), **SMALL)
    return root


def _files(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout(synthetic_root):
    ann = synthetic_root / "annotations"
    for split, n in (("train", 8), ("val", 4)):
        assert len(list((synthetic_root / split).glob("*.jpg"))) == n
        assert len(list((ann / f"panoptic_{split}").glob("*.png"))) == n
        assert len(list((ann / f"panoptic_semseg_{split}").glob("*.png"))) == n
        assert (ann / f"panoptic_{split}.json").is_file()
        assert (ann / f"instances_{split}.json").is_file()


def test_generation_is_deterministic(synthetic_root, tmp_path):
    again = tmp_path / "again"
    generate_synthetic_panoptic(str(again), **SMALL)
    assert _files(again) == _files(synthetic_root)
    for rel in _files(synthetic_root):
        assert (again / rel).read_bytes() == (synthetic_root / rel).read_bytes(), rel

    other = tmp_path / "other_seed"
    generate_synthetic_panoptic(str(other), **dict(SMALL, seed=1))
    rel = Path("annotations/panoptic_train.json")
    assert (other / rel).read_bytes() != (synthetic_root / rel).read_bytes()


def test_image_i_does_not_depend_on_the_split_size(synthetic_root, tmp_path):
    fewer = tmp_path / "fewer"
    generate_synthetic_panoptic(str(fewer), num_train=3, num_val=2, seed=0)
    for rel in ("train/000003.jpg", "val/000002.jpg", "annotations/panoptic_train/000001.png"):
        assert (fewer / rel).read_bytes() == (synthetic_root / rel).read_bytes()


def test_panopticapi_conventions(synthetic_root):
    categories = {c["id"]: c for c in SYNTHETIC_CATEGORIES}
    ann_dir = synthetic_root / "annotations"
    seen_categories, void_pixels = set(), 0
    for split in ("train", "val"):
        data = json.loads((ann_dir / f"panoptic_{split}.json").read_text())
        assert data["categories"] == SYNTHETIC_CATEGORIES
        images = {img["id"]: img for img in data["images"]}
        assert len(images) == len(data["annotations"])
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            assert 128 <= img["height"] <= 160 and 128 <= img["width"] <= 192
            with Image.open(synthetic_root / split / img["file_name"]) as jpg:
                assert jpg.format == "JPEG" and jpg.size == (img["width"], img["height"])
            png = np.asarray(Image.open(ann_dir / f"panoptic_{split}" / ann["file_name"]))
            assert png.dtype == np.uint8 and png.shape == (img["height"], img["width"], 3)
            ids = rgb2id(png)
            present = set(np.unique(ids).tolist()) - {0}
            assert present == {s["id"] for s in ann["segments_info"]}
            void_pixels += int((ids == 0).sum())
            for seg in ann["segments_info"]:
                mask = ids == seg["id"]
                assert seg["area"] == int(mask.sum())
                ys, xs = np.nonzero(mask)
                x, y, w, h = seg["bbox"]
                assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
                assert seg["category_id"] in categories
                seen_categories.add(seg["category_id"])
    assert seen_categories == set(categories)
    assert void_pixels > 0  # some void, as promised


def test_instances_json_matches_panoptic(synthetic_root):
    ann_dir = synthetic_root / "annotations"
    coco = COCO(str(ann_dir / "instances_train.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    panoptic = json.loads((ann_dir / "panoptic_train.json").read_text())
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(ann_dir / "panoptic_train" / ann["file_name"])))
        things = [s for s in ann["segments_info"] if s["category_id"] in (1, 2, 3)]
        instances = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]], iscrowd=None))
        assert len(instances) == len(things) > 0
        for seg, inst in zip(things, instances):
            assert inst["category_id"] == seg["category_id"]
            assert inst["iscrowd"] == seg["iscrowd"]
            mask = mask_util.decode(inst["segmentation"]).astype(bool)
            np.testing.assert_array_equal(mask, ids == seg["id"])
            assert inst["area"] == seg["area"] and inst["bbox"] == seg["bbox"]


def test_semantic_pngs_use_contiguous_ids(synthetic_root):
    ann_dir = synthetic_root / "annotations"
    to_label = panoptic_metadata(SYNTHETIC_CATEGORIES)["stuff_dataset_id_to_contiguous_id"]
    assert to_label == {1: 0, 2: 1, 3: 2, 101: 3, 102: 4, 103: 5}  # things first
    panoptic = json.loads((ann_dir / "panoptic_val.json").read_text())
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(ann_dir / "panoptic_val" / ann["file_name"])))
        segs = [dict(s, category_id=to_label[s["category_id"]]) for s in ann["segments_info"]]
        sem = np.asarray(Image.open(ann_dir / "panoptic_semseg_val" / ann["file_name"]))
        np.testing.assert_array_equal(sem, panoptic_to_semantic(ids, segs, ignore_label=255))


def test_second_call_reuses_and_other_parameters_raise(synthetic_root):
    marker = synthetic_root / "MASKATTN_COMPLETE.json"
    stamps = {p: p.stat().st_mtime_ns for p in (marker, synthetic_root / "train" / "000001.jpg")}
    generate_synthetic_panoptic(str(synthetic_root), **SMALL)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match="other generated data"):
        generate_synthetic_panoptic(str(synthetic_root), **dict(SMALL, num_train=9))


def test_losing_a_generation_race_keeps_the_winner(tmp_path):
    final = tmp_path / "data"
    key = {"k": 1}

    def build_and_get_overtaken(tmp_dir):
        (Path(tmp_dir) / "mine.txt").write_text("loser")
        # Another process finishes first while we are still building.
        build_directory_once(str(final), lambda d: (Path(d) / "mine.txt").write_text("winner"), key)

    assert build_directory_once(str(final), build_and_get_overtaken, key) is False
    assert (final / "mine.txt").read_text() == "winner"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "data"]
    assert leftovers == []  # the loser's temporary folder is gone


def _generate_small(root: str) -> None:
    generate_synthetic_panoptic(root, **SMALL)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_generation_yields_one_complete_copy(synthetic_root, tmp_path):
    root = tmp_path / "shared"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_generate_small, args=(str(root),)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert _files(root) == _files(synthetic_root)
    for rel in _files(root):
        assert (root / rel).read_bytes() == (synthetic_root / rel).read_bytes(), rel
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temporary leftovers


def test_failed_build_leaves_nothing(tmp_path):
    def broken(tmp_dir):
        (Path(tmp_dir) / "partial.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_directory_once(str(tmp_path / "data"), broken, {"k": 1})
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not generated"):
        generate_synthetic_panoptic(str(foreign), **SMALL)
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_panoptic(str(tmp_path / "x"), num_train=0, num_val=1)
    with pytest.raises(ValueError, match="height_range"):
        generate_synthetic_panoptic(str(tmp_path / "x"), height_range=(40, 50))


def test_render_scene_occlusion_rules():
    rng = np.random.default_rng(123)
    crowds = 0
    for _ in range(20):
        image, pan_ids, segments = render_scene(rng, 140, 170)
        assert image.shape == (140, 170, 3) and image.dtype == np.uint8
        thing_segments = [s for s in segments if s["category_id"] in (1, 2, 3)]
        assert 3 <= len(thing_segments) <= 13  # 1-4 per class, plus at most one crowd
        for seg in segments:
            area = int((pan_ids == seg["id"]).sum())
            assert area > 0
            if seg["category_id"] in (1, 2, 3) and not seg["iscrowd"]:
                assert area >= 20  # every instance keeps a visible part
            crowds += seg["iscrowd"]
    assert crowds > 0


@pytest.mark.slow
def test_default_size_generates_quickly(tmp_path):
    start = time.perf_counter()
    generate_synthetic_panoptic(str(tmp_path / "default"))
    assert time.perf_counter() - start < 30
    assert len(os.listdir(tmp_path / "default" / "train")) == 512


# ---------------------------------------------------------------------------- touching layout
TINY_TOUCHING = dict(num_train=3, num_val=2, seed=0, touching=True)
# sha256 of the default layout's first three scenes (ids + segments), as rendered before the
# touching layout existed: the default must stay byte-identical.
DEFAULT_FINGERPRINT = "2335cf253bc4e4a6aa39a2a33fb86f8475cb57ebfe81d847f641774c7bd2e61a"


def _fingerprint(**kwargs) -> str:
    digest = hashlib.sha256()
    for i in range(3):
        rng = np.random.default_rng([0, 0, i])
        _, pan_ids, segments = render_scene(rng, 140, 170, **kwargs)
        digest.update(pan_ids.astype(np.int64).tobytes())
        digest.update(json.dumps(segments, sort_keys=True).encode())
    return digest.hexdigest()


def test_default_layout_is_unchanged():
    assert _fingerprint() == DEFAULT_FINGERPRINT
    assert _fingerprint(touching=False) == DEFAULT_FINGERPRINT
    assert _fingerprint(touching=True) != DEFAULT_FINGERPRINT


def test_touching_generation_is_deterministic_and_recorded(synthetic_root, tmp_path):
    first, again = tmp_path / "touching", tmp_path / "touching_again"
    generate_synthetic_panoptic(str(first), **TINY_TOUCHING)
    generate_synthetic_panoptic(str(again), **TINY_TOUCHING)
    assert _files(first) == _files(again)
    for rel in _files(first):
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
    # The layout is part of the generation parameters (marker), only when it is used.
    marker = json.loads((first / "MASKATTN_COMPLETE.json").read_text())
    assert marker["touching"] is True
    assert "touching" not in json.loads((synthetic_root / "MASKATTN_COMPLETE.json").read_text())
    with pytest.raises(ValueError, match="other generated data"):
        generate_synthetic_panoptic(str(first), **dict(TINY_TOUCHING, touching=False))
    # Other scenes than the default's with the same seed.
    rel = "annotations/panoptic_train/000001.png"
    assert (first / rel).read_bytes() != (synthetic_root / rel).read_bytes()


def _same_class_contact_fraction(touching: bool, num_scenes: int = 24) -> float:
    """Fraction of the non-crowd thing instances 4-adjacent to another instance of their
    class (each mask dilated by 1 px, then intersected with the others)."""
    touching_count = total = 0
    for i in range(num_scenes):
        rng = np.random.default_rng([7, 0, i])
        _, pan_ids, segments = render_scene(rng, 140, 170, touching=touching)
        things = [s for s in segments if s["category_id"] in (1, 2, 3) and not s["iscrowd"]]
        for seg in things:
            mask = pan_ids == seg["id"]
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            others = [
                o["id"] for o in things
                if o["category_id"] == seg["category_id"] and o["id"] != seg["id"]
            ]
            total += 1
            touching_count += bool(np.isin(pan_ids[grown], others).any())
    return touching_count / total


def test_touching_scenes_put_same_class_instances_in_contact():
    touching = _same_class_contact_fraction(True)
    default = _same_class_contact_fraction(False)
    assert touching >= 0.8, touching
    assert default <= 0.35, default
    assert touching > default + 0.4


def test_touching_scenes_keep_every_instance_visible():
    rng = np.random.default_rng(5)
    for _ in range(10):
        image, pan_ids, segments = render_scene(rng, 140, 170, touching=True)
        assert image.shape == (140, 170, 3) and image.dtype == np.uint8
        things = [s for s in segments if s["category_id"] in (1, 2, 3) and not s["iscrowd"]]
        assert len(things) >= 3  # at least one chain start per class
        for seg in things:
            assert int((pan_ids == seg["id"]).sum()) >= 20


def test_touching_registration(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    default = cache_root(num_train=4, num_val=2, seed=0)
    touching = cache_root(num_train=4, num_val=2, seed=0, touching=True)
    assert os.path.basename(default) == "synthetic_panoptic_v1_seed0_4-2"
    assert os.path.basename(touching) == "synthetic_panoptic_touching_v1_seed0_4-2"
    register_all_maskattn_datasets()
    for split in ("train", "val"):
        assert f"maskattn_synthetic_touching_panoptic_{split}" in DatasetCatalog.list()
    meta = MetadataCatalog.get("maskattn_synthetic_touching_panoptic_val")
    # Registered at import; the paths follow $MASKATTN_D2_CACHE when the data are loaded.
    assert "/synthetic_panoptic_touching_v1_seed0_256-32/" in meta.panoptic_json
    assert not (tmp_path / "cache").exists()  # lazy: nothing generated at registration

    names = register_synthetic_panoptic("test_tiny_touching", num_train=2, num_val=1, touching=True)
    try:
        assert len(DatasetCatalog.get("test_tiny_touching_val")) == 1
        root = Path(cache_root(num_train=2, num_val=1, seed=0, touching=True))
        assert json.loads((root / "MASKATTN_COMPLETE.json").read_text())["touching"] is True
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
