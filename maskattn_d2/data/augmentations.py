"""Augmentations of maskattn_d2: every image ends at the network size, stretched.

Training: random resized crop (which also resizes to the network size), horizontal flip (and,
optionally, the other symmetries of the square) and colour jitter (brightness, contrast,
saturation). Test: a plain resize to the network size.
Geometric transforms sample segmentations with nearest neighbour; colour transforms leave
them untouched. The ``*_augmentations`` functions take explicit arguments; the ``build_*``
functions read them from a config.

The transforms give the values of detectron2's own (``T.ResizeTransform``, ``T.BlendTransform``)
at a fraction of the cost on the small images of the training loader: the crop is copied
before PIL sees it, segmentations are resampled by an index gather, and brightness / contrast
go through a 256-entry table. Only ``RandomSaturation``'s grey level is computed in another
summation order than its former ``ndarray.dot`` (within float32 rounding).
"""
import math
from functools import lru_cache
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

from ..config import check_resize_mode

# INPUT.RESIZE_INTERPOLATION: the PIL filters an image may be resized to the network size with.
# PIL widens each filter by the downscaling factor, so all of them antialias.
RESIZE_INTERPOLATIONS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}

__all__ = [
    "HFlipTransform",
    "LookupBlendTransform",
    "RandomBrightness",
    "RandomContrast",
    "RandomFlip",
    "RandomResizedCrop",
    "RandomSaturation",
    "RandomSquareSymmetry",
    "ResizeTransform",
    "TransposeTransform",
    "VFlipTransform",
    "build_test_augmentations",
    "build_train_augmentations",
    "eval_augmentations",
    "train_augmentations",
]


def _check_size(size: Sequence[int]) -> Tuple[int, int]:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"network size must be (height, width) with positive values, got {size}")
    return int(size[0]), int(size[1])


@lru_cache(maxsize=4096)
def _pil_nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output position of PIL's nearest resize from ``in_size`` to
    ``out_size`` samples, asked from PIL itself (it resizes a row of indices), so a gather
    with it reproduces PIL's rounding exactly. PIL's nearest scaling is separable: rows and
    columns each use such a table."""
    row = Image.fromarray(np.arange(in_size, dtype=np.int32)[None, :], mode="I")
    return np.asarray(row.resize((out_size, 1), Image.NEAREST), dtype=np.intp)[0]


class ResizeTransform(T.ResizeTransform):
    """``T.ResizeTransform`` with the same outputs, made cheap for crops of small images.

    * ``apply_image``: a crop is a strided view, which PIL's ``fromarray`` copies byte by byte
      (``tobytes``, ~10x slower than ``np.ascontiguousarray``); it is made contiguous first.
      PIL then resizes it exactly as in detectron2.
    * ``apply_segmentation`` (uint8 maps, the PIL path of detectron2): PIL's nearest resize is
      an index gather along rows and columns; it is done with PIL's own index tables, without
      a round trip through a PIL image. Other dtypes go to detectron2's code.
    """

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        if img.dtype == np.uint8:
            img = np.ascontiguousarray(img)
        return super().apply_image(img, interp)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        if segmentation.dtype != np.uint8 or segmentation.ndim not in (2, 3):
            return super().apply_segmentation(segmentation)
        assert segmentation.shape[:2] == (self.h, self.w)
        rows = _pil_nearest_index(self.h, self.new_h)
        cols = _pil_nearest_index(self.w, self.new_w)
        return np.take(np.take(segmentation, rows, axis=0), cols, axis=1)

    def inverse(self) -> T.Transform:
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


class HFlipTransform(T.HFlipTransform):
    """``T.HFlipTransform`` that returns a flipped copy (OpenCV) instead of a reversed view of
    contiguous uint8 images: every later step (colour tables, id decoding, the tensor) then
    reads contiguous memory, several times faster than through the view."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype == np.uint8 and img.ndim in (2, 3) and img.flags.c_contiguous:
            return cv2.flip(img, 1)
        return super().apply_image(img)


class RandomFlip(T.RandomFlip):
    """``T.RandomFlip`` (same random draw, same values) with horizontal flips done by
    ``HFlipTransform``."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        flip = super().get_transform(image)
        if isinstance(flip, T.HFlipTransform):
            return HFlipTransform(flip.width)
        return flip


class VFlipTransform(T.VFlipTransform):
    """``T.VFlipTransform`` that returns a contiguous copy instead of a reversed view (as
    ``HFlipTransform``)."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(super().apply_image(img))


