"""Inference postprocessing of MaskAttn-UNet: logits + embeddings -> detectron2 outputs.

The work is done at network resolution (h, w); only the final maps are resized to the
image's original size (H, W). Everything is vectorised torch that runs on CPU and CUDA;
Python loops run over instances and classes only.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .clustering import cluster_embeddings, connected_components

__all__ = [
    "MaskAttnPostProcessor",
    "embedding_instances",
    "connected_component_instances",
    "merge_semantic_and_instances",
    "resize_label_map",
    "masks_to_boxes",
]

INSTANCE_METHODS = ("embedding", "connected_components")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """
    Tight boxes around binary masks, detectron2's ``BitMasks.get_bounding_boxes`` convention
    (x1, y1 inclusive, x2, y2 exclusive, absolute pixels), vectorised over masks.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float32 XYXY boxes; all zeros for an empty mask.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}.")
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y1 = torch.where(rows, ys, h).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def resize_label_map(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """
    Nearest-neighbour resize of an integer map with pixel-centre alignment (the same geometry
    as bilinear with ``align_corners=False``), done by indexing so ids stay exact in any dtype.

    Args:
        labels: (h, w) integer map.
        size: (H, W) output size.

    Returns:
        (H, W) map of the same dtype.
    """
    h, w = labels.shape
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return labels
    # Output pixel i samples input pixel floor((i + 0.5) * h / out_h) (PIL's NEAREST rule),
    # in float64 so that exact boundaries round the same way on every device.
    device = labels.device
    ys = torch.arange(out_h, device=device, dtype=torch.float64).add_(0.5).mul_(h).div_(out_h)
    xs = torch.arange(out_w, device=device, dtype=torch.float64).add_(0.5).mul_(w).div_(out_w)
    ys, xs = ys.long().clamp_(max=h - 1), xs.long().clamp_(max=w - 1)
    return labels[ys[:, None], xs[None, :]]


def _instances_from_label_map(
    instance_map: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor, num_instances: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Masks, areas and mean class probability of the instances of a label map.

    Args:
        instance_map: (h, w) int64, instance index in [0, M) or -1 for none.
        probs: (K, h, w) class probabilities.
        classes: (M,) int64 class of each instance.
        num_instances: M.

    Returns:
        masks (M, h, w) bool, areas (M,) int64, mean_prob (M,) float.
    """
    flat = instance_map.flatten()
    inside = flat >= 0
    members = flat[inside]
    areas = torch.bincount(members, minlength=num_instances)
    class_probs = probs.flatten(1)[classes[members], torch.nonzero(inside).squeeze(1)]
    prob_sum = probs.new_zeros(num_instances).index_add(0, members, class_probs)
    mean_prob = prob_sum / areas.clamp(min=1)
    ids = torch.arange(num_instances, device=instance_map.device)
    masks = instance_map[None] == ids[:, None, None]
    return masks, areas, mean_prob


def embedding_instances(
    sem: torch.Tensor,
    probs: torch.Tensor,
    embeddings: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    similarity_threshold: float = 0.7,
    min_instance_area: int = 8,
    max_instances: int = 100,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances by class-agnostic clustering of the embeddings of thing pixels.

    Clustering is class-agnostic (:func:`cluster_embeddings`) so that a pixel misclassified
    between two thing classes still joins its object; each cluster then takes the majority
    class of the semantic prediction over its pixels. Touching objects of one class are
    separated by their embeddings, not by the semantic map.

    Args:
        sem: (h, w) int64 semantic argmax.
        probs: (K, h, w) class probabilities.
        embeddings: (D, h, w) pixel embeddings (renormalised here).
        is_thing: (K,) bool, True for thing classes.
        similarity_threshold: cosine similarity to a cluster centre to join it.
        min_instance_area: clusters with fewer pixels are dropped.
        max_instances: most clusters formed.

    Returns:
        masks (M, h, w) bool, classes (M,) int64, scores (M,) float where a score is the
        cluster's mean probability of its class times its confidence (mean cosine similarity
        of its pixels to its centre, clamped to [0, 1]); in no particular order.
    """
    num_classes, h, w = probs.shape
    thing_pixels = torch.nonzero(is_thing[sem].flatten()).squeeze(1)
    points = F.normalize(embeddings.flatten(1)[:, thing_pixels].t().float(), dim=1)
    labels, confidence = cluster_embeddings(
        points,
        similarity_threshold=similarity_threshold,
        min_cluster_size=min_instance_area,
        max_clusters=max_instances,
    )
    num_clusters = confidence.numel()
    if num_clusters == 0:
        return _no_instances(h, w, probs.device)
    clustered = labels >= 0
    votes = torch.bincount(
        labels[clustered] * num_classes + sem.flatten()[thing_pixels[clustered]],
        minlength=num_clusters * num_classes,
    ).view(num_clusters, num_classes)
    classes = votes.argmax(dim=1)
    instance_map = torch.full((h * w,), -1, dtype=torch.long, device=probs.device)
    instance_map[thing_pixels] = labels
    masks, _, mean_prob = _instances_from_label_map(
        instance_map.view(h, w), probs, classes, num_clusters
    )
    return masks, classes, mean_prob * confidence.clamp(0, 1)


def connected_component_instances(
    sem: torch.Tensor,
    probs: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int = 8,
    connectivity: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Instances as the connected components of the semantic map, per thing class (the paper's
    official inference). Touching objects of one class become one instance.

    Args:
        sem: (h, w) int64 semantic argmax.
        probs: (K, h, w) class probabilities.
        is_thing: (K,) bool, True for thing classes.
        min_instance_area: components with fewer pixels are dropped.
        connectivity: 8 (default: diagonal neighbours connect) or 4.

    Returns:
        masks (M, h, w) bool, classes (M,) int64, scores (M,) float (mean probability of the
        component's class over its pixels); in no particular order.
    """
    num_classes, h, w = probs.shape
    present = torch.bincount(sem.flatten(), minlength=num_classes) > 0
    thing_classes = torch.nonzero(present & is_thing).squeeze(1)
    if thing_classes.numel() == 0:
        return _no_instances(h, w, probs.device)
    components = connected_components(sem[None] == thing_classes[:, None, None], connectivity)
    # Classes are disjoint, so every pixel has at most one non-zero channel.
    component_map = components.sum(dim=0).flatten()
    num_components = int(component_map.max())
    areas = torch.bincount(component_map, minlength=num_components + 1)[1:]
    classes = torch.zeros(num_components + 1, dtype=torch.long, device=probs.device)
    classes[component_map] = sem.flatten()
    keep = torch.nonzero(areas >= max(min_instance_area, 1)).squeeze(1)
    # Renumber the kept components 0..M-1, everything else -1.
    new_index = torch.full((num_components + 1,), -1, dtype=torch.long, device=probs.device)
    new_index[keep + 1] = torch.arange(keep.numel(), device=probs.device)
    classes = classes[keep + 1]
    masks, _, mean_prob = _instances_from_label_map(
        new_index[component_map].view(h, w), probs, classes, keep.numel()
    )
    return masks, classes, mean_prob


def _no_instances(h: int, w: int, device: torch.device):
    return (
        torch.zeros(0, h, w, dtype=torch.bool, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
    )


def merge_semantic_and_instances(
    sem: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    min_instance_area: int = 8,
    stuff_area: int = 16,
    label_divisor: int = 1000,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic-DeepLab style merge of instances and the semantic map.

    Things first: instances are painted in the given order (highest score first) on pixels not
    yet taken; one whose visible area falls below ``min_instance_area`` is dropped. Then stuff:
    each stuff class gets one segment from its untaken pixels if they number at least
    ``stuff_area``, otherwise they are void. Thing-class pixels no instance claimed are void.

    Segment ids are ``category_id * label_divisor + index`` with ``index`` counting the
    instances of a class from 1, and 1 for a stuff segment, so that 0 is always void (also for
    a stuff class with contiguous id 0).

    Args:
        sem: (h, w) int64 semantic argmax.
        masks: (N, h, w) bool instance masks, painting order.
        classes: (N,) int64 instance classes (thing classes).
        scores: (N,) float instance scores.
        is_thing: (K,) bool, True for thing classes.
        min_instance_area: least visible pixels of a kept instance.
        stuff_area: least pixels of a stuff segment.
        label_divisor: id multiplier of the class; must exceed the instances of any class.

    Returns:
        panoptic: (h, w) int32 segment ids, 0 = void.
        segments_info: one dict per segment, things first in painting order:
            ``{"id", "isthing", "category_id", "area"}`` plus ``"score"`` for things.
    """
    if masks.shape[0] != classes.shape[0] or masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"masks {tuple(masks.shape)}, classes {tuple(classes.shape)} and scores "
            f"{tuple(scores.shape)} must have the same length."
        )
    if masks.shape[0] and masks.shape[1:] != sem.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not match sem {tuple(sem.shape)}.")
    num_classes = is_thing.shape[0]
    panoptic = torch.zeros(sem.shape, dtype=torch.int32, device=sem.device)
    taken = torch.zeros(sem.shape, dtype=torch.bool, device=sem.device)
    segments_info = []
    instances_per_class: Dict[int, int] = {}
    for mask, category, score in zip(masks, classes.tolist(), scores.tolist()):
        visible = mask & ~taken
        area = int(visible.sum())
        if area < max(min_instance_area, 1):
            continue
        index = instances_per_class.get(category, 0) + 1
        instances_per_class[category] = index
        segment_id = category * label_divisor + index
        panoptic[visible] = segment_id
        taken |= visible
        segments_info.append(
            {
                "id": segment_id,
                "isthing": True,
                "category_id": category,
                "area": area,
                "score": float(score),
            }
        )
    stuff_pixels = ~taken & ~is_thing[sem]
    stuff_areas = torch.bincount(sem[stuff_pixels], minlength=num_classes)
    kept_stuff = (stuff_areas >= max(stuff_area, 1)) & ~is_thing
    stuff_ids = (torch.arange(num_classes, device=sem.device) * label_divisor + 1).int()
    paint = stuff_pixels & kept_stuff[sem]
    panoptic = torch.where(paint, stuff_ids[sem], panoptic)
    for category, area in zip(
        torch.nonzero(kept_stuff).squeeze(1).tolist(), stuff_areas[kept_stuff].tolist()
    ):
        segments_info.append(
            {
                "id": category * label_divisor + 1,
                "isthing": False,
                "category_id": category,
                "area": int(area),
            }
        )
    return panoptic, segments_info


class MaskAttnPostProcessor:
    """
    Turns one image's semantic logits and pixel embeddings into detectron2's standard outputs:
    ``"sem_seg"``, ``"instances"`` and ``"panoptic_seg"``.

    Steps: softmax and argmax at network resolution; instances from the thing pixels, either by
    clustering their embeddings (:func:`embedding_instances`) or as connected components of
    the semantic map (:func:`connected_component_instances`); ranking by score (threshold,
    top ``max_instances``); merging with stuff (:func:`merge_semantic_and_instances`); finally
    the panoptic map is resized (nearest) to the output size, and the instance masks, boxes and
    segment areas are derived from the resized map, so instances and panoptic agree exactly.
    Areas thresholds (``min_instance_area``, ``stuff_area``) apply at network resolution.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        thing_ids: Sequence[int],
        instance_method: str = "embedding",
        similarity_threshold: float = 0.7,
        min_instance_area: int = 8,
        max_instances: int = 100,
        stuff_area: int = 16,
        score_threshold: float = 0.0,
        label_divisor: int = 1000,
    ):
        """
        Args:
            num_classes: K, number of contiguous classes (stuff + things).
            thing_ids: contiguous ids of the thing classes, each in [0, K).
            instance_method: "embedding" (cluster the pixel embeddings) or
                "connected_components" (8-connected components of the semantic map per class).
            similarity_threshold: cosine similarity to join a cluster, in (-1, 1).
            min_instance_area: instances with fewer pixels (network resolution) are dropped.
            max_instances: most instances per image, highest scores first.
            stuff_area: stuff segments with fewer pixels (network resolution) become void.
            score_threshold: instances scoring below it are dropped.
            label_divisor: panoptic id = class * label_divisor + index; > max_instances.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        thing_ids = [int(i) for i in thing_ids]
        bad = [i for i in thing_ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"thing_ids {bad} are outside [0, num_classes={num_classes}).")
        if instance_method not in INSTANCE_METHODS:
            raise ValueError(
                f"instance_method must be one of {INSTANCE_METHODS}, got '{instance_method}'."
            )
        if not -1.0 < similarity_threshold < 1.0:
            raise ValueError(
                f"similarity_threshold must be in (-1, 1), got {similarity_threshold}."
            )
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}.")
        if label_divisor <= max_instances:
            raise ValueError(
                f"label_divisor ({label_divisor}) must exceed max_instances ({max_instances}) "
                "so that segment ids of different classes cannot collide."
            )
        self.num_classes = num_classes
        self.thing_ids = sorted(set(thing_ids))
        self.instance_method = instance_method
        self.similarity_threshold = similarity_threshold
        self.min_instance_area = min_instance_area
        self.max_instances = max_instances
        self.stuff_area = stuff_area
        self.score_threshold = score_threshold
        self.label_divisor = label_divisor

    def _is_thing(self, device: torch.device) -> torch.Tensor:
        is_thing = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        is_thing[self.thing_ids] = True
        return is_thing

    def find_instances(
        self, sem: torch.Tensor, probs: torch.Tensor, embeddings: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Instances at network resolution, ranked: score >= threshold, highest first, at most
        ``max_instances``.

        Args:
            sem: (h, w) int64 semantic argmax.
            probs: (K, h, w) class probabilities.
            embeddings: (D, h, w) pixel embeddings (unused by "connected_components").

        Returns:
            masks (M, h, w) bool, classes (M,) int64, scores (M,) float, sorted by score.
        """
        is_thing = self._is_thing(sem.device)
        if self.instance_method == "embedding":
            masks, classes, scores = embedding_instances(
                sem,
                probs,
                embeddings,
                is_thing,
                similarity_threshold=self.similarity_threshold,
                min_instance_area=self.min_instance_area,
                max_instances=self.max_instances,
            )
        else:
            masks, classes, scores = connected_component_instances(
                sem, probs, is_thing, min_instance_area=self.min_instance_area
            )
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] >= self.score_threshold][: self.max_instances]
        return masks[order], classes[order], scores[order]

    def __call__(
        self,
        sem_logits: torch.Tensor,
        embeddings: Optional[torch.Tensor],
        output_size: Tuple[int, int],
        *,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
    ) -> Dict:
        """
        Args:
            sem_logits: (K, h, w) semantic logits at network resolution.
            embeddings: (D, h, w) pixel embeddings at network resolution; may be None with
                ``instance_method="connected_components"`` or when only ``semantic_on``.
            output_size: (H, W) size of the original image.
            semantic_on, instance_on, panoptic_on: which outputs to compute and return.

        Returns:
            dict with the requested keys:
            ``"sem_seg"``: (K, H, W) float class probabilities (bilinear);
            ``"instances"``: ``Instances((H, W))`` with ``pred_masks`` (N, H, W) bool,
            ``pred_boxes`` (Boxes, XYXY absolute), ``pred_classes`` (N,) int64 contiguous ids
            and ``scores`` (N,) float, sorted by score;
            ``"panoptic_seg"``: ((H, W) int32 segment ids, 0 = void, segments_info list).
        """
        self._check_inputs(sem_logits, embeddings, output_size, instance_on or panoptic_on)
        output_size = (int(output_size[0]), int(output_size[1]))
        probs = F.softmax(sem_logits.float(), dim=0)
        results = {}
        if semantic_on:
            results["sem_seg"] = F.interpolate(
                probs[None], size=output_size, mode="bilinear", align_corners=False
            )[0]
        if not (instance_on or panoptic_on):
            return results
        sem = probs.argmax(dim=0)
        masks, classes, scores = self.find_instances(sem, probs, embeddings)
        panoptic, segments_info = merge_semantic_and_instances(
            sem,
            masks,
            classes,
            scores,
            self._is_thing(sem.device),
            min_instance_area=self.min_instance_area,
            stuff_area=self.stuff_area,
            label_divisor=self.label_divisor,
        )
        panoptic = resize_label_map(panoptic, output_size)
        segments_info = self._recount_areas(panoptic, segments_info)
        if panoptic_on:
            results["panoptic_seg"] = (panoptic, segments_info)
        if instance_on:
            results["instances"] = self._instances_from_panoptic(
                panoptic, segments_info, output_size
            )
        return results

    def _check_inputs(self, sem_logits, embeddings, output_size, needs_instances: bool) -> None:
        if sem_logits.dim() != 3 or sem_logits.shape[0] != self.num_classes:
            raise ValueError(
                f"sem_logits must have shape (K={self.num_classes}, h, w), got "
                f"{tuple(sem_logits.shape)}."
            )
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"output_size must be (H, W) with H, W >= 1, got {output_size}.")
        if not needs_instances or self.instance_method != "embedding":
            return
        if embeddings is None:
            raise ValueError('instance_method "embedding" needs embeddings, got None.')
        if embeddings.dim() != 3 or embeddings.shape[1:] != sem_logits.shape[1:]:
            raise ValueError(
                f"embeddings must have shape (D, h, w) with (h, w) = "
                f"{tuple(sem_logits.shape[1:])}, got {tuple(embeddings.shape)}."
            )

    @staticmethod
    def _recount_areas(panoptic: torch.Tensor, segments_info: List[Dict]) -> List[Dict]:
        """Areas at the output size; segments that vanished in the resize are removed."""
        ids, counts = torch.unique(panoptic, return_counts=True)
        area_of = dict(zip(ids.tolist(), counts.tolist()))
        return [dict(s, area=area_of[s["id"]]) for s in segments_info if s["id"] in area_of]

    @staticmethod
    def _instances_from_panoptic(
        panoptic: torch.Tensor, segments_info: List[Dict], output_size: Tuple[int, int]
    ) -> Instances:
        things = [s for s in segments_info if s["isthing"]]
        device = panoptic.device
        ids = torch.tensor([s["id"] for s in things], dtype=torch.int32, device=device)
        masks = panoptic[None] == ids[:, None, None]
        instances = Instances(output_size)
        instances.pred_masks = masks
        instances.pred_boxes = Boxes(masks_to_boxes(masks))
        instances.pred_classes = torch.tensor(
            [s["category_id"] for s in things], dtype=torch.long, device=device
        )
        instances.scores = torch.tensor(
            [s["score"] for s in things], dtype=torch.float32, device=device
        )
        return instances
