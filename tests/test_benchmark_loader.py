"""tools/benchmark.py --loader: the training mapper's images/s on originals and low-res copies."""
import importlib.util
import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog

from maskattn_d2.data.datasets import register_coco_mini_panoptic

from .panoptic_factory import unregister

REPO = Path(__file__).resolve().parents[1]
NAME = "maskattn_test_loader_coco"


@pytest.fixture
def benchmark():
    spec = importlib.util.spec_from_file_location(
        "maskattn_tool_benchmark_loader", REPO / "tools" / "benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def coco_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    register_coco_mini_panoptic(NAME)
    yield NAME
    unregister([n for n in (NAME, f"{NAME}_lowres160") if n in DatasetCatalog.list()])


def test_loader_table_compares_originals_with_the_copy(benchmark, coco_sample, tmp_path, capsys):
    out = tmp_path / "bench"
    results = benchmark.main(
        ["--loader", "--loader-datasets", coco_sample, "--loader-images", "6",
         "--output-dir", str(out)]
    )
    assert len(results) == 1
    r = results[0]
    assert r["distinct_images"] == 3
    assert r["median_size"] == {"original": [427, 640], "lowres": [160, 240]}
    for key in ("images_per_s", "images_per_cpu_s"):
        assert set(r[key]) == {"original", "lowres"} and min(r[key].values()) > 0
    speeds = r["images_per_s"]
    assert r["speedup"] == pytest.approx(speeds["lowres"] / speeds["original"])
    assert (tmp_path / "cache" / "lowres" / f"{coco_sample}_lowres160").is_dir()  # written once
    printed = capsys.readouterr().out
    assert f"| {coco_sample} | 3 | 427x640 |" in printed and "short side 160 | 160x240" in printed
    assert json.loads((out / "loader.json").read_text())[0]["dataset"] == coco_sample
    assert (out / "loader.md").read_text().strip() in printed


def test_loader_rejects_bad_arguments(benchmark, tmp_path):
    with pytest.raises(ValueError, match="--loader-images"):
        benchmark.main(["--loader", "--loader-images", "0", "--output-dir", str(tmp_path)])
