"""Seed ascent: climbing the seed map, against a looping reference, ridge joining, and
the "seed_ascent" assignment of spatial_instance_map where offsets put a boundary wrongly."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.modeling.postprocessing import (
    MaskAttnPostProcessor,
    find_seeds,
    spatial_instance_map,
)
from maskattn_d2.modeling.postprocessing.ascent import ascent_roots, ridge_joined_pairs
from maskattn_d2.modeling.postprocessing.components import label_map_components
from maskattn_d2.modeling.postprocessing.instances import _climb_to_seeds


def _reference_roots(seed_map, regions):
    """Follow, pixel by pixel, the neighbour of largest (value, raster index) in the region."""
    h, w = seed_map.shape
    values = seed_map.flatten().tolist()
    region = regions.flatten().tolist()

    def step(p):
        y, x = divmod(p, w)
        best = p
        if region[p] < 0:
            return p
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                q = (y + dy) * w + (x + dx)
                if 0 <= y + dy < h and 0 <= x + dx < w and region[q] == region[p]:
                    if (values[q], q) > (values[best], best):
                        best = q
        return best

    def neighbours(p):
        y, x = divmod(p, w)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                q = (y + dy) * w + (x + dx)
                if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w and region[q] == region[p]:
                    yield q

    def flat_top(p):  # no neighbour of the region is higher
        return region[p] >= 0 and all(values[q] <= values[p] for q in neighbours(p))

    def plateau_root(p):  # the largest index of the flat top holding p (a flood fill)
        if not flat_top(p):
            return p
        seen, stack = {p}, [p]
        while stack:
            for q in neighbours(stack.pop()):
                if q not in seen and values[q] == values[p] and flat_top(q):
                    seen.add(q)
                    stack.append(q)
        return max(seen)

    roots = []
    for p in range(h * w):
        while step(p) != p:
            p = step(p)
        roots.append(plateau_root(p))
    return torch.tensor(roots)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascent_roots_match_a_loop_with_plateaus_and_regions(seed):
    g = torch.Generator().manual_seed(seed)
    # Quantised values make plateaus (ties); three regions and some outside pixels.
    seed_map = torch.randint(0, 4, (11, 13), generator=g).float() / 4
    regions = torch.randint(-1, 3, (11, 13), generator=g)
    regions[:, 6] = 0  # a long band, so some paths are long
    roots = ascent_roots(seed_map, regions)
    assert torch.equal(roots, _reference_roots(seed_map, regions))
    # Every root is its own root, and a pixel outside every region stays where it is.
    assert torch.equal(roots.index_select(0, roots), roots)
    outside = torch.nonzero(regions.flatten() < 0).squeeze(1)
    assert torch.equal(roots[outside], outside)


def test_a_bent_plateau_is_one_root():
    """A flat top shaped like a V: climbing alone ends at two of its pixels (each has only
    lower-index equal neighbours); the whole plateau must be one root."""
    seed_map = torch.full((5, 7), 0.5)
    for y, x in ((1, 3), (2, 2), (2, 4), (3, 1), (3, 5)):
        seed_map[y, x] = 0.9
    regions = torch.zeros(5, 7, dtype=torch.long)
    roots = ascent_roots(seed_map, regions)
    assert roots.unique().tolist() == [3 * 7 + 5]
    assert torch.equal(roots, _reference_roots(seed_map, regions))


def test_nan_pixels_are_their_own_roots():
    seed_map = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    seed_map[2, 3] = float("nan")
    roots = ascent_roots(seed_map, torch.zeros(6, 6, dtype=torch.long))
    assert roots[2 * 6 + 3] == 2 * 6 + 3
    assert torch.all((roots >= 0) & (roots < 36))


def test_ascent_on_a_long_ramp_reaches_its_top():
    """A 1 x 300 ramp: the path is 299 steps, so the pointer jumping must cover it."""
    seed_map = torch.linspace(0, 1, 300)[None]
    roots = ascent_roots(seed_map, torch.zeros(1, 300, dtype=torch.long))
    assert torch.all(roots == 299)


def _two_bumps(dip):
    """Two peaks (0.9 and 0.8) at columns 3 and 11 of one 7 x 15 region, the seed map falling
    linearly to ``dip`` at column 7 between them."""
    xs = torch.arange(15.0)
    row = torch.where(
        xs <= 7, 0.9 - (0.9 - dip) * (xs - 3).abs() / 4, 0.8 - (0.8 - dip) * (xs - 11).abs() / 4
    )
    row[:3], row[12:] = row[3] - 0.05 * (3 - xs[:3]), row[11] - 0.05 * (xs[12:] - 11)
    seed_map = row.expand(7, 15).clone()
    seed_map[:, 3] += 0.01 * (3 - (torch.arange(7.0) - 3).abs())  # one maximum per peak
    seed_map[:, 11] += 0.01 * (3 - (torch.arange(7.0) - 3).abs())
    return seed_map


@pytest.mark.parametrize("dip, joined", [(0.79, True), (0.3, False)])
def test_ridge_joins_only_seeds_without_a_valley_between(dip, joined):
    seed_map = _two_bumps(dip)
    regions = torch.zeros(7, 15, dtype=torch.long)
    roots = ascent_roots(seed_map, regions)
    peaks = sorted(set(roots.tolist()))
    assert peaks == [3 * 15 + 3, 3 * 15 + 11]
    root_seed = torch.full((7 * 15,), -1)
    root_seed[torch.tensor(peaks)] = torch.tensor([0, 1])
    a, b = ridge_joined_pairs(seed_map, regions, roots, root_seed, saddle_depth=0.05)
    assert (a.numel() > 0) == joined
    if joined:
        assert set(a.tolist()) | set(b.tolist()) == {0, 1}


def _touching_pair():
    """Two touching 8 x 8 objects of one class (one component), columns 2-9 and 10-17, with
    seed peaks at their centres and a seed-map valley at their contact. The offsets are
    imprecise, as a trained model's: smooth, so both objects' pixels near the contact point
    at the middle, 1 px right of it (past the boundary) for the left object's."""
    h, w = 12, 20
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[2:10, 2:18] = 1
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    centre_x = torch.where(xs < 10, 5.5, 13.5)
    distance = (xs - centre_x).abs() + (ys - 5.5).abs()
    seed_map = (0.95 - 0.1 * distance).clamp(min=0.05) * (sem == 1)
    seed_map[5, 5], seed_map[5, 13] = 0.99, 0.99
    # Smooth offsets: a quarter of the way to the centre; the left object's contact columns
    # 8-9 point 2.5 px right, into the right object's half.
    offsets = torch.zeros(2, h, w)
    offsets[0] = 0.25 * (5.5 - ys)
    offsets[1] = 0.25 * (centre_x - xs)
    offsets[1, :, 8:10] = 2.5
    offsets *= sem == 1
    logits = F.one_hot(sem, 2).permute(2, 0, 1).float() * 30
    seed_logits = torch.logit(seed_map.clamp(1e-4, 1 - 1e-4))[None]
    head_outputs = {"offsets": offsets, "seed_logits": seed_logits}
    return sem, logits, head_outputs


