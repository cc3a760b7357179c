#!/usr/bin/env python3
"""Convert the DSB 2018 nuclei (Kaggle "stage1_train") to the COCO panoptic format of maskattn_d2.

Reads the Kaggle layout, either as the zip (``stage1_train.zip``) or as an extracted folder:

    stage1_train/<image id>/images/<image id>.png   the image (RGBA, grey or colour; 8/16 bit)
    stage1_train/<image id>/masks/<mask id>.png     one binary mask (0 / non-zero) per nucleus

and writes, under ``--output`` (default ``$DETECTRON2_DATASETS/dsb2018``; the layout that
``maskattn_d2/data/datasets/register_dsb2018.py`` registers as "dsb2018_panoptic_{train,val}"):

    {train,val}/<image id>.png                    8-bit RGB images
    annotations/panoptic_{train,val}.json         panoptic json: thing "nucleus" (id 1), stuff
                                                  "background" (id 2); image ids 1..n in the
                                                  order of the sorted Kaggle ids
    annotations/panoptic_{train,val}/<id>.png     RGB-encoded segment ids (id2rgb): background
                                                  1, nuclei 2, 3, ... in mask-file order
    annotations/instances_{train,val}.json        COCO instances json (RLE), for instance AP
    annotations/panoptic_semseg_{train,val}/*.png contiguous labels: 0 nucleus, 1 background
    MASKATTN_COMPLETE.json                        marker: the split ids (the folder is written
                                                  once, atomically)

Every pixel covered by no mask is background. Where masks overlap, the later mask (sorted file
names) wins; a mask that keeps no pixel is dropped. Without ``--splits`` every 10th image (sorted
ids) goes to "val" and the rest to "train"; with split files (one image id per line, the file's
stem names the split) only the listed images are converted.

Usage:
    DETECTRON2_DATASETS=/path/to/datasets python datasets/prepare_dsb2018.py \
        --source /path/to/stage1_train.zip --splits /path/to/train.txt /path/to/val.txt --workers 2
"""
import argparse
import io
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

from maskattn_d2.data.datasets.panoptic_conversion import (
    build_directory_once,
    instance_annotations_from_panoptic,
    mask_bbox,
    semantic_from_panoptic,
    write_json_atomic,
)
from maskattn_d2.data.datasets.panoptic_json import panoptic_metadata
from maskattn_d2.data.datasets.register_dsb2018 import DSB2018_CATEGORIES, DSB2018_FOLDER
from maskattn_d2.data.datasets.validation import _to_8_bit

logger = logging.getLogger("prepare_dsb2018")

# Bump when the conversion changes: a folder written by another version is not reused.
DSB2018_PREPARE_VERSION = 1
NUCLEUS_ID = 1  # dataset category ids (DSB2018_CATEGORIES)
BACKGROUND_ID = 2
BACKGROUND_SEGMENT = 1  # segment id of the background; nuclei are 2, 3, ...
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# <prefix><image id>/images/<image id>.png
_IMAGE_MEMBER = re.compile(r"^(.*?)([^/]+)/images/\2\.png$")


