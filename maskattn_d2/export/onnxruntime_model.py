"""Run an exported MaskAttn-UNet network (ONNX) with onnxruntime, post-processed by the model's
own post-processor, so that it returns what the PyTorch model returns.

    model = ONNXRuntimeModel(cfg, "export/model.onnx")
    outputs = model([{"image": image_chw_tensor, "height": H, "width": W}])
    # outputs[0]["panoptic_seg"], ["instances"], ["sem_seg"], as MaskAttnUNet's inference

    predictor = ONNXRuntimePredictor(cfg, "export/model.onnx")  # like DefaultPredictor
    outputs = predictor(bgr_uint8_image)
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import detectron2.data.transforms as T

from ..modeling.meta_arch import build_postprocessor, postprocess_batch
from ..modeling.test_time_flips import flip_views_from_config, run_with_flips
from .export import read_onnx_metadata
from .network import INPUT_NAME, SEM_LOGITS_NAME

__all__ = ["ONNXRuntimeModel", "ONNXRuntimePredictor", "import_onnxruntime"]


def import_onnxruntime():
    """The onnxruntime module, or an ImportError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "The onnxruntime backend needs the packages onnx and onnxruntime: install the "
            "project's 'onnx' extra (pip install -e '.[onnx]'; make setup installs it)."
        ) from e
    return onnxruntime


class ONNXRuntimeModel:
    """An exported network run by onnxruntime on CPU, with the config's post-processing.

    Called like ``MaskAttnUNet`` in inference: a list of dicts with ``"image"`` (C, H, W)
    pixels in ``INPUT.FORMAT`` order (any size) and optionally ``"height"``/``"width"``;
    returns a list of dicts with ``"sem_seg"``, ``"instances"`` and ``"panoptic_seg"``
    (those ``MODEL.MASK_ATTN_POSTPROCESS.*_ON`` turns on) at those sizes.
    """

    def __init__(self, cfg, onnx_path: str, *, num_threads: Optional[int] = None):
        """
        Args:
            cfg: the config the network was exported with (classes, network size, input
                format and post-processing are read from it and checked against the file).
            onnx_path: the ``model.onnx`` written by ``tools/export_model.py``.
            num_threads: onnxruntime intra-op threads; default ``torch.get_num_threads()``,
                so both backends use the same number of cores.
        """
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(
                f"ONNX model not found: {onnx_path} (write one with tools/export_model.py "
                "--format onnx)."
            )
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Threads spin while the network runs (waking sleeping ones costs ~20 % at batch 1),
        # but stop when it returns: spinning on, they took the cores from the PyTorch
        # postprocessing that follows (~1.7x its time at batch 1).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(
                onnx_path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise ValueError(f"onnxruntime cannot load {onnx_path}: {e}") from e
        self.onnx_path = onnx_path
        self.network_size: Tuple[int, int] = tuple(int(s) for s in cfg.INPUT.NETWORK_SIZE)
        self.input_format = cfg.INPUT.FORMAT
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]
        self._check_against_config(cfg)
        self.postprocessor = build_postprocessor(cfg)
        post = cfg.MODEL.MASK_ATTN_POSTPROCESS
        self.semantic_on = post.SEMANTIC_ON
        self.instance_on = post.INSTANCE_ON
        self.panoptic_on = post.PANOPTIC_ON
        # TEST.AUG's flips, as the PyTorch model runs them (the exported network has none).
        self.test_flips = flip_views_from_config(cfg)

    def _check_against_config(self, cfg) -> None:
        """The file's input, outputs and metadata agree with ``cfg``, else a ValueError that
        names the mismatch."""
        problems = []
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            problems.append(f"inputs {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
        else:
            shape = inputs[0].shape  # [batch (symbolic), C, h, w]
            self.num_channels = int(shape[1])
            if tuple(shape[2:]) != self.network_size:
                problems.append(f"network size {tuple(shape[2:])} but INPUT.NETWORK_SIZE is "
                                f"{self.network_size}")
        if not self.output_names or self.output_names[0] != SEM_LOGITS_NAME:
            problems.append(
                f"outputs {self.output_names}, expected '{SEM_LOGITS_NAME}' first (a file "
                "exported before the logits became channels last: export it again)"
            )
        else:
            classes = self.session.get_outputs()[0].shape[3]  # (batch, h, w, K)
            if classes != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
                problems.append(f"{classes} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                                f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}")
        metadata = read_onnx_metadata(self.onnx_path)
        file_format = metadata.get("input_format")
        if file_format is not None and file_format != cfg.INPUT.FORMAT:
            problems.append(f"input format {file_format} but INPUT.FORMAT is {cfg.INPUT.FORMAT}")
        # Files exported before the key existed normalised with PIXEL_MEAN / PIXEL_STD.
        per_image = metadata.get("per_image_normalization", "False" if metadata else None)
        if per_image is not None and per_image != str(bool(cfg.MODEL.PER_IMAGE_NORMALIZATION)):
            problems.append(f"per-image normalization {per_image} but "
                            f"MODEL.PER_IMAGE_NORMALIZATION is {cfg.MODEL.PER_IMAGE_NORMALIZATION}")
        if problems:
            raise ValueError(
                f"{self.onnx_path} does not match the config: {'; '.join(problems)}. Use the "
                "config it was exported with (tools/export_model.py writes it next to the file "
                "as config.yaml)."
            )

    def run_network(self, images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(B, C, h, w) pixels at the network size -> ``(sem_logits (B, K, h, w), {name:
        (B, C, h, w)})``, as ``MaskAttnUNet.inference(do_postprocess=False)``."""
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outputs = self.session.run(self.output_names, {INPUT_NAME: array})
        tensors = [torch.from_numpy(o) for o in outputs]
        # The logits arrive channels last: a (B, K, h, w) view, as the eager model's.
        return tensors[0].permute(0, 3, 1, 2), dict(zip(self.output_names[1:], tensors[1:]))

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Every image resized (bilinear) to the network size: (B, C, h, w) float32 pixels."""
        images = []
        for i, inputs in enumerate(batched_inputs):
            image = inputs["image"]
            if image.dim() != 3 or image.shape[0] != self.num_channels:
                raise ValueError(
                    f"Input {i} ({inputs.get('file_name', 'no file_name')}): expected an image of "
                    f"shape ({self.num_channels}, H, W), got {tuple(image.shape)}."
                )
            image = image.to("cpu", torch.float32)
            if tuple(image.shape[-2:]) != self.network_size:
                image = F.interpolate(
                    image[None], size=self.network_size, mode="bilinear", align_corners=False
                )[0]
            images.append(image)
        return torch.stack(images)

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """As ``MaskAttnUNet.inference``: per-image output dicts, or with
        ``do_postprocess=False`` the raw ``(sem_logits, head_outputs)``; with TEST.AUG's
        flips, averaged over them."""
        images = self.preprocess_image(batched_inputs)
        sem_logits, head_outputs = run_with_flips(self.run_network, images, self.test_flips)
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

    __call__ = inference


class ONNXRuntimePredictor:
    """detectron2's ``DefaultPredictor`` for an exported network: one image in
    (H, W, C) BGR uint8, its output dict out (at the image's size)."""

    def __init__(self, cfg, onnx_path: str, *, num_threads: Optional[int] = None):
        self.cfg = cfg.clone()
        self.model = ONNXRuntimeModel(cfg, onnx_path, num_threads=num_threads)
        # The same resize as DefaultPredictor, so both backends see the same pixels.
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format}")

    def __call__(self, original_image: np.ndarray) -> Dict:
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": image, "height": height, "width": width}])[0]
