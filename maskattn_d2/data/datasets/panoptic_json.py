"""Register datasets stored in the COCO panoptic format (images, RGB-id PNGs, one json).

Every dataset maskattn_d2 registers (synthetic, the COCO sample, ADE20K) and the "Use your own
dataset" recipe of ``datasets/README.md`` go through ``register_panoptic_dataset``, which gives
one dataset name all the metadata that detectron2's ``COCOPanopticEvaluator``,
``COCOEvaluator`` and ``SemSegEvaluator`` read.

Contiguous class ids (``panoptic_metadata``): all K classes of a dataset share one contiguous
space 0..K-1 with the THING classes FIRST (0..T-1, in dataset order) and the stuff classes after
them. For COCO this is exactly detectron2's "coco_panoptic_standard" numbering. Things first is
what ``COCOEvaluator`` requires of ``thing_dataset_id_to_contiguous_id`` (values 0..T-1, with
``thing_classes`` listing the T thing names for its per-category table), and it keeps
detectron2's ``Visualizer`` (which indexes ``thing_classes`` by a thing's contiguous id)
correct. ``stuff_classes`` lists all K names and ``stuff_dataset_id_to_contiguous_id`` maps ALL
K dataset ids (things included) because ``SemSegEvaluator`` asserts that every predicted label
appears in it; a segment is a thing iff its dataset id is in the thing map.
"""
import json
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

from .validation import check_panoptic_dataset, check_panoptic_png_mode

__all__ = [
    "default_cache_dir",
    "ensure_instances_json",
    "load_panoptic_json",
    "panoptic_metadata",
    "prepare_dataset_files",
    "register_panoptic_dataset",
]

def default_cache_dir() -> str:
    """Folder for generated and derived data: ``$MASKATTN_D2_CACHE``, else
    ``~/.cache/maskattn_d2``. Read when a dataset's paths are resolved (registration and
    loading), never at import."""
    return os.path.expanduser(
        os.environ.get("MASKATTN_D2_CACHE") or os.path.join("~", ".cache", "maskattn_d2")
    )


# Metadata keys holding paths; they follow the dataset's path resolver (see below).
PATH_KEYS = ("image_root", "panoptic_root", "panoptic_json", "json_file", "sem_seg_root")


def coco_layout_paths(root: str, split: str) -> Dict[str, str]:
    """Metadata paths of split ``split`` of a dataset written in the COCO panoptic layout of
    this project's generators and prepare scripts (``<root>/<split>/`` images and
    ``<root>/annotations/{panoptic,instances,panoptic_semseg}_<split>...``)."""
    ann = os.path.join(root, "annotations")
    return {
        "image_root": os.path.join(root, split),
        "panoptic_root": os.path.join(ann, f"panoptic_{split}"),
        "panoptic_json": os.path.join(ann, f"panoptic_{split}.json"),
        "json_file": os.path.join(ann, f"instances_{split}.json"),
        "sem_seg_root": os.path.join(ann, f"panoptic_semseg_{split}"),
    }


def _fallback_color(index: int) -> List[int]:
    """A deterministic colour for categories that come without one."""
    return [(53 * index + 71) % 256, (97 * index + 29) % 256, (151 * index + 113) % 256]


def panoptic_metadata(categories: Sequence[Mapping]) -> Dict:
    """detectron2 panoptic metadata (classes, colours, id maps) from COCO-style categories.

    Args:
        categories: dicts with "id", "name", "isthing" and optionally "color" ([r, g, b]),
            e.g. the "categories" of a COCO panoptic json.

    Returns:
        dict with thing_classes, thing_colors (T things), stuff_classes, stuff_colors (all K
        classes), thing_dataset_id_to_contiguous_id (T entries, values 0..T-1) and
        stuff_dataset_id_to_contiguous_id (all K entries, values 0..K-1); things come first
        (see the module docstring).
    """
    ids = [c["id"] for c in categories]
    if not categories or len(set(ids)) != len(ids):
        raise ValueError(f"categories must be non-empty with unique ids, got ids {ids}")
    things = [c for c in categories if c.get("isthing", 0)]
    ordered = things + [c for c in categories if not c.get("isthing", 0)]
    colors = [list(c.get("color") or _fallback_color(i)) for i, c in enumerate(ordered)]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": colors[: len(things)],
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered)},
    }


