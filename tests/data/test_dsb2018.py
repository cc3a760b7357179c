"""DSB 2018 nuclei: datasets/prepare_dsb2018.py on the committed CC0 fixture (as a folder and
as a zip), the "dsb2018_panoptic_{train,val}" registration, and a short train_net.py run.

The fixture (tests/fixtures/dsb2018_mini) holds 3 images of the Kaggle "stage1_train" set in
its own layout; tests that read the full shared zip skip when it is absent.
"""
import importlib.util
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from detectron2.data import DatasetCatalog, MetadataCatalog

from maskattn_d2.data.datasets import check_panoptic_dataset

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "dsb2018_mini"
SHARED = REPO.parent / "shared" / "data" / "dsb2018"
SHARED_ZIP = SHARED / "stage1_train.zip"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


prep = _load_script("prepare_dsb2018")

FIXTURE_IDS = sorted(p.name for p in (FIXTURE / "stage1_train").iterdir() if p.is_dir())
TRAIN_IDS, VAL_IDS = FIXTURE_IDS[:2], FIXTURE_IDS[2:]


def _fixture_masks(image_id):
    """The fixture's masks of one image, in file-name order, as bool arrays."""
    folder = FIXTURE / "stage1_train" / image_id / "masks"
    return [np.asarray(Image.open(p)) > 0 for p in sorted(folder.glob("*.png"))]


def _write_split_files(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(TRAIN_IDS) + "\n")
    (folder / "val.txt").write_text("# a comment\n" + "\n".join(VAL_IDS) + "\n\n")
    return [str(folder / "train.txt"), str(folder / "val.txt")]


def _zip_folder(folder: Path, zip_path: Path):
    """A zip of ``folder``'s stage1_train tree, directory entries included, as Kaggle's."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix() + ("/" if path.is_dir() else ""))
    return zip_path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fixture converted twice: from the folder (with workers) and from a zip of it."""
    tmp = tmp_path_factory.mktemp("dsb2018")
    splits = _write_split_files(tmp / "splits")
    from_folder = tmp / "from_folder" / "dsb2018"
    counts = prep.prepare_dsb2018(str(FIXTURE), str(from_folder), split_files=splits, workers=2)
    zip_path = _zip_folder(FIXTURE, tmp / "stage1_train.zip")
    from_zip = tmp / "from_zip" / "dsb2018"
    prep.main(["--source", str(zip_path), "--output", str(from_zip), "--splits", *splits])
    return {"folder": from_folder, "zip": from_zip, "counts": counts, "zip_path": zip_path}


def _panoptic(root: Path, split: str):
    with open(root / "annotations" / f"panoptic_{split}.json") as f:
        return json.load(f)


def test_counts_and_split_files_are_honoured(prepared):
    root = prepared["folder"]
    expected_nuclei = {
        split: sum(sum(m.any() for m in _fixture_masks(i)) for i in ids)
        for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS))
    }
    assert prepared["counts"] == {
        "train": {"images": 2, "nuclei": expected_nuclei["train"], "dropped": 0},
        "val": {"images": 1, "nuclei": expected_nuclei["val"], "dropped": 0},
    }
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        pan = _panoptic(root, split)
        assert [img["file_name"] for img in pan["images"]] == [f"{i}.png" for i in ids]
        assert [img["id"] for img in pan["images"]] == list(range(1, len(ids) + 1))
        assert sorted(p.name for p in (root / split).iterdir()) == [f"{i}.png" for i in ids]
        assert [c["name"] for c in pan["categories"]] == ["nucleus", "background"]


