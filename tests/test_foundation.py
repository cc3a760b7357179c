"""The environment that scripts/setup.sh builds: imports, evaluators, config. Installed versions
against the pins are checked by the set-up itself (`scripts/setup.sh check`)."""
import importlib
import re
from pathlib import Path

import pytest

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


def test_detectron2_sem_seg_evaluator_gives_hand_computed_numbers(tmp_path, register_dataset):
    """The installed SemSegEvaluator on a real-format input (a label PNG with an ignore pixel)
    gives the numbers computed by hand. The other detectron2 evaluators are scored on real
    data in tests/evaluation/test_evaluators.py."""
    import numpy as np
    import torch
    from detectron2.evaluation import SemSegEvaluator
    from PIL import Image

    ground_truth = np.array([[0, 0, 0, 255], [1, 1, 0, 1]], dtype=np.uint8)
    predicted = torch.tensor([[0, 1, 0, 0], [1, 1, 1, 1]])
    Image.fromarray(ground_truth).save(tmp_path / "label.png")
    record = {"file_name": "image.png", "sem_seg_file_name": str(tmp_path / "label.png")}
    name = register_dataset(
        "maskattn_test_hand_sem_seg", [record], stuff_classes=["a", "b"], ignore_label=255
    )
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    scores = torch.nn.functional.one_hot(predicted, 2).permute(2, 0, 1).float()
    evaluator.process([record], [{"sem_seg": scores}])
    result = evaluator.evaluate()["sem_seg"]
    # 7 labelled pixels; class a: 4 labelled, 2 predicted, 2 right; class b: 3, 5, 3.
    assert result["IoU-a"] == pytest.approx(100 * 2 / 4)
    assert result["IoU-b"] == pytest.approx(100 * 3 / 5)
    assert result["mIoU"] == pytest.approx(55.0)
    assert result["fwIoU"] == pytest.approx(100 * (4 / 7 * 0.5 + 3 / 7 * 0.6))
    assert result["pACC"] == pytest.approx(100 * 5 / 7)
    assert result["mACC"] == pytest.approx(75.0)


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


def _key_documentation(lines, i):
    """The comment of the key set on ``lines[i]``: its inline comment plus the block of comment
    lines right above it (no blank or code line between; section rulers left out)."""
    block = []
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("#"):
        text = lines[j].strip().lstrip("#").strip()
        if not set(text) <= set("- "):
            block.insert(0, text)
        j -= 1
    return " ".join(block + [lines[i].partition("  #")[2].strip()])


def test_every_config_key_is_commented():
    """Each key that add_maskattn_config sets has its own comment, right above it or inline,
    that says something: at least three words besides the key's own name (a comment two
    lines up that documents the previous key, or a bare ``#``, does not count)."""
    lines = (REPO / "maskattn_d2" / "config.py").read_text().splitlines()
    keys, undocumented = 0, []
    for i, line in enumerate(lines):
        match = re.match(r"\s*cfg\.([A-Z0-9_.]+) = (?!CN\(\))", line)
        if not match:
            continue
        keys += 1
        own_name = set(match.group(1).lower().replace(".", "_").split("_"))
        words = re.findall(r"[A-Za-z]{2,}", _key_documentation(lines, i))
        if len([w for w in words if w.lower() not in own_name]) < 3:
            undocumented.append(match.group(1))
    assert keys > 50  # the pattern still finds the keys
    assert not undocumented, f"config keys without a comment of their own: {undocumented}"


def test_setup_script_takes_pins_from_requirements():
    # requirements.txt is the one place with versions: the script must not repeat any.
    text = (REPO / "scripts" / "setup.sh").read_text()
    for name in ("detectron2", "panopticapi", "cityscapesscripts"):
        assert f"pinned_dist {name}" in text
    assert not re.search(r"==\d", text), "scripts/setup.sh hard-codes a version"
