#!/usr/bin/env python
"""Export the network of a MaskAttn-UNet for deployment, as ONNX or TorchScript.

    python tools/export_model.py --config-file configs/coco_panoptic_128.yaml \\
        --format onnx --output export/coco_128 \\
        MODEL.WEIGHTS output/coco_panoptic_128/model_final.pth

Writes into ``--output``: ``model.onnx`` (or ``model.ts``) and ``config.yaml``, the config it
was exported with (the onnxruntime backend of ``demo/demo.py`` and ``tools/benchmark.py``
reads the classes and post-processing from it).

The exported network takes ``image``: float32 (batch, 3, h, w) pixels 0-255 in
``INPUT.FORMAT`` channel order at ``INPUT.NETWORK_SIZE`` (resize the image there, bilinear;
normalisation is inside) -- any batch size -- and returns ``sem_logits_nhwc`` (batch, h, w, K:
the class logits channels last) and the embedding head's outputs (``embeddings``, ``offsets``, ``seed_logits``), the inputs of the
model's post-processor (``maskattn_d2.export.ONNXRuntimeModel`` runs both). BatchNorm is folded
into the convolutions. After writing, the file is run (onnxruntime or TorchScript) on a random
batch of 3 and compared with PyTorch; the export fails if they differ.

``--int8`` (ONNX only) also writes ``model_int8.onnx``: the same network with its
convolutions in INT8 (onnxruntime's static quantization, activation ranges calibrated on the
first ``--calibration-images`` images of ``--calibration-dataset``, by default the config's
first training set, through the test-time mapper). Run it like ``model.onnx``. The tool logs
how often it agrees with ``model.onnx`` on those images; quantization changes the outputs, so
nothing fails on that.

Exit status: 0 written and checked, 2 bad input (config, weights, format: the message names
it), 1 the exported file disagrees with PyTorch.
"""
import argparse
import itertools
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

# Importing maskattn_d2 registers the model, backbone, heads and datasets.
from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import build_dataset_mapper
from maskattn_d2.engine import (
    WeightsError,
    adapt_config_to_device,
    import_user_modules,
    load_inference_weights,
)
from maskattn_d2.export import (
    ONNX_OPSET,
    ExportableNetwork,
    ONNXRuntimeModel,
    export_onnx,
    export_torchscript,
    network_metadata,
)
from maskattn_d2.export.quantize import INT8_FILE, quantize_int8

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
CALIBRATION_BATCH = 8
CALIBRATION_IMAGES = 64
# Largest |exported - PyTorch| accepted, relative to the output's largest |value| (float32
# kernels of onnxruntime / TorchScript differ from eager ones in summation order only).
RELATIVE_TOLERANCE = 1e-4
# The embeddings are unit vectors: where a pixel's raw embedding is near zero (an untrained
# network), normalising divides the kernels' rounding differences by its small norm. A wrong
# export differs by O(1), so this still catches one.
TOLERANCES = {"embeddings": 1e-3}
logger = logging.getLogger("maskattn_d2.export_model")


