"""tools/gpu_check.py: refuses without CUDA, its commands, its dataset and its report parsing."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data.datasets import SYNTHETIC_CATEGORIES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    """The script imported as train_net's --register-module imports it (registers its dataset)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    if module.DATASET_NAME in DatasetCatalog.list():
        DatasetCatalog.remove(module.DATASET_NAME)
        MetadataCatalog.remove(module.DATASET_NAME)


def test_refuses_without_cuda(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output-dir", str(tmp_path / "out")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was run


def test_commands(gpu_check, capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    commands = gpu_check.step_commands(gpu_check.get_parser().parse_args([]))
    assert list(commands) == ["cuda_tests", "training", "benchmark"]
    assert all(name + ":" in printed for name in commands)
    tests, train, bench = commands.values()
    assert tests[tests.index("-k") + 1] == "cuda"
    assert train[train.index("--config-file") + 1].endswith("configs/coco_panoptic_128.yaml")
    assert f"('{gpu_check.DATASET_NAME}',)" in train
    assert train[train.index("SOLVER.AMP.ENABLED") + 1] == "True"
    assert {"--devices", "cuda", "--bf16"} <= set(bench)


def test_dataset_has_coco_class_counts_and_builds_the_coco_model(gpu_check):
    meta = MetadataCatalog.get(gpu_check.DATASET_NAME)
    assert len(meta.thing_classes) == 80 and len(meta.stuff_classes) == 133
    # The synthetic classes keep their place among the things and among the stuff.
    names = [c["name"] for c in SYNTHETIC_CATEGORIES]
    assert [meta.stuff_classes.index(n) for n in names] == [0, 1, 2, 80, 81, 82]
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "coco_panoptic_128.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", f"('{gpu_check.DATASET_NAME}',)", "MODEL.DEVICE",
                         "cpu", "MODEL.MASK_ATTN_UNET.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM",
                         "BN", "MODEL.EMBED_HEAD.NORM", "BN"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(10.71e6, rel=0.01)


def test_report_parsing(gpu_check, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    rows = [{"iteration": 4, "data_time": 0.01}] + [
        {"iteration": i, "time": t, "data_time": 0.02} for i, t in ((9, 0.1), (14, 0.3), (19, 0.2))
    ]
    (train / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    speed = gpu_check.training_speed(train, batch=64)
    assert speed["images_per_s"] == pytest.approx(320.0) and speed["data_time_s"] == 0.02
    assert gpu_check.training_speed(tmp_path / "none", batch=64) is None

    bench = tmp_path / "benchmark.json"
    bench.write_text(json.dumps({"results": [
        {"name": "m", "device": "cuda", "status": "ok", "train": {"images_per_s": 1500.0},
         "latency": {"64": {"network_ms": 30.0, "postprocess_ms": 2.0},
                     "1": {"network_ms": 1.5, "postprocess_ms": 0.5}}},
        {"name": "peer", "device": "cuda", "status": "unavailable: no transformers"},
    ]}))
    lines = gpu_check.benchmark_speeds(bench)
    assert lines[0] == ("  m (cuda): inference batch 1: 500 img/s, batch 64: 2,000 img/s; "
                        "training 1,500 img/s")
    assert "unavailable" in lines[1]

    log = tmp_path / "tests.log"
    log.write_text(
        "ss\nSKIPPED [2] tests/x.py:3: needs CUDA\n===== 2 skipped, 9 deselected in 1.0s ==\n"
    )
    assert gpu_check.pytest_summary(str(log)) == "2 skipped, 9 deselected in 1.0s"


@pytest.mark.slow
def test_cpu_run_of_every_step(gpu_check, tmp_path, capsys):
    """The tiny CPU version of the three steps runs end to end and reports both speeds."""
    assert gpu_check.main(["--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "- CUDA tests: " in out and "skipped" in out
    assert "- training, coco_panoptic_128.yaml (133 classes" in out and " img/s (" in out
    assert "coco_panoptic_128 (cpu): inference batch 1: " in out
