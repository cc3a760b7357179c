"""Fixtures that put small real-format datasets on disk and register them with detectron2.

- The real 3-image COCO panoptic sample (``datasets/coco_panoptic_val2017_mini``), registered
  under test-only names with detectron2's ``coco_panoptic_standard`` metadata, or with a
  unified metadata whose thing and stuff ids interleave.
- A tiny Cityscapes tree (gtFine labelIds / instanceIds / labelTrainIds, leftImg8bit, and the
  panoptic json + PNGs in the layout of cityscapesscripts' createPanopticImgs), registered
  through detectron2's own ``register_all_cityscapes_panoptic``.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.data.datasets.builtin_meta import (
    CITYSCAPES_CATEGORIES,
    COCO_CATEGORIES,
    _get_builtin_metadata,
)
from detectron2.data.datasets.cityscapes_panoptic import register_all_cityscapes_panoptic

from maskattn_d2.data.datasets import load_panoptic_json, panoptic_metadata
from maskattn_d2.data.datasets.panoptic_conversion import convert_panoptic_annotations

COCO_MINI = Path(__file__).resolve().parents[1] / "datasets" / "coco_panoptic_val2017_mini"
COCO_MINI_PANOPTIC_JSON = COCO_MINI / "annotations" / "panoptic_val2017.json"
COCO_MINI_PANOPTIC_ROOT = COCO_MINI / "annotations" / "panoptic_val2017"

CITYSCAPES_PANOPTIC_NAMES = ("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val")
CITYSCAPES_CITY = "frankfurt"

# Cityscapes labels used by the tiny tree: label id -> (train id, has instances).
# 0 "unlabeled" and 1 "ego vehicle" are void (ignoreInEval, train id 255).
_CITYSCAPES_LABELS = {c["id"]: (c["trainId"], bool(c["isthing"])) for c in CITYSCAPES_CATEGORIES}
_CITYSCAPES_LABELS.update({0: (255, False), 1: (255, False)})
# Cityscapes label categories ("supercategory" in createPanopticImgs' json).
# fmt: off
_CITYSCAPES_SUPERCATEGORY = {
    "road": "flat", "sidewalk": "flat", "building": "construction", "wall": "construction",
    "fence": "construction", "pole": "object", "traffic light": "object",
    "traffic sign": "object", "vegetation": "nature", "terrain": "nature", "sky": "sky",
    "person": "human", "rider": "human", "car": "vehicle", "truck": "vehicle",
    "bus": "vehicle", "train": "vehicle", "motorcycle": "vehicle", "bicycle": "vehicle",
}
# fmt: on

# Two 64x128 frames painted with rectangles, in order:
# (label id, instance number (None: stuff, 0: crowd), rows, cols).
CITYSCAPES_FRAMES: Dict[str, List[Tuple[int, Optional[int], slice, slice]]] = {
    f"{CITYSCAPES_CITY}_000000_000294": [
        (23, None, slice(0, 16), slice(0, 128)),  # sky
        (11, None, slice(16, 32), slice(0, 128)),  # building
        (7, None, slice(32, 64), slice(0, 128)),  # road
        (0, None, slice(16, 32), slice(0, 8)),  # unlabeled (void)
        (26, 1, slice(34, 50), slice(10, 30)),  # car
        (26, 2, slice(36, 56), slice(40, 60)),  # car
        (24, 0, slice(40, 56), slice(70, 80)),  # crowd of persons
        (24, 1, slice(20, 40), slice(90, 100)),  # person
        (1, None, slice(60, 64), slice(0, 128)),  # ego vehicle (void)
    ],
    f"{CITYSCAPES_CITY}_000000_000576": [
        (7, None, slice(0, 64), slice(0, 128)),  # road
        (21, None, slice(0, 20), slice(0, 64)),  # vegetation
        (8, None, slice(40, 64), slice(64, 128)),  # sidewalk
        (25, 1, slice(10, 40), slice(70, 85)),  # rider
        (33, 1, slice(30, 50), slice(66, 90)),  # bicycle
        (26, 1, slice(44, 60), slice(10, 40)),  # car
    ],
}


def _unregister(name: str) -> None:
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def interleaved_coco_panoptic_metadata() -> Dict:
    """A unified COCO panoptic metadata whose contiguous ids interleave things and stuff.

    Classes are numbered in alphabetical order of their names (as an ADE20K-style space
    would), so the thing contiguous ids are not 0..79: detectron2's COCOEvaluator rejects it.
    """
    categories = sorted(COCO_CATEGORIES, key=lambda c: c["name"])
    names = [c["name"] for c in categories]
    return {
        "thing_classes": names,
        "stuff_classes": names,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if not c["isthing"]
        },
    }


def register_coco_mini(name: str, metadata: Dict, instances_json: Optional[str]) -> str:
    """Register the COCO sample as a standard COCO panoptic dataset named ``name``."""
    register_coco_panoptic(
        name,
        metadata,
        image_root=str(COCO_MINI / "val2017"),
        panoptic_root=str(COCO_MINI_PANOPTIC_ROOT),
        panoptic_json=str(COCO_MINI_PANOPTIC_JSON),
        instances_json=instances_json,
    )
    return name


def coco_mini_dicts() -> Tuple[List[Dict], Dict]:
    """The COCO sample's panoptic dicts (the project's loader, contiguous category ids) and
    the metadata they were loaded with."""
    metadata = panoptic_metadata(COCO_CATEGORIES)
    dicts = load_panoptic_json(
        str(COCO_MINI_PANOPTIC_JSON), str(COCO_MINI / "val2017"), str(COCO_MINI_PANOPTIC_ROOT),
        metadata,
    )
    return dicts, metadata


@pytest.fixture
def register_coco_sample():
    """Register the COCO sample for one test: ``register_coco_sample(name, metadata, json)``."""
    names = []

    def _register(name: str, metadata: Dict, instances_json: Optional[str]) -> str:
        names.append(register_coco_mini(name, metadata, instances_json))
        return name

    yield _register
    for name in names:
        _unregister(name)


@pytest.fixture(scope="session")
def coco_mini_instances_json(tmp_path_factory) -> str:
    """COCO instances json of the sample (thing segments as RLE), written once."""
    assert COCO_MINI_PANOPTIC_JSON.is_file(), f"missing COCO sample at {COCO_MINI}"
    path = str(tmp_path_factory.mktemp("coco_mini") / "instances_val2017.json")
    with open(COCO_MINI_PANOPTIC_JSON) as f:
        panoptic = json.load(f)
    convert_panoptic_annotations(panoptic, str(COCO_MINI_PANOPTIC_ROOT), instances_json=path)
    return path


@pytest.fixture(scope="session")
def coco_mini(coco_mini_instances_json):
    """Name of the COCO sample registered with detectron2's coco_panoptic_standard metadata."""
    name = register_coco_mini(
        "maskattn_test_coco_mini_panoptic",
        _get_builtin_metadata("coco_panoptic_standard"),
        coco_mini_instances_json,
    )
    yield name
    _unregister(name)


