"""A generator of synthetic panoptic scenes written in the real COCO panoptic format.

It is the default dataset: it needs no download and is small enough to train on a laptop CPU.
Each scene has a background of 2-3 textured stuff classes (a "sky" gradient above a wavy
horizon, "grass" noise and striped "road" below it, split by a slanted line) and 1-4 instances
of each of 3 thing classes ("circle", "square", "triangle", distinct colours, 8-40 px, randomly
rotated). Instances may touch and partly occlude each other (later ones are painted on top;
every instance keeps most of its area visible), some get a 1-pixel void ring like COCO's
unlabelled boundaries, and some scenes have a "crowd" cluster of small shapes labelled as one
``iscrowd`` segment. Image sizes vary (128-160 x 128-192) so the resize back to the original
size is exercised. Everything is deterministic given the seed; image ``i`` of a split does not
depend on how many images are generated.

``touching=True`` selects another layout (a separate dataset; the default is unchanged): the
thing instances come in chains of 2-3 shapes of one class in a row, each touching the next
(4-adjacent, at most a sliver of overlap) while keeping most of its area visible, 1-2 chains
per class. The connected components of the semantic map merge each chain into one segment,
so only a method that separates instances of one class (centres/offsets, embeddings) can
score there.

Layout under ``root`` (COCO's):

    {train,val}/000001.jpg ...                       images (JPEG, quality 95)
    annotations/panoptic_{train,val}.json            panoptic json (images, annotations,
                                                     categories with isthing/color)
    annotations/panoptic_{train,val}/000001.png ...  RGB-encoded segment ids (id2rgb)
    annotations/instances_{train,val}.json           COCO instances (RLE), for COCOEvaluator
    annotations/panoptic_semseg_{train,val}/*.png    contiguous semantic labels (255 = void),
                                                     for SemSegEvaluator
    MASKATTN_COMPLETE.json                           marker with the generation parameters
"""
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

from .panoptic_conversion import (
    build_directory_once,
    instance_annotations_from_panoptic,
    mask_bbox,
    semantic_from_panoptic,
)
from .panoptic_json import panoptic_metadata

__all__ = ["SYNTHETIC_CATEGORIES", "generate_synthetic_panoptic", "render_scene"]

# Bump when the rendering changes: cached copies of an older version are then not reused.
SYNTHETIC_VERSION = 1

# COCO-like non-contiguous dataset ids (things 1-3, stuff 101-103) exercise the id mapping.
SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 40, 40]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [240, 210, 40]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [150, 60, 210]},
    {"id": 101, "name": "sky", "supercategory": "scene", "isthing": 0, "color": [110, 170, 240]},
    {"id": 102, "name": "grass", "supercategory": "scene", "isthing": 0, "color": [60, 150, 50]},
    {"id": 103, "name": "road", "supercategory": "scene", "isthing": 0, "color": [110, 110, 115]},
]
_SKY, _GRASS, _ROAD = 101, 102, 103
_THING_IDS = (1, 2, 3)
_SHAPES = {1: "circle", 2: "square", 3: "triangle"}
# Mean RGB of each thing class; per-instance jitter and shading are added on top.
_THING_RGB = {1: (205, 45, 45), 2: (235, 205, 50), 3: (140, 60, 200)}

_OBJECT_SIZE = (8, 40)  # pixels: circle diameter, square side, triangle side
_INSTANCES_PER_CLASS = (1, 4)
_MIN_VISIBLE_FRACTION = 0.6  # an instance may lose at most 40% of its area to occluders
_MIN_VISIBLE_PIXELS = 20
_VOID_RING_PROB = 0.3
_CROWD_PROB = 0.15
# Touching layout: chains of same-class shapes, each touching the next.
_CHAINS_PER_CLASS = (1, 2)
_CHAIN_LENGTH = (2, 3)
_CHAIN_OBJECT_SIZE = (14, 30)
_MIN_INSIDE_FRACTION = 0.7  # a chain link keeps >= 70% of its nominal area inside the image
_NOMINAL_AREA = {"circle": np.pi / 4.0, "square": 1.0, "triangle": np.sqrt(3.0) / 4.0}


