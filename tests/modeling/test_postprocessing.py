import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances
from scipy import ndimage

from maskattn_d2.modeling.postprocessing import (
    MaskAttnPostProcessor,
    cluster_embeddings,
    connected_component_instance_map,
    embedding_instance_map,
    label_map_components,
    merge_instance_map,
    resize_label_map,
    segment_id_map,
)
from maskattn_d2.modeling.postprocessing.clustering import _greedy_suppression
from maskattn_d2.modeling.postprocessing.components import _torch_components
from maskattn_d2.layers import argmax_channels
from maskattn_d2.structures import pixel_boxes, selected_label_pixels

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]

# Classes of the synthetic scene: 0 sky, 3 road, 4 grass are stuff; 1 car, 2 person are things.
SKY, CAR, PERSON, ROAD, GRASS = range(5)
THING_IDS = [CAR, PERSON]
NET, OUT = (64, 64), (100, 150)
# (class, rows, cols) at network resolution; the two cars touch along column 20.
OBJECTS = [
    (CAR, (20, 40), (5, 20)),
    (CAR, (20, 40), (20, 35)),
    (PERSON, (10, 45), (45, 55)),
]
ROAD_ROWS = (50, 64)
GRASS_BOX = ((5, 8), (30, 33))  # 9 pixels: below stuff_area=16


def _scene(device, with_things=True, seed=0):
    """Semantic logits (5, 64, 64) and embedding head outputs of the synthetic scene:
    "embeddings" (8, 64, 64), "offsets" (2, 64, 64) to each object's centre and
    "seed_logits" (1, 64, 64) peaking at the centres, all with noise."""
    g = torch.Generator().manual_seed(seed)
    sem = torch.full(NET, SKY, dtype=torch.long)
    sem[ROAD_ROWS[0] : ROAD_ROWS[1]] = ROAD
    (r0, r1), (c0, c1) = GRASS_BOX
    sem[r0:r1, c0:c1] = GRASS
    basis = torch.eye(8)
    embeddings = basis[0][:, None, None].repeat(1, *NET)
    ys, xs = torch.meshgrid(torch.arange(NET[0]).float(), torch.arange(NET[1]).float(),
                            indexing="ij")
    offsets = torch.zeros(2, *NET)
    seeds = torch.zeros(1, *NET)
    if with_things:
        for k, (category, (r0, r1), (c0, c1)) in enumerate(OBJECTS):
            sem[r0:r1, c0:c1] = category
            embeddings[:, r0:r1, c0:c1] = basis[k + 1][:, None, None]
            cy, cx = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
            offsets[0, r0:r1, c0:c1] = cy - ys[r0:r1, c0:c1]
            offsets[1, r0:r1, c0:c1] = cx - xs[r0:r1, c0:c1]
            bump = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 4.0**2))
            seeds[0, r0:r1, c0:c1] = bump[r0:r1, c0:c1]
    embeddings = F.normalize(embeddings + 0.1 * torch.randn(8, *NET, generator=g), dim=0)
    offsets = offsets + 0.5 * torch.randn(2, *NET, generator=g)
    seeds = (seeds + 0.02 * torch.rand(1, *NET, generator=g)).clamp(0, 1)
    logits = F.one_hot(sem, 5).permute(2, 0, 1).float() * 6 + 0.5 * torch.randn(
        5, *NET, generator=g
    )
    seed_logits = torch.logit(seeds, 1e-4)
    outputs = {"embeddings": embeddings, "offsets": offsets, "seed_logits": seed_logits}
    return logits.to(device), {k: v.to(device) for k, v in outputs.items()}


def _box_mask(rows, cols, size=OUT, net=NET):
    """Ground-truth mask of a network-resolution box, scaled to the output size."""
    mask = torch.zeros(size, dtype=torch.bool)
    sy, sx = size[0] / net[0], size[1] / net[1]
    mask[round(rows[0] * sy) : round(rows[1] * sy), round(cols[0] * sx) : round(cols[1] * sx)] = 1
    return mask


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def _best_ious(pred_masks, gt_masks):
    return [max(_iou(p.cpu(), gt) for p in pred_masks) for gt in gt_masks]


def _postprocessor(**kwargs):
    return MaskAttnPostProcessor(num_classes=5, thing_ids=THING_IDS, stuff_area=16, **kwargs)


