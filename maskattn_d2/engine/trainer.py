"""The project's DefaultTrainer: mapper, evaluators, optimizer, CPU-safe multi-process runs,
atomic checkpoints and an explicit failure path (no final checkpoint or evaluation after a
failed step)."""
import io
import logging
import os
import pickle
import weakref

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import build_dataset_mapper
from ..data.batch_transfer import UnstackingLoader, stack_batch
from ..data.datasets import lowres_train_config
from ..evaluation import build_evaluator
from .optimizer import build_optimizer

__all__ = [
    "NORM_KEYS",
    "MaskAttnTrainer",
    "adapt_config_to_device",
    "AtomicCheckpointer",
    "TrainingError",
    "WeightsError",
    "load_inference_weights",
]

logger = logging.getLogger(__name__)

# The MODEL.* config nodes whose NORM key names a normalisation layer (also read by the
# benchmark, which turns SyncBN into BN for its one process).
NORM_KEYS = ("MASK_ATTN_UNET", "SEM_SEG_HEAD", "EMBED_HEAD")

# Hooks whose after_train writes a checkpoint or evaluates. detectron2's EvalHook and
# BestCheckpointer test ``iter + 1 >= max_iter``, which also holds when the *last* step
# failed, so after a failure they would evaluate (or save) the weights of the failed step.
_RESULT_HOOKS = (hooks.PeriodicCheckpointer, hooks.BestCheckpointer, hooks.EvalHook)


