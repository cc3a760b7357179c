"""Low-resolution training copies of COCO-layout panoptic datasets.

The training mapper decodes every image and panoptic PNG at full size and then resizes them
to the network size (128x128), so on COCO-size images (640x480) most of its time goes into
decoding pixels the network never sees. A low-resolution copy stores each image with its
short side ``short_side`` (aspect kept) and its panoptic PNG resized by nearest neighbour
with pixel-centre sampling (the rule of ``resize_ids_nearest`` and PIL's NEAREST, which the
mapper also uses, so segment ids stay intact). Images whose short side is already at most
``short_side`` are copied unchanged. The copy keeps the panoptic json (file names, image ids,
categories), with each image's height/width and each segment's area/bbox recounted; segments
that keep no pixel at the low resolution are dropped from ``segments_info`` (the writer counts
them). It also gets the instances json and semantic PNGs, so the copy is a complete dataset.

Copies live in ``$MASKATTN_D2_CACHE/lowres/<name>_lowres<short_side>/`` (written by
``datasets/prepare_lowres_copy.py``) and are registered as "<name>_lowres<short_side>" with the
classes of the source dataset. ``DATASETS.TRAIN_LOWRES_SHORT_SIDE`` makes training read them
(:func:`lowres_train_config`); evaluation always reads the original files.
"""
import json
import os
import shutil
from multiprocessing import Pool
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image, ImageOps

from .panoptic_conversion import (
    build_directory_once,
    instance_annotations_from_panoptic,
    mask_bbox,
    semantic_from_panoptic,
    write_json_atomic,
)
from .panoptic_json import default_cache_dir, prepare_dataset_files, register_panoptic_dataset
from .validation import _to_8_bit, read_panoptic_png

__all__ = [
    "LOWRES_VERSION",
    "downscale_panoptic_sample",
    "lowres_copy_paths",
    "lowres_copy_root",
    "lowres_dataset_name",
    "lowres_size",
    "lowres_train_config",
    "register_lowres_copy",
    "write_lowres_copy",
]

# Bump when the written files change: a copy written by another version is not reused.
LOWRES_VERSION = 1
_MARKER = "MASKATTN_COMPLETE.json"
# Metadata keys that describe the classes (copied from the source dataset).
_CLASS_KEYS = (
    "thing_classes",
    "thing_colors",
    "stuff_classes",
    "stuff_colors",
    "thing_dataset_id_to_contiguous_id",
    "stuff_dataset_id_to_contiguous_id",
)


