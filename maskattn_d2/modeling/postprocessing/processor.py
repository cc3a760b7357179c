"""MaskAttnPostProcessor: one image's logits and embedding-head outputs -> detectron2's
standard outputs (sem_seg, instances, panoptic_seg).

The work is done at network resolution (h, w); only the final maps are resized to the
image's original size (H, W). Everything is vectorised torch that runs on CPU and CUDA:
instances travel as one label map rather than a stack of masks until the output is built,
and the host reads device values a few times per image, not once per instance (Python
only builds the ``segments_info`` dicts, from one copy of the per-segment numbers).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ...layers import argmax_channels, softmax_channels
from ...structures.label_maps import pixel_boxes, resize_label_map, selected_label_pixels
from .instances import (
    INSTANCE_METHODS,
    SEED_ASSIGNMENTS,
    connected_component_instance_map,
    embedding_instance_map,
    spatial_instance_map,
)
from .merge import merge_instance_map, segment_id_map
from .upsample import upsample_segment_map

__all__ = ["MaskAttnPostProcessor"]


class MaskAttnPostProcessor:
    """
    Turns one image's semantic logits and pixel embeddings into detectron2's standard outputs:
    ``"sem_seg"``, ``"instances"`` and ``"panoptic_seg"``.

    Steps: argmax at network resolution; instances from the thing pixels, either from the
    spatial embeddings (:func:`spatial_instance_map`), by clustering the embeddings
    (:func:`embedding_instance_map`) or as connected components of the semantic map
    (:func:`connected_component_instance_map`), as one label map; ranking by score (threshold,
    top ``max_instances``); merging with stuff (:func:`merge_instance_map`); finally
    the panoptic map is resized (nearest) to the output size, and the instance masks, boxes and
    segment areas are derived from the resized map, so instances and panoptic agree exactly.
    Areas thresholds (``min_instance_area``, ``stuff_area``) apply at network resolution.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        thing_ids: Sequence[int],
        instance_method: str = "spatial_embedding",
        similarity_threshold: float = 0.9,
        seed_threshold: float = 0.4,
        seed_min_distance: float = 3.0,
        embedding_weight: float = 0.0,
        within_components: bool = True,
        merge_ratio: float = 1.0,
        seed_assignment: str = "offsets",
        saddle_depth: float = 0.02,
        upsample_thing_boundaries: bool = True,
        connectivity: int = 8,
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
            instance_method: "spatial_embedding" (seeds and offsets to the instance centre,
                inside the semantic components), "embedding" (cluster the learned pixel
                embeddings by cosine similarity) or "connected_components" (connected
                components of the semantic map per class).
            similarity_threshold: "embedding": cosine similarity to join a cluster, in (-1, 1).
            seed_threshold: "spatial_embedding": least seed value of a seed, in [0, 1).
            seed_min_distance: "spatial_embedding": a seed whose offset-pointed centre is
                closer than this (pixels) to a stronger seed's is dropped (>= 0).
            embedding_weight: "spatial_embedding": weight (squared pixels) of the learned
                embeddings' cosine distance beside the spatial distance; 0 ignores them.
            within_components: "spatial_embedding": a pixel joins only seeds of its own
                semantic connected component (False: any seed; the ablation).
            merge_ratio: "spatial_embedding": instances of one component whose pixels point
                at centres closer than this times the larger equivalent radius are merged
                (>= 0; 0 disables).
            seed_assignment: "spatial_embedding": "offsets" (every pixel joins the seed its
                offset points nearest to), "seed_ascent" (a pixel climbs the seed map to a
                seed; offsets only where it reaches none) or "bandwidth" (Neven et al.'s
                clusters within each seed's learned bandwidth), see
                :func:`spatial_instance_map`.
            saddle_depth: "seed_ascent": seeds whose basins meet less than this below the
                lower seed value are one instance (>= 0).
            upsample_thing_boundaries: resize the panoptic map with thing boundaries from the
                upsampled thing probability (:func:`upsample_segment_map`); False: nearest.
            connectivity: 8 (diagonal neighbours connect) or 4: the connected components of
                "connected_components" and those "spatial_embedding" groups within.
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
        if not 0.0 <= seed_threshold < 1.0:
            raise ValueError(f"seed_threshold must be in [0, 1), got {seed_threshold}.")
        if seed_min_distance < 0:
            raise ValueError(f"seed_min_distance must be >= 0, got {seed_min_distance}.")
        if merge_ratio < 0:
            raise ValueError(f"merge_ratio must be >= 0, got {merge_ratio}.")
        if seed_assignment not in SEED_ASSIGNMENTS:
            raise ValueError(
                f"seed_assignment must be one of {SEED_ASSIGNMENTS}, got '{seed_assignment}'."
            )
        if saddle_depth < 0:
            raise ValueError(f"saddle_depth must be >= 0, got {saddle_depth}.")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
        if embedding_weight < 0:
            raise ValueError(f"embedding_weight must be >= 0, got {embedding_weight}.")
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
        self.seed_threshold = seed_threshold
        self.seed_min_distance = seed_min_distance
        self.embedding_weight = embedding_weight
        self.within_components = within_components
        self.upsample_thing_boundaries = upsample_thing_boundaries
        self.connectivity = connectivity
        self.merge_ratio = merge_ratio
        self.seed_assignment = seed_assignment
        self.saddle_depth = saddle_depth
        self.min_instance_area = min_instance_area
        self.max_instances = max_instances
        self.stuff_area = stuff_area
        self.score_threshold = score_threshold
        self.label_divisor = label_divisor

    @classmethod
    def from_config(cls, cfg, thing_ids: Sequence[int]):
        post = cfg.MODEL.MASK_ATTN_POSTPROCESS
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "thing_ids": thing_ids,
            "instance_method": post.INSTANCE_METHOD,
            "similarity_threshold": post.SIMILARITY_THRESHOLD,
            "seed_threshold": post.SEED_THRESHOLD,
            "seed_min_distance": post.SEED_MIN_DISTANCE,
            "embedding_weight": post.EMBEDDING_WEIGHT,
            "within_components": post.WITHIN_COMPONENTS,
            "merge_ratio": post.MERGE_RATIO,
            "seed_assignment": post.SEED_ASSIGNMENT,
            "saddle_depth": post.SADDLE_DEPTH,
            "upsample_thing_boundaries": post.UPSAMPLE_THING_BOUNDARIES,
            "connectivity": post.CONNECTIVITY,
            "min_instance_area": post.MIN_INSTANCE_AREA,
            "max_instances": post.MAX_INSTANCES,
            "stuff_area": post.STUFF_AREA,
            "score_threshold": post.SCORE_THRESHOLD,
            "label_divisor": post.LABEL_DIVISOR,
        }

    def _is_thing(self, device: torch.device) -> torch.Tensor:
        is_thing = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        is_thing[self.thing_ids] = True
        return is_thing

    def _ranked_instance_map(
        self,
        sem: torch.Tensor,
        logits: torch.Tensor,
        head_outputs: Optional[Dict[str, torch.Tensor]],
        is_thing: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Instances at network resolution, ranked: score >= threshold, highest first, at most
        ``max_instances``.

        Args:
            sem: (h, w) int64 semantic argmax.
            logits: (K, h, w) class logits.
            head_outputs: the embedding head's outputs of the image (unused by
                "connected_components").
            is_thing: (K,) bool.

        Returns:
            (h * w,) int64 rank of each pixel's instance (-1: none), classes (M,) int64 and
            scores (M,) float in rank order.
        """
        if self.instance_method == "spatial_embedding":
            instance_map, classes, scores = spatial_instance_map(
                sem,
                logits,
                head_outputs,
                is_thing,
                seed_threshold=self.seed_threshold,
                seed_min_distance=self.seed_min_distance,
                embedding_weight=self.embedding_weight,
                within_components=self.within_components,
                merge_ratio=self.merge_ratio,
                assignment=self.seed_assignment,
                saddle_depth=self.saddle_depth,
                connectivity=self.connectivity,
                min_instance_area=self.min_instance_area,
                max_instances=self.max_instances,
            )
        elif self.instance_method == "embedding":
            instance_map, classes, scores = embedding_instance_map(
                sem,
                logits,
                head_outputs["embeddings"],
                is_thing,
                similarity_threshold=self.similarity_threshold,
                min_instance_area=self.min_instance_area,
                max_instances=self.max_instances,
            )
        else:
            instance_map, classes, scores = connected_component_instance_map(
                sem,
                logits,
                is_thing,
                min_instance_area=self.min_instance_area,
                connectivity=self.connectivity,
            )
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] >= self.score_threshold][: self.max_instances]
        rank = torch.full((scores.numel() + 1,), -1, dtype=torch.long, device=sem.device)
        rank[order + 1] = torch.arange(order.numel(), device=sem.device)
        return rank.index_select(0, instance_map + 1), classes[order], scores[order]

    def _segments(
        self,
        logits: torch.Tensor,
        head_outputs: Optional[Dict[str, torch.Tensor]],
        output_size: Tuple[int, int],
    ) -> Tuple[torch.Tensor, List[Dict], torch.Tensor, List[int]]:
        """
        The panoptic segments at the output size: (H, W) int64 map of indices into
        ``segments_info`` (-1: void), the segments_info dicts, their (S,) int32 ids and their
        areas at the output size (0: vanished in the resize).

        Runs in inference mode: it skips autograd's bookkeeping of each of its many small ops
        (~10 % of the time on CPU). The caller builds the outputs from these outside it, so
        they are ordinary tensors (inference tensors could not be modified in place).
        """
        with torch.inference_mode():
            sem = argmax_channels(logits, dim=0)
            is_thing = self._is_thing(sem.device)
            instance_map, classes, scores = self._ranked_instance_map(
                sem, logits, head_outputs, is_thing
            )
            segment_map, segments_info, segment_ids = merge_instance_map(
                sem,
                instance_map.view(sem.shape),
                classes,
                scores,
                is_thing,
                min_instance_area=self.min_instance_area,
                stuff_area=self.stuff_area,
                label_divisor=self.label_divisor,
            )
            if self.upsample_thing_boundaries and output_size != tuple(segment_map.shape):
                num_things = sum(1 for info in segments_info if info["isthing"])
                # One product over the class maps instead of gathering the thing classes' maps.
                probs = softmax_channels(logits, dim=0)
                thing_prob = probs.permute(1, 2, 0) @ is_thing.to(probs.dtype)
                segment_map = upsample_segment_map(segment_map, num_things, thing_prob, output_size)
            else:
                segment_map = resize_label_map(segment_map, output_size)
            # Areas at the output size; segments that vanished in the resize are removed.
            areas = torch.bincount(
                segment_map.flatten() + 1, minlength=len(segments_info) + 1
            )[1:].tolist()
            return segment_map, segments_info, segment_ids, areas

    def __call__(
        self,
        sem_logits: torch.Tensor,
        head_outputs: Optional[Dict[str, torch.Tensor]],
        output_size: Tuple[int, int],
        *,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
    ) -> Dict:
        """
        Args:
            sem_logits: (K, h, w) semantic logits at network resolution, in any memory
                layout (with many classes a channels-last view of (h, w, K) is faster).
            head_outputs: the embedding head's outputs of this image at network resolution:
                ``"embeddings"`` (D, h, w) and, for "spatial_embedding", ``"offsets"``
                (2, h, w) and ``"seed_logits"`` (1, h, w); may be None with
                ``instance_method="connected_components"`` or when only ``semantic_on``.
            output_size: (H, W) size of the original image.
            semantic_on, instance_on, panoptic_on: which outputs to compute and return.

        Returns:
            dict with the requested keys:
            ``"sem_seg"``: (K, H, W) float class logits (bilinear), detectron2's convention;
            ``"instances"``: ``Instances((H, W))`` with ``pred_masks`` (N, H, W) bool,
            ``pred_boxes`` (Boxes, XYXY absolute), ``pred_classes`` (N,) int64 contiguous ids
            and ``scores`` (N,) float, sorted by score;
            ``"panoptic_seg"``: ((H, W) int32 segment ids, 0 = void, segments_info list).
        """
        self._check_inputs(sem_logits, head_outputs, output_size, instance_on or panoptic_on)
        output_size = (int(output_size[0]), int(output_size[1]))
        needs_segments = instance_on or panoptic_on
        logits = sem_logits.float()
        if logits.shape[0] <= self._PLANES_MAX_CLASSES:
            # Few classes: whole channel planes are faster to reduce than short per-pixel
            # rows, and copying a channels-last map into planes is cheap. Many classes stay
            # as given: on channels-last maps the argmax and the scores read contiguous rows.
            logits = logits.contiguous()
        results = {}
        if semantic_on:
            # detectron2's convention (SemanticSegmentor, PanopticFPN): the logits, resized
            # bilinearly; evaluators and visualizers take their argmax. No softmax of the
            # K-class map: that pass was most of the post-processing time with 133 classes.
            if output_size == tuple(logits.shape[1:]):
                results["sem_seg"] = logits
            else:
                results["sem_seg"] = F.interpolate(
                    logits[None], size=output_size, mode="bilinear", align_corners=False
                )[0]
        if not needs_segments:
            return results
        segment_map, segments_info, segment_ids, areas = self._segments(
            logits, head_outputs, output_size
        )
        present = [i for i, area in enumerate(areas) if area > 0]
        if panoptic_on:
            results["panoptic_seg"] = (
                segment_id_map(segment_map, segment_ids),
                [dict(segments_info[i], area=areas[i]) for i in present],
            )
        if instance_on:
            things = [i for i in present if segments_info[i]["isthing"]]
            results["instances"] = self._instances_from_segments(
                segment_map,
                len(segments_info),
                things,
                [segments_info[i] for i in things],
                output_size,
            )
        return results

    # Up to this many classes the logits are reduced as channel planes (see __call__); the
    # crossover of the two layouts' argmax on CPU lies between 21 and 133 classes.
    _PLANES_MAX_CLASSES = 32

    # The embedding head outputs each instance method needs, with their channel counts
    # (None: any).
    _NEEDED_OUTPUTS = {
        "spatial_embedding": {"offsets": 2, "seed_logits": 1},
        "embedding": {"embeddings": None},
        "connected_components": {},
    }

    def needed_head_outputs(self, needs_instances: bool) -> Dict[str, Optional[int]]:
        """The embedding head outputs a call reads, with their channel counts (None: any):
        empty for "connected_components" or when no instances are wanted (semantic only),
        so the caller can skip the head."""
        if not needs_instances:
            return {}
        needed = dict(self._NEEDED_OUTPUTS[self.instance_method])
        if self.instance_method == "spatial_embedding" and self.embedding_weight > 0:
            needed["embeddings"] = None
        if self.instance_method == "spatial_embedding" and self.seed_assignment == "bandwidth":
            needed["log_bandwidth"] = 1
        return needed

    def _check_inputs(self, sem_logits, head_outputs, output_size, needs_instances: bool) -> None:
        if sem_logits.dim() != 3 or sem_logits.shape[0] != self.num_classes:
            raise ValueError(
                f"sem_logits must have shape (K={self.num_classes}, h, w), got "
                f"{tuple(sem_logits.shape)}."
            )
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"output_size must be (H, W) with H, W >= 1, got {output_size}.")
        for key, channels in self.needed_head_outputs(needs_instances).items():
            value = None if head_outputs is None else head_outputs.get(key)
            if value is None:
                spatial_hint = " (set MODEL.EMBED_HEAD.SPATIAL_ON True and train with it)"
                hint = {
                    "offsets": spatial_hint,
                    "seed_logits": spatial_hint,
                    "log_bandwidth": ' (set MODEL.EMBED_HEAD.OFFSET_LOSS "lovasz" and train '
                    "with it)",
                }.get(key, "")
                raise ValueError(
                    f'instance_method "{self.instance_method}" needs the embedding head '
                    f'output "{key}", which is missing{hint}.'
                )
            if value.dim() != 3 or value.shape[1:] != sem_logits.shape[1:] or (
                channels is not None and value.shape[0] != channels
            ):
                raise ValueError(
                    f'"{key}" must have shape ({channels or "D"}, h, w) with (h, w) = '
                    f"{tuple(sem_logits.shape[1:])}, got {tuple(value.shape)}."
                )

    @staticmethod
    def _instances_from_segments(
        segment_map: torch.Tensor,
        num_segments: int,
        indices: List[int],
        things: List[Dict],
        output_size: Tuple[int, int],
    ) -> Instances:
        """Instances of the thing segments ``indices`` (with dicts ``things``) of the map of
        segment indices in [-1, num_segments)."""
        device = segment_map.device
        ids = torch.tensor(indices, dtype=torch.long, device=device)
        instances = Instances(output_size)
        # The things' pixels once, for one scatter into zeros (instead of comparing the map with
        # every segment id, N x H x W) and for the boxes.
        rows, pixels = selected_label_pixels(segment_map, ids, num_segments)
        masks = torch.zeros(ids.numel(), segment_map.numel(), dtype=torch.bool, device=device)
        masks[rows, pixels] = True
        instances.pred_masks = masks.view(ids.numel(), *segment_map.shape)
        instances.pred_boxes = Boxes(pixel_boxes(rows, pixels, ids.numel(), segment_map.shape))
        instances.pred_classes = torch.tensor(
            [s["category_id"] for s in things], dtype=torch.long, device=device
        )
        instances.scores = torch.tensor(
            [s["score"] for s in things], dtype=torch.float32, device=device
        )
        return instances
