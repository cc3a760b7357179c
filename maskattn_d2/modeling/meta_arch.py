"""The MaskAttn-UNet meta-architecture: backbone + semantic head + embedding head.

Training returns a loss dict; inference returns detectron2's standard per-image outputs
(``sem_seg``, ``instances``, ``panoptic_seg``) at each image's original size.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head

from ..config import check_resize_mode
from ..structures.label_maps import resize_label_map
from .heads import build_embed_head
from .losses import (
    OFFSET_LOSSES,
    SEED_LOSSES,
    gate_loss,
    instance_contrastive_loss,
    semantic_loss,
    spatial_embedding_losses,
)
from .postprocessing import MaskAttnPostProcessor
from .test_time_flips import check_flip_views, flip_views_from_config, run_with_flips

__all__ = [
    "MaskAttnUNet",
    "build_postprocessor",
    "normalize_images",
    "postprocess_batch",
    "thing_ids_from_config",
    "thing_ids_from_metadata",
]


def thing_ids_from_metadata(metadata, num_classes: int) -> List[int]:
    """Contiguous ids of the thing classes, checked against ``num_classes``.

    Panoptic metadata in this project (and detectron2's "standard" COCO / Cityscapes panoptic
    metadata) maps thing and stuff dataset ids into one contiguous space ``[0, num_classes)``.
    """
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if mapping is None:
        raise ValueError(
            f"Dataset '{metadata.name}' has no thing_dataset_id_to_contiguous_id metadata: "
            "register it as a panoptic dataset (see datasets/README.md)."
        )
    thing_ids = sorted(set(mapping.values()))
    bad = [i for i in thing_ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(
            f"Thing class ids {bad} of dataset '{metadata.name}' are outside "
            f"[0, MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes})."
        )
    stuff_classes = getattr(metadata, "stuff_classes", None)
    if stuff_classes is not None and len(stuff_classes) != num_classes:
        raise ValueError(
            f"Dataset '{metadata.name}' has {len(stuff_classes)} classes but "
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}."
        )
    return thing_ids



def thing_ids_from_config(cfg) -> List[int]:
    """Thing class ids of the config's first dataset (DATASETS.TRAIN, else DATASETS.TEST)."""
    dataset_names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not dataset_names:
        raise ValueError("Config has neither DATASETS.TRAIN nor DATASETS.TEST: the model "
                         "takes its thing classes from the dataset's metadata.")
    return thing_ids_from_metadata(
        MetadataCatalog.get(dataset_names[0]), cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    )


def build_postprocessor(cfg, thing_ids: Optional[Sequence[int]] = None) -> MaskAttnPostProcessor:
    """The post-processor of ``cfg.MODEL.MASK_ATTN_POSTPROCESS``, shared by the model and by
    runtimes of its exported network (:mod:`maskattn_d2.export`).

    Args:
        thing_ids: contiguous thing class ids; default :func:`thing_ids_from_config`.
    """
    return MaskAttnPostProcessor(
        cfg, thing_ids=thing_ids_from_config(cfg) if thing_ids is None else thing_ids
    )


def normalize_images(
    images: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, per_image: bool
) -> torch.Tensor:
    """
    The network's input from (B, C, h, w) float pixels: ``(x - pixel_mean) / pixel_std``
    ((C, 1, 1) each), or with ``per_image`` each image minus the mean of all its values,
    divided by their standard deviation (at least 1, so a flat image stays flat). Per-image
    statistics ignore the brightness and contrast of the acquisition: on DSB 2018, dim
    fluorescence images then look like bright ones. Shared by the model and its export.
    """
    if not per_image:
        return (images - pixel_mean) / pixel_std
    # keepdim reductions, not reshapes: the ONNX trace keeps the static spatial size.
    centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
    std = centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1.0)
    return centred / std


def postprocess_batch(
    postprocessor: MaskAttnPostProcessor,
    sem_logits: torch.Tensor,
    head_outputs: Dict[str, torch.Tensor],
    batched_inputs: List[Dict],
    *,
    semantic_on: bool = True,
    instance_on: bool = True,
    panoptic_on: bool = True,
) -> List[Dict]:
    """Standard outputs of each image of a batch from the network's outputs (B, C, h, w), at
    the image's ``height``/``width`` (default: its input size). Used by
    :meth:`MaskAttnUNet.inference` and by the runtimes of the exported network."""
    results = []
    for i, inputs in enumerate(batched_inputs):
        height = inputs["height"] if "height" in inputs else inputs["image"].shape[-2]
        width = inputs["width"] if "width" in inputs else inputs["image"].shape[-1]
        results.append(
            postprocessor(
                sem_logits[i],
                {k: v[i] for k, v in head_outputs.items()} or None,
                (int(height), int(width)),
                semantic_on=semantic_on,
                instance_on=instance_on,
                panoptic_on=panoptic_on,
            )
        )
    return results


