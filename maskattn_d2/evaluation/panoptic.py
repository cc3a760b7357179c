"""detectron2's COCOPanopticEvaluator, with PQ of an empty category subset reported as NaN.

panopticapi averages PQ over the categories that occur (in the ground truth or the
predictions) and divides by their number without checking it: a validation set without any
thing (or stuff, or any segment at all) that the model also predicts none of makes
``pq_compute`` raise ZeroDivisionError, and the whole evaluation is lost. The average over no
category is undefined: :class:`PanopticEvaluator` reports it as NaN, with a warning, and
leaves every other number as detectron2 computes it.
"""
import contextlib
import logging
import math

from detectron2.evaluation import COCOPanopticEvaluator
from panopticapi.evaluation import PQStat

__all__ = ["PanopticEvaluator", "undefined_pq_is_nan"]

logger = logging.getLogger(__name__)

_SUBSET_NAMES = {None: "All", True: "Things", False: "Stuff"}


@contextlib.contextmanager
def undefined_pq_is_nan():
    """Within the block, panopticapi's ``PQStat.pq_average`` returns NaN PQ/SQ/RQ (n = 0) for
    a category subset in which no category occurs, instead of dividing by zero."""
    original = PQStat.pq_average

    def pq_average(self, categories, isthing):
        try:
            return original(self, categories, isthing)
        except ZeroDivisionError:
            logger.warning(
                "PQ over %s is undefined (NaN): no category of that kind occurs in the "
                "ground truth or the predictions.",
                _SUBSET_NAMES[isthing],
            )
            per_class = {
                label: {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                for label, info in categories.items()
                if isthing is None or (info["isthing"] == 1) == isthing
            }
            return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}, per_class

    PQStat.pq_average = pq_average
    try:
        yield
    finally:
        PQStat.pq_average = original


class PanopticEvaluator(COCOPanopticEvaluator):
    """COCOPanopticEvaluator whose PQ_th / PQ_st / PQ are NaN, not an exception, when no
    thing / stuff / segment occurs in the ground truth and the predictions, and which leaves
    the model's outputs as they were."""

    def process(self, inputs, outputs):
        # COCOPanopticEvaluator rewrites segments_info in place (pops "isthing", maps category
        # ids to dataset ids): evaluators after it (e.g. matching AP) must see the outputs.
        copies = []
        for output in outputs:
            if output.get("panoptic_seg") is not None and output["panoptic_seg"][1] is not None:
                ids, segments_info = output["panoptic_seg"]
                output = dict(output, panoptic_seg=(ids, [dict(s) for s in segments_info]))
            copies.append(output)
        super().process(inputs, copies)

    def evaluate(self):
        # Not stock: COCOPanopticEvaluator.evaluate calls pq_compute with no hook for an empty
        # subset, so the patch is applied only around that call and always undone.
        with undefined_pq_is_nan():
            return super().evaluate()
