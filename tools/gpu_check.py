#!/usr/bin/env python
"""GPU checks in one command: the CUDA tests, a short AMP training of the COCO-size model on
synthetic data, and the benchmark in bfloat16; prints training and inference images/s.

    python tools/gpu_check.py                       # on a machine with CUDA (~3 min on one H200)
    python tools/gpu_check.py --device cpu          # tiny CPU run of the same steps (plumbing)
    python tools/gpu_check.py --dry-run             # print the commands only

Steps, each a subprocess whose output goes to ``--output-dir`` (``<step>.log``):

1. ``pytest -k cuda`` over the test files that mention CUDA (the tests parametrised over, or
   only run on, CUDA; on CPU they skip);
2. ``train_net.py`` with ``configs/coco_panoptic_128.yaml`` (133 classes, AMP) for
   ``--iters`` iterations at batch ``--batch-size`` on the synthetic scenes, registered by
   this module (imported with ``--register-module``) under a 133-class metadata: the 6
   synthetic classes plus unused padding classes (80 things, 53 stuff, as COCO), so the
   network is exactly the COCO-size one. BatchNorm instead of SyncBN (one process), no
   evaluation. Training images/s = batch / median iteration time (detectron2's
   metrics.json, after its warm-up iterations), with the data-loading share;
3. ``tools/benchmark.py --devices cuda --bf16`` for the COCO-size model and two peers:
   inference (network + post-processing) and training images/s.

Without CUDA (and without ``--device cpu``) it refuses with exit status 2 and runs nothing.
The exit status is 1 when a step fails (its log is named).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
COCO_CONFIG = REPO / "configs" / "coco_panoptic_128.yaml"
DATASET_NAME = "maskattn_gpu_check_synthetic133_train"
# COCO panoptic's class counts: the padded synthetic dataset has as many.
NUM_THINGS, NUM_STUFF = 80, 53


def padded_synthetic_categories() -> List[Dict]:
    """The synthetic categories plus unused ones, 80 things and 53 stuff in all (dataset ids
    of the padding from 10000 on, clear of the synthetic ids)."""
    from maskattn_d2.data.datasets import SYNTHETIC_CATEGORIES

    things = [dict(c) for c in SYNTHETIC_CATEGORIES if c["isthing"]]
    stuff = [dict(c) for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
    things += [
        {"id": 10000 + i, "name": f"unused_thing_{i}", "isthing": 1}
        for i in range(NUM_THINGS - len(things))
    ]
    stuff += [
        {"id": 20000 + i, "name": f"unused_stuff_{i}", "isthing": 0}
        for i in range(NUM_STUFF - len(stuff))
    ]
    return things + stuff


def register_gpu_check_dataset() -> str:
    """Register the default synthetic training scenes (generated on first use, shared with
    "maskattn_synthetic_panoptic_train") under ``DATASET_NAME`` with 133 classes."""
    from maskattn_d2.data.datasets import (
        generate_synthetic_panoptic,
        panoptic_metadata,
        register_panoptic_dataset,
    )
    from maskattn_d2.data.datasets.register_synthetic import (
        DEFAULT_NUM_TRAIN,
        DEFAULT_NUM_VAL,
        synthetic_paths,
        synthetic_root,
    )

    sizes = {"num_train": DEFAULT_NUM_TRAIN, "num_val": DEFAULT_NUM_VAL, "seed": 0}
    register_panoptic_dataset(
        DATASET_NAME,
        panoptic_metadata(padded_synthetic_categories()),
        lambda: synthetic_paths(synthetic_root(**sizes), "train"),
        prepare=lambda paths: generate_synthetic_panoptic(
            os.path.dirname(paths["image_root"]), **sizes
        ),
    )
    return DATASET_NAME


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda",
        help="cuda (the check); cpu runs every step tiny, to test the script itself",
    )
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations (default: 200 on cuda, 5 on cpu)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch (default: 64 on cuda, 2 on cpu)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers (default: min(8, CPU count) on cuda, 0 on cpu)")
    parser.add_argument("--output-dir", default="./output/gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def cuda_test_files() -> List[str]:
    """Test files that mention CUDA (collecting only them keeps the step short)."""
    files = sorted(str(p) for p in (REPO / "tests").rglob("test_*.py") if "cuda" in p.read_text())
    return files or [str(REPO / "tests")]


def step_commands(args) -> Dict[str, List[str]]:
    """The command of each step, in order."""
    py = sys.executable
    cuda = args.device == "cuda"
    iters = args.iters or (200 if cuda else 5)
    batch = args.batch_size or (64 if cuda else 2)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if cuda else 0)
    out = Path(args.output_dir)
    train = [
        py, str(REPO / "train_net.py"), "--register-module", str(Path(__file__).resolve()),
        "--config-file", str(COCO_CONFIG), "--num-gpus", "1",
        "DATASETS.TRAIN", f"('{DATASET_NAME}',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.WARMUP_ITERS", str(min(10, iters)), "SOLVER.CHECKPOINT_PERIOD", "1000000",
        "TEST.EVAL_PERIOD", "0", "LOG_PERIOD", "5", "DATALOADER.NUM_WORKERS", str(workers),
        "MODEL.DEVICE", args.device, "SOLVER.AMP.ENABLED", "True",
        "OUTPUT_DIR", str(out / "train"),
    ]
    for node in ("MASK_ATTN_UNET", "SEM_SEG_HEAD", "EMBED_HEAD"):
        train += [f"MODEL.{node}.NORM", "BN"]  # one process: SyncBN would be BN anyway
    bench = [
        py, str(REPO / "tools" / "benchmark.py"), "--configs", str(COCO_CONFIG),
        "--devices", args.device, "--output-dir", str(out / "benchmark"),
    ]
    if cuda:
        bench += ["--bf16", "--models", "coco_panoptic_128", "panoptic_deeplab_r50",
                  "mask2former_swin_t", "--batch-sizes", "1", "64", "--iters", "20",
                  "--warmup", "5", "--train-batch-size", "64", "--train-iters", "10"]
    else:
        bench += ["--models", "coco_panoptic_128", "--batch-sizes", "1", "--iters", "1",
                  "--warmup", "0", "--train-iters", "1", "--no-flops"]
    tests = [py, "-m", "pytest", "-q", "-rs", "-m", "not slow", "-k", "cuda",
             "-p", "no:cacheprovider", *cuda_test_files()]
    return {"cuda_tests": tests, "training": train, "benchmark": bench}


# Wall-clock limit of each step on CUDA (seconds): the whole check stays within ~8 min on one
# H100 (a typical run needs far less). The CPU run has no limit (it is only a plumbing test).
STEP_TIMEOUT_S = {"cuda_tests": 150, "training": 240, "benchmark": 240}


def run_step(name: str, command: Sequence[str], out_dir: Path, timeout: Optional[float]) -> Dict:
    """Run one step; its output goes to ``<out_dir>/<name>.log``."""
    log = out_dir / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    ))
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  env=env, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"failed (over {timeout:.0f} s)"
    return {"step": name, "status": status, "seconds": time.perf_counter() - start,
            "log": str(log)}


def pytest_summary(log: str) -> str:
    """The last summary line of a pytest log ("3 passed, 2 skipped in 12.3s")."""
    lines = [ln.strip("= \n") for ln in Path(log).read_text().splitlines() if ln.strip()]
    marks = (" passed", " skipped", " failed", " error", " deselected")
    found = [ln for ln in lines if any(m in ln for m in marks)]
    return found[-1] if found else "no pytest summary"


def training_speed(output_dir: Path, batch: int) -> Optional[Dict]:
    """Images/s of training from detectron2's metrics.json (median iteration time)."""
    metrics = output_dir / "metrics.json"
    if not metrics.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    times = [r["time"] for r in rows if "time" in r]
    data = [r["data_time"] for r in rows if "data_time" in r]
    if not times:
        return None
    median = statistics.median(times)
    return {"images_per_s": batch / median, "iteration_s": median,
            "data_time_s": statistics.median(data) if data else None}