def _check_panoptic_consistency(panoptic, segments_info, size):
    assert panoptic.shape == size and panoptic.dtype == torch.int32
    ids = [s["id"] for s in segments_info]
    assert len(set(ids)) == len(ids) and all(i >= 1 for i in ids)
    present, counts = torch.unique(panoptic.cpu(), return_counts=True)
    area_of = dict(zip(present.tolist(), counts.tolist()))
    assert set(area_of) - {0} == set(ids)
    for s in segments_info:
        assert s["area"] == area_of[s["id"]]
        assert s["isthing"] == (s["category_id"] in THING_IDS)


# ------------------------------------------------------------------ full postprocessor
@pytest.mark.parametrize("num_classes", [5, 40])
def test_postprocessor_gives_the_same_outputs_for_channels_last_logits(num_classes):
    # The network's logits come channels last on CPU (eager and onnxruntime); with many
    # classes the postprocessor reduces them as per-pixel rows, with few as channel planes.
    logits, outputs = _scene("cpu")
    extra = torch.full((num_classes - 5, *NET), -20.0)  # classes no pixel takes
    planes = torch.cat([logits, extra]).contiguous()
    channels_last = planes.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert channels_last.stride(0) == 1
    post = MaskAttnPostProcessor(num_classes=num_classes, thing_ids=THING_IDS, stuff_area=16)
    want, got = post(planes, outputs, OUT), post(channels_last, outputs, OUT)
    assert torch.equal(got["panoptic_seg"][0], want["panoptic_seg"][0])
    assert [{k: v for k, v in s.items() if k != "score"} for s in got["panoptic_seg"][1]] == [
        {k: v for k, v in s.items() if k != "score"} for s in want["panoptic_seg"][1]
    ]
    torch.testing.assert_close(got["instances"].scores, want["instances"].scores)
    assert torch.equal(got["instances"].pred_masks, want["instances"].pred_masks)
    torch.testing.assert_close(got["sem_seg"], want["sem_seg"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["spatial_embedding", "embedding"])
def test_embedding_postprocessor_separates_touching_instances(device, method):
    logits, embeddings = _scene(device)
    out = _postprocessor(instance_method=method)(logits, embeddings, OUT)
    instances = out["instances"]
    assert isinstance(instances, Instances) and instances.image_size == OUT
    assert len(instances) == len(OBJECTS)
    assert sorted(instances.pred_classes.tolist()) == sorted(c for c, _, _ in OBJECTS)
    assert instances.pred_masks.shape == (len(OBJECTS), *OUT)
    assert instances.pred_masks.dtype == torch.bool
    gts = [_box_mask(rows, cols) for _, rows, cols in OBJECTS]
    assert min(_best_ious(instances.pred_masks, gts)) > 0.95
    for mask, category in zip(instances.pred_masks.cpu(), instances.pred_classes.tolist()):
        matched = max(range(len(gts)), key=lambda i: _iou(mask, gts[i]))
        assert category == OBJECTS[matched][0]
    # Boxes are the masks' tight boxes (on the masks' device; detectron2's reference returns
    # CPU boxes); scores are sorted and in (0, 1].
    boxes = instances.pred_boxes.tensor
    assert boxes.device == instances.pred_masks.device
    assert torch.equal(boxes.cpu(), BitMasks(instances.pred_masks).get_bounding_boxes().tensor)
    scores = instances.scores
    assert torch.all(scores[:-1] >= scores[1:]) and torch.all((scores > 0.5) & (scores <= 1))
    assert out["sem_seg"].shape == (5, *OUT)
    # detectron2's convention: the logits, resized bilinearly to the output size.
    # (Equal up to float rounding: the resize may run in another memory layout.)
    resized = F.interpolate(logits[None], size=OUT, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out["sem_seg"], resized)


@pytest.mark.parametrize("device", DEVICES)
def test_connected_components_merges_touching_same_class_instances(device):
    logits, embeddings = _scene(device)
    instances = _postprocessor(instance_method="connected_components")(
        logits, embeddings, OUT
    )["instances"]
    assert len(instances) == len(OBJECTS) - 1
    assert sorted(instances.pred_classes.tolist()) == [CAR, PERSON]
    cars = _box_mask(*OBJECTS[0][1:]) | _box_mask(*OBJECTS[1][1:])
    person = _box_mask(*OBJECTS[2][1:])
    assert min(_best_ious(instances.pred_masks, [cars, person])) > 0.95
    # Without embeddings too.
    again = _postprocessor(instance_method="connected_components")(logits, None, OUT)
    assert torch.equal(again["instances"].pred_masks, instances.pred_masks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["connected_components", "spatial_embedding"])
def test_connectivity_decides_whether_corner_touching_cars_are_one_region(device, method):
    # Two 10x10 cars that meet only at a corner; one seed, in the first. 8-connected they are
    # one region: connected components merge them and the spatial grouping gives the second
    # the first's seed. 4-connected they are two: the seedless one becomes its own instance.
    sem = torch.full(NET, SKY, dtype=torch.long)
    sem[10:20, 10:20] = CAR
    sem[20:30, 20:30] = CAR
    logits = F.one_hot(sem, 5).permute(2, 0, 1).float() * 6
    ys, xs = torch.meshgrid(torch.arange(NET[0]).float(), torch.arange(NET[1]).float(),
                            indexing="ij")
    seeds = torch.exp(-((ys - 14.5) ** 2 + (xs - 14.5) ** 2) / 8.0) * (sem == CAR)
    head = {
        "embeddings": F.normalize(torch.ones(8, *NET), dim=0),
        "offsets": torch.zeros(2, *NET),
        "seed_logits": torch.logit(seeds.clamp(1e-3, 1 - 1e-3))[None],
    }
    head = {k: v.to(device) for k, v in head.items()}
    counts = {}
    for connectivity in (8, 4):
        post = _postprocessor(
            instance_method=method, seed_assignment="seed_ascent", connectivity=connectivity
        )
        counts[connectivity] = len(post(logits.to(device), head, NET)["instances"])
    assert counts == {8: 1, 4: 2}
    with pytest.raises(ValueError, match="connectivity must be 4 or 8, got 6"):
        _postprocessor(connectivity=6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["spatial_embedding", "embedding", "connected_components"])
def test_panoptic_output_stuff_area_and_consistency(device, method):
    logits, embeddings = _scene(device)
    out = _postprocessor(instance_method=method)(logits, embeddings, OUT)
    panoptic, segments_info = out["panoptic_seg"]
    _check_panoptic_consistency(panoptic, segments_info, OUT)
    stuff = {s["category_id"] for s in segments_info if not s["isthing"]}
    assert stuff == {SKY, ROAD}  # grass (9 px < 16) became void
    grass = _box_mask(*GRASS_BOX)
    assert grass.sum() > 0 and torch.all(panoptic.cpu()[grass] == 0)
    road = _box_mask(ROAD_ROWS, (0, 64))
    road_id = next(s["id"] for s in segments_info if s["category_id"] == ROAD)
    assert _iou(panoptic.cpu() == road_id, road) > 0.95
    # Instances and the panoptic thing segments are the same masks.
    instances = out["instances"]
    things = [s for s in segments_info if s["isthing"]]
    assert len(things) == len(instances)
    for s, mask, score in zip(things, instances.pred_masks, instances.scores.tolist()):
        assert torch.equal(mask, panoptic == s["id"]) and s["score"] == pytest.approx(score)


@pytest.mark.parametrize("device", DEVICES)
def test_image_without_things_gives_empty_instances(device):
    logits, embeddings = _scene(device, with_things=False)
    out = _postprocessor()(logits, embeddings, OUT)
    instances = out["instances"]
    assert len(instances) == 0 and instances.image_size == OUT
    assert instances.pred_masks.shape == (0, *OUT) and instances.pred_masks.dtype == torch.bool
    assert isinstance(instances.pred_boxes, Boxes) and instances.pred_boxes.tensor.shape == (0, 4)
    assert instances.pred_classes.shape == (0,) and instances.pred_classes.dtype == torch.long
    assert instances.scores.shape == (0,) and instances.scores.dtype == torch.float32
    panoptic, segments_info = out["panoptic_seg"]
    _check_panoptic_consistency(panoptic, segments_info, OUT)
    assert not any(s["isthing"] for s in segments_info)


def test_output_flags_select_outputs():
    logits, embeddings = _scene("cpu")
    post = _postprocessor()
    assert set(post(logits, embeddings, OUT, instance_on=False, panoptic_on=False)) == {
        "sem_seg"
    }
    # Embeddings are not needed when no instance output is asked for.
    assert set(post(logits, None, OUT, instance_on=False, panoptic_on=False)) == {"sem_seg"}
    assert set(post(logits, embeddings, OUT, semantic_on=False, panoptic_on=False)) == {
        "instances"
    }
    assert set(post(logits, embeddings, OUT, semantic_on=False, instance_on=False)) == {
        "panoptic_seg"
    }


@pytest.mark.parametrize("method", ["spatial_embedding", "embedding", "connected_components"])
def test_score_threshold_and_max_instances(method):
    logits, embeddings = _scene("cpu")
    full = _postprocessor(instance_method=method)(logits, embeddings, OUT)["instances"]
    top = _postprocessor(instance_method=method, max_instances=1)(logits, embeddings, OUT)
    assert len(top["instances"]) == 1
    if method == "connected_components":
        # All components are formed, then ranked: the best one is kept.
        assert torch.allclose(top["instances"].scores, full.scores[:1])
    threshold = float(full.scores[1])
    above = _postprocessor(instance_method=method, score_threshold=threshold)(
        logits, embeddings, OUT
    )["instances"]
    assert torch.allclose(above.scores, full.scores[:2])
    none = _postprocessor(instance_method=method, score_threshold=1.01)(logits, embeddings, OUT)
    assert len(none["instances"]) == 0
    # The things became void: only stuff segments remain.
    assert all(not s["isthing"] for s in none["panoptic_seg"][1])


def test_same_output_size_keeps_network_maps():
    logits, embeddings = _scene("cpu")
    out = _postprocessor()(logits, embeddings, NET)
    assert out["sem_seg"].shape == (5, *NET)
    assert torch.equal(out["sem_seg"], logits)
    _check_panoptic_consistency(*out["panoptic_seg"], NET)
    areas = sorted(int(m.sum()) for m in out["instances"].pred_masks)
    assert areas == sorted((r1 - r0) * (c1 - c0) for _, (r0, r1), (c0, c1) in OBJECTS)


def test_postprocessor_validates_arguments():
    with pytest.raises(ValueError, match="thing_ids"):
        MaskAttnPostProcessor(num_classes=5, thing_ids=[1, 5])
    with pytest.raises(ValueError, match="instance_method"):
        MaskAttnPostProcessor(num_classes=5, thing_ids=[1], instance_method="meanshift")
    with pytest.raises(ValueError, match="label_divisor"):
        MaskAttnPostProcessor(num_classes=5, thing_ids=[1], max_instances=100, label_divisor=50)
    with pytest.raises(ValueError, match="similarity_threshold"):
        MaskAttnPostProcessor(num_classes=5, thing_ids=[1], similarity_threshold=1.0)
    post = _postprocessor()
    logits, embeddings = _scene("cpu")
    with pytest.raises(ValueError, match="sem_logits"):
        post(logits[:4], embeddings, OUT)
    with pytest.raises(ValueError, match="offsets"):
        post(logits, dict(embeddings, offsets=embeddings["offsets"][:, :32]), OUT)
    with pytest.raises(ValueError, match='"offsets".*SPATIAL_ON'):
        post(logits, {"embeddings": embeddings["embeddings"]}, OUT)
    with pytest.raises(ValueError, match="offsets"):
        post(logits, None, OUT)
    cluster = _postprocessor(instance_method="embedding")
    with pytest.raises(ValueError, match="embeddings"):
        cluster(logits, {"embeddings": embeddings["embeddings"][:, :32]}, OUT)
    with pytest.raises(ValueError, match="seed_threshold"):
        MaskAttnPostProcessor(num_classes=5, thing_ids=[1], seed_threshold=1.0)
    with pytest.raises(ValueError, match="output_size"):
        post(logits, embeddings, (0, 10))


# --------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("device", DEVICES)
def test_cluster_embeddings_recovers_clusters_and_drops_small_ones(device):
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)
    sizes = [300, 120, 40, 5]  # the last one is below min_cluster_size
    truth = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    perm = torch.randperm(truth.numel(), generator=g)
    truth = truth[perm]
    points = F.normalize(centres[truth] + 0.15 * torch.randn(truth.numel(), 6, generator=g), dim=1)
    labels, confidence = cluster_embeddings(
        points.to(device), similarity_threshold=0.7, min_cluster_size=8, max_clusters=10,
        num_seed_candidates=64,
    )
    labels, confidence = labels.cpu(), confidence.cpu()
    assert confidence.numel() == 3 and torch.all(confidence > 0.8)
    # Largest clusters come first; each cluster is exactly one true group.
    for k in range(3):
        assert torch.equal(labels == k, truth == k)
    assert torch.all(labels[truth == 3] == -1)
    capped, _ = cluster_embeddings(points, similarity_threshold=0.7, max_clusters=2)
    assert set(capped.unique().tolist()) == {-1, 0, 1}


