"""Registration of ADE20K panoptic ("ade20k_panoptic_{train,val}"), as Mask2Former lays it out.

Expected under ``$DETECTRON2_DATASETS`` (default ``./datasets``), created from
ADEChallengeData2016 by ``datasets/prepare_ade20k_panoptic.py``:

    ADEChallengeData2016/
      images/{training,validation}/*.jpg
      ade20k_panoptic_{train,val}.json            panoptic json (category id = 0-based
                                                  SceneParsing index, Mask2Former's format)
      ade20k_panoptic_{train,val}/*.png           RGB-encoded segment ids
      ade20k_panoptic_semseg_{train,val}/*.png    optional: semantic labels in maskattn_d2's
                                                  contiguous ids (things first; 255 = void)
      ade20k_instance_{train,val}.json            COCO instances json (things), for AP

Note the semantic PNGs: Mask2Former's ``annotations_detectron2/`` label classes by SceneParsing
index, but the contiguous ids here put the 100 thing classes first (see ``panoptic_json``), so
the semantic ground truth is derived from the panoptic annotation into its own folder.
``$DETECTRON2_DATASETS`` is read when the paths are resolved (registration, for the evaluators'
metadata, and each load), never at import.
"""
import os
from typing import Dict, List, Optional

from .ade20k_categories import ADE20K_150_CATEGORIES
from .panoptic_json import panoptic_metadata, register_panoptic_dataset

__all__ = ["ade20k_panoptic_paths", "register_ade20k_panoptic"]

# name -> (image folder of ADEChallengeData2016, split tag of the derived files)
_PREDEFINED_SPLITS_ADE20K_PANOPTIC = {
    "ade20k_panoptic_train": ("training", "train"),
    "ade20k_panoptic_val": ("validation", "val"),
}


def _datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def ade20k_panoptic_paths(root: str, image_dir: str, split: str) -> Dict[str, str]:
    """Metadata paths of one ADE20K panoptic split under ``root`` (the datasets folder)."""
    base = os.path.join(root, "ADEChallengeData2016")
    return {
        "image_root": os.path.join(base, "images", image_dir),
        "panoptic_root": os.path.join(base, f"ade20k_panoptic_{split}"),
        "panoptic_json": os.path.join(base, f"ade20k_panoptic_{split}.json"),
        "json_file": os.path.join(base, f"ade20k_instance_{split}.json"),
        "sem_seg_root": os.path.join(base, f"ade20k_panoptic_semseg_{split}"),
    }


def register_ade20k_panoptic(root: Optional[str] = None) -> List[str]:
    """Register "ade20k_panoptic_train" and "ade20k_panoptic_val" (skipping existing names).

    Args:
        root: the datasets folder holding ADEChallengeData2016; None resolves
            ``$DETECTRON2_DATASETS`` (default "datasets") each time paths are needed.

    Returns:
        The dataset names.
    """
    metadata = panoptic_metadata(ADE20K_150_CATEGORIES)
    for name, (image_dir, split) in _PREDEFINED_SPLITS_ADE20K_PANOPTIC.items():
        register_panoptic_dataset(
            name,
            metadata,
            lambda image_dir=image_dir, split=split: ade20k_panoptic_paths(
                root if root is not None else _datasets_root(), image_dir, split
            ),
        )
    return list(_PREDEFINED_SPLITS_ADE20K_PANOPTIC)
