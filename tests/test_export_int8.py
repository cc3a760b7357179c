"""INT8 export: which convolutions stay float32, how close the quantized network stays to the
float one on images it was not calibrated on, ``tools/export_model.py --int8`` and
``train_net.py --eval-only --onnx-model``."""
import os
import subprocess
import sys
from pathlib import Path

from detectron2.data import DatasetCatalog

import numpy as np
import pytest
import torch

from maskattn_d2.data.datasets.synthetic import render_scene

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402  (after the optional-dependency skips)

from maskattn_d2.export import (  # noqa: E402
    ExportableNetwork,
    ONNXRuntimeModel,
    export_onnx,
    network_metadata,
)
from maskattn_d2.export.quantize import float_boundary_convolutions, quantize_int8  # noqa: E402

from .test_export import QUICK, SMALL, _cfg, _chw, _random_model, _save_weights  # noqa: E402
from .test_train_net import TINY_MODEL, copypaste_metrics, run_train_net  # noqa: E402
from .tool_modules import load_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO_OPTS = [
    "DATASETS.TRAIN", "('coco_mini_panoptic_val',)",
    "DATASETS.TEST", "('coco_mini_panoptic_val',)",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133",
]


def _conv(name, x, w, y):
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def test_float_boundary_convolutions_are_the_first_and_those_writing_outputs():
    # x -> a -> relu -> b -> c -> out1 ; relu -> e ; add(b, e) -> d -> out2
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], [0.1] * 9)
    nodes = [
        _conv("a", "x", "w", "ya"),
        helper.make_node("Relu", ["ya"], ["r"], name="relu"),
        _conv("b", "r", "w", "yb"),
        _conv("c", "yb", "w", "out1"),
        _conv("e", "r", "w", "ye"),
        helper.make_node("Add", ["yb", "ye"], ["s"], name="add"),
        _conv("d", "s", "w", "out2"),
    ]
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 8, 8])
               for n in ("out1", "out2")]
    graph = helper.make_graph(nodes, "g", [image], outputs, initializer=[weight])
    # b and e feed later convolutions (e through the Add): quantized.
    assert float_boundary_convolutions(helper.make_model(graph)) == ["a", "c", "d"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(cfg, float model, int8 model, int8 path) of the synthetic config's random-weight
    network, calibrated on 16 synthetic scenes."""
    cfg = _cfg(SMALL)
    network = ExportableNetwork(_random_model(cfg, seed=5))
    folder = tmp_path_factory.mktemp("int8")
    float_path, int8_path = str(folder / "model.onnx"), str(folder / "model_int8.onnx")
    export_onnx(network, float_path, metadata=network_metadata(cfg, network))
    float_model = ONNXRuntimeModel(cfg, float_path, num_threads=1)
    rng = np.random.default_rng(0)
    batches = [
        float_model.preprocess_image([{"image": _chw(render_scene(rng, 128, 128)[0])}
                                      for _ in range(4)]).numpy()
        for _ in range(4)
    ]
    assert quantize_int8(float_path, int8_path, batches) == 16
    return cfg, float_model, ONNXRuntimeModel(cfg, int8_path, num_threads=1), int8_path


def test_int8_graph_quantizes_the_inner_convolutions_only(quantized):
    *_, path = quantized
    model = onnx.load(path)
    produced_by = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_weights = [
        c.name for c in convs
        if produced_by.get(c.input[1]) is not None
        and produced_by[c.input[1]].op_type == "DequantizeLinear"
        and initializers[produced_by[c.input[1]].input[0]].data_type == TensorProto.INT8
    ]
    float_weights = [c.name for c in convs if c.input[1] in initializers
                     and initializers[c.input[1]].data_type == TensorProto.FLOAT]
    # The first convolution reads the pixels; the heads' predictors write the outputs.
    assert sorted(float_weights) == [
        "/backbone/encoder.0/encoder.0.0/Conv", "/embed_head/Conv",
        "/sem_seg_head/head/predictor/Conv",
    ]
    assert len(int8_weights) == len(convs) - 3 >= 15
    # The metadata the onnxruntime model checks survives quantization.
    keys = {p.key for p in model.metadata_props}
    assert any(k.endswith("input_format") for k in keys)


def test_int8_network_stays_close_to_the_float_one_on_new_scenes(quantized):
    _, float_model, int8_model, _ = quantized
    rng = np.random.default_rng(123)  # other scenes than the calibration's
    images = float_model.preprocess_image(
        [{"image": _chw(render_scene(rng, 128, 128)[0])} for _ in range(4)]
    )
    want_logits, want = float_model.run_network(images)
    got_logits, got = int8_model.run_network(images)
    # Where the float network's class is clear (top-2 margin above 5 % of the logits' range),
    # the INT8 network picks the same class.
    top2 = want_logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * float(want_logits.max() - want_logits.min())
    assert clear.float().mean() > 0.3
    same = want_logits.argmax(1) == got_logits.argmax(1)
    assert same[clear].float().mean() > 0.98
    assert same.float().mean() > 0.9  # 96.5 % when written; the rest are near-ties
    for name in ("offsets", "seed_logits", "embeddings"):
        scale = float(want[name].abs().max())
        error = float((got[name] - want[name]).abs().mean())
        assert error < 0.03 * scale, (name, error, scale)


@pytest.fixture(scope="module")
def export_tool():
    return load_tool("export_model")


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "no_offsets"])
def test_export_tool_int8_writes_a_model_that_runs_like_the_float_one(export_tool, tmp_path,
                                                                        spatial):
    # Without the spatial branch (as the hybrid Cityscapes config) there are no offsets.
    opts = COCO_OPTS + ([] if spatial else [
        "MODEL.EMBED_HEAD.SPATIAL_ON", "False",
        "MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD", "connected_components",
    ])
    weights = _save_weights(_random_model(_cfg(QUICK, opts), seed=6), tmp_path / "model.pth")
    out = tmp_path / "export"
    status = export_tool.main(["--config-file", str(QUICK), "--output", str(out), "--int8",
                               "--calibration-images", "2", *opts, "MODEL.WEIGHTS", str(weights)])
    assert status == 0
    assert (out / "model.onnx").is_file() and (out / "model_int8.onnx").is_file()
    assert not list(out.glob("*.partial"))
    kinds = {n.op_type for n in onnx.load(str(out / "model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    # It runs like model.onnx, from the config written next to it, at the image's size.
    int8_model = ONNXRuntimeModel(_cfg(out / "config.yaml"), str(out / "model_int8.onnx"))
    image = 255 * torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    output = int8_model([{"image": image, "height": 120, "width": 160}])[0]
    assert output["panoptic_seg"][0].shape == (120, 160)


@pytest.fixture
def dataset_with_missing_images():
    name = "maskattn_test_missing_images"
    DatasetCatalog.register(name, lambda: [
        {"file_name": "/nonexistent/image.jpg", "image_id": 0, "height": 64, "width": 64}
    ])
    yield name
    DatasetCatalog.remove(name)


def test_export_tool_int8_rejects_bad_input_and_keeps_the_float_export(
    export_tool, tmp_path, capsys, dataset_with_missing_images
):
    out = tmp_path / "out"
    base = ["--config-file", str(QUICK), "--output", str(out), "--allow-random-weights"]
    assert export_tool.main([*base, "--format", "torchscript", "--int8"]) == 2
    assert "--int8 quantizes an ONNX export" in capsys.readouterr().err
    assert export_tool.main([*base, "--int8", "--calibration-images", "0"]) == 2
    assert "--calibration-images must be >= 1, got 0" in capsys.readouterr().err
    assert export_tool.main([*base, "--calibration-images", "8"]) == 2
    assert "go with --int8" in capsys.readouterr().err
    assert export_tool.main([*base, "--int8", "--calibration-dataset", "no_such_dataset"]) == 2
    assert "--calibration-dataset no_such_dataset: no such registered dataset" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # all refused before anything was written
    # Images that are not on disk: found when calibrating, after the float export. That
    # export stays; an INT8 copy of an earlier export in the folder does not.
    out.mkdir()
    (out / "model_int8.onnx").write_bytes(b"an earlier export")
    assert export_tool.main(
        [*base, "--int8", "--calibration-dataset", dataset_with_missing_images]
    ) == 2
    assert f"--calibration-dataset {dataset_with_missing_images}: cannot read its images" in (
        capsys.readouterr().err
    )
    assert (out / "model.onnx").is_file()
    assert not (out / "model_int8.onnx").exists() and not list(out.glob("*.partial"))


def test_train_net_eval_only_onnx_model_gives_the_pytorch_metrics(export_tool, tmp_path):
    # 150 seeded iterations on the 3 COCO images: metrics away from 0 (mIoU 8.2, pixel accuracy
    # 48.4, box AP 14.3 when written; unseeded runs gave box AP 0-10), so that a wrong input
    # path (channel order, normalisation, resize) shows: swapping the channels fails it. The
    # training run's final evaluation is PyTorch's.
    opts = TINY_MODEL + COCO_OPTS[:4] + ["SOLVER.BASE_LR", "0.01", "SEED", "0"]
    opts[opts.index("SOLVER.MAX_ITER") + 1] = "150"
    trained = tmp_path / "train"
    want = copypaste_metrics(run_train_net("configs/coco_panoptic_128.yaml", opts, trained))
    assert want["sem_seg"]["pACC"] > 20 and want["sem_seg"]["mIoU"] > 3
    out = tmp_path / "export"
    assert export_tool.main(["--config-file", str(REPO / "configs" / "coco_panoptic_128.yaml"),
                             "--output", str(out), *opts,
                             "MODEL.WEIGHTS", str(trained / "model_final.pth")]) == 0
    got = copypaste_metrics(run_train_net(
        str(out / "config.yaml"), ["--eval-only", "--onnx-model", str(out / "model.onnx")],
        tmp_path / "onnx",
    ))
    assert set(got) == set(want) >= {"panoptic_seg", "segm", "sem_seg"}
    for task in want:
        for metric, value in want[task].items():
            # Float32 kernels differ in summation order only; 0.05 points allows a pixel whose
            # two best classes tie to the sixth digit to flip.
            assert got[task][metric] == pytest.approx(value, abs=0.05), (task, metric)
    # Without --eval-only the option is refused (it cannot train an exported network).
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file",
               str(out / "config.yaml"), "--onnx-model", str(out / "model.onnx")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2  # argparse's usage error, before any worker starts
    assert "--onnx-model evaluates an exported network: add --eval-only" in proc.stderr