@META_ARCH_REGISTRY.register()
class MaskAttnUNet(nn.Module):
    """MaskAttn-UNet (and its plain / hybrid-attention variants, chosen by config).

    Each input dict holds ``"image"`` (C,H,W) (any size: it is resized to the network size),
    optionally ``"height"``/``"width"`` (the output size, default the image size) and, in
    training, ``"sem_seg"`` (H,W) int64 and ``"instance_ids"`` (H,W) int64 targets as made by
    :class:`maskattn_d2.data.MaskAttnPanopticMapper`.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        embed_head: nn.Module,
        postprocessor: MaskAttnPostProcessor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        network_size: Tuple[int, int],
        per_image_normalization: bool = False,
        thing_ids: Sequence[int],
        ignore_value: int = 255,
        sem_seg_loss_weight: float = 1.0,
        ce_weight: float = 1.0,
        top_k_percent_pixels: float = 1.0,
        embed_loss_weight: float = 1.0,
        temperature: float = 0.1,
        samples_per_instance: int = 32,
        max_samples_per_image: int = 512,
        gate_loss_weight: float = 0.0,
        offset_loss_weight: float = 1.0,
        seed_loss_weight: float = 1.0,
        seed_target: str = "depth",
        seed_sigma_scale: float = 0.5,
        seed_loss: str = "bce",
        offset_loss: str = "l1",
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
        test_flips: Sequence[str] = (),
    ):
        """
        Args:
            backbone: a UNet backbone with ``forward_with_gates(x) -> (features, gates)``.
            sem_seg_head: features -> (B, num_classes, h, w) logits.
            embed_head: features -> {"embeddings": (B, D, h, w) L2-normalised, and with
                spatial embeddings "offsets" (B, 2, h, w), "seed_logits" (B, 1, h, w)}.
            postprocessor: turns one image's logits and embeddings into standard outputs.
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            network_size: (h, w) every image is resized to.
            per_image_normalization: normalise each image by its own statistics instead of
                ``pixel_mean`` / ``pixel_std`` (:func:`normalize_images`).
            thing_ids: contiguous ids of the thing classes.
            ignore_value: semantic label ignored by the losses.
            sem_seg_loss_weight, ce_weight, top_k_percent_pixels: semantic loss, see
                :func:`semantic_loss`.
            embed_loss_weight, temperature, samples_per_instance, max_samples_per_image:
                instance contrastive loss (lambda, tau, sampling), see
                :func:`instance_contrastive_loss`; weight 0 disables it.
            gate_loss_weight: weight of the gate supervision; 0 disables it.
            offset_loss_weight, seed_loss_weight, seed_target, seed_sigma_scale, seed_loss,
            offset_loss: losses of the spatial embeddings (when the embedding head predicts
                them), see :func:`spatial_embedding_losses`.
            semantic_on, instance_on, panoptic_on: which outputs inference returns.
            test_flips: flipped views averaged with the image at inference (test-time
                augmentation, :func:`run_with_flips`): names among "horizontal", "vertical",
                "both"; empty: none.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.embed_head = embed_head
        self.postprocessor = postprocessor
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.network_size = tuple(int(s) for s in network_size)
        self.per_image_normalization = bool(per_image_normalization)
        # Checked here rather than at the first forward, whose error would not say which
        # config key to change.
        divisor = int(getattr(backbone, "size_divisibility", 0) or 1)
        if len(self.network_size) != 2 or any(s <= 0 or s % divisor for s in self.network_size):
            raise ValueError(
                f"INPUT.NETWORK_SIZE {tuple(network_size)} must be (height, width), both positive "
                f"multiples of {divisor}, the backbone's deepest stride (one halving per stage "
                "of MODEL.MASK_ATTN_UNET.CHANNELS after the first)."
            )
        # Checked at build time: the losses would only reject them at the first step.
        if seed_target not in ("depth", "gaussian"):
            raise ValueError(
                f'MODEL.EMBED_HEAD.SEED_TARGET must be "depth" or "gaussian", got {seed_target!r}.'
            )
        if seed_loss not in SEED_LOSSES:
            raise ValueError(
                f"MODEL.EMBED_HEAD.SEED_LOSS must be one of {SEED_LOSSES}, got {seed_loss!r}."
            )
        if offset_loss not in OFFSET_LOSSES:
            raise ValueError(
                f"MODEL.EMBED_HEAD.OFFSET_LOSS must be one of {OFFSET_LOSSES}, got "
                f"{offset_loss!r}."
            )
        self.register_buffer("thing_ids", torch.tensor(sorted(thing_ids), dtype=torch.long), False)
        self.ignore_value = ignore_value
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.ce_weight = ce_weight
        self.top_k_percent_pixels = top_k_percent_pixels
        self.embed_loss_weight = embed_loss_weight
        self.temperature = temperature
        self.samples_per_instance = samples_per_instance
        self.max_samples_per_image = max_samples_per_image
        self.gate_loss_weight = gate_loss_weight
        self.offset_loss_weight = offset_loss_weight
        self.seed_loss_weight = seed_loss_weight
        self.seed_target = seed_target
        self.seed_sigma_scale = seed_sigma_scale
        self.seed_loss = seed_loss
        self.offset_loss = offset_loss
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        check_flip_views(test_flips)
        self.test_flips = tuple(test_flips)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        thing_ids = thing_ids_from_config(cfg)
        head, embed = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.EMBED_HEAD
        post = cfg.MODEL.MASK_ATTN_POSTPROCESS
        check_resize_mode(cfg)
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "embed_head": build_embed_head(cfg, backbone.output_shape()),
            "postprocessor": build_postprocessor(cfg, thing_ids),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "network_size": cfg.INPUT.NETWORK_SIZE,
            "per_image_normalization": cfg.MODEL.PER_IMAGE_NORMALIZATION,
            "thing_ids": thing_ids,
            "ignore_value": head.IGNORE_VALUE,
            "sem_seg_loss_weight": head.LOSS_WEIGHT,
            "ce_weight": head.CE_WEIGHT,
            "top_k_percent_pixels": head.TOP_K_PERCENT_PIXELS,
            "embed_loss_weight": embed.LOSS_WEIGHT,
            "temperature": embed.TEMPERATURE,
            "samples_per_instance": embed.SAMPLES_PER_INSTANCE,
            "max_samples_per_image": embed.MAX_SAMPLES_PER_IMAGE,
            "gate_loss_weight": cfg.MODEL.MASK_ATTN.GATE_LOSS_WEIGHT,
            "offset_loss_weight": embed.OFFSET_LOSS_WEIGHT,
            "seed_loss_weight": embed.SEED_LOSS_WEIGHT,
            "seed_target": embed.SEED_TARGET,
            "seed_sigma_scale": embed.SEED_SIGMA_SCALE,
            "seed_loss": embed.SEED_LOSS,
            "offset_loss": embed.OFFSET_LOSS,
            "semantic_on": post.SEMANTIC_ON,
            "instance_on": post.INSTANCE_ON,
            "panoptic_on": post.PANOPTIC_ON,
            "test_flips": flip_views_from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """Loss dict in training, a list of per-image output dicts in inference."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features, gates = self.backbone.forward_with_gates(images)
        sem_logits = self.sem_seg_head(features)
        sem_target = self._stack_target(batched_inputs, "sem_seg")
        losses = {
            "loss_sem_seg": self.sem_seg_loss_weight
            * semantic_loss(
                sem_logits.float(),
                sem_target,
                ignore_index=self.ignore_value,
                ce_weight=self.ce_weight,
                top_k_percent_pixels=self.top_k_percent_pixels,
            )
        }
        spatial_weights = self.offset_loss_weight + self.seed_loss_weight
        if self.embed_loss_weight > 0 or spatial_weights > 0:
            # else the embedding head stays out of the graph (DDP)
            head_outputs = self.embed_head(features)
            instance_ids = self._stack_target(batched_inputs, "instance_ids")
            losses["loss_embed"] = self.embed_loss_weight * instance_contrastive_loss(
                head_outputs["embeddings"].float(),
                instance_ids,
                temperature=self.temperature,
                samples_per_instance=self.samples_per_instance,
                max_samples_per_image=self.max_samples_per_image,
            )
            if "offsets" in head_outputs and spatial_weights > 0:
                # Void, crowd and dropped tiny instances teach the seed map nothing.
                ignore = (sem_target == self.ignore_value) | (
                    torch.isin(sem_target, self.thing_ids) & (instance_ids == 0)
                )
                offset_loss, seed_loss = spatial_embedding_losses(
                    head_outputs["offsets"],
                    head_outputs["seed_logits"],
                    instance_ids,
                    ignore,
                    seed_target=self.seed_target,
                    seed_sigma_scale=self.seed_sigma_scale,
                    seed_loss=self.seed_loss,
                    offset_loss=self.offset_loss,
                    log_bandwidth=head_outputs.get("log_bandwidth"),
                )
                losses["loss_offset"] = self.offset_loss_weight * offset_loss
                losses["loss_seed"] = self.seed_loss_weight * seed_loss
        if self.gate_loss_weight > 0 and gates:
            thing_mask = torch.isin(sem_target, self.thing_ids)
            losses["loss_gate"] = self.gate_loss_weight * gate_loss(
                {k: g.float() for k, g in gates.items()},
                thing_mask,
                ignore_mask=sem_target == self.ignore_value,
            )
        return losses

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """
        Returns:
            if ``do_postprocess``: a list of dicts with ``"sem_seg"`` (K,H,W) logits,
            ``"instances"`` and ``"panoptic_seg"`` (ids (H,W) int32, segments_info), at each
            image's ``height``/``width`` (default: its input size); otherwise the raw
            ``(sem_logits (B,K,h,w), embedding head outputs {name: (B,C,h,w)})`` at network
            resolution.
        """
        images = self.preprocess_image(batched_inputs)
        # Here rather than in the backbone's forward, where it would cost every training step
        # a pass and a host sync (training stops on a non-finite loss instead).
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        if not all(finite):
            bad = [batched_inputs[i].get("file_name", f"input {i}") for i, ok in
                   enumerate(finite) if not ok]
            raise ValueError(f"non-finite pixel values (NaN or Inf) in {bad}.")
        needs_instances = self.instance_on or self.panoptic_on
        # Connected components or semantic only: the embedding head is not read.
        with_head = not do_postprocess or self.postprocessor.needed_head_outputs(needs_instances)
        sem_logits, head_outputs = run_with_flips(
            lambda x: self.run_network(x, with_head_outputs=with_head), images, self.test_flips
        )
        if not do_postprocess:
            return sem_logits, head_outputs
        return postprocess_batch(
            self.postprocessor,
            sem_logits,
            head_outputs,
            batched_inputs,
            semantic_on=self.semantic_on,
            instance_on=self.instance_on,
            panoptic_on=self.panoptic_on,
        )

    def run_network(
        self, images: torch.Tensor, *, with_head_outputs: bool = True
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Inference network on normalised images: (B, C, h, w) -> ``(sem_logits (B, K, h, w),
        {embedding head output: (B, c, h, w)})``, float32; the dict is empty without
        ``with_head_outputs``.
        """
        on_cpu = images.device.type == "cpu"
        if on_cpu:
            # oneDNN's convolutions run a batch in channels-last order without reordering
            # every layer's input: ~25 % less time at batch 16 (128x128), the same at batch 1.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        if on_cpu:
            # Channels-last logits, which the postprocessor reads fastest with many classes
            # (with 133: ~2 ms less per image, and no copy of the map): the heads' convolutions
            # write the layout of their input, which the backbone leaves planar at batch 1.
            features = {
                k: v.contiguous(memory_format=torch.channels_last) for k, v in features.items()
            }
        sem_logits = self.sem_seg_head(features).float()
        if not with_head_outputs:
            return sem_logits, {}
        outputs = self.embed_head(features)
        # The embedding head's few channels are made contiguous: the postprocessor reads them
        # channel by channel.
        return sem_logits, {k: v.float().contiguous() for k, v in outputs.items()}

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Resize every image to the network size and normalise it: (B, C, h, w) float."""
        expected_channels = self.pixel_mean.shape[0]
        images = []
        for i, inputs in enumerate(batched_inputs):
            image = inputs["image"]
            if image.dim() != 3 or image.shape[0] != expected_channels:
                raise ValueError(
                    f"Input {i} ({inputs.get('file_name', 'no file_name')}): expected an image of "
                    f"shape ({expected_channels}, H, W), got {tuple(image.shape)}."
                )
            image = image.to(self.device, torch.float32)
            if tuple(image.shape[-2:]) != self.network_size:
                image = F.interpolate(
                    image[None], size=self.network_size, mode="bilinear", align_corners=False
                )[0]
            images.append(image)
        return normalize_images(
            torch.stack(images), self.pixel_mean, self.pixel_std, self.per_image_normalization
        )

    def _stack_target(self, batched_inputs: List[Dict], key: str) -> torch.Tensor:
        """Stack a per-image (H,W) target, resized to the network size if needed with the one
        label-map rule (:func:`resize_label_map`: nearest, pixel-centre aligned)."""
        targets = []
        for i, inputs in enumerate(batched_inputs):
            if key not in inputs:
                raise ValueError(f"Training input {i} has no '{key}' target: use the "
                                 "MaskAttnPanopticMapper (INPUT.DATASET_MAPPER_NAME).")
            targets.append(resize_label_map(inputs[key].to(self.device, torch.long),
                                            self.network_size))
        return torch.stack(targets)
