"""Checks of panoptic dataset files, with errors that name the offending file.

The dataset loaders run the cheap checks (files exist, category ids are known) on every dict;
the mapper reads through ``read_image_checked``/``read_panoptic_png`` so that a corrupt or
missing file fails with its name instead of a bare PIL error deep inside a data-loader worker;
``check_panoptic_dataset(..., read_files=True)`` decodes every file once, for a full audit.
"""
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from panopticapi.utils import rgb2id
from PIL import Image

__all__ = [
    "check_panoptic_dataset",
    "check_segment_ids_in_png",
    "check_segments_info",
    "read_image_checked",
    "read_panoptic_png",
]


def read_image_checked(file_name: str, image_format: Optional[str] = None) -> np.ndarray:
    """detectron2's ``read_image`` with errors that name the file.

    Returns:
        (H, W, C) uint8 image in ``image_format`` ("RGB", "BGR", ...).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt or truncated image).
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file not found: {file_name}")
    try:
        return read_image(file_name, format=image_format)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode image file {file_name}: {e}") from e


def read_panoptic_png(file_name: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB encoding of a COCO panoptic PNG (``rgb2id`` gives the ids).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded.
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Panoptic annotation PNG not found: {file_name}")
    try:
        with Image.open(file_name) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode panoptic PNG {file_name}: {e}") from e


def check_segments_info(
    segments_info: Sequence[Mapping], *, num_classes: Optional[int], file_name: str
) -> None:
    """Raise ValueError naming ``file_name`` if segments have bad ids or unknown categories.

    Args:
        segments_info: detectron2 segments (contiguous "category_id").
        num_classes: number of contiguous classes; None skips the category check.
        file_name: the annotation the segments belong to (for the message).
    """
    seen = set()
    for seg in segments_info:
        seg_id = int(seg["id"])
        if seg_id <= 0 or seg_id in seen:
            raise ValueError(f"{file_name}: segment id {seg_id} is not positive or not unique")
        seen.add(seg_id)
        cat = int(seg["category_id"])
        if num_classes is not None and not 0 <= cat < num_classes:
            raise ValueError(
                f"{file_name}: segment {seg_id} has unknown category id {cat} "
                f"(expected 0..{num_classes - 1})"
            )


def check_segment_ids_in_png(
    pan_ids: np.ndarray, segments_info: Sequence[Mapping], file_name: str
) -> None:
    """Raise ValueError naming ``file_name`` if a segment of ``segments_info`` has no pixel."""
    present = np.unique(pan_ids)
    wanted = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    missing = wanted[~np.isin(wanted, present)]
    if len(missing):
        raise ValueError(f"{file_name}: segment ids {missing.tolist()} do not occur in the PNG")


def _dicts_and_classes(dataset, num_classes):
    if isinstance(dataset, str):
        dicts = DatasetCatalog.get(dataset)
        if num_classes is None:
            classes = MetadataCatalog.get(dataset).get("stuff_classes")
            num_classes = len(classes) if classes is not None else None
        return dicts, num_classes
    return list(dataset), num_classes


def check_panoptic_dataset(
    dataset: Union[str, Sequence[Mapping]],
    *,
    num_classes: Optional[int] = None,
    read_files: bool = False,
) -> int:
    """Check the dicts of a panoptic dataset; raise on the first problem, naming the file.

    Args:
        dataset: a registered dataset name or a list of detectron2 panoptic dicts.
        num_classes: number of contiguous classes (default: ``len(stuff_classes)`` of the
            dataset's metadata when a name is given; otherwise category ids are not checked).
        read_files: also decode every image and panoptic PNG, and check that image and PNG
            sizes agree and that every segment id occurs in its PNG (slow on big datasets).

    Returns:
        The number of checked dicts.

    Raises:
        FileNotFoundError: an image, panoptic PNG or semantic PNG is missing.
        ValueError: an empty dataset, a corrupt file, a size mismatch, an unknown category id
            or a segment id absent from the PNG.
    """
    dicts, num_classes = _dicts_and_classes(dataset, num_classes)
    if not dicts:
        what = f"dataset {dataset}" if isinstance(dataset, str) else "the list of dataset dicts"
        raise ValueError(f"{what} is empty")
    for d in dicts:
        for key, what in (("file_name", "Image file"), ("pan_seg_file_name", "Panoptic PNG")):
            if key not in d:
                raise ValueError(f"dataset dict of image {d.get('image_id')} has no '{key}'")
            if not os.path.isfile(d[key]):
                raise FileNotFoundError(f"{what} not found: {d[key]}")
        if "sem_seg_file_name" in d and not os.path.isfile(d["sem_seg_file_name"]):
            raise FileNotFoundError(f"Semantic PNG not found: {d['sem_seg_file_name']}")
        check_segments_info(
            d.get("segments_info", []), num_classes=num_classes, file_name=d["pan_seg_file_name"]
        )
        if read_files:
            image = read_image_checked(d["file_name"])
            pan_ids = rgb2id(read_panoptic_png(d["pan_seg_file_name"]))
            if image.shape[:2] != pan_ids.shape:
                raise ValueError(
                    f"{d['pan_seg_file_name']}: size {pan_ids.shape} differs from image "
                    f"{d['file_name']} {image.shape[:2]}"
                )
            check_segment_ids_in_png(pan_ids, d.get("segments_info", []), d["pan_seg_file_name"])
    return len(dicts)

