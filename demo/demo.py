#!/usr/bin/env python
"""MaskAttn-UNet demo: draw panoptic, instance and semantic predictions on images.

    python demo/demo.py --config-file configs/synthetic_panoptic_128.yaml \\
        --input img1.jpg 'photos/*.png' some_folder/ --output out/ \\
        --weights output/synthetic_panoptic_128/model_final.pth --show-embeddings --show-gates

For every input image ``<stem>.<ext>`` it writes, into ``--output``:
``<stem>_panoptic.png``, ``<stem>_instances.png`` (instances scoring at least
``--confidence-threshold``), ``<stem>_semantic.png`` (argmax), all at the drawing size (the
image's, except that images with a shorter side below ``--min-size`` 512 are drawn upscaled
and images with a longer side above ``--max-size`` 1600 are reduced first), and
with ``--show-embeddings`` ``<stem>_embeddings.png`` (PCA of the pixel embeddings, drawing
size), with ``--show-gates`` ``<stem>_gates.png`` (see ``--gate-layout``; panels of at most
640 pixels, each gate with a colour bar of its value range).

Without ``--weights`` (or MODEL.WEIGHTS), or with a checkpoint that does not fit the model,
the demo stops (exit status 2) unless ``--allow-random-weights``. ``--backend onnxruntime
--onnx-model export/model.onnx`` predicts with a network written by ``tools/export_model.py``
instead (its weights are in the file; pass the config it wrote, ``config.yaml``, or the one
it was exported from); it has no gates to draw. ``--register-module
my_datasets.py`` imports a module that registers the dataset named by DATASETS.TEST first.

Inputs: files, glob patterns and folders (their images, not recursive). A path that does not
exist or a pattern that matches nothing stops the demo before any work (exit status 2, every
bad path named). An image that exists but cannot be decoded is skipped and reported; the demo
goes on with the others and exits with status 1.
"""
import argparse
import glob
import logging
import os
import sys
import time
from typing import List, Optional

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

# Importing maskattn_d2 registers the model, backbone, heads and datasets.
from maskattn_d2 import add_maskattn_config
from maskattn_d2.data.datasets import read_image_checked
from maskattn_d2.engine import (
    WeightsError,
    adapt_config_to_device,
    import_user_modules,
    load_inference_weights,
)
from maskattn_d2.export import ONNXRuntimePredictor
from maskattn_d2.utils.visualization import GATE_LAYOUTS, display_scale

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import VisualizationDemo  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("maskattn_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MaskAttn-UNet demo (detectron2 Visualizer)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config YAML")
    parser.add_argument(
        "--input", nargs="+", required=True,
        help="image files, glob patterns ('dir/*.jpg', quoted) or folders",
    )
    parser.add_argument("--output", required=True, help="folder the pictures are written to")
    parser.add_argument(
        "--weights", default=None,
        help="checkpoint to load (shortcut for MODEL.WEIGHTS); required unless "
        "--allow-random-weights",
    )
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="draw even without weights, or with a checkpoint that does not fit the model "
        "(those parameters randomly initialised, seeded); without it that is an error",
    )
    parser.add_argument(
        "--register-module", action="append", default=[], metavar="MODULE",
        help="import MODULE first (path to a .py file, or a module name on sys.path or in the "
        "working directory), e.g. one that registers the dataset named by DATASETS.TEST; "
        "repeatable",
    )
    parser.add_argument(
        "--backend", choices=["torch", "onnxruntime"], default="torch",
        help="torch: the PyTorch model (MODEL.WEIGHTS); onnxruntime: the --onnx-model file",
    )
    parser.add_argument(
        "--onnx-model", default=None, metavar="FILE",
        help="model.onnx written by tools/export_model.py (with --backend onnxruntime)",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="least score of an instance drawn in the instances picture",
    )
    parser.add_argument(
        "--show-embeddings", action="store_true",
        help="also write <stem>_embeddings.png (PCA of the pixel embeddings to RGB)",
    )
    parser.add_argument(
        "--show-gates", action="store_true",
        help="also write <stem>_gates.png (heat-maps of the mask-attention gates)",
    )
    parser.add_argument(
        "--gate-layout", choices=GATE_LAYOUTS, default="side_by_side",
        help="side_by_side: image + one panel per gate, width (1 + gates) x image width; "
        "overlay: the mean gate over the image, image size",
    )
    parser.add_argument(
        "--min-size", type=int, default=512,
        help="images whose shorter side is smaller are drawn upscaled to it (labels stay "
        "readable; predictions are made on the image itself); 0: never",
    )
    parser.add_argument(
        "--max-size", type=int, default=1600,
        help="images whose longer side is larger are reduced to it before prediction and "
        "drawing (time, memory and file size stay bounded); 0: never",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.DEVICE cpu",
    )
    return parser


