"""Pictures of what MaskAttn-UNet computes besides its outputs: pixel embeddings and gates.

- :func:`embeddings_to_rgb`: the first three principal components of the pixel embeddings as
  an RGB picture (pixels of one instance get one colour once the embedding head is trained).
- :func:`render_gate_heatmaps`: the mask-attention gates (sigmoid of the gate logits) as
  heat-maps over the image, one panel per scale or averaged into one overlay.

Both are config-free and return uint8 RGB numpy arrays; write them with
``cv2.imwrite(path, picture[:, :, ::-1])``.
"""
from typing import Dict, Mapping, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GATE_LAYOUTS", "embeddings_to_rgb", "gate_probability_maps", "render_gate_heatmaps"]

GATE_LAYOUTS = ("side_by_side", "overlay")


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
    alpha: float = 0.5,
) -> np.ndarray:
    """
    Heat-maps of the mask-attention gates over the image (JET colours: blue = gate near 0,
    the key is suppressed; red = gate near 1, the key is kept).

    Layouts:

    - ``"side_by_side"``: the image, then one panel per gate (the gate of that scale blended
      over the image, labelled with its name and mean value), concatenated left to right:
      the picture is (H, (1 + number of gates) * W, 3).
    - ``"overlay"``: the mean of all gates' probability maps blended over the image, labelled
      with the gate names: the picture is (H, W, 3), the image's size.

    Args:
        image: (H, W, 3) uint8 RGB image the gates were computed on (any size: gates are
            resized to it).
        gates: name -> gate logits of this image, (1, h, w) or (h, w), e.g. one image's slice
            of the ``gates`` of ``backbone.forward_with_gates``.
        layout: "side_by_side" or "overlay".
        alpha: weight of the heat-map in the blend, in [0, 1].

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
        mean_map = torch.stack(list(maps.values())).mean(dim=0)
        panel = _blend_heatmap(image, mean_map, alpha)
        return _label(panel, "gates " + "+".join(maps) + f" mean={float(mean_map.mean()):.2f}")
    panels = [_label(image.copy(), "image")]
    for name, prob in maps.items():
        label = f"{name} mean={float(prob.mean()):.2f}"
        panels.append(_label(_blend_heatmap(image, prob, alpha), label))
    return np.concatenate(panels, axis=1)


def _blend_heatmap(image: np.ndarray, prob: torch.Tensor, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``image`` blended with the JET colouring of ``prob`` (H, W)."""
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