def lowres_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(height, width) of the copy: short side ``short_side``, aspect kept (rounded); an image
    whose short side is already at most ``short_side`` keeps its size (never upsampled)."""
    if short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    if min(height, width) <= short_side:
        return int(height), int(width)
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(int(round(width * scale)), 1)
    return max(int(round(height * scale)), 1), short_side


def lowres_dataset_name(name: str, short_side: int) -> str:
    """Registered name of the copy of dataset ``name``: "<name>_lowres<short_side>"."""
    return f"{name}_lowres{int(short_side)}"


def lowres_copy_root(name: str, short_side: int, cache_dir: Optional[str] = None) -> str:
    """Folder of the copy: ``<cache>/lowres/<name>_lowres<short_side>`` (default cache:
    ``$MASKATTN_D2_CACHE``, read now)."""
    base = cache_dir if cache_dir is not None else default_cache_dir()
    return os.path.join(base, "lowres", lowres_dataset_name(name, short_side))


def lowres_copy_paths(root: str) -> Dict[str, str]:
    """Metadata paths of a copy in folder ``root``."""
    return {
        "image_root": os.path.join(root, "images"),
        "panoptic_root": os.path.join(root, "panoptic"),
        "panoptic_json": os.path.join(root, "panoptic.json"),
        "json_file": os.path.join(root, "instances.json"),
        "sem_seg_root": os.path.join(root, "panoptic_semseg"),
    }


def downscale_panoptic_sample(
    image: Image.Image, pan_rgb: np.ndarray, segments_info: Sequence[Mapping], short_side: int
) -> Tuple[Image.Image, np.ndarray, List[Dict], List[Dict]]:
    """Resize one image and its panoptic annotation to short side ``short_side``.

    Args:
        image: the image as read (EXIF orientation already applied).
        pan_rgb: (H, W, 3) uint8 RGB encoding of its segment ids, H x W the image's size.
        segments_info: the json's segments (dataset category ids).
        short_side: short side of the output in pixels (no upsampling, see ``lowres_size``).

    Returns:
        image: resized with PIL's bilinear filter (antialiased when shrinking, as the
            mapper's own resize).
        pan_ids: (h, w) int32 segment ids, nearest neighbour at pixel centres.
        kept: copies of the segments still present, with "area" and "bbox" recounted.
        dropped: the segments that keep no pixel at the new size.
    """
    width, height = image.size
    if pan_rgb.shape[:2] != (height, width):
        raise ValueError(
            f"panoptic PNG size {pan_rgb.shape[:2]} differs from the image's {(height, width)}"
        )
    new_h, new_w = lowres_size(height, width, short_side)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.BILINEAR)
        # NEAREST samples every channel at the same pixel centre, so ids stay whole.
        pan_rgb = np.asarray(Image.fromarray(pan_rgb).resize((new_w, new_h), Image.NEAREST))
    pan_ids = rgb2id(np.ascontiguousarray(pan_rgb)).astype(np.int32)
    present, counts = np.unique(pan_ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    kept, dropped = [], []
    for seg in segments_info:
        if int(seg["id"]) in area:
            box = mask_bbox(pan_ids == seg["id"])
            kept.append(dict(seg, area=int(area[int(seg["id"])]), bbox=box))
        else:
            dropped.append(dict(seg))
    return image, pan_ids, kept, dropped


def _read_source_image(file_name: str) -> Image.Image:
    """The image as the mapper sees it (EXIF orientation applied, 16-bit scaled to 8), in a
    mode PIL can save as JPEG or PNG."""
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file not found: {file_name}")
    try:
        with Image.open(file_name) as img:
            image = _to_8_bit(ImageOps.exif_transpose(img))
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image.load()
            return image
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode image file {file_name}: {e}") from e


def _save_image(image: Image.Image, path: str) -> None:
    """Save in the format the file name says (JPEG at quality 95: decoding stays cheap and the
    loss is far below what the resize to the network size removes)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def _copy_one(task) -> Tuple[Dict, Dict, List[Dict], List[Dict], bool]:
    """Write one image of the copy; returns (image entry, annotation, instances, dropped
    segments, whether the image was resized)."""
    entry, ann, src, out_root, short_side, thing_ids, to_label = task
    image_file = os.path.join(src["image_root"], entry["file_name"])
    pan_file = os.path.join(src["panoptic_root"], ann["file_name"])
    image = _read_source_image(image_file)
    source_size = image.size
    try:
        image, pan_ids, kept, dropped = downscale_panoptic_sample(
            image, read_panoptic_png(pan_file), ann["segments_info"], short_side
        )
    except ValueError as e:
        raise ValueError(f"{pan_file} / {image_file}: {e}") from e
    paths = lowres_copy_paths(out_root)
    out_image = os.path.join(paths["image_root"], entry["file_name"])
    out_png = os.path.join(paths["panoptic_root"], ann["file_name"])
    for path in (out_image, out_png):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    resized = image.size != source_size
    if not resized:
        shutil.copyfile(image_file, out_image)  # already small: the very same file
    else:
        _save_image(image, out_image)
    Image.fromarray(id2rgb(pan_ids)).save(out_png)
    try:
        labels = semantic_from_panoptic(pan_ids, kept, to_label)
    except ValueError as e:
        raise ValueError(f"{pan_file}: {e}") from e
    sem_file = os.path.join(paths["sem_seg_root"], ann["file_name"])
    os.makedirs(os.path.dirname(sem_file), exist_ok=True)
    Image.fromarray(labels).save(sem_file)
    instances = instance_annotations_from_panoptic(
        pan_ids, kept, image_id=ann["image_id"], thing_category_ids=thing_ids
    )
    entry = dict(entry, width=image.size[0], height=image.size[1])
    ann = dict(ann, segments_info=kept)
    return entry, ann, instances, dropped, resized


