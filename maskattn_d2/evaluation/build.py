"""Choose detectron2's evaluators for a dataset, by its metadata's ``evaluator_type``.

====================================  =======================================================
evaluator_type                        evaluators (``cfg.TEST.EVALUATORS`` picks among them)
====================================  =======================================================
coco_panoptic_seg,                    "panoptic": PanopticEvaluator
ade20k_panoptic_seg                   "instance": InstanceSegEvaluator (skipped, with a
                                      warning, when there is no instances json
                                      or no thing class)
                                      "semantic": PanopticSemSegEvaluator
cityscapes_panoptic_seg               "panoptic": PanopticEvaluator
                                      "instance": CityscapesInstanceEvaluator
                                      "semantic": CityscapesSemSegEvaluator
                                      (as detectron2's Panoptic-DeepLab train_net)
sem_seg                               SemSegEvaluator (numpy-2-safe ground-truth loader)
cityscapes_sem_seg                    CityscapesSemSegEvaluator
coco                                  InstanceSegEvaluator
====================================  =======================================================

The Cityscapes evaluators need ``cityscapesscripts``; without it the instance one is skipped
and the semantic ones fall back to detectron2's mIoU (PanopticSemSegEvaluator /
SemSegEvaluator), with a warning. With ``cfg.TEST.PAPER_PROTOCOL`` the panoptic types also
get PaperProtocolPanopticEvaluator (PQ at ``cfg.INPUT.NETWORK_SIZE``, its own results key).
"matching_ap" in ``cfg.TEST.EVALUATORS`` (opt-in, not in the default list) adds
MatchingAPEvaluator to the panoptic types: the DSB 2018 competition metric, mean over IoU
thresholds 0.5:0.95 of TP / (TP + FP + FN) (results key "matching_ap").
"""
import importlib.util
import logging
import os
from typing import List, Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..data.datasets import ensure_instances_json
from .instance_seg import InstanceSegEvaluator
from .matching_ap import MatchingAPEvaluator
from .panoptic import PanopticEvaluator
from .panoptic_semseg import PanopticSemSegEvaluator, load_sem_seg_gt
from .paper_protocol import PaperProtocolPanopticEvaluator

__all__ = ["build_evaluator"]

logger = logging.getLogger(__name__)

_COCO_PANOPTIC_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg")
_PANOPTIC_TYPES = _COCO_PANOPTIC_TYPES + ("cityscapes_panoptic_seg",)
_OTHER_TYPES = ("sem_seg", "cityscapes_sem_seg", "coco")
_EVALUATOR_NAMES = ("panoptic", "instance", "semantic", "matching_ap")


