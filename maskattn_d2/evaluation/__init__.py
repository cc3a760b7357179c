"""Evaluation: detectron2's evaluators chosen per dataset, plus the adapters they need.

- :func:`build_evaluator`: dispatch on the dataset's ``evaluator_type``.
- :class:`PanopticEvaluator`: COCOPanopticEvaluator that reports an undefined PQ as NaN.
- :class:`InstanceSegEvaluator`: COCO AP for classes in a unified stuff+thing space.
- :class:`PanopticSemSegEvaluator`: mIoU / pixel accuracy with ground truth from panoptic PNGs.
- :class:`PaperProtocolPanopticEvaluator`: PQ at the network resolution (the paper's protocol).
- :class:`MatchingAPEvaluator`: the DSB 2018 matching mAP over IoU thresholds 0.5:0.95.
- :func:`format_results_summary`: one table of the headline numbers.
"""
from .build import build_evaluator
from .instance_seg import InstanceSegEvaluator, fast_coco_eval_available
from .matching_ap import MatchingAPEvaluator
from .panoptic import PanopticEvaluator, undefined_pq_is_nan
from .panoptic_semseg import PanopticSemSegEvaluator, load_sem_seg_gt
from .paper_protocol import PaperProtocolPanopticEvaluator, resize_ids_nearest
from .summary import format_results_summary

__all__ = [
    "build_evaluator",
    "InstanceSegEvaluator",
    "fast_coco_eval_available",
    "MatchingAPEvaluator",
    "PanopticEvaluator",
    "undefined_pq_is_nan",
    "PanopticSemSegEvaluator",
    "load_sem_seg_gt",
    "PaperProtocolPanopticEvaluator",
    "resize_ids_nearest",
    "format_results_summary",
]
