"""Pictures of what MaskAttn-UNet computes besides its outputs: pixel embeddings and gates.

- :func:`embeddings_to_rgb`: the first three principal components of the pixel embeddings as
  an RGB picture (pixels of one instance get one colour once the embedding head is trained).
- :func:`render_gate_heatmaps`: the mask-attention gates (sigmoid of the gate logits) as
  heat-maps over the image, one panel per scale or averaged into one overlay, each with a
  colour bar giving its value range.
- :class:`ReadableVisualizer`: detectron2's ``Visualizer`` whose labels keep a readable size
  when a small image is drawn upscaled and stay inside the picture.
- :func:`display_scale`: the drawing scale of an image (small ones up, huge ones down).

Both are config-free and return uint8 RGB numpy arrays; write them with
``cv2.imwrite(path, picture[:, :, ::-1])``.
"""
from typing import Dict, Mapping, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils.visualizer import Visualizer

__all__ = [
    "GATE_LAYOUTS",
    "GATE_VALUE_RANGES",
    "ReadableVisualizer",
    "colorbar_height",
    "display_scale",
    "drawn_size",
    "embeddings_to_rgb",
    "gate_probability_maps",
    "render_gate_heatmaps",
]

GATE_LAYOUTS = ("side_by_side", "overlay")
# "stretch": each panel's colours span its own 1st..99th percentile (the gates of a trained
# model often differ by a few hundredths only); "full": the colours span 0..1.
GATE_VALUE_RANGES = ("stretch", "full")
# Least width of a stretched range: a constant map is not stretched into noise.
_MIN_STRETCH = 0.05


def display_scale(height: int, width: int, min_size: int = 512, max_size: int = 1600) -> float:
    """The factor an image is drawn at: small images up so that the shorter side is
    ``min_size`` (their labels would cover them), huge ones down so that the longer side is
    ``max_size`` (drawing costs time and memory, and the model sees 128x128 anyway); 0
    disables either bound. The longer side never ends above ``max_size``."""
    scale = 1.0
    if min_size and min(height, width) < min_size:
        scale = min_size / min(height, width)
    if max_size and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def drawn_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """(height, width) of an image drawn at ``scale`` by detectron2's Visualizer (which
    truncates: ``int(side * scale + 0.01)``)."""
    return int(height * scale + 1e-2), int(width * scale + 1e-2)


def colorbar_height(height: int) -> int:
    """Height in pixels of the colour-bar strip under gate panels of ``height`` pixels."""
    return max(18, int(round(height * 0.08)))


def embeddings_to_rgb(
    embeddings: torch.Tensor,
    *,
    output_size: Optional[Tuple[int, int]] = None,
    max_fit_pixels: int = 16384,
    clip_quantile: float = 0.01,
    seed: int = 0,
) -> np.ndarray:
    """
    Principal-component picture of pixel embeddings.

    The three leading principal components of the (centred) embeddings become the R, G and B
    channels: ``128 + 127 * c / s`` (clipped), with ONE scale ``s`` for the three, the
    ``1 - clip_quantile`` quantile of their absolute values. Sharing the scale keeps the
    components' relative variances, so a component with little variance stays near mid-grey
    instead of being stretched into noise, and a few outliers do not wash out the picture.
    The sign of each component is fixed (largest loading positive), so colours are
    deterministic.

    Args:
        embeddings: (D, h, w) float pixel embeddings, any D >= 1 (channels beyond D are 0).
        output_size: (H, W) of the picture (bilinear resize of the components); default (h, w).
        max_fit_pixels: the PCA basis and quantiles are fitted on at most this many pixels
            (a seeded random subset), then applied to all pixels.
        clip_quantile: fraction in [0, 0.5) of the largest absolute component values that are
            clipped (saturated).
        seed: seed of the subset draw.

    Returns:
        (H, W, 3) uint8 RGB picture.
    """
    if embeddings.dim() != 3 or embeddings.shape[0] < 1:
        raise ValueError(f"embeddings must have shape (D, h, w), got {tuple(embeddings.shape)}.")
    if not 0.0 <= clip_quantile < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}.")
    _, h, w = embeddings.shape
    points = embeddings.detach().float().flatten(1).t()  # (N, D)
    fit = points
    if points.shape[0] > max_fit_pixels:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(points.shape[0], generator=generator)[:max_fit_pixels]
        fit = points[index.to(points.device)]
    mean = fit.mean(dim=0)
    centred_fit = fit - mean
    covariance = centred_fit.t() @ centred_fit / max(fit.shape[0] - 1, 1)
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    basis = eigenvectors.flip(dims=[1])[:, :3]  # (D, min(D, 3)), leading components first
    basis = basis * _positive_sign(basis)
    fit_components = centred_fit @ basis
    scale = torch.quantile(fit_components.abs().flatten(), 1.0 - clip_quantile).clamp(min=1e-6)
    components = (points - mean) @ basis  # (N, k)
    scaled = (0.5 + 0.5 * components / scale).clamp(0.0, 1.0)
    if scaled.shape[1] < 3:
        scaled = torch.cat([scaled, scaled.new_zeros(scaled.shape[0], 3 - scaled.shape[1])], 1)
    picture = scaled.t().reshape(3, h, w)
    if output_size is not None and tuple(output_size) != (h, w):
        size = (int(output_size[0]), int(output_size[1]))
        picture = F.interpolate(picture[None], size=size, mode="bilinear", align_corners=False)
        picture = picture[0].clamp(0.0, 1.0)
    return (picture.permute(1, 2, 0) * 255.0).round().to(torch.uint8).cpu().numpy()