def build_evaluator(
    cfg, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """Build the evaluator(s) of a registered dataset.

    Args:
        cfg: config with the maskattn_d2 keys (TEST.EVALUATORS, TEST.PAPER_PROTOCOL,
            INPUT.NETWORK_SIZE, OUTPUT_DIR).
        dataset_name: a name in detectron2's DatasetCatalog/MetadataCatalog.
        output_folder: where evaluators dump predictions; default ``OUTPUT_DIR/inference``.

    Returns:
        One evaluator, or a :class:`DatasetEvaluators` when several apply.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    requested = _requested_evaluators(cfg)

    if evaluator_type in _COCO_PANOPTIC_TYPES:
        evaluators = _coco_panoptic_evaluators(dataset_name, requested, output_folder)
    elif evaluator_type == "cityscapes_panoptic_seg":
        evaluators = _cityscapes_panoptic_evaluators(dataset_name, requested, output_folder)
    elif evaluator_type == "sem_seg":
        evaluators = [_sem_seg_evaluator(dataset_name, output_folder)]
    elif evaluator_type == "cityscapes_sem_seg":
        if _cityscapesscripts_available():
            evaluators = [CityscapesSemSegEvaluator(dataset_name)]
        else:
            _warn_no_cityscapesscripts(dataset_name, "CityscapesSemSegEvaluator", "SemSegEvaluator")
            evaluators = [_sem_seg_evaluator(dataset_name, output_folder)]
    elif evaluator_type == "coco":
        evaluators = [InstanceSegEvaluator(dataset_name, output_dir=output_folder)]
    else:
        raise ValueError(
            f"No evaluator for dataset '{dataset_name}' with evaluator_type "
            f"'{evaluator_type}'; known types: {', '.join(_PANOPTIC_TYPES + _OTHER_TYPES)}"
        )

    if "matching_ap" in requested:
        if evaluator_type in _PANOPTIC_TYPES:
            evaluators.append(MatchingAPEvaluator(dataset_name))
        else:
            logger.warning(
                "TEST.EVALUATORS 'matching_ap' needs panoptic predictions and ground truth; "
                "ignored for dataset '%s' of evaluator_type '%s'",
                dataset_name,
                evaluator_type,
            )
    if cfg.TEST.PAPER_PROTOCOL:
        if evaluator_type in _PANOPTIC_TYPES:
            evaluators.append(
                PaperProtocolPanopticEvaluator(dataset_name, cfg.INPUT.NETWORK_SIZE, output_folder)
            )
        else:
            logger.warning(
                "TEST.PAPER_PROTOCOL is a panoptic (PQ) protocol; ignored for dataset '%s' "
                "of evaluator_type '%s'",
                dataset_name,
                evaluator_type,
            )
    if not evaluators:
        raise ValueError(
            f"TEST.EVALUATORS={list(cfg.TEST.EVALUATORS)} selects no evaluator for dataset "
            f"'{dataset_name}' ({evaluator_type})"
        )
    logger.info(
        "Evaluators for '%s' (%s): %s",
        dataset_name,
        evaluator_type,
        ", ".join(type(e).__name__ for e in evaluators),
    )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _requested_evaluators(cfg) -> List[str]:
    """cfg.TEST.EVALUATORS, validated."""
    requested = list(cfg.TEST.EVALUATORS)
    unknown = [name for name in requested if name not in _EVALUATOR_NAMES]
    if unknown:
        raise ValueError(
            f"TEST.EVALUATORS has unknown entries {unknown}; allowed: {_EVALUATOR_NAMES}"
        )
    return requested


def _coco_panoptic_evaluators(
    dataset_name: str, requested: List[str], output_folder: str
) -> List[DatasetEvaluator]:
    evaluators: List[DatasetEvaluator] = []
    if "panoptic" in requested:
        evaluators.append(PanopticEvaluator(dataset_name, output_folder))
    if "instance" in requested and _has_thing_classes(dataset_name):
        if _ensure_instances_json(dataset_name) is not None:
            evaluators.append(InstanceSegEvaluator(dataset_name, output_dir=output_folder))
    if "semantic" in requested:
        evaluators.append(PanopticSemSegEvaluator(dataset_name, output_dir=output_folder))
    return evaluators


def _cityscapes_panoptic_evaluators(
    dataset_name: str, requested: List[str], output_folder: str
) -> List[DatasetEvaluator]:
    evaluators: List[DatasetEvaluator] = []
    if "panoptic" in requested:
        evaluators.append(PanopticEvaluator(dataset_name, output_folder))
    has_scripts = _cityscapesscripts_available()
    if "instance" in requested:
        if has_scripts:
            # CityscapesInstanceEvaluator names a prediction by thing_classes[pred_class]. In
            # the panoptic metadata thing_classes lists all 19 classes in train-id order, i.e.
            # it is indexed by the unified ids our model predicts (things are 11..18), unlike
            # "cityscapes_fine_instance_seg" (8 names, 0..7). Stuff predictions map to
            # non-instance labels, which the Cityscapes script skips.
            metadata = MetadataCatalog.get(dataset_name)
            if len(metadata.thing_classes) != len(metadata.stuff_classes):
                raise ValueError(
                    f"CityscapesInstanceEvaluator needs unified metadata for '{dataset_name}': "
                    f"thing_classes must name all {len(metadata.stuff_classes)} classes, "
                    f"got {len(metadata.thing_classes)}"
                )
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
        else:
            _warn_no_cityscapesscripts(dataset_name, "CityscapesInstanceEvaluator", None)
    if "semantic" in requested:
        if has_scripts:
            # Our semantic classes are the Cityscapes train ids 0..18, which is what
            # CityscapesSemSegEvaluator maps back to label ids.
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        else:
            _warn_no_cityscapesscripts(
                dataset_name, "CityscapesSemSegEvaluator", "PanopticSemSegEvaluator"
            )
            evaluators.append(PanopticSemSegEvaluator(dataset_name, output_dir=output_folder))
    return evaluators


def _sem_seg_evaluator(dataset_name: str, output_folder: str) -> SemSegEvaluator:
    return SemSegEvaluator(
        dataset_name, distributed=True, output_dir=output_folder, sem_seg_loading_fn=load_sem_seg_gt
    )


# (dataset, evaluator) pairs already reported as skipped: one warning per process, not one
# per evaluation (periodic evaluations rebuild the evaluators).
_WARNED_SKIPS = set()


def _has_thing_classes(dataset_name: str) -> bool:
    """Whether the dataset has thing classes (instance AP applies); warns once if not.

    A dataset of stuff classes only has an empty ``thing_dataset_id_to_contiguous_id``:
    there is no instance to score, so the instance evaluator does not apply and is skipped
    (its AP would be undefined), while PQ (PQ_th NaN) and mIoU are still computed.
    """
    if MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id"):
        return True
    if (dataset_name, "instance") not in _WARNED_SKIPS:
        _WARNED_SKIPS.add((dataset_name, "instance"))
        logger.warning(
            "Dataset '%s' has no thing class (metadata thing_dataset_id_to_contiguous_id is "
            "empty): InstanceSegEvaluator (instance AP) does not apply and is skipped",
            dataset_name,
        )
    return False


def _ensure_instances_json(dataset_name: str) -> Optional[str]:
    """Path of the dataset's instances json (``metadata.json_file``), derived if it can be.

    The data package derives it for the datasets it registers (synthetic, COCO sample,
    ADE20K); for others the file must exist. Returns None (with a warning) when the dataset
    has none, so instance AP is skipped rather than failing the whole evaluation.
    """
    if MetadataCatalog.get(dataset_name).get("json_file") is None:
        logger.warning(
            "Dataset '%s' has no instances json (metadata json_file): instance AP is skipped",
            dataset_name,
        )
        return None
    try:
        return ensure_instances_json(dataset_name)
    except FileNotFoundError as e:
        logger.warning("Instance AP is skipped for dataset '%s': %s", dataset_name, e)
        return None


def _cityscapesscripts_available() -> bool:
    return importlib.util.find_spec("cityscapesscripts") is not None


def _warn_no_cityscapesscripts(dataset_name: str, skipped: str, fallback: Optional[str]) -> None:
    instead = f"; using {fallback} instead" if fallback else ""
    logger.warning(
        "cityscapesscripts is not installed (pip install cityscapesscripts): %s for '%s' "
        "is skipped%s",
        skipped,
        dataset_name,
        instead,
    )