def _pair_instances(sem, logits, head_outputs, assignment, seed_threshold=0.5):
    """spatial_instance_map of a (sem, logits, head_outputs) scene with one thing class, with
    the settings every test here shares."""
    instance_map, _, _ = spatial_instance_map(
        sem, logits, head_outputs, torch.tensor([False, True], device=sem.device),
        seed_threshold=seed_threshold, seed_min_distance=3.0, embedding_weight=0.0,
        min_instance_area=4, max_instances=10, merge_ratio=1.0, assignment=assignment,
    )
    return instance_map


@pytest.mark.parametrize(
    "assignment, twin_peak",
    [("offsets", False), ("seed_ascent", False), ("seed_ascent", True)],
)
def test_seed_ascent_puts_the_boundary_in_the_valley(assignment, twin_peak):
    """With ``twin_peak`` the left peak is two equal pixels: find_seeds keeps the first, the
    climb ends at the second (ties go to the larger raster index), and the basin must still
    join the kept seed."""
    sem, logits, head_outputs = _touching_pair()
    if twin_peak:
        head_outputs["seed_logits"][0, 5, 6] = head_outputs["seed_logits"][0, 5, 5]
    instance_map = _pair_instances(sem, logits, head_outputs, assignment).view(sem.shape)
    left, right = instance_map[2:10, 2:10], instance_map[2:10, 10:18]
    assert right.unique().numel() == 1
    if assignment == "seed_ascent":
        # Every pixel climbs to its own object's peak: two exact objects.
        assert left.unique().numel() == 1 and int(left[0, 0]) != int(right[0, 0])
    else:
        # The offsets hand the left object's contact columns to the right object.
        assert torch.all(instance_map[2:10, 8:10] == right[0, 0])


