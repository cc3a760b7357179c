"""Spatial embeddings: centre targets, their losses, seeds and seed assignment, each against a
straightforward (looping) reference on small inputs, and the grouping inside components."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from maskattn_d2.modeling.postprocessing import assign_to_seeds, find_seeds
from maskattn_d2.modeling.losses import (
    instance_centres,
    instance_depth,
    spatial_embedding_losses,
)
from maskattn_d2.modeling.postprocessing import spatial_instance_map


def _random_instances(seed=0, batch=2, size=(12, 15), num=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num + 1, (batch, *size), generator=g)


def test_instance_centres_match_a_loop():
    ids = _random_instances()
    ids[1][ids[1] == 3] = 0  # an id absent from one image only
    centres, radius = instance_centres(ids)
    for b in range(ids.shape[0]):
        for k in ids[b].unique().tolist():
            ys, xs = np.nonzero(ids[b].numpy() == k)
            at = torch.from_numpy(ids[b].numpy() == k)
            if k == 0:
                assert torch.all(centres[b][:, at] == 0) and torch.all(radius[b][at] == 0)
                continue
            torch.testing.assert_close(centres[b, 0][at], torch.full((len(ys),), ys.mean()).float())
            torch.testing.assert_close(centres[b, 1][at], torch.full((len(xs),), xs.mean()).float())
            torch.testing.assert_close(
                radius[b][at], torch.full((len(ys),), math.sqrt(len(ys) / math.pi))
            )


def _reference_losses(offsets, seed_logits, ids, ignore, scale):
    """The two losses pixel by pixel."""
    b, _, h, w = offsets.shape
    offset_terms, fg_terms, bg_terms = [], [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                k = int(ids[i, y, x])
                logit = float(seed_logits[i, 0, y, x])
                if k > 0:
                    ys, xs = np.nonzero(ids[i].numpy() == k)
                    cy, cx = ys.mean(), xs.mean()
                    offset_terms.append(
                        abs(float(offsets[i, 0, y, x]) - (cy - y))
                        + abs(float(offsets[i, 1, y, x]) - (cx - x))
                    )
                    sigma = max(scale * math.sqrt(len(ys) / math.pi), 1.0)
                    t = math.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
                    p = 1 / (1 + math.exp(-logit))
                    fg_terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
                elif not ignore[i, y, x]:
                    p = 1 / (1 + math.exp(-logit))
                    bg_terms.append(-math.log(1 - p))
    return np.mean(offset_terms), np.mean(fg_terms) + np.mean(bg_terms)


def test_spatial_embedding_losses_match_a_pixel_loop():
    g = torch.Generator().manual_seed(1)
    ids = _random_instances(seed=1, size=(6, 7), num=3)
    ignore = torch.rand(ids.shape, generator=g) < 0.2
    offsets = 3 * torch.randn(2, 2, 6, 7, generator=g)
    seed_logits = torch.randn(2, 1, 6, 7, generator=g)
    offset_loss, seed_loss = spatial_embedding_losses(
        offsets, seed_logits, ids, ignore, seed_target="gaussian", seed_sigma_scale=0.7
    )
    ref_offset, ref_seed = _reference_losses(offsets, seed_logits, ids, ignore, 0.7)
    assert offset_loss.item() == pytest.approx(ref_offset, rel=1e-5)
    assert seed_loss.item() == pytest.approx(ref_seed, rel=1e-5)
    # The depth target: the same cross-entropy against instance_depth on instance pixels.
    _, depth_loss = spatial_embedding_losses(offsets, seed_logits, ids, ignore)
    target = instance_depth(ids)
    errors = F.binary_cross_entropy_with_logits(seed_logits[:, 0], target, reduction="none")
    background = (ids == 0) & ~ignore
    expected = errors[ids > 0].mean() + errors[background].mean()
    assert depth_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_spatial_embedding_losses_vanish_at_the_target_and_handle_empty_images():
    ids = torch.zeros(1, 9, 9, dtype=torch.long)
    ids[0, 2:5, 2:5] = 1  # centre (3, 3)
    centres, _ = instance_centres(ids)
    ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    perfect = (centres - torch.stack([ys, xs])[None]) * (ids > 0)
    offsets = perfect.clone().requires_grad_(True)
    seed_logits = torch.full((1, 1, 9, 9), -30.0, requires_grad=True)
    offset_loss, seed_loss = spatial_embedding_losses(
        offsets, seed_logits, ids, torch.zeros_like(ids, dtype=torch.bool)
    )
    assert offset_loss.item() == pytest.approx(0.0, abs=1e-6)
    (offset_loss + seed_loss).backward()
    assert offsets.grad is not None and seed_logits.grad is not None
    # No instance, everything ignored: zero losses that keep the graph.
    nothing = torch.zeros(1, 9, 9, dtype=torch.long)
    zero_offset, zero_seed = spatial_embedding_losses(
        offsets, seed_logits, nothing, torch.ones_like(nothing, dtype=torch.bool)
    )
    assert zero_offset.item() == 0 and zero_seed.item() == 0 and zero_seed.requires_grad
    with pytest.raises(ValueError, match="seed_sigma_scale"):
        spatial_embedding_losses(offsets, seed_logits, ids, ids > 0, seed_sigma_scale=0)
    with pytest.raises(ValueError, match="seed_target"):
        spatial_embedding_losses(offsets, seed_logits, ids, ids > 0, seed_target="edt")
    with pytest.raises(ValueError, match="offsets must be"):
        spatial_embedding_losses(offsets[:, :1], seed_logits, ids, ids > 0)


def _reference_focal_loss(seed_logits, ids, ignore, scale):
    """CenterNet's penalty-reduced focal loss pixel by pixel: positives are each instance's
    pixels nearest its centroid (all of them on a tie)."""
    b, _, h, w = seed_logits.shape
    total, positives = 0.0, 0
    for i in range(b):
        nearest = {}
        for k in ids[i].unique().tolist():
            if k > 0:
                ys, xs = np.nonzero(ids[i].numpy() == k)
                cy, cx = ys.mean(), xs.mean()
                d2 = (ys - cy) ** 2 + (xs - cx) ** 2
                nearest[k] = (cy, cx, math.sqrt(len(ys) / math.pi), d2.min())
        for y in range(h):
            for x in range(w):
                k = int(ids[i, y, x])
                p = 1 / (1 + math.exp(-float(seed_logits[i, 0, y, x])))
                if k > 0:
                    cy, cx, radius, d2_min = nearest[k]
                    d2 = (y - cy) ** 2 + (x - cx) ** 2
                    if math.isclose(d2, d2_min, abs_tol=1e-9):
                        total -= (1 - p) ** 2 * math.log(p)
                        positives += 1
                        continue
                    sigma = max(scale * radius, 1.0)
                    t = math.exp(-d2 / (2 * sigma**2))
                elif ignore[i, y, x]:
                    continue
                else:
                    t = 0.0
                total -= (1 - t) ** 4 * p**2 * math.log(1 - p)
    return total / max(positives, 1)


def test_focal_seed_loss_matches_a_pixel_loop():
    g = torch.Generator().manual_seed(2)
    ids = _random_instances(seed=2, size=(6, 7), num=3)
    ids[0, 4:6, 5:7] = 4  # a 2x2 instance: four pixels tie nearest its centroid
    ignore = (torch.rand(ids.shape, generator=g) < 0.2) & (ids == 0)
    offsets = torch.randn(2, 2, 6, 7, generator=g)
    seed_logits = 2 * torch.randn(2, 1, 6, 7, generator=g)
    offset_loss, seed_loss = spatial_embedding_losses(
        offsets, seed_logits, ids, ignore, seed_target="gaussian", seed_sigma_scale=0.7,
        seed_loss="focal",
    )
    expected = _reference_focal_loss(seed_logits, ids, ignore, 0.7)
    assert seed_loss.item() == pytest.approx(expected, rel=1e-5)
    bce_offset, bce_seed = spatial_embedding_losses(
        offsets, seed_logits, ids, ignore, seed_target="gaussian", seed_sigma_scale=0.7
    )
    assert offset_loss.item() == bce_offset.item() and seed_loss.item() != bce_seed.item()
    with pytest.raises(ValueError, match="seed_loss"):
        spatial_embedding_losses(offsets, seed_logits, ids, ignore, seed_loss="l2")


def test_focal_seed_loss_pull_on_a_peak_does_not_dilute_with_instance_pixels():
    """Under the focal loss a one-pixel instance's peak is pulled as hard beside a large
    instance as beside a small one (normalised by peaks); under the per-pixel mean of the
    cross-entropy its pull shrinks as the other instance grows. Pixels beside a peak are
    barely pushed down."""
    ignore = torch.zeros(1, 20, 20, dtype=torch.bool)
    offsets = torch.zeros(1, 2, 20, 20)
    pull = {}
    for side in (5, 15):
        ids = torch.zeros(1, 20, 20, dtype=torch.long)
        ids[0, 1 : 1 + side, 1 : 1 + side] = 1  # one centre pixel (odd side)
        ids[0, 18, 18] = 2
        for loss in ("bce", "focal"):
            logits = torch.zeros(1, 1, 20, 20, requires_grad=True)
            spatial_embedding_losses(
                offsets, logits, ids, ignore, seed_target="gaussian", seed_loss=loss
            )[1].backward()
            grad = logits.grad[0, 0]
            pull[side, loss] = grad[18, 18].item()
            if loss == "focal" and side == 15:
                # The peak's neighbour (target exp(-1 / (2 * 4.23^2)) = 0.97) is pushed down
                # far less than a background pixel.
                assert grad[8, 8] < 0 and 0 < grad[8, 9] < 1e-5 * grad[0, 19]
    assert pull[5, "focal"] < 0 and pull[5, "focal"] == pytest.approx(pull[15, "focal"])
    assert pull[15, "bce"] == pytest.approx(pull[5, "bce"] * 26 / 226, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_seeds_are_the_local_maxima(seed):
    g = torch.Generator().manual_seed(seed)
    seed_map = F.avg_pool2d(torch.rand(1, 1, 30, 40, generator=g), 3, 1, 1)[0, 0]
    allowed = torch.rand(30, 40, generator=g) < 0.8
    seeds = find_seeds(seed_map, allowed, threshold=0.45, max_seeds=1000)
    masked = np.where(allowed.numpy(), seed_map.numpy(), -1.0)
    peaks = (masked == ndimage.maximum_filter(masked, size=3, mode="constant", cval=-1.0))
    expected = np.flatnonzero(peaks & allowed.numpy() & (masked > 0.45))
    assert sorted(seeds.tolist()) == sorted(expected.tolist())
    values = seed_map.flatten()[seeds]
    assert torch.all(values[:-1] >= values[1:])  # strongest first
    capped = find_seeds(seed_map, allowed, threshold=0.45, max_seeds=3)
    assert torch.equal(capped, seeds[:3])


def test_find_seeds_keeps_one_seed_of_a_plateau():
    seed_map = torch.zeros(8, 8)
    seed_map[2:4, 2:4] = 0.9  # a 2x2 plateau: one seed, its first pixel in raster order
    seed_map[6, 6] = 0.8
    seeds = find_seeds(seed_map, torch.ones(8, 8, dtype=torch.bool), threshold=0.5, max_seeds=10)
    assert seeds.tolist() == [2 * 8 + 2, 6 * 8 + 6]


def test_assign_to_seeds_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(200, 3, generator=g)
    groups = torch.randint(0, 4, (200,), generator=g)
    seed_points = torch.randn(7, 3, generator=g)
    seed_groups = torch.tensor([0, 0, 1, 1, 1, 2, 5])  # group 3 has no seed
    assigned = assign_to_seeds(points, groups, seed_points, seed_groups)
    for p, group, a in zip(points, groups.tolist(), assigned.tolist()):
        same = [s for s in range(7) if seed_groups[s] == group]
        if not same:
            assert a == -1
        else:
            assert a == min(same, key=lambda s: float((p - seed_points[s]).square().sum()))
    empty = assign_to_seeds(points, groups, seed_points[:0], seed_groups[:0])
    assert torch.all(empty == -1)
    # One seed per group (no distances needed): every point of a seeded group joins its seed.
    single = assign_to_seeds(points, groups, seed_points[[5, 0, 2]], seed_groups[[5, 0, 2]])
    expected = torch.tensor([1, 2, 0, -1])[groups]
    assert torch.equal(single, expected)


def test_assign_to_seeds_unsorted_groups_and_ties_go_to_the_lowest_seed():
    g = torch.Generator().manual_seed(4)
    points = torch.randint(0, 6, (300, 2), generator=g).float()
    groups = torch.randint(0, 5, (300,), generator=g)
    # Groups out of order; seeds 1 and 4 (group 2) and 0 and 6 (group 0) coincide: ties.
    seed_points = torch.tensor([[1, 1], [3, 3], [0, 5], [5, 0], [3, 3], [2, 2], [1, 1]]).float()
    seed_groups = torch.tensor([0, 2, 4, 0, 2, 1, 0])
    assigned = assign_to_seeds(points, groups, seed_points, seed_groups)
    for p, group, a in zip(points, groups.tolist(), assigned.tolist()):
        same = [s for s in range(7) if seed_groups[s] == group]
        if not same:
            assert a == -1  # group 3 has no seed
        else:
            assert a == min(same, key=lambda s: (float((p - seed_points[s]).square().sum()), s))
    assert (assigned == 4).sum() == 0 and (assigned == 6).sum() == 0
    assert (assigned == -1).sum() == (groups == 3).sum() > 0
    nothing = assign_to_seeds(points[:0], groups[:0], seed_points, seed_groups)
    assert nothing.shape == (0,)


def test_spatial_instances_split_touching_objects_inside_their_component():
    """Two touching boxes of one class (one component) are split by where their offsets
    point; a box of another class touching them stays apart (its own component); a seedless
    blob becomes one instance."""
    h, w = 20, 30
    sem = torch.zeros(h, w, dtype=torch.long)  # class 0: background stuff
    boxes = [(1, (4, 12), (2, 10)), (1, (4, 12), (10, 18)), (2, (4, 12), (18, 24))]
    offsets = torch.zeros(2, h, w)
    seed_map = torch.full((h, w), 0.01)
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    for category, (r0, r1), (c0, c1) in boxes:
        sem[r0:r1, c0:c1] = category
        cy, cx = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
        offsets[0, r0:r1, c0:c1] = cy - ys[r0:r1, c0:c1]
        offsets[1, r0:r1, c0:c1] = cx - xs[r0:r1, c0:c1]
        seed_map[int(cy), int(cx)] = 0.9
    sem[15:18, 3:8] = 1  # a blob of class 1 without seed
    logits = F.one_hot(sem, 3).permute(2, 0, 1).float() * 30  # probability 1 in float32
    head_outputs = {"offsets": offsets, "seed_logits": torch.logit(seed_map)[None]}
    instance_map, classes, scores = spatial_instance_map(
        sem, logits, head_outputs, torch.tensor([False, True, True]), seed_threshold=0.5,
        seed_min_distance=2.0, embedding_weight=0.0, min_instance_area=4, max_instances=10,
    )
    instance_map = instance_map.view(h, w)
    regions = [(slice(r0, r1), slice(c0, c1)) for _, (r0, r1), (c0, c1) in boxes]
    regions.append((slice(15, 18), slice(3, 8)))
    labels = []
    for region in regions:
        values = instance_map[region].unique()
        assert values.numel() == 1 and int(values) >= 0  # each region is exactly one instance
        labels.append(int(values))
    assert len(set(labels)) == 4 and int(instance_map.max()) == 3
    assert classes[labels].tolist() == [1, 1, 2, 1]
    # Seeded instances score their seed value (x mean class probability 1); the seedless
    # blob scores the largest seed value in it.
    torch.testing.assert_close(scores[labels], torch.tensor([0.9, 0.9, 0.9, 0.01]))
    assert torch.all(instance_map[sem == 0] == -1)
    # The ablation: without the components, the seedless blob joins a seed far away.
    anywhere, _, _ = spatial_instance_map(
        sem, logits, head_outputs, torch.tensor([False, True, True]), seed_threshold=0.5,
        seed_min_distance=2.0, embedding_weight=0.0, min_instance_area=4, max_instances=10,
        within_components=False,
    )
    anywhere = anywhere.view(h, w)
    blob = anywhere[regions[-1]].unique()
    assert blob.numel() == 1 and int(blob) in anywhere[regions[0]].unique().tolist()


def test_instance_depth_matches_a_chessboard_distance_transform_per_instance():
    ids = _random_instances(seed=4, size=(16, 18), num=3)
    # Blobs rather than salt-and-pepper: smooth the random labels with a majority filter.
    ids = torch.from_numpy(
        np.stack([ndimage.median_filter(i.numpy(), size=5) for i in ids])
    ).long()
    depth = instance_depth(ids)
    for b in range(ids.shape[0]):
        expected = np.zeros(ids.shape[1:])
        for k in ids[b].unique().tolist():
            if k == 0:
                continue
            mask = ids[b].numpy() == k
            distance = ndimage.distance_transform_cdt(mask, metric="chessboard").astype(float)
            # Per connected piece the erosion runs on the id, so normalise per id.
            expected[mask] = distance[mask] / distance[mask].max()
        torch.testing.assert_close(depth[b], torch.from_numpy(expected).float())
    assert torch.all(depth[ids == 0] == 0)


def test_depth_seed_target_has_a_valley_between_touching_instances():
    ids = torch.zeros(1, 7, 12, dtype=torch.long)
    ids[0, 1:6, 1:6], ids[0, 1:6, 6:11] = 1, 2  # two 5x5 squares side by side
    depth = instance_depth(ids)[0]
    assert depth[3, 3] == 1 and depth[3, 8] == 1  # centres
    assert depth[3, 5] == depth[3, 6] == pytest.approx(1 / 3)  # the contact columns


def test_two_seeds_on_one_object_merge_but_touching_objects_stay_apart():
    """A 10x16 box of one object with two seed peaks (a ridge) and imprecise offsets (its
    halves point 3 px apart, near its centre) is cut in two without merging and is one
    instance with it; two touching 10x8 boxes, pointing at their own centres 8 px apart, stay
    two instances."""
    h, w = 14, 40
    sem = torch.zeros(h, w, dtype=torch.long)
    offsets = torch.zeros(2, h, w)
    seed_map = torch.full((h, w), 0.01)
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")

    def box(rows, cols, centre):
        sem[rows, cols] = 1
        offsets[0, rows, cols] = centre[0] - ys[rows, cols]
        offsets[1, rows, cols] = centre[1] - xs[rows, cols]

    box(slice(2, 12), slice(1, 9), (6.5, 7.0))  # one object whose halves point 3 px apart
    box(slice(2, 12), slice(9, 17), (6.5, 10.0))
    seed_map[6, 4], seed_map[6, 13] = 0.9, 0.8  # ... with two seeds 9 px apart
    box(slice(2, 12), slice(20, 28), (6.5, 23.5))  # two touching objects
    box(slice(2, 12), slice(28, 36), (6.5, 31.5))
    seed_map[6, 23], seed_map[6, 31] = 0.9, 0.9
    logits = F.one_hot(sem, 2).permute(2, 0, 1).float() * 30
    head_outputs = {"offsets": offsets, "seed_logits": torch.logit(seed_map)[None]}

    def instances(merge_ratio):
        instance_map, _, _ = spatial_instance_map(
            sem, logits, head_outputs, torch.tensor([False, True]), seed_threshold=0.5,
            seed_min_distance=0.0, embedding_weight=0.0, min_instance_area=4, max_instances=10,
            merge_ratio=merge_ratio,
        )
        instance_map = instance_map.view(h, w)
        return [instance_map[2:12, a:b].unique().tolist() for a, b in ((1, 17), (20, 28), (28, 36))]

    split, touching_a, touching_b = instances(merge_ratio=0.0)
    assert len(split) == 2  # without merging the object is cut in two
    merged, touching_a, touching_b = instances(merge_ratio=1.0)
    assert len(merged) == 1 and len(touching_a) == 1 and len(touching_b) == 1
    assert len({merged[0], touching_a[0], touching_b[0]}) == 3


def test_a_seed_without_pixels_does_not_chain_instances_near_the_origin():
    """Seed 2 lost its pixels (its basin went to a stronger seed). Instances 0 and 1 point at
    (1, 0) and (0, 1), too far apart to merge (1.41 > radius 1.13); an empty seed's centre
    would be the origin, within a radius of both, and chain them into one."""
    from maskattn_d2.modeling.postprocessing.instances import merge_split_instances

    spatial = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    seed_of_point = torch.tensor([0] * 4 + [1] * 4)
    merged = merge_split_instances(
        spatial, seed_of_point, torch.zeros(3, dtype=torch.long), num_seeds=3, merge_ratio=1.0
    )
    assert merged.tolist() == seed_of_point.tolist()
    # With the second instance's pixels closer (within its radius) the two do merge.
    spatial[4:] = torch.tensor([0.5, 0.5])
    merged = merge_split_instances(
        spatial, seed_of_point, torch.zeros(3, dtype=torch.long), num_seeds=3, merge_ratio=1.0
    )
    assert len(set(merged.tolist())) == 1


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_window_max_equals_max_pool(kernel_size):
    from maskattn_d2.modeling.postprocessing.clustering import _window_max

    g = torch.Generator().manual_seed(kernel_size)
    values = torch.randn(9, 13, generator=g)
    expected = F.max_pool2d(values[None, None], kernel_size, stride=1, padding=kernel_size // 2)
    assert torch.equal(_window_max(values, kernel_size), expected[0, 0])