def setup_cfg(args):
    """Frozen config from ``--config-file``, ``--opts`` and ``--weights``, adapted to the device."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    adapt_config_to_device(cfg)
    cfg.freeze()
    return cfg


def collect_inputs(entries: List[str]) -> List[str]:
    """
    Expand ``--input`` entries into image paths (sorted within a pattern or folder, order of
    the entries kept, duplicates removed).

    Raises:
        ValueError: naming every entry that does not exist, every pattern that matches
            nothing, every folder without images, and output name clashes (two inputs with
            the same file stem).
    """
    paths: List[str] = []
    problems: List[str] = []
    for entry in entries:
        if os.path.isdir(entry):
            found = sorted(
                os.path.join(entry, name)
                for name in os.listdir(entry)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(entry, name))
            )
            if not found:
                problems.append(f"folder without images ({', '.join(IMAGE_EXTENSIONS)}): {entry}")
        elif glob.has_magic(entry):
            found = sorted(p for p in glob.glob(os.path.expanduser(entry)) if os.path.isfile(p))
            if not found:
                problems.append(f"pattern matches no file: {entry}")
        elif os.path.isfile(entry):
            found = [entry]
        else:
            problems.append(f"no such file: {entry}")
            found = []
        paths += [p for p in found if p not in paths]
    stems = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            problems.append(f"{stems[stem]} and {path} would write the same <stem>_*.png files")
        stems.setdefault(stem, path)
    if problems:
        raise ValueError("Bad --input:\n  " + "\n  ".join(problems))
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; returns the exit status (0 ok, 1 some images skipped, 2 bad inputs)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="maskattn_d2")
    try:
        paths = collect_inputs(args.input)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:
        import_user_modules(args.register_module)
    except (ImportError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    if (args.backend == "onnxruntime") != (args.onnx_model is not None):
        logger.error("--onnx-model FILE goes with --backend onnxruntime, and only with it.")
        return 2
    cfg = setup_cfg(args)
    if args.backend == "torch" and not cfg.MODEL.WEIGHTS and not args.allow_random_weights:
        logger.error(
            "No weights: pass --weights (or MODEL.WEIGHTS) with a checkpoint of this config, "
            "or --allow-random-weights to draw an untrained model on purpose."
        )
        return 2
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    if dataset is not None and dataset not in DatasetCatalog.list():
        logger.error(
            "Dataset '%s' (DATASETS.TEST[0], it names the classes) is not registered: "
            "register it in a module and pass --register-module that_module.py "
            "(see datasets/README.md, 'Use your own dataset').",
            dataset,
        )
        return 2
    torch.manual_seed(0)  # parameters the weights do not set are random, but reproducible
    predictor = None
    if args.backend == "onnxruntime":
        try:
            predictor = ONNXRuntimePredictor(cfg, args.onnx_model)
        except (FileNotFoundError, ImportError, ValueError) as e:
            logger.error("%s", e)
            return 2
    demo = VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_embeddings=args.show_embeddings,
        show_gates=args.show_gates,
        gate_layout=args.gate_layout,
        predictor=predictor,
    )
    try:
        if predictor is None:
            # Loads MODEL.WEIGHTS again, checking that it fits the model (DefaultPredictor only
            # logs a warning per parameter it cannot load).
            load_inference_weights(
                demo.predictor.model, cfg.MODEL.WEIGHTS, allow_random=args.allow_random_weights
            )
    except (WeightsError, RuntimeError) as e:
        logger.error("%s", e)
        return 2
    os.makedirs(args.output, exist_ok=True)
    skipped = []
    for path in paths:
        try:
            image = read_image_checked(path, "BGR")
        except (FileNotFoundError, ValueError) as e:
            logger.error("Skipping %s: %s", path, e)
            skipped.append(path)
            continue
        start = time.perf_counter()
        scale = display_scale(*image.shape[:2], min_size=args.min_size, max_size=args.max_size)
        if scale < 1:  # a huge image: the model sees 128x128 anyway
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image, scale = cv2.resize(image, size, interpolation=cv2.INTER_AREA), 1.0
        predictions, pictures = demo.run_on_image(image, scale=scale)
        stem = os.path.splitext(os.path.basename(path))[0]
        for name, picture in pictures.items():
            out_file = os.path.join(args.output, f"{stem}_{name}.png")
            if not cv2.imwrite(out_file, picture[:, :, ::-1]):
                raise OSError(f"Could not write {out_file}")
        counts = []
        if "panoptic_seg" in predictions:
            counts.append(f"{len(predictions['panoptic_seg'][1])} segments")
        if "instances" in predictions:
            counts.append(f"{len(predictions['instances'])} instances")
        logger.info(
            "%s: %s, %.2fs -> %s",
            path, ", ".join(counts) or "semantic only", time.perf_counter() - start,
            ", ".join(f"{stem}_{name}.png" for name in pictures),
        )
    if args.show_gates and demo.gates_unavailable:
        logger.warning("No <stem>_gates.png written: %s.", demo.gates_unavailable)
    if skipped:
        logger.error("%d of %d inputs skipped (unreadable): %s", len(skipped), len(paths), skipped)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
