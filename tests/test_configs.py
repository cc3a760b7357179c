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