def test_zip_and_folder_give_the_same_files(prepared):
    a, b = prepared["folder"], prepared["zip"]
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize("split", ["train", "val"])
def test_segments_equal_the_masks(prepared, split):
    root = prepared["folder"]
    pan = _panoptic(root, split)
    for image, ann in zip(pan["images"], pan["annotations"]):
        image_id = image["dsb2018_id"]
        masks = [m for m in _fixture_masks(image_id) if m.any()]
        ids = rgb2id(np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" /
                                           ann["file_name"])))
        segments = ann["segments_info"]
        seg_ids = [s["id"] for s in segments]
        assert len(set(seg_ids)) == len(seg_ids)
        nuclei = [s for s in segments if s["category_id"] == 1]
        assert len(nuclei) == len(masks)
        # The fixture's masks do not overlap: each nucleus is its mask, in file order.
        for seg, mask in zip(nuclei, masks):
            ys, xs = np.nonzero(mask)
            assert np.array_equal(ids == seg["id"], mask)
            assert seg["area"] == int(mask.sum())
            assert seg["bbox"] == [
                int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            ]
        (background,) = [s for s in segments if s["category_id"] == 2]
        assert np.array_equal(ids == background["id"], ~np.any(masks, axis=0))
        assert set(np.unique(ids).tolist()) == set(seg_ids)  # no void, nothing unlisted
        # Semantic labels: 0 nucleus, 1 background.
        sem = np.asarray(Image.open(root / "annotations" / f"panoptic_semseg_{split}" /
                                    ann["file_name"]))
        assert np.array_equal(sem, np.where(np.any(masks, axis=0), 0, 1))
        # The image: 8-bit RGB, the RGB channels of the RGBA original.
        rgb = Image.open(root / split / image["file_name"])
        original = np.asarray(
            Image.open(FIXTURE / "stage1_train" / image_id / "images" / f"{image_id}.png")
        )
        assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), original[..., :3])


def _touching_pair(masks):
    """Indices of two masks with 4-adjacent pixels, or None."""
    for i, a in enumerate(masks):
        grown = ndimage.binary_dilation(a)
        for j in range(i + 1, len(masks)):
            if (grown & masks[j]).any():
                return i, j
    return None


def test_touching_nuclei_stay_two_segments(prepared):
    root = prepared["folder"]
    pan = _panoptic(root, "train")
    image, ann = pan["images"][0], pan["annotations"][0]
    masks = [m for m in _fixture_masks(image["dsb2018_id"]) if m.any()]
    pair = _touching_pair(masks)
    assert pair is not None, "the fixture must hold touching nuclei"
    i, j = pair
    # They form one connected blob: a foreground mask would merge them.
    assert ndimage.label(masks[i] | masks[j])[1] == 1
    ids = rgb2id(np.asarray(Image.open(root / "annotations" / "panoptic_train" /
                                       ann["file_name"])))
    id_i, id_j = np.unique(ids[masks[i]]), np.unique(ids[masks[j]])
    assert len(id_i) == 1 and len(id_j) == 1 and id_i[0] != id_j[0]
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
    decoded = [coco.annToMask(a).astype(bool) for a in anns]
    assert any(np.array_equal(d, masks[i]) for d in decoded)
    assert any(np.array_equal(d, masks[j]) for d in decoded)


def test_instances_json_lists_every_nucleus(prepared):
    root = prepared["folder"]
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        pan = _panoptic(root, split)
        nuclei = sum(s["category_id"] == 1 for a in pan["annotations"] for s in a["segments_info"])
        assert len(coco.getAnnIds()) == nuclei == prepared["counts"][split]["nuclei"]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["nucleus"]


def test_a_second_run_reuses_the_output(prepared, tmp_path):
    splits = _write_split_files(tmp_path)
    assert prep.prepare_dsb2018(str(FIXTURE), str(prepared["folder"]), split_files=splits) == {}
    # Another split into the same folder is refused unless --overwrite.
    (tmp_path / "val.txt").write_text(TRAIN_IDS[0] + "\n")
    (tmp_path / "train.txt").write_text("\n".join(TRAIN_IDS[1:] + VAL_IDS) + "\n")
    copy = tmp_path / "copy" / "dsb2018"
    shutil.copytree(prepared["folder"], copy)
    with pytest.raises(ValueError, match="other generated data"):
        prep.prepare_dsb2018(str(FIXTURE), str(copy), split_files=splits)
    counts = prep.prepare_dsb2018(str(FIXTURE), str(copy), split_files=splits, overwrite=True)
    assert counts["val"]["images"] == 1 and counts["train"]["images"] == 2


def test_default_split_without_split_files(tmp_path):
    counts = prep.prepare_dsb2018(str(FIXTURE / "stage1_train"), str(tmp_path / "out"))
    assert counts["train"]["images"] == 2 and counts["val"]["images"] == 1
    ids = [f"{k:02d}" for k in range(25)]
    split = prep.default_splits(ids)
    assert split["val"] == ["09", "19"] and len(split["train"]) == 23