def _positive_sign(basis: torch.Tensor) -> torch.Tensor:
    """(k,) signs that make the largest-magnitude loading of each column of ``basis`` positive."""
    largest = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[largest, torch.arange(basis.shape[1], device=basis.device)])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def gate_probability_maps(
    gates: Mapping[str, torch.Tensor], output_size: Tuple[int, int]
) -> Dict[str, torch.Tensor]:
    """
    Gate probabilities (sigmoid of the logits) of one image, each resized to ``output_size``.

    Args:
        gates: name (e.g. "enc4", "dec8") -> gate logits of one image, (1, h, w) or (h, w);
            a (1, 1, h, w) batch of one is accepted too.
        output_size: (H, W).

    Returns:
        name -> (H, W) float probabilities in [0, 1] (bilinear), in the order of ``gates``.
    """
    maps = {}
    for name, logits in gates.items():
        logits = logits.detach().float()
        while logits.dim() > 2 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 2:
            raise ValueError(
                f"gate '{name}' must be the logits of one image, (1, h, w) or (h, w); got shape "
                f"{tuple(gates[name].shape)}."
            )
        size = (int(output_size[0]), int(output_size[1]))
        resized = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)
        maps[name] = torch.sigmoid(resized[0, 0])
    return maps


def render_gate_heatmaps(
    image: np.ndarray,
    gates: Mapping[str, torch.Tensor],
    *,
    layout: str = "side_by_side",
    alpha: float = 0.6,
    value_range: str = "stretch",
    colorbar: bool = True,
) -> np.ndarray:
    """
    Heat-maps of the mask-attention gates over the image (JET colours: blue = low gate, the
    key is suppressed; red = high gate, the key is kept).

    Layouts:

    - ``"side_by_side"``: the image, then one panel per gate (the gate of that scale blended
      over the image, labelled with its name and mean value), concatenated left to right:
      (H, (1 + number of gates) * W) pixels, plus the colour-bar strip.
    - ``"overlay"``: the mean of all gates' probability maps blended over the image, labelled
      with the gate names: the image's size, plus the colour-bar strip.

    Args:
        image: (H, W, 3) uint8 RGB image the gates were computed on (any size: gates are
            resized to it).
        gates: name -> gate logits of this image, (1, h, w) or (h, w), e.g. one image's slice
            of the ``gates`` of ``backbone.forward_with_gates``.
        layout: "side_by_side" or "overlay".
        alpha: weight of the heat-map in the blend, in [0, 1].
        value_range: "stretch" (default): the colours of each panel span its own 1st..99th
            percentile (at least 0.05 wide), so small differences are visible; "full": they
            span 0..1, comparable across panels and images.
        colorbar: add a strip of ``colorbar_height(H)`` rows under the panels: under each
            heat-map its colour bar, labelled with the values of its two ends.

    Returns:
        uint8 RGB picture, see the layouts.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} and dtype "
            f"{image.dtype}."
        )
    if layout not in GATE_LAYOUTS:
        raise ValueError(f"layout must be one of {GATE_LAYOUTS}, got '{layout}'.")
    if value_range not in GATE_VALUE_RANGES:
        raise ValueError(f"value_range must be one of {GATE_VALUE_RANGES}, got '{value_range}'.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if not gates:
        raise ValueError(
            "No gates to draw: the model has no mask attention module with a gate "
            "(MODEL.MASK_ATTN.MASK_KIND 'gate' or 'hard' at some ENCODER_SCALES/DECODER_SCALES)."
        )
    height, width = image.shape[:2]
    maps = gate_probability_maps(gates, (height, width))
    if layout == "overlay":
        named = {"gates " + "+".join(maps): torch.stack(list(maps.values())).mean(dim=0)}
        panels, bars = [], []
    else:
        named = dict(maps)
        panels, bars = [_label(image.copy(), "image")], [_bar_legend(width, height)]
    for name, prob in named.items():
        low, high = _value_range(prob, value_range)
        panel = _blend_heatmap(image, (prob - low) / (high - low), alpha)
        panels.append(_label(panel, f"{name} mean={float(prob.mean()):.2f}"))
        bars.append(_colorbar(width, height, low, high))
    picture = np.concatenate(panels, axis=1)
    if colorbar:
        picture = np.concatenate([picture, np.concatenate(bars, axis=1)], axis=0)
    return np.ascontiguousarray(picture)


def _value_range(prob: torch.Tensor, value_range: str) -> Tuple[float, float]:
    """(low, high) probabilities mapped to the two ends of the colour map."""
    if value_range == "full":
        return 0.0, 1.0
    values = prob.flatten().float()
    if values.numel() > 65536:
        values = values[torch.linspace(0, values.numel() - 1, 65536).long()]
    low, high = (float(v) for v in torch.quantile(values, torch.tensor([0.01, 0.99])))
    if high - low < _MIN_STRETCH:
        centre = 0.5 * (low + high)
        low = min(max(centre - _MIN_STRETCH / 2, 0.0), 1.0 - _MIN_STRETCH)
        high = low + _MIN_STRETCH
    return low, high


def _colorbar(width: int, height: int, low: float, high: float) -> np.ndarray:
    """(colorbar_height(height), width, 3) strip: the JET colour map left (low) to right
    (high) in the middle half, with the two values written at its ends."""
    bar_h = colorbar_height(height)
    strip = np.zeros((bar_h, width, 3), np.uint8)
    levels = np.linspace(0, 255, width).round().astype(np.uint8)[None, :]
    jet = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[0, :, ::-1]
    strip[: bar_h // 2] = jet[None]
    scale = bar_h / 2 / 22.0
    for text, right in ((f"{low:.2f}", False), (f"{high:.2f}", True)):
        (text_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = width - text_w - 2 if right else 2
        cv2.putText(strip, text, (max(x, 0), bar_h - 3), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def _bar_legend(width: int, height: int) -> np.ndarray:
    """The strip under the image panel: what the colours mean."""
    bar_h = colorbar_height(height)
    strip = np.zeros((bar_h, width, 3), np.uint8)
    scale = bar_h / 2 / 22.0
    cv2.putText(strip, "gate: blue low (suppressed) .. red high (kept)", (2, bar_h - 3),
                cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def _blend_heatmap(image: np.ndarray, prob: torch.Tensor, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``image`` blended with the JET colouring of ``prob`` (H, W, values
    in [0, 1] after the range mapping; clipped)."""
    levels = (prob.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    heat = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.ascontiguousarray(blended.round().clip(0, 255).astype(np.uint8))


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner of ``panel`` (white on a dark outline), in place."""
    scale = max(panel.shape[0], panel.shape[1]) / 640.0 * 0.6 + 0.25
    origin = (4, int(14 * scale / 0.6) + 2)
    for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(
            panel, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA
        )
    return panel


class ReadableVisualizer(Visualizer):
    """detectron2's ``Visualizer`` with labels people can read.

    - The label size follows the *drawn* picture (about 1/60 of its shorter side, at least
      8 points), not the image: a 128-pixel image drawn upscaled (``scale`` > 1) gets labels
      that cover a small part of it instead of overlapping each other.
    - A label is moved inside the picture when it would cross its border (detectron2 centres
      it on the segment, so labels of segments at the border were clipped).
    """

    def __init__(self, img_rgb, metadata=None, scale: float = 1.0, instance_mode=None):
        kwargs = {} if instance_mode is None else {"instance_mode": instance_mode}
        super().__init__(img_rgb, metadata, scale=scale, **kwargs)
        drawn_short_side = min(self.output.height, self.output.width) * scale
        self._default_font_size = max(8.0, drawn_short_side / 60.0) / scale

    def draw_text(self, text, position, *, font_size=None, horizontal_alignment="center",
                  **kwargs):
        size = font_size or self._default_font_size
        # Text extent in image pixels: a point is dpi/72 canvas pixels, i.e. dpi/72/scale
        # image pixels per point of ``size * scale``; glyphs are about 0.6 em wide.
        em = size * self.output.dpi / 72.0
        pad = 0.7 * em  # the black box detectron2 draws around the text
        text_w, text_h = 0.6 * em * len(str(text)) + 2 * pad, 1.2 * em + 2 * pad
        x, y = float(position[0]), float(position[1])
        width, height = self.output.width, self.output.height
        left = {"center": text_w / 2, "left": pad, "right": text_w - pad}[horizontal_alignment]
        x = min(max(x, left), max(width - (text_w - left), left))
        y = min(max(y, pad), max(height - text_h + pad, pad))  # verticalalignment "top"
        return super().draw_text(text, (x, y), font_size=font_size,
                                 horizontal_alignment=horizontal_alignment, **kwargs)
