"""The network of a MaskAttnUNet as one tensor-in, tensors-out module, for tracing and export.

Input: ``"image"`` (B, 3, h, w) float32 pixels in ``INPUT.FORMAT`` channel order, 0-255, at
``INPUT.NETWORK_SIZE`` (h, w): the caller resizes (bilinear), the module normalises as the
model does (``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``, or per image with
``MODEL.PER_IMAGE_NORMALIZATION``). Outputs, all at network resolution:
``"sem_logits_nhwc"`` (B, h, w, K), the class logits channels last, then the embedding head's
outputs in the order it returns them (``"embeddings"`` (B, D, h, w), and with spatial
embeddings ``"offsets"`` (B, 2, h, w) and ``"seed_logits"`` (B, 1, h, w), with a learned
bandwidth ``"log_bandwidth"`` (B, 1, h, w)) -- what
``MaskAttnUNet.inference(do_postprocess=False)`` returns, the logits as the channels-last view
``permute(0, 3, 1, 2)`` of (B, K, h, w), so the model's post-processor runs on them unchanged.
Channels last, the post-processing's per-pixel class reductions read contiguous rows (with 133
classes ~2.5 ms less per image at batch 1 on CPU); onnxruntime writes that layout at no
measurable cost.

The model's ``preprocess_image`` also resizes first and then normalises (one function,
:func:`~maskattn_d2.modeling.meta_arch.normalize_images`).
"""
from typing import List, Tuple

import torch
from torch import nn

from ..modeling.meta_arch import normalize_images

__all__ = ["INPUT_NAME", "SEM_LOGITS_NAME", "ExportableNetwork"]

INPUT_NAME = "image"
SEM_LOGITS_NAME = "sem_logits_nhwc"


class ExportableNetwork(nn.Module):
    """Normalisation + backbone + semantic head + embedding head of a ``MaskAttnUNet``.

    ``output_names`` lists the outputs of :meth:`forward` in order (found by one dry run at
    construction, so any embedding head of the registry works).
    """

    def __init__(self, model: nn.Module):
        """
        Args:
            model: a ``MaskAttnUNet`` (or any meta-architecture with ``backbone``,
                ``sem_seg_head``, ``embed_head``, ``pixel_mean``, ``pixel_std``,
                ``per_image_normalization`` and ``network_size``); switched to eval mode, as
                export needs.
        """
        super().__init__()
        self.model = model.eval()
        self.network_size: Tuple[int, int] = tuple(int(s) for s in model.network_size)
        with torch.no_grad():
            head_outputs = model.embed_head(model.backbone(self.example_input(1)))
        self.output_names: List[str] = [SEM_LOGITS_NAME, *head_outputs]

    @property
    def num_channels(self) -> int:
        return int(self.model.pixel_mean.shape[0])

    def example_input(self, batch_size: int, seed: int = 0) -> torch.Tensor:
        """(batch_size, C, h, w) random pixels in [0, 255] on the model's device."""
        generator = torch.Generator().manual_seed(seed)
        pixels = 255 * torch.rand(batch_size, self.num_channels, *self.network_size,
                                  generator=generator)
        return pixels.to(self.model.pixel_mean.device)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, C, h, w) pixels -> (sem_logits (B, h, w, K), *embedding head outputs), float32."""
        model = self.model
        x = normalize_images(
            image, model.pixel_mean, model.pixel_std, model.per_image_normalization
        )
        features = model.backbone(x)
        sem_logits = model.sem_seg_head(features).permute(0, 2, 3, 1)
        head_outputs = model.embed_head(features)
        outputs = (sem_logits, *(head_outputs[name] for name in self.output_names[1:]))
        # Only a half-precision model needs the cast: exported, even a float32 -> float32 cast
        # stays a copy (of the largest tensor, the logits: ~3 % of the batch-16 run time).
        return tuple(t if t.dtype == torch.float32 else t.float() for t in outputs)