# ------------------------------------------------------------------------ bad input
def test_split_id_not_in_the_source_is_named(tmp_path):
    bad = tmp_path / "val.txt"
    bad.write_text(VAL_IDS[0] + "\ndeadbeef0123\n")
    with pytest.raises(ValueError, match="deadbeef0123"):
        prep.prepare_dsb2018(str(FIXTURE), str(tmp_path / "out"), split_files=[str(bad)])
    assert not (tmp_path / "out").exists()
    # Also from the zip, and for an id listed in two split files.
    zip_path = _zip_folder(FIXTURE, tmp_path / "s.zip")
    with pytest.raises(ValueError, match="deadbeef0123"):
        prep.prepare_dsb2018(str(zip_path), str(tmp_path / "out"), split_files=[str(bad)])
    train = tmp_path / "train.txt"
    train.write_text(VAL_IDS[0] + "\n")
    (tmp_path / "val.txt").write_text(VAL_IDS[0] + "\n")
    with pytest.raises(ValueError, match="listed twice"):
        prep.prepare_dsb2018(str(FIXTURE), str(tmp_path / "out"),
                             split_files=[str(train), str(tmp_path / "val.txt")])


def _copy_fixture(tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(FIXTURE / "stage1_train", dst / "stage1_train")
    return dst


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_missing_images_folder_is_named(tmp_path, as_zip):
    src = _copy_fixture(tmp_path)
    shutil.rmtree(src / "stage1_train" / VAL_IDS[0] / "images")
    source = _zip_folder(src, tmp_path / "s.zip") if as_zip else src
    with pytest.raises(FileNotFoundError, match=f"{VAL_IDS[0]}/images"):
        prep.prepare_dsb2018(str(source), str(tmp_path / "out"))


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_unreadable_mask_is_named(tmp_path, as_zip):
    src = _copy_fixture(tmp_path)
    mask = sorted((src / "stage1_train" / TRAIN_IDS[1] / "masks").glob("*.png"))[0]
    mask.write_bytes(b"not a png")
    source = _zip_folder(src, tmp_path / "s.zip") if as_zip else src
    with pytest.raises(ValueError, match=f"unreadable mask .*{mask.name}"):
        prep.prepare_dsb2018(str(source), str(tmp_path / "out"), workers=2)


def test_not_a_dsb_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prep.DSBSource(str(tmp_path / "nowhere"))
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="not a DSB 2018"):
        prep.DSBSource(str(empty_zip))


def test_overlaps_empty_masks_and_image_modes(tmp_path):
    """Later masks win, masks left without a pixel are dropped, 16-bit grey becomes RGB."""
    folder = tmp_path / "stage1_train" / "img0"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    grey16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "images" / "img0.png")
    assert Image.open(folder / "images" / "img0.png").mode in ("I", "I;16")

    def mask(rows, cols):
        m = np.zeros((6, 8), dtype=np.uint8)
        m[rows, cols] = 255
        return m

    Image.fromarray(mask(slice(0, 3), slice(0, 3))).save(folder / "masks" / "a.png")
    Image.fromarray(mask(slice(1, 4), slice(1, 4))).save(folder / "masks" / "b.png")  # over a
    Image.fromarray(mask(slice(4, 6), slice(6, 8))).save(folder / "masks" / "c.png")
    Image.fromarray(mask(slice(4, 6), slice(5, 8))).save(folder / "masks" / "d.png")  # hides c
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(folder / "masks" / "e.png")  # empty
    counts = prep.prepare_dsb2018(str(tmp_path), str(tmp_path / "out"))
    assert counts["train"] == {"images": 1, "nuclei": 3, "dropped": 2}
    ann_dir = tmp_path / "out" / "annotations"
    ids = rgb2id(np.asarray(Image.open(ann_dir / "panoptic_train" / "img0.png")))
    expected = np.ones((6, 8), dtype=np.int64)
    expected[0:3, 0:3] = 2  # a
    expected[1:4, 1:4] = 3  # b, painted over a
    expected[4:6, 5:8] = 4  # d; c keeps no pixel
    assert np.array_equal(ids, expected)
    (ann,) = json.loads((ann_dir / "panoptic_train.json").read_text())["annotations"]
    assert [(s["id"], s["area"]) for s in ann["segments_info"]] == [
        (1, 48 - 14 - 6), (2, 5), (3, 9), (4, 6)
    ]
    rgb = np.asarray(Image.open(tmp_path / "out" / "train" / "img0.png"))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], np.rint(grey16 / 65535 * 255).astype(np.uint8))
    # An RGBA image loses its alpha channel, a grey one is repeated over R, G, B.
    rgba = np.random.default_rng(0).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    assert np.array_equal(prep.to_rgb8(Image.fromarray(rgba)), rgba[..., :3])
    grey = rgba[..., 0]
    assert np.array_equal(prep.to_rgb8(Image.fromarray(grey)), np.stack([grey] * 3, -1))