class TransposeTransform(T.Transform):
    """Swap an image's rows and columns (its mirror in the main diagonal); its own inverse.
    Segmentations are transposed alike (no resampling)."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img.swapaxes(0, 1))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords[:, ::-1].copy()

    def inverse(self) -> T.Transform:
        return self


class RandomSquareSymmetry(T.Augmentation):
    """A vertical flip and a transposition, each with probability 1/2: after a horizontal
    flip with probability 1/2, every one of the square's 8 symmetries (rotations by multiples
    of 90 degrees, and their mirror images) is equally likely. For images without an up or a
    handedness (microscopy). Square images only: a transposition swaps height and width."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        if height != width:
            raise ValueError(
                f"RandomSquareSymmetry needs square images (a transposition swaps height and "
                f"width), got {height}x{width}; set a square INPUT.NETWORK_SIZE."
            )
        transforms = []
        if np.random.rand() < 0.5:
            transforms.append(VFlipTransform(height))
        if np.random.rand() < 0.5:
            transforms.append(TransposeTransform())
        return T.TransformList(transforms)


class LookupBlendTransform(T.BlendTransform):
    """``T.BlendTransform`` with a scalar ``src_image``, applied to uint8 images through a
    256-entry table: the table is detectron2's own blend of the values 0..255, so every
    pixel gets exactly the value ``T.BlendTransform`` gives it, for one table lookup instead
    of float conversions, a blend and a clip over the image. Float images are blended as in
    detectron2."""

    def apply_image(self, img: np.ndarray, interp: str = None) -> np.ndarray:
        if img.dtype != np.uint8 or np.ndim(self.src_image) != 0:
            return super().apply_image(img, interp)
        table = super().apply_image(np.arange(256, dtype=np.uint8), interp)
        return np.take(table, img)


class RandomBrightness(T.RandomBrightness):
    """``T.RandomBrightness`` (same random draw, same values) through ``LookupBlendTransform``."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        blend = super().get_transform(image)
        return LookupBlendTransform(blend.src_image, blend.src_weight, blend.dst_weight)


class RandomContrast(T.RandomContrast):
    """``T.RandomContrast`` (same random draw, same values) through ``LookupBlendTransform``."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        blend = super().get_transform(image)
        return LookupBlendTransform(blend.src_image, blend.src_weight, blend.dst_weight)


class RandomResizedCrop(T.Augmentation):
    """Crop a random part of the image and resize it to a fixed size (torchvision-style).

    The crop covers a fraction ``s ~ U(scale)`` of the image area and its aspect ratio is the
    image's own aspect times ``r`` (``log r ~ U(log ratio)``), so with ``scale=(1, 1)`` the
    crop is the whole image, exactly the view the test-time stretch resize gives. If no crop
    fits in ``max_tries`` draws, the whole image is used.
    """

    def __init__(
        self,
        output_size: Sequence[int],
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        interp=Image.BILINEAR,
        max_tries: int = 10,
    ):
        """
        Args:
            output_size: (height, width) of the output.
            scale: range of the crop's fraction of the image area, within (0, 1].
            ratio: range of the crop's aspect change relative to the image, > 0.
            interp: PIL interpolation of the image (segmentations use nearest).
            max_tries: number of draws before falling back to the whole image.
        """
        super().__init__()
        output_size = _check_size(output_size)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        scale, ratio = tuple(scale), tuple(ratio)
        self._init(locals())

    def _sample_crop(self, h: int, w: int) -> Tuple[int, int, int, int]:
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.max_tries):
            area_fraction = np.random.uniform(*self.scale)
            r = math.exp(np.random.uniform(*log_ratio))
            crop_h = int(round(h * math.sqrt(area_fraction / r)))
            crop_w = int(round(w * math.sqrt(area_fraction * r)))
            if 0 < crop_h <= h and 0 < crop_w <= w:
                y0 = np.random.randint(0, h - crop_h + 1)
                x0 = np.random.randint(0, w - crop_w + 1)
                return x0, y0, crop_w, crop_h
        return 0, 0, w, h

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        x0, y0, crop_w, crop_h = self._sample_crop(h, w)
        out_h, out_w = self.output_size
        resize = ResizeTransform(crop_h, crop_w, out_h, out_w, self.interp)
        if (x0, y0, crop_w, crop_h) == (0, 0, w, h):
            return resize
        return T.TransformList([T.CropTransform(x0, y0, crop_w, crop_h), resize])


