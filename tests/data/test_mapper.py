"""MaskAttnPanopticMapper, its augmentations and the target generator."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id
from PIL import Image

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.data import (
    MaskAttnPanopticMapper,
    RandomResizedCrop,
    RandomSquareSymmetry,
    build_dataset_mapper,
    build_test_augmentations,
    build_train_augmentations,
    panoptic_to_semantic,
    panoptic_to_targets,
    eval_augmentations,
    train_augmentations,
)
from maskattn_d2.data.augmentations import RandomFlip

from ..conftest import coco_mini_dicts
from ..panoptic_factory import mapper_sample_layout, write_mapper_sample

NET = (128, 128)


# ------------------------------------------------------------------ target generator
def test_panoptic_to_targets_hand_made():
    pan = np.array(
        [
            [0, 10, 10, 20],
            [30, 30, 20, 20],
            [40, 40, 50, 99],
        ],
        dtype=np.int32,
    )
    segments = [
        {"id": 20, "category_id": 1},  # thing, 3 px
        {"id": 10, "category_id": 1},  # thing, 2 px: below min_instance_pixels
        {"id": 30, "category_id": 5},  # stuff
        {"id": 40, "category_id": 2, "iscrowd": 1},  # crowd thing
        {"id": 50, "category_id": 2},  # thing, 1 px
    ]
    sem, inst = panoptic_to_targets(
        pan, segments, thing_ids=[1, 2], ignore_label=255, min_instance_pixels=1
    )
    assert sem.dtype == np.int64 and inst.dtype == np.int64
    np.testing.assert_array_equal(sem, [[255, 1, 1, 1], [5, 5, 1, 1], [2, 2, 2, 255]])
    # numbered in segments_info order: 20 -> 1, 10 -> 2, 50 -> 3; crowd and stuff -> 0
    np.testing.assert_array_equal(inst, [[0, 2, 2, 1], [0, 0, 1, 1], [0, 0, 3, 0]])

    _, inst = panoptic_to_targets(
        pan, segments, thing_ids=[1, 2], ignore_label=255, min_instance_pixels=3
    )
    np.testing.assert_array_equal(inst, [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    sem = panoptic_to_semantic(pan, segments, ignore_label=7)
    np.testing.assert_array_equal(sem[0], [7, 1, 1, 1])


def test_panoptic_to_targets_rejects_bad_input():
    pan = np.ones((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="duplicate"):
        panoptic_to_targets(
            pan, [{"id": 1, "category_id": 0}] * 2, thing_ids=[0], ignore_label=255
        )
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        panoptic_to_targets(pan[None], [], thing_ids=[0], ignore_label=255)
    with pytest.raises(ValueError, match="integers"):
        panoptic_to_targets(pan.astype(np.float32), [], thing_ids=[0], ignore_label=255)


def test_panoptic_to_targets_no_segments_is_all_void():
    sem, inst = panoptic_to_targets(
        np.zeros((3, 5), dtype=np.int32), [], thing_ids=[0], ignore_label=255
    )
    assert (sem == 255).all() and (inst == 0).all()


# ---------------------------------------------------------------------- augmentations
def test_random_resized_crop_full_scale_is_plain_resize():
    image = np.random.RandomState(0).randint(0, 255, (90, 150, 3)).astype(np.uint8)
    aug = RandomResizedCrop(NET, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    tfm = aug.get_transform(image)
    assert isinstance(tfm, T.ResizeTransform)
    resized = T.Resize(NET).get_transform(image).apply_image(image)
    np.testing.assert_array_equal(tfm.apply_image(image), resized)


def test_random_resized_crop_crops_within_scale():
    np.random.seed(0)
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    aug = RandomResizedCrop((32, 48), scale=(0.25, 0.5))
    for _ in range(50):
        tfm = aug.get_transform(image)
        crop, resize = tfm.transforms
        fraction = crop.w * crop.h / (100 * 200)
        assert 0.2 <= fraction <= 0.55
        assert crop.x0 + crop.w <= 200 and crop.y0 + crop.h <= 100
        assert (resize.new_h, resize.new_w) == (32, 48)
        assert tfm.apply_image(image).shape == (32, 48, 3)


@pytest.mark.parametrize(
    "kwargs", [{"scale": (0.0, 1.0)}, {"scale": (0.8, 0.5)}, {"ratio": (0.0, 1.0)}]
)
def test_random_resized_crop_rejects_bad_ranges(kwargs):
    with pytest.raises(ValueError):
        RandomResizedCrop(NET, **kwargs)


def test_augmentation_lists_follow_config():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.INPUT.NETWORK_SIZE = (64, 96)
    train = build_train_augmentations(cfg)
    assert [type(a).__name__ for a in train] == [
        "RandomResizedCrop",
        "RandomFlip",
        "RandomBrightness",
        "RandomContrast",
        "RandomSaturation",
    ]
    assert train[0].output_size == (64, 96) and train[1].prob == cfg.INPUT.FLIP_PROB
    assert train[2].intensity_min == pytest.approx(1 - cfg.INPUT.COLOR_JITTER)
    test = build_test_augmentations(cfg)
    assert len(test) == 1 and test[0].shape == (64, 96)
    assert len(train_augmentations(NET, flip_prob=0.0, color_jitter=0.0)) == 1
    cfg.INPUT.RESIZE_MODE = "pad"
    with pytest.raises(ValueError, match="RESIZE_MODE"):
        build_test_augmentations(cfg)
    cfg.INPUT.RESIZE_MODE = "stretch"
    cfg.INPUT.SQUARE_SYMMETRIES = True
    with pytest.raises(ValueError, match="SQUARE_SYMMETRIES needs a square"):
        build_train_augmentations(cfg)  # 64x96: a transposition would make it 96x64
    cfg.INPUT.NETWORK_SIZE = (64, 64)
    names = [type(a).__name__ for a in build_train_augmentations(cfg)]
    assert names[:3] == ["RandomResizedCrop", "RandomFlip", "RandomSquareSymmetry"]


def test_square_symmetries_are_the_eight_with_image_segmentation_and_points_alike():
    image = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)  # no symmetry of its own
    segmentation = image[..., 0].astype(np.int32) * 7
    # The square's eight symmetries: four rotations, each with or without a mirror.
    eight = {np.rot90(m, k).tobytes() for m in (image, image[:, ::-1]) for k in range(4)}
    assert len(eight) == 8
    augmentations = T.AugmentationList([RandomFlip(prob=0.5), RandomSquareSymmetry()])
    seen = set()
    np.random.seed(0)
    for _ in range(96):
        aug_input = T.AugInput(image.copy(), sem_seg=segmentation.copy())
        transforms = augmentations(aug_input)
        out = aug_input.image
        assert out.flags.c_contiguous and out.tobytes() in eight
        np.testing.assert_array_equal(aug_input.sem_seg, out[..., 0].astype(np.int32) * 7)
        # A pixel's value moves with the (x, y) coordinates of its centre.
        for y, x in ((0, 1), (3, 4), (2, 2)):
            centre = np.array([[x + 0.5, y + 0.5]])
            ((new_x, new_y),) = np.floor(transforms.apply_coords(centre)).astype(int)
            assert (out[new_y, new_x] == image[y, x]).all()
        seen.add(out.tobytes())
    assert seen == eight
    with pytest.raises(ValueError, match="square images"):
        RandomSquareSymmetry().get_transform(np.zeros((4, 6, 3), np.uint8))


# ---------------------------------------------------------------- mapper on COCO sample
@pytest.fixture(scope="module")
def coco_dicts():
    return coco_mini_dicts()


def _resize_mapper(meta, **overrides):
    """A training-mode mapper (it builds targets) whose only augmentation is the resize."""
    kwargs = dict(
        augmentations=eval_augmentations(NET),
        image_format="RGB",
        network_size=NET,
        ignore_label=255,
        thing_ids=list(meta["thing_dataset_id_to_contiguous_id"].values()),
        min_instance_pixels=4,
        num_classes=len(meta["stuff_classes"]),
    )
    kwargs.update(overrides)
    return MaskAttnPanopticMapper(True, **kwargs)


def _colour_mapper(is_train=True, **overrides):
    """A mapper for the colour-coded sample (things 0 and 1 of 4 classes)."""
    kwargs = dict(
        augmentations=eval_augmentations(NET),
        image_format="RGB",
        network_size=NET,
        ignore_label=255,
        thing_ids=[0, 1],
        min_instance_pixels=4,
        num_classes=4,
    )
    kwargs.update(overrides)
    return MaskAttnPanopticMapper(is_train, **kwargs)


def test_mapper_on_coco_sample(coco_dicts):
    dicts, meta = coco_dicts
    thing_ids = set(meta["thing_dataset_id_to_contiguous_id"].values())
    mapper = _resize_mapper(meta)
    saw_crowd = False
    for d in dicts:
        out = mapper(d)
        image, sem, inst = out["image"], out["sem_seg"], out["instance_ids"]
        assert image.shape == (3, *NET) and image.dtype == torch.uint8
        assert sem.shape == NET and sem.dtype == torch.int64
        assert inst.shape == NET and inst.dtype == torch.int64
        assert (out["height"], out["width"]) == (d["height"], d["width"])
        assert out["file_name"] == d["file_name"] and out["image_id"] == d["image_id"]
        values = set(sem.unique().tolist())
        assert values <= set(range(133)) | {255}

        # Expected targets, computed independently: nearest-resize the PNG with PIL.
        png = Image.open(d["pan_seg_file_name"]).convert("RGB")
        ids = rgb2id(np.asarray(png.resize(NET[::-1], Image.NEAREST)))
        expected = [
            s
            for s in d["segments_info"]
            if s["category_id"] in thing_ids and not s["iscrowd"] and (ids == s["id"]).sum() >= 4
        ]
        n = int(inst.max())
        assert n == len(expected) > 0
        assert sorted(inst.unique().tolist()) == list(range(n + 1))  # consecutive ids
        inst_np, sem_np = inst.numpy(), sem.numpy()
        for k, seg in enumerate(expected, start=1):
            np.testing.assert_array_equal(inst_np == k, ids == seg["id"])
            assert (sem_np[inst_np == k] == seg["category_id"]).all()
        np.testing.assert_array_equal(sem_np == 255, ids == 0)  # void
        for seg in d["segments_info"]:
            if seg["iscrowd"] and (ids == seg["id"]).any():
                saw_crowd = True
                assert (inst_np[ids == seg["id"]] == 0).all()  # crowd: no instance
                assert (sem_np[ids == seg["id"]] == seg["category_id"]).all()  # keeps class
    assert saw_crowd


def test_mapper_does_not_modify_the_dataset_dict(coco_dicts):
    dicts, meta = coco_dicts
    before = repr(dicts[0])
    _resize_mapper(meta)(dicts[0])
    assert repr(dicts[0]) == before


def test_mapper_from_config_and_registry(coco_dicts, tmp_path):
    dicts, meta = coco_dicts
    name = "test_mapper_from_config_ds"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(**meta)
    try:
        cfg = get_cfg()
        add_maskattn_config(cfg)
        cfg.DATASETS.TRAIN = (name,)
        cfg.DATASETS.TEST = (name,)
        cfg.INPUT.NETWORK_SIZE = (64, 80)
        cfg.INPUT.MIN_INSTANCE_PIXELS = 9
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
        train_mapper = build_dataset_mapper(cfg, is_train=True)
        assert isinstance(train_mapper, MaskAttnPanopticMapper)
        assert train_mapper.thing_ids == list(range(80))
        assert train_mapper.num_classes == 133 and train_mapper.min_instance_pixels == 9
        assert len(train_mapper.augmentations.augs) == 5
        np.random.seed(0)
        out = train_mapper(dicts[1])
        assert out["image"].shape == (3, 64, 80) and out["sem_seg"].shape == (64, 80)
        assert 254 in out["sem_seg"].unique().tolist()
        eval_mapper = MaskAttnPanopticMapper(cfg, is_train=False)
        assert len(eval_mapper.augmentations.augs) == 1
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ------------------------------------------------------- train-mode alignment, synthetic
# Contiguous classes: 0, 1 things; 2, 3 stuff. Colour encodes the class exactly.
_PALETTE = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 0), 255: (0, 0, 0)}


def _colour_coded_sample(root: Path):
    """A 90x150 lossless image whose colours are its classes, and its panoptic PNG."""
    pan, segments = mapper_sample_layout()
    sem = panoptic_to_semantic(pan, segments, ignore_label=255)
    image = np.zeros((90, 150, 3), dtype=np.uint8)
    for label, colour in _PALETTE.items():
        image[sem == label] = colour
    return write_mapper_sample(root, image, pan, segments)


def _colour_classes(image_chw: torch.Tensor) -> np.ndarray:
    """Class of each pixel by its nearest palette colour."""
    image = image_chw.permute(1, 2, 0).numpy().astype(np.int64)
    labels = np.array(list(_PALETTE))
    colours = np.array(list(_PALETTE.values()))
    dist = ((image[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return labels[dist.argmin(-1)]


def _interior(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has a single label (interpolation-safe)."""
    padded = np.pad(labels, radius, mode="edge")
    same = np.ones(labels.shape, dtype=bool)
    h, w = labels.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + h, dx : dx + w] == labels
    return same


