"""Hand-made panoptic datasets in COCO panoptic format, registered like a user's own dataset.

Categories (dataset id: name): 1 "disc" and 2 "box" are things, 3 "sky" and 4 "grass" stuff.
With maskattn_d2's things-first metadata their contiguous ids are disc 0, box 1, sky 2,
grass 3. Each scene is a 32x32 (or any size) id map with its segments.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb
from PIL import Image

from maskattn_d2.data.datasets import panoptic_metadata, register_panoptic_dataset
from maskattn_d2.data.datasets.panoptic_conversion import convert_panoptic_annotations
from maskattn_d2.data.target_generator import panoptic_to_semantic

CATEGORIES = [
    {"id": 1, "name": "disc", "isthing": 1},
    {"id": 2, "name": "box", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]
DISC, BOX, SKY, GRASS = 1, 2, 3, 4  # dataset category ids
CONTIGUOUS = {DISC: 0, BOX: 1, SKY: 2, GRASS: 3}
NUM_CLASSES = 4
# Pixel colour of each dataset category (0: void), so that a model can learn the classes.
COLOURS = np.array([[0, 0, 0], [200, 40, 40], [40, 40, 200], [120, 180, 240], [60, 160, 60]])


def scene_with_things(size: int = 32):
    """Sky above grass, one disc and one box: (id map, segments)."""
    ids = np.full((size, size), 3, np.int32)
    ids[size // 2 :] = 4
    ids[4:12, 4:12] = 11
    ids[20:28, 18:28] = 12
    segments = [
        {"id": 3, "category_id": SKY},
        {"id": 4, "category_id": GRASS},
        {"id": 11, "category_id": DISC},
        {"id": 12, "category_id": BOX},
    ]
    return ids, segments


def scene_stuff_only(size: int = 32):
    """Sky above grass, no thing."""
    ids = np.full((size, size), 3, np.int32)
    ids[size // 2 :] = 4
    return ids, [{"id": 3, "category_id": SKY}, {"id": 4, "category_id": GRASS}]


def scene_all_void(size: int = 32):
    """No segment at all: every pixel is void."""
    return np.zeros((size, size), np.int32), []


SCENES = {"things": scene_with_things, "stuff_only": scene_stuff_only, "void": scene_all_void}


def mapper_sample_layout():
    """A 90x150 panoptic id map in contiguous category ids, asymmetric so that flips show:
    stuff 2 (left) and 3 (right), things 0 (two instances) and 1, a void strip. Returns
    (ids, segments_info)."""
    pan = np.full((90, 150), 1, dtype=np.int32)  # stuff 2 on the left
    pan[:, 60:] = 2  # stuff 3 on the right
    pan[10:50, 10:40] = 3  # thing 0
    pan[40:80, 90:140] = 4  # thing 1
    pan[55:75, 20:35] = 5  # thing 0, second instance
    pan[0:6, 100:150] = 0  # void
    segments = [
        {"id": 1, "category_id": 2, "iscrowd": 0},
        {"id": 2, "category_id": 3, "iscrowd": 0},
        {"id": 3, "category_id": 0, "iscrowd": 0},
        {"id": 4, "category_id": 1, "iscrowd": 0},
        {"id": 5, "category_id": 0, "iscrowd": 0},
    ]
    return pan, segments


def write_mapper_sample(root: Path, image: np.ndarray, pan: np.ndarray, segments) -> Dict:
    """Write ``image`` (uint8 RGB) and the panoptic PNG of ``pan`` as PNGs under ``root``;
    returns their detectron2 panoptic dict (contiguous category ids, image_id 1)."""
    Image.fromarray(image).save(root / "image.png")
    Image.fromarray(id2rgb(pan)).save(root / "pan.png")
    return {
        "file_name": str(root / "image.png"),
        "pan_seg_file_name": str(root / "pan.png"),
        "image_id": 1,
        "height": pan.shape[0],
        "width": pan.shape[1],
        "segments_info": segments,
    }


def write_panoptic_dataset(
    root: Path,
    scenes: Sequence[str],
    *,
    name: Optional[str] = None,
    size: int = 32,
    dataset_categories: Sequence[Dict] = CATEGORIES,
) -> Dict[str, str]:
    """Write images, panoptic PNGs, panoptic json and instances json for the named scenes
    (keys of ``SCENES``); register the dataset as ``name`` if given. Returns the paths.
    ``dataset_categories`` (default ``CATEGORIES``) must include those the scenes use."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "panoptic").mkdir(exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for image_id, scene in enumerate(scenes, start=1):
        ids, segments = SCENES[scene](size)
        stem = f"{image_id:03d}_{scene}"
        categories = panoptic_to_semantic(ids, segments, ignore_label=0)
        image = COLOURS[categories] + rng.integers(0, 20, (size, size, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(id2rgb(ids)).save(root / "panoptic" / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": size, "width": size})
        annotations.append(
            {
                "image_id": image_id,
                "file_name": f"{stem}.png",
                "segments_info": [
                    dict(s, iscrowd=0, area=int((ids == s["id"]).sum())) for s in segments
                ],
            }
        )
    data = {"images": images, "annotations": annotations, "categories": list(dataset_categories)}
    (root / "panoptic.json").write_text(json.dumps(data))
    convert_panoptic_annotations(
        data, str(root / "panoptic"), instances_json=str(root / "instances.json")
    )
    paths = {
        "image_root": str(root / "images"),
        "panoptic_root": str(root / "panoptic"),
        "panoptic_json": str(root / "panoptic.json"),
        "json_file": str(root / "instances.json"),
    }
    if name is not None:
        register_panoptic_dataset(name, panoptic_metadata(dataset_categories), paths)
    return paths


def unregister(names: List[str]) -> None:
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