def _source_paths(dataset_name: str) -> Dict[str, str]:
    """Paths of a registered COCO-layout panoptic dataset (its derived files created)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {dataset_name!r} is not registered (register it first, e.g. with "
            "--register-module)"
        )
    prepare_dataset_files(dataset_name)  # e.g. generates the synthetic data on first use
    meta = MetadataCatalog.get(dataset_name)
    missing = [k for k in ("panoptic_json", "panoptic_root", "image_root") if not meta.get(k)]
    if missing:
        raise ValueError(
            f"dataset {dataset_name!r} is not in the COCO panoptic layout: its metadata has no "
            f"{missing}"
        )
    paths = {k: meta.get(k) for k in ("panoptic_json", "panoptic_root", "image_root")}
    if not os.path.isfile(paths["panoptic_json"]):
        raise FileNotFoundError(
            f"Panoptic json of {dataset_name} not found: {paths['panoptic_json']}"
        )
    return paths


def _class_metadata(dataset_name: str) -> Dict:
    """The source's class metadata, with ``stuff_dataset_id_to_contiguous_id`` covering all
    classes (detectron2's own COCO metadata maps only the stuff there; maskattn_d2's loader
    and ``SemSegEvaluator`` want every class)."""
    meta = MetadataCatalog.get(dataset_name)
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        if not hasattr(meta, key):
            raise ValueError(f"dataset {dataset_name!r} has no {key} in its metadata")
    classes = {k: meta.get(k) for k in _CLASS_KEYS if meta.get(k) is not None}
    all_ids = dict(meta.stuff_dataset_id_to_contiguous_id)
    all_ids.update(meta.thing_dataset_id_to_contiguous_id)
    classes["stuff_dataset_id_to_contiguous_id"] = all_ids
    return classes


def write_lowres_copy(
    dataset_name: str,
    short_side: int = 160,
    *,
    output: Optional[str] = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: Optional[Callable[[Iterable, int], Iterable]] = None,
) -> Dict[str, int]:
    """Write the low-resolution copy of the registered dataset ``dataset_name``.

    Args:
        dataset_name: a registered panoptic dataset whose metadata has ``panoptic_json``,
            ``panoptic_root`` and ``image_root`` (maskattn_d2's datasets, detectron2's
            COCO panoptic, a user's ``register_panoptic_dataset``).
        short_side: short side of the copy's images in pixels.
        output: folder of the copy (default: ``lowres_copy_root``, where
            ``register_lowres_copy`` looks).
        workers: number of processes.
        overwrite: replace a copy written earlier (by maskattn_d2) instead of reusing it.
        progress: wraps the iterator of finished images, ``progress(iterable, total)``
            (e.g. a tqdm bar); None: no progress output.

    Returns:
        counts "images", "resized" (images whose size changed), "segments" (kept),
        "dropped_segments" and "dropped_things" (segments, and thing segments among them,
        that keep no pixel at the low resolution); empty ({}) when ``output`` already holds
        this copy (nothing is written then).

    Raises:
        KeyError / ValueError / FileNotFoundError naming the dataset or file: unregistered
        name, dataset not in the COCO layout, missing or corrupt image / PNG, ``output``
        holding other data.
    """
    src = _source_paths(dataset_name)
    classes = _class_metadata(dataset_name)
    output = output or lowres_copy_root(dataset_name, short_side)
    key = {
        "dataset": dataset_name,
        "source_json": os.path.abspath(src["panoptic_json"]),
        "short_side": int(short_side),
        "version": LOWRES_VERSION,
    }
    if overwrite and os.path.isdir(output):
        if not os.path.isfile(os.path.join(output, _MARKER)):
            raise ValueError(f"{output} was not written by maskattn_d2; not deleting it")
        shutil.rmtree(output)
    with open(src["panoptic_json"]) as f:
        panoptic = json.load(f)
    lowres_size(1, 1, short_side)  # validates short_side before any work
    images = {img["id"]: img for img in panoptic.get("images", [])}
    thing_ids = list(classes["thing_dataset_id_to_contiguous_id"])
    to_label = classes["stuff_dataset_id_to_contiguous_id"]
    # Images the json does not list are named after the PNG, as load_panoptic_json does.
    entries = [
        images.get(ann["image_id"])
        or {"id": ann["image_id"], "file_name": os.path.splitext(ann["file_name"])[0] + ".jpg"}
        for ann in panoptic["annotations"]
    ]
    counts: Dict[str, int] = {}

    def build(tmp_root: str) -> None:
        jobs = [
            (entry, ann, src, tmp_root, short_side, thing_ids, to_label)
            for entry, ann in zip(entries, panoptic["annotations"])
        ]
        if workers > 1 and len(jobs) > 1:
            with Pool(min(workers, len(jobs))) as pool:
                results = pool.imap(_copy_one, jobs, chunksize=8)
                results = list(progress(results, len(jobs)) if progress else results)
        else:
            results = map(_copy_one, jobs)
            results = list(progress(results, len(jobs)) if progress else results)
        new_images = {r[0]["id"]: r[0] for r in results}
        instances = []
        for image_instances in (r[2] for r in results):
            for inst in image_instances:
                instances.append(dict(inst, id=len(instances) + 1))
        dropped = [seg for r in results for seg in r[3]]
        copy = dict(panoptic)
        copy["annotations"] = [r[1] for r in results]
        copy["images"] = [new_images.get(img["id"], img) for img in panoptic.get("images", [])]
        paths = lowres_copy_paths(tmp_root)
        os.makedirs(paths["sem_seg_root"], exist_ok=True)  # also for an empty dataset
        write_json_atomic(copy, paths["panoptic_json"])
        write_json_atomic(
            {
                "images": copy["images"],
                "annotations": instances,
                "categories": [
                    {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
                    for c in panoptic["categories"]
                    if c.get("isthing", 0)
                ],
            },
            paths["json_file"],
        )
        thing_set = set(thing_ids)
        counts.update(
            images=len(results),
            resized=sum(r[4] for r in results),
            segments=sum(len(r[1]["segments_info"]) for r in results),
            dropped_segments=len(dropped),
            dropped_things=sum(int(s["category_id"]) in thing_set for s in dropped),
        )

    build_directory_once(output, build, key)
    return counts


def register_lowres_copy(
    dataset_name: str, short_side: int, *, root: Optional[str] = None
) -> str:
    """Register the copy written by ``write_lowres_copy`` as "<dataset_name>_lowres<S>".

    The copy gets the classes of ``dataset_name`` (registered already) and the evaluator
    metadata of ``register_panoptic_dataset``. No-op when the name exists.

    Args:
        dataset_name: the source dataset.
        short_side: short side of the copy.
        root: folder of the copy (default ``lowres_copy_root(dataset_name, short_side)``).

    Returns:
        The registered name.

    Raises:
        FileNotFoundError: the copy has not been written (the message gives the command).
    """
    name = lowres_dataset_name(dataset_name, short_side)
    if name in DatasetCatalog.list():
        return name
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered")
    folder = root or lowres_copy_root(dataset_name, short_side)
    if not os.path.isfile(os.path.join(folder, _MARKER)):
        raise FileNotFoundError(
            f"no low-resolution copy of {dataset_name} with short side {short_side} in "
            f"{folder}; write it with: python datasets/prepare_lowres_copy.py --datasets "
            f"{dataset_name} --short-side {short_side}"
        )
    register_panoptic_dataset(name, _class_metadata(dataset_name), lowres_copy_paths(folder))
    return name


def lowres_train_config(cfg):
    """``cfg`` with DATASETS.TRAIN replaced by the low-resolution copies when
    ``DATASETS.TRAIN_LOWRES_SHORT_SIDE`` > 0 (registering them), else ``cfg`` itself.

    Only the training loader uses the returned config: evaluation reads the originals.
    """
    short_side = int(cfg.DATASETS.get("TRAIN_LOWRES_SHORT_SIDE", 0))
    if short_side <= 0:
        return cfg
    names = tuple(register_lowres_copy(n, short_side) for n in cfg.DATASETS.TRAIN)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = names
    cfg.freeze()
    return cfg