class DSBSource:
    """Read access to a Kaggle "stage1_train" set, zipped or extracted.

    ``path`` is the zip, the ``stage1_train`` folder, or a folder holding ``stage1_train``.
    Image ids are the names of the folders directly inside ``stage1_train``. Worker processes
    re-open the zip on first use (a ``ZipFile`` is not shared across processes).
    """

    def __init__(self, path: str):
        self.path = path
        self.is_zip = os.path.isfile(path)
        if self.is_zip:
            if not zipfile.is_zipfile(path):
                raise ValueError(f"{path} is neither a folder nor a zip archive")
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            self.prefix = self._zip_prefix(names)
            # image id -> {"images": [file names], "masks": [...]}; a kind is absent when the
            # archive has no such folder (not even an empty one).
            self._ids: Dict[str, Dict[str, List[str]]] = {}
            for name in names:
                if not name.startswith(self.prefix):
                    continue
                parts = name[len(self.prefix):].split("/")
                if not parts[0]:
                    continue
                entry = self._ids.setdefault(parts[0], {})
                if len(parts) >= 2 and parts[1] in ("images", "masks") and len(parts) <= 3:
                    files = entry.setdefault(parts[1], [])
                    if len(parts) == 3 and parts[2]:
                        files.append(parts[2])
        elif os.path.isdir(path):
            inner = os.path.join(path, "stage1_train")
            self.root = inner if os.path.isdir(inner) else path
            self._ids = None
        else:
            raise FileNotFoundError(f"DSB 2018 source not found: {path}")
        self._zip: Optional[zipfile.ZipFile] = None

    @staticmethod
    def _zip_prefix(names: Sequence[str]) -> str:
        prefixes = {m.group(1) for m in map(_IMAGE_MEMBER.match, names) if m}
        if not prefixes:
            raise ValueError("no '<id>/images/<id>.png' member found: not a DSB 2018 stage1 zip")
        if len(prefixes) > 1:
            raise ValueError(f"image folders under several roots: {sorted(prefixes)}")
        return prefixes.pop()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def describe(self, image_id: str, *parts: str) -> str:
        """Human-readable location of a file or folder of the source (for messages)."""
        if self.is_zip:
            return f"{self.path}:{self.prefix}{'/'.join((image_id,) + parts)}"
        return os.path.join(self.root, image_id, *parts)

    def image_ids(self) -> List[str]:
        if self.is_zip:
            return sorted(self._ids)
        return sorted(
            d
            for d in os.listdir(self.root)
            if not d.startswith(".") and os.path.isdir(os.path.join(self.root, d))
        )

    def _files(self, image_id: str, kind: str) -> List[str]:
        """Sorted file names (no folder) in ``<id>/<kind>/``; raises if the folder is missing."""
        if self.is_zip:
            files = self._ids.get(image_id, {}).get(kind)
            if files is None:
                raise FileNotFoundError(f"missing {kind} folder: {self.describe(image_id, kind)}")
            return sorted(files)
        folder = os.path.join(self.root, image_id, kind)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing {kind} folder: {folder}")
        return sorted(f for f in os.listdir(folder) if not f.startswith("."))

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def read(self, image_id: str, kind: str, file_name: str) -> bytes:
        if self.is_zip:
            return self._open_zip().read(f"{self.prefix}{image_id}/{kind}/{file_name}")
        with open(os.path.join(self.root, image_id, kind, file_name), "rb") as f:
            return f.read()

    def image_file(self, image_id: str) -> str:
        files = self._files(image_id, "images")
        expected = f"{image_id}.png"
        if expected not in files:
            found = f" (found {files})" if files else " (it is empty)"
            raise FileNotFoundError(
                f"missing image {self.describe(image_id, 'images', expected)}{found}"
            )
        return expected

    def mask_files(self, image_id: str) -> List[str]:
        return [f for f in self._files(image_id, "masks") if f.lower().endswith(".png")]


