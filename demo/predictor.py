"""Run a MaskAttn-UNet on one image and draw its outputs (used by demo.py).

The predictions come from detectron2's ``DefaultPredictor`` (ResizeShortestEdge to
``INPUT.MIN_SIZE_TEST``, then the model resizes to ``INPUT.NETWORK_SIZE`` itself and returns
outputs at the image's original size); the pictures are drawn with detectron2's
``Visualizer`` and :mod:`maskattn_d2.utils.visualization`.
"""
from typing import Dict, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine.defaults import DefaultPredictor
from detectron2.utils.visualizer import ColorMode

from maskattn_d2.utils.visualization import (
    GATE_LAYOUTS,
    ReadableVisualizer,
    drawn_size,
    embeddings_to_rgb,
    render_gate_heatmaps,
)

__all__ = ["VisualizationDemo"]

# Longest side of a gate panel: the gates are 128/stride pixels wide, bigger panels only
# multiply the file size (the side-by-side picture has 1 + number of gates panels).
GATE_PANEL_MAX_SIZE = 640

# Picture name -> the model output it draws.
_OUTPUT_OF_PICTURE = {"panoptic": "panoptic_seg", "instances": "instances", "semantic": "sem_seg"}


class VisualizationDemo:
    """Predictions and pictures of one image: panoptic, instances, semantic, and optionally the
    PCA picture of the pixel embeddings and the gate heat-maps."""

    def __init__(
        self,
        cfg,
        *,
        confidence_threshold: float = 0.5,
        show_embeddings: bool = False,
        show_gates: bool = False,
        gate_layout: str = "side_by_side",
        predictor=None,
    ):
        """
        Args:
            cfg: a frozen config of a MaskAttnUNet with non-empty ``DATASETS.TEST`` (its first
                dataset gives the class names and colours).
            confidence_threshold: instances scoring below it are left out of the instances
                picture (the panoptic picture shows every segment).
            show_embeddings: also draw the pixel embeddings (PCA -> RGB).
            show_gates: also draw the mask-attention gates.
            gate_layout: "side_by_side" or "overlay", see :func:`render_gate_heatmaps`.
            predictor: what predicts, with DefaultPredictor's interface (default
                ``DefaultPredictor(cfg)``), e.g. ``maskattn_d2.export.ONNXRuntimePredictor``.
        """
        if not len(cfg.DATASETS.TEST):
            raise ValueError("The demo needs DATASETS.TEST: its first dataset names the classes.")
        if gate_layout not in GATE_LAYOUTS:
            raise ValueError(f"gate_layout must be one of {GATE_LAYOUTS}, got '{gate_layout}'.")
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        classes = self.metadata.get("stuff_classes")
        if classes is None or len(classes) != num_classes:
            raise ValueError(
                f"Dataset '{cfg.DATASETS.TEST[0]}' (DATASETS.TEST[0]) has "
                f"{'no' if classes is None else len(classes)} classes but the model predicts "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}: the pictures would be mislabelled."
            )
        self.predictor = DefaultPredictor(cfg) if predictor is None else predictor
        self.confidence_threshold = confidence_threshold
        self.show_embeddings = show_embeddings
        self.show_gates = show_gates
        self.gate_layout = gate_layout
        # Why the "gates" picture cannot be drawn (set on the first image), else None.
        self.gates_unavailable = None

    def run_on_image(
        self, image: np.ndarray, scale: float = 1.0
    ) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """
        Args:
            image: (H, W, 3) uint8 image in BGR order (as ``cv2.imread`` or detectron2's
                ``read_image(path, format="BGR")`` return it).
            scale: the pictures are drawn at (H, W) * scale (predictions are made on the
                image itself); gate panels at most ``GATE_PANEL_MAX_SIZE`` on their longer side.

        Returns:
            predictions: the model's output dict for the image ("sem_seg", "instances",
                "panoptic_seg" at size (H, W), those that MODEL.MASK_ATTN_POSTPROCESS turns on).
            pictures: name -> uint8 RGB picture: "panoptic", "instances", "semantic" (for
                the outputs present) and "embeddings" when asked, each (H, W) * scale; "gates"
                when asked, panels of (h, w) = (H, W) * min(scale, GATE_PANEL_MAX_SIZE /
                max(H, W)): (h + bar, (1 + G) * w) side by side with G gates or (h + bar, w)
                overlaid (bar: ``colorbar_height(h)``), left out when the model has no gates
                (the reason is in ``gates_unavailable``).
        """
        predictions = self.predictor(image)
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        height, width = rgb.shape[:2]
        drawn = drawn_size(height, width, scale)
        pictures = {
            kind: self._draw(rgb, kind, predictions, scale)
            for kind, key in _OUTPUT_OF_PICTURE.items()
            if key in predictions  # MASK_ATTN_POSTPROCESS.*_ON may turn outputs off
        }
        if self.show_embeddings or self.show_gates:
            embeddings, gates = self._embeddings_and_gates(image)
            if self.show_embeddings:
                pictures["embeddings"] = embeddings_to_rgb(embeddings, output_size=drawn)
            if self.show_gates:
                if gates:
                    gate_scale = min(scale, GATE_PANEL_MAX_SIZE / max(height, width))
                    panel_h, panel_w = drawn_size(height, width, gate_scale)
                    panel = cv2.resize(
                        rgb,
                        (panel_w, panel_h),
                        interpolation=cv2.INTER_AREA if gate_scale < 1 else cv2.INTER_NEAREST,
                    )
                    pictures["gates"] = render_gate_heatmaps(panel, gates, layout=self.gate_layout)
                elif not hasattr(self.predictor.model, "backbone"):
                    self.gates_unavailable = "the exported network does not output the gates"
                else:
                    self.gates_unavailable = (
                        "the model has no gated mask attention (MODEL.MASK_ATTN.MASK_KIND "
                        "'gate' or 'hard' with non-empty ENCODER_SCALES/DECODER_SCALES)"
                    )
        return predictions, pictures

    def _draw(self, rgb: np.ndarray, kind: str, predictions: Dict, scale: float) -> np.ndarray:
        visualizer = ReadableVisualizer(
            rgb, self.metadata, scale=scale, instance_mode=ColorMode.IMAGE
        )
        if kind == "panoptic":
            panoptic, segments_info = predictions["panoptic_seg"]
            out = visualizer.draw_panoptic_seg(panoptic.to("cpu"), segments_info)
        elif kind == "instances":
            instances = predictions["instances"].to("cpu")
            instances = instances[instances.scores >= self.confidence_threshold]
            out = visualizer.draw_instance_predictions(instances)
        else:
            out = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to("cpu"))
        return out.get_image()

    @torch.no_grad()
    def _embeddings_and_gates(self, image: np.ndarray):
        """(D, h, w) pixel embeddings and {name: (1, h_s, w_s)} gate logits of the image, from
        the same input the predictor builds (a second pass through the backbone; an exported
        network gives its embeddings output and no gates)."""
        predictor = self.predictor
        model = predictor.model
        original = image[:, :, ::-1] if predictor.input_format == "RGB" else image
        resized = predictor.aug.get_transform(original).apply_image(original)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        if not hasattr(model, "backbone"):  # maskattn_d2.export.ONNXRuntimeModel
            _, head_outputs = model.inference([{"image": tensor}], do_postprocess=False)
            return head_outputs["embeddings"][0].float(), {}
        images = model.preprocess_image([{"image": tensor}])
        features, gates = model.backbone.forward_with_gates(images)
        embeddings = model.embed_head(features)["embeddings"][0].float()
        return embeddings, {name: g[0].float() for name, g in gates.items()}
