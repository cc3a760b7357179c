"""The learned clustering bandwidth (Neven et al. 2019): the Lovasz hinge, the instance loss,
the head's extra output and the "bandwidth" seed assignment."""
import math

import pytest
import torch

from detectron2.config import get_cfg

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.modeling.heads import MaskAttnEmbedHead
from maskattn_d2.modeling.losses import (
    bandwidth_instance_loss,
    instance_centres,
    lovasz_hinge_rows,
    spatial_embedding_losses,
)
from maskattn_d2.modeling.postprocessing import MaskAttnPostProcessor, spatial_instance_map


def _lovasz_hinge_reference(logits, labels):
    """Berman et al.'s flat Lovasz hinge of one mask, written out step by step."""
    signs = 2 * labels.float() - 1
    errors = 1 - logits * signs
    errors_sorted, order = torch.sort(errors, descending=True)
    truth = labels.float()[order]
    grad, previous = [], 0.0
    for i in range(len(truth)):
        seen = truth[: i + 1]
        jaccard = 1 - (truth.sum() - seen.sum()) / (truth.sum() + (1 - seen).sum())
        grad.append(jaccard - previous)
        previous = jaccard
    return sum(torch.relu(e) * g for e, g in zip(errors_sorted, grad))


def test_lovasz_hinge_rows_match_the_flat_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 30)
    labels = torch.rand(6, 30) > 0.6
    labels[:, 0] = True
    expected = torch.stack([_lovasz_hinge_reference(logits[k], labels[k]) for k in range(6)])
    assert torch.allclose(lovasz_hinge_rows(logits, labels), expected, atol=1e-6)