@pytest.fixture(scope="session")
def coco_mini_interleaved(coco_mini_instances_json):
    """Name of the COCO sample registered with :func:`interleaved_coco_panoptic_metadata`."""
    name = register_coco_mini(
        "maskattn_test_coco_mini_panoptic_interleaved",
        interleaved_coco_panoptic_metadata(),
        coco_mini_instances_json,
    )
    yield name
    _unregister(name)


@pytest.fixture
def register_dataset():
    """Register datasets for one test: ``register_dataset(name, records, **metadata)``."""
    names = []

    def _register(name: str, records: List[Dict], **metadata) -> str:
        DatasetCatalog.register(name, lambda: [dict(r) for r in records])
        MetadataCatalog.get(name).set(**metadata)
        names.append(name)
        return name

    yield _register
    for name in names:
        _unregister(name)


def write_cityscapes_panoptic(gt_fine: Path, split: str) -> None:
    """Write ``cityscapes_panoptic_<split>{.json,/}`` from the instanceIds PNGs.

    Mirrors cityscapesscripts' ``createPanopticImgs.convert2panoptic`` (label ids, not train
    ids): one segment per instanceIds value of an evaluated label, crowd for thing labels
    below 1000, the id RGB-encoded in the PNG, string image ids.
    """
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "color": list(c["color"]),
            "supercategory": _CITYSCAPES_SUPERCATEGORY[c["name"]],
            "isthing": int(c["isthing"]),
        }
        for c in CITYSCAPES_CATEGORIES
    ]
    out_dir = gt_fine / f"cityscapes_panoptic_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for instance_png in sorted(gt_fine.glob(f"{split}/*/*_instanceIds.png")):
        ids = np.array(Image.open(instance_png)).astype(np.int64)
        file_name = instance_png.name
        image_id = file_name.replace("_gtFine_instanceIds.png", "")
        images.append(
            {
                "id": image_id,
                "width": ids.shape[1],
                "height": ids.shape[0],
                "file_name": file_name.replace("_instanceIds.png", "_leftImg8bit.png"),
            }
        )
        rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
        segments = []
        for segment_id in np.unique(ids).tolist():
            label_id = segment_id if segment_id < 1000 else segment_id // 1000
            train_id, has_instances = _CITYSCAPES_LABELS[label_id]
            if train_id == 255:
                continue
            mask = ids == segment_id
            rgb[mask] = [segment_id % 256, segment_id // 256, segment_id // 256 // 256]
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            segments.append(
                {
                    "id": segment_id,
                    "category_id": label_id,
                    "area": int(mask.sum()),
                    "bbox": [
                        int(cols[0]),
                        int(rows[0]),
                        int(cols[-1] - cols[0] + 1),
                        int(rows[-1] - rows[0] + 1),
                    ],
                    "iscrowd": int(has_instances and segment_id < 1000),
                }
            )
        out_name = file_name.replace("_instanceIds.png", "_panoptic.png")
        annotations.append({"image_id": image_id, "file_name": out_name, "segments_info": segments})
        Image.fromarray(rgb).save(out_dir / out_name)
    with open(gt_fine / f"cityscapes_panoptic_{split}.json", "w") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": categories},
            f,
            sort_keys=True,
            indent=4,
        )


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory) -> Path:
    """A root holding ``cityscapes/{gtFine,leftImg8bit}/val/frankfurt/...`` (2 frames)."""
    root = tmp_path_factory.mktemp("cityscapes_root")
    gt_fine = root / "cityscapes" / "gtFine"
    gt_dir = gt_fine / "val" / CITYSCAPES_CITY
    image_dir = root / "cityscapes" / "leftImg8bit" / "val" / CITYSCAPES_CITY
    gt_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    to_train_id = np.full(256, 255, dtype=np.uint8)
    for label_id, (train_id, _) in _CITYSCAPES_LABELS.items():
        to_train_id[label_id] = train_id
    for frame, rectangles in CITYSCAPES_FRAMES.items():
        label_ids = np.zeros((64, 128), dtype=np.uint8)
        instance_ids = np.zeros((64, 128), dtype=np.uint16)
        for label_id, instance, rows, cols in rectangles:
            label_ids[rows, cols] = label_id
            instance_ids[rows, cols] = label_id if not instance else label_id * 1000 + instance
        Image.fromarray(label_ids).save(gt_dir / f"{frame}_gtFine_labelIds.png")
        Image.fromarray(instance_ids).save(gt_dir / f"{frame}_gtFine_instanceIds.png")
        Image.fromarray(to_train_id[label_ids]).save(gt_dir / f"{frame}_gtFine_labelTrainIds.png")
        image = rng.integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
        Image.fromarray(image).save(image_dir / f"{frame}_leftImg8bit.png")
    write_cityscapes_panoptic(gt_fine, "val")
    return root


@pytest.fixture
def cityscapes_panoptic(cityscapes_root):
    """detectron2's builtin ``cityscapes_fine_panoptic_*`` names, registered on the tiny tree.

    detectron2 registers these names at import with the root it read then; they are
    re-registered here through detectron2's own ``register_all_cityscapes_panoptic`` and the
    original entries are restored afterwards. Yields "cityscapes_fine_panoptic_val".
    """
    saved = {
        name: (DatasetCatalog.data.get(name), MetadataCatalog.data.get(name))
        for name in CITYSCAPES_PANOPTIC_NAMES
    }
    for name in CITYSCAPES_PANOPTIC_NAMES:
        DatasetCatalog.data.pop(name, None)
        MetadataCatalog.data.pop(name, None)
    register_all_cityscapes_panoptic(str(cityscapes_root))
    yield "cityscapes_fine_panoptic_val"
    for name, (loader, metadata) in saved.items():
        DatasetCatalog.data.pop(name, None)
        MetadataCatalog.data.pop(name, None)
        if loader is not None:
            DatasetCatalog.register(name, loader)
        if metadata is not None:
            MetadataCatalog.data[name] = metadata
