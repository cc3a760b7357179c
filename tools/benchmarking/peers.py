"""Peer models of the benchmark and of ``tools/compare_pq.py``.

- Panoptic-DeepLab from ``detectron2.projects.panoptic_deeplab``: its config is written here in
  code (the YAML files are not installed with detectron2), with the standard Cityscapes
  heads, a ResNet-50 DeepLab backbone (``build_resnet_deeplab_backbone``) or a small
  ResNet-18 with a dilated res5 (:func:`build_dilated_basic_resnet_backbone`, registered in
  ``BACKBONE_REGISTRY`` by the first config that names it, never at import), plain
  convolutions (DeformConv needs detectron2's ``_C``) and input / target / post-processing
  sizes scaled to a low-resolution network input.
- Mask2Former from ``transformers`` (Swin-T or ResNet-50 backbone, random weights, nothing
  downloaded); ``transformers`` is imported lazily, so this module imports without it.
- :class:`PanopticDeepLabRunner` / :class:`Mask2FormerRunner`: what the benchmark times of each
  peer (network, post-processing, training loss), behind the :class:`~.runner.Runner`
  interface shared with the MaskAttn runner.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config
from detectron2.projects.panoptic_deeplab.post_processing import get_panoptic_segmentation
from detectron2.projects.panoptic_deeplab.target_generator import PanopticDeepLabTargetGenerator
from torch import nn

from maskattn_d2.structures import resize_label_map

from .runner import Runner, TupleOutputs
from .scenes import SyntheticScene, images_tensor

__all__ = [
    "MASK2FORMER_BACKBONES",
    "Mask2FormerRunner",
    "PanopticDeepLabRunner",
    "build_dilated_basic_resnet_backbone",
    "build_mask2former",
    "panoptic_deeplab_config",
    "panoptic_deeplab_inputs",
    "panoptic_deeplab_target_generator",
    "register_dilated_basic_resnet_backbone",
]

# ImageNet statistics in 0-255 RGB, as every model here normalises its input.
_PIXEL_MEAN = [123.675, 116.280, 103.530]
_PIXEL_STD = [58.395, 57.120, 57.375]
# Panoptic-DeepLab's Cityscapes recipe works on 1024x2048 images; areas and the centre
# Gaussian are scaled from it to the network input.
_CITYSCAPES_AREA = 1024 * 2048


# --------------------------------------------------------------------------- Panoptic-DeepLab
def _dilate_stage(blocks: Sequence[nn.Module], dilation: int) -> None:
    """Turn every 3x3 conv of a stride-1 stage into a dilated one (same output size)."""
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def register_dilated_basic_resnet_backbone() -> None:
    """Put :func:`build_dilated_basic_resnet_backbone` in detectron2's ``BACKBONE_REGISTRY``
    (once: the registry refuses a second registration of a name)."""
    if "build_dilated_basic_resnet_backbone" not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_dilated_basic_resnet_backbone)


def build_dilated_basic_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    ResNet-18/34 (BasicBlock, standard stem) whose res5 keeps stride 16 with its 3x3 convs
    dilated by ``MODEL.RESNETS.RES5_DILATION`` (DeepLab's output stride 16); detectron2's
    ResNet builders dilate bottleneck ResNets only.

    Keys: ``MODEL.RESNETS.{DEPTH (18 or 34), NORM, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
    RES5_DILATION (1 or 2), OUT_FEATURES}``, ``MODEL.BACKBONE.FREEZE_AT``.
    """
    resnets = cfg.MODEL.RESNETS
    blocks_per_stage = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
    if resnets.DEPTH not in blocks_per_stage:
        raise ValueError(f"MODEL.RESNETS.DEPTH must be 18 or 34, got {resnets.DEPTH}.")
    if resnets.RES5_DILATION not in (1, 2):
        raise ValueError(
            f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {resnets.RES5_DILATION}."
        )
    stem = BasicStem(input_shape.channels, resnets.STEM_OUT_CHANNELS, norm=resnets.NORM)
    last = max({"res2": 2, "res3": 3, "res4": 4, "res5": 5}[f] for f in resnets.OUT_FEATURES)
    in_channels, out_channels = resnets.STEM_OUT_CHANNELS, resnets.RES2_OUT_CHANNELS
    stages = []
    for index, num_blocks in enumerate(blocks_per_stage[resnets.DEPTH][: last - 1]):
        stage_idx = index + 2
        dilation = resnets.RES5_DILATION if stage_idx == 5 else 1
        first_stride = 1 if stage_idx == 2 or dilation > 1 else 2
        stage = ResNet.make_stage(
            BasicBlock,
            num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=resnets.NORM,
        )
        if dilation > 1:
            _dilate_stage(stage, dilation)
        stages.append(stage)
        in_channels, out_channels = out_channels, out_channels * 2
    resnet = ResNet(stem, stages, out_features=resnets.OUT_FEATURES)
    return resnet.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


