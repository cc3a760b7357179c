"""Resizing the segment map to the output size with smooth thing boundaries."""
from typing import Tuple

import torch
import torch.nn.functional as F

from ...structures.label_maps import resize_label_map

__all__ = ["upsample_segment_map"]


def _grow_by_one_pixel(labels: torch.Tensor) -> torch.Tensor:
    """Labels >= 0 kept; each -1 pixel takes the largest label among its 8 neighbours."""
    neighbours = F.max_pool2d(labels[None, None].float(), 3, stride=1, padding=1)[0, 0].long()
    return torch.where(labels >= 0, labels, neighbours)


def upsample_segment_map(
    segment_map: torch.Tensor, num_things: int, thing_prob: torch.Tensor, size: Tuple[int, int]
) -> torch.Tensor:
    """
    Resize a segment map to the output size with the boundaries of things where the
    bilinearly upsampled probability of "any thing class" crosses 0.5, rather than along the
    network pixels' blocks: a nucleus of a few network pixels becomes a rounded blob at the
    original size instead of a staircase, which matters for IoU-based scores of small objects.

    Pixels are first resized by nearest neighbour (:func:`resize_label_map`); then a pixel
    where the upsampled thing probability is > 0.5 and that lies within one network pixel of a
    thing takes that thing, and a thing pixel where it is <= 0.5 takes a neighbouring stuff
    segment if there is one (else it stays). Stuff-stuff and void boundaries are unchanged.

    Args:
        segment_map: (h, w) int64 segment index, -1 void; segments [0, num_things) are things.
        num_things: number of thing segments.
        thing_prob: (h, w) float, summed probability of the thing classes.
        size: (H, W) output size.

    Returns:
        (H, W) int64 segment map.
    """
    if tuple(size) == tuple(segment_map.shape):
        return segment_map
    nearest = resize_label_map(segment_map, size)
    if num_things == 0:
        return nearest
    is_thing = (segment_map >= 0) & (segment_map < num_things)
    things = _grow_by_one_pixel(torch.where(is_thing, segment_map, -1))
    stuff = _grow_by_one_pixel(torch.where(is_thing | (segment_map < 0), -1, segment_map))
    foreground = F.interpolate(
        thing_prob[None, None].float(), size=size, mode="bilinear", align_corners=False
    )[0, 0] > 0.5
    things, stuff = resize_label_map(things, size), resize_label_map(stuff, size)
    nearest_is_thing = (nearest >= 0) & (nearest < num_things)
    out = torch.where(foreground & (things >= 0), things, nearest)
    return torch.where(~foreground & nearest_is_thing & (stuff >= 0), stuff, out)
