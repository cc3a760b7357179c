"""Data side of maskattn_d2: datasets, augmentations, target generation and the mapper.

Importing it fills ``DATASET_MAPPER_REGISTRY`` and defines the dataset registration functions;
it reads no file and no environment variable (``datasets.register_all_maskattn_datasets()``
registers the datasets).
"""
from . import datasets
from .augmentations import (
    RandomResizedCrop,
    RandomSaturation,
    RandomSquareSymmetry,
    build_test_augmentations,
    build_train_augmentations,
    eval_augmentations,
    train_augmentations,
)
from .dataset_mapper import DATASET_MAPPER_REGISTRY, MaskAttnPanopticMapper, build_dataset_mapper
from .datasets import (
    check_panoptic_dataset,
    ensure_instances_json,
    generate_synthetic_panoptic,
    register_all_maskattn_datasets,
)
from .target_generator import panoptic_to_semantic, panoptic_to_targets

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "MaskAttnPanopticMapper",
    "RandomResizedCrop",
    "RandomSaturation",
    "RandomSquareSymmetry",
    "build_dataset_mapper",
    "build_test_augmentations",
    "build_train_augmentations",
    "check_panoptic_dataset",
    "datasets",
    "ensure_instances_json",
    "generate_synthetic_panoptic",
    "panoptic_to_semantic",
    "panoptic_to_targets",
    "register_all_maskattn_datasets",
    "eval_augmentations",
    "train_augmentations",
]