class RandomSaturation(T.Augmentation):
    """Random saturation change that knows the channel order of the image.

    detectron2's ``T.RandomSaturation`` computes grey with RGB weights whatever the format;
    this one uses BGR weights for "BGR" images.
    """

    def __init__(self, intensity_min: float, intensity_max: float, image_format: str = "RGB"):
        """
        Args:
            intensity_min, intensity_max: range of the blend weight w (1 keeps the image,
                0 is grey, > 1 over-saturates).
            image_format: "RGB" or "BGR".
        """
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"colour jitter needs an RGB or BGR image, got format {image_format}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if self.image_format == "BGR":
            weights = weights[::-1]
        w = np.random.uniform(self.intensity_min, self.intensity_max)
        # Weighted channel sum, written out: ``ndarray.dot`` over an (H, W, 3) array makes one
        # BLAS call per pixel (~10x slower); the sums agree within float32 rounding.
        channels = image.astype(np.float32)
        grey = channels[..., 0] * weights[0] + channels[..., 1] * weights[1]
        grey += channels[..., 2] * weights[2]
        # Grey in every channel: the same values as broadcasting one channel, but the blend
        # then runs over contiguous arrays (a broadcast over 3 channels is ~10x slower).
        grey = cv2.merge([grey] * image.shape[2])
        return T.BlendTransform(src_image=grey, src_weight=1 - w, dst_weight=w)


def train_augmentations(
    network_size: Sequence[int],
    *,
    crop_scale: Sequence[float] = (0.5, 1.0),
    flip_prob: float = 0.5,
    square_symmetries: bool = False,
    color_jitter: float = 0.2,
    image_format: str = "RGB",
    interp: int = Image.BILINEAR,
) -> List[T.Augmentation]:
    """Training augmentations ending at ``network_size``.

    Args:
        network_size: (height, width) of the network input.
        crop_scale: area-fraction range of the random resized crop.
        flip_prob: probability of a horizontal flip (0 disables).
        square_symmetries: also flip vertically and transpose, each with probability 1/2
            (:class:`RandomSquareSymmetry`; ``network_size`` must be square).
        color_jitter: brightness, contrast and saturation factors are drawn from
            [1 - color_jitter, 1 + color_jitter] (0 disables).
        image_format: channel order of the images ("RGB" or "BGR"; others need
            ``color_jitter == 0``).
        interp: PIL filter of the image's resize (:data:`RESIZE_INTERPOLATIONS`).
    """
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    augs: List[T.Augmentation] = [
        RandomResizedCrop(network_size, scale=crop_scale, interp=interp)
    ]
    if flip_prob > 0:
        augs.append(RandomFlip(prob=flip_prob, horizontal=True, vertical=False))
    if square_symmetries:
        height, width = _check_size(network_size)
        if height != width:
            raise ValueError(
                f"INPUT.SQUARE_SYMMETRIES needs a square INPUT.NETWORK_SIZE, got {height}x{width}."
            )
        augs.append(RandomSquareSymmetry())
    if color_jitter > 0:
        lo, hi = 1.0 - color_jitter, 1.0 + color_jitter
        augs += [
            RandomBrightness(lo, hi),
            RandomContrast(lo, hi),
            RandomSaturation(lo, hi, image_format),
        ]
    return augs


def eval_augmentations(
    network_size: Sequence[int], interp: int = Image.BILINEAR
) -> List[T.Augmentation]:
    """Evaluation augmentations: a stretch resize to ``network_size`` (height, width) with the
    PIL filter ``interp``."""
    return [T.Resize(_check_size(network_size), interp)]


def resize_interpolation(cfg) -> int:
    """The PIL filter named by cfg.INPUT.RESIZE_INTERPOLATION."""
    name = cfg.INPUT.RESIZE_INTERPOLATION
    if name not in RESIZE_INTERPOLATIONS:
        raise ValueError(
            f"INPUT.RESIZE_INTERPOLATION {name!r} is not one of {sorted(RESIZE_INTERPOLATIONS)}."
        )
    return RESIZE_INTERPOLATIONS[name]


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """``train_augmentations`` from cfg.INPUT (NETWORK_SIZE, RANDOM_CROP_SCALE, FLIP_PROB,
    SQUARE_SYMMETRIES, COLOR_JITTER, FORMAT, RESIZE_INTERPOLATION)."""
    check_resize_mode(cfg)
    return train_augmentations(
        cfg.INPUT.NETWORK_SIZE,
        crop_scale=cfg.INPUT.RANDOM_CROP_SCALE,
        flip_prob=cfg.INPUT.FLIP_PROB,
        square_symmetries=cfg.INPUT.SQUARE_SYMMETRIES,
        color_jitter=cfg.INPUT.COLOR_JITTER,
        image_format=cfg.INPUT.FORMAT,
        interp=resize_interpolation(cfg),
    )


def build_test_augmentations(cfg) -> List[T.Augmentation]:
    """``eval_augmentations`` from cfg.INPUT.NETWORK_SIZE and RESIZE_INTERPOLATION."""
    check_resize_mode(cfg)
    return eval_augmentations(cfg.INPUT.NETWORK_SIZE, resize_interpolation(cfg))