def panoptic_deeplab_config(
    *,
    dataset_name: str,
    num_classes: int,
    network_size: Tuple[int, int] = (128, 128),
    depth: int = 50,
    norm: str = "BN",
    device: str = "cpu",
) -> CfgNode:
    """
    Panoptic-DeepLab config written in code: the standard Cityscapes recipe
    (``Base-PanopticDeepLab-OS16`` + ``panoptic_deeplab_R_52_os16_mg124``: DeepLab stem,
    res5 dilation 2 with multi-grid 1-2-4, semantic decoder 256 / instance decoder 128, ASPP
    6-12-18, hard-pixel-mining CE, centre/offset losses 200 / 0.01) adapted as follows:

    - ``depth`` 50: ``build_resnet_deeplab_backbone`` with plain convs (no DeformConv);
      ``depth`` 18 or 34: :func:`build_dilated_basic_resnet_backbone` (standard stem).
    - No crop (inputs are already ``network_size``), so the ASPP pooling is global.
    - Areas scaled by ``network_size`` / 1024x2048: ``PANOPTIC_DEEPLAB.STUFF_AREA`` (2048 ->
      16 at 128x128) and ``INPUT.SMALL_INSTANCE_AREA`` (4096 -> 32); the centre Gaussian
      ``INPUT.GAUSSIAN_SIGMA`` = 2 px (10 px at 1024 px wide, objects here are 8-40 px).
    - ``norm`` "BN" everywhere (SyncBN does not run on CPU).

    Args:
        dataset_name: registered panoptic dataset (``DATASETS.TRAIN`` and ``TEST``); its
            metadata gives the thing ids and ``label_divisor`` to the model.
        num_classes: ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
        network_size: (H, W) of the input.
        depth: ResNet depth, 18, 34 or 50.
        norm: normalisation of backbone and heads.
        device: ``MODEL.DEVICE``.
    """
    if depth not in (18, 34, 50):
        raise ValueError(f"depth must be 18, 34 or 50, got {depth}.")
    cfg = get_cfg()
    add_panoptic_deeplab_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "PanopticDeepLab"
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_MEAN = list(_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.ENABLED = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0

    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = depth
    resnets.NORM = norm
    resnets.OUT_FEATURES = ["res2", "res3", "res5"]
    resnets.RES5_DILATION = 2
    resnets.DEFORM_ON_PER_STAGE = [False, False, False, False]
    if depth == 50:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_deeplab_backbone"
        resnets.STEM_TYPE = "deeplab"
        resnets.STEM_OUT_CHANNELS = 128
        resnets.STRIDE_IN_1X1 = False
        resnets.RES5_MULTI_GRID = [1, 2, 4]
    else:
        register_dilated_basic_resnet_backbone()  # the name this config gives must resolve
        cfg.MODEL.BACKBONE.NAME = "build_dilated_basic_resnet_backbone"
        resnets.STEM_OUT_CHANNELS = 64
        resnets.RES2_OUT_CHANNELS = 64

    sem = cfg.MODEL.SEM_SEG_HEAD
    ins = cfg.MODEL.INS_EMBED_HEAD
    for head in (sem, ins):  # the decoder settings both heads share
        head.IN_FEATURES = ["res2", "res3", "res5"]
        head.PROJECT_FEATURES = ["res2", "res3"]
        head.PROJECT_CHANNELS = [32, 64]
        head.ASPP_CHANNELS = 256
        head.ASPP_DILATIONS = [6, 12, 18]
        head.ASPP_DROPOUT = 0.1
        head.COMMON_STRIDE = 4
        head.NORM = norm

    sem.NAME = "PanopticDeepLabSemSegHead"
    sem.HEAD_CHANNELS = 256
    sem.CONVS_DIM = 256
    sem.NUM_CLASSES = num_classes
    sem.IGNORE_VALUE = 255
    sem.LOSS_TYPE = "hard_pixel_mining"
    sem.LOSS_TOP_K = 0.2
    sem.LOSS_WEIGHT = 1.0

    ins.NAME = "PanopticDeepLabInsEmbedHead"
    ins.HEAD_CHANNELS = 32
    ins.CONVS_DIM = 128
    ins.CENTER_LOSS_WEIGHT = 200.0
    ins.OFFSET_LOSS_WEIGHT = 0.01

    area_scale = network_size[0] * network_size[1] / _CITYSCAPES_AREA
    post = cfg.MODEL.PANOPTIC_DEEPLAB
    post.STUFF_AREA = max(1, round(2048 * area_scale))
    post.CENTER_THRESHOLD = 0.1
    post.NMS_KERNEL = 7
    post.TOP_K_INSTANCE = 200
    post.PREDICT_INSTANCES = True
    post.USE_DEPTHWISE_SEPARABLE_CONV = False
    sem.USE_DEPTHWISE_SEPARABLE_CONV = False
    cfg.INPUT.GAUSSIAN_SIGMA = 2
    cfg.INPUT.SMALL_INSTANCE_AREA = max(1, round(4096 * area_scale))
    cfg.INPUT.SMALL_INSTANCE_WEIGHT = 3
    cfg.INPUT.IGNORE_STUFF_IN_OFFSET = True
    cfg.INPUT.MIN_SIZE_TEST = min(network_size)
    cfg.INPUT.MAX_SIZE_TEST = max(network_size)

    cfg.DATASETS.TRAIN = (dataset_name,)
    cfg.DATASETS.TEST = (dataset_name,)
    return cfg


def panoptic_deeplab_target_generator(
    cfg, thing_ids: Sequence[int]
) -> PanopticDeepLabTargetGenerator:
    """Panoptic-DeepLab's own target generator with the ``cfg.INPUT`` settings of ``cfg``."""
    return PanopticDeepLabTargetGenerator(
        ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        thing_ids=list(thing_ids),
        sigma=cfg.INPUT.GAUSSIAN_SIGMA,
        ignore_stuff_in_offset=cfg.INPUT.IGNORE_STUFF_IN_OFFSET,
        small_instance_area=cfg.INPUT.SMALL_INSTANCE_AREA,
        small_instance_weight=cfg.INPUT.SMALL_INSTANCE_WEIGHT,
        ignore_crowd_in_semantic=cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC,
    )


def panoptic_deeplab_inputs(
    scenes: Sequence[SyntheticScene], target_generator: PanopticDeepLabTargetGenerator
) -> List[Dict]:
    """Panoptic-DeepLab training inputs (image + its targets, as its dataset mapper returns
    them) of scenes already at the network size."""
    inputs = []
    for scene in scenes:
        targets = target_generator(scene.pan_ids, scene.segments_info)
        image = torch.as_tensor(np.ascontiguousarray(scene.image.transpose(2, 0, 1)))
        height, width = image.shape[1:]
        inputs.append({"image": image, "height": height, "width": width, **targets})
    return inputs


class PanopticDeepLabRunner(Runner):
    """Panoptic-DeepLab (detectron2 project) for the benchmark.

    Network: backbone + semantic head + centre/offset head as in inference (outputs upsampled
    to the input size). Post-processing: its ``get_panoptic_segmentation`` (centre NMS, pixel
    grouping, merge with stuff) per image at the input size, then a nearest resize of the ids
    to ``image_size`` (a no-op when they agree).
    """

    def __init__(self, cfg: CfgNode, *, name: str = "panoptic_deeplab"):
        """
        Args:
            cfg: from :func:`panoptic_deeplab_config` (its train dataset must be registered);
                the model runs on ``cfg.MODEL.DEVICE``.
            name: name in the benchmark's table.
        """
        self.name = name
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        self.thing_ids = sorted(metadata.thing_dataset_id_to_contiguous_id.values())
        self.label_divisor = metadata.label_divisor
        self.target_generator = panoptic_deeplab_target_generator(cfg, self.thing_ids)

    def prepare(self, scenes):
        model = self.model
        return (images_tensor(scenes, self.device) - model.pixel_mean) / model.pixel_std

    def network(self, inputs):
        features = self.model.backbone(inputs)
        semantic, _ = self.model.sem_seg_head(features)
        center, offset, _, _ = self.model.ins_embed_head(features)
        return semantic, center, offset

    def postprocess(self, outputs, image_size):
        semantic, center, offset = outputs
        post = self.cfg.MODEL.PANOPTIC_DEEPLAB
        results = []
        for sem_i, center_i, offset_i in zip(semantic, center, offset):
            panoptic, _ = get_panoptic_segmentation(
                sem_i.argmax(dim=0, keepdim=True),
                center_i,
                offset_i,
                thing_ids=self.thing_ids,
                label_divisor=self.label_divisor,
                stuff_area=post.STUFF_AREA,
                void_label=-1,
                threshold=post.CENTER_THRESHOLD,
                nms_kernel=post.NMS_KERNEL,
                top_k=post.TOP_K_INSTANCE,
            )
            # Grouping used offsets in network pixels: resize the result, never the offsets.
            results.append(resize_label_map(panoptic[0], tuple(image_size)))
        return results

    def training_loss(self, scenes):
        losses = self.model(panoptic_deeplab_inputs(scenes, self.target_generator))
        return sum(losses.values())


# --------------------------------------------------------------------------- Mask2Former
MASK2FORMER_BACKBONES = ("swin_t", "r50")


def build_mask2former(backbone: str, num_classes: int):
    """
    Mask2Former (``transformers``) with random weights: the paper's panoptic setting
    (100 queries, 9 decoder layers + the initial prediction, 6-layer deformable pixel decoder,
    256-d features) on a Swin-T (96-d, depths 2-2-6-2, window 7) or ResNet-50 backbone.

    Args:
        backbone: "swin_t" or "r50".
        num_classes: number of classes (stuff + things) without the "no object" class.

    Returns:
        (model, image_processor): ``Mask2FormerForUniversalSegmentation`` in eval mode and a
        ``Mask2FormerImageProcessor`` for its post-processing.

    Raises:
        ImportError: ``transformers`` (with Mask2Former) is not installed.
    """
    if backbone not in MASK2FORMER_BACKBONES:
        raise ValueError(f"backbone must be one of {MASK2FORMER_BACKBONES}, got '{backbone}'.")
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "resnet is not a tested backbone" is expected for r50
    try:
        model = Mask2FormerForUniversalSegmentation(_mask2former_config(backbone, num_classes))
    finally:
        hf_logging.set_verbosity(verbosity)
    processor = Mask2FormerImageProcessor(num_labels=num_classes, ignore_index=255)
    return model.eval(), processor


def _mask2former_config(backbone: str, num_classes: int):
    """``Mask2FormerConfig`` of :func:`build_mask2former`."""
    from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin_t":
        backbone_config = SwinConfig(
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            drop_path_rate=0.3,
            out_features=stages,
        )
    else:
        backbone_config = ResNetConfig(
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
            out_features=stages,
        )
    return Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=num_classes,
        num_queries=100,
        decoder_layers=10,
        encoder_layers=6,
        hidden_dim=256,
        feature_size=256,
        mask_feature_size=256,
    )


