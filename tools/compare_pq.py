#!/usr/bin/env python
"""PQ of MaskAttn-UNet against Panoptic-DeepLab, and of its instance methods, on equal terms.

    python tools/compare_pq.py                         # 300 iterations each, a few CPU minutes
    python tools/compare_pq.py --iters 1500 --num-train 512 --output-dir output/compare_pq
    python tools/compare_pq.py --dataset synthetic_touching   # same-class instances in contact
    python tools/compare_pq.py --dataset dsb2018_panoptic \
        --config-file configs/dsb2018_panoptic_128.yaml --output-dir output/compare_pq_dsb2018
    python tools/compare_pq.py --models maskattn       # MaskAttn-UNet only (development)
    python tools/compare_pq.py --seeds 0 1 2 3         # four trainings each, mean ± sd

Data (``--dataset``): "synthetic" (default) generates the embedded synthetic panoptic scenes
with ``--num-train`` / ``--num-val`` images and registers them here; "synthetic_touching"
does the same with the touching layout (chains of same-class instances in contact, which the
connected components of the semantic map merge). Any other value NAME is a registered panoptic
dataset pair "NAME_train" / "NAME_val" (e.g. "maskattn_synthetic_touching_panoptic",
"dsb2018_panoptic"), used as registered: ``--num-train`` / ``--num-val`` are then ignored, and
``--config-file`` must suit the dataset (its number of classes); its DATASETS are replaced.

Both models train on the same data with the same budget: ``--iters`` iterations of
``--batch-size`` images, the same optimizer, LR schedule and gradient clipping (the
``SOLVER`` of ``--config-file``, its warm-up scaled to ``--iters``), and the same augmentations
(random resized crop to the network size, flip, colour jitter):

(a) MaskAttn-UNet (``--config-file``, default ``configs/synthetic_panoptic_128.yaml``) vs
    Panoptic-DeepLab from ``detectron2.projects.panoptic_deeplab`` with a small ResNet
    (``--pdl-depth`` 18: ResNet-18 with a dilated res5, output stride 16), its own dataset
    mapper (``PanopticDeeplabDatasetMapper``), target generator, losses and post-processing;
(b) the SAME trained MaskAttn-UNet evaluated once per instance method of
    ``maskattn_d2.modeling.postprocessing.INSTANCE_METHODS`` (embedding clustering, connected
    components of the semantic map, ...; ``MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD``).

Evaluation: detectron2's ``COCOPanopticEvaluator`` (through
:func:`maskattn_d2.evaluation.build_evaluator`) on the validation split at the original image
sizes. Both models see the validation images resized to the network size and produce their
panoptic map at that size, which is resized (nearest) to the image's size: MaskAttn-UNet's
post-processor does it itself; Panoptic-DeepLab's output is resized by a thin wrapper,
because its offsets are in network pixels and cannot be upsampled before grouping.
Writes ``compare_pq.md``, ``compare_pq.json`` and MaskAttn-UNet's weights
(``maskattn_unet/model_final.pth``) into ``--output-dir`` and prints the table.
PQ_th (PQ over the thing classes) is the column that measures how well instances of one class
are told apart; PQ_st depends only on the semantic segmentation.

One training of a small budget varies a lot with its seed (initialisation and data order; on
DSB 2018 at 400 x 8, PQ_th spans 32-51 over eight seeds), often more than the difference being
measured. ``--seeds`` trains every model once per seed (each in ``--output-dir/seed_<s>``; the
generated synthetic data stays that of ``--seed``), prints each seed's table and a summary: per
row, the mean and standard deviation of PQ, PQ_th and PQ_st over the trainings, the range of
PQ_th, and for MaskAttn-UNet's instance methods their PQ_th minus that of connected components
on the same weights, seed by seed.
"""
import argparse
import copy
import json
import logging
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import SimpleTrainer, hooks
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.projects.panoptic_deeplab import PanopticDeeplabDatasetMapper
from detectron2.solver import build_lr_scheduler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.logger import setup_logger
from torch import nn

