"""Training losses of MaskAttn-UNet: semantic (CE + Dice), instance contrastive and gate BCE.

All functions are config-free and work on CPU and CUDA. Shapes use B = batch, K = classes,
D = embedding dimension, (H, W) = target resolution.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..layers import argmax_channels

__all__ = [
    "semantic_loss",
    "dice_loss",
    "instance_contrastive_loss",
    "sample_instance_pixels",
    "sample_batch_instance_pixels",
    "gate_loss",
    "instance_centres",
    "instance_depth",
    "seed_map_target",
    "instance_peak_pixels",
    "seed_focal_loss",
    "spatial_embedding_losses",
]


def _check_semantic_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (B, K, H, W), got {tuple(logits.shape)}.")
    if targets.dim() != 3:
        raise ValueError(f"targets must have shape (B, H, W), got {tuple(targets.shape)}.")
    if logits.shape[0] != targets.shape[0] or logits.shape[2:] != targets.shape[1:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on "
            "batch size or spatial size."
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class ids, got dtype {targets.dtype}.")


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """
    Soft multi-class Dice loss over the valid pixels of a batch.

    Per class k, with softmax probabilities p and one-hot targets g restricted to valid pixels
    and summed over the whole batch, ``dice_k = (2 * sum(p_k g_k) + smooth) /
    (sum(p_k) + sum(g_k) + smooth)``. The loss is the mean of ``1 - dice_k`` over the classes
    present in the target or in the prediction (argmax) on valid pixels: classes absent from
    both would score a trivial ``dice_k ~ 1`` and only dilute the loss, and summing over the
    batch keeps rare classes from giving noisy per-image ratios.

    Args:
        logits: (B, K, H, W) unnormalised class scores.
        targets: (B, H, W) int64 class ids in [0, K), or ``ignore_index`` for void.
        ignore_index: target value of pixels that do not contribute.
        smooth: additive smoothing of numerator and denominator (> 0).

    Returns:
        Scalar tensor; ``logits.sum() * 0`` if no pixel is valid.
    """
    _check_semantic_inputs(logits, targets)
    valid = targets != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1)
    # Gather p at each valid pixel's target class, then sum per class: avoids a (B,K,H,W)
    # one-hot tensor.
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    p_target = probs.gather(1, safe_targets[:, None]).squeeze(1)[valid]
    target_valid = targets[valid]
    intersection = probs.new_zeros(num_classes).index_add(0, target_valid, p_target)
    target_area = torch.bincount(target_valid, minlength=num_classes).to(probs.dtype)
    pred_area = (probs * valid[:, None]).sum(dim=(0, 2, 3))
    dice = (2 * intersection + smooth) / (pred_area + target_area + smooth)
    predicted = torch.bincount(argmax_channels(logits, dim=1)[valid], minlength=num_classes) > 0
    present = (target_area > 0) | predicted
    return (1 - dice)[present].mean()


def _cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, top_k_percent_pixels: float
) -> torch.Tensor:
    """Mean pixel CE over valid pixels, or over the top-k fraction of them (hard mining)."""
    pixel_losses = F.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction="none"
    )
    pixel_losses = pixel_losses[targets != ignore_index]
    if top_k_percent_pixels < 1.0:
        # Panoptic-DeepLab style: keep the hardest pixels only, at least one.
        k = max(1, int(top_k_percent_pixels * pixel_losses.numel()))
        pixel_losses = torch.topk(pixel_losses, k, sorted=False).values
    return pixel_losses.mean()


def semantic_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = 255,
    ce_weight: float = 1.0,
    top_k_percent_pixels: float = 1.0,
) -> torch.Tensor:
    """
    ``L_sem = ce_weight * CE + (1 - ce_weight) * Dice`` (a term with weight 0 is not computed).

    Args:
        logits: (B, K, H, W) unnormalised class scores.
        targets: (B, H, W) int64 class ids in [0, K), or ``ignore_index`` for void.
        ignore_index: target value of pixels that do not contribute to either term.
        ce_weight: alpha in [0, 1]; 1 is pure cross-entropy, 0 pure Dice (see :func:`dice_loss`).
        top_k_percent_pixels: in (0, 1]; below 1, the CE term averages only the
            ``int(top_k_percent_pixels * #valid)`` highest per-pixel losses (at least one),
            pooled over the batch; 1 is the plain mean over valid pixels.

    Returns:
        Scalar tensor; ``logits.sum() * 0`` (zero that keeps the graph) if no pixel is valid.
    """
    _check_semantic_inputs(logits, targets)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}.")
    if not 0.0 < top_k_percent_pixels <= 1.0:
        raise ValueError(f"top_k_percent_pixels must be in (0, 1], got {top_k_percent_pixels}.")
    if not bool((targets != ignore_index).any()):
        return logits.sum() * 0
    loss = logits.new_zeros((), dtype=torch.float32)
    if ce_weight > 0:
        loss = loss + ce_weight * _cross_entropy(
            logits, targets, ignore_index, top_k_percent_pixels
        )
    if ce_weight < 1:
        loss = loss + (1 - ce_weight) * dice_loss(logits, targets, ignore_index)
    return loss


def _random_keys(n: int, device: torch.device, generator: Optional[torch.Generator]):
    """n uniform keys on ``device``; drawn on the generator's own device when one is given,
    so that a CPU generator also drives sampling for CUDA tensors."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, device=generator.device, generator=generator).to(device)


def _balanced_quotas(
    counts: torch.Tensor,
    image_of_instance: torch.Tensor,
    num_images: int,
    samples_per_instance: int,
    max_samples: int,
    priority: torch.Tensor,
) -> torch.Tensor:
    """
    Samples to draw per instance: ``min(count, samples_per_instance)``, lowered evenly
    (water-filling) in the images where their total exceeds ``max_samples``; all images at
    once, without host syncs.

    Args:
        counts: (M,) int64 pixels per instance, all >= 1.
        image_of_instance: (M,) int64 image of each instance in [0, num_images), sorted.
        num_images: B.
        samples_per_instance: per-instance maximum.
        max_samples: cap on the total of each image.
        priority: (M,) float; where the cap leaves a remainder, the instances with the lowest
            priority among those of the image that can take one more sample get it.

    Returns:
        (M,) int64 quotas, each <= its count, summing per image to ``min(max_samples,
        sum(min(counts, samples_per_instance)))``.
    """
    device = counts.device
    num = counts.numel()
    positions = torch.arange(num, device=device)
    per_image = torch.bincount(image_of_instance, minlength=num_images)
    image_start = (torch.cumsum(per_image, 0) - per_image).index_select(0, image_of_instance)
    quota = counts.clamp(max=samples_per_instance)
    # Largest level q with sum(min(quota, q)) <= max_samples in each image. At the sorted
    # breakpoints a_j of an image the total is prefix_j + (M_i - j) * a_j; on the first one
    # that overshoots it is linear in q. Images under the cap have no such breakpoint.
    order = torch.argsort(image_of_instance * (samples_per_instance + 1) + quota)
    sorted_quota = quota[order]
    prefix = torch.cumsum(sorted_quota, 0) - sorted_quota
    prefix = prefix - prefix.index_select(0, image_start)
    remaining = per_image.index_select(0, image_of_instance) - (positions - image_start)
    over = prefix + remaining * sorted_quota > max_samples
    first = torch.full((num_images,), num, dtype=torch.long, device=device).scatter_reduce(
        0, image_of_instance, torch.where(over, positions, num), "amin"
    )
    capped = first < num
    at = first.clamp(max=max(num - 1, 0))
    level = torch.where(
        capped,
        torch.div(max_samples - prefix[at], remaining[at].clamp(min=1), rounding_mode="floor"),
        samples_per_instance,
    )
    level_of_instance = level.index_select(0, image_of_instance)
    quota = torch.minimum(quota, level_of_instance)
    leftover = torch.where(
        capped,
        max_samples - torch.zeros_like(level).index_add_(0, image_of_instance, quota),
        0,
    )
    # Instances still above the level can take one more; the remainder goes to the eligible
    # ones of lowest priority in each image (ineligible ones sort last).
    eligible = counts > level_of_instance
    order = torch.argsort(torch.where(eligible, priority, torch.full_like(priority, math.inf)))
    order = order[torch.argsort(image_of_instance[order], stable=True)]
    rank = positions - image_start  # image_of_instance[order] == image_of_instance
    extra = (rank < leftover.index_select(0, image_of_instance)).long()
    return quota.index_add_(0, order, extra)


def sample_batch_instance_pixels(
    instance_ids: torch.Tensor,
    *,
    samples_per_instance: int,
    max_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    :func:`sample_instance_pixels` of every image of a batch at once.

    Args:
        instance_ids: (B, N) int64 flat instance maps; values <= 0 are ignored, k >= 1 is
            instance k of that image.
        samples_per_instance, max_samples, generator: as :func:`sample_instance_pixels`
            (``max_samples`` caps each image).

    Returns:
        images: (S,) int64 image of each sampled pixel, non-decreasing.
        indices: (S,) int64 positions into that image's ``instance_ids`` row.
        labels: (S,) int64 compact instance labels in [0, M) over the batch (an instance of
            one image never shares a label with one of another).
    """
    if instance_ids.dim() != 2:
        raise ValueError(f"instance_ids must be (B, N), got {tuple(instance_ids.shape)}.")
    num_images, n = instance_ids.shape
    device = instance_ids.device
    flat = instance_ids.flatten()
    pixels = torch.nonzero(flat > 0).squeeze(1)
    if pixels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    # One id space for the batch, image-major: image i's instance k is i * stride + k.
    stride = int(flat.max()) + 1
    keys, labels = torch.unique(
        torch.div(pixels, n, rounding_mode="floor") * stride + flat[pixels], return_inverse=True
    )
    counts = torch.bincount(labels)
    quotas = _balanced_quotas(
        counts,
        torch.div(keys, stride, rounding_mode="floor"),
        num_images,
        samples_per_instance,
        max_samples,
        _random_keys(counts.numel(), device, generator),
    )
    # Random order first, then a stable sort by instance: each instance's segment is a
    # uniformly random permutation of its pixels, so its first `quota` entries are a sample.
    order = torch.argsort(_random_keys(pixels.numel(), device, generator))
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=device) - starts[sorted_labels]
    keep = rank < quotas[sorted_labels]
    sampled = pixels[order[keep]]
    return torch.div(sampled, n, rounding_mode="floor"), sampled % n, sorted_labels[keep]


def sample_instance_pixels(
    instance_ids: torch.Tensor,
    *,
    samples_per_instance: int,
    max_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Balanced uniform sampling without replacement of the pixels of each instance.

    Every instance gets ``min(count, samples_per_instance)`` pixels; when their total exceeds
    ``max_samples`` the per-instance number is lowered evenly (small instances keep all their
    pixels, large ones are cut to a common level). Vectorised: random keys, a sort by
    (instance, key), and a rank within each instance's segment.

    Args:
        instance_ids: (N,) int64 flat instance map of one image; values <= 0 are ignored,
            k >= 1 is instance k.
        samples_per_instance: most pixels per instance (>= 1).
        max_samples: most pixels in total (>= 1).
        generator: optional torch.Generator for reproducible sampling (any device).

    Returns:
        indices: (S,) int64 positions into ``instance_ids`` of the sampled pixels.
        labels: (S,) int64 compact instance labels in [0, M), M = number of instances.
    """
    if instance_ids.dim() != 1:
        raise ValueError(f"instance_ids must be flat (N,), got {tuple(instance_ids.shape)}.")
    _, indices, labels = sample_batch_instance_pixels(
        instance_ids[None],
        samples_per_instance=samples_per_instance,
        max_samples=max_samples,
        generator=generator,
    )
    return indices, labels


def _supcon_loss(
    embeddings: torch.Tensor,
    images: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """
    Mean supervised contrastive loss of the sampled pixels' anchors, all images at once: each
    image's samples fill one row of a padded (B, S, D) batch, so one batched product gives
    every image's |S_i| x |S_i| similarities for the softmax normalisers; the positives'
    terms come from per-instance sums of embeddings.

    Args:
        embeddings: (B, D, N) float, L2-normalised.
        images, indices, labels: the samples, as :func:`sample_batch_instance_pixels`.
        temperature: tau > 0.

    Returns:
        Scalar: the mean over the anchors that have a positive, in images with at least two
        sampled instances; 0 (keeping the graph) if there are none.
    """
    num_images = embeddings.shape[0]
    device = embeddings.device
    per_image = torch.bincount(images, minlength=num_images)
    slot = torch.arange(images.numel(), device=device) - (
        torch.cumsum(per_image, 0) - per_image
    ).index_select(0, images)
    width = int(per_image.max())
    sampled = embeddings[images, :, indices].float()  # (S, D)
    padded = sampled.new_zeros(num_images, width, sampled.shape[1]).index_put(
        (images, slot), sampled
    )
    valid = torch.zeros(num_images, width, dtype=torch.bool, device=device).index_put(
        (images, slot), torch.ones_like(images, dtype=torch.bool)
    )
    logits = torch.bmm(padded, padded.transpose(1, 2)) / temperature
    # Self and padding drop out of each sample's softmax (rows of padding keep theirs, so stay
    # finite; a lone sample's row is all -inf, and masked_fill's backward zeroes its nan).
    self_mask = torch.eye(width, dtype=torch.bool, device=device)
    excluded = (self_mask | ~valid[:, None, :]) & valid[:, :, None]
    log_normaliser = torch.logsumexp(logits.masked_fill(excluded, -math.inf), dim=2)[images, slot]
    # sum_{k in P(i)} e_i.e_k = e_i.(sum of i's instance - e_i): no S x S positive mask needed.
    num_labels = int(labels.max()) + 1
    label_sums = sampled.new_zeros(num_labels, sampled.shape[1]).index_add_(0, labels, sampled)
    label_counts = torch.bincount(labels, minlength=num_labels)
    num_positives = label_counts.index_select(0, labels) - 1
    positive_logits = (sampled * (label_sums.index_select(0, labels) - sampled)).sum(1)
    # Images with fewer than two sampled instances have no negatives: they contribute nothing.
    image_of_label = torch.zeros_like(label_counts).scatter_(0, labels, images)
    instances_per_image = torch.bincount(image_of_label[label_counts > 0], minlength=num_images)
    anchors = (num_positives > 0) & (instances_per_image >= 2).index_select(0, images)
    mean_positive_log_prob = (
        positive_logits / temperature - num_positives * log_normaliser
    ) / num_positives.clamp(min=1)
    anchor_losses = torch.where(anchors, -mean_positive_log_prob, 0.0)
    return anchor_losses.sum() / anchors.sum().clamp(min=1)


def instance_contrastive_loss(
    embeddings: torch.Tensor,
    instance_ids: torch.Tensor,
    *,
    temperature: float = 0.1,
    samples_per_instance: int = 32,
    max_samples_per_image: int = 512,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """
    Supervised contrastive loss between sampled pixel embeddings of ground-truth instances.

    Per image, pixels are sampled with :func:`sample_instance_pixels` (set S). For an anchor i
    in S with positives P(i) (other S pixels of its instance),
    ``l(i, k) = -log(exp(e_i.e_k / tau) / sum_{m in S, m != i} exp(e_i.e_m / tau))`` is averaged
    over k in P(i), then over all anchors with |P(i)| >= 1 of all images. Images with fewer
    than two sampled instances contribute nothing (they have no negatives). Only an |S| x |S|
    similarity matrix is built per image (|S| <= max_samples_per_image), all images in one
    batched product, with a few host syncs per batch rather than per image.

    Args:
        embeddings: (B, D, H, W) L2-normalised pixel embeddings (computed in float32).
        instance_ids: (B, H, W) int64; 0 = excluded (stuff, void, crowd, tiny instances),
            k >= 1 = instance k of that image.
        temperature: tau > 0.
        samples_per_instance: pixels sampled per instance (>= 1).
        max_samples_per_image: cap on sampled pixels per image (>= 2).
        generator: optional torch.Generator for the sampling (any device; keys are drawn on the
            generator's device and moved to the embeddings' device).

    Returns:
        Scalar tensor; ``embeddings.sum() * 0`` if no anchor contributes.
    """
    if embeddings.dim() != 4:
        raise ValueError(
            f"embeddings must have shape (B, D, H, W), got {tuple(embeddings.shape)}."
        )
    if instance_ids.dim() != 3:
        raise ValueError(
            f"instance_ids must have shape (B, H, W), got {tuple(instance_ids.shape)}."
        )
    if (
        embeddings.shape[0] != instance_ids.shape[0]
        or embeddings.shape[2:] != instance_ids.shape[1:]
    ):
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and instance_ids {tuple(instance_ids.shape)} "
            "disagree on batch size or spatial size."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if samples_per_instance < 1 or max_samples_per_image < 2:
        raise ValueError(
            f"samples_per_instance must be >= 1 and max_samples_per_image >= 2, got "
            f"{samples_per_instance} and {max_samples_per_image}."
        )
    images, indices, labels = sample_batch_instance_pixels(
        instance_ids.flatten(1),
        samples_per_instance=samples_per_instance,
        max_samples=max_samples_per_image,
        generator=generator,
    )
    if labels.numel() == 0:
        return embeddings.sum() * 0
    return _supcon_loss(embeddings.flatten(2), images, indices, labels, temperature)


def _batch_instance_index(ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """One id space for a (B, H, W) batch of instance maps (ids >= 0): image i's instance k is
    i * stride + k. Returns the flat (B * H * W,) index of every pixel and the number of
    slots."""
    b = ids.shape[0]
    stride = int(ids.max()) + 1 if ids.numel() else 1
    flat = (ids + torch.arange(b, device=ids.device).view(b, 1, 1) * stride).flatten()
    return flat, b * stride


def _instance_max(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, H, W) largest of ``values`` (B, H, W) over each pixel's instance (ids >= 0; id 0,
    no instance, is one more group)."""
    flat, num_slots = _batch_instance_index(ids)
    largest = values.new_zeros(num_slots).scatter_reduce_(
        0, flat, values.flatten(), "amax", include_self=True
    )
    return largest.index_select(0, flat).view_as(values)


def instance_centres(instance_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Centroid and equivalent radius of every pixel's instance, for a batch of instance maps.

    Args:
        instance_ids: (B, H, W) int64; 0 = no instance, k >= 1 = instance k of that image.

    Returns:
        centres: (B, 2, H, W) float (y, x) centroid of the pixel's instance, in pixels (0 where
            there is no instance);
        radius: (B, H, W) float ``sqrt(area / pi)`` of the pixel's instance (0 where none).
    """
    if instance_ids.dim() != 3:
        raise ValueError(
            f"instance_ids must have shape (B, H, W), got {tuple(instance_ids.shape)}."
        )
    b, h, w = instance_ids.shape
    device = instance_ids.device
    ids = instance_ids.clamp(min=0)
    flat, num_ids = _batch_instance_index(ids)
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w).expand(b, h, w)
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    sums = coords.new_zeros(num_ids, 2).index_add_(0, flat, coords)
    areas = torch.bincount(flat, minlength=num_ids).float()
    centre_of_id = sums / areas.clamp(min=1)[:, None]
    inside = (ids > 0).flatten()
    centres = torch.where(inside[:, None], centre_of_id.index_select(0, flat), 0.0)
    radius = torch.where(inside, (areas / math.pi).sqrt().index_select(0, flat), 0.0)
    return centres.view(b, h, w, 2).permute(0, 3, 1, 2), radius.view(b, h, w)


def instance_depth(instance_ids: torch.Tensor) -> torch.Tensor:
    """
    Normalised depth of every instance pixel: its chessboard distance to the instance's rim,
    divided by the largest in its instance, so each instance peaks at 1 on its medial axis.

    The rim is the set of pixels with an 8-neighbour of another id (background or another
    instance; the image border is not a rim), so two touching instances get a valley where
    they meet. Depth is counted by repeated 3x3 erosion: after the rim is removed the
    instances lie apart, and eroding their union erodes each alone. Unlike the distance to a
    centroid, depth is local (a few pixels of context tell it), which a network learns fast;
    StarDist's object probability is the Euclidean version of it.

    Args:
        instance_ids: (B, H, W) int64; 0 = no instance, k >= 1 = instance k.

    Returns:
        (B, H, W) float in (0, 1] on instance pixels, 0 elsewhere.
    """
    if instance_ids.dim() != 3:
        raise ValueError(
            f"instance_ids must have shape (B, H, W), got {tuple(instance_ids.shape)}."
        )
    ids = instance_ids.clamp(min=0)
    inside = ids > 0
    as_float = ids.float()[:, None]
    # Largest and smallest id around each pixel (padding ignores the border).
    highest = F.max_pool2d(as_float, 3, stride=1, padding=1)[:, 0]
    lowest = -F.max_pool2d(-as_float, 3, stride=1, padding=1)[:, 0]
    alive = inside & (highest == ids) & (lowest == ids)
    depth = inside.float()
    while bool(alive.any()):
        depth += alive
        alive = _erode_3x3(alive)
    return depth / _instance_max(depth, ids).clamp(min=1) * inside


def _erode_3x3(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary erosion of a (B, H, W) bool mask; outside the image counts as set (the
    border erodes nothing). Separable ANDs of shifted views: 20x faster than a min-pool."""
    padded = F.pad(mask, (1, 1, 1, 1), value=True)
    rows = padded[:, :, :-2] & padded[:, :, 1:-1] & padded[:, :, 2:]
    return rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]


def _pixel_positions(instance_ids: torch.Tensor) -> torch.Tensor:
    """(2, H, W) float (y, x) of every pixel of a (B, H, W) map."""
    h, w = instance_ids.shape[1:]
    rows = torch.arange(h, device=instance_ids.device, dtype=torch.float32)
    cols = torch.arange(w, device=instance_ids.device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))


def seed_map_target(
    instance_ids: torch.Tensor,
    seed_target: str = "depth",
    seed_sigma_scale: float = 0.5,
    centres: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """
    The seed map a network is taught (see :func:`spatial_embedding_losses`): on instance
    pixels the normalised depth of :func:`instance_depth` (``"depth"``) or
    ``exp(-d^2 / (2 sigma^2))`` of the distance d to the instance's centroid with
    ``sigma = seed_sigma_scale * sqrt(area / pi)``, at least one pixel (``"gaussian"``); 0
    elsewhere.

    Args:
        instance_ids: (B, H, W) int64; 0 = no instance, k >= 1 = instance k.
        seed_target: "depth" or "gaussian".
        seed_sigma_scale: "gaussian": sigma relative to the instance's equivalent radius (> 0).
        centres: :func:`instance_centres` of ``instance_ids`` if the caller has them.

    Returns:
        (B, H, W) float in [0, 1].
    """
    if seed_target not in ("depth", "gaussian"):
        raise ValueError(f'seed_target must be "depth" or "gaussian", got {seed_target!r}.')
    if seed_sigma_scale <= 0:
        raise ValueError(f"seed_sigma_scale must be > 0, got {seed_sigma_scale}.")
    if seed_target == "depth":
        return instance_depth(instance_ids)
    centre, radius = instance_centres(instance_ids) if centres is None else centres
    sigma = (seed_sigma_scale * radius).clamp(min=1.0)
    distance2 = (centre - _pixel_positions(instance_ids)).square().sum(dim=1)
    return torch.exp(-distance2 / (2 * sigma**2)) * (instance_ids > 0)


SEED_LOSSES = ("bce", "focal")
# CenterNet's exponents (Zhou et al., "Objects as Points", 2019): alpha down-weights pixels
# already right, beta the negatives near a peak.
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0
# The seed map's initial value under the focal loss (CenterNet's prior).
FOCAL_PRIOR = 0.1


def instance_peak_pixels(target: torch.Tensor, instance_ids: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels where ``target`` (B, H, W) reaches the maximum of their
    instance (several on a tie, e.g. a centroid between two pixels); False off instances."""
    ids = instance_ids.clamp(min=0)
    return (ids > 0) & (target >= _instance_max(target, ids))


def seed_focal_loss(
    seed_logits: torch.Tensor, target: torch.Tensor, peaks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """
    CenterNet's penalty-reduced focal loss of a seed map.

    ``-(1 - p)^a log p`` on the peak pixels, ``-(1 - y)^b p^a log(1 - p)`` on the other valid
    pixels (y the soft target, so pixels near a peak are barely pushed down), summed and
    divided by the number of peak pixels: each instance's peak weighs the same whatever the
    instance's size (a centroid between pixels gives two or four tied peak pixels), where a
    per-pixel mean lets the large instances dominate.

    Args:
        seed_logits: (B, H, W) logits.
        target: (B, H, W) soft target in [0, 1].
        peaks: (B, H, W) bool positives (:func:`instance_peak_pixels`).
        valid: (B, H, W) bool pixels that count as negatives.

    Returns:
        Scalar loss (0 without pixels, keeping the graph; without peaks, the negatives' sum,
        CenterNet's convention).
    """
    p = torch.sigmoid(seed_logits)
    positive = -((1 - p) ** FOCAL_ALPHA) * F.logsigmoid(seed_logits) * peaks
    negative = (
        -((1 - target) ** FOCAL_BETA) * p**FOCAL_ALPHA * F.logsigmoid(-seed_logits)
        * (valid & ~peaks)
    )
    return (positive.sum() + negative.sum()) / peaks.sum().clamp(min=1)


OFFSET_LOSSES = ("l1", "lovasz")
# Weight of the bandwidth's smoothness term beside the Lovasz loss (Neven et al.'s value).
BANDWIDTH_SMOOTHNESS_WEIGHT = 10.0
# log(bandwidth in pixels) is clamped to this range before exp: the Gaussian stays finite.
LOG_BANDWIDTH_RANGE = (-3.0, 4.0)


def lovasz_hinge_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """
    The Lovasz hinge (Berman et al., "The Lovasz-Softmax loss", CVPR 2018) of every row: a
    convex surrogate of 1 - IoU of the mask ``logits > 0`` against ``labels``.

    Args:
        logits: (K, N) float, one row per mask. An entry with a ``logits`` of -inf and a
            False label is padding: it adds nothing (a row's entries need not all count).
        labels: (K, N) bool ground-truth masks; every row holds at least one True.

    Returns:
        (K,) float.
    """
    truth = labels.float()
    errors = 1 - logits * (2 * truth - 1)
    errors_sorted, order = errors.sort(dim=1, descending=True)
    truth_sorted = truth.gather(1, order)
    positives = truth_sorted.sum(dim=1, keepdim=True)
    intersection = positives - truth_sorted.cumsum(dim=1)
    union = positives + (1 - truth_sorted).cumsum(dim=1)
    jaccard = 1 - intersection / union
    # The gradient of the Lovasz extension: the IoU loss added by each next error.
    step = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * step).sum(dim=1)


def _padded_rows(rows: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, int]:
    """For entries sorted by row, ``rows`` (P,) int64: each entry's column in a (num_rows,
    longest row) padded matrix, and that length."""
    counts = torch.bincount(rows, minlength=num_rows)
    starts = torch.cumsum(counts, dim=0) - counts
    columns = torch.arange(rows.numel(), device=rows.device) - starts.index_select(0, rows)
    return columns, int(counts.max())


def bandwidth_instance_loss(
    offsets: torch.Tensor, log_bandwidth: torch.Tensor, instance_ids: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The instance loss of Neven et al. ("Instance Segmentation by Jointly Optimizing Spatial
    Embeddings and Clustering Bandwidth", CVPR 2019) on the instance pixels of each image.

    Pixel i's spatial embedding is ``e_i = position_i + offset_i``. Instance k has its
    centroid C_k and a bandwidth ``s_k = exp(mean of log_bandwidth over its pixels)``; each
    instance pixel belongs to it with ``phi_k(i) = exp(-|e_i - C_k|^2 / (2 s_k^2))``, and
    the Lovasz hinge of ``2 phi_k - 1`` against instance k's mask is a surrogate of 1 - IoU
    of the cluster ``phi_k > 0.5``. So offsets need not reach the centroid exactly, only
    well inside a bandwidth that the network sets per instance and that must leave out the
    neighbours' pixels, which is what grouping needs.

    Instance k's hinge reads the instance pixels within ``3 r_k + 4`` pixels of C_k (r_k its
    equivalent radius) and its own: the pixels of far instances point at their own, far
    centres and would only cost time (a dense image holds hundreds of nuclei).

    Args:
        offsets: (B, 2, H, W) predicted (dy, dx) in pixels.
        log_bandwidth: (B, 1, H, W) predicted log of the bandwidth in pixels.
        instance_ids: (B, H, W) int64; 0 = no instance, k >= 1 = instance k.

    Returns:
        (instance loss, smoothness): the mean Lovasz hinge over the batch's instances, and
        the mean squared deviation of the instance pixels' log-bandwidth from their
        instance's (detached) mean. 0 without instances (keeping the graph).
    """
    positions = _pixel_positions(instance_ids).flatten(1)
    hinges, smoothness = [], []
    for image in range(instance_ids.shape[0]):
        ids = instance_ids[image].flatten()
        pixels = torch.nonzero(ids > 0).squeeze(1)
        if pixels.numel() == 0:
            continue
        present, instance = torch.unique(ids.index_select(0, pixels), return_inverse=True)
        num_instances = present.numel()
        where = positions.index_select(1, pixels).t()
        embedding = where + offsets[image].flatten(1).index_select(1, pixels).t()
        area = torch.bincount(instance, minlength=num_instances).float()
        centre = where.new_zeros(num_instances, 2).index_add_(0, instance, where) / area[:, None]
        log_s = log_bandwidth[image, 0].flatten().index_select(0, pixels)
        mean_log_s = log_s.new_zeros(num_instances).index_add_(0, instance, log_s) / area
        smoothness.append((log_s - mean_log_s.detach().index_select(0, instance)).square())
        # (instance, pixel) pairs that count, in row-major order.
        reach = 3 * (area / math.pi).sqrt() + 4
        near = torch.cdist(centre, where) < reach[:, None]
        near[instance, torch.arange(pixels.numel(), device=pixels.device)] = True
        rows, cols = torch.nonzero(near, as_tuple=True)
        variance = torch.exp(2 * mean_log_s.clamp(*LOG_BANDWIDTH_RANGE))
        distance2 = (embedding.index_select(0, cols) - centre.index_select(0, rows)).square()
        phi = torch.exp(-distance2.sum(dim=1) / (2 * variance.index_select(0, rows)))
        columns, longest = _padded_rows(rows, num_instances)
        logits = phi.new_full((num_instances, longest), -math.inf)
        logits = logits.index_put((rows, columns), 2 * phi - 1)
        truth = torch.zeros_like(logits, dtype=torch.bool)
        truth[rows, columns] = instance.index_select(0, cols) == rows
        hinges.append(lovasz_hinge_rows(logits, truth))
    if not hinges:
        zero = (offsets.sum() + log_bandwidth.sum()) * 0
        return zero, zero
    return torch.cat(hinges).mean(), torch.cat(smoothness).mean()


def spatial_embedding_losses(
    offsets: torch.Tensor,
    seed_logits: torch.Tensor,
    instance_ids: torch.Tensor,
    ignore_mask: torch.Tensor,
    *,
    seed_target: str = "depth",
    seed_sigma_scale: float = 0.5,
    seed_loss: str = "bce",
    offset_loss: str = "l1",
    log_bandwidth: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Losses of the spatial embeddings: offsets to the instance centre and the seed map.

    - Offsets: mean over instance pixels of the L1 distance between the predicted offset and
      ``centroid - position`` (pixels), as Panoptic-DeepLab's offset loss
      (``offset_loss="l1"``); or (``"lovasz"``) :func:`bandwidth_instance_loss` with
      ``log_bandwidth``, plus ``BANDWIDTH_SMOOTHNESS_WEIGHT`` times its smoothness term.
    - Seeds: on instance pixels the target is, with ``seed_target="depth"``, the normalised
      depth of :func:`instance_depth` (1 on the medial axis, low on the rim and where
      instances touch); with ``"gaussian"``, ``exp(-d^2 / (2 sigma^2))``, d the distance to
      the instance's centroid and ``sigma = seed_sigma_scale * sqrt(area / pi)`` (at least one
      pixel; SpatialEmbeddings' seed map with a fixed bandwidth). 0 elsewhere. Every
      instance, small or large, peaks near 1. Binary cross-entropy with these soft targets
      (its gradient does not vanish where the sigmoid saturates, unlike a squared error of the
      sigmoid),
      averaged over instance pixels and over the other valid pixels separately and summed, so
      that the few instance pixels weigh as much as the background (``seed_loss="bce"``); or
      :func:`seed_focal_loss` with each instance's peak pixels of that target as positives
      (``"focal"``).

    Args:
        offsets: (B, 2, H, W) predicted (dy, dx) in pixels.
        seed_logits: (B, 1, H, W) predicted logits of the seed map.
        instance_ids: (B, H, W) int64; 0 = no instance, k >= 1 = instance k.
        ignore_mask: (B, H, W) bool, pixels that supervise neither map (void, crowd, thing
            pixels of instances too small to keep).
        seed_target: "depth" or "gaussian".
        seed_sigma_scale: "gaussian": sigma relative to the instance's equivalent radius (> 0).
        seed_loss: "bce" or "focal".
        offset_loss: "l1" or "lovasz".
        log_bandwidth: (B, 1, H, W) predicted log-bandwidth in pixels ("lovasz" only).

    Returns:
        (offset loss, seed loss), scalar tensors (a term without pixels is 0 and keeps the
        graph).
    """
    if (
        offsets.dim() != 4
        or offsets.shape[1] != 2
        or seed_logits.dim() != 4
        or seed_logits.shape[1] != 1
    ):
        raise ValueError(
            f"offsets must be (B, 2, H, W) and seed_logits (B, 1, H, W), got "
            f"{tuple(offsets.shape)} and {tuple(seed_logits.shape)}."
        )
    if offsets.shape[2:] != instance_ids.shape[1:] or ignore_mask.shape != instance_ids.shape:
        raise ValueError(
            f"offsets {tuple(offsets.shape)}, instance_ids {tuple(instance_ids.shape)} and "
            f"ignore_mask {tuple(ignore_mask.shape)} disagree on the spatial size."
        )
    if seed_loss not in SEED_LOSSES:
        raise ValueError(f"seed_loss must be one of {SEED_LOSSES}, got {seed_loss!r}.")
    if offset_loss not in OFFSET_LOSSES:
        raise ValueError(f"offset_loss must be one of {OFFSET_LOSSES}, got {offset_loss!r}.")
    if offset_loss == "lovasz" and (
        log_bandwidth is None or log_bandwidth.shape != seed_logits.shape
    ):
        raise ValueError(
            f'offset_loss "lovasz" needs log_bandwidth of shape {tuple(seed_logits.shape)}, '
            f"got {None if log_bandwidth is None else tuple(log_bandwidth.shape)}."
        )
    offsets, seed_logits = offsets.float(), seed_logits.float()[:, 0]
    inside = (instance_ids > 0).float()
    background = (instance_ids <= 0).float() * (~ignore_mask.bool()).float()
    centres = instance_centres(instance_ids)
    target = seed_map_target(instance_ids, seed_target, seed_sigma_scale, centres)
    if offset_loss == "lovasz":
        hinge, smoothness = bandwidth_instance_loss(offsets, log_bandwidth.float(), instance_ids)
        offset_loss = hinge + BANDWIDTH_SMOOTHNESS_WEIGHT * smoothness
    else:
        to_centre = centres[0] - _pixel_positions(instance_ids)
        # Masked means as sums over clamped counts: no host sync, and 0 where nothing counts.
        error = (offsets - to_centre).abs().sum(dim=1) * inside
        offset_loss = error.sum() / inside.sum().clamp(min=1)
    if seed_loss == "focal":
        peaks = instance_peak_pixels(target, instance_ids)
        valid = (instance_ids > 0) | ~ignore_mask.bool()
        return offset_loss, seed_focal_loss(seed_logits, target, peaks, valid)
    # Instance pixels against their target, the other valid pixels against 0.
    seed_error = F.binary_cross_entropy_with_logits(
        seed_logits, target * inside, reduction="none"
    )
    seed_loss = (seed_error * inside).sum() / inside.sum().clamp(min=1) + (
        seed_error * background
    ).sum() / background.sum().clamp(min=1)
    return offset_loss, seed_loss


def gate_loss(
    gate_logits: Dict[str, torch.Tensor],
    thing_mask: torch.Tensor,
    *,
    ignore_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    BCE-with-logits between the mask-attention gates and the "thing" mask, mean over scales.

    The target of a gate cell is soft: the fraction of thing pixels among the valid pixels the
    cell covers (area pooling of the full-resolution masks), which keeps object boundaries
    honest at coarse scales. A cell is ignored when more than half of its pixels are ignored.

    Args:
        gate_logits: name -> (B, 1, h, w) gate logits, one entry per scale (any h, w).
        thing_mask: (B, H, W) bool or float, 1 where the pixel belongs to a thing class.
        ignore_mask: optional (B, H, W) bool, True where the pixel is void.

    Returns:
        Scalar tensor; a 0-dim zero on ``thing_mask``'s device for an empty dict.
    """
    if thing_mask.dim() != 3:
        raise ValueError(f"thing_mask must have shape (B, H, W), got {tuple(thing_mask.shape)}.")
    if ignore_mask is not None and ignore_mask.shape != thing_mask.shape:
        raise ValueError(
            f"ignore_mask {tuple(ignore_mask.shape)} must match thing_mask "
            f"{tuple(thing_mask.shape)}."
        )
    if not gate_logits:
        return torch.zeros((), device=thing_mask.device)
    valid = (
        torch.ones_like(thing_mask, dtype=torch.float32)
        if ignore_mask is None
        else (~ignore_mask.bool()).float()
    )[:, None]
    things = thing_mask.float()[:, None] * valid
    losses = []
    for name, logits in gate_logits.items():
        if logits.dim() != 4 or logits.shape[1] != 1 or logits.shape[0] != thing_mask.shape[0]:
            raise ValueError(
                f"gate '{name}' must have shape (B={thing_mask.shape[0]}, 1, h, w), got "
                f"{tuple(logits.shape)}."
            )
        size = logits.shape[-2:]
        valid_frac = F.adaptive_avg_pool2d(valid, size)
        target = F.adaptive_avg_pool2d(things, size) / valid_frac.clamp(min=1e-6)
        weight = (valid_frac > 0.5).float()
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), target.clamp(0, 1), reduction="none"
        )
        losses.append((bce * weight).sum() / weight.sum().clamp(min=1.0))
    return torch.stack(losses).mean()
