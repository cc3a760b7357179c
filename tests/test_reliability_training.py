"""Reliability of training: non-finite losses, atomic checkpoints, interrupted training,
determinism, distributed evaluation and config errors.

Runs use the real 3-image COCO sample ("coco_mini_panoptic_val", registered by the package)
and the tiny network of ``test_train_net``, on CPU. ``train_net.py`` runs are subprocesses, as
a user runs them; runs that only need to be compared with each other go side by side (most of
a tiny run is start-up).
"""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import HookBase

from maskattn_d2 import add_maskattn_config
from maskattn_d2.engine import (
    AtomicCheckpointer,
    MaskAttnTrainer,
    TrainingError,
    adapt_config_to_device,
)

from .test_train_net import REPO, TINY_MODEL, copypaste_metrics, train_net_command

CONFIG = "configs/coco_panoptic_128.yaml"
SAMPLE = '("coco_mini_panoptic_val",)'
SAMPLE_OPTS = TINY_MODEL + ["DATASETS.TRAIN", SAMPLE, "DATASETS.TEST", SAMPLE]
# One torch thread per process: runs compared with each other do the same arithmetic (the
# thread count alone moves e.g. sem_seg BoundaryIoU by 1e-4), and side-by-side runs share
# the 2 cores without oversubscription.
RUN_ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def tiny_cfg(output_dir, *opts):
    """The config train_net.py builds from CONFIG + SAMPLE_OPTS + ``opts`` (not frozen)."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(REPO / CONFIG))
    cfg.merge_from_list([*SAMPLE_OPTS, "OUTPUT_DIR", str(output_dir), *opts])
    return adapt_config_to_device(cfg)


def run_side_by_side(commands, workdir: Path, timeout=600):
    """Run commands concurrently; return one (returncode, stdout, stderr) per command.

    Output goes to files, not pipes, so that no run blocks on a full pipe while another is
    being waited for.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, cmd in enumerate(commands):
        out, err = open(workdir / f"run{i}.out", "w+"), open(workdir / f"run{i}.err", "w+")
        proc = subprocess.Popen(cmd, cwd=workdir, env=RUN_ENV, stdout=out, stderr=err)
        runs.append((proc, out, err))
    results = []
    for proc, out, err in runs:
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def wait_for(condition, proc, what, timeout=120.0):
    """Poll ``condition`` every 10 ms while ``proc`` runs; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process exited (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def all_finite(state_dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


# ----------------------------------------------------------------------- non-finite loss
class PoisonWeights(HookBase):
    """Fill the first parameter with NaN just before iteration ``at``: its loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("fail_at", [0, 3, 5], ids=["first", "middle", "last"])