class TrainingError(RuntimeError):
    """Training stopped by an exception (chained as ``__cause__``). The message names the
    iteration and the checkpoint to resume from when a step failed; when every iteration ran
    and what failed came after them (the final evaluation), it says so and names
    ``model_final.pth`` and how to evaluate it again."""


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
    for key in NORM_KEYS:
        node = getattr(cfg.MODEL, key)
        if node.NORM == "SyncBN":
            logger.warning("MODEL.%s.NORM: SyncBN does not run on CPU, using NaiveSyncBN.", key)
            node.NORM = "NaiveSyncBN"
    return cfg


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that writes each checkpoint, and the ``last_checkpoint`` tag, to
    a temporary file, fsyncs and renames it, so an interrupted save never leaves a truncated
    checkpoint in place of a good one; a file that cannot be read fails with its name."""

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
            _sync(f)  # data on disk before the rename makes it visible
        os.replace(tmp_file, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        # Same tmp + rename as save(): ``last_checkpoint`` (what --resume reads) always names
        # a complete file, old or new, never an empty or half-written one.
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        tmp_file = save_file + ".tmp"
        with self.path_manager.open(tmp_file, "w") as f:
            f.write(last_filename_basename)
            _sync(f)
        os.replace(tmp_file, save_file)

    def load(self, path: str, checkpointables=None):
        # Remember what was loaded (None: nothing, random initialisation) and how well it
        # matched the model, for load_inference_weights.
        self.loaded_path = path or None
        self.incompatible = None
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def _load_file(self, filename: str):
        # torch.load's errors on a truncated file ("failed finding central directory",
        # EOFError) do not say which file; name it and where it came from.
        try:
            return super()._load_file(filename)
        except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty file'}"
            last = self.get_checkpoint_file() if self.save_dir else ""
            if last and os.path.realpath(last) == os.path.realpath(filename):
                tag = os.path.join(self.save_dir, "last_checkpoint")
                hint = (
                    f"It is the checkpoint named by {tag} (--resume): write the name of an "
                    "earlier checkpoint of that directory into it, or delete it to start over"
                )
            else:
                hint = "Check the path given to load it (e.g. MODEL.WEIGHTS)"
            raise RuntimeError(
                f"Cannot load checkpoint {filename}: the file is truncated, corrupt or not a "
                f"checkpoint ({reason}). {hint}."
            ) from e


class WeightsError(ValueError):
    """The weights to evaluate or draw are missing, or do not fit the model."""


def load_inference_weights(
    model, weights: str, *, allow_random: bool = False, save_dir: str = "", resume: bool = False
) -> AtomicCheckpointer:
    """Load the weights a model is evaluated (or drawn) with, and refuse silent random ones.

    ``--eval-only`` without ``MODEL.WEIGHTS`` would evaluate a randomly initialised model,
    and a checkpoint of another architecture loads only the parameters whose names and shapes
    match (detectron2 logs one "Skip loading" warning per other parameter and goes on): both
    give numbers that look like results. Unless ``allow_random``, both raise.

    Args:
        model: the model (not wrapped in DDP).
        weights: checkpoint path (``MODEL.WEIGHTS``); empty means none.
        allow_random: accept random initialisation of all or some parameters (with a warning).
        save_dir, resume: as ``resume_or_load``: with ``resume``, the last checkpoint of
            ``save_dir`` is loaded when there is one, else ``weights``.

    Returns:
        The checkpointer that loaded them.

    Raises:
        WeightsError: no weights, or model parameters missing from the checkpoint or of
            another shape (the message names them and the option that allows it).
    """
    checkpointer = AtomicCheckpointer(model, save_dir=save_dir)
    checkpointer.resume_or_load(weights, resume=resume)
    allow = "pass --allow-random-weights to do this on purpose"
    problem = None
    if checkpointer.loaded_path is None:
        where = f" (and no checkpoint in {save_dir} to --resume from)" if resume else ""
        problem = (
            f"No weights to evaluate: MODEL.WEIGHTS is empty{where}, so the model would be "
            "randomly initialised and its results meaningless. Set MODEL.WEIGHTS to a "
            f"checkpoint, or {allow}."
        )
    elif checkpointer.incompatible is not None:
        missing = list(checkpointer.incompatible.missing_keys)
        shapes = [
            f"{name} (checkpoint {tuple(ckpt)}, model {tuple(own)})"
            for name, ckpt, own in checkpointer.incompatible.incorrect_shapes
        ]
        if missing or shapes:
            total = len(model.state_dict())
            listed = shapes[:10] + missing[: max(0, 10 - len(shapes))]
            problem = (
                f"Checkpoint {checkpointer.loaded_path} does not fit the model: "
                f"{len(shapes)} of its {total} parameters/buffers have another shape and "
                f"{len(missing)} are missing from it (a checkpoint of another architecture or "
                f"config?), so they would stay randomly initialised. First ones: "
                f"{'; '.join(listed)}. Use the config the checkpoint was trained with, or "
                f"{allow}."
            )
    if problem is not None:
        if not allow_random:
            raise WeightsError(problem)
        logger.warning("--allow-random-weights: %s", problem)
    return checkpointer


def _sync(f) -> None:
    """Flush ``f`` and fsync it, so a rename never exposes data still in the page cache
    (skipped for file objects without a descriptor, e.g. from a remote path handler)."""
    f.flush()
    try:
        fd = f.fileno()
    except (AttributeError, io.UnsupportedOperation):
        return
    os.fsync(fd)


class MaskAttnTrainer(DefaultTrainer):
    """DefaultTrainer with the mapper named by ``INPUT.DATASET_MAPPER_NAME``, evaluators chosen
    per dataset, AdamW, atomic checkpoints, writers every ``LOG_PERIOD`` iterations, DDP that
    also works for several CPU processes (GLOO), and an explicit failure path: when a step
    raises (e.g. detectron2's "Loss became infinite or NaN"), no final checkpoint or evaluation
    is made and a :class:`TrainingError` names the iteration and the checkpoint to resume from.
    """

    def __init__(self, cfg):
        # Not DefaultTrainer.__init__: it hard-codes create_ddp_model's arguments, so its steps
        # are repeated here with device_ids None on CPU (DDP rejects CPU device ids) and
        # broadcast_buffers (below).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        device_ids = None if on_cpu else [comm.get_local_rank()]
        # broadcast_buffers: every worker's BatchNorm running statistics are rank 0's (as
        # they are with SyncBN). detectron2 turns it off, which leaves plain-BN workers with
        # different statistics: a multi-process evaluation then mixes models and differs
        # from one process evaluating the saved (rank 0) weights.
        model = create_ddp_model(model, broadcast_buffers=True, device_ids=device_ids)
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
        # DATASETS.TRAIN_LOWRES_SHORT_SIDE: read the small training copies (training only).
        cfg = lowres_train_config(cfg)
        mapper = build_dataset_mapper(cfg, is_train=True)
        if cfg.DATALOADER.NUM_WORKERS == 0 or cfg.DATALOADER.ASPECT_RATIO_GROUPING:
            # detectron2's loader: with workers, each image crosses to this process alone.
            return build_detection_train_loader(cfg, mapper=mapper)
        # Without aspect-ratio grouping the workers batch and stack the images and targets: one
        # hand-off per tensor field and batch (see maskattn_d2.data.batch_transfer).
        return UnstackingLoader(
            build_detection_train_loader(cfg, mapper=mapper, collate_fn=stack_batch)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = build_dataset_mapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        if self.cfg.LOG_PERIOD < 1:
            raise ValueError(
                f"LOG_PERIOD must be a positive number of iterations, got {self.cfg.LOG_PERIOD}"
            )
        ret = super().build_hooks()
        # DefaultTrainer hard-codes the writers' period (20); same writers, LOG_PERIOD.
        return [
            hooks.PeriodicWriter(h._writers, period=self.cfg.LOG_PERIOD)
            if isinstance(h, hooks.PeriodicWriter)
            else h
            for h in ret
        ]

    def train(self):
        try:
            return super().train()
        except TrainingError:
            raise
        except Exception as e:
            message = self._failure_message(e)
            logger.error(message)
            raise TrainingError(message) from e

    def after_train(self):
        # TrainerBase leaves ``iter`` below ``max_iter`` only when training stopped early (an
        # exception): then skip the checkpoint / evaluation hooks; writers still flush.
        if self.iter >= self.max_iter:
            return super().after_train()
        self.storage.iter = self.iter
        for h in self._hooks:
            if not isinstance(h, _RESULT_HOOKS):
                h.after_train()

    def _failure_message(self, error: Exception) -> str:
        first_line = str(error).splitlines()[0] if str(error) else ""
        if self.iter >= self.max_iter:
            # TrainerBase sets iter to max_iter only after the last step succeeded: the error
            # came after training, from the final evaluation / results check (after_train).
            return self._after_training_failure_message(error, first_line)
        if self.checkpointer.has_checkpoint():
            where = (
                f"last good checkpoint: {self.checkpointer.get_checkpoint_file()}. Rerun with "
                "--resume (same OUTPUT_DIR) to continue from it"
            )
        else:
            where = (
                f"no checkpoint written yet in {self.cfg.OUTPUT_DIR}, so a rerun (--resume "
                "too) starts from iteration 0"
            )
        return (
            f"Training stopped at iteration {self.iter} ({type(error).__name__}: {first_line}); "
            f"nothing was saved or evaluated after it; {where}."
        )

    def _after_training_failure_message(self, error: Exception, first_line: str) -> str:
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(final):
            saved = (
                f"the final weights are saved in {final}. Evaluate them again, once the cause "
                f"is fixed, with --eval-only MODEL.WEIGHTS {final} (same config); no need to "
                "train again"
            )
        else:
            saved = f"no {final} was written by this process"
        return (
            f"Training finished all {self.max_iter} iterations, then the step after training "
            f"failed (the final evaluation or the check of TEST.EXPECTED_RESULTS; "
            f"{type(error).__name__}: {first_line}); {saved}."
        )
