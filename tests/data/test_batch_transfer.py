"""Stacked training batches: the round trip keeps every field, and the trainer's loader with a
worker and DATALOADER.ASPECT_RATIO_GROUPING off yields what detectron2's loader yields."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader

from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import build_dataset_mapper
from maskattn_d2.data.batch_transfer import (
    StackedBatch,
    UnstackingLoader,
    stack_batch,
    unstack_batch,
)
from maskattn_d2.data.datasets import register_synthetic_panoptic
from maskattn_d2.engine import MaskAttnTrainer


def _dicts():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "file_name": f"image_{i}.png",
            "height": 10 + i,
            "image": torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 5, (8, 8), generator=g),
            "odd_size": torch.zeros(i + 1),  # shapes differ: stays per image
            "segments_info": [{"id": i}],
        }
        for i in range(3)
    ]


def test_stack_then_unstack_gives_the_dicts_back():
    dicts = _dicts()
    batch = stack_batch(dicts)
    assert isinstance(batch, StackedBatch)
    assert set(batch.stacked) == {"image", "sem_seg"}
    assert batch.stacked["image"].shape == (3, 3, 8, 8)
    assert "image" not in batch.rest[0] and "odd_size" in batch.rest[0]
    back = unstack_batch(batch)
    assert len(back) == len(dicts)
    for got, want in zip(back, dicts):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if torch.is_tensor(value):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key] == value, key
    assert list(UnstackingLoader([batch, batch]))[1][2]["file_name"] == "image_2.png"


@pytest.fixture
def synthetic_pair(tmp_path):
    names = register_synthetic_panoptic("test_batch_transfer", str(tmp_path / "data"),
                                        num_train=8, num_val=2)
    yield names[0]
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _first_batches(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_trainer_loader_with_a_worker_equals_detectron2_per_image_loader(synthetic_pair):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_list(["DATASETS.TRAIN", f"('{synthetic_pair}',)",
                         "DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "3"])
    # detectron2's default (grouping by aspect ratio) keeps detectron2's per-image loader.
    assert not isinstance(MaskAttnTrainer.build_train_loader(cfg), UnstackingLoader)
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.freeze()
    batches = {}
    for name in ("per_image", "stacked"):
        np.random.seed(0)  # the training sampler's seed (detectron2's shared random seed)
        torch.manual_seed(0)  # the worker's seed
        if name == "per_image":
            loader = build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, True))
        else:
            loader = MaskAttnTrainer.build_train_loader(cfg)
            assert isinstance(loader, UnstackingLoader)
        torch.manual_seed(0)
        batches[name] = _first_batches(loader, 3)
    for want, got in zip(batches["per_image"], batches["stacked"]):
        assert [d["file_name"] for d in got] == [d["file_name"] for d in want]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for key in ("image", "sem_seg", "instance_ids"):
                assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