# Importing maskattn_d2 registers the model, backbone, heads and datasets.
from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import build_dataset_mapper, build_train_augmentations
from maskattn_d2.data.datasets import register_synthetic_panoptic
from maskattn_d2.engine import adapt_config_to_device, build_optimizer
from maskattn_d2.evaluation import build_evaluator
from maskattn_d2.modeling.postprocessing import INSTANCE_METHODS
from maskattn_d2.structures import resize_label_map

from benchmarking.peers import panoptic_deeplab_config, panoptic_deeplab_target_generator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --dataset values that generate synthetic data here (with --num-train / --num-val).
GENERATED_DATASETS = {"synthetic": False, "synthetic_touching": True}  # name -> touching
MODELS = ("maskattn", "pdl")
logger = logging.getLogger("maskattn_d2.compare_pq")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train MaskAttn-UNet and Panoptic-DeepLab with one budget and compare PQ"
    )
    parser.add_argument(
        "--config-file", default=os.path.join(REPO, "configs", "synthetic_panoptic_128.yaml"),
        help="MaskAttn-UNet config; its SOLVER is used for both models",
    )
    parser.add_argument(
        "--dataset", default="synthetic",
        help="'synthetic' (default) or 'synthetic_touching': synthetic scenes generated with "
        "--num-train / --num-val images (the touching layout: same-class instances in "
        "contact); any other NAME: the registered panoptic datasets NAME_train / NAME_val "
        "(e.g. maskattn_synthetic_touching_panoptic, dsb2018_panoptic), with --num-train / "
        "--num-val ignored; pass a --config-file with the dataset's number of classes",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS),
        help="models to train: maskattn (MaskAttn-UNet, evaluated with every instance method) "
        "and/or pdl (Panoptic-DeepLab); default both",
    )
    parser.add_argument("--iters", type=int, default=300, help="training iterations per model")
    parser.add_argument("--batch-size", type=int, default=8, help="images per iteration")
    parser.add_argument(
        "--num-train", type=int, default=256,
        help="synthetic training images (only for --dataset synthetic / synthetic_touching)",
    )
    parser.add_argument(
        "--num-val", type=int, default=32,
        help="synthetic validation images (only for --dataset synthetic / synthetic_touching)",
    )
    parser.add_argument("--pdl-depth", type=int, default=18, choices=[18, 34, 50],
                        help="ResNet depth of Panoptic-DeepLab")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the models (and of the generated synthetic data)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="SEED",
        help="two or more seeds: train every model once per seed (initialisation and data "
        "order; generated data stays that of --seed) and summarise the rows over the "
        "trainings (mean ± sd)",
    )
    parser.add_argument("--output-dir", default="./output/compare_pq")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="overrides of the MaskAttn-UNet config (KEY VALUE pairs)",
    )
    return parser


def _check_args(args) -> None:
    if args.iters < 1 or args.batch_size < 2:
        raise ValueError("--iters must be >= 1 and --batch-size >= 2 (BatchNorm in training)")
    if args.seeds is not None and (len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds)):
        raise ValueError(
            f"--seeds needs two or more distinct seeds, got {args.seeds} (one training: --seed)"
        )
    if args.dataset in GENERATED_DATASETS and (
        args.num_train < args.batch_size or args.num_val < 1
    ):
        raise ValueError("--num-train must be >= --batch-size and --num-val >= 1")


def dataset_names(args) -> List[str]:
    """The (train, val) dataset names of ``--dataset``, generated synthetic data registered."""
    if args.dataset in GENERATED_DATASETS:
        touching = GENERATED_DATASETS[args.dataset]
        layout = "_touching" if touching else ""
        prefix = f"compare_pq_synthetic{layout}_{args.num_train}_{args.num_val}_seed{args.seed}"
        return register_synthetic_panoptic(
            prefix, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
            touching=touching,
        )
    names = [f"{args.dataset}_train", f"{args.dataset}_val"]
    registered = set(DatasetCatalog.list())
    missing = [n for n in names if n not in registered]
    if missing:
        pairs = sorted(
            n[: -len("_train")] for n in registered
            if n.endswith("_train") and n[: -len("_train")] + "_val" in registered
        )
        raise ValueError(
            f"--dataset {args.dataset}: {', '.join(missing)} not registered; use "
            f"{', '.join(sorted(GENERATED_DATASETS))} or one of the registered pairs: "
            f"{', '.join(pairs)}"
        )
    return names