def test_lovasz_hinge_padding_adds_nothing():
    torch.manual_seed(1)
    logits = torch.randn(3, 12)
    labels = torch.rand(3, 12) > 0.5
    labels[:, 3] = True
    padded_logits = torch.cat([logits, torch.full((3, 5), -math.inf)], dim=1)
    padded_labels = torch.cat([labels, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    assert torch.allclose(
        lovasz_hinge_rows(padded_logits, padded_labels), lovasz_hinge_rows(logits, labels)
    )
    # A perfect margin on every pixel costs nothing.
    assert lovasz_hinge_rows(2 * labels.float() - 1, labels).abs().max() < 1e-6


def _touching_squares():
    """Batch of 2: image 0 holds two 4x4 squares side by side and a third apart; image 1 none."""
    ids = torch.zeros(2, 12, 12, dtype=torch.long)
    ids[0, 2:6, 1:5] = 1
    ids[0, 2:6, 5:9] = 2
    ids[0, 8:11, 8:11] = 3
    return ids


def _dense_reference(offsets, log_bandwidth, ids):
    """The loss over all instance pixels of an image, one instance at a time."""
    hinges, smooth = [], []
    for b in range(ids.shape[0]):
        for k in ids[b].unique().tolist():
            if k == 0:
                continue
            fg = ids[b] > 0
            mine = ids[b] == k
            ys, xs = torch.nonzero(mine, as_tuple=True)
            centre = torch.stack([ys.float().mean(), xs.float().mean()])
            fy, fx = torch.nonzero(fg, as_tuple=True)
            emb = torch.stack([fy.float(), fx.float()], 1) + offsets[b][:, fy, fx].t()
            log_s = log_bandwidth[b, 0][mine]
            sigma2 = torch.exp(2 * log_s.mean())
            phi = torch.exp(-((emb - centre) ** 2).sum(1) / (2 * sigma2))
            hinges.append(_lovasz_hinge_reference(2 * phi - 1, mine[fy, fx]))
            smooth.append((log_s - log_s.mean()) ** 2)
    return torch.stack(hinges).mean(), torch.cat(smooth).mean()


def test_bandwidth_instance_loss_matches_a_dense_reference():
    torch.manual_seed(2)
    ids = _touching_squares()
    offsets = torch.randn(2, 2, 12, 12)
    log_bandwidth = 0.3 * torch.randn(2, 1, 12, 12)
    hinge, smoothness = bandwidth_instance_loss(offsets, log_bandwidth, ids)
    ref_hinge, ref_smooth = _dense_reference(offsets, log_bandwidth, ids)
    # Every pixel here lies within the loss's reach of every centroid: the same sums.
    assert torch.allclose(hinge, ref_hinge, atol=1e-5)
    assert torch.allclose(smoothness, ref_smooth, atol=1e-6)


def test_bandwidth_instance_loss_vanishes_at_the_centroids_and_teaches_the_offsets():
    ids = _touching_squares()
    centres, _ = instance_centres(ids)
    rows = torch.arange(12.0).view(1, 12, 1).expand(2, 12, 12)
    cols = torch.arange(12.0).view(1, 1, 12).expand(2, 12, 12)
    to_centre = (centres - torch.stack([rows, cols], 1)) * (ids > 0)[:, None]
    hinge, smoothness = bandwidth_instance_loss(to_centre, torch.zeros(2, 1, 12, 12), ids)
    assert hinge < 1e-3 and smoothness == 0  # the neighbours 4 px away: phi = exp(-8)
    # From zero offsets and a one-pixel bandwidth, gradient steps lower the loss a lot.
    offsets = torch.zeros(2, 2, 12, 12, requires_grad=True)
    log_bandwidth = torch.zeros(2, 1, 12, 12, requires_grad=True)
    optimizer = torch.optim.Adam([offsets, log_bandwidth], lr=0.1)
    first = None
    for _ in range(60):
        hinge, smoothness = bandwidth_instance_loss(offsets, log_bandwidth, ids)
        loss = hinge + 10 * smoothness
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.25 * first


def test_bandwidth_instance_loss_without_instances_keeps_the_graph():
    offsets = torch.zeros(1, 2, 8, 8, requires_grad=True)
    log_bandwidth = torch.zeros(1, 1, 8, 8, requires_grad=True)
    hinge, smoothness = bandwidth_instance_loss(
        offsets, log_bandwidth, torch.zeros(1, 8, 8, dtype=torch.long)
    )
    (hinge + smoothness).backward()
    assert float(hinge.detach()) == 0 and offsets.grad is not None


def test_spatial_embedding_losses_lovasz_needs_the_bandwidth():
    ids = _touching_squares()
    offsets, seeds = torch.zeros(2, 2, 12, 12), torch.zeros(2, 1, 12, 12)
    ignore = torch.zeros(2, 12, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="log_bandwidth"):
        spatial_embedding_losses(offsets, seeds, ids, ignore, offset_loss="lovasz")
    with pytest.raises(ValueError, match="offset_loss"):
        spatial_embedding_losses(offsets, seeds, ids, ignore, offset_loss="l2")
    log_bandwidth = torch.zeros(2, 1, 12, 12)
    offset_loss, _ = spatial_embedding_losses(
        offsets, seeds, ids, ignore, offset_loss="lovasz", log_bandwidth=log_bandwidth
    )
    hinge, smoothness = bandwidth_instance_loss(offsets, log_bandwidth, ids)
    assert torch.allclose(offset_loss, hinge + 10 * smoothness)


def test_head_predicts_the_bandwidth_only_with_the_lovasz_loss():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    from detectron2.layers import ShapeSpec

    shapes = {"dec1": ShapeSpec(channels=8, stride=1)}
    features = {"dec1": torch.randn(2, 8, 16, 16)}
    assert "log_bandwidth" not in MaskAttnEmbedHead(cfg, shapes)(features)
    cfg.MODEL.EMBED_HEAD.OFFSET_LOSS = "lovasz"
    head = MaskAttnEmbedHead(cfg, shapes).eval()
    outputs = head(features)
    assert outputs["log_bandwidth"].shape == (2, 1, 16, 16)
    # It starts near the initial bandwidth everywhere.
    initial = math.log(MaskAttnEmbedHead.INITIAL_BANDWIDTH)
    assert (outputs["log_bandwidth"] - initial).abs().max() < 0.1


def _side_by_side(second_peak: bool):
    """Two 6x6 objects side by side whose offsets point at their own centres; the seed map
    peaks on the left one and, without ``second_peak``, only slopes up towards it on the right
    one (no local maximum of its own)."""
    h = w = 16
    sem = torch.ones(h, w, dtype=torch.long)
    sem[4:10, 2:14] = 0
    logits = torch.stack([(sem == 0).float() * 4 - 2, (sem == 1).float() * 4 - 2])
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cx = torch.where(xs < 8, torch.tensor(4.5), torch.tensor(10.5))
    offsets = torch.stack([6.5 - ys, cx - xs])
    seed = torch.exp(-((ys - 6.5) ** 2 + (xs - 4.5) ** 2) / 8)
    if second_peak:
        seed = seed + 0.8 * torch.exp(-((ys - 6.5) ** 2 + (xs - 10.5) ** 2) / 8)
    else:
        seed = seed + 0.3 * torch.exp(-((ys - 6.5) ** 2 + (xs - 10.5) ** 2) / 8)
        seed = seed + 0.5 * torch.exp(-((ys - 6.5) ** 2 + (xs - 7) ** 2) / 30)
    head = {
        "offsets": offsets,
        "seed_logits": torch.logit(seed.clamp(1e-4, 1 - 1e-4))[None],
        "log_bandwidth": torch.zeros(1, h, w),
    }
    return sem, logits, head


def _instances(sem, logits, head, assignment):
    instance_map, _, scores = spatial_instance_map(
        sem, logits, head, torch.tensor([True, False]),
        seed_threshold=0.2, seed_min_distance=0.0, embedding_weight=0.0,
        min_instance_area=1, max_instances=10, assignment=assignment, merge_ratio=0.0,
    )
    return instance_map.view(sem.shape), scores


def test_bandwidth_assignment_seeds_what_a_stronger_cluster_leaves_unclaimed():
    sem, logits, head = _side_by_side(second_peak=False)
    merged, _ = _instances(sem, logits, head, "seed_ascent")
    assert merged[4:10, 2:14].unique().tolist() == [0]
    split, scores = _instances(sem, logits, head, "bandwidth")
    left, right = split[4:10, 2:8], split[4:10, 8:14]
    assert left.unique().numel() == 1 and right.unique().numel() == 1
    assert int(left[0, 0]) != int(right[0, 0]) and scores.numel() == 2


def test_bandwidth_assignment_joins_a_second_peak_inside_a_cluster():
    # Two peaks, the halves pointing at centres 6 px apart: with a bandwidth of 20 px the
    # right peak lies inside the left seed's cluster (phi = exp(-36 / 800) > 0.5), one object.
    sem, logits, head = _side_by_side(second_peak=True)
    head["log_bandwidth"] = torch.full((1, 16, 16), math.log(20.0))
    one, scores = _instances(sem, logits, head, "bandwidth")
    assert one[4:10, 2:14].unique().tolist() == [0] and scores.numel() == 1
    # With 1 px each half is its own cluster.
    head["log_bandwidth"] = torch.zeros(1, 16, 16)
    two, _ = _instances(sem, logits, head, "bandwidth")
    assert two[4:10, 2:8].unique().numel() == 1 and two[4:10, 8:14].unique().numel() == 1
    assert int(two[4, 2]) != int(two[4, 13])


def test_postprocessor_asks_for_the_bandwidth_by_its_config_key():
    post = MaskAttnPostProcessor(
        num_classes=2, thing_ids=[0], stuff_area=4, seed_assignment="bandwidth"
    )
    assert post.needed_head_outputs(True)["log_bandwidth"] == 1
    _, logits, head = _side_by_side(second_peak=False)
    del head["log_bandwidth"]
    with pytest.raises(ValueError, match='OFFSET_LOSS "lovasz"'):
        post(logits, head, (16, 16))


def test_bandwidth_assignment_survives_a_collapsed_or_huge_bandwidth():
    # The halves' offsets point exactly at their own centres (0 px from their seed's).
    sem, logits, head = _side_by_side(second_peak=True)
    # exp(2 log s) underflows to 0: clamped, each seed still claims the pixels that point
    # exactly at it, so the halves stay two instances.
    head["log_bandwidth"] = torch.full((1, 16, 16), -100.0)
    labels, scores = _instances(sem, logits, head, "bandwidth")
    assert labels[4:10, 2:8].unique().numel() == 1 and labels[4:10, 8:14].unique().numel() == 1
    assert int(labels[4, 2]) != int(labels[4, 13]) and torch.isfinite(scores).all()
    # It overflows to inf: one cluster holds everything.
    head["log_bandwidth"] = torch.full((1, 16, 16), 100.0)
    labels, scores = _instances(sem, logits, head, "bandwidth")
    assert labels[4:10, 2:14].unique().tolist() == [0] and torch.isfinite(scores).all()