def load_panoptic_json(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    metadata: Mapping,
    *,
    sem_seg_root: Optional[str] = None,
) -> List[Dict]:
    """Load a COCO-format panoptic json into detectron2 panoptic dicts.

    Args:
        json_file: the panoptic json (images, annotations, categories).
        image_root: folder of the images named by ``images[i]["file_name"]`` (or, for
            annotations whose image is not listed, the PNG's stem + ".jpg", as COCO).
        panoptic_root: folder of the panoptic PNGs named by ``annotations[i]["file_name"]``.
        metadata: has thing_/stuff_dataset_id_to_contiguous_id (see ``panoptic_metadata``).
        sem_seg_root: optional folder of semantic PNGs with the panoptic PNGs' names; if it
            exists, each dict gets "sem_seg_file_name" (for ``SemSegEvaluator``).

    Returns:
        One dict per annotated image: file_name, image_id, height and width (when the json
        lists the image), pan_seg_file_name, segments_info (id, contiguous category_id,
        iscrowd, area, bbox, isthing) and, with an existing ``sem_seg_root``,
        sem_seg_file_name.

    Raises:
        FileNotFoundError: the json, an image or a PNG is missing.
        ValueError: a segment has a category id that is not in the metadata.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Panoptic json not found: {json_file}")
    with open(json_file) as f:
        info = json.load(f)
    images = {img["id"]: img for img in info.get("images", [])}
    thing_map = metadata["thing_dataset_id_to_contiguous_id"]
    stuff_map = metadata["stuff_dataset_id_to_contiguous_id"]

    # Semantic PNGs are optional (maskattn_d2's evaluators derive semantic ground truth from
    # the panoptic PNGs): without the folder the dicts simply have no "sem_seg_file_name".
    with_semantic = sem_seg_root is not None and os.path.isdir(sem_seg_root)
    if sem_seg_root is not None and not with_semantic:
        logging.getLogger(__name__).warning(
            f"Semantic PNG folder {sem_seg_root} not found: dicts of {json_file} get no "
            "'sem_seg_file_name'"
        )
    dicts = []
    for ann in info["annotations"]:
        image = images.get(ann["image_id"])
        image_name = (
            image["file_name"] if image else os.path.splitext(ann["file_name"])[0] + ".jpg"
        )
        segments = []
        for seg in ann["segments_info"]:
            dataset_id = seg["category_id"]
            if dataset_id in thing_map:
                category_id, isthing = thing_map[dataset_id], True
            elif dataset_id in stuff_map:
                category_id, isthing = stuff_map[dataset_id], False
            else:
                raise ValueError(
                    f"{json_file}: segment {seg['id']} of {ann['file_name']} has unknown "
                    f"category id {dataset_id}"
                )
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": category_id,
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "area": seg.get("area"),
                    "bbox": seg.get("bbox"),
                    "isthing": isthing,
                }
            )
        record = {
            "file_name": os.path.join(image_root, image_name),
            "image_id": ann["image_id"],
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        }
        if image:
            record["height"], record["width"] = int(image["height"]), int(image["width"])
        if with_semantic:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        dicts.append(record)
    check_panoptic_dataset(dicts, num_classes=len(stuff_map))
    # A dataset written with greyscale PNGs would train on all-void targets: read the first
    # PNG's header now (cheap) and fail naming it; the mapper checks every file it reads.
    check_panoptic_png_mode(dicts[0]["pan_seg_file_name"])
    return dicts


PathsLike = Union[Mapping[str, str], Callable[[], Mapping[str, str]]]


class _Entry:
    """What ``register_panoptic_dataset`` keeps per name to resolve paths and derive files."""

    def __init__(self, paths: PathsLike, prepare: Optional[Callable[[Mapping], None]]):
        self._paths = paths
        self.prepare = prepare

    def paths(self) -> Dict[str, str]:
        paths = dict(self._paths() if callable(self._paths) else self._paths)
        unknown = set(paths) - set(PATH_KEYS)
        missing = {"image_root", "panoptic_root", "panoptic_json"} - set(paths)
        if unknown or missing:
            raise ValueError(
                f"paths must use the keys {PATH_KEYS}; unknown {unknown}, missing {missing}"
            )
        return {k: v for k, v in paths.items() if v is not None}


_REGISTERED: Dict[str, _Entry] = {}


def _refresh_metadata_paths(name: str) -> Dict[str, str]:
    """Resolve the paths of ``name`` now and update its metadata where they changed."""
    paths = _REGISTERED[name].paths()
    meta = MetadataCatalog.get(name)
    for key, value in paths.items():
        if meta.get(key) != value:
            if hasattr(meta, key):
                # Metadata refuses to overwrite a value; this is our own entry, so replace it.
                delattr(meta, key)
            setattr(meta, key, value)
    return paths


def register_panoptic_dataset(
    name: str,
    metadata: Mapping,
    paths: PathsLike,
    *,
    prepare: Optional[Callable[[Mapping], None]] = None,
) -> bool:
    """Register a COCO-format panoptic dataset under ``name`` (no-op if already registered).

    Args:
        name: dataset name for ``DatasetCatalog``/``MetadataCatalog``.
        metadata: class metadata, e.g. ``panoptic_metadata(categories)``.
        paths: dict, or a callable returning one, with "image_root", "panoptic_root",
            "panoptic_json" and optionally "json_file" (COCO instances json, for
            ``COCOEvaluator``) and "sem_seg_root" (semantic PNGs, for ``SemSegEvaluator``).
            A callable is called at registration (to fill the metadata) and again each time
            the dataset is loaded; if the paths changed (e.g. an environment variable was set
            in between) the metadata is updated, so dicts and evaluators agree.
        prepare: optional callable ``prepare(paths)`` run before loading and by
            ``ensure_instances_json``; it creates derived or generated files (idempotent).

    Returns:
        True if registered now, False if ``name`` already existed.
    """
    if name in DatasetCatalog.list():
        return False
    entry = _Entry(paths, prepare)
    entry.paths()  # fail on malformed paths before anything is registered
    _REGISTERED[name] = entry
    meta_dict = dict(metadata)

    def _load():
        resolved = prepare_dataset_files(name)
        return load_panoptic_json(
            resolved["panoptic_json"],
            resolved["image_root"],
            resolved["panoptic_root"],
            meta_dict,
            sem_seg_root=resolved.get("sem_seg_root"),
        )

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        **meta_dict,
    )
    _refresh_metadata_paths(name)
    return True


def prepare_dataset_files(name: str) -> Dict[str, str]:
    """Resolve the paths of a dataset registered here and create its derived files.

    Returns:
        The resolved paths (empty for datasets not registered by ``register_panoptic_dataset``,
        e.g. detectron2's builtin ones).
    """
    entry = _REGISTERED.get(name)
    if entry is None:
        return {}
    paths = _refresh_metadata_paths(name)
    if entry.prepare is not None:
        entry.prepare(paths)
    return paths


def ensure_instances_json(dataset_name: str) -> str:
    """Path of the COCO instances json of a panoptic dataset, creating it if it is derived.

    Call it before building a ``COCOEvaluator`` (which reads ``metadata.json_file``): for the
    synthetic dataset it generates the data, for the COCO sample it derives the json from
    the panoptic annotation into the cache. Also works for detectron2's builtin datasets.

    Raises:
        ValueError: the dataset has no ``json_file`` in its metadata.
        FileNotFoundError: the json does not exist (and cannot be derived).
    """
    prepare_dataset_files(dataset_name)
    path = MetadataCatalog.get(dataset_name).get("json_file")
    if path is None:
        raise ValueError(f"dataset {dataset_name} has no instances json (metadata 'json_file')")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"instances json of {dataset_name} not found: {path} (see datasets/README.md)"
        )
    return path
