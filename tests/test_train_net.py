"""train_net.py end to end: a few iterations of training, then detectron2's evaluators.

Each run is a subprocess, as a user runs it, so that detectron2's built-in dataset
registrations read ``$DETECTRON2_DATASETS`` (pointing at a tiny tree in the exact on-disk
layout) at import time.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskattn_d2.data.datasets.panoptic_conversion import convert_panoptic_annotations

from .conftest import COCO_MINI, COCO_MINI_PANOPTIC_JSON, COCO_MINI_PANOPTIC_ROOT

REPO = Path(__file__).resolve().parents[1]

# A tiny network so that a run takes seconds on CPU.
TINY_MODEL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.MASK_ATTN_UNET.CHANNELS", "[8, 16, 32]",
    "MODEL.MASK_ATTN_UNET.NORM", "BN",
    "MODEL.SEM_SEG_HEAD.NORM", "BN",
    "MODEL.EMBED_HEAD.NORM", "BN",
    "MODEL.MASK_ATTN.ENCODER_SCALES", "[4]",
    "MODEL.MASK_ATTN.DECODER_SCALES", "[2]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "8",
    "MODEL.EMBED_HEAD.CONVS_DIM", "8",
    "INPUT.NETWORK_SIZE", "(64, 64)",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]


def train_net_command(opts, output_dir, *, config="configs/coco_panoptic_128.yaml", num_gpus=1):
    """The command line of a train_net.py run (``config`` relative to the repository, or
    absolute)."""
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / config)]
    if num_gpus > 1:
        # A free port: detectron2's default port is fixed per user (49152 for root), so two
        # multi-process runs on one machine would collide.
        cmd += ["--num-gpus", str(num_gpus), "--dist-url", "auto"]
    return cmd + [*opts, "OUTPUT_DIR", str(output_dir)]


def run_train_net(config, opts, output_dir, *, datasets_root=None, num_gpus=1, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    cmd = train_net_command(opts, output_dir, config=config, num_gpus=num_gpus)
    proc = subprocess.run(
        cmd, cwd=output_dir.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"train_net.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def copypaste_metrics(log: str):
    """Parse detectron2's "copypaste" lines into {task: {metric: value}}."""
    results, task, keys = {}, None, None
    for line in log.splitlines():
        if "copypaste: Task: " in line:
            task = line.split("copypaste: Task: ")[1].strip()
            keys = None
        elif "copypaste: " in line and task:
            values = line.split("copypaste: ")[1].strip().split(",")
            if keys is None:
                keys = values
            else:
                results[task] = dict(zip(keys, map(float, values)))
    return results


def summary_table(log: str):
    """The rows of train_net.py's summary table: {dataset: {column: value}}."""
    lines = log.split("Summary (PQ/SQ/RQ, AP, mIoU, pixel accuracy):\n", 1)[1].splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, values = rows[0], rows[2:]  # rows[1] is the |---| ruler
    return {r[0]: {k: float(v) for k, v in zip(header[1:], r[1:]) if v != "-"} for r in values}


def assert_summary_matches_evaluators(log: str, dataset: str) -> None:
    """The summary row of ``dataset`` shows the numbers the evaluators printed."""
    metrics = copypaste_metrics(log)
    row = summary_table(log)[dataset]
    columns = [("PQ", "panoptic_seg", "PQ"), ("PQ_st", "panoptic_seg", "PQ_st"),
               ("AP", "segm", "AP"), ("mIoU", "sem_seg", "mIoU"), ("pACC", "sem_seg", "pACC")]
    expected = {c: metrics[t][k] for c, t, k in columns if k in metrics.get(t, {})}
    assert "PQ" in expected and "AP" in expected
    for column, value in expected.items():
        assert row[column] == pytest.approx(value, abs=0.006), column  # 2 decimals vs 4