def test_cluster_embeddings_empty_input():
    labels, confidence = cluster_embeddings(torch.zeros(0, 4), similarity_threshold=0.9)
    assert labels.shape == (0,) and confidence.shape == (0,)


def _components(mask, connectivity):
    """Connected components of a binary mask, as the label-map components of its pixels."""
    return label_map_components(torch.zeros_like(mask, dtype=torch.long), mask, connectivity)


def _same_partition(labels, reference):
    """True if two label maps (0 = background) define the same components."""
    labels, reference = np.asarray(labels), np.asarray(reference)
    if not np.array_equal(labels == 0, reference == 0):
        return False
    pairs = set(zip(labels[labels > 0].tolist(), reference[reference > 0].tolist()))
    num_labels = len(np.unique(labels[labels > 0]))
    return len(pairs) == num_labels == len(np.unique(reference[reference > 0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_scipy(device, connectivity):
    """Components of one binary mask (a label map of one value) against scipy's."""
    rng = np.random.RandomState(0)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for mask in rng.rand(3, 40, 50) < 0.45:
        labels = _components(torch.from_numpy(mask).to(device), connectivity).cpu().numpy()
        reference, n = ndimage.label(mask, structure=structure)
        assert _same_partition(labels, reference)
        assert sorted(np.unique(labels[labels > 0])) == list(range(1, n + 1))  # consecutive


def test_connected_components_diagonal_and_long_spiral():
    diagonal = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)[None]
    assert _components(diagonal[0], 8).unique().tolist() == [0, 1]
    assert _components(diagonal[0], 4).unique().tolist() == [0, 1, 2]
    # A 128 x 128 square spiral: one component with a path of thousands of pixels.
    spiral = np.zeros((128, 128), dtype=bool)
    top, left, bottom, right = 0, 0, 127, 127
    while top <= bottom and left <= right:
        spiral[top, left : right + 1] = True
        spiral[top : bottom + 1, right] = True
        spiral[bottom, left : right + 1] = True
        spiral[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            spiral[top - 1, left] = True  # connect to the next ring
    reference, n = ndimage.label(spiral, structure=np.ones((3, 3)))
    labels = _components(torch.from_numpy(spiral), 8)
    assert _same_partition(labels.numpy(), reference)
    full = _components(torch.ones(5, 5, dtype=torch.bool), 8)
    assert torch.all(full == 1)


def _merge(sem, instance_map, classes, scores, is_thing, **kwargs):
    """The production merge, as panoptic ids and segments_info."""
    segment_map, segments_info, segment_ids = merge_instance_map(
        sem, instance_map, classes, scores, is_thing, **kwargs
    )
    return segment_id_map(segment_map, segment_ids), segments_info


def test_merge_paints_in_order_and_applies_area_rules():
    sem = torch.zeros(10, 10, dtype=torch.long)  # stuff class 0 everywhere ...
    sem[:, 6:] = 2  # ... stuff class 2 on the right (40 px) ...
    sem[:5, :6] = 1  # ... thing class 1 top-left (30 px)
    sem[9, 0] = 3  # ... one pixel of stuff class 3
    is_thing = torch.tensor([False, True, False, False])
    instance_map = torch.full((10, 10), -1)
    instance_map[:5, :3] = 0  # 15 px
    instance_map[:5, 3:5] = 1  # 10 px
    instance_map[:2, 5] = 2  # 2 px: dropped
    classes = torch.tensor([1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.7])
    panoptic, segments_info = _merge(
        sem, instance_map, classes, scores, is_thing, min_instance_area=3, stuff_area=5,
        label_divisor=1000,
    )
    by_id = {s["id"]: s for s in segments_info}
    assert [s["id"] for s in segments_info if s["isthing"]] == [1001, 1002]
    assert by_id[1001]["area"] == 15 and by_id[1002]["area"] == 10
    assert by_id[1001]["score"] == pytest.approx(0.9)
    # Stuff class 0 gets id 1 (never 0, which is void); stuff 3 is too small.
    assert by_id[1]["category_id"] == 0 and not by_id[1]["isthing"]
    assert by_id[2001]["area"] == 40 and 3001 not in by_id
    assert panoptic[9, 0] == 0
    # Thing pixels nobody claimed are void, not stuff.
    assert torch.all(panoptic[:5, 5] == 0) and torch.all(panoptic[2:5, 3:5] == 1002)
    for s in segments_info:
        assert int((panoptic == s["id"]).sum()) == s["area"]


def test_instance_helpers_classes_and_scores():
    logits, embeddings = _scene("cpu")
    probs = logits.softmax(0)
    sem = probs.argmax(0)
    is_thing = torch.tensor([False, True, True, False, False])
    instance_map, classes, scores = embedding_instance_map(
        sem, logits, embeddings["embeddings"], is_thing,
        similarity_threshold=0.9, min_instance_area=8, max_instances=100,
    )
    masks = [instance_map.view(NET) == k for k in range(classes.numel())]
    assert len(masks) == 3 and sorted(classes.tolist()) == [CAR, CAR, PERSON]
    for mask, category, score in zip(masks, classes, scores):
        mean_prob = probs[category][mask].mean()
        assert score <= mean_prob + 1e-6 and score > 0.9 * mean_prob
    instance_map, classes, scores = connected_component_instance_map(
        sem, logits, is_thing, min_instance_area=8, connectivity=8
    )
    masks = [instance_map.view(NET) == k for k in range(classes.numel())]
    # The two touching cars are one component.
    assert len(masks) == 2 and int((instance_map == -1).sum()) == int((~is_thing[sem]).sum())
    for mask, category, score in zip(masks, classes, scores):
        assert torch.allclose(score, probs[category][mask].mean())
        assert bool((sem[mask] == category).all())


def test_resize_label_map_and_boxes():
    labels = torch.arange(12, dtype=torch.int32).view(3, 4)
    up = resize_label_map(labels, (6, 8))
    assert torch.equal(up, labels.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert resize_label_map(up, (3, 4)).tolist() == labels.tolist()
    assert resize_label_map(labels, (3, 4)) is labels


# --------------------------------------------------------------------------- vectorised pieces
def _sequential_merge(sem, masks, classes, scores, is_thing, min_instance_area, stuff_area,
                      label_divisor):
    """Reference: the merge painting one instance at a time (the original implementation)."""
    num_classes = is_thing.shape[0]
    panoptic = torch.zeros(sem.shape, dtype=torch.int32)
    taken = torch.zeros(sem.shape, dtype=torch.bool)
    segments_info, instances_per_class = [], {}
    for mask, category, score in zip(masks, classes.tolist(), scores.tolist()):
        visible = mask & ~taken
        area = int(visible.sum())
        if area < max(min_instance_area, 1):
            continue
        index = instances_per_class.get(category, 0) + 1
        instances_per_class[category] = index
        panoptic[visible] = category * label_divisor + index
        taken |= visible
        segments_info.append({"id": category * label_divisor + index, "isthing": True,
                              "category_id": category, "area": area, "score": float(score)})
    stuff_pixels = ~taken & ~is_thing[sem]
    stuff_areas = torch.bincount(sem[stuff_pixels], minlength=num_classes)
    kept_stuff = (stuff_areas >= max(stuff_area, 1)) & ~is_thing
    stuff_ids = (torch.arange(num_classes) * label_divisor + 1).int()
    panoptic = torch.where(stuff_pixels & kept_stuff[sem], stuff_ids[sem], panoptic)
    for category in torch.nonzero(kept_stuff).squeeze(1).tolist():
        segments_info.append({"id": category * label_divisor + 1, "isthing": False,
                              "category_id": category, "area": int(stuff_areas[category])})
    return panoptic, segments_info


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_merge_equals_sequential_painting(seed):
    # Random disjoint instances (rectangles, each on the pixels earlier ones left free, some
    # empty or tiny) in painting order, as the instance methods give them.
    g = torch.Generator().manual_seed(seed)
    h, w, num_classes = 24, 20, 6
    is_thing = torch.tensor([False, True, True, False, True, False])
    sem = torch.randint(0, num_classes, (h, w), generator=g)
    num_instances = int(torch.randint(0, 14, (1,), generator=g))
    instance_map = torch.full((h, w), -1)
    for k in range(num_instances):
        r0, c0 = (int(v) for v in torch.randint(0, 16, (2,), generator=g))
        r1, c1 = r0 + int(torch.randint(0, 9, (1,), generator=g)), c0 + int(
            torch.randint(0, 9, (1,), generator=g)
        )
        free = instance_map[r0:r1, c0:c1]
        free[free < 0] = k
    masks = torch.stack([instance_map == k for k in range(num_instances)]) if num_instances else (
        torch.zeros(0, h, w, dtype=torch.bool)
    )
    classes = torch.tensor([1, 2, 4])[torch.randint(0, 3, (num_instances,), generator=g)]
    scores = torch.rand(num_instances, generator=g)
    for min_area, stuff_area in [(1, 1), (6, 10), (20, 40), (0, 0)]:
        expected = _sequential_merge(sem, masks, classes, scores, is_thing, min_area, stuff_area,
                                     1000)
        panoptic, segments_info = _merge(
            sem, instance_map, classes, scores, is_thing, min_instance_area=min_area,
            stuff_area=stuff_area, label_divisor=1000,
        )
        assert panoptic.dtype == torch.int32
        assert torch.equal(panoptic, expected[0])
        assert segments_info == expected[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes", [1, 6, 133, 300])
def test_argmax_channels_equals_argmax_with_ties(device, num_classes):
    g = torch.Generator().manual_seed(num_classes)
    scores = torch.randint(0, 4, (num_classes, 17, 23), generator=g).float()  # many ties
    scores[:, 0, 0] = 1.0  # all channels tie: the first wins
    scores = scores.to(device)
    assert torch.equal(argmax_channels(scores), scores.argmax(dim=0))
    probs = torch.randn(num_classes, 9, 11, generator=g).softmax(0).to(device)
    assert torch.equal(argmax_channels(probs), probs.argmax(dim=0))
    batched = torch.randint(0, 3, (2, num_classes, 5, 7), generator=g).float().to(device)
    assert torch.equal(argmax_channels(batched, dim=1), batched.argmax(dim=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_map_components_match_scipy_per_value(device, connectivity):
    rng = np.random.RandomState(1)
    label_map = rng.randint(0, 4, (40, 50))
    foreground = rng.rand(40, 50) < 0.8
    labels = label_map_components(
        torch.from_numpy(label_map).to(device), torch.from_numpy(foreground).to(device),
        connectivity,
    ).cpu().numpy()
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    reference = np.zeros_like(labels)
    offset = 0
    for value in range(4):
        components, n = ndimage.label(foreground & (label_map == value), structure=structure)
        reference[components > 0] = components[components > 0] + offset
        offset += n
    assert _same_partition(labels, reference)
    # Numbered 1..n by each component's largest raster index.
    assert sorted(np.unique(labels[labels > 0])) == list(range(1, offset + 1))
    flat = labels.flatten()
    last = [np.flatnonzero(flat == k).max() for k in range(1, offset + 1)]
    assert last == sorted(last)


def _pixels_apart(label_map):
    """Pixels whose 8 neighbours all have their value (regions of different values apart)."""
    h, w = label_map.shape
    padded = np.pad(label_map, 1, mode="edge")
    apart = np.ones((h, w), dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            apart &= padded[dy : dy + h, dx : dx + w] == label_map
    return apart


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("num_values", [1, 3, 12])
def test_label_map_components_opencv_path_equals_torch_path(connectivity, num_values):
    """On CPU the components come from OpenCV (all values in one pass where no two foreground
    values touch, up to 8 values' masks stacked into one image; more, and on CUDA, the torch
    path); all must give the same labels, numbering included."""
    rng = np.random.RandomState(num_values)
    for trial in range(20):
        h, w = rng.randint(1, 48, size=2)
        # Blocky maps (upsampled noise) so that regions of one value are large.
        coarse = rng.randint(0, num_values, (h // 4 + 1, w // 4 + 1))
        label_map = np.kron(coarse, np.ones((4, 4), dtype=np.int64))[:h, :w]
        noise = rng.rand(h, w) < rng.uniform(0.3, 1.0)
        # Values touching (the torch path) and kept apart (OpenCV, several values at once).
        for foreground in (noise, noise & _pixels_apart(label_map)):
            label_map_t, foreground_t = torch.from_numpy(label_map), torch.from_numpy(foreground)
            expected = _torch_components(label_map_t, foreground_t, connectivity)
            labels = label_map_components(label_map_t, foreground_t, connectivity)
            assert torch.equal(labels, expected)
    empty = torch.zeros(0, 5, dtype=torch.long)  # cv2 takes no empty image
    assert label_map_components(empty, empty.bool(), connectivity).shape == (0, 5)


def label_map_boxes(label_map, labels, num_labels):
    rows, pixels = selected_label_pixels(label_map, labels, num_labels)
    return pixel_boxes(rows, pixels, labels.numel(), label_map.shape)


def test_label_map_boxes_match_detectron2_bitmask_boxes():
    g = torch.Generator().manual_seed(0)
    label_map = torch.randint(-1, 7, (13, 29), generator=g)
    label_map[label_map == 5] = -1  # label 5 is empty
    labels = torch.tensor([3, 0, 5, 6])
    masks = label_map[None] == labels[:, None, None]
    boxes = label_map_boxes(label_map, labels, 7)
    assert torch.equal(boxes, BitMasks(masks).get_bounding_boxes().tensor)
    assert boxes[2].tolist() == [0, 0, 0, 0]  # an empty label
    # Sparse labels on maps of other shapes, a subset of the labels in any order.
    for h, w in [(1, 1), (40, 7), (9, 33)]:
        label_map = torch.randint(-1, 12, (h, w), generator=g)
        label_map[torch.rand(h, w, generator=g) < 0.7] = -1
        labels = torch.randperm(12, generator=g)[:6]
        masks = label_map[None] == labels[:, None, None]
        expected = BitMasks(masks).get_bounding_boxes().tensor
        assert torch.equal(label_map_boxes(label_map, labels, 12), expected)


def test_greedy_suppression_equals_sequential_greedy():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        k = int(torch.randint(1, 40, (1,), generator=g))
        adjacency = torch.rand(k, k, generator=g) < 0.15
        adjacency = adjacency | adjacency.t()
        selected, undecided = _greedy_suppression(adjacency.float().tril(diagonal=-1), k)
        expected = []
        for i in range(k):
            if not any(adjacency[i, j] for j in expected):
                expected.append(i)
        assert torch.nonzero(selected).squeeze(1).tolist() == expected
        assert not undecided.any()


def test_cluster_embeddings_many_clusters_and_spread_cluster():
    g = torch.Generator().manual_seed(1)
    # 40 tight, well separated clusters in 64-d (found together, in few rounds), plus one
    # spread-out cluster: points on an arc whose ends are far apart (cosine < threshold) but
    # all close to its middle, which must stay one cluster (seeds of one cluster merge).
    centres = torch.eye(64)[:40]
    truth = torch.arange(40).repeat_interleave(25)
    points = F.normalize(centres[truth] + 0.02 * torch.randn(1000, 64, generator=g), dim=1)
    angles = torch.linspace(-0.6, 0.6, 300)
    arc = torch.zeros(300, 64)
    arc[:, 62], arc[:, 63] = torch.cos(angles), torch.sin(angles)
    assert float(arc[0] @ arc[-1]) < 0.7 < float((arc @ F.normalize(arc.mean(0), dim=0)).min())
    points = torch.cat([points, arc])
    truth = torch.cat([truth, torch.full((300,), 40)])
    perm = torch.randperm(truth.numel(), generator=g)
    labels, confidence = cluster_embeddings(
        points[perm], similarity_threshold=0.7, min_cluster_size=8, num_seed_candidates=256
    )
    truth = truth[perm]
    assert confidence.numel() == 41 and torch.all(labels >= 0)
    assert labels[truth == 40].unique().tolist() == [0]  # the largest cluster comes first
    for k in range(41):
        assert labels[truth == k].unique().numel() == 1


def test_cluster_embeddings_finds_small_clusters_beside_a_huge_one():
    # 80 small clusters (10-30 points) next to one of 8000: the seed subsample of the first
    # round misses many of them; later rounds, over the points left free, must find them all.
    g = torch.Generator().manual_seed(0)
    sizes = [8000] + [10] * 50 + [30] * 30
    centres = F.normalize(torch.randn(len(sizes), 64, generator=g), dim=1)
    truth = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    points = F.normalize(centres[truth] + 0.03 * torch.randn(truth.numel(), 64, generator=g), dim=1)
    perm = torch.randperm(truth.numel(), generator=g)
    labels, confidence = cluster_embeddings(
        points[perm], similarity_threshold=0.9, min_cluster_size=8, max_clusters=100
    )
    truth = truth[perm]
    assert confidence.numel() == len(sizes) and torch.all(labels >= 0)
    assert all(labels[truth == k].unique().numel() == 1 for k in range(len(sizes)))