class ExportMismatch(RuntimeError):
    """The exported file's outputs differ from PyTorch's."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a MaskAttn-UNet network for deployment")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config YAML")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="output format")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the exported model and its config.yaml")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET,
                        help=f"ONNX opset (>= {ONNX_OPSET})")
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="export without MODEL.WEIGHTS (random initialisation, seeded), e.g. to measure speed",
    )
    parser.add_argument(
        "--int8", action="store_true",
        help=f"ONNX only: also write {INT8_FILE}, the convolutions quantized to INT8 "
        "(calibrated on --calibration-images images of --calibration-dataset)",
    )
    parser.add_argument(
        "--calibration-dataset", default=None, metavar="NAME",
        help="registered dataset of the INT8 calibration images (default: DATASETS.TRAIN[0]; "
        "never the split you evaluate on)",
    )
    parser.add_argument("--calibration-images", type=int, default=None, metavar="N",
                        help=f"INT8 calibration images (default {CALIBRATION_IMAGES})")
    parser.add_argument(
        "--register-module", action="append", default=[], metavar="MODULE",
        help="import MODULE first (a .py file or module name), e.g. one that registers the "
        "dataset of DATASETS.TRAIN/TEST (it gives the classes); repeatable",
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs at the end, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def setup_cfg(args):
    """The frozen config of the export, on CPU (the exported file is device-independent)."""
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file: no such file: {args.config_file}")
    cfg = get_cfg()
    add_maskattn_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (AssertionError, KeyError) as e:  # yacs asserts that every key exists
        raise ValueError(f"Bad config key in {args.config_file} or the command line: {e}") from e
    cfg.MODEL.DEVICE = "cpu"
    adapt_config_to_device(cfg)
    cfg.freeze()
    weights = cfg.MODEL.WEIGHTS
    if not weights and not args.allow_random_weights:
        raise WeightsError(
            "No weights: add MODEL.WEIGHTS path/to/model_final.pth at the end of the command, "
            "or --allow-random-weights to export an untrained model on purpose."
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS: no such file: {weights}")
    return cfg


def verify(network: ExportableNetwork, path: str, fmt: str, cfg) -> Dict[str, float]:
    """Run the exported file on a random batch of 3 (a batch size the export did not trace
    with) and return, per output, max |exported - PyTorch| / max |PyTorch|."""
    inputs = network.example_input(3, seed=1)
    with torch.no_grad():
        expected = network(inputs)
        if fmt == "onnx":
            runtime = ONNXRuntimeModel(cfg, path, num_threads=torch.get_num_threads())
            sem_logits, head_outputs = runtime.run_network(inputs)
            actual = [sem_logits.permute(0, 2, 3, 1)]  # back to the file's (B, h, w, K)
            actual += [head_outputs[n] for n in network.output_names[1:]]
        else:
            with warnings.catch_warnings():  # torch marks TorchScript deprecated
                warnings.simplefilter("ignore", FutureWarning)
                actual = torch.jit.load(path)(inputs)
    errors = {}
    for name, want, got in zip(network.output_names, expected, actual):
        if tuple(got.shape) != tuple(want.shape):
            raise ExportMismatch(f"{path}: output {name} has shape {tuple(got.shape)}, PyTorch's "
                                 f"is {tuple(want.shape)}")
        scale = float(want.abs().max()) or 1.0
        errors[name] = float((got - want).abs().max()) / scale
    return errors


def calibration_dataset(args, cfg) -> str:
    """The registered dataset of the INT8 calibration images (checked before anything is
    written)."""
    dataset = args.calibration_dataset or (list(cfg.DATASETS.TRAIN) or [None])[0]
    if dataset is None:
        raise ValueError("--int8: the config has no DATASETS.TRAIN; name the calibration "
                         "images with --calibration-dataset.")
    if dataset not in DatasetCatalog.list():
        raise ValueError(f"--calibration-dataset {dataset}: no such registered dataset (add "
                         "--register-module for your own).")
    if dataset in cfg.DATASETS.TEST:
        logger.warning("Calibrating on %s, a DATASETS.TEST split: its evaluation will flatter "
                       "the INT8 network.", dataset)
    return dataset


def calibration_batches(cfg, runtime: ONNXRuntimeModel, dataset: str, num_images: int):
    """The first ``num_images`` images of ``dataset`` (test-time mapper, in order) as the
    network's input: (B, C, h, w) float32 arrays at the network size."""
    try:
        loader = build_detection_test_loader(
            cfg, dataset, mapper=build_dataset_mapper(cfg, is_train=False)
        )
        inputs = [d for batch in itertools.islice(loader, num_images) for d in batch]
    # Missing files; detectron2 asserts that a dataset is not empty.
    except (FileNotFoundError, OSError, AssertionError) as e:
        raise ValueError(
            f"--calibration-dataset {dataset}: cannot read its images ({e}). Prepare it (see "
            "datasets/README.md) or name another registered training set."
        ) from e
    return [
        runtime.preprocess_image(inputs[i : i + CALIBRATION_BATCH]).numpy()
        for i in range(0, len(inputs), CALIBRATION_BATCH)
    ]


