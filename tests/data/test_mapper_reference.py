"""The training mapper's fast paths against straightforward references.

The mapper decodes plain PNGs with OpenCV, gathers nearest-resized segmentations by index,
flips with OpenCV, applies brightness / contrast through 256-entry tables and labels pixels
with a search over the segment ids. Each must give the values of the plain detectron2 / PIL /
per-segment computation; only the saturation's grey level may move by float32 rounding.
"""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id
from PIL import Image

from maskattn_d2.data import (
    MaskAttnPanopticMapper,
    panoptic_to_semantic,
    panoptic_to_targets,
    train_augmentations,
)
from maskattn_d2.data.augmentations import (
    HFlipTransform,
    LookupBlendTransform,
    RandomSaturation,
    ResizeTransform,
)
from maskattn_d2.data.datasets.validation import read_image_checked, read_panoptic_png

from ..conftest import COCO_MINI_PANOPTIC_JSON, coco_mini_dicts
from ..panoptic_factory import mapper_sample_layout, write_mapper_sample

NET = (128, 128)


# ------------------------------------------------------------------------ references
def _reference_targets(pan_ids, segments, thing_ids, ignore_label, min_instance_pixels):
    """One mask per segment, in segments_info order."""
    sem = np.full(pan_ids.shape, ignore_label, np.int64)
    inst = np.zeros(pan_ids.shape, np.int64)
    n = 0
    for seg in segments:
        mask = pan_ids == seg["id"]
        sem[mask] = seg["category_id"]
        usable = seg["category_id"] in thing_ids and not seg.get("iscrowd", 0)
        if usable and mask.sum() >= max(min_instance_pixels, 1):
            n += 1
            inst[mask] = n
    return sem, inst


