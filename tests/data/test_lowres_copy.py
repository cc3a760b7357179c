"""Low-resolution training copies: the writer, the registration, the config key, and that the
training mapper gives (nearly) the same network-size targets from a copy as from the originals."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools.coco import COCO

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import MaskAttnPanopticMapper, eval_augmentations, train_augmentations
from maskattn_d2.data.datasets import (
    SYNTHETIC_CATEGORIES,
    check_panoptic_dataset,
    generate_synthetic_panoptic,
    panoptic_metadata,
    register_coco_mini_panoptic,
    register_panoptic_dataset,
)
from maskattn_d2.data.datasets.lowres_copy import (
    downscale_panoptic_sample,
    lowres_copy_root,
    lowres_size,
    lowres_train_config,
    register_lowres_copy,
    write_lowres_copy,
)
from maskattn_d2.data.datasets.panoptic_json import coco_layout_paths
from maskattn_d2.engine import MaskAttnTrainer
from maskattn_d2.evaluation.paper_protocol import resize_ids_nearest

from ..panoptic_factory import unregister

SHARED_COCO = Path("/work/shared/data/coco_panoptic_val2017_mini")
REPO_COCO = Path(__file__).resolve().parents[2] / "datasets" / "coco_panoptic_val2017_mini"
SIZE = (128, 128)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def registered():
    """Names registered in a test, removed afterwards (copies included)."""
    names = []
    yield names
    copies = [f"{n}_lowres{s}" for n in names for s in (160, 200)]
    unregister(names + [c for c in copies if c in DatasetCatalog.list()])


# ------------------------------------------------------------------------------ pure parts
def test_lowres_size_keeps_aspect_and_never_upsamples():
    assert lowres_size(480, 640, 160) == (160, 213)
    assert lowres_size(640, 480, 160) == (213, 160)
    assert lowres_size(1040, 1388, 160) == (160, 214)
    assert lowres_size(150, 300, 160) == (150, 300)  # already small: unchanged
    assert lowres_size(160, 161, 160) == (160, 161)
    with pytest.raises(ValueError, match="short_side"):
        lowres_size(480, 640, 0)


def test_downscale_uses_pixel_centre_nearest_and_drops_vanished_segments():
    rng = np.random.default_rng(0)
    ids = np.full((60, 90), 5, np.int32)  # stuff 5 everywhere
    ids[10:40, 20:70] = 7  # a big thing
    ids[45, 81] = 9  # a one-pixel thing: gone at a third of the size
    ids[50:58, 5:9] = 0  # void
    ids[0:30, 0:6] = rng.integers(11, 14, (30, 6))  # fine texture of three small segments
    segments = [{"id": i, "category_id": 1, "iscrowd": 0} for i in (5, 7, 9, 11, 12, 13, 99)]
    image = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))

    small, pan_ids, kept, dropped = downscale_panoptic_sample(image, id2rgb(ids), segments, 20)

    assert small.size == (30, 20) and pan_ids.shape == (20, 30)
    np.testing.assert_array_equal(pan_ids, resize_ids_nearest(ids, (20, 30)))
    assert 9 not in pan_ids and 99 not in pan_ids
    assert {s["id"] for s in dropped} == {9, 99}  # 99 was never in the PNG
    assert [s["id"] for s in kept] == [s["id"] for s in segments if s["id"] not in (9, 99)]
    for seg in kept:
        mask = pan_ids == seg["id"]
        ys, xs = np.nonzero(mask)
        assert seg["area"] == mask.sum()
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    with pytest.raises(ValueError, match="differs"):
        downscale_panoptic_sample(image, id2rgb(ids[:50]), segments, 20)


# --------------------------------------------------------------------------- whole datasets
def _mapper(name: str, augmentations):
    meta = MetadataCatalog.get(name)
    return MaskAttnPanopticMapper(
        True,
        augmentations=augmentations,
        image_format="RGB",
        network_size=SIZE,
        ignore_label=255,
        thing_ids=list(meta.thing_dataset_id_to_contiguous_id.values()),
        min_instance_pixels=4,
        num_classes=len(meta.stuff_classes),
    )


def assert_same_network_targets(name: str, lowres_name: str) -> None:
    """The mapper's network-size targets from the copy match those from the originals.

    Resizing twice by nearest neighbour (original -> copy -> network) moves a boundary by at
    most about one network pixel, so >= 96 % of the pixels keep their semantic label and
    instance id, every instance of 16 pixels or more is found again, and the images differ
    by a few grey levels. Checked with the test-time resize and with the training
    augmentations at full-image crops (flip included, same seed); smaller random crops are
    drawn in each image's own pixel grid, hence differ.
    """
    originals, copies = DatasetCatalog.get(name), DatasetCatalog.get(lowres_name)
    assert [d["image_id"] for d in originals] == [d["image_id"] for d in copies]
    for augmentations in (eval_augmentations(SIZE), train_augmentations(SIZE, crop_scale=(1, 1))):
        mapper = _mapper(name, augmentations)
        for original, copy in zip(originals, copies):
            assert min(copy["height"], copy["width"]) == 160 < min(
                original["height"], original["width"]
            )
            np.random.seed(0)
            a = mapper(original)
            np.random.seed(0)
            b = mapper(copy)
            assert (a["height"], a["width"]) == (original["height"], original["width"])
            assert (a["sem_seg"] == b["sem_seg"]).float().mean() >= 0.96, original["file_name"]
            assert (a["instance_ids"] == b["instance_ids"]).float().mean() >= 0.96
            _assert_instances_match(a["instance_ids"].numpy(), b["instance_ids"].numpy())
            assert (a["image"].float() - b["image"].float()).abs().mean() < 6.0


def _assert_instances_match(a: np.ndarray, b: np.ndarray, min_area: int = 16) -> None:
    """Every instance of ``a`` with at least ``min_area`` pixels has one in ``b`` covering it
    (IoU >= 0.5; >= 0.85 from 100 pixels); instances near the mapper's MIN_INSTANCE_PIXELS
    may appear or vanish."""
    for i in np.unique(a[a > 0]):
        mask = a == i
        if mask.sum() < min_area:
            continue
        j = np.bincount(b[mask]).argmax()
        other = b == j
        iou = (mask & other).sum() / (mask | other).sum()
        # A one-pixel boundary shift costs a thin 20-pixel object much more IoU than a blob.
        assert j > 0 and iou >= (0.85 if mask.sum() >= 100 else 0.5), (i, j, iou)


def _check_copy_files(lowres_name: str, root: Path) -> None:
    """Every file of the copy is consistent: sizes, ids listed, instances json readable."""
    check_panoptic_dataset(lowres_name, read_files=True)
    with open(root / "panoptic.json") as f:
        panoptic = json.load(f)
    sizes = {img["id"]: (img["height"], img["width"]) for img in panoptic["images"]}
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(root / "panoptic" / ann["file_name"]).convert("RGB")))
        assert ids.shape == sizes[ann["image_id"]]
        areas = {s["id"]: s["area"] for s in ann["segments_info"]}
        present = set(np.unique(ids).tolist()) - {0}
        assert present <= set(areas)  # every id of the PNG is listed (none vanished there)
        assert all(areas[i] == (ids == i).sum() for i in present)
        assert set(areas) <= present  # and every listed segment has pixels
        semantic = np.asarray(Image.open(root / "panoptic_semseg" / ann["file_name"]))
        assert semantic.shape == ids.shape
    coco = COCO(str(root / "instances.json"))
    assert len(coco.getImgIds()) == len(panoptic["images"])


@pytest.mark.parametrize("source", [REPO_COCO, SHARED_COCO], ids=["repo", "shared"])
def test_coco_sample_copy(source, cache, registered):
    if not (source / "annotations" / "panoptic_val2017.json").is_file():
        pytest.skip(f"COCO sample not found at {source}")
    name = "maskattn_test_lowres_coco"
    register_coco_mini_panoptic(name, root=str(source))
    registered.append(name)

    counts = write_lowres_copy(name, 160, workers=2)
    root = Path(lowres_copy_root(name, 160))
    assert root.parent == cache / "lowres"
    assert counts["images"] == counts["resized"] == 3
    with open(source / "annotations" / "panoptic_val2017.json") as f:
        source_json = json.load(f)
    total = sum(len(a["segments_info"]) for a in source_json["annotations"])
    assert counts["segments"] + counts["dropped_segments"] == total
    lowres_name = register_lowres_copy(name, 160)
    assert lowres_name == f"{name}_lowres160"
    assert MetadataCatalog.get(lowres_name).stuff_classes == MetadataCatalog.get(name).stuff_classes
    _check_copy_files(lowres_name, root)
    assert_same_network_targets(name, lowres_name)
    assert write_lowres_copy(name, 160) == {}  # the second run reuses the copy


def test_copy_with_detectron2_coco_metadata(coco_mini, cache):
    """detectron2's own COCO metadata maps only the 53 stuff classes in
    stuff_dataset_id_to_contiguous_id; the copy maps all 133 (things first)."""
    write_lowres_copy(coco_mini, 160)
    lowres_name = register_lowres_copy(coco_mini, 160)
    try:
        meta = MetadataCatalog.get(lowres_name)
        assert len(meta.stuff_dataset_id_to_contiguous_id) == 133
        assert meta.stuff_dataset_id_to_contiguous_id[1] == 0  # person
        dicts = DatasetCatalog.get(lowres_name)
        assert len(dicts) == 3
        assert all(s["category_id"] < 133 for d in dicts for s in d["segments_info"])
    finally:
        unregister([lowres_name])


@pytest.fixture
def large_synthetic(tmp_path, registered):
    """A generated synthetic dataset at COCO-like sizes (400-480 x 480-640)."""
    root = tmp_path / "synthetic_large"
    generate_synthetic_panoptic(
        str(root), num_train=4, num_val=1, height_range=(400, 480), width_range=(480, 640)
    )
    name = "maskattn_test_lowres_synthetic"
    register_panoptic_dataset(
        name, panoptic_metadata(SYNTHETIC_CATEGORIES), coco_layout_paths(str(root), "train")
    )
    registered.append(name)
    return name


def test_synthetic_copy_and_training_from_it(large_synthetic, cache, tmp_path):
    name = large_synthetic
    counts = write_lowres_copy(name, 160)
    assert counts["images"] == counts["resized"] == 4
    lowres_name = register_lowres_copy(name, 160)
    root = Path(lowres_copy_root(name, 160))
    _check_copy_files(lowres_name, root)
    assert_same_network_targets(name, lowres_name)

    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.freeze()
    assert lowres_train_config(cfg) is cfg  # 0: the originals
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN_LOWRES_SHORT_SIDE = 160
    cfg.freeze()
    assert lowres_train_config(cfg).DATASETS.TRAIN == (lowres_name,)
    batch = next(iter(MaskAttnTrainer.build_train_loader(cfg)))
    assert len(batch) == 2
    for item in batch:
        assert item["file_name"].startswith(str(root))
        assert tuple(item["image"].shape) == (3, *SIZE) and tuple(item["sem_seg"].shape) == SIZE


def test_prepare_script(large_synthetic, cache, capsys):
    script = _load_prepare_script()
    script.main(["--datasets", large_synthetic, "--short-side", "200"])
    assert f"{large_synthetic}: 4 images (4 resized)" in capsys.readouterr().out
    assert (Path(lowres_copy_root(large_synthetic, 200)) / "MASKATTN_COMPLETE.json").is_file()
    script.main(["--datasets", large_synthetic, "--short-side", "200"])
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--datasets", large_synthetic, "--short-side", "0"])


def _load_prepare_script():
    path = Path(__file__).resolve().parents[2] / "datasets" / "prepare_lowres_copy.py"
    spec = importlib.util.spec_from_file_location("prepare_lowres_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_copy_names_the_prepare_command(large_synthetic, cache):
    with pytest.raises(FileNotFoundError, match="prepare_lowres_copy.py --datasets "
                       f"{large_synthetic} --short-side 192"):
        register_lowres_copy(large_synthetic, 192)
    with pytest.raises(KeyError, match="not registered"):
        write_lowres_copy("maskattn_test_no_such_dataset", 160)


def test_overwrite_refuses_foreign_folders(large_synthetic, tmp_path, cache):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not written by maskattn_d2"):
        write_lowres_copy(large_synthetic, 160, output=str(foreign), overwrite=True)
    assert (foreign / "keep.txt").is_file()
    assert os.listdir(foreign) == ["keep.txt"]