def _shape_mask(
    shape: str, height: int, width: int, cy: float, cx: float, size: float, angle: float
) -> np.ndarray:
    """(H, W) bool mask of a shape of the given size, rotated by ``angle``, centred at (cy, cx)."""
    mask = np.zeros((height, width), dtype=bool)
    # Only the window around the shape is evaluated.
    y0, y1 = max(int(cy - size), 0), min(int(cy + size) + 2, height)
    x0, x1 = max(int(cx - size), 0), min(int(cx + size) + 2, width)
    if y0 >= y1 or x0 >= x1:
        return mask
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy -= cy
    dx -= cx
    if shape == "circle":
        inside = dy * dy + dx * dx <= (size / 2.0) ** 2
    elif shape == "square":
        c, s = np.cos(angle), np.sin(angle)
        inside = (np.abs(c * dx + s * dy) <= size / 2.0) & (np.abs(-s * dx + c * dy) <= size / 2.0)
    else:
        # Equilateral triangle of side ``size``: inside the three edge half-planes, each at
        # the inradius from the centre.
        r_in = size / (2.0 * np.sqrt(3.0))
        inside = np.ones(dy.shape, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= np.cos(a) * dx + np.sin(a) * dy <= r_in
    mask[y0:y1, x0:x1] = inside
    return mask


def _smooth_noise(rng, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    img = Image.fromarray(grid).resize((gw * cell, gh * cell), Image.BILINEAR)
    return np.asarray(img)[:height, :width]


def _render_background(rng, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stuff label map (dataset ids) and its textured float RGB image."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    labels = np.empty((height, width), dtype=np.int64)
    image = np.empty((height, width, 3), dtype=np.float32)

    # Ground split into grass and road by a slanted line (sometimes all one class).
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.3, 0.3) * min(height, width)
    side = np.cos(angle) * (xs - width / 2) + np.sin(angle) * (ys - height / 2) - offset
    mode = rng.choice(["split", "grass", "road"], p=[0.7, 0.15, 0.15])
    road = side > 0 if mode == "split" else np.full((height, width), mode == "road")
    labels[:] = np.where(road, _ROAD, _GRASS)

    if rng.random() < 0.85:  # a sky above a wavy horizon
        horizon = rng.uniform(0.25, 0.55) * height + rng.uniform(2, 6) * np.sin(
            xs[0] * rng.uniform(0.03, 0.09) + rng.uniform(0, 2 * np.pi)
        )
        labels[ys < horizon[None, :]] = _SKY

    t = ys / max(height - 1, 1)
    sky = np.stack([70 + 100 * t, 130 + 75 * t, 220 + 25 * t], axis=-1)
    sky += rng.normal(0, 3, size=sky.shape)
    grass_tex = 25 * _smooth_noise(rng, height, width, 8)
    grass_tex += rng.normal(0, 14, size=(height, width))
    grass = np.stack([60 + 0.4 * grass_tex, 140 + grass_tex, 50 + 0.3 * grass_tex], axis=-1)
    # Road: grey with light stripes along the road direction.
    stripe_pos = -np.sin(angle) * xs + np.cos(angle) * ys
    stripes = (np.mod(stripe_pos, 14.0) < 2.5).astype(np.float32)
    road_tex = 105 + 60 * stripes + rng.normal(0, 6, size=(height, width))
    road_img = np.stack([road_tex, road_tex, road_tex + 5], axis=-1)

    for cat, tex in ((_SKY, sky), (_GRASS, grass), (_ROAD, road_img)):
        mask = labels == cat
        image[mask] = tex[mask]
    return labels, image


def _thing_texture(rng, cat: int, mask: np.ndarray, cy: float, cx: float, size: float):
    """Colour of an instance's pixels: class colour + jitter + a soft shading gradient."""
    base = np.asarray(_THING_RGB[cat], dtype=np.float32) + rng.uniform(-15, 15, size=3)
    ys, xs = np.nonzero(mask)
    direction = rng.uniform(0, 2 * np.pi)
    shade = ((xs - cx) * np.cos(direction) + (ys - cy) * np.sin(direction)) / max(size, 1.0)
    rgb = base[None, :] * (1.0 + 0.25 * shade[:, None])
    return rgb + rng.normal(0, 5, size=rgb.shape)


def _try_place(owner: np.ndarray, full_areas: Dict[int, int], new_mask: np.ndarray) -> bool:
    """Whether ``new_mask`` (painted on top) keeps every existing instance visible enough."""
    if new_mask.sum() < _MIN_VISIBLE_PIXELS:
        return False
    covered = owner[new_mask]
    covered = covered[covered > 0]
    if covered.size == 0:
        return True
    lost = np.bincount(covered)
    visible = np.bincount(owner.reshape(-1), minlength=len(lost))
    for seg_id in np.flatnonzero(lost):
        remaining = visible[seg_id] - lost[seg_id]
        if remaining < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full_areas[seg_id]):
            return False
    return True


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` dilated by one pixel (4-neighbourhood)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _touching_mask(
    shape: str,
    height: int,
    width: int,
    neighbour: np.ndarray,
    start: Tuple[float, float],
    direction: float,
    size: float,
    angle: float,
):
    """The shape placed along ``direction`` from ``start`` as far as it still touches
    ``neighbour`` (a pixel of it 4-adjacent to or on ``neighbour``).

    The centre moves from beyond contact towards ``start`` in half-pixel steps and stops at
    the first contact, so the two shapes touch with at most a sliver of overlap. Returns
    (mask, cy, cx), or None when no position makes contact.
    """
    grown = _grow(neighbour)
    dy, dx = np.sin(direction), np.cos(direction)
    ys, xs = np.nonzero(neighbour)
    # Farthest extent of the neighbour along the direction, plus the shape's circumradius.
    reach = float(np.max((ys - start[0]) * dy + (xs - start[1]) * dx)) + size / np.sqrt(2.0) + 2
    for distance in np.arange(reach, 0.0, -0.5):
        cy, cx = start[0] + distance * dy, start[1] + distance * dx
        mask = _shape_mask(shape, height, width, cy, cx, size, angle)
        if (mask & grown).any():
            return mask, cy, cx
    return None


def _place_chains(rng, height: int, width: int, owner: np.ndarray, full_areas, paint) -> None:
    """The touching layout: chains of 2-3 same-class shapes, each touching the previous."""
    lo, hi = _CHAINS_PER_CLASS
    order = [c for c in _THING_IDS for _ in range(int(rng.integers(lo, hi + 1)))]
    rng.shuffle(order)
    for cat in order:
        shape = _SHAPES[cat]
        length = int(rng.integers(_CHAIN_LENGTH[0], _CHAIN_LENGTH[1] + 1))

        def fits(mask, size):
            inside = mask.sum() >= _MIN_INSIDE_FRACTION * _NOMINAL_AREA[shape] * size * size
            return inside and _try_place(owner, full_areas, mask)

        previous = None
        for _attempt in range(20):  # the first link
            size = rng.uniform(*_CHAIN_OBJECT_SIZE)
            cy = rng.uniform(size / 2.0, height - size / 2.0)
            cx = rng.uniform(size / 2.0, width - size / 2.0)
            mask = _shape_mask(shape, height, width, cy, cx, size, rng.uniform(0, np.pi))
            if fits(mask, size):
                previous = (paint(mask, cat, False, cy, cx, size), cy, cx, size)
                break
        if previous is None:
            continue
        direction = rng.uniform(0, 2 * np.pi)  # the chain runs roughly along one line
        for _link in range(1, length):
            index, py, px, psize = previous
            placed = None
            for _attempt in range(8):
                size = float(np.clip(psize * rng.uniform(0.8, 1.25), *_CHAIN_OBJECT_SIZE))
                heading = direction + rng.uniform(-0.5, 0.5)
                angle = rng.uniform(0, np.pi)
                found = _touching_mask(
                    shape, height, width, owner == index, (py, px), heading, size, angle
                )
                if found is not None and fits(found[0], size):
                    mask, cy, cx = found
                    placed = (paint(mask, cat, False, cy, cx, size), cy, cx, size)
                    break
                direction = rng.uniform(0, 2 * np.pi)  # blocked: turn
            if placed is None:
                break
            previous = placed


def render_scene(rng: np.random.Generator, height: int, width: int, touching: bool = False):
    """Render one synthetic panoptic scene.

    Args:
        rng: numpy random generator (the only source of randomness).
        height, width: image size in pixels.
        touching: the touching layout (chains of same-class instances in contact) instead of
            the default independent placement.

    Returns:
        image: (H, W, 3) uint8 RGB image.
        pan_ids: (H, W) int64 segment ids, 0 = void.
        segments: list of dicts with "id", dataset "category_id" and "iscrowd", one per
            segment present in ``pan_ids`` (stuff first, then crowd, then instances).
    """
    stuff, image = _render_background(rng, height, width)
    pan_ids = stuff * 1000 + 1  # stuff segment id: category * 1000 + 1
    owner = np.zeros((height, width), dtype=np.int64)  # thing owner index, 0 = none
    full_areas: Dict[int, int] = {}
    things: List[Dict] = []

    def paint(mask, cat, crowd, cy, cx, size):
        index = len(things) + 1
        owner[mask] = index
        full_areas[index] = int(mask.sum())
        image[mask] = _thing_texture(rng, cat, mask, cy, cx, size)
        things.append({"category_id": cat, "iscrowd": int(crowd), "index": index})
        return index

    if rng.random() < _CROWD_PROB:  # a cluster of small shapes labelled as one crowd segment
        cat = int(rng.choice(_THING_IDS))
        cy, cx = rng.uniform(15, height - 15), rng.uniform(15, width - 15)
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(5, 9))):
            dy, dx, size = rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(6, 10)
            angle = rng.uniform(0, np.pi)
            mask |= _shape_mask(_SHAPES[cat], height, width, cy + dy, cx + dx, size, angle)
        paint(mask, cat, True, cy, cx, 24.0)

    if touching:
        _place_chains(rng, height, width, owner, full_areas, paint)
    else:
        lo, hi = _INSTANCES_PER_CLASS
        order = [c for c in _THING_IDS for _ in range(int(rng.integers(lo, hi + 1)))]
        rng.shuffle(order)
        for cat in order:
            for _attempt in range(20):
                size = rng.uniform(*_OBJECT_SIZE)
                margin = size / 4.0
                cy = rng.uniform(margin, height - margin)
                cx = rng.uniform(margin, width - margin)
                angle = rng.uniform(0, np.pi)
                mask = _shape_mask(_SHAPES[cat], height, width, cy, cx, size, angle)
                if _try_place(owner, full_areas, mask):
                    paint(mask, cat, False, cy, cx, size)
                    break

    segments = []
    present = np.unique(stuff)
    for cat in (_SKY, _GRASS, _ROAD):
        if cat in present and ((stuff == cat) & (owner == 0)).any():
            segments.append({"id": cat * 1000 + 1, "category_id": cat, "iscrowd": 0})
    per_class = {c: 0 for c in _THING_IDS}
    for thing in things:
        visible = owner == thing["index"]
        if not visible.any():
            continue
        per_class[thing["category_id"]] += 1
        seg_id = thing["category_id"] * 1000 + 100 + per_class[thing["category_id"]]
        pan_ids[visible] = seg_id
        segments.append(
            {"id": seg_id, "category_id": thing["category_id"], "iscrowd": thing["iscrowd"]}
        )
        if not thing["iscrowd"] and rng.random() < _VOID_RING_PROB:
            # 1-pixel unlabelled ring around the instance, only over the background.
            pan_ids[_grow(visible) & ~visible & (owner == 0)] = 0
    # Stuff fully hidden by void rings would leave an empty segment: drop such segments.
    present_ids = set(np.unique(pan_ids).tolist())
    segments = [s for s in segments if s["id"] in present_ids]
    return np.clip(image, 0, 255).round().astype(np.uint8), pan_ids, segments


def _write_split(root: str, split: str, split_index: int, num_images: int, params: Dict) -> None:
    """Render and write the images, PNGs and jsons of one split under ``root``."""
    image_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    pan_dir = os.path.join(ann_dir, f"panoptic_{split}")
    sem_dir = os.path.join(ann_dir, f"panoptic_semseg_{split}")
    for d in (image_dir, pan_dir, sem_dir):
        os.makedirs(d, exist_ok=True)
    to_label = panoptic_metadata(SYNTHETIC_CATEGORIES)["stuff_dataset_id_to_contiguous_id"]

    images, annotations, instances = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([params["seed"], split_index, i])
        height = int(rng.integers(params["height_range"][0], params["height_range"][1] + 1))
        width = int(rng.integers(params["width_range"][0], params["width_range"][1] + 1))
        image, pan_ids, segments = render_scene(
            rng, height, width, touching=params.get("touching", False)
        )
        image_id, stem = i + 1, f"{i + 1:06d}"
        Image.fromarray(image).save(os.path.join(image_dir, stem + ".jpg"), quality=95)
        Image.fromarray(id2rgb(pan_ids)).save(os.path.join(pan_dir, stem + ".png"))
        Image.fromarray(semantic_from_panoptic(pan_ids, segments, to_label)).save(
            os.path.join(sem_dir, stem + ".png")
        )
        for seg in segments:
            mask = pan_ids == seg["id"]
            seg["area"], seg["bbox"] = int(mask.sum()), mask_bbox(mask)
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
        )
        annotations.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
        )
        instances += instance_annotations_from_panoptic(
            pan_ids,
            segments,
            image_id=image_id,
            thing_category_ids=_THING_IDS,
            first_annotation_id=len(instances) + 1,
        )

    description = "maskattn_d2 synthetic panoptic scenes"
    if params.get("touching", False):
        description += " (touching layout)"
    info = {"description": description, "version": SYNTHETIC_VERSION}
    panoptic = {"info": info, "images": images, "annotations": annotations}
    panoptic["categories"] = SYNTHETIC_CATEGORIES
    with open(os.path.join(ann_dir, f"panoptic_{split}.json"), "w") as f:
        json.dump(panoptic, f)
    coco = {"info": info, "images": images, "annotations": instances}
    coco["categories"] = [
        {k: c[k] for k in ("id", "name", "supercategory")}
        for c in SYNTHETIC_CATEGORIES
        if c["isthing"]
    ]
    with open(os.path.join(ann_dir, f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)


def generate_synthetic_panoptic(
    root: str,
    *,
    num_train: int = 512,
    num_val: int = 64,
    seed: int = 0,
    height_range: Sequence[int] = (128, 160),
    width_range: Sequence[int] = (128, 192),
    touching: bool = False,
) -> None:
    """Generate the synthetic panoptic dataset under ``root`` once (reused afterwards).

    Generation writes to a temporary sibling folder that is renamed to ``root`` when complete,
    so concurrent callers (e.g. DDP workers) never see partial data and the loser of a race
    simply reuses the winner's copy. A second call with the same parameters does nothing.

    Args:
        root: output folder (must not exist, be empty, or hold a copy made with the same
            parameters).
        num_train, num_val: number of images per split (>= 1).
        seed: random seed; the output is byte-identical for equal parameters.
        height_range, width_range: inclusive ranges of image heights and widths (>= 48).
        touching: the touching layout (chains of same-class instances in contact, see the
            module docstring). It is recorded in the generation parameters only when True,
            so the default's marker and files are those of earlier versions.

    Raises:
        ValueError: bad arguments, or ``root`` holds other data.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    for name, (lo, hi) in (("height_range", height_range), ("width_range", width_range)):
        if not 48 <= lo <= hi:
            raise ValueError(f"{name} must satisfy 48 <= min <= max, got {(lo, hi)}")
    params = {
        "version": SYNTHETIC_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "height_range": [int(v) for v in height_range],
        "width_range": [int(v) for v in width_range],
    }
    if touching:
        params["touching"] = True

    def build(tmp_root: str) -> None:
        _write_split(tmp_root, "train", 0, num_train, params)
        _write_split(tmp_root, "val", 1, num_val, params)

    build_directory_once(root, build, params)
