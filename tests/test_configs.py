"""Every YAML under configs/ loads and builds its model on CPU."""
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from maskattn_d2 import add_maskattn_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("Base-"))


def load_config(path: Path):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_are_found():
    # Guards against a glob that silently matches nothing.
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert {
        "coco_panoptic_128.yaml",
        "cityscapes_panoptic_128.yaml",
        "ade20k_panoptic_128.yaml",
        "cityscapes_semantic_hybrid_512x1024.yaml",
        "synthetic_panoptic_128.yaml",
        "variants/unet_128.yaml",
        "variants/unet_hybrid_128.yaml",
        "variants/maskattn_unet_128.yaml",
        "variants/maskattn_unet_hybrid_128.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_builds_a_model_that_runs(path):
    cfg = load_config(path)
    model = build_model(cfg).eval()
    # A small odd-sized image: the model resizes it to the network size and back.
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 37, "width": 53}])
    assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 37, 53)
    if cfg.MODEL.MASK_ATTN_POSTPROCESS.PANOPTIC_ON:
        assert out["panoptic_seg"][0].shape == (37, 53)


def _flat(node, prefix=""):
    """A config as {"A.B.C": value}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_dsb_256_config_is_the_128_recipe_at_another_resolution():
    """The 256 config inherits the 128 recipe; only resolution- and budget-bound keys differ, so
    a recipe change made at 128 cannot leave the 256 config behind."""
    low = _flat(load_config(CONFIG_DIR / "dsb2018_panoptic_128.yaml"))
    high = _flat(load_config(CONFIG_DIR / "dsb2018_panoptic_256.yaml"))
    differing = {key for key in low if low[key] != high[key]}
    assert differing == {
        "INPUT.NETWORK_SIZE",
        "INPUT.MIN_SIZE_TEST",
        "INPUT.MIN_INSTANCE_PIXELS",
        # Pinned to bilinear until a 256 training with the 128 config's Lanczos replaces the
        # figures of record (session 19's bilinear training).
        "INPUT.RESIZE_INTERPOLATION",
        "MODEL.MASK_ATTN_POSTPROCESS.MIN_INSTANCE_AREA",
        "SOLVER.MAX_ITER",
        "TEST.AUG.ENABLED",
        "TEST.AUG.VERTICAL_FLIP",
        "TEST.PAPER_PROTOCOL",
        "OUTPUT_DIR",
    }
    assert high["INPUT.NETWORK_SIZE"] == (256, 256) and high["SOLVER.MAX_ITER"] == 800
