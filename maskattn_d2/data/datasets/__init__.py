"""Datasets of maskattn_d2: registration, the synthetic generator and file checks.

Importing this package registers nothing; ``register_all_maskattn_datasets()`` does (it is
called from ``maskattn_d2/__init__.py``). COCO panoptic and Cityscapes panoptic use
detectron2's own builtin registrations ("coco_2017_{train,val}_panoptic",
"cityscapes_fine_panoptic_{train,val}").
"""
from .lowres_copy import (
    lowres_dataset_name,
    lowres_train_config,
    register_lowres_copy,
    write_lowres_copy,
)
from .panoptic_json import (
    default_cache_dir,
    ensure_instances_json,
    load_panoptic_json,
    panoptic_metadata,
    prepare_dataset_files,
    register_panoptic_dataset,
)
from .register_ade20k_panoptic import register_ade20k_panoptic
from .register_coco_mini import COCO_MINI_NAME, register_coco_mini_panoptic
from .register_dsb2018 import DSB2018_CATEGORIES, register_dsb2018_panoptic
from .register_synthetic import (
    SYNTHETIC_PREFIX,
    TOUCHING_NUM_TRAIN,
    TOUCHING_NUM_VAL,
    TOUCHING_PREFIX,
    register_synthetic_panoptic,
)
from .synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_panoptic, render_scene
from .validation import check_panoptic_dataset, read_image_checked, read_panoptic_png

__all__ = [
    "COCO_MINI_NAME",
    "DSB2018_CATEGORIES",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_PREFIX",
    "TOUCHING_PREFIX",
    "check_panoptic_dataset",
    "default_cache_dir",
    "ensure_instances_json",
    "generate_synthetic_panoptic",
    "load_panoptic_json",
    "lowres_dataset_name",
    "lowres_train_config",
    "panoptic_metadata",
    "prepare_dataset_files",
    "read_image_checked",
    "read_panoptic_png",
    "register_ade20k_panoptic",
    "register_all_maskattn_datasets",
    "register_coco_mini_panoptic",
    "register_dsb2018_panoptic",
    "register_lowres_copy",
    "register_panoptic_dataset",
    "register_synthetic_panoptic",
    "render_scene",
    "write_lowres_copy",
]


def register_all_maskattn_datasets() -> None:
    """Register maskattn_d2's datasets; safe to call more than once.

    Names: "maskattn_synthetic_panoptic_{train,val}" and the touching layout
    "maskattn_synthetic_touching_panoptic_{train,val}" (256 / 32 images; both generated into
    ``$MASKATTN_D2_CACHE`` on first use), "coco_mini_panoptic_val" (the 3-image COCO sample of
    the repository), "ade20k_panoptic_{train,val}" and "dsb2018_panoptic_{train,val}" (both
    under ``$DETECTRON2_DATASETS``; prepared by ``datasets/prepare_*.py``). Paths are resolved
    from the environment now (detectron2's evaluators read them from the metadata) and again
    when a dataset is loaded; no file is read or written until then.
    """
    register_synthetic_panoptic()
    register_synthetic_panoptic(
        TOUCHING_PREFIX,
        num_train=TOUCHING_NUM_TRAIN,
        num_val=TOUCHING_NUM_VAL,
        touching=True,
    )
    register_coco_mini_panoptic()
    register_ade20k_panoptic()
    register_dsb2018_panoptic()
