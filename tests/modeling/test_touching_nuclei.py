"""A model that overfits the three real DSB 2018 fixture images separates touching nuclei
that connected components of its own semantic map merge.

At 128x128 the fixture's 23 nuclei form only 12 connected components (touching nuclei), so
connected components can match at most 12 nuclei; the spatial embeddings must match far more
from the same trained weights.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from maskattn_d2 import add_maskattn_config

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "dsb2018_mini" / "stage1_train"
NUCLEUS, BACKGROUND = 0, 1  # contiguous ids of configs/dsb2018_panoptic_128.yaml


def _fixture_inputs():
    """Training inputs of the fixture images: image, semantic and instance-id targets."""
    inputs = []
    for folder in sorted(FIXTURE.iterdir()):
        image = np.asarray(Image.open(next((folder / "images").glob("*.png"))).convert("RGB"))
        instance_ids = np.zeros(image.shape[:2], dtype=np.int64)
        for k, path in enumerate(sorted((folder / "masks").glob("*.png")), start=1):
            instance_ids[np.asarray(Image.open(path)) > 0] = k
        sem = np.where(instance_ids > 0, NUCLEUS, BACKGROUND)
        inputs.append(
            {
                "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
                "sem_seg": torch.from_numpy(sem),
                "instance_ids": torch.from_numpy(instance_ids),
            }
        )
    return inputs


def _matched_nuclei(pred_ids: torch.Tensor, gt_ids: torch.Tensor) -> int:
    """Ground-truth nuclei matched by a predicted segment with IoU > 0.5 (one-to-one)."""
    pred, gt = pred_ids.flatten().long(), gt_ids.flatten().long()
    num_pred, num_gt = int(pred.max()) + 1, int(gt.max()) + 1
    joint = torch.bincount(gt * num_pred + pred, minlength=num_gt * num_pred)
    joint = joint.view(num_gt, num_pred)[1:, 1:].float()  # drop background / void
    gt_area = torch.bincount(gt, minlength=num_gt)[1:].float()
    pred_area = torch.bincount(pred, minlength=num_pred)[1:].float()
    union = gt_area[:, None] + pred_area[None, :] - joint
    return int((joint / union.clamp(min=1) > 0.5).sum())


def test_overfit_model_separates_touching_nuclei_that_connected_components_merge():
    torch.manual_seed(0)
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "dsb2018_panoptic_128.yaml"))
    cfg.MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_METHOD = "spatial_embedding"
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs = _fixture_inputs()
    with EventStorage():
        for _ in range(150):
            loss = sum(model(inputs).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    model.eval()
    size = tuple(cfg.INPUT.NETWORK_SIZE)
    eval_inputs = [{"image": x["image"], "height": size[0], "width": size[1]} for x in inputs]
    gt = [model._stack_target([x], "instance_ids")[0] for x in inputs]
    matched = {}
    for method in ("spatial_embedding", "connected_components"):
        model.postprocessor.instance_method = method
        outputs = model(eval_inputs)
        matched[method] = sum(
            _matched_nuclei(out["panoptic_seg"][0], ids) for out, ids in zip(outputs, gt)
        )
    num_nuclei = sum(int(ids.max()) for ids in gt)
    assert num_nuclei == 23
    # Connected components cannot exceed the 12 components; the embeddings split them.
    assert matched["connected_components"] <= 12
    assert matched["spatial_embedding"] >= matched["connected_components"] + 6, matched
