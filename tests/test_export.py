"""Export of the network (ONNX, TorchScript) and the onnxruntime model against PyTorch.

The exported files must give the PyTorch model's outputs: network outputs within float
tolerance at batch sizes 1 and 3, and after the shared post-processing identical panoptic ids
on the COCO sample and on synthetic scenes.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from torch import nn

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data.datasets.synthetic import render_scene

from .tool_modules import load_tool

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from maskattn_d2.export import (  # noqa: E402  (after the optional-dependency skips)
    ExportableNetwork,
    ONNXRuntimeModel,
    ONNXRuntimePredictor,
    export_onnx,
    network_metadata,
    read_onnx_metadata,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "synthetic_panoptic_128.yaml"
QUICK = REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"
# The 3-image COCO sample: the repository's copy, else the shared data folder.
COCO_IMAGE_DIRS = [
    REPO / "datasets" / "coco_panoptic_val2017_mini" / "val2017",
    Path("/work/shared/data/coco_panoptic_val2017_mini/val2017"),
]
OUTPUTS = ["sem_logits_nhwc", "embeddings", "offsets", "seed_logits"]


def _cfg(path: Path, opts=()):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _random_model(cfg, seed: int = 0) -> nn.Module:
    """A model with random weights and random BatchNorm statistics / affine parameters, so
    that folding BN into the convolutions is not the identity."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))
    return model


def _save_weights(model: nn.Module, path: Path) -> Path:
    """``model``'s parameters as a checkpoint that MODEL.WEIGHTS loads."""
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, PyTorch model, onnxruntime model, ONNX path) of the synthetic config's model."""
    cfg = _cfg(SMALL)
    model = _random_model(cfg)
    network = ExportableNetwork(model)
    path = str(tmp_path_factory.mktemp("export") / "model.onnx")
    names = export_onnx(network, path, metadata=network_metadata(cfg, network))
    assert names == OUTPUTS
    return cfg, model, ONNXRuntimeModel(cfg, path, num_threads=1), path


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


