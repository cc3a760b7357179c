"""PQ as the MaskAttn-UNet paper reports it: computed at the network's resolution.

The paper evaluates at 128x128: the ground truth is downsampled (nearest) to the network
size and compared with predictions at that size. The standard protocol (detectron2's
COCOPanopticEvaluator) compares at the original image size. :class:`PaperProtocolPanopticEvaluator`
reports the paper's number next to the standard one, under its own results key, without
touching the standard evaluator or its inputs.
"""
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.data.catalog import Metadata
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.datasets.panoptic_conversion import read_panoptic_ids
from ..structures.label_maps import resize_label_map
from .panoptic import PanopticEvaluator

__all__ = ["PaperProtocolPanopticEvaluator", "resize_ids_nearest"]

logger = logging.getLogger(__name__)


def resize_ids_nearest(ids: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map, sampling at pixel centres.

    Output pixel (i, j) takes input pixel (floor((i + 0.5) * H / h), floor((j + 0.5) * W / w)),
    the same rule as PIL's NEAREST. Ground truth and predictions go through this one function,
    so a prediction equal to the ground truth stays equal after resizing.

    Args:
        ids: (H, W) integer map (panoptic ids, labels).
        size: output (h, w).

    Returns:
        (h, w) array of the same dtype.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be (H, W), got shape {ids.shape}")
    if ids.shape == tuple(size):
        return ids.copy()  # always a new array, as callers may edit it
    # The model's postprocessor resizes with the same function, so both sides share one rule.
    return resize_label_map(torch.from_numpy(np.ascontiguousarray(ids)), size).numpy()


def _segments_present(segments_info: Sequence[Dict], ids: np.ndarray) -> List[Dict]:
    """Copies of the segments still present in ``ids``, with their area recounted.

    panopticapi rejects segments listed in the json but absent from the PNG, and reads the
    ground truth's areas from the json, so both must follow the resized map.
    """
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    return [dict(s, area=area[s["id"]]) for s in segments_info if s["id"] in area]


class PaperProtocolPanopticEvaluator(PanopticEvaluator):
    """PQ/SQ/RQ at the network resolution (the paper's "128x128" protocol).

    Predictions (``output["panoptic_seg"]`` at the original size, as for
    COCOPanopticEvaluator) and the ground-truth panoptic PNGs are resized with
    :func:`resize_ids_nearest` to ``network_size``; segments that vanish are dropped and areas
    recounted; then panopticapi's pq_compute runs through COCOPanopticEvaluator's own code.
    The results come under ``RESULT_KEY`` ("panoptic_seg_paper_protocol", the key
    ``format_results_summary`` reads), with the same metric names as the standard
    ``"panoptic_seg"``; the log line names the size: "PQ (paper protocol, 128x128): ...".
    """

    RESULT_KEY = "panoptic_seg_paper_protocol"

    def __init__(
        self, dataset_name: str, network_size: Sequence[int], output_dir: Optional[str] = None
    ):
        """
        Args:
            dataset_name: name of a registered panoptic dataset (needs panoptic_json,
                panoptic_root and the thing/stuff id maps, as COCOPanopticEvaluator).
            network_size: (h, w) the network runs at, e.g. cfg.INPUT.NETWORK_SIZE.
            output_dir: if given, predictions.json goes to its subfolder
                ``paper_protocol_<h>x<w>`` (the standard evaluator's file is left alone).
        """
        if len(network_size) != 2 or min(network_size) <= 0:
            raise ValueError(f"network_size must be (h, w) > 0, got {tuple(network_size)}")
        height, width = (int(s) for s in network_size)
        if output_dir is not None:
            output_dir = os.path.join(output_dir, f"paper_protocol_{height}x{width}")
        super().__init__(dataset_name, output_dir)
        self._network_size = (height, width)

    def process(self, inputs, outputs):
        """Resize each ``panoptic_seg`` to the network size, then process as the standard one."""
        resized = []
        for output in outputs:
            panoptic_ids, segments_info = output["panoptic_seg"]
            small = resize_ids_nearest(panoptic_ids.cpu().numpy(), self._network_size)
            if segments_info is not None:
                # Copies: COCOPanopticEvaluator edits the dicts it gets.
                segments_info = _segments_present(segments_info, small)
            resized.append({"panoptic_seg": (torch.from_numpy(small), segments_info)})
        super().process(inputs, resized)

    def evaluate(self):
        """PQ at the network size: ``{RESULT_KEY: {"PQ", "SQ", "RQ", "PQ_th", ...}}``."""
        height, width = self._network_size
        standard_metadata = self._metadata
        with tempfile.TemporaryDirectory(prefix="panoptic_eval_paper_") as gt_dir:
            gt_json = os.path.join(gt_dir, "panoptic_gt.json")
            gt_root = os.path.join(gt_dir, "panoptic_gt")
            if comm.is_main_process():  # only the main process runs pq_compute
                self._write_resized_ground_truth(gt_json, gt_root)
            # COCOPanopticEvaluator reads the ground truth paths from self._metadata: point a
            # private copy at the resized ground truth (the catalog's metadata is untouched).
            self._metadata = Metadata(
                **dict(standard_metadata.as_dict(), panoptic_json=gt_json, panoptic_root=gt_root)
            )
            logger.info("Panoptic evaluation at %dx%d (paper protocol):", height, width)
            try:
                results = super().evaluate()
            finally:
                self._metadata = standard_metadata
        if results is None:  # not the main process
            return None
        res = results["panoptic_seg"]
        logger.info(
            "PQ (paper protocol, %dx%d): PQ %.3f  SQ %.3f  RQ %.3f  PQ_th %.3f  PQ_st %.3f",
            height,
            width,
            res["PQ"],
            res["SQ"],
            res["RQ"],
            res["PQ_th"],
            res["PQ_st"],
        )
        return OrderedDict({self.RESULT_KEY: res})

    def _write_resized_ground_truth(self, gt_json: str, gt_root: str) -> None:
        """Write the dataset's panoptic PNGs and json resized to the network size."""
        height, width = self._network_size
        with PathManager.open(self._metadata.panoptic_json) as f:
            gt = json.load(f)
        source_root = PathManager.get_local_path(self._metadata.panoptic_root)
        for ann in gt["annotations"]:
            ids = resize_ids_nearest(
                read_panoptic_ids(os.path.join(source_root, ann["file_name"])), (height, width)
            )
            target = os.path.join(gt_root, ann["file_name"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1)
            Image.fromarray(rgb.astype(np.uint8)).save(target)
            # Boxes would be stale and panopticapi does not read them.
            ann["segments_info"] = [
                {k: v for k, v in s.items() if k != "bbox"}
                for s in _segments_present(ann["segments_info"], ids)
            ]
        for image in gt.get("images", []):
            image["height"], image["width"] = height, width
        with open(gt_json, "w") as f:
            json.dump(gt, f)
