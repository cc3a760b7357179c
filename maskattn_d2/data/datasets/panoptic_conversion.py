"""Derive COCO-instances and semantic annotations from COCO panoptic annotations.

Used by the synthetic generator, by the COCO sample (whose instance json and semantic PNGs are
derived into the cache) and by the ``datasets/prepare_*.py`` scripts. The per-image functions are
pure; ``convert_panoptic_annotations`` and ``build_directory_once`` write files.
"""
import json
import os
import shutil
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from panopticapi.utils import rgb2id
from PIL import Image

from ..target_generator import panoptic_to_semantic
from .validation import read_panoptic_png

__all__ = [
    "build_directory_once",
    "convert_panoptic_annotations",
    "instance_annotations_from_panoptic",
    "mask_bbox",
    "read_panoptic_ids",
    "semantic_from_panoptic",
    "write_json_atomic",
]


def mask_bbox(mask: np.ndarray) -> List[int]:
    """COCO box ``[x, y, w, h]`` (integers) of the non-zero pixels of a (H, W) mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def read_panoptic_ids(png_file: str) -> np.ndarray:
    """(H, W) int32 segment ids of a COCO panoptic PNG (RGB-encoded ids); a PNG that is not
    RGB (e.g. greyscale) raises ValueError naming it (see ``read_panoptic_png``)."""
    return rgb2id(read_panoptic_png(png_file))


def semantic_from_panoptic(
    pan_ids: np.ndarray,
    segments_info: Sequence[Mapping],
    dataset_id_to_label: Mapping[int, int],
    *,
    ignore_label: int = 255,
) -> np.ndarray:
    """Semantic label map of a panoptic annotation whose segments carry dataset category ids.

    Args:
        pan_ids: (H, W) segment ids.
        segments_info: dicts with "id" and dataset "category_id" (as in the panoptic json).
        dataset_id_to_label: dataset category id -> label written in the map.
        ignore_label: label of void pixels (must fit in uint8).

    Returns:
        (H, W) uint8 label map; crowd segments keep their class.
    """
    converted = []
    for seg in segments_info:
        cat = int(seg["category_id"])
        if cat not in dataset_id_to_label:
            raise ValueError(f"segment {seg['id']} has unknown category id {cat}")
        converted.append({"id": seg["id"], "category_id": dataset_id_to_label[cat]})
    labels = panoptic_to_semantic(pan_ids, converted, ignore_label=ignore_label)
    if labels.size and labels.max() > 255:
        raise ValueError(f"labels must fit in uint8, got a maximum of {labels.max()}")
    return labels.astype(np.uint8)


def instance_annotations_from_panoptic(
    pan_ids: np.ndarray,
    segments_info: Sequence[Mapping],
    *,
    image_id,
    thing_category_ids: Sequence[int],
    first_annotation_id: int = 1,
) -> List[Dict]:
    """COCO instance annotations (RLE masks) of the thing segments of one panoptic annotation.

    Args:
        pan_ids: (H, W) segment ids.
        segments_info: dicts with "id", dataset "category_id" and optionally "iscrowd".
        image_id: id of the image in the instances json.
        thing_category_ids: dataset category ids of thing classes; other segments are skipped.
        first_annotation_id: id of the first returned annotation (then consecutive).

    Returns:
        list of dicts with id, image_id, category_id, segmentation (compressed RLE with str
        counts), area, bbox ([x, y, w, h]) and iscrowd; segments absent from ``pan_ids`` are
        skipped.
    """
    things = set(int(c) for c in thing_category_ids)
    annotations = []
    for seg in segments_info:
        if int(seg["category_id"]) not in things:
            continue
        mask = pan_ids == seg["id"]
        if not mask.any():
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": first_annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": int(seg["category_id"]),
                "segmentation": rle,
                "area": int(mask.sum()),
                "bbox": mask_bbox(mask),
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
        )
    return annotations


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def convert_panoptic_annotations(
    panoptic_json: Mapping,
    panoptic_root: str,
    *,
    instances_json: Optional[str] = None,
    semantic_dir: Optional[str] = None,
    dataset_id_to_label: Optional[Mapping[int, int]] = None,
    ignore_label: int = 255,
) -> None:
    """Write the instances json and/or the semantic PNGs of a COCO panoptic split.

    Args:
        panoptic_json: the loaded panoptic json (images, annotations, categories with
            "isthing").
        panoptic_root: folder of the panoptic PNGs named by ``annotations[i]["file_name"]``.
        instances_json: where to write the COCO instances json (things only), or None.
        semantic_dir: folder for semantic PNGs (same file names as the panoptic PNGs), or None.
        dataset_id_to_label: dataset category id -> semantic label; required with
            ``semantic_dir``.
        ignore_label: semantic label of void pixels.
    """
    if semantic_dir is not None and dataset_id_to_label is None:
        raise ValueError("semantic_dir needs dataset_id_to_label")
    categories = panoptic_json["categories"]
    thing_ids = [c["id"] for c in categories if c.get("isthing", 0)]
    if semantic_dir is not None:
        os.makedirs(semantic_dir, exist_ok=True)
    annotations = []
    for ann in panoptic_json["annotations"]:
        png_file = os.path.join(panoptic_root, ann["file_name"])
        if not os.path.isfile(png_file):
            raise FileNotFoundError(f"Panoptic PNG not found: {png_file}")
        pan_ids = read_panoptic_ids(png_file)
        if instances_json is not None:
            annotations += instance_annotations_from_panoptic(
                pan_ids,
                ann["segments_info"],
                image_id=ann["image_id"],
                thing_category_ids=thing_ids,
                first_annotation_id=len(annotations) + 1,
            )
        if semantic_dir is not None:
            try:
                labels = semantic_from_panoptic(
                    pan_ids, ann["segments_info"], dataset_id_to_label, ignore_label=ignore_label
                )
            except ValueError as e:
                raise ValueError(f"{png_file}: {e}") from e
            Image.fromarray(labels).save(os.path.join(semantic_dir, ann["file_name"]))
    if instances_json is not None:
        write_json_atomic(
            {
                "images": panoptic_json["images"],
                "annotations": annotations,
                "categories": [
                    {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
                    for c in categories
                    if c.get("isthing", 0)
                ],
            },
            instances_json,
        )


_MARKER = "MASKATTN_COMPLETE.json"


def build_directory_once(final_dir: str, build: Callable[[str], None], key: Mapping) -> bool:
    """Create ``final_dir`` with ``build`` exactly once, safely across processes.

    ``build(tmp_dir)`` fills a private temporary sibling folder, which then gets a marker file
    holding ``key`` and is renamed to ``final_dir`` in one atomic step. Concurrent callers
    (e.g. several DDP workers) may all build; the first rename wins and the others discard
    their copy, so readers never see a partial folder.

    Args:
        final_dir: folder to create; it may exist empty.
        build: callable writing the content into the folder it is given.
        key: JSON-serialisable description of the content; a later call with another key
            for the same folder raises instead of silently reusing stale files.

    Returns:
        True if this call built the folder, False if it already existed (or another process
        won the race).
    """
    key = json.loads(json.dumps(key))

    def _existing() -> bool:
        marker = os.path.join(final_dir, _MARKER)
        if os.path.isfile(marker):
            with open(marker) as f:
                found = json.load(f)
            if found != key:
                raise ValueError(
                    f"{final_dir} holds other generated data ({found}, expected {key}); "
                    "delete it or choose another folder"
                )
            return True
        if os.path.isdir(final_dir) and os.listdir(final_dir):
            raise ValueError(f"{final_dir} exists and was not generated by maskattn_d2")
        return False

    if _existing():
        return False
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(
        parent, f".{os.path.basename(final_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    )
    os.makedirs(tmp_dir)
    try:
        build(tmp_dir)
        write_json_atomic(key, os.path.join(tmp_dir, _MARKER))
        try:
            # rename() replaces an empty folder but fails on a non-empty one (lost race).
            os.rename(tmp_dir, final_dir)
        except OSError:
            if _existing():
                return False
            raise
        return True
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
