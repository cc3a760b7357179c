#!/usr/bin/env python
"""Where a trained MaskAttn-UNet loses PQ_th: in its semantic map, its seeds or its offsets.

    python tools/instance_headroom.py --config-file configs/dsb2018_panoptic_128.yaml \
        --dataset dsb2018_panoptic_val MODEL.WEIGHTS output/dsb2018_panoptic_128/model_final.pth

Runs the model once over a panoptic dataset and evaluates it in several rows, each
replacing part of its network outputs by the ground truth at the network size (the panoptic
PNG resized with the evaluators' pixel-centre nearest rule), then running the model's own
postprocessor and detectron2's ``COCOPanopticEvaluator`` at the original image size:

- semantics: predicted, or the ground truth (one-hot logits; void pixels keep the prediction);
- instances: connected components of the semantic map; the spatial embeddings with the
  model's seed map and offsets; with ground-truth seeds (one per instance, at its deepest
  pixel nearest its centroid; points on a flat map, so these rows assign pixels by offsets
  even when the config's ``SEED_ASSIGNMENT`` is "seed_ascent"); with the seed *map* a
  ``SEED_TARGET`` teaches ("depth" or "gaussian", with the config's SEED_SIGMA_SCALE) in
  place of the model's, grouped as the config says (e.g. climbed with seed_ascent): how well
  a perfectly learned target could group at all; with ground-truth offsets (to the
  instance's centroid, on ground-truth instance pixels); with both ground-truth seeds and
  offsets.

The gap between "connected components" and "ground-truth seeds and offsets" is what separating
touching objects can add at most through this postprocessor; the gaps to the model's own
seeds / offsets say which head limits it. Writes ``instance_headroom.md`` / ``.json`` into
``--output-dir`` and prints the table. Use a split you do not report, or report it as analysis.
"""
import argparse
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from torch import nn

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import build_dataset_mapper, panoptic_to_targets
from maskattn_d2.data.datasets.panoptic_conversion import read_panoptic_ids
from maskattn_d2.engine import MaskAttnTrainer, load_inference_weights
from maskattn_d2.evaluation import build_evaluator
from maskattn_d2.evaluation.paper_protocol import resize_ids_nearest
from maskattn_d2.modeling.losses import instance_centres, instance_depth, seed_map_target
from maskattn_d2.modeling.meta_arch import (
    build_postprocessor,
    postprocess_batch,
    thing_ids_from_config,
)

logger = logging.getLogger("maskattn_d2.instance_headroom")

# (row name, semantics from ground truth, instance method, seeds from gt: None (the model's),
# "points" or the seed map of a SEED_TARGET, offsets from gt)
_INSTANCE_ROWS = (
    ("spatial embedding", None, False),
    ("spatial embedding, gt seeds", "points", False),
    ("spatial embedding, gt seed map (depth)", "depth", False),
    ("spatial embedding, gt seed map (gaussian)", "gaussian", False),
    ("spatial embedding, gt offsets", None, True),
    ("spatial embedding, gt seeds and offsets", "points", True),
)
ROWS = tuple(
    row
    for gt_semantics in (False, True)
    for row in (("connected components", gt_semantics, "connected_components", None, False),)
    + tuple((name, gt_semantics, "spatial_embedding", seeds, offsets)
            for name, seeds, offsets in _INSTANCE_ROWS)
)
SEED_MAPS = ("depth", "gaussian")
# Logit margin of the ground-truth maps: sigmoid(10) > 0.9999.
CERTAIN = 10.0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None,
                        help="registered panoptic dataset (default: the config's DATASETS.TEST[0])")
    parser.add_argument("--output-dir", default="./output/instance_headroom")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="evaluate without MODEL.WEIGHTS (tests; the ground-truth rows only "
                             "mean something then)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS path")
    return parser