def test_nonfinite_loss_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch, fail_at):
    """A NaN loss at iteration k stops training with an error naming k and the last good
    checkpoint; nothing is saved or evaluated after it, not even when k is the last iteration
    (where detectron2's EvalHook.after_train would evaluate the NaN weights)."""
    max_iter, period = 6, 2
    evaluated = []

    def record_evaluation(cls, cfg, model, evaluators=None):
        evaluated.append(cfg.SOLVER.MAX_ITER)
        return {}

    monkeypatch.setattr(MaskAttnTrainer, "test", classmethod(record_evaluation))
    cfg = tiny_cfg(
        tmp_path,
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(period),
        "TEST.EVAL_PERIOD", "0",
    )
    trainer = MaskAttnTrainer(cfg)
    trainer.register_hooks([PoisonWeights(fail_at)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(TrainingError, match=f"stopped at iteration {fail_at} ") as info:
        trainer.train()
    message = str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, FloatingPointError)
    assert f"Loss became infinite or NaN at iteration={fail_at}" in str(cause)
    assert not all_finite(trainer.model.state_dict())  # the poison did reach the weights
    assert not (tmp_path / "model_final.pth").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert evaluated == []
    assert (tmp_path / "metrics.json").exists()  # writers still flushed

    last_good = max((i for i in range(fail_at) if (i + 1) % period == 0), default=None)
    if last_good is None:
        assert "no checkpoint written yet" in message and "starts from iteration 0" in message
        assert not (tmp_path / "last_checkpoint").exists()
        return
    path = tmp_path / f"model_{last_good:07d}.pth"
    assert f"last good checkpoint: {path}. Rerun with --resume" in message
    assert (tmp_path / "last_checkpoint").read_text() == path.name
    checkpoint = torch.load(path, map_location="cpu")
    assert checkpoint["iteration"] == last_good
    assert all_finite(checkpoint["model"])
    # --resume reloads it: finite weights, the next iteration to run.
    resumed = MaskAttnTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == last_good + 1
    assert all_finite(resumed.model.state_dict())


def test_failed_final_evaluation_says_training_finished(tmp_path, monkeypatch):
    """Issue 11 item 4: when the evaluation after the last iteration fails, the error says
    that training finished and where model_final.pth is, and how to evaluate it again; not
    "stopped at iteration ... nothing was saved ... rerun with --resume"."""

    def failing_evaluation(cls, cfg, model, evaluators=None):
        raise RuntimeError("the evaluator exploded")

    monkeypatch.setattr(MaskAttnTrainer, "test", classmethod(failing_evaluation))
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0")
    trainer = MaskAttnTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    final = tmp_path / "model_final.pth"
    assert final.is_file() and torch.load(final, map_location="cpu")["iteration"] == 2
    assert "Training finished all 3 iterations" in message
    assert "RuntimeError: the evaluator exploded" in message
    assert f"--eval-only MODEL.WEIGHTS {final}" in message
    assert "stopped at iteration" not in message and "nothing was saved" not in message
    assert "--resume" not in message
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------- atomic checkpoints
def test_unreadable_checkpoint_error_names_the_file(tmp_path):
    """Truncated or corrupt checkpoints fail with an error that names the file and what to
    do, whether they come from --resume (last_checkpoint) or from MODEL.WEIGHTS; detectron2's
    own formats (.pkl) still load."""
    model = torch.nn.Linear(4, 2)
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]

    path = tmp_path / "model_0000009.pth"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(RuntimeError, match="truncated, corrupt or not a checkpoint") as info:
        AtomicCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert str(path) in str(info.value)
    assert str(tmp_path / "last_checkpoint") in str(info.value)

    for name, content in [("empty.pth", b""), ("garbage.pth", b"not a checkpoint" * 64)]:
        weights = tmp_path / name
        weights.write_bytes(content)
        checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
        with pytest.raises(RuntimeError, match="truncated, corrupt or not a checkpoint") as info:
            checkpointer.resume_or_load(str(weights), resume=False)
        assert str(weights) in str(info.value) and "MODEL.WEIGHTS" in str(info.value)

    state = {k: v.numpy() + 1 for k, v in model.state_dict().items()}
    pkl = tmp_path / "model_zoo.pkl"
    pkl.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    AtomicCheckpointer(model, save_dir="").load(str(pkl))
    assert np.array_equal(model.weight.detach().numpy(), state["weight"])
    pkl.write_bytes(pkl.read_bytes()[:50])
    with pytest.raises(RuntimeError, match="truncated") as info:
        AtomicCheckpointer(model, save_dir="").load(str(pkl))
    assert str(pkl) in str(info.value)


