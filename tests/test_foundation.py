"""The environment that scripts/setup.sh builds: imports, versions, config."""
import importlib
import re
from pathlib import Path

import pytest
from importlib.metadata import version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    [
        "torch",
        "torchvision",
        "detectron2",
        "detectron2.engine",
        "detectron2.evaluation",
        "detectron2.projects.panoptic_deeplab",
        "panopticapi.evaluation",
        "panopticapi.utils",
        "pycocotools.mask",
        "fvcore.nn",
        "cv2",
        "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
        "maskattn_d2",
    ],
)
def test_imports(module):
    importlib.import_module(module)


def test_detectron2_evaluators_available():
    from detectron2.evaluation import (
        COCOEvaluator,
        COCOPanopticEvaluator,
        CityscapesInstanceEvaluator,
        CityscapesSemSegEvaluator,
        SemSegEvaluator,
    )

    for cls in (
        COCOEvaluator,
        COCOPanopticEvaluator,
        SemSegEvaluator,
        CityscapesInstanceEvaluator,
        CityscapesSemSegEvaluator,
    ):
        assert callable(cls)


def test_torchvision_ops_match_torch():
    # torch/torchvision mismatches show up as "operator torchvision::nms does not exist".
    import torch
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_config_has_project_keys():
    from detectron2.config import get_cfg

    from maskattn_d2 import add_maskattn_config

    cfg = get_cfg()
    add_maskattn_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "MaskAttnUNet"
    assert cfg.MODEL.MASK_ATTN.MASK_KIND == "gate"
    assert cfg.MODEL.EMBED_HEAD.EMBED_DIM > 0
    # The keys exist, so a YAML that sets them merges; unknown keys are rejected.
    cfg.merge_from_list(["MODEL.MASK_ATTN.NUM_HEADS", "8"])
    assert cfg.MODEL.MASK_ATTN.NUM_HEADS == 8
    with pytest.raises((KeyError, AssertionError), match="MODEL.MASK_ATTN.NOT_A_KEY"):
        cfg.merge_from_list(["MODEL.MASK_ATTN.NOT_A_KEY", "1"])


def test_every_config_key_is_commented():
    """Each key that add_maskattn_config sets has a comment line right above it (or a group
    comment), so `config.py` documents meaning, units and allowed values."""
    lines = (REPO / "maskattn_d2" / "config.py").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if re.match(r"\s*cfg\.[A-Z_.]+ = (?!CN\(\))", line):
            above = [l.strip() for l in lines[max(0, i - 3) : i]]
            if not any(l.startswith("#") for l in above) and "#" not in line:
                undocumented.append(line.strip())
    assert not undocumented, f"config keys without a comment: {undocumented}"


def _pins():
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1)] = m.group(2)
        m = re.match(r"^#\s*(\w+) := ([A-Za-z0-9_.\-]+)==([^\s]+)", line.strip())
        if m:
            pins[m.group(2)] = m.group(3)
    return pins


def test_installed_versions_are_the_pinned_ones():
    pins = _pins()
    assert {"torch", "torchvision", "sal-detectron2", "panopticapi-lite", "cityscapesscripts"} <= set(
        pins
    )
    for dist, pinned in pins.items():
        installed = version(dist)
        # torch wheels carry a local suffix such as "+cu130"
        assert installed.split("+")[0] == pinned, f"{dist}: installed {installed}, pinned {pinned}"


def test_setup_script_takes_pins_from_requirements():
    # requirements.txt is the one place with versions: the script must not repeat any.
    text = (REPO / "scripts" / "setup.sh").read_text()
    for name in ("detectron2", "panopticapi", "cityscapesscripts"):
        assert f"pinned_dist {name}" in text
    assert not re.search(r"==\d", text), "scripts/setup.sh hard-codes a version"