def test_train_mode_keeps_image_and_targets_aligned(tmp_path):
    d = _colour_coded_sample(tmp_path)
    mapper = _colour_mapper(
        True, augmentations=train_augmentations(NET, crop_scale=(0.3, 1.0), color_jitter=0.0)
    )
    orientations = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(d)
        sem, inst = out["sem_seg"].numpy(), out["instance_ids"].numpy()
        colour = _colour_classes(out["image"])
        interior = _interior(sem)
        assert interior.mean() > 0.5
        np.testing.assert_array_equal(colour[interior], sem[interior])
        for k in range(1, inst.max() + 1):  # each instance is one thing class
            assert len(np.unique(sem[inst == k])) == 1 and sem[inst == k][0] in (0, 1)
        assert ((inst > 0) == np.isin(sem, [0, 1])).all()  # no crowd, all large enough
        # Stuff 2 starts on the left of the original; after a flip it is on the right.
        cols2, cols3 = np.nonzero(sem == 2)[1], np.nonzero(sem == 3)[1]
        if len(cols2) and len(cols3):
            orientations.add(bool(cols2.mean() < cols3.mean()))
    assert orientations == {True, False}  # both flipped and unflipped samples were checked


def test_square_symmetries_keep_image_and_targets_aligned(tmp_path):
    d = _colour_coded_sample(tmp_path)
    mapper = _colour_mapper(
        True, augmentations=train_augmentations(NET, square_symmetries=True, color_jitter=0.0)
    )
    layouts = set()
    for seed in range(16):
        np.random.seed(seed)
        out = mapper(d)
        sem = out["sem_seg"].numpy()
        interior = _interior(sem)
        np.testing.assert_array_equal(_colour_classes(out["image"])[interior], sem[interior])
        # Where stuff 2 lies against stuff 3: left / right / above / below after a symmetry.
        (y2, x2), (y3, x3) = (np.argwhere(sem == c).mean(0) for c in (2, 3))
        layouts.add(("x" if abs(x2 - x3) > abs(y2 - y3) else "y", bool(x2 + y2 < x3 + y3)))
    assert len(layouts) == 4  # transposed and vertically flipped samples were checked


