"""Flip test-time augmentation at network resolution: the network sees each image and its
flipped copies in one batch; the outputs are flipped back and averaged before postprocessing.

Flipping the resized, normalised image equals resizing the flipped image (bilinear resizing is
mirror-symmetric), so the views are made from the network input. What is averaged: the class
logits, the seed logits and the embeddings as they are (the postprocessor renormalises
embeddings), and the offsets after flipping them back, where the offset component along a
flipped axis also changes sign (a vector (dy, dx) seen in a horizontally flipped image is
(dy, -dx) in the image).
"""
from typing import Callable, Dict, Sequence, Tuple

import torch

__all__ = ["FLIP_VIEWS", "check_flip_views", "flip_views_from_config", "run_with_flips"]

# The flipped views, each as the image dimensions (of a (B, C, h, w) batch) it flips.
FLIP_VIEWS = {"horizontal": (3,), "vertical": (2,), "both": (2, 3)}


def flip_views_from_config(cfg) -> Tuple[str, ...]:
    """The flipped views of ``cfg.TEST.AUG``: none unless ENABLED; "horizontal" with FLIP
    (detectron2's key), "vertical" with VERTICAL_FLIP, and "both" when both are set."""
    aug = cfg.TEST.AUG
    if not aug.ENABLED:
        return ()
    views = []
    if aug.FLIP:
        views.append("horizontal")
    if aug.VERTICAL_FLIP:
        views.append("vertical")
    if aug.FLIP and aug.VERTICAL_FLIP:
        views.append("both")
    if not views:
        raise ValueError(
            "TEST.AUG.ENABLED is True but neither TEST.AUG.FLIP nor TEST.AUG.VERTICAL_FLIP is: "
            "the model's test-time augmentation only has flips (the network size is fixed)."
        )
    return tuple(views)


def check_flip_views(views: Sequence[str]) -> None:
    """Reject names that are not in :data:`FLIP_VIEWS`."""
    bad = [v for v in views if v not in FLIP_VIEWS]
    if bad:
        raise ValueError(
            f"unknown flip views (test_flips) {bad}; expected names in {sorted(FLIP_VIEWS)}."
        )


def run_with_flips(
    run_network: Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
    images: torch.Tensor,
    views: Sequence[str],
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """
    Average of ``run_network`` over ``images`` and its flipped ``views``, in one call.

    Args:
        run_network: (N, C, h, w) images -> (sem_logits (N, K, h, w), {name: (N, c, h, w)}),
            where an ``"offsets"`` output holds (dy, dx) in its two channels.
        images: (B, C, h, w) network input.
        views: names in :data:`FLIP_VIEWS`; none: ``run_network(images)`` alone.

    Returns:
        what ``run_network`` returns for ``images``, averaged over the views.
    """
    check_flip_views(views)
    if not views:
        return run_network(images)
    dims = [()] + [FLIP_VIEWS[v] for v in views]
    batch = images.shape[0]
    flipped = [images if not d else images.flip(d) for d in dims]
    sem_logits, outputs = run_network(torch.cat(flipped))

    def average(value: torch.Tensor, is_offset: bool) -> torch.Tensor:
        total = None
        for i, d in enumerate(dims):
            view = value[i * batch:(i + 1) * batch]
            if d:
                view = view.flip(d)
                if is_offset:
                    # Channel 0 is dy (image dim 2), channel 1 is dx (image dim 3).
                    sign = view.new_tensor([-1.0 if 2 in d else 1.0, -1.0 if 3 in d else 1.0])
                    view = view * sign.view(1, 2, 1, 1)
            total = view if total is None else total + view
        return total / len(dims)

    return average(sem_logits, False), {
        name: average(value, name == "offsets") for name, value in outputs.items()
    }
