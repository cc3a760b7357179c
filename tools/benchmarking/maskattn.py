"""MaskAttn-UNet in the benchmark: its config at the benchmark's size and its runner."""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

# Importing maskattn_d2 registers the model, backbone, heads and datasets.
from maskattn_d2 import add_maskattn_config
from maskattn_d2.data import panoptic_to_targets
from maskattn_d2.engine import NORM_KEYS
from maskattn_d2.modeling.meta_arch import postprocess_batch

from .runner import Runner

__all__ = ["MaskAttnRunner", "maskattn_config"]


def maskattn_config(path: str, args, device: str):
    """Frozen MaskAttn config at ``--size`` on ``device``, one process (SyncBN -> BN)."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(args.opts)
    cfg.INPUT.NETWORK_SIZE = tuple(args.size)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    for node in NORM_KEYS:  # the benchmark runs one process: no group to synchronise
        if getattr(cfg.MODEL, node).NORM in ("SyncBN", "NaiveSyncBN"):
            getattr(cfg.MODEL, node).NORM = "BN"
    cfg.freeze()
    return cfg


class MaskAttnRunner(Runner):
    """A MaskAttn-UNet config for the benchmark.

    Network: backbone + semantic head + embedding head on the normalised network-size input.
    Post-processing: the model's batch path (``postprocess_batch``: semantic, instances,
    panoptic per image).
    """

    def __init__(self, cfg, *, name: str):
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES < 6:
            raise ValueError("The benchmark's synthetic scenes use 6 classes (3 things + 3 stuff); "
                             f"{name} has MODEL.SEM_SEG_HEAD.NUM_CLASSES="
                             f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}.")
        self.name = name
        self.cfg = cfg
        self.model = build_model(cfg).eval()

    def _image_inputs(self, scenes) -> List[Dict]:
        return [
            {"image": torch.as_tensor(np.ascontiguousarray(s.image.transpose(2, 0, 1)))}
            for s in scenes
        ]

    def prepare(self, scenes) -> torch.Tensor:
        return self.model.preprocess_image(self._image_inputs(scenes))

    def network(self, inputs: torch.Tensor):
        return self.model.run_network(inputs)

    def postprocess(self, outputs, image_size: Tuple[int, int]):
        # The model's own batch path (MaskAttnUNet.inference), at the network size.
        model = self.model
        sem_logits, head_outputs = outputs
        size = {"height": image_size[0], "width": image_size[1]}
        return postprocess_batch(
            model.postprocessor,
            sem_logits.float(),
            {name: value.float() for name, value in head_outputs.items()},
            [size] * sem_logits.shape[0],
            semantic_on=model.semantic_on,
            instance_on=model.instance_on,
            panoptic_on=model.panoptic_on,
        )

    def training_loss(self, scenes) -> torch.Tensor:
        inputs = self._image_inputs(scenes)
        for item, scene in zip(inputs, scenes):
            sem_seg, instance_ids = panoptic_to_targets(
                scene.pan_ids,
                scene.segments_info,
                thing_ids=self.model.thing_ids.tolist(),
                ignore_label=self.model.ignore_value,
                min_instance_pixels=self.cfg.INPUT.MIN_INSTANCE_PIXELS,
            )
            item["sem_seg"] = torch.as_tensor(sem_seg)
            item["instance_ids"] = torch.as_tensor(instance_ids)
        return sum(self.model(inputs).values())