def test_colour_jitter_changes_image_but_not_targets(tmp_path):
    d = _colour_coded_sample(tmp_path)
    outs = []
    for jitter in (0.0, 0.4):
        mapper = _colour_mapper(
            True, augmentations=train_augmentations(NET, color_jitter=jitter), num_classes=None
        )
        np.random.seed(3)  # geometric draws come first, so both runs crop/flip alike
        outs.append(mapper(d))
    assert torch.equal(outs[0]["sem_seg"], outs[1]["sem_seg"])
    assert torch.equal(outs[0]["instance_ids"], outs[1]["instance_ids"])
    assert not torch.equal(outs[0]["image"], outs[1]["image"])


def test_small_instances_get_no_instance_id(tmp_path):
    d = _colour_coded_sample(tmp_path)
    common = dict(
        augmentations=eval_augmentations((30, 50)),  # 1/3 scale: instance 3 has ~65 px
        network_size=(30, 50),
        num_classes=None,
    )
    out = _colour_mapper(min_instance_pixels=1, **common)(d)
    assert out["instance_ids"].max() == 3
    out = _colour_mapper(min_instance_pixels=60, **common)(d)
    # instance 5 (20x15 px -> ~33 px) is dropped, the others are renumbered 1..2
    assert sorted(out["instance_ids"].unique().tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------- bad data
def test_mapper_errors_name_the_file(tmp_path):
    d = _colour_coded_sample(tmp_path)
    mapper = _colour_mapper()
    missing = dict(d, file_name=str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        mapper(missing)
    missing_png = dict(d, pan_seg_file_name=str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        mapper(missing_png)

    bad_segments = [dict(s) for s in d["segments_info"]]
    bad_segments[1]["category_id"] = 7
    with pytest.raises(ValueError, match=r"pan\.png.*unknown category id 7"):
        mapper(dict(d, segments_info=bad_segments))

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match="garbage.jpg"):
        mapper(dict(d, file_name=str(garbage)))

    # A real JPEG cut in half: PIL opens it but fails while decoding.
    truncated = tmp_path / "truncated.jpg"
    Image.open(d["file_name"]).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.jpg"):
        mapper(dict(d, file_name=str(truncated)))

    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    with pytest.raises(ValueError, match="differs"):
        mapper(dict(d, file_name=str(small), height=20, width=20))


def test_inference_mapper_reads_only_the_image(tmp_path):
    """Inference on images without annotations: a dict with only file_name/height/width/
    image_id goes through the test-time mapper and the model."""
    from detectron2.modeling import build_model

    d = _colour_coded_sample(tmp_path)
    bare = {key: d[key] for key in ("file_name", "height", "width", "image_id")}
    out = _colour_mapper(is_train=False)(bare)
    assert set(out) == {"file_name", "height", "width", "image_id", "image"}
    assert out["image"].shape == (3, *NET) and out["image"].dtype == torch.uint8
    expected = np.asarray(Image.open(d["file_name"]).resize(NET[::-1], Image.BILINEAR))
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected)
    # The PNG is not read at inference, even when the dict names one.
    (tmp_path / "pan.png").unlink()
    assert set(_colour_mapper(is_train=False)(d)) == set(d) | {"image"}

    name = "test_inference_mapper_colour"
    MetadataCatalog.get(name).set(
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
        stuff_dataset_id_to_contiguous_id={3: 2, 4: 3},
        stuff_classes=["a", "b", "c", "d"],
    )
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TEST = (name,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.MASK_ATTN_UNET.CHANNELS = [8, 16]
    cfg.MODEL.MASK_ATTN.ENCODER_SCALES = []
    cfg.MODEL.MASK_ATTN.DECODER_SCALES = []
    try:
        mapper = build_dataset_mapper(cfg, is_train=False)
        model = build_model(cfg).eval()
        (result,) = model([mapper(bare)])
    finally:
        MetadataCatalog.remove(name)
    assert result["sem_seg"].shape == (4, 90, 150)
    assert result["panoptic_seg"][0].shape == (90, 150)
    assert result["instances"].image_size == (90, 150)


def test_mapper_rejects_augmentations_not_ending_at_network_size(tmp_path):
    d = _colour_coded_sample(tmp_path)
    mapper = _colour_mapper(augmentations=eval_augmentations((64, 64)), num_classes=None)
    with pytest.raises(ValueError, match="network size"):
        mapper(d)


def test_resize_interpolation_reaches_training_and_evaluation_resizes():
    """INPUT.RESIZE_INTERPOLATION sets the PIL filter of both the training crop's resize and the
    evaluation resize: a whole-image crop and the evaluation resize give PIL's own Lanczos
    result, unlike its bilinear one; an unknown name is rejected naming the key."""
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.INPUT.NETWORK_SIZE = (32, 32)
    cfg.INPUT.RANDOM_CROP_SCALE = (1.0, 1.0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    pil = {
        f: np.asarray(Image.fromarray(image).resize((32, 32), f))
        for f in (Image.BILINEAR, Image.LANCZOS)
    }
    assert not np.array_equal(pil[Image.BILINEAR], pil[Image.LANCZOS])
    for name, expected in (("bilinear", Image.BILINEAR), ("lanczos", Image.LANCZOS)):
        cfg.INPUT.RESIZE_INTERPOLATION = name
        crop = build_train_augmentations(cfg)[0]
        np.random.seed(0)
        crop_output = crop.get_transform(image).apply_image(image)
        test_output = build_test_augmentations(cfg)[0].get_transform(image).apply_image(image)
        assert np.array_equal(crop_output, pil[expected])
        assert np.array_equal(test_output, pil[expected])
    cfg.INPUT.RESIZE_INTERPOLATION = "area"
    with pytest.raises(ValueError, match="RESIZE_INTERPOLATION 'area'"):
        build_test_augmentations(cfg)
    with pytest.raises(ValueError, match="RESIZE_INTERPOLATION"):
        build_train_augmentations(cfg)
