"""Synthetic panoptic scenes rendered in-process at the network size, from which every model of
the benchmark builds its own input and training targets."""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from maskattn_d2.data.datasets import SYNTHETIC_CATEGORIES, panoptic_metadata, render_scene

__all__ = ["SyntheticScene", "images_tensor", "synthetic_scenes"]


@dataclass
class SyntheticScene:
    """One rendered panoptic scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        pan_ids: (H, W) int64 segment ids, 0 = void.
        segments_info: dicts with "id", contiguous "category_id", "iscrowd" and "isthing".
    """

    image: np.ndarray
    pan_ids: np.ndarray
    segments_info: List[Dict] = field(default_factory=list)


def synthetic_scenes(num: int, size: Tuple[int, int], *, seed: int = 0) -> List[SyntheticScene]:
    """
    Render ``num`` synthetic panoptic scenes (the classes of the embedded synthetic dataset:
    contiguous ids 0-2 are things, 3-5 stuff) directly at ``size``.

    Args:
        num: number of scenes, >= 1.
        size: (H, W) in pixels, each >= 32 (objects are 8-40 px).
        seed: seed of the numpy generator.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (H, W) with H, W >= 32, got {tuple(size)}.")
    metadata = panoptic_metadata(SYNTHETIC_CATEGORIES)
    to_contiguous = metadata["stuff_dataset_id_to_contiguous_id"]
    thing_ids = set(metadata["thing_dataset_id_to_contiguous_id"].values())
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(num):
        image, pan_ids, segments = render_scene(rng, int(size[0]), int(size[1]))
        segments_info = []
        for segment in segments:
            category = to_contiguous[segment["category_id"]]
            segments_info.append(
                {
                    "id": int(segment["id"]),
                    "category_id": category,
                    "iscrowd": int(segment.get("iscrowd", 0)),
                    "isthing": category in thing_ids,
                }
            )
        scenes.append(SyntheticScene(image, pan_ids.astype(np.int64), segments_info))
    return scenes


def images_tensor(scenes: Sequence[SyntheticScene], device) -> torch.Tensor:
    """(B, 3, H, W) float32 RGB in 0-255."""
    array = np.stack([s.image for s in scenes]).transpose(0, 3, 1, 2)
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)