def _check_classes(cfg, train_name: str) -> None:
    """The config's class count must be the dataset's (a clear error instead of a crash)."""
    num_classes = len(MetadataCatalog.get(train_name).get("stuff_classes", []))
    if num_classes and num_classes != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
        raise ValueError(
            f"{train_name} has {num_classes} classes but {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} "
            f"in MODEL.SEM_SEG_HEAD.NUM_CLASSES: pass the dataset's --config-file"
        )


# --------------------------------------------------------------------------- configs
def maskattn_config(args, train_name: str, val_name: str):
    """The MaskAttn-UNet config of the comparison (frozen)."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    solver = cfg.SOLVER
    solver.WARMUP_ITERS = int(round(solver.WARMUP_ITERS * args.iters / max(solver.MAX_ITER, 1)))
    solver.MAX_ITER = args.iters
    solver.IMS_PER_BATCH = args.batch_size
    solver.CHECKPOINT_PERIOD = args.iters + 1
    cfg.TEST.EVALUATORS = ["panoptic"]
    cfg.TEST.PAPER_PROTOCOL = False
    # One forward pass per image in every row: Panoptic-DeepLab runs without test-time
    # augmentation here, so the config's flips (TEST.AUG) are off.
    cfg.TEST.AUG.ENABLED = False
    cfg.OUTPUT_DIR = os.path.join(args.output_dir, "maskattn_unet")
    adapt_config_to_device(cfg)
    cfg.freeze()
    return cfg


def pdl_config(args, maskattn_cfg):
    """Panoptic-DeepLab's config with the MaskAttn-UNet config's data, solver and loader."""
    cfg = panoptic_deeplab_config(
        dataset_name=maskattn_cfg.DATASETS.TRAIN[0],
        num_classes=maskattn_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        network_size=tuple(maskattn_cfg.INPUT.NETWORK_SIZE),
        depth=args.pdl_depth,
        device=maskattn_cfg.MODEL.DEVICE,
    )
    cfg.SOLVER = maskattn_cfg.SOLVER.clone()  # same optimizer, LR schedule, clipping, budget
    cfg.DATALOADER = maskattn_cfg.DATALOADER.clone()
    cfg.DATASETS.TEST = tuple(maskattn_cfg.DATASETS.TEST)
    cfg.OUTPUT_DIR = os.path.join(args.output_dir, "panoptic_deeplab")
    cfg.freeze()
    return cfg


# --------------------------------------------------------------------------- train / evaluate
def train(model: nn.Module, data_loader, cfg, name: str) -> float:
    """Train ``model`` for ``cfg.SOLVER.MAX_ITER`` iterations; returns the seconds it took."""
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    trainer = SimpleTrainer(model, data_loader, optimizer)
    max_iter = cfg.SOLVER.MAX_ITER
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(optimizer, scheduler),
            hooks.PeriodicWriter([CommonMetricPrinter(max_iter)], period=max(max_iter // 10, 1)),
        ]
    )
    logger.info("Training %s for %d iterations", name, max_iter)
    model.train()
    start = time.perf_counter()
    trainer.train(0, max_iter)
    return time.perf_counter() - start


class PanopticAtNetworkSize(nn.Module):
    """Runs Panoptic-DeepLab at the size of its input image and resizes its panoptic ids
    (nearest) to each input's ``height`` x ``width``; returns only "panoptic_seg"."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        inputs = [dict(x, height=x["image"].shape[-2], width=x["image"].shape[-1])
                  for x in batched_inputs]
        outputs = self.model(inputs)
        results = []
        for out, original in zip(outputs, batched_inputs):
            panoptic, segments_info = out["panoptic_seg"]
            size = (int(original["height"]), int(original["width"]))
            results.append({"panoptic_seg": (resize_label_map(panoptic, size), segments_info)})
        return results


def evaluate(model: nn.Module, cfg, output_folder: str) -> Dict[str, float]:
    """PQ / SQ / RQ (all, things, stuff) of ``model`` on ``cfg.DATASETS.TEST[0]``."""
    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset, mapper=build_dataset_mapper(cfg, False))
    evaluator = build_evaluator(cfg, dataset, output_folder)
    results = inference_on_dataset(model, loader, evaluator)
    return dict(results["panoptic_seg"])


