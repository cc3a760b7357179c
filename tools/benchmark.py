#!/usr/bin/env python
"""Cost of the MaskAttn-UNet variants next to Panoptic-DeepLab and Mask2Former, in one run.

    python tools/benchmark.py                              # 4 variants + 3 peers, 128x128, CPU
    python tools/benchmark.py --models unet_128 maskattn_unet_128 --batch-sizes 1 --no-train
    python tools/benchmark.py --devices cuda --bf16        # on a GPU machine
    python tools/benchmark.py --loader                     # data loader: originals vs copies
    python tools/benchmark.py --configs configs/coco_panoptic_128.yaml \
        --models coco_panoptic_128 --backends torch onnxruntime   # eager vs onnxruntime

Models: one per ``--configs`` YAML (default ``configs/variants/*.yaml``, named by file stem)
and the peers ``panoptic_deeplab_r50`` (detectron2's Panoptic-DeepLab project, config written
by :func:`benchmarking.peers.panoptic_deeplab_config`), ``mask2former_swin_t`` and
``mask2former_r50`` (``transformers``, random weights). Peers get the class count and
metadata of the first config. ``--models`` keeps only the named ones. ``--backends torch
onnxruntime`` adds, for every config on CPU, a row of its network exported to ONNX
(:func:`maskattn_d2.export.export_onnx`, same random weights) and run by onnxruntime with
``--threads`` intra-op threads (:class:`maskattn_d2.export.ONNXRuntimeModel`); its input is the
resized pixels (normalisation is inside the graph, so inside the timing) and its outputs go
through the same post-processing; it has no training measurement. ``onnxruntime_int8`` is the
same with the file's INT8 copy (convolutions quantized, calibrated on 16 other synthetic
scenes; ``tools/export_model.py --int8``); same FLOPs, counted as multiply-adds of any type.

``--rounds N`` measures every model N times, in turn, and reports the median of its N
medians (each round's figures listed below the table): on a shared machine whose speed drifts
over minutes, a ratio between two models then rests on the same time windows for both.

Measured for each model and device, every model in a fresh subprocess, at ``--size``:

- parameters; GFLOPs of the network for one image (fvcore ``FlopCountAnalysis``, one
  multiply-add = one flop, ``aten::scaled_dot_product_attention`` and ``aten::baddbmm``
  counted by handles added here; the ops fvcore still skips are listed in the JSON);
- the network's achieved GFLOP/s at each batch size (2 flops per multiply-add) against the
  device's peak as torch reaches it: the best rate of a large ``torch.mm`` with the same
  threads (fp32; on CUDA the autocast dtype), measured in every worker, the run's best taken;
- latency (median over ``--iters`` runs after ``--warmup`` runs, milliseconds per batch) of
  the network forward and, separately, of the post-processing of the batch's images
  (MaskAttn: the model's ``postprocess_batch``, per image; Panoptic-DeepLab: its
  ``get_panoptic_segmentation`` per image; Mask2Former: the image processor's
  ``post_process_panoptic_segmentation``). Normalisation is outside the timing;
- peak memory: CUDA ``max_memory_allocated`` above the loaded model; CPU the increase of the
  process's peak RSS over its RSS once the model is built, batch sizes measured in increasing
  order and training last, so each figure is the peak of that phase;
- training images/s: forward + backward + AdamW step on synthetic scenes rendered in-process
  at the network size, each model with its own targets (MaskAttn: semantic + instance ids;
  Panoptic-DeepLab: its target generator; Mask2Former: per-segment masks and classes).

The models have random weights, so post-processing times reflect untrained predictions
(MaskAttn clusters every predicted thing pixel; Mask2Former keeps few queries above 0.8).
Outputs in ``--output-dir``: ``benchmark.md`` (the table, also printed), ``benchmark.json``
(every number, per-iteration times included) and ``benchmark.png`` (batch-1 latency vs
parameters). The default run takes about 2 minutes on 2 idle CPU cores. Multi-threaded CPU
timings are very sensitive to other busy processes (threads wait for each other at every op):
compare rows of one run on an otherwise idle machine, and check ``network_s`` in the JSON.

``--loader`` measures the training data loader instead: images/s of one worker (the training
mapper, one thread) on the original files of each ``--loader-datasets`` dataset and on its
low-resolution copy (``datasets/prepare_lowres_copy.py``; written into the cache first if
missing), printed and written to ``loader.md`` / ``loader.json``.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

# tools/benchmarking: the runners and peers (next to this script, so on its sys.path).
from benchmarking import peers
from benchmarking.maskattn import MaskAttnRunner, maskattn_config
from benchmarking.onnxruntime_runner import ONNXRuntimeRunner
from benchmarking.scenes import synthetic_scenes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = sorted(str(p) for p in (REPO / "configs" / "variants").glob("*.yaml"))
PEER_NAMES = ("panoptic_deeplab_r50", "mask2former_swin_t", "mask2former_r50")
BACKENDS = ("torch", "onnxruntime", "onnxruntime_int8")


# --------------------------------------------------------------------------- arguments
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Parameters, FLOPs, latency, memory and training speed of the MaskAttn-UNet "
        "variants and their peers",
    )
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="YAML",
        help="MaskAttn configs, one model each, named by file stem (default: configs/variants)",
    )
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME",
        help=f"keep only these models (config stems and/or peers {', '.join(PEER_NAMES)})",
    )
    parser.add_argument("--size", nargs=2, type=int, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--iters", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--train-iters", type=int, default=2, help="timed training steps")
    parser.add_argument("--no-train", action="store_true", help="skip the training measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument(
        "--devices", nargs="+", default=None, choices=["cpu", "cuda"],
        help="default: cpu, plus cuda when available",
    )
    parser.add_argument(
        "--backends", nargs="+", default=["torch"], choices=BACKENDS,
        help="torch: eager PyTorch; onnxruntime: the exported network (MaskAttn configs, CPU); "
        "onnxruntime_int8: its INT8 copy",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure every model this many times in turn (round-robin) and report the median "
        "of its rounds' medians: the machine's drift over minutes falls on every model alike",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="./output/benchmark")
    parser.add_argument(
        "--loader", action="store_true",
        help="measure the training data loader instead of the models: images/s of one worker "
        "(the training mapper in this process, 1 thread) on each --loader-datasets dataset, "
        "from its original files and from its low-resolution copy (written first if missing)",
    )
    parser.add_argument(
        "--loader-datasets", nargs="+", default=["coco_mini_panoptic_val"], metavar="NAME",
        help="registered panoptic datasets for --loader",
    )
    parser.add_argument("--loader-short-side", type=int, default=160,
                        help="short side of the low-resolution copies for --loader")
    parser.add_argument("--loader-images", type=int, default=150,
                        help="mapper calls timed per dataset and source for --loader")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides applied to every --configs model (KEY VALUE pairs)",
    )
    # Internal: run one model in this process and write its result as JSON.
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "DEVICE", "RESULT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-backend", default="torch", choices=BACKENDS,
                        help=argparse.SUPPRESS)
    return parser


def _check_args(args) -> None:
    if min(args.size) < 32:
        raise ValueError(f"--size must be at least 32x32, got {args.size}")
    if min(args.batch_sizes) < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        raise ValueError("--batch-sizes and --iters must be >= 1, --warmup >= 0, --threads >= 1")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if not args.no_train and (args.train_batch_size < 2 or args.train_iters < 1):
        raise ValueError(
            "--train-batch-size must be >= 2 (BatchNorm in training) and --train-iters >= 1"
        )
    for path in args.configs:
        if not os.path.isfile(path):
            raise ValueError(f"--configs: no such file: {path}")


def model_names(args) -> List[str]:
    """The models of this run, in order: configs, then peers, filtered by ``--models``."""
    names = [Path(p).stem for p in args.configs] + list(PEER_NAMES)
    if len(set(names)) != len(names):
        raise ValueError(f"--configs have clashing file stems: {names}")
    if args.models is None:
        return names
    unknown = [m for m in args.models if m not in names]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {names}")
    return [n for n in names if n in args.models]


# --------------------------------------------------------------------------- models
def build_runner(name: str, args, device: str, backend: str = "torch"):
    """The :class:`~benchmarking.runner.Runner` of a model name of this run."""
    stems = {Path(p).stem: p for p in args.configs}
    if backend != "torch":
        if name not in stems or device != "cpu":
            raise ValueError(f"--backends {backend}: MaskAttn configs on cpu only, not {name} "
                             f"on {device}")
        return ONNXRuntimeRunner(maskattn_config(stems[name], args, device), name=name,
                                 threads=args.threads, int8=backend == "onnxruntime_int8")
    if name in stems:
        return MaskAttnRunner(maskattn_config(stems[name], args, device), name=name)
    reference = maskattn_config(args.configs[0], args, device)
    dataset = (list(reference.DATASETS.TRAIN) or list(reference.DATASETS.TEST))[0]
    num_classes = reference.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if name == "panoptic_deeplab_r50":
        cfg = peers.panoptic_deeplab_config(
            dataset_name=dataset, num_classes=num_classes, network_size=tuple(args.size),
            depth=50, device=device,
        )
        return peers.PanopticDeepLabRunner(cfg, name=name)
    thing_ids = set(MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id.values())
    stuff_ids = sorted(set(range(num_classes)) - thing_ids)
    backbone = name[len("mask2former_"):]
    return peers.Mask2FormerRunner(
        backbone, num_classes=num_classes, stuff_ids=stuff_ids, name=name, device=device
    )


# --------------------------------------------------------------------------- measurements
def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: Q K^T and A V multiply-adds,
    ``batch * N * Nk * (d + dv)`` for q (..., N, d), k (..., Nk, d), v (..., Nk, dv)."""
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    return int(np.prod(q[:-2])) * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_flop_jit(inputs, outputs) -> int:
    """fvcore handle of ``aten::baddbmm(input, b1 (B, n, m), b2 (B, m, p))``: B*n*m*p."""
    return int(np.prod(get_shape(inputs[1]))) * get_shape(inputs[2])[-1]