@pytest.fixture(scope="module")
def coco_layout_root(tmp_path_factory):
    """$DETECTRON2_DATASETS/coco with val2017/, panoptic_val2017/ and annotations/ (panoptic
    and instances json) exactly as detectron2's builtin COCO panoptic registration expects,
    filled with the 3 real COCO val2017 images."""
    root = tmp_path_factory.mktemp("d2_datasets")
    coco = root / "coco"
    shutil.copytree(COCO_MINI / "val2017", coco / "val2017")
    shutil.copytree(COCO_MINI_PANOPTIC_ROOT, coco / "panoptic_val2017")
    (coco / "annotations").mkdir()
    shutil.copy(COCO_MINI_PANOPTIC_JSON, coco / "annotations" / "panoptic_val2017.json")
    panoptic = json.loads(COCO_MINI_PANOPTIC_JSON.read_text())
    convert_panoptic_annotations(
        panoptic,
        str(coco / "panoptic_val2017"),
        instances_json=str(coco / "annotations" / "instances_val2017.json"),
    )
    return root


def test_coco_builtin_registration_train_and_evaluate(coco_layout_root, tmp_path):
    opts = TINY_MODEL + ["DATASETS.TRAIN", '("coco_2017_val_panoptic",)']
    log = run_train_net("configs/coco_panoptic_128.yaml", opts, tmp_path / "out",
                        datasets_root=coco_layout_root)
    metrics = copypaste_metrics(log)
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(metrics)
    # The builtin name resolved to the tiny tree: its 3 images were the ones evaluated.
    assert "Start inference on 3 batches" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert_summary_matches_evaluators(log, "coco_2017_val_panoptic")


def test_cityscapes_builtin_registration_train_and_evaluate(cityscapes_root, tmp_path):
    opts = TINY_MODEL + ["DATASETS.TRAIN", '("cityscapes_fine_panoptic_val",)']
    log = run_train_net("configs/cityscapes_panoptic_128.yaml", opts, tmp_path / "out",
                        datasets_root=cityscapes_root)
    metrics = copypaste_metrics(log)
    # COCOPanopticEvaluator, CityscapesSemSegEvaluator, CityscapesInstanceEvaluator
    assert {"panoptic_seg", "sem_seg", "segm"} <= set(metrics)
    assert "Start inference on 2 batches" in log  # the fixture's 2 frames
    assert_summary_matches_evaluators(log, "cityscapes_fine_panoptic_val")


def test_real_coco_sample_train_eval_only_and_resume(tmp_path):
    opts = TINY_MODEL + [
        "DATASETS.TRAIN", '("coco_mini_panoptic_val",)',
        "DATASETS.TEST", '("coco_mini_panoptic_val",)',
        "TEST.PAPER_PROTOCOL", "True",
    ]
    out = tmp_path / "out"
    log = run_train_net("configs/coco_panoptic_128.yaml", opts, out)
    metrics = copypaste_metrics(log)
    assert {"panoptic_seg", "segm", "sem_seg", "panoptic_seg_paper_protocol"} <= set(metrics)
    assert "PQ paper protocol" in log

    # --eval-only on the checkpoint just written gives the same numbers.
    eval_opts = ["--eval-only", *opts, "MODEL.WEIGHTS", str(out / "model_final.pth")]
    again = copypaste_metrics(
        run_train_net("configs/coco_panoptic_128.yaml", eval_opts, tmp_path / "eval")
    )
    assert again["panoptic_seg"]["PQ"] == pytest.approx(metrics["panoptic_seg"]["PQ"], abs=1e-3)

    # --resume continues from the last checkpoint (already at MAX_ITER: nothing to redo).
    resumed = run_train_net("configs/coco_panoptic_128.yaml", ["--resume", *opts], out)
    assert "Loading checkpoint from" in resumed or "Loading from" in resumed


def test_two_cpu_processes(tmp_path):
    """`--num-gpus 2` on a CPU-only machine: two GLOO workers, DDP without device_ids."""
    opts = TINY_MODEL + [
        "MODEL.MASK_ATTN_UNET.NORM", "SyncBN",  # becomes NaiveSyncBN on CPU
        "DATASETS.TRAIN", '("coco_mini_panoptic_val",)',
        "DATASETS.TEST", '("coco_mini_panoptic_val",)',
        "TEST.EVALUATORS", '["panoptic"]',
    ]
    log = run_train_net("configs/coco_panoptic_128.yaml", opts, tmp_path / "out", num_gpus=2)
    assert "World size: 2" in log
    assert "panoptic_seg" in copypaste_metrics(log)