_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a DSB image: alpha dropped, grey expanded, 16 bit scaled
    (0..65535 -> 0..255, as maskattn_d2's image reader does)."""
    image = _to_8_bit(image)  # 16/32-bit grey -> "L"; refuses floating-point images
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool mask of a mask PNG: any non-zero pixel (of the grey level) is in."""
    if image.mode not in ("1", "L") + _HIGH_BIT_DEPTH_MODES:
        image = image.convert("L")
    return np.asarray(image) > 0


def _decode(data: bytes, where: str, what: str, convert):
    """``convert(PIL image)``, with any decoding error re-raised naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return convert(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"unreadable {what} {where}: {e}") from e


def dsb_panoptic(
    masks: Sequence[np.ndarray], shape: Tuple[int, int]
) -> Tuple[np.ndarray, List[Dict]]:
    """Panoptic ids of one image from its nucleus masks.

    Args:
        masks: (H, W) bool masks in file-name order; later ones are painted over earlier ones.
        shape: (H, W).

    Returns:
        pan_ids: (H, W) int32; 1 = background, nuclei 2.. (consecutive over kept masks).
        segments: dicts with id, category_id, iscrowd, area, bbox (background first, if any
            pixel is background; masks that keep no pixel are left out).
    """
    owner = np.zeros(shape, dtype=np.int32)  # 0 = background, k = mask k (1-based)
    for k, mask in enumerate(masks, start=1):
        owner[mask] = k
    counts = np.bincount(owner.reshape(-1), minlength=len(masks) + 1)
    kept = np.flatnonzero(counts[1:]) + 1  # mask indices with at least one pixel
    lut = np.zeros(len(masks) + 1, dtype=np.int32)
    lut[0] = BACKGROUND_SEGMENT
    lut[kept] = BACKGROUND_SEGMENT + 1 + np.arange(len(kept), dtype=np.int32)
    pan_ids = lut[owner]
    segments = []
    if counts[0] > 0:
        segments.append({"id": BACKGROUND_SEGMENT, "category_id": BACKGROUND_ID, "iscrowd": 0})
    segments += [{"id": int(lut[k]), "category_id": NUCLEUS_ID, "iscrowd": 0} for k in kept]
    for seg in segments:
        mask = pan_ids == seg["id"]
        seg["area"], seg["bbox"] = int(mask.sum()), mask_bbox(mask)
    return pan_ids, segments


def _convert_one(task) -> Tuple[Dict, Dict, List[Dict], int]:
    """Convert one image; returns (image entry, panoptic annotation, instances, dropped)."""
    source, image_id, number, split, out_root, to_label = task
    image_name = source.image_file(image_id)
    where = source.describe(image_id, "images", image_name)
    image = _decode(source.read(image_id, "images", image_name), where, "image", to_rgb8)
    height, width = image.shape[:2]
    masks = []
    for mask_name in source.mask_files(image_id):
        where = source.describe(image_id, "masks", mask_name)
        mask = _decode(source.read(image_id, "masks", mask_name), where, "mask", to_mask)
        if mask.shape != (height, width):
            raise ValueError(
                f"mask {where} is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}"
            )
        masks.append(mask)
    pan_ids, segments = dsb_panoptic(masks, (height, width))
    dropped = len(masks) - sum(s["category_id"] == NUCLEUS_ID for s in segments)

    stem = image_id
    Image.fromarray(image).save(os.path.join(out_root, split, stem + ".png"))
    ann_dir = os.path.join(out_root, "annotations")
    Image.fromarray(id2rgb(pan_ids)).save(os.path.join(ann_dir, f"panoptic_{split}", stem + ".png"))
    Image.fromarray(semantic_from_panoptic(pan_ids, segments, to_label)).save(
        os.path.join(ann_dir, f"panoptic_semseg_{split}", stem + ".png")
    )
    instances = instance_annotations_from_panoptic(
        pan_ids, segments, image_id=number, thing_category_ids=[NUCLEUS_ID]
    )
    image_entry = {
        "id": number,
        "file_name": stem + ".png",
        "height": height,
        "width": width,
        "dsb2018_id": image_id,
    }
    annotation = {"image_id": number, "file_name": stem + ".png", "segments_info": segments}
    return image_entry, annotation, instances, dropped


def _progress(iterable, total: int, desc: str):
    """tqdm when installed, else a log line about every 10 %."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr)
        return
    step = max(total // 10, 1)
    for i, item in enumerate(iterable, start=1):
        if i % step == 0 or i == total:
            logger.info("%s: %d / %d images", desc, i, total)
        yield item


def convert_split(
    source: DSBSource, split: str, image_ids: Sequence[str], out_root: str, *, workers: int = 1
) -> Dict[str, int]:
    """Write one split (see the module docstring) into ``out_root``.

    Returns:
        counts: "images", "nuclei" (segments written) and "dropped" (masks that kept no pixel).
    """
    ann_dir = os.path.join(out_root, "annotations")
    for d in (
        os.path.join(out_root, split),
        os.path.join(ann_dir, f"panoptic_{split}"),
        os.path.join(ann_dir, f"panoptic_semseg_{split}"),
    ):
        os.makedirs(d, exist_ok=True)
    to_label = panoptic_metadata(DSB2018_CATEGORIES)["stuff_dataset_id_to_contiguous_id"]
    tasks = [
        (source, image_id, number, split, out_root, to_label)
        for number, image_id in enumerate(sorted(image_ids), start=1)
    ]
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            results = list(
                _progress(pool.imap(_convert_one, tasks, chunksize=4), len(tasks), split)
            )
    else:
        results = list(_progress(map(_convert_one, tasks), len(tasks), split))

    images = [r[0] for r in results]
    annotations = [r[1] for r in results]
    instances = []
    for _, _, image_instances, _ in results:
        for ann in image_instances:
            ann["id"] = len(instances) + 1
            instances.append(ann)
    info = {
        "description": "DSB 2018 stage1_train nuclei (Kaggle, CC0), converted by maskattn_d2",
        "version": DSB2018_PREPARE_VERSION,
    }
    write_json_atomic(
        {"info": info, "images": images, "annotations": annotations,
         "categories": [dict(c) for c in DSB2018_CATEGORIES]},
        os.path.join(ann_dir, f"panoptic_{split}.json"),
    )
    write_json_atomic(
        {
            "info": info,
            "images": images,
            "annotations": instances,
            "categories": [
                {k: c[k] for k in ("id", "name", "supercategory")}
                for c in DSB2018_CATEGORIES
                if c["isthing"]
            ],
        },
        os.path.join(ann_dir, f"instances_{split}.json"),
    )
    return {
        "images": len(images),
        "nuclei": len(instances),
        "dropped": sum(r[3] for r in results),
    }


def read_split_files(paths: Sequence[str], available: Sequence[str]) -> Dict[str, List[str]]:
    """{split name (file stem): ids} from split files, checked against the source's ids."""
    splits: Dict[str, List[str]] = {}
    owner: Dict[str, str] = {}
    known = set(available)
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if not _SPLIT_NAME.match(name):
            raise ValueError(f"split file {path}: its name must be letters, digits, _ or -")
        if name in splits:
            raise ValueError(f"split {name!r} given twice ({path})")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split file not found: {path}")
        with open(path) as f:
            ids = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        for image_id in ids:
            if image_id not in known:
                raise ValueError(f"split file {path}: image id {image_id} is not in the source")
            if image_id in owner:
                raise ValueError(
                    f"split file {path}: image id {image_id} is listed twice (also in the "
                    f"{owner[image_id]!r} split)"
                )
            owner[image_id] = name
        if not ids:
            raise ValueError(f"split file {path} lists no image id")
        splits[name] = ids
    return splits


def default_splits(image_ids: Sequence[str], val_every: int = 10) -> Dict[str, List[str]]:
    """Every ``val_every``-th id (sorted ids, the last of each block of ``val_every``) to
    "val", the rest to "train"; with fewer than ``val_every`` (but at least 2) images, the
    last one is the val split."""
    ids = sorted(image_ids)
    val = {k for k in range(len(ids)) if k % val_every == val_every - 1}
    if not val and len(ids) >= 2:
        val = {len(ids) - 1}
    return {
        "train": [i for k, i in enumerate(ids) if k not in val],
        "val": [i for k, i in enumerate(ids) if k in val],
    }


def prepare_dsb2018(
    source_path: str,
    output: str,
    *,
    split_files: Optional[Sequence[str]] = None,
    workers: int = 1,
    overwrite: bool = False,
) -> Dict[str, Dict[str, int]]:
    """Convert a DSB 2018 "stage1_train" zip or folder into ``output`` (see module docstring).

    Returns:
        {split: counts} (see ``convert_split``); empty counts ({}) when ``output`` already
        held this conversion (nothing is written then).

    Raises:
        FileNotFoundError / ValueError naming the file or id: missing images folder,
        unreadable image or mask, split id not in the source, ``output`` holding other data.
    """
    source = DSBSource(source_path)
    available = source.image_ids()
    if not available:
        raise ValueError(f"no image folder found in {source_path}")
    splits = (
        read_split_files(split_files, available) if split_files else default_splits(available)
    )
    key = {
        "dataset": "dsb2018",
        "version": DSB2018_PREPARE_VERSION,
        "splits": {name: sorted(ids) for name, ids in sorted(splits.items())},
    }
    if overwrite and os.path.isdir(output):
        marker = os.path.join(output, "MASKATTN_COMPLETE.json")
        if not os.path.isfile(marker):
            raise ValueError(f"{output} was not written by maskattn_d2; not deleting it")
        shutil.rmtree(output)
    counts: Dict[str, Dict[str, int]] = {}

    def build(tmp_root: str) -> None:
        for name, ids in splits.items():
            counts[name] = convert_split(source, name, ids, tmp_root, workers=workers)

    build_directory_once(output, build, key)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    datasets_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument(
        "--source",
        required=True,
        help="stage1_train.zip, the stage1_train folder, or a folder holding stage1_train",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(datasets_root, DSB2018_FOLDER),
        help="output folder (default: %(default)s, i.e. $DETECTRON2_DATASETS/dsb2018)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        metavar="FILE",
        help="split files, one image id per line; the file stem names the split (train.txt -> "
        "train). Default: every 10th image to val, the rest to train",
    )
    parser.add_argument("--workers", type=int, default=1, help="number of processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output written by an earlier run"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    counts = prepare_dsb2018(
        args.source,
        args.output,
        split_files=args.splits,
        workers=max(args.workers, 1),
        overwrite=args.overwrite,
    )
    if not counts:
        print(f"{args.output} already holds this conversion; nothing to do (see --overwrite)")
        return
    for name, c in counts.items():
        print(
            f"{name}: {c['images']} images, {c['nuclei']} nuclei"
            + (f" ({c['dropped']} masks without a visible pixel dropped)" if c["dropped"] else "")
        )
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