class _ReferenceCrop(T.Augmentation):
    """The random resized crop drawn as before (same random calls), as stock transforms."""

    def __init__(self, size, scale=(0.5, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        box = (0, 0, w, h)
        for _ in range(10):
            fraction = np.random.uniform(*self.scale)
            r = math.exp(np.random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            ch = int(round(h * math.sqrt(fraction / r)))
            cw = int(round(w * math.sqrt(fraction * r)))
            if 0 < ch <= h and 0 < cw <= w:
                y0 = np.random.randint(0, h - ch + 1)
                x0 = np.random.randint(0, w - cw + 1)
                box = (x0, y0, cw, ch)
                break
        resize = T.ResizeTransform(box[3], box[2], *self.size, Image.BILINEAR)
        if box == (0, 0, w, h):
            return resize
        return T.TransformList([T.CropTransform(*box), resize])


class _ReferenceSaturation(T.Augmentation):
    """The former saturation: grey by ``ndarray.dot`` over the (H, W, 3) image."""

    def __init__(self, lo, hi):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        w = np.random.uniform(self.lo, self.hi)
        grey = image.astype(np.float32).dot(weights)[:, :, None]
        return T.BlendTransform(src_image=grey, src_weight=1 - w, dst_weight=w)


def _reference_mapper(d, *, jitter, thing_ids, min_instance_pixels=4, ignore_label=255):
    """The former training mapper, from stock detectron2 / PIL / panopticapi pieces."""
    d = copy.deepcopy(d)
    image = detection_utils.read_image(d["file_name"], "RGB")
    pan = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"))
    augs = [_ReferenceCrop(NET), T.RandomFlip(prob=0.5, horizontal=True, vertical=False)]
    if jitter:
        lo, hi = 1 - jitter, 1 + jitter
        augs += [T.RandomBrightness(lo, hi), T.RandomContrast(lo, hi), _ReferenceSaturation(lo, hi)]
    aug_input = T.AugInput(image, sem_seg=pan)
    T.AugmentationList(augs)(aug_input)
    pan_ids = rgb2id(np.ascontiguousarray(aug_input.sem_seg))
    sem, inst = _reference_targets(
        pan_ids, d["segments_info"], thing_ids, ignore_label, min_instance_pixels
    )
    return aug_input.image, sem, inst


# ------------------------------------------------------------------ target generator
def _random_panoptic(rs, shape, num_segments, big_ids):
    high = 2**24 if big_ids else 4 * num_segments + 2
    ids = rs.permutation(np.unique(rs.randint(1, high, size=3 * num_segments)))[:num_segments]
    segments = [
        {
            "id": int(i),
            "category_id": int(rs.randint(0, 6)),
            "iscrowd": int(rs.rand() < 0.2),
        }
        for i in ids
    ]
    # Pixels: listed ids (some listed ids get no pixel), void 0 and unlisted ids.
    unlisted = [int(i) for i in rs.randint(1, high, size=3) if i not in set(ids.tolist())]
    present = list(ids[: max(num_segments - 2, 0)]) + [0] + unlisted
    sizes = rs.dirichlet(np.ones(len(present)) * 0.5)  # uneven: some segments are tiny
    pan = rs.choice(present, size=shape, p=sizes).astype(np.int32)
    return pan, segments


@pytest.mark.parametrize("big_ids", [False, True])
def test_panoptic_to_targets_equals_per_segment_reference(big_ids):
    rs = np.random.RandomState(7)
    thing_ids = [0, 2, 3]
    for trial in range(40):
        shape = tuple(rs.randint(1, 40, size=2))
        pan, segments = _random_panoptic(rs, shape, int(rs.randint(0, 12)), big_ids)
        order = rs.permutation(len(segments))  # segments_info order decides the numbering
        segments = [segments[i] for i in order]
        for min_px in (0, 1, 5, 40):
            sem, inst = panoptic_to_targets(
                pan, segments, thing_ids=thing_ids, ignore_label=254, min_instance_pixels=min_px
            )
            ref_sem, ref_inst = _reference_targets(pan, segments, thing_ids, 254, min_px)
            np.testing.assert_array_equal(sem, ref_sem, err_msg=f"trial {trial}")
            np.testing.assert_array_equal(inst, ref_inst, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(panoptic_to_semantic(pan, segments, ignore_label=254), sem)


# --------------------------------------------------------------------- transforms
def test_resize_transform_equals_detectron2s_on_crops_and_segmentations():
    rs = np.random.RandomState(0)
    sizes = [((1, 1), (128, 128)), ((1, 300), (128, 128)), ((700, 3), (5, 9)), ((64, 64), (64, 64))]
    sizes += [(tuple(rs.randint(1, 500, 2)), tuple(rs.randint(1, 200, 2))) for _ in range(40)]
    for (h, w), (new_h, new_w) in sizes:
        full = rs.randint(0, 256, (h + 7, w + 5, 3)).astype(np.uint8)
        crop = full[3 : 3 + h, 2 : 2 + w]  # a strided view, as the crop gives
        fast = ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)
        stock = T.ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)
        for x in (crop, crop[:, :, 0], crop[:, ::-1]):
            np.testing.assert_array_equal(fast.apply_image(x), stock.apply_image(x))
            np.testing.assert_array_equal(fast.apply_segmentation(x), stock.apply_segmentation(x))
        ids = rs.rand(h, w).astype(np.float32)  # not uint8: detectron2's own (torch) path
        np.testing.assert_array_equal(fast.apply_segmentation(ids), stock.apply_segmentation(ids))


def test_hflip_transform_equals_detectron2s():
    rs = np.random.RandomState(1)
    image = rs.randint(0, 256, (9, 13, 3)).astype(np.uint8)
    for x in (image, image[:, :, 0], image[:, 2:], image.astype(np.float32)):
        flipped = HFlipTransform(x.shape[1]).apply_image(x)
        np.testing.assert_array_equal(flipped, T.HFlipTransform(x.shape[1]).apply_image(x))


def test_lookup_blend_equals_blend_transform():
    rs = np.random.RandomState(2)
    image = rs.randint(0, 256, (50, 70, 3)).astype(np.uint8)
    image[:5] = 0
    image[5:10] = 255
    for x in (image, image[:, ::-1], image[..., 1]):
        for w in rs.uniform(0.5, 1.5, 20):
            for src in (0, x.mean()):
                stock = T.BlendTransform(src_image=src, src_weight=1 - w, dst_weight=w)
                fast = LookupBlendTransform(src_image=src, src_weight=1 - w, dst_weight=w)
                np.testing.assert_array_equal(fast.apply_image(x), stock.apply_image(x))
    as_float = image.astype(np.float32)
    fast = LookupBlendTransform(src_image=3.0, src_weight=0.2, dst_weight=0.8)
    np.testing.assert_array_equal(fast.apply_image(as_float), 0.2 * 3.0 + 0.8 * as_float)


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_saturation_grey_within_float_rounding_of_the_former_dot(image_format):
    rs = np.random.RandomState(3)
    image = rs.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    image[:16] = image[:16, :, :1]  # grey pixels
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if image_format == "BGR":
        weights = weights[::-1]
    np.random.seed(0)
    blend = RandomSaturation(0.8, 1.2, image_format).get_transform(image)
    former = image.astype(np.float32).dot(weights)
    np.testing.assert_allclose(blend.src_image, np.repeat(former[:, :, None], 3, 2), rtol=1e-6)
    np.random.seed(0)
    w = np.random.uniform(0.8, 1.2)
    expected = T.BlendTransform(former[:, :, None], 1 - w, w).apply_image(image)
    diff = np.abs(blend.apply_image(image).astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.05


# ----------------------------------------------------------------------- file reads
def _png_cases(tmp_path):
    rs = np.random.RandomState(4)
    rgb = rs.randint(0, 256, (20, 30, 3)).astype(np.uint8)
    cases = {"rgb.png": Image.fromarray(rgb)}
    cases["rgba.png"] = Image.fromarray(np.dstack([rgb, rs.randint(0, 256, (20, 30), np.uint8)]))
    cases["palette.png"] = Image.fromarray(rgb).convert("P")
    for name, img in cases.items():
        img.save(tmp_path / name)
    rotated = tmp_path / "exif_rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(rotated, exif=exif)
    return [tmp_path / name for name in cases] + [rotated]


def test_png_reads_equal_pil_and_detectron2(tmp_path):
    for path in _png_cases(tmp_path):
        expected_pan = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(read_panoptic_png(str(path)), expected_pan)
        for image_format in ("RGB", "BGR"):
            expected = detection_utils.read_image(str(path), image_format)
            np.testing.assert_array_equal(read_image_checked(str(path), image_format), expected)
    # The EXIF orientation is applied to the image (not to a panoptic PNG).
    assert read_image_checked(str(tmp_path / "exif_rotated.png"), "RGB").shape == (30, 20, 3)


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "whole.png"
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (64, 64, 3), np.uint8)).save(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ValueError, match="truncated.png"):
        read_image_checked(str(truncated), "RGB")
    with pytest.raises(ValueError, match="truncated.png"):
        read_panoptic_png(str(truncated))


# ---------------------------------------------------------------- the whole mapper
def _colour_sample(root: Path):
    """A 90x150 PNG image (the OpenCV read path) with a panoptic PNG of 6 segments."""
    rs = np.random.RandomState(6)
    pan, segments = mapper_sample_layout()
    segments[3]["iscrowd"] = 1  # thing 1 is a crowd
    pan[60:62, 60:62] = 6  # 4 px: dropped when resized
    segments.append({"id": 6, "category_id": 1, "iscrowd": 0})
    image = (rs.rand(90, 150, 3) * 60 + pan[:, :, None] * 30).astype(np.uint8)
    return write_mapper_sample(root, image, pan, segments)


def _samples(tmp_path):
    """(dicts, thing ids): the colour sample, plus the COCO sample when it is present."""
    samples = [([_colour_sample(tmp_path)], [0, 1])]
    if COCO_MINI_PANOPTIC_JSON.is_file():
        dicts, meta = coco_mini_dicts()
        samples.append((dicts, list(meta["thing_dataset_id_to_contiguous_id"].values())))
    return samples


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_train_mapper_equals_the_former_pipeline(tmp_path, jitter):
    """Same seed, same draws: identical targets and geometry; with colour jitter the image may
    differ by one grey level where the saturation's grey rounds differently."""
    for dicts, thing_ids in _samples(tmp_path):
        mapper = MaskAttnPanopticMapper(
            True,
            augmentations=train_augmentations(NET, color_jitter=jitter),
            image_format="RGB",
            network_size=NET,
            ignore_label=255,
            thing_ids=thing_ids,
            min_instance_pixels=4,
        )
        for d in dicts:
            for seed in range(6):
                np.random.seed(seed)
                out = mapper(d)
                next_draw = np.random.rand()  # the random stream stays aligned
                np.random.seed(seed)
                image, sem, inst = _reference_mapper(d, jitter=jitter, thing_ids=thing_ids)
                assert np.random.rand() == next_draw
                name = f"{Path(d['file_name']).name}, seed {seed}"
                assert torch.equal(out["sem_seg"], torch.as_tensor(sem)), name
                assert torch.equal(out["instance_ids"], torch.as_tensor(inst)), name
                diff = np.abs(out["image"].permute(1, 2, 0).numpy().astype(int) - image)
                if jitter == 0:
                    assert diff.max() == 0, name
                else:
                    assert diff.max() <= 1 and diff.mean() < 0.05, name