def run(args, train_name: str, val_name: str) -> List[Dict]:
    """Train the ``--models``, evaluate their rows; returns them."""
    torch.set_num_threads(args.threads)
    cfg = maskattn_config(args, train_name, val_name)
    _check_classes(cfg, train_name)
    rows = []
    if "maskattn" in args.models:
        rows += _run_maskattn(args, cfg)
    if "pdl" in args.models:
        rows += _run_pdl(args, cfg, train_name)
    return rows


def _run_maskattn(args, cfg) -> List[Dict]:
    """MaskAttn-UNet: one training, evaluated with every instance method."""
    rows = []
    seed_all_rng(args.seed)
    model = build_model(cfg)
    loader = build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))
    train_s = train(model, loader, cfg, "MaskAttn-UNet")
    state = model.state_dict()
    # Kept so that other postprocessing settings can be evaluated on the same weights
    # (train_net.py --eval-only MODEL.WEIGHTS <this file>).
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    torch.save({"model": state}, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    for method in INSTANCE_METHODS:
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD = method
        eval_cfg.freeze()
        eval_model = build_model(eval_cfg)
        eval_model.load_state_dict(state)
        metrics = evaluate(eval_model, eval_cfg, os.path.join(cfg.OUTPUT_DIR, method))
        row = _row(f"MaskAttn-UNet ({method.replace('_', ' ')})", metrics, train_s, model)
        row["instance_method"] = method
        rows.append(row)
    return rows


def _run_pdl(args, cfg, train_name: str) -> List[Dict]:
    """Panoptic-DeepLab with its own mapper, targets, losses and post-processing."""
    pdl_cfg = pdl_config(args, cfg)
    seed_all_rng(args.seed)
    pdl = build_model(pdl_cfg)
    thing_ids = MetadataCatalog.get(train_name).thing_dataset_id_to_contiguous_id.values()
    mapper = PanopticDeeplabDatasetMapper(
        augmentations=build_train_augmentations(cfg),
        image_format=cfg.INPUT.FORMAT,
        panoptic_target_generator=panoptic_deeplab_target_generator(pdl_cfg, list(thing_ids)),
    )
    pdl_train_s = train(pdl, build_detection_train_loader(pdl_cfg, mapper=mapper), pdl_cfg,
                        "Panoptic-DeepLab")
    metrics = evaluate(PanopticAtNetworkSize(pdl), cfg, pdl_cfg.OUTPUT_DIR)
    return [_row(f"Panoptic-DeepLab (R{args.pdl_depth}, OS16)", metrics, pdl_train_s, pdl)]


def _row(name: str, metrics: Dict[str, float], train_s: float, model: nn.Module) -> Dict:
    row = {"model": name, "train_s": train_s,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    row.update({k: float(metrics[k]) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")})
    return row


def format_table(rows: Sequence[Dict]) -> str:
    # PQ_th right after PQ: it is where the instance methods differ.
    header = "| Model | Params (M) | PQ | **PQ_th** | PQ_st | SQ | RQ | Train time (s) |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f} | {r['PQ']:.1f} | {r['PQ_th']:.1f} | "
            f"{r['PQ_st']:.1f} | {r['SQ']:.1f} | {r['RQ']:.1f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def summarize_trainings(rows: Sequence[Dict]) -> List[Dict]:
    """
    The rows of several trainings (each row with its ``"seed"``) summarised per model row, in
    the order the rows first appear: the number of trainings, the mean and standard deviation
    (n - 1) of PQ, PQ_th and PQ_st, the range of PQ_th, and for MaskAttn-UNet's instance
    methods other than connected components the mean and standard deviation of their PQ_th
    minus that of connected components from the same training (None where there is none).
    """
    by_model: Dict[str, List[Dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    connected = {
        r["seed"]: r["PQ_th"] for r in rows if r.get("instance_method") == "connected_components"
    }
    summary = []
    for model, group in by_model.items():
        item = {"model": model, "trainings": len(group)}
        for key in ("PQ", "PQ_th", "PQ_st"):
            values = [r[key] for r in group]
            item[key] = statistics.mean(values)
            item[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        item["PQ_th_min"] = min(r["PQ_th"] for r in group)
        item["PQ_th_max"] = max(r["PQ_th"] for r in group)
        gaps = [
            r["PQ_th"] - connected[r["seed"]]
            for r in group
            if r.get("instance_method") not in (None, "connected_components")
            and r["seed"] in connected
        ]
        item["gap_to_connected_components"] = statistics.mean(gaps) if gaps else None
        item["gap_to_connected_components_sd"] = (
            statistics.stdev(gaps) if len(gaps) > 1 else (0.0 if gaps else None)
        )
        item["gaps"] = gaps
        summary.append(item)
    return summary


def format_summary(summary: Sequence[Dict]) -> str:
    """Markdown table of :func:`summarize_trainings`: per row, mean ± sd of PQ, PQ_th and
    PQ_st, the PQ_th range and the gap to connected components with its per-seed values."""
    header = (
        "| Model | Trainings | PQ | **PQ_th** | PQ_st | PQ_th range | "
        "PQ_th - connected components (same weights) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for s in summary:
        gap = s["gap_to_connected_components"]
        gap_text = "-" if gap is None else (
            f"{gap:+.2f} ± {s['gap_to_connected_components_sd']:.2f} "
            f"({', '.join(f'{g:+.2f}' for g in s['gaps'])})"
        )
        lines.append(
            f"| {s['model']} | {s['trainings']} | {s['PQ']:.1f} ± {s['PQ_sd']:.1f} | "
            f"{s['PQ_th']:.1f} ± {s['PQ_th_sd']:.1f} | {s['PQ_st']:.1f} ± {s['PQ_st_sd']:.1f} | "
            f"{s['PQ_th_min']:.1f} to {s['PQ_th_max']:.1f} | {gap_text} |"
        )
    return "\n".join(lines)


def dataset_title(args, train_name: str, val_name: str) -> str:
    """How the markdown title names the data."""
    if args.dataset in GENERATED_DATASETS:
        layout = ", touching layout" if GENERATED_DATASETS[args.dataset] else ""
        return f"the synthetic data{layout} ({args.num_train} train / {args.num_val} val images)"
    num_train, num_val = (len(DatasetCatalog.get(n)) for n in (train_name, val_name))
    return f"{args.dataset} ({train_name}: {num_train} / {val_name}: {num_val} images)"


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = get_parser().parse_args(argv)
    _check_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(name="maskattn_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    train_name, val_name = dataset_names(args)
    seeds = args.seeds or [args.seed]
    rows, tables = [], []
    for seed in seeds:
        run_args = copy.copy(args)
        run_args.seed = seed
        if args.seeds:
            run_args.output_dir = os.path.join(args.output_dir, f"seed_{seed}")
        seed_rows = run(run_args, train_name, val_name)
        for row in seed_rows:
            row["seed"] = seed
        rows += seed_rows
        tables.append((seed, format_table(seed_rows)))
    title = (
        f"# PQ on {dataset_title(args, train_name, val_name)}, "
        f"{args.iters} iterations x {args.batch_size} images per model"
    )
    lines = [title, ""]
    summary = None
    if args.seeds:
        summary = summarize_trainings(rows)
        lines += [f"## Over {len(seeds)} trainings (seeds {', '.join(map(str, seeds))})", "",
                  format_summary(summary), ""]
        for seed, table in tables:
            lines += [f"## Seed {seed}", "", table, ""]
    else:
        lines += [tables[0][1], ""]
    lines.append(
        "PQ_th: PQ over the thing classes, where instances of one class must be told apart."
    )
    if "maskattn" in args.models and len(INSTANCE_METHODS) > 1:
        lines.append(
            "All MaskAttn-UNet rows of a seed are the same trained model (train time counted "
            "once)."
        )
    markdown = "\n".join(lines)
    with open(os.path.join(args.output_dir, "compare_pq.md"), "w") as f:
        f.write(markdown + "\n")
    saved = {"args": vars(args), "datasets": [train_name, val_name], "rows": rows}
    if summary is not None:
        saved["summary"] = summary
    with open(os.path.join(args.output_dir, "compare_pq.json"), "w") as f:
        json.dump(saved, f, indent=2)
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
