"""Semantic-segmentation metrics (mIoU, pixel accuracy) on panoptic datasets.

detectron2's :class:`SemSegEvaluator` reads its ground truth from ``sem_seg_file_name`` PNGs,
which COCO-format panoptic datasets (detectron2's ``coco_20xx_*_panoptic``, our synthetic
scenes, the COCO sample) do not have. :class:`PanopticSemSegEvaluator` derives the semantic
ground truth from each dataset dict's panoptic PNG and ``segments_info`` instead, and reuses
everything else (confusion-matrix accumulation, mIoU/fwIoU/mACC/pACC, boundary IoU, result
dumping) from detectron2. So panoptic, instance and semantic metrics run on one dataset name.
"""
import logging
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.file_io import PathManager

from ..data.datasets.panoptic_conversion import read_panoptic_ids
from ..data.target_generator import panoptic_to_semantic

try:
    import cv2  # noqa: F401  (SemSegEvaluator's boundary IoU uses it)

    _HAS_CV2 = True
except ImportError:
    _HAS_CV2 = False

__all__ = ["PanopticSemSegEvaluator", "load_sem_seg_gt"]


def load_sem_seg_gt(
    filename: str, dtype: Optional[Union[np.dtype, str, type]] = None
) -> np.ndarray:
    """Read a semantic label PNG; a numpy-1/2-safe ``sem_seg_loading_fn`` for SemSegEvaluator.

    detectron2's default loader calls ``np.array(..., copy=False)``, which raises on numpy 2
    whenever a copy is needed. SemSegEvaluator writes into the array it gets (it maps the
    ignore label in place), so this always returns a fresh, writable array.

    Args:
        filename: path of a single-channel label PNG.
        dtype: dtype of the returned array (SemSegEvaluator passes ``int``); None keeps the
            image's own.

    Returns:
        (H, W) array of labels.
    """
    with PathManager.open(filename, "rb") as f:
        return np.array(Image.open(f), dtype=dtype)


class PanopticSemSegEvaluator(SemSegEvaluator):
    """detectron2's SemSegEvaluator with ground truth derived from panoptic annotations.

    The dataset dicts need "file_name", "pan_seg_file_name" and "segments_info" (category ids
    in the model's contiguous space); the metadata needs "stuff_classes" (names of all K
    classes the semantic head predicts, in contiguous order) and "ignore_label". The model
    output is read as SemSegEvaluator reads it: ``output["sem_seg"]`` (K, H, W) scores,
    argmax over K, at the ground truth's resolution.
    """

    def __init__(
        self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None
    ):
        """
        Args:
            dataset_name: name of a registered panoptic dataset.
            distributed: gather the confusion matrices of all ranks before computing metrics.
            output_dir: where SemSegEvaluator dumps its predictions and metrics (None: nowhere).
        """
        # SemSegEvaluator.__init__ is not called: its only dataset-specific step indexes every
        # dataset dict by "sem_seg_file_name" and fails on panoptic dicts. This sets the same
        # attributes, taking the ground truth from the panoptic PNGs (see sem_seg_loading_fn).
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._cpu_device = torch.device("cpu")

        meta = MetadataCatalog.get(dataset_name)
        for key in ("stuff_classes", "ignore_label"):
            if meta.get(key) is None:
                raise ValueError(
                    f"PanopticSemSegEvaluator needs metadata '{key}' for dataset '{dataset_name}'"
                )
        self._class_names: List[str] = list(meta.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore_label = int(meta.ignore_label)
        if 0 <= self._ignore_label < self._num_classes:
            raise ValueError(
                f"ignore_label {self._ignore_label} of '{dataset_name}' is a class id "
                f"(there are {self._num_classes} classes)"
            )

        # SemSegEvaluator asks for the "gt file" of each input file and hands it to
        # sem_seg_loading_fn: here the gt file is the panoptic PNG, decoded with its segments.
        self.input_file_to_gt_file: Dict[str, str] = {}
        self._segments_by_gt_file: Dict[str, List[Dict]] = {}
        for record in DatasetCatalog.get(dataset_name):
            if "pan_seg_file_name" not in record or "segments_info" not in record:
                raise ValueError(
                    f"Dataset '{dataset_name}' has a dict without 'pan_seg_file_name' / "
                    f"'segments_info' (file {record.get('file_name')}); it is not panoptic"
                )
            bad = [
                s["category_id"]
                for s in record["segments_info"]
                if not 0 <= s["category_id"] < self._num_classes
            ]
            if bad:
                raise ValueError(
                    f"{record['pan_seg_file_name']} of '{dataset_name}' has category ids {bad} "
                    f"outside [0, {self._num_classes})"
                )
            self.input_file_to_gt_file[record["file_name"]] = record["pan_seg_file_name"]
            self._segments_by_gt_file[record["pan_seg_file_name"]] = record["segments_info"]
        self.sem_seg_loading_fn = self._load_semantic_gt

        # Contiguous id -> dataset id for the COCO-stuff-style json dump. A unified panoptic
        # metadata splits the classes between the thing and the stuff map (detectron2's
        # coco_panoptic_standard puts only stuff in the latter), so merge both.
        contiguous_to_dataset = {}
        for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
            for dataset_id, contiguous_id in (meta.get(key) or {}).items():
                contiguous_to_dataset[contiguous_id] = dataset_id
        # An incomplete map would trip SemSegEvaluator's assert on the first class it lacks.
        complete = set(contiguous_to_dataset) >= set(range(self._num_classes))
        self._contiguous_id_to_dataset_id = contiguous_to_dataset if complete else None

        # Same rule as SemSegEvaluator: boundary IoU needs OpenCV and uint8 labels.
        self._compute_boundary_iou = _HAS_CV2 and self._num_classes < np.iinfo(np.uint8).max

    def _load_semantic_gt(self, pan_seg_file_name: str, dtype=int) -> np.ndarray:
        """``sem_seg_loading_fn``: (H, W) semantic ground truth of one panoptic PNG."""
        # Crowd segments keep their class; void and unlisted ids get the ignore label.
        semantic = panoptic_to_semantic(
            read_panoptic_ids(pan_seg_file_name),
            self._segments_by_gt_file[pan_seg_file_name],
            ignore_label=self._ignore_label,
        )
        return semantic.astype(dtype, copy=False)
