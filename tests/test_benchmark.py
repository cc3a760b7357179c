"""tools/benchmark.py (smoke run + FLOP handles), the peer models of tools/benchmarking,
tools/compare_pq.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage
from PIL import Image

from benchmarking import peers
from benchmarking.scenes import synthetic_scenes

from tests.tool_modules import load_tool

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"
UNET = REPO / "configs" / "variants" / "unet_128.yaml"
SYNTHETIC_TRAIN = "maskattn_synthetic_panoptic_train"


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


def test_benchmark_smoke_run_writes_table_json_and_plot(benchmark, tmp_path):
    results = benchmark.main(
        ["--configs", str(QUICK), str(UNET), "--models", "synthetic_instant_test", "unet_128",
         "--size", "64", "64", "--batch-sizes", "1", "--iters", "2", "--warmup", "1",
         "--train-batch-size", "2", "--train-iters", "1", "--devices", "cpu",
         "--output-dir", str(tmp_path)]
    )
    assert [r["name"] for r in results] == ["synthetic_instant_test", "unet_128"]
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["environment"]["size"] == [64, 64]
    for r in saved["results"]:
        assert r["status"] == "ok", r
        assert r["params_m"] > 0 and r["gflops"] > 0
        latency = r["latency"]["1"]
        assert latency["network_ms"] > 0 and latency["postprocess_ms"] > 0
        assert len(latency["network_s"]) == 2
        assert r["peak_memory_mb"]["1"] >= 0 and r["peak_memory_mb"]["train"] > 0
        assert r["train"]["images_per_s"] > 0 and r["train"]["batch_size"] == 2
    # The plain UNet has more parameters than the tiny quick-schedule model.
    quick, unet = saved["results"]
    assert unet["params_m"] > quick["params_m"]
    table = (tmp_path / "benchmark.md").read_text()
    assert "| synthetic_instant_test | cpu | torch |" in table
    assert "| unet_128 | cpu | torch |" in table
    row = next(line for line in table.splitlines() if line.startswith("| unet_128"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # The achieved rate: 2 flops per multiply-add over the network time, and its share of
    # the best GEMM rate of the run.
    latency, memory = unet["latency"]["1"], unet["peak_memory_mb"]
    rate = 2 * unet["gflops"] / (latency["network_ms"] / 1000)
    peak = max(quick["gemm_peak_gflop_s"], unet["gemm_peak_gflop_s"])  # the run's best
    assert min(quick["gemm_peak_gflop_s"], unet["gemm_peak_gflop_s"]) > 0
    assert cells[7] == f"{rate:,.1f} ({100 * rate / peak:.0f} %)"
    numbers = [float(c.replace(",", "")) for c in cells[3:7] + cells[8:-1]]
    # The table shows the JSON's numbers, each in its own column, rounded.
    expected = [
        (unet["params_m"], 2), (unet["gflops"], 2),
        (latency["network_ms"], 1), (latency["postprocess_ms"], 1), (memory["1"], 1),
        (unet["train"]["images_per_s"], 2), (memory["train"], 1),
    ]
    assert numbers == [round(value, digits) for value, digits in expected]
    assert cells[-1] == "ok"
    with Image.open(tmp_path / "benchmark.png") as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_benchmark_onnxruntime_rows(benchmark, tmp_path):
    pytest.importorskip("onnxruntime")
    results = benchmark.main(
        ["--configs", str(QUICK), "--models", "synthetic_instant_test", "panoptic_deeplab_r50",
         "--backends", "onnxruntime", "onnxruntime_int8", "--size", "64", "64",
         "--batch-sizes", "1", "2",
         "--iters", "2", "--warmup", "1", "--no-train", "--no-flops", "--threads", "1",
         "--devices", "cpu", "--output-dir", str(tmp_path)]
    )
    # onnxruntime rows are for the MaskAttn configs only: the peer is left out.
    assert [(r["name"], r["backend"]) for r in results] == [
        ("synthetic_instant_test", "onnxruntime"), ("synthetic_instant_test", "onnxruntime_int8")
    ]
    for result in results:
        assert result["status"] == "ok", result
        assert "train" not in result and result["params_m"] > 0
        for batch in ("1", "2"):
            assert result["latency"][batch]["network_ms"] > 0
            assert result["latency"][batch]["postprocess_ms"] > 0
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["environment"]["onnxruntime"]
    table = (tmp_path / "benchmark.md").read_text()
    assert "| synthetic_instant_test | cpu | onnxruntime |" in table
    assert "| synthetic_instant_test | cpu | onnxruntime_int8 |" in table


def _round(network_ms, postprocess_ms, memory, status="ok"):
    return {"name": "m", "device": "cpu", "status": status, "wall_s": 1.0,
            "latency": {"1": {"network_ms": network_ms, "postprocess_ms": postprocess_ms,
                              "network_s": [network_ms / 1000], "postprocess_s": [0.0]}},
            "peak_memory_mb": {"1": memory}, "gemm_peak_gflop_s": network_ms}


def test_combine_rounds_takes_each_latency_median_over_rounds(benchmark):
    rounds = [_round(90.0, 9.0, 40.0), _round(70.0, 12.0, 45.0), _round(80.0, 10.0, 41.0)]
    combined = benchmark.combine_rounds(rounds)
    latency = combined["latency"]["1"]
    assert (latency["network_ms"], latency["postprocess_ms"]) == (80.0, 10.0)
    assert latency["network_s"] == [0.09, 0.07, 0.08]  # every timed run kept
    assert combined["peak_memory_mb"]["1"] == 45.0 and combined["gemm_peak_gflop_s"] == 90.0
    assert combined["wall_s"] == 3.0
    assert [r["1"]["network_ms"] for r in combined["rounds"]] == [90.0, 70.0, 80.0]
    assert rounds[0]["latency"]["1"]["network_ms"] == 90.0  # the inputs are left as they were
    assert benchmark.combine_rounds(rounds[:1]) is rounds[0]
    failed = _round(1.0, 1.0, 1.0, status="failed: boom")
    assert benchmark.combine_rounds([rounds[0], failed])["status"] == "failed: boom"


def test_benchmark_rounds_measure_every_model_in_turn(benchmark, tmp_path, monkeypatch):
    calls = []

    def fake_worker(name, device, argv, backend="torch"):
        calls.append((name, backend))
        result = _round(10.0 * len(calls), 1.0, 1.0)
        result.update(name=name, backend=backend, params_m=1.0)
        return result

    monkeypatch.setattr(benchmark, "run_worker", fake_worker)
    results = benchmark.main(
        ["--configs", str(QUICK), "--models", "synthetic_instant_test", "panoptic_deeplab_r50",
         "--backends", "torch", "onnxruntime", "--rounds", "2", "--batch-sizes", "1",
         "--devices", "cpu", "--output-dir", str(tmp_path)]
    )
    # Round-robin: every model (and backend) once per round, in the same order each round.
    order = [("synthetic_instant_test", "torch"), ("synthetic_instant_test", "onnxruntime"),
             ("panoptic_deeplab_r50", "torch")]
    assert calls == order * 2
    assert [(r["name"], r["backend"]) for r in results] == order
    # Each result combines its own two rounds (calls 1 and 4, 2 and 5, 3 and 6).
    assert [r["latency"]["1"]["network_ms"] for r in results] == [25.0, 35.0, 45.0]
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "the median of 2 rounds" in markdown
    assert "- synthetic_instant_test (cpu, torch): b1 10.0 + 1.0 / 40.0 + 1.0" in markdown


def test_benchmark_rejects_zero_rounds(benchmark, tmp_path):
    with pytest.raises(ValueError, match="--rounds must be >= 1, got 0"):
        benchmark.main(["--configs", str(QUICK), "--rounds", "0", "--output-dir", str(tmp_path)])


def test_onnxruntime_int8_runner_runs_the_quantized_copy(benchmark):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    args = benchmark.get_parser().parse_args(["--configs", str(QUICK), "--size", "64", "64"])
    cfg = benchmark.maskattn_config(str(QUICK), args, "cpu")
    runner = benchmark.ONNXRuntimeRunner(cfg, name="quick", threads=1, int8=True)
    assert runner.runtime.onnx_path.endswith("model_int8.onnx")
    kinds = {n.op_type for n in onnx.load(runner.runtime.onnx_path).graph.node}
    assert "DequantizeLinear" in kinds
    outputs = runner.postprocess(runner.network(runner.prepare(synthetic_scenes(1, (64, 64)))),
                                 (64, 64))
    assert outputs[0]["panoptic_seg"][0].shape == (64, 64)


def test_onnxruntime_runner_feeds_the_postprocessor_like_the_torch_runner(benchmark):
    pytest.importorskip("onnxruntime")
    args = benchmark.get_parser().parse_args(["--configs", str(QUICK), "--size", "64", "64"])
    cfg = benchmark.maskattn_config(str(QUICK), args, "cpu")
    torch.manual_seed(0)
    eager = benchmark.MaskAttnRunner(cfg, name="quick")
    torch.manual_seed(0)
    ort = benchmark.ONNXRuntimeRunner(cfg, name="quick", threads=1)
    scenes = synthetic_scenes(2, (64, 64), seed=0)
    with torch.no_grad():
        want = eager.postprocess(eager.network(eager.prepare(scenes)), (64, 64))
    got = ort.postprocess(ort.network(ort.prepare(scenes)), (64, 64))
    for w, g in zip(want, got):
        assert torch.equal(g["panoptic_seg"][0], w["panoptic_seg"][0])


def test_benchmark_rejects_unknown_models(benchmark, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        benchmark.main(["--configs", str(QUICK), "--models", "resnet_9000",
                        "--output-dir", str(tmp_path)])


def test_missing_peer_package_is_reported_unavailable(benchmark, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    result_file = tmp_path / "result.json"
    benchmark.main(["--worker", "mask2former_swin_t", "cpu", str(result_file),
                    "--configs", str(QUICK)])
    result = json.loads(result_file.read_text())
    assert result["status"].startswith("unavailable:") and "transformers" in result["status"]
    assert "unavailable" in benchmark.format_table([result], [1])


def test_sdpa_and_baddbmm_flop_handles(benchmark):
    class Attention(torch.nn.Module):
        def forward(self, q):
            k = q[:, :, :5]  # (B, heads, Nk, d)
            v = torch.cat([k, k], dim=-1)  # dv = 2 d
            out = F.scaled_dot_product_attention(q, k, v).flatten(0, 1)  # (6, 7, 8)
            kv = k.flatten(0, 1).transpose(1, 2).matmul(v.flatten(0, 1))  # (6, 4, 8)
            return torch.baddbmm(out, q.flatten(0, 1), kv)

    class Runner:
        def flops_module(self):
            return Attention()

    q = torch.randn(2, 3, 7, 4)  # B=2, heads=3, N=7, d=4
    total, skipped = benchmark.count_flops(Runner(), q)
    sdpa = 2 * 3 * 7 * 5 * (4 + 8)
    inner = 6 * 4 * 5 * 8  # (k^T v): (6, 4, 5) @ (6, 5, 8)
    baddbmm = 6 * 7 * 4 * 8  # (6, 7, 4) @ (6, 4, 8)
    assert total == sdpa + inner + baddbmm
    assert "aten::scaled_dot_product_attention" not in skipped


def test_conv_and_linear_flops_are_multiply_adds(benchmark):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, stride=2)
            self.fc = torch.nn.Linear(4 * 4 * 5, 10)

        def forward(self, x):
            y = self.conv(x)
            return y, self.fc(y.flatten(1))

    class Runner:
        def flops_module(self):
            return Net()

    total, skipped = benchmark.count_flops(Runner(), torch.randn(2, 3, 8, 10))
    conv = 2 * 4 * (4 * 5) * (3 * 3 * 3)  # batch * C_out * H_out W_out * C_in k k
    linear = 2 * 80 * 10
    assert total == conv + linear and not skipped


def test_synthetic_scenes_use_contiguous_synthetic_classes():
    scenes = synthetic_scenes(3, (64, 80), seed=1)
    again = synthetic_scenes(3, (64, 80), seed=1)
    for scene, same in zip(scenes, again):
        assert scene.image.shape == (64, 80, 3) and scene.image.dtype == np.uint8
        assert scene.pan_ids.shape == (64, 80)
        np.testing.assert_array_equal(scene.pan_ids, same.pan_ids)
        ids = {s["id"] for s in scene.segments_info}
        assert set(np.unique(scene.pan_ids).tolist()) - {0} <= ids
        for s in scene.segments_info:
            assert 0 <= s["category_id"] < 6 and s["isthing"] == (s["category_id"] < 3)
    with pytest.raises(ValueError, match="size"):
        synthetic_scenes(1, (16, 16))


def test_peers_register_their_backbone_only_when_a_config_names_it():
    code = """
