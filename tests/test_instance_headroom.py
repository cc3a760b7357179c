"""tools/instance_headroom.py: ground-truth seeds / offsets / semantics substituted for the
network's, scored by detectron2's panoptic evaluator."""
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.data.datasets import register_synthetic_panoptic
from maskattn_d2.modeling.losses import instance_depth

from tests.tool_modules import load_tool

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"


@pytest.fixture(scope="module")
def headroom():
    return load_tool("instance_headroom")


def test_oracle_seeds_one_per_instance_at_its_deepest_pixel_nearest_the_centroid(headroom):
    ids = torch.zeros(9, 12, dtype=torch.long)
    ids[1:6, 1:6] = 1  # 5x5 square: one deepest pixel, its centre (3, 3)
    ids[1:5, 6:11] = 2  # 4x5 touching rectangle: a ridge of deepest pixels
    ids[7, 2] = 3  # a single pixel
    seeds = headroom.oracle_seed_logits(ids)[0]
    chosen = torch.nonzero(seeds > 0).tolist()
    assert len(chosen) == 3
    depth = instance_depth(ids[None])[0]
    assert [3, 3] in chosen and [7, 2] in chosen
    ridge = [p for p in chosen if ids[p[0], p[1]] == 2]
    assert len(ridge) == 1 and depth[ridge[0][0], ridge[0][1]] == 1.0
    # Centroid of instance 2 is (2.5, 8): the ridge pixels (2, 8) and (3, 8) tie; raster first.
    assert ridge[0] == [2, 8]
    assert torch.all(seeds[ids == 0] < 0)


def test_oracle_seed_maps_are_the_training_targets(headroom):
    ids = torch.zeros(6, 9, dtype=torch.long)
    ids[1:5, 0:4] = 1  # 4x4 square
    ids[1:3, 4:6] = 2  # 2x2 square touching it: all rim, a flat depth of 1
    depth = torch.sigmoid(headroom.oracle_seed_map_logits(ids, "depth", 0.5))[0]
    assert torch.allclose(depth, instance_depth(ids[None])[0].clamp(1e-4, 1 - 1e-4))
    assert torch.unique(depth[ids == 2]).numel() == 1  # a tie: nothing to climb inside it
    gauss = torch.sigmoid(headroom.oracle_seed_map_logits(ids, "gaussian", 0.5))[0]
    # sigma = max(1, 0.5 * sqrt(16 / pi)) = 1.128 px; the centroid (2.5, 1.5) lies between
    # four pixels, each 0.5 * sqrt(2) px from it.
    expected = math.exp(-0.5 / (2 * (0.5 * math.sqrt(16 / math.pi)) ** 2))
    assert gauss[2, 1].item() == pytest.approx(expected, rel=1e-5)
    assert gauss[ids == 1].max().item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(gauss[ids == 0] < 1e-3)


def test_ground_truth_seed_rows_assign_by_offsets(headroom):
    """Ground-truth seeds are points on a flat map: with a seed_ascent config their rows still
    assign by offsets, the model's own rows climb."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT = "seed_ascent"
    for row in headroom.ROWS:
        post = headroom.row_config(cfg, row).MODEL.MASK_ATTN_POSTPROCESS
        assert post.INSTANCE_METHOD == row[2]
        assert post.SEED_ASSIGNMENT == ("offsets" if row[3] == "points" else "seed_ascent")
    assert cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT == "seed_ascent"  # not modified


def test_ground_truth_rows_on_touching_scenes(headroom, tmp_path):
    names = register_synthetic_panoptic(
        "test_headroom", str(tmp_path / "data"), num_train=1, num_val=4, touching=True
    )
    try:
        rows = headroom.main(
            ["--config-file", str(QUICK), "--dataset", "test_headroom_val",
             "--allow-random-weights", "--threads", "1", "--output-dir", str(tmp_path / "out"),
             "INPUT.NETWORK_SIZE", "(128, 128)"]
        )
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    table = {(r["semantics"], r["instances"]): r for r in rows}
    assert len(table) == len(headroom.ROWS) == 14
    gt = {k[1]: r for k, r in table.items() if k[0] == "ground truth"}
    # Ground-truth semantics: stuff right but for what the resize to the network size loses
    # (images are 128-160 x 128-192) and the thing boundaries at the original size.
    assert all(r["PQ_st"] > 98 for r in gt.values())
    # Touching same-class objects: connected components merge them; ground-truth seeds and
    # offsets through the postprocessor separate them; the random model's seeds do not.
    assert gt["connected components"]["PQ_th"] < 40
    assert gt["spatial embedding, gt seeds and offsets"]["PQ_th"] > 85
    assert gt["spatial embedding"]["PQ_th"] < 40
    # The seed maps the two SEED_TARGETs teach, as if learned perfectly: the Gaussian's single
    # peak per object separates them; depth dips between touching objects too, but its flat
    # ridges hold several seeds that this config's offsets (random here) cannot merge.
    assert gt["spatial embedding, gt seed map (gaussian)"]["PQ_th"] > 85
    assert gt["connected components"]["PQ_th"] + 30 < gt[
        "spatial embedding, gt seed map (depth)"]["PQ_th"] < 80
    assert (tmp_path / "out" / "instance_headroom.md").read_text().count("\n| ") == 15


def test_refuses_a_model_without_spatial_embeddings_and_random_weights(headroom, tmp_path):
    common = ["--config-file", str(QUICK), "--output-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="MODEL.EMBED_HEAD.SPATIAL_ON is False"):
        headroom.main(common + ["--allow-random-weights", "MODEL.EMBED_HEAD.SPATIAL_ON", "False"])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        headroom.main(common)  # no weights: nothing to analyse