def test_mask_of_another_size_is_named(tmp_path):
    src = _copy_fixture(tmp_path)
    mask = sorted((src / "stage1_train" / VAL_IDS[0] / "masks").glob("*.png"))[0]
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(mask)
    with pytest.raises(ValueError, match=mask.name):
        prep.prepare_dsb2018(str(src), str(tmp_path / "out"))


# --------------------------------------------------------------------- registration
def test_registration_loads_the_prepared_dicts(prepared, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(prepared["folder"].parent))
    train = DatasetCatalog.get("dsb2018_panoptic_train")
    val = DatasetCatalog.get("dsb2018_panoptic_val")
    assert [Path(d["file_name"]).name for d in train] == [f"{i}.png" for i in TRAIN_IDS]
    assert len(val) == 1
    for record in train + val:
        assert Path(record["file_name"]).is_file()
        assert Path(record["pan_seg_file_name"]).is_file()
        assert Path(record["sem_seg_file_name"]).is_file()
        assert (record["height"], record["width"]) == (256, 256)
        kinds = {(s["category_id"], s["isthing"]) for s in record["segments_info"]}
        assert kinds == {(0, True), (1, False)}
    meta = MetadataCatalog.get("dsb2018_panoptic_val")
    assert meta.thing_classes == ["nucleus"]
    assert meta.stuff_classes == ["nucleus", "background"]
    assert meta.json_file == str(prepared["folder"] / "annotations" / "instances_val.json")
    check_panoptic_dataset("dsb2018_panoptic_val", read_files=True)


def test_registration_reads_the_environment_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        DatasetCatalog.get("dsb2018_panoptic_train")


# ----------------------------------------------------------------------- shared data
@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} is not available")
def test_the_shared_zip_and_split_files(tmp_path):
    source = prep.DSBSource(str(SHARED_ZIP))
    ids = source.image_ids()
    splits = prep.read_split_files([str(SHARED / "train.txt"), str(SHARED / "val.txt")], ids)
    assert len(splits["train"]) == 532 and len(splits["val"]) == 66
    assert set(FIXTURE_IDS) <= set(splits["train"])
    # One image of the fixture converts to the same files from the full zip.
    out = tmp_path / "out"
    prep.convert_split(source, "train", FIXTURE_IDS[:1], str(out))
    ref = tmp_path / "ref"
    prep.convert_split(prep.DSBSource(str(FIXTURE)), "train", FIXTURE_IDS[:1], str(ref))
    for rel in ("train", "annotations/panoptic_train", "annotations/panoptic_semseg_train"):
        name = f"{FIXTURE_IDS[0]}.png"
        assert (out / rel / name).read_bytes() == (ref / rel / name).read_bytes()


# ------------------------------------------------------------------------- end to end
def test_train_net_on_the_fixture_reports_matching_ap(prepared, tmp_path):
    from tests.test_train_net import copypaste_metrics, run_train_net, summary_table

    opts = [
        "SOLVER.MAX_ITER", "5",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN", '("dsb2018_panoptic_train",)',
        "DATASETS.TEST", '("dsb2018_panoptic_val",)',
    ]
    log = run_train_net(
        "configs/dsb2018_panoptic_128.yaml",
        opts,
        tmp_path / "out",
        datasets_root=prepared["folder"].parent,
    )
    metrics = copypaste_metrics(log)
    assert {"panoptic_seg", "segm", "sem_seg", "matching_ap"} <= set(metrics)
    # Scored on the prepared val split (its one image), and the summary shows that number.
    images = prepared["counts"]["val"]["images"]
    assert f"Matching mAP@[.5:.95] on dsb2018_panoptic_val ({images} images)" in log
    summary = summary_table(log)["dsb2018_panoptic_val"]
    assert summary["matching mAP"] == pytest.approx(metrics["matching_ap"]["mAP"], abs=0.006)
    assert (tmp_path / "out" / "model_final.pth").is_file()
