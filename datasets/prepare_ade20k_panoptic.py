#!/usr/bin/env python3
"""Convert ADE20K (ADEChallengeData2016) to the COCO panoptic format used by maskattn_d2.

Reads, under ``$DETECTRON2_DATASETS/ADEChallengeData2016``:

    images/{training,validation}/*.jpg
    annotations/{training,validation}/*.png            semantic: 0 = other, k = class k - 1
    annotations_instance/{training,validation}/*.png   R = instance class (1..100),
                                                       G = instance index (0 = none)

and writes, next to them (the layout ``register_ade20k_panoptic.py`` expects):

    ade20k_panoptic_{train,val}/*.png         RGB-encoded segment ids
    ade20k_panoptic_{train,val}.json          panoptic json; category id = 0-based SceneParsing
                                              index (Mask2Former's convention), image id = stem
    ade20k_instance_{train,val}.json          COCO instances json of the thing segments (RLE)
    ade20k_panoptic_semseg_{train,val}/*.png  semantic labels in maskattn_d2's contiguous ids
                                              (things first), 255 = void

Stuff segments come from the semantic annotation (one per stuff class present), things from
the instance annotation, pasted over the stuff (the two annotations overlap slightly).
Semantic pixels of a thing class that no instance covers become void.

Usage:
    pip install panopticapi pycocotools   # installed by scripts/setup.sh
    DETECTRON2_DATASETS=/path/to/datasets python datasets/prepare_ade20k_panoptic.py [--workers 8]
"""
import argparse
import os
from multiprocessing import Pool
from typing import Dict, List, Mapping, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

from maskattn_d2.data.datasets.ade20k_categories import (
    ADE20K_150_CATEGORIES,
    ADE20K_INSTANCE_CLASS_TO_CATEGORY_ID,
)
from maskattn_d2.data.datasets.panoptic_conversion import (
    instance_annotations_from_panoptic,
    mask_bbox,
    semantic_from_panoptic,
    write_json_atomic,
)
from maskattn_d2.data.datasets.panoptic_json import panoptic_metadata

# split tag -> folder name in ADEChallengeData2016
SPLITS = {"train": "training", "val": "validation"}


def ade20k_to_panoptic(
    semantic: np.ndarray, instance: np.ndarray
) -> Tuple[np.ndarray, List[Dict]]:
    """Panoptic segmentation of one ADE20K image from its semantic and instance PNGs.

    Args:
        semantic: (H, W) uint8 SceneParsing labels (0 = other/void, k = category k - 1).
        instance: (H, W, 3) uint8 instance annotation (R = instance class 1..100, G = instance
            index, 0 = no instance).

    Returns:
        pan_ids: (H, W) int32 segment ids (0 = void), numbered 1..n (stuff first).
        segments: dicts with "id", "category_id" (0-based SceneParsing id) and "iscrowd" (0),
            one per segment with at least one pixel.
    """
    if semantic.ndim != 2 or instance.ndim != 3 or instance.shape[:2] != semantic.shape:
        raise ValueError(
            f"expected (H, W) semantic and (H, W, 3) instance maps, got {semantic.shape} "
            f"and {instance.shape}"
        )
    is_thing = np.array([c["isthing"] for c in ADE20K_150_CATEGORIES], dtype=bool)
    pan_ids = np.zeros(semantic.shape, dtype=np.int32)
    categories = []

    # Stuff: one segment per stuff class present in the semantic map.
    for label in np.unique(semantic):
        if label == 0 or label > len(is_thing):
            continue
        if not is_thing[label - 1]:
            categories.append(int(label) - 1)
            pan_ids[semantic == label] = len(categories)

    # Things: one segment per (class, index) pair of the instance map, painted on top.
    keys = instance[..., 0].astype(np.int32) * 256 + instance[..., 1].astype(np.int32)
    keys[(instance[..., 0] == 0) | (instance[..., 1] == 0)] = 0
    for key in np.unique(keys):
        if key == 0:
            continue
        ins_class = int(key) // 256
        if ins_class not in ADE20K_INSTANCE_CLASS_TO_CATEGORY_ID:
            raise ValueError(f"unknown ADE20K instance class {ins_class}")
        categories.append(ADE20K_INSTANCE_CLASS_TO_CATEGORY_ID[ins_class])
        pan_ids[keys == key] = len(categories)

    present = set(np.unique(pan_ids).tolist())
    segments = [
        {"id": i + 1, "category_id": cat, "iscrowd": 0}
        for i, cat in enumerate(categories)
        if i + 1 in present
    ]
    return pan_ids, segments


