"""One table with the headline numbers of an evaluation run."""
from typing import Dict, Mapping, Optional, Sequence

from tabulate import tabulate

# (column title, task key in detectron2's results, metric key)
_COLUMNS = (
    ("PQ", "panoptic_seg", "PQ"),
    ("SQ", "panoptic_seg", "SQ"),
    ("RQ", "panoptic_seg", "RQ"),
    ("PQ_th", "panoptic_seg", "PQ_th"),
    ("PQ_st", "panoptic_seg", "PQ_st"),
    ("AP", "segm", "AP"),
    ("mIoU", "sem_seg", "mIoU"),
    ("pACC", "sem_seg", "pACC"),
    ("PQ paper protocol", "panoptic_seg_paper_protocol", "PQ"),
    # DSB 2018 metric (opt-in evaluator "matching_ap"): mean over IoU 0.5:0.95 of TP/(TP+FP+FN)
    ("matching mAP", "matching_ap", "mAP"),
)


def _per_dataset(results: Mapping, dataset_names: Sequence[str]) -> Dict[str, Mapping]:
    # DefaultTrainer.test() returns {task: metrics} for one dataset (its name is then only in
    # cfg.DATASETS.TEST) and {dataset: {task: metrics}} for several.
    if any(task in results for _, task, _ in _COLUMNS):
        return {dataset_names[0] if len(dataset_names) == 1 else "": results}
    return dict(results)


def format_results_summary(results: Mapping, dataset_names: Optional[Sequence[str]] = None) -> str:
    """A markdown table: one row per dataset, the standard numbers and the paper protocol's PQ
    (computed at network resolution, labelled as such). Missing numbers show as "-".

    Args:
        results: what ``DefaultTrainer.test`` returns.
        dataset_names: the evaluated datasets (``cfg.DATASETS.TEST``); names the row of a
            one-dataset result, which does not carry its name ("-" without it).
    """
    rows = []
    datasets = _per_dataset(results, list(dataset_names or ()))
    present = [c for c in _COLUMNS if any(c[2] in r.get(c[1], {}) for r in datasets.values())]
    for name, res in datasets.items():
        rows.append([name or "-"] + [res.get(task, {}).get(key, "-") for _, task, key in present])
    headers = ["dataset"] + [title for title, _, _ in present]
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f")