def _rate(images_per_s: float) -> str:
    """Images/s with thousands separators, or 3 significant digits below 100 (CPU runs)."""
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def benchmark_speeds(path: Path) -> List[str]:
    """One line per model: inference images/s (network + post-processing, largest batch)
    and training images/s, from the benchmark's JSON."""
    if not path.is_file():
        return []
    lines = []
    for r in json.loads(path.read_text())["results"]:
        if r.get("status") != "ok":
            lines.append(f"  {r['name']} ({r['device']}): {r.get('status')}")
            continue
        parts = []
        for batch, lat in sorted(r["latency"].items(), key=lambda kv: int(kv[0])):
            seconds = (lat["network_ms"] + lat["postprocess_ms"]) / 1000.0
            parts.append(f"batch {batch}: {_rate(int(batch) / seconds)} img/s")
        train = r.get("train", {}).get("images_per_s")
        text = f"  {r['name']} ({r['device']}): inference " + ", ".join(parts)
        lines.append(text + (f"; training {_rate(train)} img/s" if train else ""))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    commands = step_commands(args)
    if args.dry_run:
        for name, command in commands.items():
            print(f"{name}: {subprocess.list2cmdline(command)}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); nothing was run. This check needs a machine with a GPU "
            "(--device cpu runs a tiny version of the steps to test the script).",
            file=sys.stderr,
        )
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"[gpu_check] {device}, torch {torch.__version__}; logs in {out}", flush=True)
    results = []
    for name, command in commands.items():
        print(f"[gpu_check] {name} ...", flush=True)
        timeout = STEP_TIMEOUT_S[name] if args.device == "cuda" else None
        results.append(run_step(name, command, out, timeout))
        print(f"[gpu_check] {name}: {results[-1]['status']} ({results[-1]['seconds']:.0f} s)",
              flush=True)

    batch = int(commands["training"][commands["training"].index("SOLVER.IMS_PER_BATCH") + 1])
    speed = training_speed(out / "train", batch)
    print(f"\n# GPU check on {device}\n")
    print(f"- CUDA tests: {pytest_summary(results[0]['log'])}")
    if speed:
        data = speed["data_time_s"]
        print(
            f"- training, coco_panoptic_128.yaml (133 classes, "
            + ("AMP, " if args.device == "cuda" else "")
            + f"batch {batch}) on synthetic scenes: {_rate(speed['images_per_s'])} img/s "
            f"({speed['iteration_s'] * 1000:.0f} ms "
            f"per iteration" + (f", of which {data * 1000:.0f} ms waiting for data)" if data
                                is not None else ")")
        )
    else:
        print("- training: no timing (see training.log)")
    print("- benchmark" + (" (bf16)" if args.device == "cuda" else "") + ":")
    print("\n".join(benchmark_speeds(out / "benchmark" / "benchmark.json")) or "  no results")
    failed = [r for r in results if r["status"] != "ok"]
    for r in failed:
        print(f"[gpu_check] {r['step']} {r['status']}: see {r['log']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
else:
    # Imported by train_net.py --register-module: register the 133-class synthetic dataset.
    register_gpu_check_dataset()