# Saves a good model_final, then a second one whose bytes are written slowly, so that the
# parent can kill it in the middle of the write.
_KILLED_SAVE = """
import io, sys, time
import torch
from maskattn_d2.engine import AtomicCheckpointer

torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
checkpointer = AtomicCheckpointer(model, save_dir=sys.argv[1])
checkpointer.save("model_final", iteration=1)
print("first save done", flush=True)

def slow_save(obj, f, _save=torch.save):
    buffer = io.BytesIO()
    _save(obj, buffer)
    data = buffer.getvalue()
    for i in range(0, len(data), 1024):
        f.write(data[i : i + 1024])
        f.flush()
        time.sleep(0.2)

torch.save = slow_save
with torch.no_grad():
    model.weight.fill_(2.0)
checkpointer.save("model_final", iteration=2)
print("second save done", flush=True)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """SIGKILL in the middle of writing a checkpoint leaves the previous file with that name,
    and last_checkpoint, exactly as they were."""
    stderr = open(tmp_path / "child.err", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    partial = tmp_path / "model_final.pth.tmp"
    try:
        first = proc.stdout.readline().strip()
        stderr.seek(0)
        assert first == "first save done", stderr.read()[-3000:]
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, proc, "the second save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        stderr.close()
    assert proc.returncode == -signal.SIGKILL
    final = tmp_path / "model_final.pth"
    # The kill did land in the middle of the write.
    assert 0 < partial.stat().st_size < final.stat().st_size
    with pytest.raises(Exception):
        torch.load(partial, map_location="cpu")

    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    checkpoint = torch.load(final, map_location="cpu")
    assert checkpoint["iteration"] == 1
    torch.manual_seed(0)
    first = torch.nn.Linear(64, 64).state_dict()
    assert checkpoint["model"].keys() == first.keys()
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in first.items())
    # --resume finds and loads it.
    model = torch.nn.Linear(64, 64)
    extra = AtomicCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and torch.equal(model.weight, first["weight"])


# ------------------------------------------------------------------ interrupted training
RESUME_MAX_ITER = 50
RESUME_OPTS = SAMPLE_OPTS + [
    "SOLVER.MAX_ITER", str(RESUME_MAX_ITER),
    "SOLVER.CHECKPOINT_PERIOD", "10",
    "LOG_PERIOD", "10",
]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """train_net.py SIGKILLed after its first checkpoint, then rerun with --resume."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    with open(out.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(
            train_net_command(RESUME_OPTS, out),
            cwd=out.parent,
            env=RUN_ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for((out / "last_checkpoint").exists, proc, "the first checkpoint")
            was_running = proc.poll() is None
            final_before_kill = (out / "model_final.pth").exists()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    killed_rc = proc.returncode
    last_before_resume = (out / "last_checkpoint").read_text()
    final_after_kill = (out / "model_final.pth").exists()
    ((rc, stdout, stderr),) = run_side_by_side(
        [train_net_command(["--resume", *RESUME_OPTS], out)], out.parent / "resume"
    )
    assert rc == 0, f"train_net.py --resume failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    log = stdout + stderr
    return SimpleNamespace(
        out=out,
        log=log,
        was_running=was_running,
        killed_rc=killed_rc,
        final_existed=final_before_kill or final_after_kill,
        last_before_resume=last_before_resume,
    )


def test_sigkilled_training_resumes_from_last_checkpoint(resumed_run):
    """After a SIGKILL, --resume restarts at the checkpoint's iteration + 1, runs to MAX_ITER,
    writes a valid model_final and evaluates."""
    run = resumed_run
    assert run.was_running and run.killed_rc == -signal.SIGKILL
    assert not run.final_existed, "the first run finished before it could be killed"
    assert run.last_before_resume.startswith("model_0")
    ckpt_iter = int(run.last_before_resume[len("model_") : -len(".pth")])
    assert (ckpt_iter + 1) % 10 == 0
    assert f"Loading from {run.out / run.last_before_resume}" in run.log
    assert f"Starting training from iteration {ckpt_iter + 1}" in run.log
    assert f"iter: {RESUME_MAX_ITER - 1} " in run.log

    checkpoint = torch.load(run.out / "model_final.pth", map_location="cpu")
    assert checkpoint["iteration"] == RESUME_MAX_ITER - 1
    assert all_finite(checkpoint["model"])
    assert (run.out / "last_checkpoint").read_text() == "model_final.pth"

    metrics = copypaste_metrics(run.log)
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(metrics)
    assert "Summary (PQ/SQ/RQ, AP, mIoU, pixel accuracy)" in run.log


# -------------------------------------------------------------------------- determinism
def iteration_losses(metrics_json: Path):
    """{iteration: {total_loss, loss_*}} from detectron2's metrics.json (training lines)."""
    losses = {}
    for line in metrics_json.read_text().splitlines():
        record = json.loads(line)
        keys = [k for k in record if k == "total_loss" or k.startswith("loss_")]
        if keys:
            losses[record["iteration"]] = {k: record[k] for k in keys}
    return losses


