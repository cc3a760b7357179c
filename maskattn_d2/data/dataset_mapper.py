"""Dataset mapper: detectron2 panoptic dicts -> network-size image and training targets."""
import logging
from typing import Dict, Iterable, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry
from panopticapi.utils import rgb2id

from .augmentations import build_test_augmentations, build_train_augmentations
from .datasets.validation import (
    check_segments_info,
    read_image_checked,
    read_panoptic_png,
    unlisted_segment_ids,
)
from .target_generator import panoptic_to_targets

__all__ = ["DATASET_MAPPER_REGISTRY", "MaskAttnPanopticMapper", "build_dataset_mapper"]

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers, selected by ``cfg.INPUT.DATASET_MAPPER_NAME``.

A registered class is built as ``cls(cfg, is_train)`` (``@configurable`` with ``from_config``)
and called with one detectron2 dataset dict; it returns the dict the model consumes.
"""


@DATASET_MAPPER_REGISTRY.register()
class MaskAttnPanopticMapper:
    """Map a detectron2 panoptic dataset dict to MaskAttn-UNet's inputs and targets.

    Steps:

    1. Copy the dict and its "segments_info" entries, so the dataset's copy is never
       modified (the mapper only adds keys; the other values are shared: a deep copy of a
       dict with a few dozen segments takes ~0.3 ms, a tenth of mapping a small image).
    2. Read the image in ``image_format`` and the panoptic PNG; a missing or corrupt file
       raises an error naming it. Check the image and PNG sizes agree and the segments'
       category ids are known.
    3. Apply the augmentations through ``T.AugInput`` to the image and to the PNG's RGB
       encoding of the segment ids (nearest sampling on each channel keeps every id intact;
       detectron2 resizes only uint8 maps with PIL's nearest, which is why the ids travel
       RGB-encoded). The augmentations must end at ``network_size`` (a stretch resize).
    4. Decode the ids (ids missing from ``segments_info`` are void, as in panopticapi's
       evaluation, with a warning once per file) and build the targets with
       :func:`~maskattn_d2.data.target_generator.panoptic_to_targets`.
    5. Return the dict with "image" (3, h, w) uint8 at network size (the model normalises),
       "sem_seg" (h, w) int64 (contiguous class, ``ignore_label`` for void; crowd keeps its
       class) and "instance_ids" (h, w) int64 (0 = no usable instance: stuff, void, crowd or
       fewer than ``min_instance_pixels`` pixels; else 1..n), plus the original keys, with
       "height"/"width" the ORIGINAL image size (so outputs are resized back to it).

    With ``is_train`` False (inference and evaluation) only the image is read and
    augmented: the dict needs just "file_name" (and optionally "height"/"width"), no panoptic
    PNG is decoded and no targets are built (evaluators read the ground truth themselves).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        network_size: Sequence[int],
        ignore_label: int,
        thing_ids: Iterable[int],
        min_instance_pixels: int,
        num_classes: Optional[int] = None,
    ):
        """
        Args:
            is_train: whether the mapper is used in training: only then are the panoptic PNG
                read and the targets built (the augmentations are set by ``augmentations``).
            augmentations: detectron2 augmentations, ending at ``network_size``.
            image_format: format of the image for ``read_image`` ("RGB", "BGR", ...).
            network_size: (height, width) every output has.
            ignore_label: semantic label of void pixels.
            thing_ids: contiguous ids of thing classes.
            min_instance_pixels: instances with fewer pixels at network size get id 0.
            num_classes: number of contiguous classes; category ids outside 0..num_classes-1
                raise. None skips the check.
        """
        if len(network_size) != 2:
            raise ValueError(f"network_size must be (height, width), got {network_size}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.network_size = (int(network_size[0]), int(network_size[1]))
        self.ignore_label = int(ignore_label)
        self.thing_ids = sorted(int(i) for i in thing_ids)
        self.min_instance_pixels = int(min_instance_pixels)
        self.num_classes = num_classes
        self._checked_files = set()
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[MaskAttnPanopticMapper] {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        names = cfg.DATASETS.TRAIN if is_train else (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)
        if not names:
            raise ValueError("the mapper needs a dataset in cfg.DATASETS.TRAIN or TEST")
        meta = MetadataCatalog.get(names[0])
        if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            raise ValueError(f"dataset {names[0]} has no thing_dataset_id_to_contiguous_id")
        augs = build_train_augmentations(cfg) if is_train else build_test_augmentations(cfg)
        classes = meta.get("stuff_classes")
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "network_size": tuple(cfg.INPUT.NETWORK_SIZE),
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "thing_ids": list(meta.thing_dataset_id_to_contiguous_id.values()),
            "min_instance_pixels": cfg.INPUT.MIN_INSTANCE_PIXELS,
            "num_classes": len(classes) if classes is not None else None,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: detectron2 panoptic dict (file_name, pan_seg_file_name,
                segments_info with contiguous category ids; height/width optional); in
                inference only file_name is needed.

        Returns:
            dict: see the class docstring.
        """
        dataset_dict = dict(dataset_dict)
        if "segments_info" in dataset_dict:
            dataset_dict["segments_info"] = [dict(s) for s in dataset_dict["segments_info"]]
        image_file = dataset_dict["file_name"]
        image = read_image_checked(image_file, self.image_format)
        height = int(dataset_dict.get("height", image.shape[0]))
        width = int(dataset_dict.get("width", image.shape[1]))
        if (height, width) != image.shape[:2]:
            raise ValueError(
                f"{image_file}: image size {image.shape[:2]} differs from the dataset's "
                f"(height, width) = {(height, width)}"
            )
        dataset_dict["height"], dataset_dict["width"] = height, width
        if not self.is_train:
            image = self._augment(T.AugInput(image)).image
            dataset_dict["image"] = _image_tensor(image)
            return dataset_dict

        pan_file = dataset_dict["pan_seg_file_name"]
        pan_rgb = read_panoptic_png(pan_file)
        if pan_rgb.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"{pan_file}: size {pan_rgb.shape[:2]} differs from image {image_file} "
                f"{image.shape[:2]}"
            )
        segments_info = dataset_dict.get("segments_info", [])
        check_segments_info(segments_info, num_classes=self.num_classes, file_name=pan_file)
        aug_input = self._augment(T.AugInput(image, sem_seg=pan_rgb))
        image, pan_rgb = aug_input.image, aug_input.sem_seg

        pan_ids = _rgb_to_segment_ids(pan_rgb)
        self._warn_unlisted_ids(pan_ids, segments_info, pan_file)
        sem_seg, instance_ids = panoptic_to_targets(
            pan_ids,
            segments_info,
            thing_ids=self.thing_ids,
            ignore_label=self.ignore_label,
            min_instance_pixels=self.min_instance_pixels,
        )
        dataset_dict["image"] = _image_tensor(image)
        dataset_dict["sem_seg"] = torch.as_tensor(np.ascontiguousarray(sem_seg))
        dataset_dict["instance_ids"] = torch.as_tensor(np.ascontiguousarray(instance_ids))
        return dataset_dict

    def _augment(self, aug_input: T.AugInput) -> T.AugInput:
        self.augmentations(aug_input)
        if aug_input.image.shape[:2] != self.network_size:
            raise ValueError(
                f"augmentations produced size {aug_input.image.shape[:2]}, expected the network "
                f"size {self.network_size}"
            )
        return aug_input

    def _warn_unlisted_ids(self, pan_ids: np.ndarray, segments_info, pan_file: str) -> None:
        """Ids of the PNG missing from segments_info become void (as in panopticapi's
        evaluation); check each file once and say so, since it means a broken annotation."""
        if pan_file in self._checked_files:
            return
        self._checked_files.add(pan_file)
        unlisted = unlisted_segment_ids(pan_ids, segments_info)
        if unlisted:
            logging.getLogger(__name__).warning(
                f"{pan_file}: segment ids {unlisted} are not in segments_info; their pixels "
                "are treated as void."
            )


def _rgb_to_segment_ids(pan_rgb: np.ndarray) -> np.ndarray:
    """panopticapi's ``rgb2id`` (id = R + 256 G + 256^2 B, int32) of the augmented PNG.

    An (H, W, 3) uint8 map gets a fourth byte and is read as little-endian 32-bit words with
    that byte masked off: one pass over contiguous memory instead of three strided ones.
    """
    if pan_rgb.dtype != np.uint8 or pan_rgb.ndim != 3 or pan_rgb.shape[2] != 3:
        return rgb2id(pan_rgb)
    rgba = cv2.cvtColor(np.ascontiguousarray(pan_rgb), cv2.COLOR_RGB2RGBA)
    return (rgba.view("<u4")[:, :, 0] & 0xFFFFFF).astype(np.int32)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) tensor."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def build_dataset_mapper(cfg, is_train: bool = True):
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, built from ``cfg``."""
    return DATASET_MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, is_train)