from detectron2.modeling import BACKBONE_REGISTRY
from benchmarking import peers
name = "build_dilated_basic_resnet_backbone"
assert name not in BACKBONE_REGISTRY, "registered at import"
peers.panoptic_deeplab_config(dataset_name="x", num_classes=6, depth=50)
assert name not in BACKBONE_REGISTRY, "registered by a config that does not name it"
for _ in range(2):  # a second peer config finds it registered
    cfg = peers.panoptic_deeplab_config(dataset_name="x", num_classes=6, depth=18)
assert BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME) is peers.build_dilated_basic_resnet_backbone
"""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tools'}:{REPO}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dilated_basic_resnet_keeps_output_stride_16():
    cfg = peers.panoptic_deeplab_config(
        dataset_name=SYNTHETIC_TRAIN, num_classes=6, network_size=(64, 64), depth=18
    )
    backbone = peers.build_dilated_basic_resnet_backbone(cfg, ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res5": 16}
    features = backbone(torch.randn(1, 3, 64, 64))
    assert features["res5"].shape == (1, 512, 4, 4)
    dilations = {m.dilation for m in backbone.res5.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size == (3, 3)}
    assert dilations == {(2, 2)}
    cfg.defrost()
    cfg.MODEL.RESNETS.DEPTH = 101
    with pytest.raises(ValueError, match="DEPTH"):
        peers.build_dilated_basic_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_panoptic_deeplab_runner_network_postprocess_and_training():
    torch.manual_seed(0)
    cfg = peers.panoptic_deeplab_config(
        dataset_name=SYNTHETIC_TRAIN, num_classes=6, network_size=(64, 64), depth=18
    )
    assert cfg.MODEL.PANOPTIC_DEEPLAB.STUFF_AREA == 4  # 2048 scaled by 64*64 / (1024*2048)
    runner = peers.PanopticDeepLabRunner(cfg, name="pdl")
    scenes = synthetic_scenes(2, (64, 64))
    with torch.no_grad():
        semantic, center, offset = runner.network(runner.prepare(scenes))
        panoptic = runner.postprocess((semantic, center, offset), (64, 64))
    assert semantic.shape == (2, 6, 64, 64) and center.shape == (2, 1, 64, 64)
    assert offset.shape == (2, 2, 64, 64)
    assert len(panoptic) == 2 and panoptic[0].shape == (64, 64)
    labels = torch.unique(panoptic[0])
    assert set((labels[labels >= 0] // 1000).tolist()) <= set(range(6))
    runner.model.train()
    with EventStorage(0):
        loss = runner.training_loss(scenes)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    grads = [p.grad for p in runner.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_compare_pq_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    compare_pq = load_tool("compare_pq")
    rows = compare_pq.main(
        ["--iters", "2", "--batch-size", "2", "--num-train", "4", "--num-val", "2",
         "--output-dir", str(tmp_path / "out")]
    )
    methods = compare_pq.INSTANCE_METHODS  # the postprocessor's
    assert [r["model"] for r in rows] == [
        f"MaskAttn-UNet ({m.replace('_', ' ')})" for m in methods
    ] + ["Panoptic-DeepLab (R18, OS16)"]
    assert "MaskAttn-UNet (connected components)" in [r["model"] for r in rows]
    assert all(r["train_s"] > 0 and r["params_m"] > 0 for r in rows)
    assert len({r["train_s"] for r in rows[: len(methods)]}) == 1  # the same trained model
    table = (tmp_path / "out" / "compare_pq.md").read_text()
    assert table.startswith("# PQ on the synthetic data (4 train / 2 val images)")
    assert "| Panoptic-DeepLab (R18, OS16) |" in table
    saved = json.loads((tmp_path / "out" / "compare_pq.json").read_text())
    assert saved["rows"] == rows