def test_same_seed_gives_identical_losses(tmp_path):
    """SEED fixes every random choice (weights, sampler, augmentations in a data-loader
    worker, contrastive sampling): two runs log identical losses; another seed does not."""
    opts = TINY_MODEL + [
        "DATASETS.TRAIN", SAMPLE,
        "DATASETS.TEST", "()",
        "TEST.EVAL_PERIOD", "0",
        "SOLVER.MAX_ITER", "5",
        "DATALOADER.NUM_WORKERS", "1",
        "LOG_PERIOD", "1",
    ]
    seeds = [7, 7, 8]
    outs = [tmp_path / f"seed{seed}_{i}" for i, seed in enumerate(seeds)]
    runs = run_side_by_side(
        [train_net_command([*opts, "SEED", str(s)], out) for s, out in zip(seeds, outs)],
        tmp_path,
    )
    for rc, stdout, stderr in runs:
        assert rc == 0, f"train_net.py failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    first, again, other = (iteration_losses(out / "metrics.json") for out in outs)
    assert sorted(first) == list(range(5))  # LOG_PERIOD 1: one line per iteration
    assert {"total_loss", "loss_sem_seg", "loss_embed"} <= set(first[0])
    assert first == again
    assert all(first[i] != other[i] for i in range(5))


