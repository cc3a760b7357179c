"""COCO instance AP for models whose classes live in a unified (stuff + thing) space.

Why this exists: a panoptic model predicts K contiguous classes covering stuff *and* things
(detectron2's ``coco_panoptic_standard`` / ``cityscapes_fine_panoptic_*`` metadata: one space,
``thing_dataset_id_to_contiguous_id`` maps things into it, e.g. Cityscapes things are 11..18,
an ADE20K-style space interleaves them with stuff). detectron2's :class:`COCOEvaluator`
assumes a things-only space: it asserts the thing contiguous ids are exactly
``0..num_things-1`` and labels its per-category table with ``thing_classes``, which in the
unified metadata holds all K names. :class:`InstanceSegEvaluator` moves predictions into a
dense things-only space, drops predictions of stuff classes (they have no instance ground
truth), and lets COCOEvaluator do the rest (COCO json dump, pycocotools AP, per-class table).
"""
import contextlib
import io
from typing import Dict, Optional

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data.catalog import Metadata
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Instances

__all__ = ["InstanceSegEvaluator", "fast_coco_eval_available"]


def fast_coco_eval_available() -> bool:
    """Whether detectron2's C++ COCOeval (``detectron2._C``, used by fast_eval_api) loads."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class InstanceSegEvaluator(COCOEvaluator):
    """COCOEvaluator for ``Instances`` whose ``pred_classes`` are unified contiguous ids.

    The dataset's metadata needs ``json_file`` (a COCO instances json, e.g. from
    ``maskattn_d2.data.datasets.ensure_instances_json``) and
    ``thing_dataset_id_to_contiguous_id``. Instances of classes outside that map (stuff) are
    dropped; the rest are renumbered to a dense ``0..T-1`` thing space, and COCOEvaluator's
    own id unmapping turns them into the json's category ids. Where the things already are
    ``0..T-1`` (detectron2's "coco", maskattn_d2's things-first metadata) the renumbering is
    the identity. The model's outputs are never modified (other evaluators see them too).

    Unlike COCOEvaluator, whose AP is NaN when the model predicts no instance at all, a run
    without predictions is scored by COCOeval against an empty result set: AP 0 where the
    ground truth has instances, NaN only where it has none (AP undefined).
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: Optional[int] = None,
        use_fast_impl: Optional[bool] = None,
        allow_cached_coco: bool = True,
    ):
        """
        Args:
            dataset_name, distributed, output_dir, max_dets_per_image,
                allow_cached_coco: as in :class:`COCOEvaluator`.
            tasks: as in :class:`COCOEvaluator`; default ("bbox", "segm"), the tasks of mask
                predictions (COCOEvaluator would guess them from the predictions, and guess
                "bbox" only when there are none).
            use_fast_impl: use detectron2's C++ COCOeval; None (default) uses it exactly when
                ``detectron2._C`` is importable, otherwise pycocotools' official COCOeval.
        """
        if use_fast_impl is None:
            use_fast_impl = fast_coco_eval_available()
        if tasks is None:
            tasks = ("bbox", "segm")
        super().__init__(
            dataset_name,
            tasks,
            distributed,
            output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=use_fast_impl,
            allow_cached_coco=allow_cached_coco,
        )
        unified = self._metadata
        thing_map: Dict[int, int] = unified.get("thing_dataset_id_to_contiguous_id") or {}
        if not thing_map:
            raise ValueError(
                f"InstanceSegEvaluator needs metadata 'thing_dataset_id_to_contiguous_id' "
                f"for dataset '{dataset_name}'"
            )
        json_cat_ids = sorted(self._coco_api.getCatIds())
        missing = sorted(set(thing_map) - set(json_cat_ids))
        if missing:
            raise ValueError(
                f"Instances json {unified.json_file} of dataset '{dataset_name}' lacks the "
                f"thing categories {missing}"
            )

        # Dense thing index, ordered like the unified ids; a lookup table unified -> dense
        # (-1 for stuff).
        things = sorted(thing_map.items(), key=lambda item: item[1])
        self._unified_to_thing = torch.full((max(thing_map.values()) + 1,), -1, dtype=torch.long)
        for thing_index, (_, unified_id) in enumerate(things):
            self._unified_to_thing[unified_id] = thing_index

        # The view COCOEvaluator works on. Its per-category table indexes the json's categories
        # in sorted-id order (pycocotools' COCOeval order), so the names come from the json.
        self._metadata = Metadata(
            name=unified.name,
            json_file=unified.json_file,
            thing_dataset_id_to_contiguous_id={
                dataset_id: thing_index for thing_index, (dataset_id, _) in enumerate(things)
            },
            thing_classes=[cat["name"] for cat in self._coco_api.loadCats(json_cat_ids)],
        )

    def process(self, inputs, outputs):
        """Like COCOEvaluator.process, on instances moved to the dense thing space."""
        converted = []
        for output in outputs:
            if "instances" in output:
                output = dict(output, instances=self._to_thing_space(output["instances"]))
            converted.append(output)
        super().process(inputs, converted)

    def _to_thing_space(self, instances: Instances) -> Instances:
        """Drop stuff-class instances and renumber the rest to 0..T-1 (a new Instances)."""
        instances = instances.to(self._cpu_device)
        classes = instances.pred_classes.long()
        known = (classes >= 0) & (classes < len(self._unified_to_thing))
        thing = torch.full_like(classes, -1)
        thing[known] = self._unified_to_thing[classes[known]]
        keep = thing >= 0
        instances = instances[keep]
        instances.pred_classes = thing[keep]
        return instances

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is None:  # COCOEvaluator skips COCOeval when there are no predictions
            coco_eval = self._evaluate_no_predictions(iou_type)
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)

    def _evaluate_no_predictions(self, iou_type: str) -> COCOeval:
        """COCOeval of an empty result set (pycocotools' loadRes cannot load one)."""
        self._logger.warning("No instance predicted on any image: scoring an empty result set.")
        gt = self._coco_api
        empty = COCO()
        empty.dataset = {
            "images": gt.dataset["images"],
            "categories": gt.dataset["categories"],
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress messages
            empty.createIndex()
            coco_eval = COCOeval(gt, empty, iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval
