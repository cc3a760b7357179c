import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from maskattn_d2.modeling.losses import (
    _balanced_quotas,
    dice_loss,
    gate_loss,
    instance_contrastive_loss,
    sample_batch_instance_pixels,
    sample_instance_pixels,
    semantic_loss,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def _semantic_batch(device, seed=0, b=2, k=5, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g).to(device)
    targets = torch.randint(0, k, (b, h, w), generator=g)
    targets[torch.rand(b, h, w, generator=g) < 0.2] = 255
    return logits, targets.to(device)


def _reference_dice(logits, targets, ignore_index=255, smooth=1.0):
    """One-hot reference: batch-summed per-class Dice, mean over present classes."""
    k = logits.shape[1]
    valid = (targets != ignore_index).float()[:, None]
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(targets.clamp(max=k - 1), k).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    card = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + smooth) / (card + smooth)
    pred = F.one_hot(logits.argmax(1), k).permute(0, 3, 1, 2).float() * valid
    present = (onehot.sum(dim=(0, 2, 3)) > 0) | (pred.sum(dim=(0, 2, 3)) > 0)
    return (1 - dice)[present].mean()


# ----------------------------------------------------------------------- semantic loss
@pytest.mark.parametrize("device", DEVICES)
def test_semantic_loss_equals_cross_entropy(device):
    logits, targets = _semantic_batch(device)
    loss = semantic_loss(logits, targets, ignore_index=255)
    expected = F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dice_matches_reference(device):
    logits, targets = _semantic_batch(device, seed=1)
    # Make class 4 absent from both target and prediction: it must not enter the mean.
    logits[:, 4] = -20.0
    targets[targets == 4] = 0
    expected = _reference_dice(logits, targets)
    assert torch.allclose(dice_loss(logits, targets), expected, atol=1e-6)
    mixed = semantic_loss(logits, targets, ce_weight=0.3)
    ce = F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(mixed, 0.3 * ce + 0.7 * expected, atol=1e-6)
    assert torch.allclose(semantic_loss(logits, targets, ce_weight=0.0), expected, atol=1e-6)


def test_dice_tiny_example_by_hand():
    # One image, 2 classes, 2 pixels: targets [0, 1]; probabilities set via logits.
    p = torch.tensor([0.8, 0.3])  # P(class 0) at each pixel
    logits = torch.stack([p.log(), (1 - p).log()])[None, :, None, :]  # (1, 2, 1, 2)
    targets = torch.tensor([[[0, 1]]])
    dice0 = (2 * 0.8 + 1) / ((0.8 + 0.3) + 1 + 1)
    dice1 = (2 * 0.7 + 1) / ((0.2 + 0.7) + 1 + 1)
    expected = ((1 - dice0) + (1 - dice1)) / 2
    assert dice_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_perfect_prediction_has_small_dice():
    targets = torch.randint(0, 3, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    logits = F.one_hot(targets, 3).permute(0, 3, 1, 2).float() * 30
    assert dice_loss(logits, targets).item() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_mining_averages_hardest_valid_pixels(device):
    logits, targets = _semantic_batch(device, seed=2)
    pixel = F.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    valid_losses = pixel[targets != 255]
    k = int(0.25 * valid_losses.numel())
    expected = valid_losses.sort(descending=True).values[:k].mean()
    loss = semantic_loss(logits, targets, top_k_percent_pixels=0.25)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert loss > semantic_loss(logits, targets)
    # Ignored pixels never enter, however large their loss would be.
    assert k < valid_losses.numel() < targets.numel()


def test_top_k_keeps_at_least_one_pixel():
    logits, targets = _semantic_batch("cpu", seed=3)
    pixel = F.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    loss = semantic_loss(logits, targets, top_k_percent_pixels=1e-6)
    assert torch.allclose(loss, pixel[targets != 255].max(), atol=1e-6)


@pytest.mark.parametrize("ce_weight", [1.0, 0.5, 0.0])
def test_all_ignored_target_gives_zero_with_graph(ce_weight):
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    targets = torch.full((2, 5, 5), 255, dtype=torch.long)
    loss = semantic_loss(logits, targets, ce_weight=ce_weight, top_k_percent_pixels=0.5)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_semantic_loss_gradients_flow_to_logits():
    logits, targets = _semantic_batch("cpu", seed=4)
    logits.requires_grad_(True)
    semantic_loss(logits, targets, ce_weight=0.5, top_k_percent_pixels=0.5).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits_shape, targets_shape, match",
    [
        ((2, 3, 4), (2, 4), "logits"),
        ((2, 3, 4, 4), (2, 1, 4, 4), "targets"),
        ((2, 3, 4, 4), (2, 4, 5), "disagree"),
        ((2, 3, 4, 4), (1, 4, 4), "disagree"),
    ],
)
def test_semantic_loss_bad_shapes_raise(logits_shape, targets_shape, match):
    with pytest.raises(ValueError, match=match):
        semantic_loss(torch.randn(logits_shape), torch.zeros(targets_shape, dtype=torch.long))


def test_semantic_loss_bad_arguments_raise():
    logits, targets = _semantic_batch("cpu")
    with pytest.raises(ValueError, match="ce_weight"):
        semantic_loss(logits, targets, ce_weight=1.5)
    with pytest.raises(ValueError, match="top_k_percent_pixels"):
        semantic_loss(logits, targets, top_k_percent_pixels=0.0)
    with pytest.raises(ValueError, match="integer"):
        semantic_loss(logits, targets.float())


# -------------------------------------------------------------------- contrastive loss
def _reference_supcon(embeddings, instance_ids, temperature):
    """Loop over every foreground pixel (all sampled), explicit SupCon formula."""
    losses = []
    for emb, ids in zip(embeddings, instance_ids):
        e = emb.flatten(1).t().double()
        lab = ids.flatten().tolist()
        pixels = [i for i, v in enumerate(lab) if v > 0]
        if len({lab[i] for i in pixels}) < 2:
            continue
        for i in pixels:
            positives = [k for k in pixels if k != i and lab[k] == lab[i]]
            if not positives:
                continue
            denominator = sum(
                math.exp(float(e[i] @ e[m]) / temperature) for m in pixels if m != i
            )
            terms = [
                -math.log(math.exp(float(e[i] @ e[k]) / temperature) / denominator)
                for k in positives
            ]
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def _random_instance_batch(device, seed=0, b=2, d=4, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    ids = torch.randint(0, 4, (b, h, w), generator=g)
    ids[1, 0, 0] = 7  # an instance with a single pixel: an anchor with no positive
    ids[1][ids[1] == 3] = 9  # ids need not be contiguous
    return embeddings.to(device), ids.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_contrastive_loss_matches_loopy_reference(device):
    embeddings, ids = _random_instance_batch(device)
    loss = instance_contrastive_loss(
        embeddings, ids, temperature=0.2, samples_per_instance=1000, max_samples_per_image=1000
    )
    expected = _reference_supcon(embeddings.cpu(), ids.cpu(), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def _orthogonal_instances(mixed: bool, seed=0):
    """Three 4x6 instances side by side in a 12x6 image plus a background row."""
    ids = torch.zeros(1, 13, 6, dtype=torch.long)
    ids[0, 1:5], ids[0, 5:9], ids[0, 9:13] = 1, 2, 3
    if mixed:
        g = torch.Generator().manual_seed(seed)
        embeddings = F.normalize(torch.randn(1, 8, 13, 6, generator=g), dim=1)
    else:
        basis = torch.eye(8)
        embeddings = basis[ids.clamp(min=0)].permute(0, 3, 1, 2).contiguous()
    return embeddings, ids


def test_contrastive_loss_near_minimum_for_separated_embeddings():
    separated, ids = _orthogonal_instances(mixed=False)
    mixed, _ = _orthogonal_instances(mixed=True)
    kwargs = dict(temperature=0.1, samples_per_instance=64, max_samples_per_image=512)
    loss_separated = instance_contrastive_loss(separated, ids, **kwargs)
    loss_mixed = instance_contrastive_loss(mixed, ids, **kwargs)
    # SupCon's minimum is log|P(i)| = log(23) for 24-pixel instances (positives at e^10,
    # negatives at e^0 contribute a little).
    minimum = math.log(23)
    assert 0 <= loss_separated.item() - minimum < 1e-3
    assert loss_mixed.item() - minimum > 100 * (loss_separated.item() - minimum)
    assert loss_mixed.item() > minimum + 0.5


def test_contrastive_loss_gradients_are_finite():
    embeddings, ids = _random_instance_batch("cpu", seed=3, h=16, w=16)
    embeddings.requires_grad_(True)
    instance_contrastive_loss(embeddings, ids, samples_per_instance=8).backward()
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_balanced_sampling_gives_min_count_k(device):
    counts = {1: 3, 2: 10, 4: 40, 5: 7}
    ids = torch.cat([torch.full((n,), i) for i, n in counts.items()] + [torch.zeros(20)])
    ids = ids.long()[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    indices, labels = sample_instance_pixels(
        ids.to(device), samples_per_instance=8, max_samples=1000
    )
    sampled = ids.to(device)[indices]
    assert indices.unique().numel() == indices.numel()  # without replacement
    for instance, n in counts.items():
        assert int((sampled == instance).sum()) == min(n, 8)
    # Compact labels agree with the original ids.
    for label in labels.unique():
        assert sampled[labels == label].unique().numel() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_cap_is_respected_and_evenly_shared(device):
    counts = {1: 4, 2: 100, 3: 100, 4: 100}
    ids = torch.cat([torch.full((n,), i) for i, n in counts.items()]).long().to(device)
    g = torch.Generator().manual_seed(0)
    indices, _ = sample_instance_pixels(ids, samples_per_instance=64, max_samples=50, generator=g)
    per_instance = torch.bincount(ids[indices], minlength=5).tolist()
    assert indices.numel() == 50
    # The small instance keeps all 4; 46 left for 3 large ones: 16, 15, 15 in some order.
    assert per_instance[1] == 4
    assert sorted(per_instance[2:]) == [15, 15, 16]


def test_sampling_is_uniform_within_an_instance():
    ids = torch.ones(10, dtype=torch.long)
    ids[5:] = 2
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(10)
    for _ in range(2000):
        indices, _ = sample_instance_pixels(
            ids, samples_per_instance=2, max_samples=10, generator=g
        )
        hits[indices] += 1
    # Every pixel is drawn with probability 2/5.
    assert torch.allclose(hits / 2000, torch.full((10,), 0.4), atol=0.05)


def test_generator_makes_sampling_reproducible():
    ids = torch.randint(0, 5, (40, 40), generator=torch.Generator().manual_seed(0)).flatten()
    first = sample_instance_pixels(
        ids, samples_per_instance=8, max_samples=24, generator=torch.Generator().manual_seed(5)
    )
    second = sample_instance_pixels(
        ids, samples_per_instance=8, max_samples=24, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_single_instance_images_contribute_nothing():
    embeddings, ids = _random_instance_batch("cpu", seed=1)
    single = ids.clone()
    single[1] = (single[1] > 0).long() * 5  # image 1 now has one instance
    loss = instance_contrastive_loss(
        embeddings, single, samples_per_instance=1000, max_samples_per_image=1000
    )
    expected = _reference_supcon(embeddings[:1], ids[:1], 0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    only_single = single[1:]
    embeddings_single = embeddings[1:].clone().requires_grad_(True)
    zero = instance_contrastive_loss(embeddings_single, only_single)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    empty = instance_contrastive_loss(embeddings, torch.zeros_like(ids))
    assert empty.item() == 0.0


# The per-image implementation the batched one replaced (a loop over images with host syncs
# in each), kept here as the reference.
def _per_image_quotas(counts, samples_per_instance, max_samples, priority):
    quota = counts.clamp(max=samples_per_instance)
    total = int(quota.sum())
    if total <= max_samples:
        return quota
    sorted_quota = quota.sort().values
    num = sorted_quota.numel()
    prefix = torch.cumsum(sorted_quota, 0) - sorted_quota
    remaining = num - torch.arange(num)
    over = prefix + remaining * sorted_quota > max_samples
    j = int(torch.nonzero(over)[0, 0])
    level = (max_samples - int(prefix[j])) // int(remaining[j])
    quota = quota.clamp(max=level)
    leftover = max_samples - int(quota.sum())
    if leftover > 0:
        eligible = counts > level
        order = torch.where(eligible, priority, torch.full_like(priority, math.inf)).argsort()
        quota[order[:leftover]] += 1
    return quota


def _per_image_supcon(embeddings, images, indices, labels, temperature):
    """Mean SupCon loss, one image at a time, of the given samples."""
    anchor_losses = []
    for i, image_embeddings in enumerate(embeddings):
        image_labels = labels[images == i]
        if image_labels.numel() == 0 or int(image_labels.max()) == int(image_labels.min()):
            continue
        sampled = image_embeddings.flatten(1)[:, indices[images == i]].t().float()
        num = image_labels.numel()
        logits = sampled @ sampled.t() / temperature
        self_mask = torch.eye(num, dtype=torch.bool)
        logits = logits.masked_fill(self_mask, -math.inf)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (image_labels[:, None] == image_labels[None, :]) & ~self_mask
        num_positives = positives.sum(dim=1)
        pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        has_positive = num_positives > 0
        anchor_losses.append(-pos_log_prob[has_positive] / num_positives[has_positive])
    losses = torch.cat(anchor_losses) if anchor_losses else torch.zeros(0)
    return losses.mean() if losses.numel() else embeddings.sum() * 0


def _blob_batch(seed=0, b=6, d=8, h=24, w=24):
    """Random instance maps with big and small instances; image 3 has one instance, image 4
    none, image 5 a single pixel."""
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    coarse = torch.randint(0, 7, (b, 1, 4, 4), generator=g).float()
    ids = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    ids[torch.rand(b, h, w, generator=g) < 0.05] = 11  # a scattered instance
    ids[0, :2, :2] = 12  # a 4-pixel instance, below the cap
    ids[3] = (ids[3] > 0).long() * 2
    ids[4] = 0
    ids[5] = 0
    ids[5, 3, 4] = 1
    return embeddings, ids


def test_batched_quotas_match_the_per_image_water_filling():
    g = torch.Generator().manual_seed(0)
    images = torch.tensor([0] * 5 + [1] * 3 + [2] * 7 + [4] * 2)  # image 3 has no instance
    counts = torch.randint(1, 60, (images.numel(),), generator=g)
    priority = torch.rand(images.numel(), generator=g)
    for spi, cap in [(32, 40), (16, 200), (8, 9), (64, 3)]:
        batched = _balanced_quotas(counts, images, 5, spi, cap, priority)
        expected = torch.cat([
            _per_image_quotas(counts[images == i], spi, cap, priority[images == i])
            for i in range(5) if (images == i).any()
        ])
        assert torch.equal(batched, expected), (spi, cap)


@pytest.mark.parametrize("caps", [(16, 40), (1000, 10000), (3, 2)])
def test_batched_contrastive_loss_matches_the_per_image_loop(caps):
    samples_per_instance, max_samples = caps
    embeddings, ids = _blob_batch()
    embeddings.requires_grad_(True)
    kwargs = dict(samples_per_instance=samples_per_instance, max_samples_per_image=max_samples)
    loss = instance_contrastive_loss(
        embeddings, ids, temperature=0.2, generator=torch.Generator().manual_seed(3), **kwargs
    )
    (grad,) = torch.autograd.grad(loss, embeddings)
    # The same generator draws the same samples.
    images, indices, labels = sample_batch_instance_pixels(
        ids.flatten(1),
        samples_per_instance=samples_per_instance,
        max_samples=max_samples,
        generator=torch.Generator().manual_seed(3),
    )
    flat = ids.flatten(1)
    assert bool((flat[images, indices] > 0).all())
    per_image = torch.bincount(images, minlength=ids.shape[0])
    assert int(per_image.max()) <= max_samples and per_image[4] == 0
    for label in labels.unique():  # one label, one instance of one image
        assert flat[images, indices][labels == label].unique().numel() == 1
        assert images[labels == label].unique().numel() == 1
    expected = _per_image_supcon(embeddings, images, indices, labels, 0.2)
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)


class _MaxNumelMode(TorchDispatchMode):
    """Records the largest tensor any aten op produces and the shapes of matrix products."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.mm_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.max_numel = max(self.max_numel, tensor.numel())
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.mm_shapes.append(tuple(out.shape))
        return out


def test_no_all_pixels_matrix_at_128():
    g = torch.Generator().manual_seed(0)
    b, d, h, w, cap = 2, 16, 128, 128, 512
    embeddings = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1).requires_grad_(True)
    ids = torch.zeros(b, h, w, dtype=torch.long)
    ids[:, :64, :64], ids[:, :64, 64:], ids[:, 64:, :] = 1, 2, 3  # every pixel is an instance
    with _MaxNumelMode() as mode:
        loss = instance_contrastive_loss(
            embeddings, ids, samples_per_instance=400, max_samples_per_image=cap, generator=g
        )
        loss.backward()
    assert mode.mm_shapes and all(max(shape) <= cap for shape in mode.mm_shapes)
    # Nothing bigger than the inputs or the B x S x S matrices: far below (h*w)^2 = 2.7e8.
    assert mode.max_numel <= max(embeddings.numel(), b * cap * cap)


def test_contrastive_loss_bad_inputs_raise():
    embeddings, ids = _random_instance_batch("cpu")
    with pytest.raises(ValueError, match="embeddings"):
        instance_contrastive_loss(embeddings[0], ids)
    with pytest.raises(ValueError, match="disagree"):
        instance_contrastive_loss(embeddings, ids[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        instance_contrastive_loss(embeddings, ids, temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_drives_cuda_sampling():
    embeddings, ids = _random_instance_batch("cuda", h=16, w=16)
    losses = [
        instance_contrastive_loss(
            embeddings, ids, samples_per_instance=4, generator=torch.Generator().manual_seed(1)
        ).item()
        for _ in range(2)
    ]
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------- gate loss
@pytest.mark.parametrize("device", DEVICES)
def test_gate_loss_matches_pooled_targets(device):
    g = torch.Generator().manual_seed(0)
    thing = torch.zeros(2, 8, 8, dtype=torch.bool)
    thing[:, :4, :] = True
    thing[1, 4:6, :2] = True  # a whole stride-2 cell, a quarter of a stride-4 cell
    thing[0, 4, 0] = True  # a quarter of one stride-2 cell
    gates = {
        "s2": torch.randn(2, 1, 4, 4, generator=g).to(device),
        "s4": torch.randn(2, 1, 2, 2, generator=g).to(device),
    }
    loss = gate_loss(gates, thing.to(device))
    expected = []
    for logits in gates.values():
        stride = 8 // logits.shape[-1]
        target = F.avg_pool2d(thing.float()[:, None], stride).to(device)
        expected.append(F.binary_cross_entropy_with_logits(logits, target))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_gate_loss_ignores_void_cells():
    thing = torch.zeros(1, 4, 4, dtype=torch.bool)
    thing[0, :2, :2] = True
    ignore = torch.zeros(1, 4, 4, dtype=torch.bool)
    ignore[0, 2:, 2:] = True  # one whole stride-2 cell is void
    ignore[0, 0, 0] = True  # a quarter of the thing cell: still supervised, target 1
    logits = torch.tensor([[[[3.0, -1.0], [0.5, 100.0]]]], requires_grad=True)
    loss = gate_loss({"s2": logits}, thing, ignore_mask=ignore)
    target = torch.tensor([1.0, 0.0, 0.0])
    expected = F.binary_cross_entropy_with_logits(torch.tensor([3.0, -1.0, 0.5]), target)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 1, 1] == 0


def test_gate_loss_empty_and_bad_inputs():
    thing = torch.zeros(2, 4, 4, dtype=torch.bool)
    zero = gate_loss({}, thing)
    assert zero.dim() == 0 and zero.item() == 0.0 and zero.device == thing.device
    with pytest.raises(ValueError, match="gate 's2'"):
        gate_loss({"s2": torch.zeros(2, 3, 2, 2)}, thing)
    with pytest.raises(ValueError, match="thing_mask"):
        gate_loss({"s2": torch.zeros(2, 1, 2, 2)}, thing[0])
