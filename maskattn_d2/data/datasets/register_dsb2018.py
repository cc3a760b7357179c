"""Registration of the DSB 2018 nuclei ("dsb2018_panoptic_{train,val}"), real images with
touching instances.

The Kaggle Data Science Bowl 2018 "stage1_train" set (CC0) converted to COCO panoptic by
``datasets/prepare_dsb2018.py``, under ``$DETECTRON2_DATASETS`` (default ``./datasets``):

    dsb2018/
      {train,val}/<image id>.png                    RGB images (8 bit)
      annotations/panoptic_{train,val}.json         panoptic json (one thing class "nucleus",
                                                    one stuff class "background")
      annotations/panoptic_{train,val}/*.png        RGB-encoded segment ids (id2rgb)
      annotations/instances_{train,val}.json        COCO instances (RLE), for instance AP
      annotations/panoptic_semseg_{train,val}/*.png contiguous semantic labels (0 nucleus,
                                                    1 background, 255 void)
      MASKATTN_COMPLETE.json                        marker written by the prepare script

This is the layout of the synthetic generator. ``$DETECTRON2_DATASETS`` is read when the paths
are resolved (registration, for the evaluators' metadata, and each load), never at import.
"""
import os
from typing import Dict, List, Optional

from .panoptic_json import coco_layout_paths, panoptic_metadata, register_panoptic_dataset

__all__ = [
    "DSB2018_CATEGORIES",
    "DSB2018_FOLDER",
    "DSB2018_SPLITS",
    "dsb2018_paths",
    "register_dsb2018_panoptic",
]

# Dataset ids: the thing first (contiguous 0), the stuff after it (contiguous 1).
DSB2018_CATEGORIES = [
    {"id": 1, "name": "nucleus", "supercategory": "cell", "isthing": 1, "color": [220, 60, 60]},
    {"id": 2, "name": "background", "supercategory": "cell", "isthing": 0, "color": [40, 40, 40]},
]
# Folder of the prepared data inside $DETECTRON2_DATASETS.
DSB2018_FOLDER = "dsb2018"
# Registered name -> split folder tag.
DSB2018_SPLITS = {"dsb2018_panoptic_train": "train", "dsb2018_panoptic_val": "val"}


def _datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def dsb2018_paths(root: str, split: str) -> Dict[str, str]:
    """Metadata paths of split ``split`` of the prepared DSB 2018 data in folder ``root``
    (the ``dsb2018`` folder itself)."""
    return coco_layout_paths(root, split)


def register_dsb2018_panoptic(root: Optional[str] = None) -> List[str]:
    """Register "dsb2018_panoptic_train" and "dsb2018_panoptic_val" (skipping existing names).

    Args:
        root: the ``dsb2018`` folder written by ``datasets/prepare_dsb2018.py``; None resolves
            ``$DETECTRON2_DATASETS/dsb2018`` (default ``datasets/dsb2018``) each time paths
            are needed.

    Returns:
        The dataset names.
    """
    metadata = panoptic_metadata(DSB2018_CATEGORIES)
    for name, split in DSB2018_SPLITS.items():
        register_panoptic_dataset(
            name,
            metadata,
            lambda split=split: dsb2018_paths(
                root if root is not None else os.path.join(_datasets_root(), DSB2018_FOLDER),
                split,
            ),
        )
    return list(DSB2018_SPLITS)