def network_size_targets(
    dataset_dict: Dict, size: Tuple[int, int], thing_ids: Sequence[int], ignore_label: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Semantic (h, w) and instance-id (h, w) int64 targets of one panoptic dict at the network
    size ``size`` (every thing segment with a pixel left is an instance)."""
    ids = resize_ids_nearest(read_panoptic_ids(dataset_dict["pan_seg_file_name"]), size)
    sem, instance_ids = panoptic_to_targets(
        ids, dataset_dict["segments_info"], thing_ids=thing_ids, ignore_label=ignore_label,
        min_instance_pixels=1,
    )
    return torch.from_numpy(sem), torch.from_numpy(instance_ids)


def oracle_seed_logits(instance_ids: torch.Tensor) -> torch.Tensor:
    """(1, h, w) seed logits with one seed per instance of ``instance_ids`` (h, w): at its
    deepest pixel (:func:`instance_depth` = 1) nearest its centroid, the first in raster
    order on ties; +CERTAIN there, -CERTAIN elsewhere."""
    ids = instance_ids[None]
    depth = instance_depth(ids)[0]
    centres, _ = instance_centres(ids)
    h, w = instance_ids.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    distance = (centres[0, 0] - ys).square() + (centres[0, 1] - xs).square()
    flat_ids = instance_ids.flatten()
    num_slots = int(flat_ids.max()) + 1 if flat_ids.numel() else 1
    deepest = (depth.flatten() >= 1.0) & (flat_ids > 0)
    key = torch.where(deepest, distance.flatten().double(), float("inf"))
    nearest = torch.full((num_slots,), float("inf"), dtype=torch.float64)
    nearest = nearest.scatter_reduce(0, flat_ids, key, "amin")
    candidate = deepest & (key == nearest.index_select(0, flat_ids))
    index = torch.arange(h * w)
    first = torch.full((num_slots,), h * w, dtype=torch.long).scatter_reduce(
        0, flat_ids, torch.where(candidate, index, h * w), "amin"
    )
    seeds = torch.full((h * w,), -CERTAIN)
    chosen = first[1:][first[1:] < h * w]
    seeds[chosen] = CERTAIN
    return seeds.view(1, h, w)


def oracle_seed_map_logits(
    instance_ids: torch.Tensor, seed_target: str, seed_sigma_scale: float
) -> torch.Tensor:
    """(1, h, w) logits whose sigmoid is the seed map ``seed_target`` teaches for
    ``instance_ids`` (h, w) (:func:`seed_map_target`), within 1e-4 of 0 and 1 (finite logits;
    ties, such as the flat depth of a thin instance, stay ties)."""
    target = seed_map_target(instance_ids[None], seed_target, seed_sigma_scale)
    return torch.logit(target.clamp(1e-4, 1 - 1e-4))


def oracle_offsets(instance_ids: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(2, h, w): offsets to the instance's centroid on instance pixels, ``predicted``
    elsewhere."""
    centres, _ = instance_centres(instance_ids[None])
    h, w = instance_ids.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    to_centre = centres[0] - torch.stack([ys, xs])
    return torch.where(instance_ids[None] > 0, to_centre, predicted)


def oracle_logits(sem: torch.Tensor, predicted: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """(K, h, w) logits certain of the ground-truth class ``sem`` (h, w); void pixels keep
    ``predicted``."""
    num_classes = predicted.shape[0]
    valid = sem != ignore_label
    one_hot = torch.nn.functional.one_hot(torch.where(valid, sem, 0), num_classes)
    certain = (2 * one_hot.permute(2, 0, 1).float() - 1) * CERTAIN
    return torch.where(valid[None], certain, predicted)


def ground_truth_outputs(
    sem_logits: torch.Tensor,
    heads: Dict[str, torch.Tensor],
    targets: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    ignore_label: int,
    seed_sigma_scale: float = 0.5,
) -> List[Dict[str, torch.Tensor]]:
    """Per image of a batch, the network outputs its ground truth ``targets`` (semantic,
    instance ids at the network size) would give: ``"sem_logits"``, ``"offsets"``, the seeds
    ``"seed_logits/points"`` and the seed maps ``"seed_logits/<target>"`` of SEED_MAPS
    (computed once per image, shared by every row)."""
    outputs = []
    for i, (sem, instance_ids) in enumerate(targets):
        oracle = {
            "sem_logits": oracle_logits(sem, sem_logits[i], ignore_label),
            "offsets": oracle_offsets(instance_ids, heads["offsets"][i]),
            "seed_logits/points": oracle_seed_logits(instance_ids.cpu()).to(sem_logits.device),
        }
        for target in SEED_MAPS:
            oracle[f"seed_logits/{target}"] = oracle_seed_map_logits(
                instance_ids, target, seed_sigma_scale
            )
        outputs.append(oracle)
    return outputs


def substitute_ground_truth(
    row: Tuple,
    sem_logits: torch.Tensor,
    heads: Dict[str, torch.Tensor],
    oracles: Sequence[Dict[str, torch.Tensor]],
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Copies of a batch's network outputs with the parts ``row`` names replaced by the
    ground truth's (:func:`ground_truth_outputs`)."""
    _, gt_semantics, _, gt_seeds, gt_offsets = row
    sem_logits, heads = sem_logits.clone(), {k: v.clone() for k, v in heads.items()}
    for i, oracle in enumerate(oracles):
        if gt_semantics:
            sem_logits[i] = oracle["sem_logits"]
        if gt_seeds:
            heads["seed_logits"][i] = oracle[f"seed_logits/{gt_seeds}"]
        if gt_offsets:
            heads["offsets"][i] = oracle["offsets"]
    return sem_logits, heads


def row_config(cfg, row: Tuple):
    """The config of ``row``'s postprocessor: the model's, with the row's instance method."""
    post_cfg = cfg.clone()
    post_cfg.defrost()
    post_cfg.MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD = row[2]
    if row[3] == "points":
        # Ground-truth seeds are single points on a flat map: nothing to climb, so their rows
        # assign pixels by offsets whatever SEED_ASSIGNMENT says.
        post_cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT = "offsets"
    return post_cfg


def evaluate_rows(model: nn.Module, cfg, dataset: str, output_dir: str) -> List[Dict]:
    """Panoptic metrics of every row of ROWS: one pass over the dataset (the network and the
    ground truth once per image), each row with its own postprocessor and evaluator."""
    thing_ids = thing_ids_from_config(cfg)
    ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    postprocessors, evaluators = [], []
    for index, row in enumerate(ROWS):
        postprocessors.append(build_postprocessor(row_config(cfg, row), thing_ids))
        evaluator = build_evaluator(cfg, dataset, os.path.join(output_dir, "eval", f"row{index}"))
        evaluator.reset()
        evaluators.append(evaluator)
    loader = MaskAttnTrainer.build_test_loader(cfg, dataset)
    for batched_inputs in loader:
        sem_logits, heads = model.inference(batched_inputs, do_postprocess=False)
        size = tuple(sem_logits.shape[-2:])
        targets = [
            tuple(t.to(sem_logits.device) for t in
                  network_size_targets(inputs, size, thing_ids, ignore_label))
            for inputs in batched_inputs
        ]
        oracles = ground_truth_outputs(
            sem_logits, heads, targets, ignore_label, cfg.MODEL.EMBED_HEAD.SEED_SIGMA_SCALE
        )
        for row, postprocessor, evaluator in zip(ROWS, postprocessors, evaluators):
            row_logits, row_heads = substitute_ground_truth(row, sem_logits, heads, oracles)
            evaluator.process(batched_inputs, postprocess_batch(
                postprocessor, row_logits, row_heads, batched_inputs,
                semantic_on=False, instance_on=False, panoptic_on=True,
            ))
    return [evaluator.evaluate() for evaluator in evaluators]


def setup(args):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # Panoptic quality only, at the original size.
    cfg.TEST.EVALUATORS = ["panoptic"]
    cfg.TEST.PAPER_PROTOCOL = False
    if args.dataset:
        cfg.DATASETS.TEST = (args.dataset,)
    cfg.freeze()
    return cfg


def format_table(rows: Sequence[Dict], title: str) -> str:
    lines = [f"# {title}", "",
             "| semantics | instances | PQ | **PQ_th** | PQ_st | SQ_th | RQ_th |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['semantics']} | {r['instances']} | {r['PQ']:.1f} | "
                     f"**{r['PQ_th']:.1f}** | {r['PQ_st']:.1f} | {r['SQ_th']:.1f} | "
                     f"{r['RQ_th']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = get_parser().parse_args(argv)
    setup_logger(name="maskattn_d2")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup(args)
    dataset = cfg.DATASETS.TEST[0]
    if not MetadataCatalog.get(dataset).get("panoptic_json"):
        raise ValueError(f"{dataset} has no panoptic ground truth (panoptic_json).")
    if not cfg.MODEL.EMBED_HEAD.SPATIAL_ON:
        raise ValueError(
            "instance_headroom needs a model with spatial embeddings (offsets and a seed map): "
            "MODEL.EMBED_HEAD.SPATIAL_ON is False."
        )
    model = build_model(cfg)
    load_inference_weights(model, cfg.MODEL.WEIGHTS, allow_random=args.allow_random_weights)
    model.eval()
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    for row, metrics in zip(ROWS, evaluate_rows(model, cfg, dataset, args.output_dir)):
        pq = metrics["panoptic_seg"]
        results.append({
            "semantics": "ground truth" if row[1] else "predicted",
            "instances": row[0],
            "PQ": pq["PQ"], "PQ_th": pq["PQ_th"], "PQ_st": pq["PQ_st"],
            "SQ_th": pq["SQ_th"], "RQ_th": pq["RQ_th"],
        })
    title = f"PQ_th headroom on {dataset} ({cfg.MODEL.WEIGHTS or 'random weights'})"
    table = format_table(results, title)
    print(table)
    with open(os.path.join(args.output_dir, "instance_headroom.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "instance_headroom.json"), "w") as f:
        json.dump({"args": vars(args), "rows": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
