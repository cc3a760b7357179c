"""tools/compare_pq.py: --dataset (generated synthetic data or a registered pair), --models,
the instance methods taken from the postprocessor. The full two-model run is in
tests/test_benchmark.py (slow)."""
import json
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from maskattn_d2.data.datasets import register_synthetic_panoptic
from maskattn_d2.modeling.postprocessing import INSTANCE_METHODS

from tests.tool_modules import load_tool

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"


@pytest.fixture(scope="module")
def compare_pq():
    return load_tool("compare_pq")


@pytest.fixture
def tiny_pair(tmp_path):
    """A registered 4 / 2-image touching-layout pair "test_compare_tiny_{train,val}"."""
    names = register_synthetic_panoptic(
        "test_compare_tiny", str(tmp_path / "tiny"), num_train=4, num_val=2, touching=True
    )
    yield "test_compare_tiny"
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_help_and_arguments(compare_pq, capsys):
    parser = compare_pq.get_parser()
    args = parser.parse_args([])
    assert args.dataset == "synthetic" and args.models == ["maskattn", "pdl"]
    assert parser.parse_args(["--models", "maskattn"]).models == ["maskattn"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--models", "mask2former"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dataset" in help_text and "ignored" in help_text
    # The methods come from the postprocessor, not a local copy.
    assert compare_pq.INSTANCE_METHODS is INSTANCE_METHODS


def test_dataset_names(compare_pq, tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKATTN_D2_CACHE", str(tmp_path / "cache"))
    parse = compare_pq.get_parser().parse_args
    assert compare_pq.dataset_names(parse(["--dataset", tiny_pair])) == [
        f"{tiny_pair}_train", f"{tiny_pair}_val"
    ]
    # A registered pair ignores --num-train / --num-val (not checked against the batch size).
    compare_pq._check_args(parse(["--dataset", tiny_pair, "--num-train", "1"]))
    with pytest.raises(ValueError, match="num-train"):
        compare_pq._check_args(parse(["--num-train", "1"]))
    with pytest.raises(ValueError, match="not registered.*test_compare_tiny"):
        compare_pq.dataset_names(parse(["--dataset", "no_such_dataset"]))
    # Generated data: registered here (nothing generated yet), touching layout on request.
    train, val = compare_pq.dataset_names(
        parse(["--dataset", "synthetic_touching", "--num-train", "4", "--num-val", "2"])
    )
    assert "touching" in train and val.endswith("_val")
    assert "/synthetic_panoptic_touching_v1_seed0_4-2/" in MetadataCatalog.get(val).panoptic_json
    train, _ = compare_pq.dataset_names(parse(["--num-train", "4", "--num-val", "2"]))
    assert "touching" not in train
    assert not (tmp_path / "cache").exists()


def test_config_with_other_classes_is_refused(compare_pq, tiny_pair, register_dataset):
    register_dataset("test_compare_one_class_train", [], stuff_classes=["background", "cell"])
    register_dataset("test_compare_one_class_val", [], stuff_classes=["background", "cell"])
    args = compare_pq.get_parser().parse_args(
        ["--dataset", "test_compare_one_class", "--config-file", str(QUICK)]
    )
    with pytest.raises(ValueError, match="2 classes but 6"):
        compare_pq.run(args, "test_compare_one_class_train", "test_compare_one_class_val")


def test_registered_dataset_maskattn_only(compare_pq, tiny_pair, tmp_path):
    out = tmp_path / "out"
    rows = compare_pq.main(
        ["--dataset", tiny_pair, "--models", "maskattn", "--config-file", str(QUICK),
         "--iters", "2", "--batch-size", "2", "--num-train", "999", "--threads", "1",
         "--output-dir", str(out)]
    )
    assert [r["model"] for r in rows] == [
        f"MaskAttn-UNet ({m.replace('_', ' ')})" for m in INSTANCE_METHODS
    ]
    # One trained model, its instance methods side by side: one training time and size.
    assert len({(r["train_s"], r["params_m"]) for r in rows}) == 1
    assert rows[0]["train_s"] > 0 and rows[0]["params_m"] > 0
    table = (out / "compare_pq.md").read_text()
    for r in rows:  # the table shows each row's own numbers
        assert (f"| {r['model']} | {r['params_m']:.2f} | {r['PQ']:.1f} | {r['PQ_th']:.1f} | "
                f"{r['PQ_st']:.1f} | {r['SQ']:.1f} | {r['RQ']:.1f} |") in table
    title = table.splitlines()[0]
    assert title.startswith(f"# PQ on {tiny_pair} (") and "4 /" in title and ": 2 images" in title
    assert "| PQ | **PQ_th** |" in table and "Panoptic-DeepLab" not in table
    saved = json.loads((out / "compare_pq.json").read_text())
    assert saved["datasets"] == [f"{tiny_pair}_train", f"{tiny_pair}_val"]
    assert saved["args"]["models"] == ["maskattn"] and saved["rows"] == rows


def test_rows_compare_single_pass_inference(compare_pq, tiny_pair, tmp_path):
    """The DSB 256 config evaluates with flips; the comparison runs every row without them."""
    config = REPO / "configs" / "dsb2018_panoptic_256.yaml"
    args = compare_pq.get_parser().parse_args(
        ["--config-file", str(config), "--output-dir", str(tmp_path)]
    )
    cfg = compare_pq.maskattn_config(args, f"{tiny_pair}_train", f"{tiny_pair}_val")
    assert not cfg.TEST.AUG.ENABLED
    assert cfg.INPUT.NETWORK_SIZE == (256, 256)  # the rest of the config is the file's


def _rows(seed, spatial, cc, pq_st=90.0):
    """compare_pq rows of one training: two MaskAttn-UNet methods and a peer."""
    def row(model, pq_th, method=None):
        r = {"model": model, "seed": seed, "PQ": pq_th / 2 + pq_st / 2, "PQ_th": pq_th,
             "PQ_st": pq_st, "SQ": 80.0, "RQ": 90.0, "train_s": 1.0, "params_m": 1.0}
        if method:
            r["instance_method"] = method
        return r
    return [row("MaskAttn-UNet (spatial embedding)", spatial, "spatial_embedding"),
            row("MaskAttn-UNet (connected components)", cc, "connected_components"),
            row("Panoptic-DeepLab (R18, OS16)", 30.0 + seed)]


def test_summary_over_trainings_pairs_each_method_with_its_own_connected_components(compare_pq):
    rows = _rows(0, 50.0, 40.0) + _rows(1, 40.0, 36.0, pq_st=92.0) + _rows(2, 45.0, 33.0)
    summary = compare_pq.summarize_trainings(rows)
    assert [s["model"] for s in summary] == [r["model"] for r in rows[:3]]
    spatial, connected, pdl = summary
    assert spatial["trainings"] == 3
    assert spatial["PQ_th"] == pytest.approx(45.0) and spatial["PQ_th_sd"] == pytest.approx(5.0)
    assert spatial["PQ_st"] == pytest.approx(272 / 3)
    assert (spatial["PQ_th_min"], spatial["PQ_th_max"]) == (40.0, 50.0)
    # Gaps seed by seed (10, 4, 12), not the difference of the means alone.
    assert spatial["gaps"] == [10.0, 4.0, 12.0]
    assert spatial["gap_to_connected_components"] == pytest.approx(26 / 3)
    assert spatial["gap_to_connected_components_sd"] == pytest.approx(
        ((10 - 26 / 3) ** 2 + (4 - 26 / 3) ** 2 + (12 - 26 / 3) ** 2) ** 0.5 / 2 ** 0.5
    )
    assert connected["gap_to_connected_components"] is None
    assert pdl["gap_to_connected_components"] is None and pdl["PQ_th"] == pytest.approx(31.0)
    table = compare_pq.format_summary(summary)
    assert "| MaskAttn-UNet (spatial embedding) | 3 |" in table
    assert "45.0 ± 5.0" in table and "+8.67 ± 4.16 (+10.00, +4.00, +12.00)" in table
    assert "| Panoptic-DeepLab (R18, OS16) | 3 |" in table and "30.0 to 32.0 | - |" in table


@pytest.mark.parametrize("seeds", [["0", "1", "0"], ["4"]])
def test_seeds_must_be_two_or_more_distinct(compare_pq, seeds):
    args = compare_pq.get_parser().parse_args(["--seeds", *seeds])
    with pytest.raises(ValueError, match="--seeds needs two or more distinct seeds"):
        compare_pq._check_args(args)


def test_seeds_train_once_per_seed_and_summarise(compare_pq, tiny_pair, tmp_path):
    out = tmp_path / "out"
    rows = compare_pq.main(
        ["--dataset", tiny_pair, "--models", "maskattn", "--config-file", str(QUICK),
         "--iters", "2", "--batch-size", "2", "--threads", "1", "--seeds", "3", "5",
         "--output-dir", str(out)]
    )
    methods = len(INSTANCE_METHODS)
    assert [r["seed"] for r in rows] == [3] * methods + [5] * methods
    weights = [torch.load(out / f"seed_{s}" / "maskattn_unet" / "model_final.pth")["model"]
               for s in (3, 5)]
    # Another seed is another initialisation: the trainings differ.
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
               if weights[0][k].is_floating_point())
    # Each seed's training is the one --seed gives.
    compare_pq.main(
        ["--dataset", tiny_pair, "--models", "maskattn", "--config-file", str(QUICK),
         "--iters", "2", "--batch-size", "2", "--threads", "1", "--seed", "5",
         "--output-dir", str(tmp_path / "single")]
    )
    single = torch.load(tmp_path / "single" / "maskattn_unet" / "model_final.pth")["model"]
    assert all(torch.equal(single[k], weights[1][k]) for k in single)
    saved = json.loads((out / "compare_pq.json").read_text())
    assert saved["rows"] == rows and saved["summary"] == compare_pq.summarize_trainings(rows)
    assert [s["trainings"] for s in saved["summary"]] == [2] * methods
    table = (out / "compare_pq.md").read_text()
    assert "## Over 2 trainings (seeds 3, 5)" in table and "## Seed 3" in table
    assert "## Seed 5" in table and compare_pq.format_summary(saved["summary"]) in table
