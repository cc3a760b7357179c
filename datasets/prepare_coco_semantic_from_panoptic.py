#!/usr/bin/env python3
"""Write semantic PNGs of COCO panoptic annotations (for users who want semantic ground truth).

Reads ``$DETECTRON2_DATASETS/coco/annotations/panoptic_{train,val}2017.json`` and the PNGs in
``coco/panoptic_{train,val}2017/`` and writes ``coco/panoptic_semseg_{train,val}2017/*.png``
(Mask2Former's folder name): one uint8 label per pixel, the contiguous id of the pixel's
class in the numbering of detectron2's "coco_panoptic_standard" metadata (133 classes, things
0..79 first), 255 for void. Crowd regions keep their class.

Usage:
    DETECTRON2_DATASETS=/path/to/datasets python datasets/prepare_coco_semantic_from_panoptic.py
"""
import argparse
import json
import os
from multiprocessing import Pool
from typing import Dict, Mapping, Optional, Sequence

from maskattn_d2.data.datasets.panoptic_conversion import convert_panoptic_annotations
from maskattn_d2.data.datasets.panoptic_json import panoptic_metadata


def contiguous_labels(categories: Sequence[Mapping]) -> Dict[int, int]:
    """Dataset category id -> contiguous label (things first, as detectron2 numbers COCO)."""
    return panoptic_metadata(categories)["stuff_dataset_id_to_contiguous_id"]


def _convert_chunk(args) -> int:
    panoptic, panoptic_root, output_dir, to_label = args
    convert_panoptic_annotations(
        panoptic, panoptic_root, semantic_dir=output_dir, dataset_id_to_label=to_label
    )
    return len(panoptic["annotations"])


def convert_panoptic_to_semantic(
    panoptic_json: str,
    panoptic_root: str,
    output_dir: str,
    *,
    categories: Optional[Sequence[Mapping]] = None,
    workers: int = 1,
) -> int:
    """Write one semantic PNG per panoptic annotation.

    Args:
        panoptic_json: COCO panoptic json.
        panoptic_root: folder of its panoptic PNGs.
        output_dir: folder for the semantic PNGs (same file names as the panoptic PNGs).
        categories: categories defining the labels (default: the json's own, in order).
        workers: number of processes.

    Returns:
        The number of written PNGs.
    """
    with open(panoptic_json) as f:
        panoptic = json.load(f)
    to_label = contiguous_labels(categories if categories is not None else panoptic["categories"])
    os.makedirs(output_dir, exist_ok=True)
    annotations, cats = panoptic["annotations"], panoptic["categories"]
    step = 256  # images per task: keeps the inter-process traffic small
    chunks = [
        (
            {"annotations": annotations[i : i + step], "categories": cats},
            panoptic_root,
            output_dir,
            to_label,
        )
        for i in range(0, len(annotations), step)
    ]
    if workers > 1:
        with Pool(workers) as pool:
            return sum(pool.map(_convert_chunk, chunks))
    return sum(_convert_chunk(c) for c in chunks)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "coco"),
        help="the coco folder (default: $DETECTRON2_DATASETS/coco)",
    )
    parser.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    parser.add_argument("--workers", type=int, default=4, help="number of processes")
    args = parser.parse_args(argv)
    for split in args.splits:
        count = convert_panoptic_to_semantic(
            os.path.join(args.root, "annotations", f"panoptic_{split}.json"),
            os.path.join(args.root, f"panoptic_{split}"),
            os.path.join(args.root, f"panoptic_semseg_{split}"),
            workers=args.workers,
        )
        print(f"{split}: wrote {count} semantic PNGs")


if __name__ == "__main__":
    main()