def agreement(float_runtime: ONNXRuntimeModel, int8_runtime: ONNXRuntimeModel, batches):
    """How the INT8 network's outputs compare with the float one's on ``batches``: the share
    of pixels with the same class argmax, and the mean |offset difference| in pixels (None
    for a network without offsets)."""
    same, pixels, offset_error = 0, 0, []
    for batch in batches:
        images = torch.from_numpy(batch)
        want_logits, want = float_runtime.run_network(images)
        got_logits, got = int8_runtime.run_network(images)
        same += int((want_logits.argmax(1) == got_logits.argmax(1)).sum())
        pixels += want_logits[:, 0].numel()
        if "offsets" in want:
            offset_error.append(float((want["offsets"] - got["offsets"]).abs().mean()))
    return same / pixels, (float(np.mean(offset_error)) if offset_error else None)


def export_int8(cfg, float_path: str, dataset: str, num_images: int) -> str:
    """Write and log ``model_int8.onnx`` next to the checked float ``float_path``; written
    under a temporary name and renamed once it loads and runs, so a failure leaves none."""
    threads = torch.get_num_threads()
    float_runtime = ONNXRuntimeModel(cfg, float_path, num_threads=threads)
    batches = calibration_batches(cfg, float_runtime, dataset, num_images)
    path = os.path.join(os.path.dirname(float_path), INT8_FILE)
    partial = path + ".partial"
    try:
        count = quantize_int8(float_path, partial, batches)
        same_class, offset_error = agreement(
            float_runtime, ONNXRuntimeModel(cfg, partial, num_threads=threads), batches
        )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    offsets = "" if offset_error is None else f", offsets {offset_error:.3f} px apart on average"
    logger.info("Wrote %s, calibrated on %d images of %s; against %s on them: the same class "
                "at %.2f %% of pixels%s", path, count, dataset, os.path.basename(float_path),
                100 * same_class, offsets)
    return path


def export(args) -> str:
    """Export as ``args`` say; returns the written file (the float one with ``--int8``)."""
    import_user_modules(args.register_module)
    if args.int8 and args.format != "onnx":
        raise ValueError(f"--int8 quantizes an ONNX export; it does not go with --format "
                         f"{args.format}.")
    if not args.int8 and (args.calibration_dataset or args.calibration_images is not None):
        raise ValueError("--calibration-dataset and --calibration-images go with --int8.")
    num_images = args.calibration_images
    if num_images is None:
        num_images = CALIBRATION_IMAGES
    if num_images < 1:
        raise ValueError(f"--calibration-images must be >= 1, got {num_images}.")
    cfg = setup_cfg(args)
    dataset = calibration_dataset(args, cfg) if args.int8 else None
    torch.manual_seed(0)  # parameters the weights do not set are random, but reproducible
    model = build_model(cfg)
    try:
        load_inference_weights(model, cfg.MODEL.WEIGHTS, allow_random=args.allow_random_weights)
    except RuntimeError as e:  # a truncated or corrupt checkpoint file
        raise WeightsError(str(e)) from e
    network = ExportableNetwork(model.eval())
    os.makedirs(args.output, exist_ok=True)
    # An INT8 copy of an earlier export into this folder would not match the new model.onnx.
    stale = os.path.join(args.output, INT8_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    path = os.path.join(args.output, FORMATS[args.format])
    if args.format == "onnx":
        export_onnx(network, path, metadata=network_metadata(cfg, network), opset=args.opset)
    else:
        export_torchscript(network, path)
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    errors = verify(network, path, args.format, cfg)
    logger.info("Exported vs PyTorch, batch of 3, max |difference| / max |value|: %s",
                ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    bad = {
        name: error for name, error in errors.items()
        if not error <= TOLERANCES.get(name, RELATIVE_TOLERANCE)
    }
    if bad:
        limits = ", ".join(f"{name} {limit:g}" for name, limit in TOLERANCES.items())
        raise ExportMismatch(
            f"{path} disagrees with PyTorch beyond the relative tolerance ({RELATIVE_TOLERANCE:g}"
            f"; {limits}) on {bad}."
        )
    logger.info("Wrote %s (input %s, outputs %s) and config.yaml", path,
                f"(batch, {network.num_channels}, {network.network_size[0]}, "
                f"{network.network_size[1]})", network.output_names)
    if args.int8:
        export_int8(cfg, path, dataset, num_images)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """Run the export; returns the exit status (0 ok, 1 mismatch, 2 bad input)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="maskattn_d2")
    logger.info("Command line arguments: %s", args)
    try:
        export(args)
    except ExportMismatch as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ImportError, ValueError) as e:  # WeightsError is a ValueError
        print(f"export_model.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
