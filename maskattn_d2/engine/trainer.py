"""The project's DefaultTrainer: mapper, evaluators, optimizer, and CPU-safe multi-process runs."""
import logging
import os
import weakref

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import build_dataset_mapper
from ..evaluation import build_evaluator
from .optimizer import build_optimizer

__all__ = ["MaskAttnTrainer", "adapt_config_to_device", "AtomicCheckpointer"]

logger = logging.getLogger(__name__)

# Every config key that names a normalisation layer.
_NORM_KEYS = ("MASK_ATTN_UNET", "SEM_SEG_HEAD", "EMBED_HEAD")


def adapt_config_to_device(cfg):
    """Make a config runnable on the machine at hand (in place; call before freezing).

    On a machine without CUDA (or with ``MODEL.DEVICE cpu``): the model runs on CPU, AMP is
    turned off (detectron2's AMPTrainer needs CUDA), and ``SyncBN`` becomes ``NaiveSyncBN``
    (``nn.SyncBatchNorm`` cannot train on CPU; detectron2's NaiveSyncBN all-reduces over GLOO).
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available():
        return cfg
    if cfg.MODEL.DEVICE != "cpu":
        logger.warning("CUDA is not available: running on CPU instead of %s.", cfg.MODEL.DEVICE)
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = False
    for key in _NORM_KEYS:
        node = getattr(cfg.MODEL, key)
        if node.NORM == "SyncBN":
            logger.warning("MODEL.%s.NORM: SyncBN does not run on CPU, using NaiveSyncBN.", key)
            node.NORM = "NaiveSyncBN"
    return cfg


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that writes each checkpoint to a temporary file and renames it,
    so an interrupted save never leaves a truncated checkpoint in place of a good one."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        tmp_file = save_file + ".tmp"
        self.logger.info("Saving checkpoint to %s", save_file)
        with self.path_manager.open(tmp_file, "wb") as f:
            torch.save(data, f)
        os.replace(tmp_file, save_file)
        self.tag_last_checkpoint(basename)


class MaskAttnTrainer(DefaultTrainer):
    """DefaultTrainer with the mapper named by ``INPUT.DATASET_MAPPER_NAME``, evaluators chosen
    per dataset, AdamW, atomic checkpoints, and DDP that also works for several CPU processes
    (GLOO)."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__; the one difference is create_ddp_model's
        # device_ids, which must be None when the model lives on CPU.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        device_ids = None if on_cpu else [comm.get_local_rank()]
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED and not on_cpu else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = build_dataset_mapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)