def _assert_same_predictions(expected, actual):
    """Identical panoptic ids and segments, same instances, semantic probabilities close."""
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        ids, segments = want["panoptic_seg"]
        got_ids, got_segments = got["panoptic_seg"]
        assert torch.equal(got_ids, ids)
        assert len(segments) > 1  # a non-trivial segmentation
        assert [{k: v for k, v in s.items() if k != "score"} for s in got_segments] == [
            {k: v for k, v in s.items() if k != "score"} for s in segments
        ]
        np.testing.assert_allclose(
            [g.get("score", 0.0) for g in got_segments],
            [s.get("score", 0.0) for s in segments],
            atol=1e-5,
        )
        assert torch.equal(got["instances"].pred_masks, want["instances"].pred_masks)
        assert torch.equal(got["instances"].pred_classes, want["instances"].pred_classes)
        torch.testing.assert_close(got["sem_seg"], want["sem_seg"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_network_outputs_match_pytorch(exported, batch_size):
    cfg, model, ort_model, _ = exported
    generator = torch.Generator().manual_seed(batch_size)
    images = 255 * torch.rand(batch_size, 3, *cfg.INPUT.NETWORK_SIZE, generator=generator)
    inputs = [{"image": image} for image in images]
    sem_logits, head_outputs = model.inference(inputs, do_postprocess=False)
    got_logits, got_outputs = ort_model.inference(inputs, do_postprocess=False)
    assert list(got_outputs) == list(head_outputs) == OUTPUTS[1:]
    for got, want in [(got_logits, sem_logits)] + [
        (got_outputs[k], head_outputs[k]) for k in head_outputs
    ]:
        assert got.shape == want.shape and got.shape[0] == batch_size
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_onnxruntime_model_runs_the_configs_flips_like_pytorch(exported):
    cfg, model, _, path = exported
    flips = _cfg(SMALL, ["TEST.AUG.ENABLED", "True", "TEST.AUG.VERTICAL_FLIP", "True"])
    flipped_model = build_model(flips).eval()
    flipped_model.load_state_dict(model.state_dict())
    ort_model = ONNXRuntimeModel(flips, path, num_threads=1)
    assert ort_model.test_flips == flipped_model.test_flips == ("horizontal", "vertical", "both")
    generator = torch.Generator().manual_seed(5)
    inputs = [{"image": 255 * torch.rand(3, *cfg.INPUT.NETWORK_SIZE, generator=generator)}
              for _ in range(2)]
    want_logits, want_outputs = flipped_model.inference(inputs, do_postprocess=False)
    got_logits, got_outputs = ort_model.inference(inputs, do_postprocess=False)
    plain_logits, _ = model.inference(inputs, do_postprocess=False)
    assert not torch.allclose(want_logits, plain_logits, atol=1e-3)  # the flips change them
    for got, want in [(got_logits, want_logits)] + [
        (got_outputs[k], want_outputs[k]) for k in want_outputs
    ]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_onnx_graph_has_dynamic_batch_folded_batchnorm_and_metadata(exported):
    cfg, model, ort_model, path = exported
    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    assert "BatchNormalization" not in ops
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # The embedding head runs its three 1x1 predictors (embeddings, offsets, seeds) as one conv.
    assert model.embed_head.spatial
    assert ops.count("Conv") == convs - 2
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, *cfg.INPUT.NETWORK_SIZE]
    metadata = read_onnx_metadata(path)
    assert metadata["network_size"] == "128,128" and metadata["num_classes"] == "6"
    assert metadata["input_format"] == "RGB" and metadata["outputs"] == ",".join(OUTPUTS)


def _coco_images():
    for folder in COCO_IMAGE_DIRS:
        images = sorted(folder.glob("*.jpg"))
        if images:
            return images
    pytest.skip("the COCO sample images are not available")


def test_panoptic_ids_identical_on_coco_sample(exported):
    cfg, model, ort_model, _ = exported
    inputs = []
    for path in _coco_images():
        image = read_image(str(path), format=cfg.INPUT.FORMAT)
        inputs.append({"image": _chw(image), "height": 240, "width": 320})
    assert len(inputs) == 3
    with torch.no_grad():
        expected = model(inputs)
    actual = ort_model(inputs)
    assert expected[0]["panoptic_seg"][0].shape == (240, 320)
    _assert_same_predictions(expected, actual)


def test_panoptic_ids_identical_on_synthetic_scenes(exported):
    cfg, model, ort_model, _ = exported
    rng = np.random.default_rng(0)
    # Network size, and a size the model resizes from (bilinear, in both backends).
    inputs = [{"image": _chw(render_scene(rng, 128, 128)[0])} for _ in range(2)]
    inputs += [{"image": _chw(render_scene(rng, 96, 160)[0])} for _ in range(2)]
    with torch.no_grad():
        expected = model(inputs)
    _assert_same_predictions(expected, ort_model(inputs))


def test_onnxruntime_predictor_takes_bgr_images_like_default_predictor(exported):
    cfg, model, _, path = exported
    image = render_scene(np.random.default_rng(1), 100, 150)[0][:, :, ::-1]  # BGR
    predictor = ONNXRuntimePredictor(cfg, path, num_threads=1)
    got = predictor(np.ascontiguousarray(image))
    rgb = torch.as_tensor(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        want = model([{"image": rgb.float(), "height": 100, "width": 150}])[0]
    # ResizeShortestEdge to 128 first (as DefaultPredictor), then the network size: ids match
    # up to the bilinear pre-resize, so compare the class layout, not every pixel.
    assert got["panoptic_seg"][0].shape == (100, 150)
    same = (got["sem_seg"].argmax(0) == want["sem_seg"].argmax(0)).float().mean()
    assert same > 0.9


def test_onnxruntime_model_rejects_a_file_of_another_config(exported, tmp_path):
    cfg, _, _, path = exported
    other = _cfg(SMALL, ["DATASETS.TRAIN", "('coco_2017_val_panoptic',)",
                         "DATASETS.TEST", "('coco_2017_val_panoptic',)",
                         "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133"])
    with pytest.raises(ValueError, match="133") as info:
        ONNXRuntimeModel(other, path)
    assert "does not match the config" in str(info.value)
    with pytest.raises(ValueError, match="NETWORK_SIZE"):
        ONNXRuntimeModel(_cfg(SMALL, ["INPUT.NETWORK_SIZE", "(64, 64)"]), path)
    with pytest.raises(FileNotFoundError, match="export_model.py"):
        ONNXRuntimeModel(cfg, str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        ONNXRuntimeModel(cfg, str(tmp_path / "junk.onnx"))


def test_onnxruntime_model_asks_to_export_again_a_file_with_planar_logits(exported, tmp_path):
    # Files written before the logits became channels last name them "sem_logits".
    onnx = pytest.importorskip("onnx")
    cfg, _, _, path = exported
    model = onnx.load(path)
    old_name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["sem_logits" if name == old_name else name for name in node.output]
    model.graph.output[0].name = "sem_logits"
    legacy = str(tmp_path / "legacy.onnx")
    onnx.save(model, legacy)
    with pytest.raises(ValueError, match="export it again"):
        ONNXRuntimeModel(cfg, legacy)


# --------------------------------------------------------------------------- the tool
@pytest.fixture(scope="module")
def export_tool():
    return load_tool("export_model")


def test_export_tool_onnx_with_weights_end_to_end(export_tool, tmp_path):
    cfg = _cfg(QUICK)
    model = _random_model(cfg, seed=3)
    weights = _save_weights(model, tmp_path / "model.pth")
    out = tmp_path / "export"
    status = export_tool.main(["--config-file", str(QUICK), "--output", str(out),
                               "MODEL.WEIGHTS", str(weights)])
    assert status == 0
    assert (out / "model.onnx").is_file() and (out / "config.yaml").is_file()
    # The written config drives the onnxruntime model; it runs the checkpoint's network.
    ort_model = ONNXRuntimeModel(_cfg(out / "config.yaml"), str(out / "model.onnx"))
    image = 255 * torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    want, _ = model.inference([{"image": image}], do_postprocess=False)
    got, _ = ort_model.inference([{"image": image}], do_postprocess=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_export_tool_torchscript_folds_batchnorm(export_tool, tmp_path):
    cfg = _cfg(QUICK)
    model = _random_model(cfg, seed=4)
    weights = _save_weights(model, tmp_path / "model.pth")
    out = tmp_path / "ts"
    status = export_tool.main(["--config-file", str(QUICK), "--format", "torchscript",
                               "--output", str(out), "MODEL.WEIGHTS", str(weights)])
    assert status == 0
    module = torch.jit.load(str(out / "model.ts"))
    images = 255 * torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = module(images)
        want = ExportableNetwork(model)(images)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    assert "aten::batch_norm" not in kinds and "aten::_convolution" in kinds


def test_export_tool_rejects_bad_input(export_tool, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.pth")
    assert export_tool.main(["--config-file", str(QUICK), "--output", out,
                             "MODEL.WEIGHTS", missing]) == 2
    assert f"MODEL.WEIGHTS: no such file: {missing}" in capsys.readouterr().err
    assert export_tool.main(["--config-file", str(QUICK), "--output", out]) == 2
    assert "No weights" in capsys.readouterr().err
    assert export_tool.main(["--config-file", str(tmp_path / "none.yaml"), "--output", out,
                             "--allow-random-weights"]) == 2
    assert "--config-file: no such file" in capsys.readouterr().err
    assert export_tool.main(["--config-file", str(QUICK), "--output", out,
                             "--allow-random-weights", "MODEL.NO_SUCH_KEY", "1"]) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        export_tool.main(["--config-file", str(QUICK), "--format", "tflite", "--output", out])
    assert info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the demo
# The quick config with the COCO sample's 133 classes (as tests/test_demo.py).
COCO_OPTS = [
    "DATASETS.TRAIN", "('coco_mini_panoptic_val',)",
    "DATASETS.TEST", "('coco_mini_panoptic_val',)",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133",
]


def test_demo_onnxruntime_backend_draws_what_the_torch_backend_draws(tmp_path):
    import cv2

    spec = importlib.util.spec_from_file_location("maskattn_demo_export", REPO / "demo" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    image = _coco_images()[0]
    cfg = _cfg(QUICK, COCO_OPTS)
    model = _random_model(cfg, seed=5)
    weights = _save_weights(model, tmp_path / "model.pth")
    network = ExportableNetwork(model)
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(network, onnx_path, metadata=network_metadata(cfg, network))
    common = ["--config-file", str(QUICK), "--input", str(image), "--show-embeddings",
              "--show-gates", "--min-size", "0"]
    opts = [*COCO_OPTS, "MODEL.MASK_ATTN_POSTPROCESS.MAX_INSTANCES", "8"]  # quicker drawing
    np.random.seed(0)  # the Visualizer jitters instance colours with numpy's global generator
    assert demo.main([*common, "--output", str(tmp_path / "torch"), "--weights", str(weights),
                      "--opts", *opts]) == 0
    np.random.seed(0)
    assert demo.main([*common, "--output", str(tmp_path / "ort"), "--backend", "onnxruntime",
                      "--onnx-model", onnx_path, "--opts", *opts]) == 0
    stem = image.stem
    for kind in ("panoptic", "instances", "semantic"):
        want = cv2.imread(str(tmp_path / "torch" / f"{stem}_{kind}.png"))
        got = cv2.imread(str(tmp_path / "ort" / f"{stem}_{kind}.png"))
        assert got is not None and np.array_equal(got, want), kind
    want = cv2.imread(str(tmp_path / "torch" / f"{stem}_embeddings.png")).astype(int)
    got = cv2.imread(str(tmp_path / "ort" / f"{stem}_embeddings.png")).astype(int)
    assert np.abs(got - want).mean() < 1.0  # PCA of embeddings equal within float noise
    assert (tmp_path / "torch" / f"{stem}_gates.png").is_file()
    assert not (tmp_path / "ort" / f"{stem}_gates.png").exists()  # not exported
    # --onnx-model without --backend onnxruntime (and the reverse) is refused.
    assert demo.main([*common, "--output", str(tmp_path / "x"), "--onnx-model", onnx_path,
                      "--opts", *COCO_OPTS]) == 2
    assert demo.main([*common, "--output", str(tmp_path / "x"), "--backend", "onnxruntime",
                      "--opts", *COCO_OPTS]) == 2
    assert demo.main([*common, "--output", str(tmp_path / "x"), "--backend", "onnxruntime",
                      "--onnx-model", str(tmp_path / "none.onnx"), "--opts", *COCO_OPTS]) == 2


def test_per_image_normalization_exports_and_is_checked(tmp_path):
    """MODEL.PER_IMAGE_NORMALIZATION: the exported network normalises each image by its own
    statistics as the PyTorch model does (a dimmed copy of an image gives the same outputs in
    both), and a file exported without it is refused for a config with it."""
    cfg = _cfg(SMALL, ["MODEL.PER_IMAGE_NORMALIZATION", "True"])
    model = _random_model(cfg)
    network = ExportableNetwork(model)
    path = str(tmp_path / "per_image.onnx")
    export_onnx(network, path, metadata=network_metadata(cfg, network))
    assert read_onnx_metadata(path)["per_image_normalization"] == "True"
    ort_model = ONNXRuntimeModel(cfg, path, num_threads=1)
    image = _chw(render_scene(np.random.default_rng(2), 96, 160)[0])
    inputs = [{"image": image}, {"image": 0.25 * image + 10}]
    with torch.no_grad():
        expected = model(inputs)
    _assert_same_predictions(expected, ort_model(inputs))
    # Brightness and contrast do not change what the model sees (up to float rounding).
    same = expected[0]["sem_seg"].argmax(0) == expected[1]["sem_seg"].argmax(0)
    assert float(same.float().mean()) > 0.995
    with pytest.raises(ValueError, match="PER_IMAGE_NORMALIZATION"):
        ONNXRuntimeModel(_cfg(SMALL), path)
    # A file exported before the key existed normalised with PIXEL_MEAN / PIXEL_STD.
    older = onnx.load(path)
    kept = [p for p in older.metadata_props if not p.key.endswith("per_image_normalization")]
    del older.metadata_props[:]
    older.metadata_props.extend(kept)
    onnx.save(older, str(tmp_path / "older.onnx"))
    with pytest.raises(ValueError, match="PER_IMAGE_NORMALIZATION"):
        ONNXRuntimeModel(cfg, str(tmp_path / "older.onnx"))


def test_embedding_head_on_two_decoder_outputs_exports(tmp_path):
    """With EMBED_HEAD.IN_FEATURES [dec1, dec2] (the DSB 128 config) the backbone returns both
    features and the exported network gives the PyTorch model's predictions."""
    two = ["MODEL.MASK_ATTN_UNET.OUT_FEATURES", '["dec1", "dec2"]']
    cfg = _cfg(SMALL, two + ["MODEL.EMBED_HEAD.IN_FEATURES", '["dec1", "dec2"]'])
    model = _random_model(cfg)
    assert model.embed_head.in_features == ["dec1", "dec2"]
    _assert_exported_predicts_as_pytorch(
        cfg, model, ExportableNetwork(model), str(tmp_path / "two_features.onnx"), scene_seed=3
    )


def _assert_exported_predicts_as_pytorch(cfg, model, network, path, scene_seed):
    """Export ``network`` to ``path``; ONNX Runtime's predictions on a rendered scene are
    the PyTorch model's."""
    export_onnx(network, path, metadata=network_metadata(cfg, network))
    image = _chw(render_scene(np.random.default_rng(scene_seed), 96, 160)[0])
    with torch.no_grad():
        expected = model([{"image": image}])
    ort_model = ONNXRuntimeModel(cfg, path, num_threads=1)
    _assert_same_predictions(expected, ort_model([{"image": image}]))


def test_learned_bandwidth_exports_and_groups_as_in_pytorch(tmp_path):
    """With EMBED_HEAD.OFFSET_LOSS lovasz the network has a "log_bandwidth" output; the
    exported one feeds SEED_ASSIGNMENT bandwidth as the PyTorch model does."""
    cfg = _cfg(
        SMALL,
        [
            "MODEL.EMBED_HEAD.OFFSET_LOSS", "lovasz",
            "MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT", "bandwidth",
        ],
    )
    model = _random_model(cfg)
    network = ExportableNetwork(model)
    assert network.output_names[-1] == "log_bandwidth"
    _assert_exported_predicts_as_pytorch(
        cfg, model, network, str(tmp_path / "bandwidth.onnx"), scene_seed=4
    )
