"""The whole model on unusual data: images without annotations or without things train and
evaluate; outputs come back at extreme original sizes (1x1, 2400x3200)."""
import logging
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from maskattn_d2 import add_maskattn_config
from maskattn_d2.engine import MaskAttnTrainer, adapt_config_to_device

from .modeling.test_meta_arch import small_cfg
from .panoptic_factory import CATEGORIES, NUM_CLASSES, unregister, write_panoptic_dataset
from .test_train_net import TINY_MODEL

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "Base-MaskAttn-UNet.yaml"


@pytest.mark.parametrize("height,width", [(1, 1), (2400, 3200)])
def test_outputs_at_extreme_original_sizes(height, width):
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    image = torch.randint(0, 255, (3, min(height, 64), min(width, 64)), dtype=torch.uint8)
    (out,) = model([{"image": image, "height": height, "width": width}])
    assert out["sem_seg"].shape == (4, height, width)
    ids, segments = out["panoptic_seg"]
    assert ids.shape == (height, width)
    assert sum(s["area"] for s in segments) == int((ids > 0).sum())
    assert out["instances"].image_size == (height, width)


def test_batch_without_any_label_gives_zero_finite_losses():
    model = build_model(small_cfg())
    void = {
        "image": torch.zeros(3, 64, 64, dtype=torch.uint8),
        "sem_seg": torch.full((64, 64), 255, dtype=torch.long),
        "instance_ids": torch.zeros(64, 64, dtype=torch.long),
    }
    with EventStorage():
        losses = model([void, void])
    assert all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()  # still a graph: DDP needs every loss to backpropagate


@pytest.fixture
def unusual_dataset(tmp_path):
    name = "maskattn_test_unusual_panoptic"
    write_panoptic_dataset(tmp_path / "data", ["void", "stuff_only", "things", "void"], name=name)
    yield name
    unregister([name])


def test_trains_and_evaluates_with_void_and_stuff_only_images(unusual_dataset, tmp_path):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.merge_from_list(TINY_MODEL + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES),
        "INPUT.NETWORK_SIZE", "(32, 32)",
        "DATASETS.TRAIN", f"('{unusual_dataset}',)",
        "DATASETS.TEST", f"('{unusual_dataset}',)",
        "SOLVER.MAX_ITER", "60",
        "SOLVER.BASE_LR", "0.01",  # learns the flat sky / grass colours in a few iterations
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    adapt_config_to_device(cfg)
    trainer = MaskAttnTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    losses = [value for value, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    results = trainer._last_eval_results
    assert {"panoptic_seg", "segm", "bbox", "sem_seg"} <= set(results)
    # The void images neither break training nor count in evaluation: the stuff is learnt
    # (PQ_st 93 on 1 thread, 84 on 2; an untrained model predicts one class and scores 0).
    assert results["panoptic_seg"]["PQ_st"] > 60
    assert results["sem_seg"]["pACC"] > 75  # 93 / 88 here; untrained: about 30
    assert (tmp_path / "out" / "model_final.pth").is_file()


@pytest.fixture
def stuff_classes_only_dataset(tmp_path):
    """A dataset whose categories are all stuff (sky, grass): no thing class at all, so its
    metadata has an empty thing_dataset_id_to_contiguous_id."""
    name = "maskattn_test_stuff_classes_only"
    stuff = [c for c in CATEGORIES if not c["isthing"]]
    write_panoptic_dataset(
        tmp_path / "data", ["stuff_only", "void", "stuff_only"], name=name, dataset_categories=stuff
    )
    yield name, len(stuff)
    unregister([name])


def test_dataset_with_only_stuff_classes_trains_and_evaluates(stuff_classes_only_dataset, tmp_path):
    """Issue 11 item 2: the final evaluation used to raise "InstanceSegEvaluator needs
    metadata 'thing_dataset_id_to_contiguous_id'"; the instance evaluator does not apply to a
    dataset without thing classes and is skipped with one warning; PQ and mIoU are scored."""
    name, num_classes = stuff_classes_only_dataset
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.merge_from_list(TINY_MODEL + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes),
        "INPUT.NETWORK_SIZE", "(32, 32)",
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", f"('{name}',)",
        "SOLVER.MAX_ITER", "20",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "10",  # evaluated twice: still one warning
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    adapt_config_to_device(cfg)
    trainer = MaskAttnTrainer(cfg)
    trainer.resume_or_load(resume=False)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the loggers may not propagate to pytest's caplog
    build_logger = logging.getLogger("maskattn_d2.evaluation.build")
    build_logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        build_logger.removeHandler(handler)
    results = trainer._last_eval_results
    assert "segm" not in results and "bbox" not in results
    assert {"panoptic_seg", "sem_seg"} <= set(results)
    # Sky over grass is learnt: PQ_st and mIoU 96-98 after 20 iterations, where an
    # untrained model (one class everywhere) scores PQ_st 0 and mIoU about 34.
    assert results["panoptic_seg"]["PQ_st"] > 80
    assert math.isnan(results["panoptic_seg"]["PQ_th"])
    assert results["sem_seg"]["mIoU"] > 80
    skipped = [r for r in records if "InstanceSegEvaluator" in r.getMessage()]
    assert len(skipped) == 1 and name in skipped[0].getMessage()