class Mask2FormerRunner(Runner):
    """Mask2Former (``transformers``) for the benchmark.

    Network: ``model(pixel_values)``. Post-processing: the image processor's
    ``post_process_panoptic_segmentation`` (object threshold 0.8 and overlap threshold 0.8
    as Mask2Former's panoptic config; stuff classes fused). Training: its own Hungarian-matched
    loss from per-segment masks and classes (crowd segments left out).
    """

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int,
        stuff_ids: Sequence[int],
        name: Optional[str] = None,
        device="cpu",
    ):
        """
        Args:
            backbone: "swin_t" or "r50".
            num_classes: stuff + thing classes.
            stuff_ids: contiguous ids of the stuff classes (fused in post-processing).
            name: name in the benchmark's table (default "mask2former_<backbone>").
            device: where the model runs.
        """
        self.name = name or f"mask2former_{backbone}"
        self.model, self.processor = build_mask2former(backbone, num_classes)
        self.model.to(device)
        self.stuff_ids = set(int(i) for i in stuff_ids)
        mean = torch.tensor(self.processor.image_mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.processor.image_std, device=device).view(1, 3, 1, 1) * 255.0
        self.pixel_mean, self.pixel_std = mean, std

    def prepare(self, scenes):
        return (images_tensor(scenes, self.device) - self.pixel_mean) / self.pixel_std

    def network(self, inputs):
        return self.model(pixel_values=inputs)

    def postprocess(self, outputs, image_size):
        batch = outputs.class_queries_logits.shape[0]
        return self.processor.post_process_panoptic_segmentation(
            outputs,
            threshold=0.8,
            overlap_mask_area_threshold=0.8,
            label_ids_to_fuse=self.stuff_ids,
            target_sizes=[tuple(image_size)] * batch,
        )

    def training_loss(self, scenes):
        mask_labels, class_labels = [], []
        for scene in scenes:
            segments = [s for s in scene.segments_info if not s["iscrowd"]]
            ids = np.asarray([s["id"] for s in segments], dtype=np.int64)
            masks = scene.pan_ids[None] == ids[:, None, None]  # (N, H, W)
            classes = [s["category_id"] for s in segments]
            mask_labels.append(torch.as_tensor(masks, dtype=torch.float32, device=self.device))
            class_labels.append(torch.tensor(classes, dtype=torch.long, device=self.device))
        outputs = self.model(
            pixel_values=self.prepare(scenes), mask_labels=mask_labels, class_labels=class_labels
        )
        return outputs.loss

    def flops_module(self):
        def run(model, x):
            out = model(pixel_values=x)
            return out.class_queries_logits, out.masks_queries_logits

        return TupleOutputs(self.model, run)
