"""Registration of the 3-image COCO panoptic val2017 sample shipped in the repository.

"coco_mini_panoptic_val" reads ``datasets/coco_panoptic_val2017_mini`` of the repository (or
``$MASKATTN_D2_COCO_MINI``). Its classes and contiguous ids are those of COCO panoptic (133
classes, 80 things, the numbering of detectron2's "coco_panoptic_standard" metadata). The
sample has no instances json and no semantic PNGs; both are derived from the panoptic
annotation into ``$MASKATTN_D2_CACHE`` the first time the dataset is loaded or
``ensure_instances_json("coco_mini_panoptic_val")`` is called. The environment variables are
read when paths are resolved (registration and loading), never at import; the metadata must
hold the final paths because detectron2's evaluators read them.
"""
import hashlib
import json
import os
from typing import Dict, Optional

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .panoptic_conversion import build_directory_once, convert_panoptic_annotations
from .panoptic_json import default_cache_dir, panoptic_metadata, register_panoptic_dataset

__all__ = ["coco_mini_paths", "coco_mini_root", "register_coco_mini_panoptic"]

COCO_MINI_NAME = "coco_mini_panoptic_val"
# Bump when the derived files change.
_DERIVED_VERSION = 1


def coco_mini_root() -> str:
    """``$MASKATTN_D2_COCO_MINI``, else ``<repository>/datasets/coco_panoptic_val2017_mini``."""
    override = os.environ.get("MASKATTN_D2_COCO_MINI")
    if override:
        return os.path.expanduser(override)
    repo = os.path.abspath(__file__)
    for _ in range(4):  # <repo>/maskattn_d2/data/datasets/register_coco_mini.py
        repo = os.path.dirname(repo)
    return os.path.join(repo, "datasets", "coco_panoptic_val2017_mini")


def coco_mini_paths(root: str, cache_dir: Optional[str] = None) -> Dict[str, str]:
    """Metadata paths of the sample under ``root``; derived files go to a folder of the cache
    named after ``root`` (so two copies of the sample never share derived files)."""
    root = os.path.abspath(root)
    ann = os.path.join(root, "annotations")
    digest = hashlib.sha1(root.encode("utf-8")).hexdigest()[:12]
    derived = os.path.join(cache_dir or default_cache_dir(), f"coco_mini_{digest}")
    return {
        "image_root": os.path.join(root, "val2017"),
        "panoptic_root": os.path.join(ann, "panoptic_val2017"),
        "panoptic_json": os.path.join(ann, "panoptic_val2017.json"),
        "json_file": os.path.join(derived, "instances_val2017.json"),
        "sem_seg_root": os.path.join(derived, "panoptic_semseg_val2017"),
    }


def _derive_files(paths: Dict[str, str]) -> None:
    """Create the instances json and semantic PNGs of the sample in the cache (once)."""
    derived = os.path.dirname(paths["json_file"])
    metadata = panoptic_metadata(COCO_CATEGORIES)

    def build(tmp_dir: str) -> None:
        if not os.path.isfile(paths["panoptic_json"]):
            raise FileNotFoundError(f"Panoptic json not found: {paths['panoptic_json']}")
        with open(paths["panoptic_json"]) as f:
            panoptic = json.load(f)
        convert_panoptic_annotations(
            panoptic,
            paths["panoptic_root"],
            instances_json=os.path.join(tmp_dir, os.path.basename(paths["json_file"])),
            semantic_dir=os.path.join(tmp_dir, os.path.basename(paths["sem_seg_root"])),
            dataset_id_to_label=metadata["stuff_dataset_id_to_contiguous_id"],
        )

    key = {"source": paths["panoptic_json"], "version": _DERIVED_VERSION}
    build_directory_once(derived, build, key)


def register_coco_mini_panoptic(name: str = COCO_MINI_NAME, root: Optional[str] = None) -> bool:
    """Register the COCO sample as ``name`` (no-op if the name exists).

    Args:
        name: dataset name.
        root: the sample's folder; None resolves ``coco_mini_root()`` each time paths are
            needed.

    Returns:
        True if registered now.
    """
    return register_panoptic_dataset(
        name,
        panoptic_metadata(COCO_CATEGORIES),
        lambda: coco_mini_paths(root if root is not None else coco_mini_root()),
        prepare=_derive_files,
    )