def test_seed_ascent_needs_a_seed_and_falls_back_to_offsets():
    """Pixels whose climb ends at a maximum below the seed threshold keep their offsets'
    seed; with no seed at all the component is one instance."""
    sem, logits, head_outputs = _touching_pair()
    seed_map = torch.sigmoid(head_outputs["seed_logits"][0])
    seed_map[:, 10:] *= 0.4  # the right peak falls below the threshold
    head_outputs = dict(head_outputs, seed_logits=torch.logit(seed_map.clamp(1e-4, 1 - 1e-4))[None])
    ascent = _pair_instances(sem, logits, head_outputs, "seed_ascent")
    offsets = _pair_instances(sem, logits, head_outputs, "offsets")
    # One seed: both assignments give the whole component to it.
    assert torch.equal(ascent, offsets) and ascent[sem.flatten() == 1].unique().numel() == 1
    # No seed (threshold above every value): the component is one instance either way.
    none_ascent = _pair_instances(sem, logits, head_outputs, "seed_ascent", seed_threshold=0.999)
    none_offsets = _pair_instances(sem, logits, head_outputs, "offsets", seed_threshold=0.999)
    assert torch.equal(none_ascent, none_offsets)
    assert none_ascent[sem.flatten() == 1].unique().tolist() == [0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_kept_seed_keeps_its_own_basin(seed):
    """On quantised random maps (many plateaus, several classes), each seed of find_seeds
    either labels its own pixel or shares its basin with a stronger seed, and every pixel
    whose climb ends on a seed's root joins a seed."""
    g = torch.Generator().manual_seed(seed)
    h, w = 14, 16
    sem = torch.randint(0, 3, (h, w), generator=g)
    seed_map = torch.randint(0, 5, (h, w), generator=g).float() / 4
    thing = sem > 0
    components = label_map_components(sem, thing, connectivity=8)
    seeds = find_seeds(seed_map, thing, threshold=0.4, max_seeds=50)
    thing_pixels = torch.nonzero(thing.flatten()).squeeze(1)
    labels, _, _ = _climb_to_seeds(
        seed_map, components, thing, seeds, thing_pixels, saddle_depth=0.0
    )
    row = {int(p): i for i, p in enumerate(thing_pixels)}
    roots = ascent_roots(seed_map, torch.where(thing, components, -1))
    for k, pixel in enumerate(seeds.tolist()):
        own = int(labels[row[pixel]])
        assert own == k or (own < k and roots[seeds[own]] == roots[pixel])
    seed_roots = set(roots[seeds].tolist())
    climbed = torch.tensor([int(roots[p]) in seed_roots for p in thing_pixels.tolist()])
    assert torch.all(labels[climbed] >= 0) and torch.all(labels[~climbed] == -1)


def test_spatial_instance_map_rejects_an_unknown_assignment():
    sem, logits, head_outputs = _touching_pair()
    with pytest.raises(ValueError, match="assignment must be one of"):
        _pair_instances(sem, logits, head_outputs, "watershed")


def test_postprocessor_rejects_bad_seed_assignment_settings():
    with pytest.raises(ValueError, match="seed_assignment must be one of"):
        MaskAttnPostProcessor(num_classes=2, thing_ids=[1], seed_assignment="watershed")
    with pytest.raises(ValueError, match="saddle_depth must be >= 0"):
        MaskAttnPostProcessor(num_classes=2, thing_ids=[1], saddle_depth=-0.1)


def test_config_keys_reach_the_postprocessor():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SEED_ASSIGNMENT = "seed_ascent"
    cfg.MODEL.MASK_ATTN_POSTPROCESS.SADDLE_DEPTH = 0.1
    post = MaskAttnPostProcessor(cfg, thing_ids=[1])
    assert post.seed_assignment == "seed_ascent" and post.saddle_depth == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seed_ascent_is_the_same_on_cuda():
    sem, logits, head_outputs = _touching_pair()
    cpu = _pair_instances(sem, logits, head_outputs, "seed_ascent")
    cuda = _pair_instances(
        sem.cuda(), logits.cuda(), {k: v.cuda() for k, v in head_outputs.items()}, "seed_ascent"
    )
    assert torch.equal(cpu, cuda.cpu())