def _convert_image(task: Tuple[str, str, str, str, str, str, Mapping]) -> Tuple[Dict, Dict, List]:
    """Convert one image; returns its json image entry, panoptic annotation and instances."""
    stem, image_file, semantic_file, instance_file, pan_dir, sem_dir, to_label = task
    for path in (image_file, semantic_file, instance_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ADE20K file not found: {path}")
    with Image.open(image_file) as img:
        width, height = img.size
    semantic = np.asarray(Image.open(semantic_file))
    instance = np.asarray(Image.open(instance_file).convert("RGB"))
    try:
        pan_ids, segments = ade20k_to_panoptic(semantic, instance)
    except ValueError as e:
        raise ValueError(f"{instance_file}: {e}") from e
    if pan_ids.shape != (height, width):
        raise ValueError(f"{semantic_file}: size {pan_ids.shape} differs from {image_file}")
    for seg in segments:
        mask = pan_ids == seg["id"]
        seg["area"], seg["bbox"] = int(mask.sum()), mask_bbox(mask)
    Image.fromarray(id2rgb(pan_ids)).save(os.path.join(pan_dir, stem + ".png"))
    labels = semantic_from_panoptic(pan_ids, segments, to_label)
    Image.fromarray(labels).save(os.path.join(sem_dir, stem + ".png"))
    thing_ids = [c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"]]
    instances = instance_annotations_from_panoptic(
        pan_ids, segments, image_id=stem, thing_category_ids=thing_ids
    )
    image_entry = {"id": stem, "file_name": stem + ".jpg", "height": height, "width": width}
    annotation = {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}
    return image_entry, annotation, instances


def convert_ade20k_split(ade_root: str, split: str, *, workers: int = 1) -> int:
    """Write the panoptic, instance and semantic files of one split (see module docstring).

    Args:
        ade_root: the ADEChallengeData2016 folder.
        split: "train" or "val".
        workers: number of processes.

    Returns:
        The number of converted images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = SPLITS[split]
    image_dir = os.path.join(ade_root, "images", folder)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"ADE20K image folder not found: {image_dir}")
    pan_dir = os.path.join(ade_root, f"ade20k_panoptic_{split}")
    sem_dir = os.path.join(ade_root, f"ade20k_panoptic_semseg_{split}")
    os.makedirs(pan_dir, exist_ok=True)
    os.makedirs(sem_dir, exist_ok=True)
    to_label = panoptic_metadata(ADE20K_150_CATEGORIES)["stuff_dataset_id_to_contiguous_id"]

    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    tasks = [
        (
            stem,
            os.path.join(image_dir, stem + ".jpg"),
            os.path.join(ade_root, "annotations", folder, stem + ".png"),
            os.path.join(ade_root, "annotations_instance", folder, stem + ".png"),
            pan_dir,
            sem_dir,
            to_label,
        )
        for stem in stems
    ]
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.map(_convert_image, tasks, chunksize=16)
    else:
        results = [_convert_image(t) for t in tasks]

    images = [r[0] for r in results]
    annotations = [r[1] for r in results]
    instances = []
    for _, _, image_instances in results:
        for ann in image_instances:
            ann["id"] = len(instances) + 1
            instances.append(ann)
    categories = [dict(c) for c in ADE20K_150_CATEGORIES]
    write_json_atomic(
        {"images": images, "annotations": annotations, "categories": categories},
        os.path.join(ade_root, f"ade20k_panoptic_{split}.json"),
    )
    write_json_atomic(
        {
            "images": images,
            "annotations": instances,
            "categories": [
                {"id": c["id"], "name": c["name"], "supercategory": ""}
                for c in categories
                if c["isthing"]
            ],
        },
        os.path.join(ade_root, f"ade20k_instance_{split}.json"),
    )
    return len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    datasets_root = os.getenv("DETECTRON2_DATASETS", "datasets")
    parser.add_argument(
        "--root",
        default=os.path.join(datasets_root, "ADEChallengeData2016"),
        help="the ADEChallengeData2016 folder (default: %(default)s)",
    )
    parser.add_argument("--splits", nargs="+", default=sorted(SPLITS), choices=sorted(SPLITS))
    parser.add_argument("--workers", type=int, default=1, help="number of processes")
    args = parser.parse_args(argv)
    for split in args.splits:
        count = convert_ade20k_split(args.root, split, workers=args.workers)
        print(f"{split}: converted {count} images into {args.root}")


if __name__ == "__main__":
    main()