def count_flops(runner, inputs: torch.Tensor) -> Tuple[float, Dict[str, int]]:
    """(flops of the network on ``inputs``, {op fvcore skipped: number of calls})."""
    analysis = FlopCountAnalysis(runner.flops_module(), (inputs,))
    analysis.set_op_handle(
        "aten::scaled_dot_product_attention", _sdpa_flop_jit, "aten::baddbmm", _baddbmm_flop_jit
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = float(analysis.total())
    return total, dict(analysis.unsupported_ops())


def gemm_peak_gflop_s(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The device's peak as this process reaches it: GFLOP/s (2 flops per multiply-add) of
    the best of 10 large ``torch.mm`` calls with the current threads. A network's achieved
    rate is compared with it (the vendor's nominal peak assumes every core issues FMAs on
    every cycle, which no library reaches)."""
    n = 2048 if device.type == "cuda" else 1024
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    times = time_calls(lambda: torch.mm(a, b), iters=10, warmup=2, device=device)
    return 2 * n**3 / min(times) / 1e9


def achieved_gflop_s(gmacs_per_image: Optional[float], batch: int, network_ms: float):
    """GFLOP/s of a network forward: 2 flops per multiply-add (fvcore counts multiply-adds)."""
    if gmacs_per_image is None or not network_ms:
        return None
    return 2 * gmacs_per_image * batch / (network_ms / 1000)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], *, iters: int, warmup: int, device) -> List[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            self.baseline = _current_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20
        return max(_peak_rss() - self.baseline, 0) / 2**20


def _current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _autocast(device: torch.device, args):
    if device.type != "cuda" or not (args.amp or args.bf16):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.bf16 else torch.float16)


def _median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def measure(runner, args, device: torch.device) -> Dict:
    """Every number of one model on one device (see the module docstring for the order)."""
    size = tuple(args.size)
    result = {
        "name": runner.name,
        "device": device.type,
        "backend": args.worker_backend,
        "params_m": sum(p.numel() for p in runner.model.parameters()) / 1e6,
        "latency": {},
        "peak_memory_mb": {},
    }
    num_scenes = max(list(args.batch_sizes) + [0 if args.no_train else args.train_batch_size])
    scenes = synthetic_scenes(num_scenes, size, seed=args.seed)
    meter = MemoryMeter(device)
    runner.model.eval()
    for batch in sorted(set(args.batch_sizes)):
        inputs = runner.prepare(scenes[:batch])
        with torch.no_grad(), _autocast(device, args):
            net_times = time_calls(
                lambda: runner.network(inputs), iters=args.iters, warmup=args.warmup, device=device
            )
            outputs = runner.network(inputs)
            post_times = time_calls(
                lambda: runner.postprocess(outputs, size),
                iters=args.iters, warmup=args.warmup, device=device,
            )
        result["latency"][str(batch)] = {
            "network_ms": _median_ms(net_times),
            "postprocess_ms": _median_ms(post_times),
            "network_s": net_times,
            "postprocess_s": post_times,
        }
        result["peak_memory_mb"][str(batch)] = meter.peak_mb()
        del inputs, outputs
    if not args.no_train and getattr(runner, "trains", True):
        result["train"] = measure_training(runner, scenes[: args.train_batch_size], args, device)
        result["peak_memory_mb"]["train"] = meter.peak_mb()
    if not args.no_flops:
        runner.model.eval()
        with torch.no_grad():
            flops, skipped = count_flops(runner, runner.prepare(scenes[:1]))
        result["gflops"] = flops / 1e9
        result["flops_skipped_ops"] = skipped
        dtype = torch.float32
        if device.type == "cuda" and (args.amp or args.bf16):
            dtype = torch.bfloat16 if args.bf16 else torch.float16
        result["gemm_peak_gflop_s"] = gemm_peak_gflop_s(device, dtype)
    return result


def measure_training(runner, scenes, args, device: torch.device) -> Dict:
    """Images/s of forward + backward + AdamW step on one fixed synthetic batch."""
    model = runner.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.amp)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, args):
            loss = runner.training_loss(scenes)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with EventStorage(0):
        times = time_calls(step, iters=args.train_iters, warmup=1, device=device)
    model.eval()
    return {
        "batch_size": len(scenes),
        "step_s": times,
        "images_per_s": len(scenes) / statistics.median(times),
    }


def worker_main(args) -> None:
    """``--worker NAME DEVICE RESULT``: measure one model here, write RESULT (JSON)."""
    name, device_name, result_file = args.worker
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    try:
        runner = build_runner(name, args, device_name, args.worker_backend)
    except ImportError as e:  # a peer's (or onnxruntime's) package is missing
        result = {"name": name, "device": device.type, "backend": args.worker_backend,
                  "status": f"unavailable: {e}"}
    else:
        result = measure(runner, args, device)
        result["status"] = "ok"
    with open(result_file, "w") as f:
        json.dump(result, f)


def combine_rounds(rounds: Sequence[Dict]) -> Dict:
    """One model's result from its results of several rounds: each latency the median of the
    rounds' medians (all timed runs kept), peak memory the largest, training images/s the
    median, the GEMM peak the best; the rounds' latencies under ``"rounds"``. A failed round
    makes the result that round's failure."""
    if len(rounds) == 1:
        return rounds[0]
    failed = [r for r in rounds if r.get("status") != "ok"]
    if failed:
        return failed[0]
    result = copy.deepcopy(rounds[0])
    for batch, latency in result["latency"].items():
        for key in ("network_ms", "postprocess_ms"):
            latency[key] = statistics.median(r["latency"][batch][key] for r in rounds)
        for key in ("network_s", "postprocess_s"):
            latency[key] = [t for r in rounds for t in r["latency"][batch][key]]
    for key in result["peak_memory_mb"]:
        result["peak_memory_mb"][key] = max(r["peak_memory_mb"][key] for r in rounds)
    if "train" in result:
        result["train"]["images_per_s"] = statistics.median(
            r["train"]["images_per_s"] for r in rounds
        )
        result["train"]["step_s"] = [t for r in rounds for t in r["train"]["step_s"]]
    if "gemm_peak_gflop_s" in result:
        result["gemm_peak_gflop_s"] = max(r["gemm_peak_gflop_s"] for r in rounds)
    result["wall_s"] = sum(r.get("wall_s", 0.0) for r in rounds)
    result["rounds"] = [
        {batch: {key: latency[key] for key in ("network_ms", "postprocess_ms")}
         for batch, latency in r["latency"].items()}
        for r in rounds
    ]
    return result


def run_worker(name: str, device: str, argv: Sequence[str], backend: str = "torch") -> Dict:
    """Measure one model in a fresh Python process (so its peak memory is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        # --worker first: --opts takes the rest of the command line.
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, device,
                   result_file, "--worker-backend", backend, *argv]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(result_file):
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            return {"name": name, "device": device, "backend": backend,
                    "status": f"failed: {reason}", "stderr_tail": lines[-30:]}
        with open(result_file) as f:
            result = json.load(f)
    result["wall_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- data loader
def loader_images_per_s(mapper, dicts: Sequence[Dict], num_images: int) -> Tuple[float, float]:
    """(images/s by wall clock, images/s by this process's CPU time) of ``mapper`` over
    ``num_images`` calls cycling through ``dicts``, after one untimed pass over them (so both
    sources start from the OS file cache). On a shared machine the CPU-time figure is the
    steadier one: it leaves out the time other processes held the core."""
    dicts = list(dicts)[:num_images]
    for d in dicts:
        mapper(d)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_images):
        mapper(dicts[i % len(dicts)])
    return num_images / (time.perf_counter() - wall), num_images / (time.process_time() - cpu)


def measure_loader(dataset: str, args) -> Dict:
    """Training-mapper images/s of one worker on ``dataset`` and on its low-res copy."""
    from detectron2.data import DatasetCatalog

    from maskattn_d2.data import build_dataset_mapper
    from maskattn_d2.data.datasets import register_lowres_copy, write_lowres_copy

    write_lowres_copy(dataset, args.loader_short_side)  # no-op when the copy exists
    result = {"dataset": dataset, "short_side": args.loader_short_side}
    speeds, cpu_speeds = {}, {}
    lowres = register_lowres_copy(dataset, args.loader_short_side)
    for source, name in (("original", dataset), ("lowres", lowres)):
        cfg = maskattn_config(args.configs[0], args, "cpu").clone()
        cfg.defrost()
        cfg.DATASETS.TRAIN = (name,)
        dicts = DatasetCatalog.get(name)[: args.loader_images]
        np.random.seed(args.seed)
        mapper = build_dataset_mapper(cfg, is_train=True)
        speeds[source], cpu_speeds[source] = loader_images_per_s(
            mapper, dicts, args.loader_images
        )
        sizes = sorted((d["height"], d["width"]) for d in dicts)
        result.setdefault("median_size", {})[source] = list(sizes[len(sizes) // 2])
        result["distinct_images"] = len(dicts)
    result.update(images_per_s=speeds, images_per_cpu_s=cpu_speeds)
    result["speedup"] = speeds["lowres"] / speeds["original"]
    result["speedup_cpu"] = cpu_speeds["lowres"] / cpu_speeds["original"]
    return result


def format_loader_table(results: Sequence[Dict]) -> str:
    header = ["Dataset", "Images", "Median HxW", "Original (img/s)", "Low-res copy", "Copy HxW",
              "Copy (img/s)", "Speed-up", "Speed-up, CPU time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        size, speed = r["median_size"], r["images_per_s"]
        lines.append("| " + " | ".join([
            r["dataset"], str(r["distinct_images"]), "x".join(map(str, size["original"])),
            _fmt(speed["original"]), f"short side {r['short_side']}",
            "x".join(map(str, size["lowres"])), _fmt(speed["lowres"]), f"{r['speedup']:.1f}x",
            f"{r['speedup_cpu']:.1f}x",
        ]) + " |")
    return "\n".join(lines)


def loader_main(args) -> List[Dict]:
    """``--loader``: the loader table, printed and written to ``loader.{md,json}``."""
    if args.loader_images < 1 or args.loader_short_side < 1:
        raise ValueError("--loader-images and --loader-short-side must be >= 1")
    torch.set_num_threads(1)  # one data-loader worker is one single-threaded process
    results = []
    for dataset in args.loader_datasets:
        print(f"[benchmark] loader on {dataset} ...", flush=True)
        results.append(measure_loader(dataset, args))
    markdown = "\n".join([
        f"# Training data loader, one worker (1 thread, {args.loader_images} mapper calls)",
        "",
        format_loader_table(results),
        "",
        f"Mapper of {Path(args.configs[0]).name} at {args.size[0]}x{args.size[1]} (training "
        "augmentations), files in the OS cache; img/s by wall clock, the last column by the "
        "process's CPU time (steadier on a shared machine). "
        + time.strftime("%Y-%m-%d %H:%M:%S"),
    ])
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "loader.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.output_dir, "loader.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(markdown)
    return results


# --------------------------------------------------------------------------- reporting
def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def device_peaks(results: Sequence[Dict]) -> Dict[str, float]:
    """{device: the best GEMM rate any worker of the run reached on it}: one reference for
    every row (a worker's own short measurement varies with the machine's load)."""
    peaks: Dict[str, float] = {}
    for r in results:
        if r.get("gemm_peak_gflop_s"):
            peaks[r["device"]] = max(peaks.get(r["device"], 0.0), r["gemm_peak_gflop_s"])
    return peaks


def format_table(results: Sequence[Dict], batch_sizes: Sequence[int]) -> str:
    """Markdown table: one row per model and device."""
    batches = [str(b) for b in sorted(set(batch_sizes))]
    header = ["Model", "Device", "Backend", "Params (M)", "GFLOPs"]
    for b in batches:
        header += [f"Net b{b} (ms)", f"Post b{b} (ms)"]
    header += [f"GFLOP/s b{b} (% of peak)" for b in batches]
    header += [f"Peak mem b{b} (MB)" for b in batches]
    header += ["Train (img/s)", "Train peak mem (MB)", "Status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    peaks = device_peaks(results)
    for r in results:
        ok = r.get("status") == "ok"
        row = [r["name"], r["device"], r.get("backend", "torch")]
        row += [_fmt(r.get("params_m"), 2), _fmt(r.get("gflops"), 2)]
        for b in batches:
            lat = r.get("latency", {}).get(b, {})
            row += [_fmt(lat.get("network_ms")), _fmt(lat.get("postprocess_ms"))]
        for b in batches:
            rate = achieved_gflop_s(
                r.get("gflops"), int(b), r.get("latency", {}).get(b, {}).get("network_ms")
            )
            peak = peaks.get(r["device"])
            row.append("-" if rate is None else f"{rate:,.1f}"
                       + (f" ({100 * rate / peak:.0f} %)" if peak else ""))
        row += [_fmt(r.get("peak_memory_mb", {}).get(b)) for b in batches]
        row += [
            _fmt(r.get("train", {}).get("images_per_s"), 2),
            _fmt(r.get("peak_memory_mb", {}).get("train")),
            "ok" if ok else r.get("status", "?").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_rounds(results: Sequence[Dict]) -> List[str]:
    """Markdown lines with every round's network + post-processing per batch, when the
    results combine several rounds."""
    lines = []
    for r in results:
        if "rounds" not in r:
            continue
        cells = [
            f"b{batch} " + " / ".join(
                f"{one[batch]['network_ms']:,.1f} + {one[batch]['postprocess_ms']:,.1f}"
                for one in r["rounds"]
            )
            for batch in sorted(r["rounds"][0], key=int)
        ]
        lines.append(f"- {r['name']} ({r['device']}, {r.get('backend', 'torch')}): "
                     + "; ".join(cells))
    if lines:
        lines = ["", "Each round, network + post-processing per batch (ms):", *lines]
    return lines


def plot_latency(results: Sequence[Dict], path: str, batch: int) -> None:
    """Scatter of batch-``batch`` latency (network + post-processing) against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"cpu": "o", "cuda": "^"}
    for r in results:
        lat = r.get("latency", {}).get(str(batch))
        if r.get("status") != "ok" or lat is None:
            continue
        total = lat["network_ms"] + lat["postprocess_ms"]
        ours = r["name"] not in PEER_NAMES
        ax.scatter(r["params_m"], total, marker=markers.get(r["device"], "s"),
                   color="tab:blue" if ours else "tab:orange", s=50)
        backend = r.get("backend", "torch")
        where = r["device"] if backend == "torch" else f"{r['device']}, {backend}"
        ax.annotate(f"{r['name']} ({where})", (r["params_m"], total),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel(f"batch-{batch} latency, network + post-processing (ms)")
    ax.set_title("MaskAttn-UNet variants (blue) vs peers (orange)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(args, devices: Sequence[str]) -> Dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "devices": list(devices),
        "size": list(args.size),
        "iters": args.iters,
        "warmup": args.warmup,
        "precision_cuda": "bf16" if args.bf16 else "fp16" if args.amp else "fp32",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if "cuda" in devices:
        env["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if set(args.backends) - {"torch"}:
        try:
            import onnxruntime

            env["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            env["onnxruntime"] = None
    return env


def write_report(results: Sequence[Dict], env: Dict, args) -> str:
    """Write benchmark.md / .json / .png into ``--output-dir``; returns the markdown."""
    os.makedirs(args.output_dir, exist_ok=True)
    table = format_table(results, args.batch_sizes)
    skipped = [
        f"- {r['name']} ({r['device']}): "
        + ", ".join(f"{op} x{n}" for op, n in sorted(r["flops_skipped_ops"].items()))
        for r in results
        if r.get("flops_skipped_ops")
    ]
    markdown = "\n".join(
        [
            f"# Benchmark at {args.size[0]}x{args.size[1]}",
            "",
            f"torch {env['torch']}"
            + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else "")
            + f", {env['cpu_threads']} CPU threads"
            + (f", {env['cuda_device']} ({env['precision_cuda']})" if "cuda_device" in env else "")
            + f", median of {args.iters} runs after {args.warmup} warm-up"
            + (f"; the median of {args.rounds} rounds, every model measured once per round in "
               "turn" if args.rounds > 1 else "")
            + f", {env['date']}.",
            "",
            table,
            "",
            "Latencies are per batch. GFLOPs: fvcore, per image, 1 multiply-add = 1 flop. "
            "GFLOP/s: the network's achieved rate, 2 flops per multiply-add, and its share of "
            "the device's peak as torch reaches it (the best large fp32 GEMM rate of the run's "
            "workers: "
            + ", ".join(f"{d} {p:,.0f} GFLOP/s" for d, p in device_peaks(results).items())
            + "). Peak memory: above the built model (CPU: peak RSS, fresh process; "
            "CUDA: allocator). Random weights; normalisation excluded from the timings.",
        ]
        + (["", "Ops fvcore did not count (no FLOP handle):", *skipped] if skipped else [])
        + format_rounds(results)
    )
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"environment": env, "results": list(results)}, f, indent=2)
    plot_latency(results, os.path.join(args.output_dir, "benchmark.png"), min(args.batch_sizes))
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """Run the benchmark; returns one result dict per model and device."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    if args.worker:
        worker_main(args)
        return []
    _check_args(args)
    if args.loader:
        return loader_main(args)
    names = model_names(args)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise ValueError("--devices cuda: CUDA is not available on this machine")
    config_names = {Path(p).stem for p in args.configs}
    jobs = [
        (name, device, backend)
        for name in names
        for device in devices
        for backend in args.backends
        # onnxruntime rows: MaskAttn configs on CPU
        if backend == "torch" or (name in config_names and device == "cpu")
    ]
    per_job = {job: [] for job in jobs}
    for round_index in range(args.rounds):
        which = f", round {round_index + 1} of {args.rounds}" if args.rounds > 1 else ""
        for name, device, backend in jobs:
            print(f"[benchmark] {name} on {device} ({backend}{which}) ...", flush=True)
            result = run_worker(name, device, argv, backend)
            if result.get("status") != "ok":
                print(f"[benchmark] {name} on {device} ({backend}): {result['status']}",
                      flush=True)
            per_job[(name, device, backend)].append(result)
    results = [combine_rounds(per_job[job]) for job in jobs]
    markdown = write_report(results, environment(args, devices), args)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