# -------------------------------------------------------------------------- distributed
def test_two_process_evaluation_matches_one_process(resumed_run, tmp_path):
    """--eval-only in two CPU processes (the 3 images split 2 + 1, predictions gathered)
    gives the metrics of one process, to 1e-6, on the weights the resumed run wrote."""
    # Full-precision metrics of these weights: the resumed run's final evaluation, written
    # by detectron2's EvalHook to metrics.json (iteration MAX_ITER).
    lines = (resumed_run.out / "metrics.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    final = next(r for r in records if r["iteration"] == RESUME_MAX_ITER and "panoptic_seg/PQ" in r)
    expected = [
        [key.split("/", 1)[0], key.split("/", 1)[1], value, 1e-6]
        for key, value in final.items()
        if "/" in key and key.split("/", 1)[0] in ("panoptic_seg", "segm", "sem_seg")
        and math.isfinite(value)
    ]
    assert len(expected) > 10
    # Both --eval-only runs check every metric against them (detectron2's verify_results
    # exits non-zero on a difference above the tolerance).
    opts = [
        "--eval-only",
        *SAMPLE_OPTS,
        "MODEL.WEIGHTS", str(resumed_run.out / "model_final.pth"),
        "TEST.EXPECTED_RESULTS", repr(expected),
    ]
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    (one, one_log, one_err), (two, two_log, two_err) = run_side_by_side(
        [train_net_command(opts, one_out), train_net_command(opts, two_out, num_gpus=2)],
        tmp_path,
    )
    assert one == 0, f"1 process failed:\n{one_log[-3000:]}\n{one_err[-3000:]}"
    assert two == 0, f"2 processes failed:\n{two_log[-3000:]}\n{two_err[-3000:]}"
    one_log, two_log = one_log + one_err, two_log + two_err
    assert "World size: 2" in two_log
    for log in (one_log, two_log):
        assert "Results verification passed." in log
    assert "Start inference on 3 batches" in one_log
    assert "Start inference on 2 batches" in two_log  # rank 0
    assert "Start inference on 1 batches" in (two_out / "log.txt.rank1").read_text()
    one_metrics, two_metrics = copypaste_metrics(one_log), copypaste_metrics(two_log)
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(one_metrics)
    assert one_metrics == two_metrics
    assert one_metrics["sem_seg"]["mIoU"] > 0  # trained weights: not a comparison of zeros


# A two-worker launch whose workers record, at interpreter exit, whether their process group
# is still alive (it must not be: its GLOO threads are what aborted workers at exit).
_LAUNCHED_WORKERS = """
import atexit, os, sys
import torch
import torch.distributed as dist
from maskattn_d2.engine import launch

def work(out):
    rank = dist.get_rank()
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    assert tensor.item() == 2
    def record():
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(str(dist.is_initialized()))
    atexit.register(record)

if __name__ == "__main__":
    launch(work, 2, dist_url="auto", args=(sys.argv[1],))
"""


def test_workers_destroy_their_process_group_before_exit(tmp_path):
    """Issue 11 item 1: detectron2's launch leaves each worker's GLOO process group alive
    until interpreter exit, where its C++ threads can abort the worker ("terminate called
    without an active exception", SIGABRT) after a good run. maskattn_d2's launch (used by
    train_net.py) ends every worker with a barrier and destroy_process_group."""
    import train_net
    from maskattn_d2.engine import launch

    assert train_net.launch is launch
    script = tmp_path / "workers.py"
    script.write_text(_LAUNCHED_WORKERS)
    ((rc, stdout, stderr),) = run_side_by_side(
        [[sys.executable, str(script), str(tmp_path)]], tmp_path / "run"
    )
    assert rc == 0, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "terminate called" not in stderr
    assert (tmp_path / "rank0").read_text() == "False"
    assert (tmp_path / "rank1").read_text() == "False"


def test_run_and_shut_down_destroys_the_group_after_success_and_failure(tmp_path):
    """The worker wrapper destroys the process group whether the main function returns
    (after a barrier) or raises (no barrier: a peer may be in another collective); the
    main function's result and exception come through."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from maskattn_d2.engine import run_and_shut_down

    def init(name):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / name}", rank=0,
                                world_size=1)
        comm.create_local_process_group(1)

    def alive():
        assert dist.is_initialized()
        return 42

    def fails():
        raise KeyError("boom")

    init("store1")
    assert run_and_shut_down(alive) == 42
    assert not dist.is_initialized()
    init("store2")
    with pytest.raises(KeyError, match="boom"):
        run_and_shut_down(fails)
    assert not dist.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_one_host_train_and_match_one_process(tmp_path):
    """Issue 11 item 1: `--num-machines 2 --machine-rank 0|1 --dist-url tcp://...`, one CPU
    process per "machine": both exit 0 after training and evaluating, and one process
    evaluating the weights they wrote gets every metric of their final evaluation (1e-6)."""
    out = tmp_path / "out"
    url = f"tcp://127.0.0.1:{_free_port()}"
    opts = [*SAMPLE_OPTS, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "0"]
    machines = [
        train_net_command(opts, out)[:4]
        + ["--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url]
        + train_net_command(opts, out)[4:]
        for rank in (0, 1)
    ]
    runs = run_side_by_side(machines, tmp_path / "machines")
    for rank, (rc, stdout, stderr) in enumerate(runs):
        assert rc == 0, f"machine {rank} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        assert "terminate called" not in stderr
    log = runs[0][1] + runs[0][2]
    assert "World size: 2" in log
    two_machines = copypaste_metrics(log)
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(two_machines)
    assert (out / "log.txt.rank1").exists()  # the second machine's worker ran

    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    final = next(r for r in records if "panoptic_seg/PQ" in r)
    expected = [
        [key.split("/", 1)[0], key.split("/", 1)[1], value, 1e-6]
        for key, value in final.items()
        if "/" in key and key.split("/", 1)[0] in ("panoptic_seg", "segm", "sem_seg")
        and math.isfinite(value)
    ]
    assert len(expected) > 10
    eval_opts = ["--eval-only", *SAMPLE_OPTS, "MODEL.WEIGHTS", str(out / "model_final.pth"),
                 "TEST.EXPECTED_RESULTS", repr(expected)]
    ((rc, stdout, stderr),) = run_side_by_side(
        [train_net_command(eval_opts, tmp_path / "one")], tmp_path / "one_run"
    )
    assert rc == 0, f"1 process failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "Results verification passed." in stdout + stderr
    assert copypaste_metrics(stdout + stderr) == two_machines


# ------------------------------------------------------------------------ config errors
def test_unknown_or_mistyped_config_keys_stop_train_net(tmp_path):
    """yacs rejects unknown keys (YAML file or command line) and values of the wrong type;
    train_net.py exits non-zero naming the key."""
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(
        f'_BASE_: "{REPO / CONFIG}"\nMODEL:\n  MASK_ATTN:\n    NOT_A_KEY: 1\n'
    )
    cases = [
        (train_net_command(TINY_MODEL, tmp_path / "a", config=str(yaml_file)),
         "MODEL.MASK_ATTN.NOT_A_KEY"),
        (train_net_command([*TINY_MODEL, "SOLVER.NOT_A_KEY", "1"], tmp_path / "b"),
         "SOLVER.NOT_A_KEY"),
        (train_net_command([*TINY_MODEL, "SOLVER.IMS_PER_BATCH", "abc"], tmp_path / "c"),
         "SOLVER.IMS_PER_BATCH"),
    ]
    results = run_side_by_side([cmd for cmd, _ in cases], tmp_path / "runs")
    for (_, key), (rc, _, stderr) in zip(cases, results):
        assert rc != 0, f"{key}: train_net.py did not fail"
        assert key in stderr, f"{key} not named in:\n{stderr[-2000:]}"
    assert "Non-existent config key: MODEL.MASK_ATTN.NOT_A_KEY" in results[0][2]
    assert "Non-existent key: SOLVER.NOT_A_KEY" in results[1][2]
    assert "Type mismatch" in results[2][2] and "abc" in results[2][2]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.MASK_ATTN.MASK_KIND", "foo"], r"mask_kind 'foo'; expected one of"),
        (["MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD", "foo"],
         r"instance_method must be one of .*got 'foo'"),
        (["MODEL.MASK_ATTN_UNET.NORM", "foo"], r"unknown norm 'foo'"),
        (["MODEL.SEM_SEG_HEAD.NORM", "foo"], r"unknown norm 'foo'"),
        (["MODEL.EMBED_HEAD.NORM", "foo"], r"unknown norm 'foo'"),
        (["MODEL.MASK_ATTN_UNET.ACTIVATION", "foo"], r"unknown activation 'foo'"),
        (["MODEL.MASK_ATTN.ENCODER_SCALES", "[3]"], r"scale 3, which is not a stage stride"),
        (["MODEL.EMBED_HEAD.NAME", "foo"], r"No object named 'foo' found in 'EMBED_HEAD'"),
        (["MODEL.EMBED_HEAD.SEED_TARGET", "foo"], r"MODEL.EMBED_HEAD.SEED_TARGET must be .*'foo'"),
        (["MODEL.EMBED_HEAD.SEED_LOSS", "foo"], r"MODEL.EMBED_HEAD.SEED_LOSS must be .*'foo'"),
        (["MODEL.EMBED_HEAD.OFFSET_LOSS", "foo"],
         r"MODEL.EMBED_HEAD.OFFSET_LOSS must be .*'foo'"),
        (["MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT", "foo"],
         r"seed_assignment must be one of .*'foo'"),
        # 3 stages: strides up to 4, so 66 does not divide.
        (["INPUT.NETWORK_SIZE", "(66, 66)"], r"INPUT.NETWORK_SIZE \(66, 66\) .* multiples of 4"),
        # The default 5 stages need multiples of 16.
        (["MODEL.MASK_ATTN_UNET.CHANNELS", "[8, 8, 8, 8, 8]", "INPUT.NETWORK_SIZE", "(100, 100)"],
         r"INPUT.NETWORK_SIZE \(100, 100\) .* multiples of 16"),
        (["SOLVER.OPTIMIZER", "foo"], r"SOLVER.OPTIMIZER must be one of .*got 'foo'"),
        (["SOLVER.LR_SCHEDULER_NAME", "foo"], r"Unknown LR scheduler: foo"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_invalid_choice_values_fail_at_build_naming_key_or_value(tmp_path, opts, message):
    """Values outside a key's allowed set fail when the model / optimizer / scheduler is
    built (before any training), with a message naming the key or the bad value."""
    cfg = tiny_cfg(tmp_path, *opts)
    with pytest.raises((ValueError, KeyError), match=message):
        model = MaskAttnTrainer.build_model(cfg)
        optimizer = MaskAttnTrainer.build_optimizer(cfg, model)
        MaskAttnTrainer.build_lr_scheduler(cfg, optimizer)


def test_log_period_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="LOG_PERIOD must be a positive number of iterations"):
        MaskAttnTrainer(tiny_cfg(tmp_path, "LOG_PERIOD", "0"))


# ------------------------------------------------------------- weights for evaluation
def test_eval_only_refuses_missing_or_mismatched_weights(tmp_path):
    """Issue 11 item 5: --eval-only without MODEL.WEIGHTS evaluated a random model and a
    checkpoint of another architecture loaded with "Skip loading" warnings, both exiting 0
    with meaningless numbers. Both are errors naming what is missing / mismatched, unless
    --allow-random-weights asks for it."""
    from maskattn_d2.engine import WeightsError, load_inference_weights

    model = MaskAttnTrainer.build_model(tiny_cfg(tmp_path))
    with pytest.raises(WeightsError, match="MODEL.WEIGHTS is empty.*--allow-random-weights"):
        load_inference_weights(model, "")
    load_inference_weights(model, "", allow_random=True)

    other = MaskAttnTrainer.build_model(
        tiny_cfg(tmp_path, "MODEL.MASK_ATTN_UNET.CHANNELS", "[8, 16, 24]")
    )
    AtomicCheckpointer(other, save_dir=str(tmp_path)).save("other_architecture")
    other_file = str(tmp_path / "other_architecture.pth")
    with pytest.raises(WeightsError, match="does not fit the model") as info:
        load_inference_weights(model, other_file)
    message = str(info.value)
    assert other_file in message and "another shape" in message
    assert "checkpoint (24," in message and "model (32," in message  # names a parameter
    load_inference_weights(model, other_file, allow_random=True)
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("own")
    load_inference_weights(model, str(tmp_path / "own.pth"))  # its own weights: fine

    # Through train_net.py: exit non-zero, unless asked explicitly.
    runs = run_side_by_side(
        [
            train_net_command(["--eval-only", *SAMPLE_OPTS], tmp_path / "refused"),
            train_net_command(
                ["--eval-only", "--allow-random-weights", *SAMPLE_OPTS], tmp_path / "allowed"
            ),
        ],
        tmp_path / "runs",
    )
    (refused, _, refused_err), (allowed, allowed_out, allowed_err) = runs
    assert refused != 0 and "No weights to evaluate: MODEL.WEIGHTS is empty" in refused_err
    assert allowed == 0, allowed_err[-3000:]
    assert "--allow-random-weights: No weights" in allowed_out + allowed_err


# ------------------------------------------------------------------ users' datasets
_USER_DATASETS = """
from maskattn_d2.data.datasets import panoptic_metadata, register_panoptic_dataset

CATEGORIES = {categories!r}
register_panoptic_dataset("my_panoptic_val", panoptic_metadata(CATEGORIES), {paths!r})
"""


def test_register_module_registers_user_datasets_in_every_worker(tmp_path):
    """Issue 11 items 6 and 8: `--register-module my_datasets.py` imports the user's module in
    every worker (two processes here), from any working directory; train_net.py trains and
    evaluates on the dataset it registers, names it in the summary table, and the demo
    draws with the same option."""
    from .panoptic_factory import CATEGORIES, NUM_CLASSES, write_panoptic_dataset

    paths = write_panoptic_dataset(tmp_path / "data", ["things", "stuff_only", "things"])
    module = tmp_path / "my_datasets.py"
    module.write_text(_USER_DATASETS.format(categories=CATEGORIES, paths=paths))
    out = tmp_path / "out"
    opts = TINY_MODEL + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES),
        "DATASETS.TRAIN", '("my_panoptic_val",)',
        "DATASETS.TEST", '("my_panoptic_val",)',
        "TEST.EVALUATORS", '["panoptic", "semantic"]',
    ]
    cmd = train_net_command(opts, out, num_gpus=2)
    cmd[2:2] = ["--register-module", module.name]  # relative to the working directory
    ((rc, stdout, stderr),) = run_side_by_side([cmd], tmp_path)  # cwd: tmp_path
    log = stdout + stderr
    assert rc == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "World size: 2" in log
    assert "panoptic_seg" in copypaste_metrics(log)
    summary = log[log.index("Summary (PQ/SQ/RQ"):]
    assert "| my_panoptic_val " in summary and "| -  " not in summary

    demo_out = tmp_path / "pictures"
    demo_cmd = [sys.executable, str(REPO / "demo" / "demo.py"), "--config-file",
                str(REPO / CONFIG), "--register-module", str(module),
                "--input", paths["image_root"], "--output", str(demo_out),
                "--weights", str(out / "model_final.pth"), "--opts", *opts]
    without_cmd = [c for c in demo_cmd if c != str(module) and c != "--register-module"]
    (demo_rc, demo_log, demo_err), (bad_rc, bad_out, bad_err) = run_side_by_side(
        [demo_cmd, without_cmd], tmp_path / "demo"
    )
    assert demo_rc == 0, demo_err[-3000:]
    assert len(list(demo_out.glob("*_panoptic.png"))) == 3
    bad_log = bad_out + bad_err
    assert bad_rc == 2 and "'my_panoptic_val'" in bad_log and "--register-module" in bad_log
