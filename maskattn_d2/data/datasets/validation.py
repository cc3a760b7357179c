"""Checks of panoptic dataset files, with errors that name the offending file.

The dataset loaders run the cheap checks (files exist, category ids are known) on every dict;
the mapper reads through ``read_image_checked``/``read_panoptic_png`` so that a corrupt or
missing file fails with its name instead of a bare PIL error deep inside a data-loader worker;
``check_panoptic_dataset(..., read_files=True)`` decodes every file once, for a full audit.

Plain 8-bit RGB / RGBA PNGs are decoded by OpenCV (about twice as fast as PIL on the small
files of a low-resolution copy; PNG is lossless, so the pixels are the same); everything else
(JPEG, other PNG types, EXIF, files OpenCV cannot read) goes through PIL as in detectron2.
"""
import io
import os
from typing import List, Mapping, Optional, Sequence, Union

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from panopticapi.utils import rgb2id
from PIL import Image

__all__ = [
    "check_panoptic_dataset",
    "check_panoptic_png_mode",
    "check_segment_ids_in_png",
    "check_segments_info",
    "unlisted_segment_ids",
    "read_image_checked",
    "read_panoptic_png",
]


# PIL modes of integer images with more than 8 bits per sample (16-bit PNG / TIFF grayscale);
# 65535 maps to white when they are scaled to 8 bits.
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_HIGH_BIT_DEPTH_WHITE = 65535


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer grayscale image to 8 bits ("L"), 0..65535 -> 0..255.

    PIL's own ``convert("RGB")`` clips such images at 255 instead of scaling them, which turns
    a 16-bit photo almost white. Floating-point images have no agreed range and are refused.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        white = _HIGH_BIT_DEPTH_WHITE
        scaled = np.clip(values, 0, white) * (255.0 / white)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ValueError("floating-point (mode F) images are not supported; save it as 8 or 16 bit")
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RGB, _PNG_RGBA = 2, 6  # IHDR colour types


def _decode_plain_png(data: bytes, *, exif_matters: bool) -> Optional[np.ndarray]:
    """(H, W, 3) uint8 RGB of ``data`` if it is an 8-bit RGB or RGBA PNG (alpha dropped, as
    PIL's ``convert("RGB")`` does), decoded by OpenCV; None for anything else, which the
    caller reads with PIL: other formats, colour types or bit depths, more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL warns or refuses), an ``eXIf`` chunk when
    ``exif_matters`` (detectron2 applies the EXIF orientation through PIL; the bytes are
    searched anywhere, a false hit only costs the slower path), or data OpenCV cannot decode
    (truncated or corrupt: PIL then raises its error)."""
    # Signature, then IHDR (always the first chunk): width, height, bit depth, colour type.
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    if data[24] != 8 or data[25] not in (_PNG_RGB, _PNG_RGBA):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None
    if exif_matters and b"eXIf" in data:
        return None
    # IMREAD_UNCHANGED: no EXIF rotation and no colour conversion, the stored samples.
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if (
        decoded is None
        or decoded.dtype != np.uint8
        or decoded.shape[:2] != (height, width)
        or decoded.ndim != 3
        or decoded.shape[2] not in (3, 4)
    ):
        return None
    to_rgb = cv2.COLOR_BGR2RGB if decoded.shape[2] == 3 else cv2.COLOR_BGRA2RGB
    return cv2.cvtColor(decoded, to_rgb)


def read_image_checked(file_name: str, image_format: Optional[str] = None) -> np.ndarray:
    """detectron2's ``read_image`` with errors that name the file and 16-bit images scaled.

    Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted to ``image_format``
    by PIL as in detectron2; 16-bit grayscale images are scaled to 8 bits first (PIL would clip
    them). The EXIF orientation is applied, as detectron2 does. 8-bit RGB / RGBA PNGs without
    EXIF, read as "RGB" or "BGR", are decoded by OpenCV instead (the same pixels, faster).

    Returns:
        (H, W, C) uint8 image in ``image_format`` ("RGB", "BGR", "L", ...); with None, the
        decoded array as it is.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt or truncated image), has more pixels
            than PIL accepts (``PIL.Image.MAX_IMAGE_PIXELS``, a decompression-bomb guard) or is
            a floating-point image.
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file not found: {file_name}")
    with open(file_name, "rb") as f:
        data = f.read()
    if image_format in ("RGB", "BGR"):
        rgb = _decode_plain_png(data, exif_matters=True)
        if rgb is not None:
            return rgb if image_format == "RGB" else np.ascontiguousarray(rgb[:, :, ::-1])
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = _to_8_bit(_apply_exif_orientation(image))
            return convert_PIL_to_numpy(image, image_format)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"Image file {file_name} is too large to decode safely: {e} Resize it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the size is intended."
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode image file {file_name}: {e}") from e


# PIL modes a COCO panoptic PNG may have: 8-bit RGB, RGB + alpha (alpha ignored), or a
# palette whose colours are the RGB encoding (some PNG optimisers write RGB that way).
PANOPTIC_PNG_MODES = ("RGB", "RGBA", "P")


def check_panoptic_png_mode(file_name: str, mode: Optional[str] = None) -> None:
    """Raise ValueError naming ``file_name`` if its image mode cannot hold a panoptic PNG's
    RGB id encoding (``mode``: the file's PIL mode if already known, else read from its
    header, which is cheap)."""
    if mode is None:
        try:
            with Image.open(file_name) as img:
                mode = img.mode
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"Cannot decode panoptic PNG {file_name}: {e}") from e
    if mode not in PANOPTIC_PNG_MODES:
        raise ValueError(
            f"Panoptic PNG {file_name} has image mode '{mode}' (a single channel, e.g. "
            "greyscale), not RGB: a COCO panoptic PNG encodes segment id = R + 256 G + 256^2 B "
            "(write it with Image.fromarray(panopticapi.utils.id2rgb(ids))). Read as RGB, "
            "every pixel of this file would be void."
        )


def read_panoptic_png(file_name: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB encoding of a COCO panoptic PNG (``rgb2id`` gives the ids).

    A panoptic PNG encodes segment ids as ``R + 256 G + 256^2 B``. A one-channel (greyscale,
    16-bit, binary) PNG has no such encoding: PIL would copy its grey level to R, G and B,
    turning every id into ``65793 * grey``, ids that no ``segments_info`` lists, so every
    pixel would silently become void (and panopticapi's evaluation crashes on such a file).
    It is refused.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded, or is not an RGB / RGBA / palette PNG (the
            message names the file and its mode).
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Panoptic annotation PNG not found: {file_name}")
    with open(file_name, "rb") as f:
        data = f.read()
    rgb = _decode_plain_png(data, exif_matters=False)  # the ids are read as stored
    if rgb is not None:
        return rgb
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode panoptic PNG {file_name}: {e}") from e
    with img:
        check_panoptic_png_mode(file_name, img.mode)
        try:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"Cannot decode panoptic PNG {file_name}: {e}") from e


def check_segments_info(
    segments_info: Sequence[Mapping], *, num_classes: Optional[int], file_name: str
) -> None:
    """Raise ValueError naming ``file_name`` if segments have bad ids or unknown categories.

    Args:
        segments_info: detectron2 segments (contiguous "category_id").
        num_classes: number of contiguous classes; None skips the category check.
        file_name: the annotation the segments belong to (for the message).
    """
    seen = set()
    for seg in segments_info:
        seg_id = int(seg["id"])
        if seg_id <= 0 or seg_id in seen:
            raise ValueError(f"{file_name}: segment id {seg_id} is not positive or not unique")
        seen.add(seg_id)
        cat = int(seg["category_id"])
        if num_classes is not None and not 0 <= cat < num_classes:
            raise ValueError(
                f"{file_name}: segment {seg_id} has unknown category id {cat} "
                f"(expected 0..{num_classes - 1})"
            )


def unlisted_segment_ids(pan_ids: np.ndarray, segments_info: Sequence[Mapping]) -> List[int]:
    """Non-zero ids of a panoptic map that ``segments_info`` does not list (sorted).

    Training and panopticapi's evaluation both treat such pixels as void.
    """
    listed = np.asarray([int(s["id"]) for s in segments_info] + [0], dtype=np.int64)
    present = np.unique(pan_ids).astype(np.int64)
    return present[~np.isin(present, listed)].tolist()


def check_segment_ids_in_png(
    pan_ids: np.ndarray, segments_info: Sequence[Mapping], file_name: str
) -> None:
    """Raise ValueError naming ``file_name`` if a segment of ``segments_info`` has no pixel,
    or if the PNG has a non-zero id that ``segments_info`` does not list."""
    present = np.unique(pan_ids)
    wanted = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    missing = wanted[~np.isin(wanted, present)]
    if len(missing):
        raise ValueError(f"{file_name}: segment ids {missing.tolist()} do not occur in the PNG")
    unlisted = unlisted_segment_ids(present, segments_info)  # the unique ids suffice
    if unlisted:
        raise ValueError(
            f"{file_name}: the PNG has segment ids {unlisted} that segments_info does not list"
        )


def _dicts_and_classes(dataset, num_classes):
    if isinstance(dataset, str):
        dicts = DatasetCatalog.get(dataset)
        if num_classes is None:
            classes = MetadataCatalog.get(dataset).get("stuff_classes")
            num_classes = len(classes) if classes is not None else None
        return dicts, num_classes
    return list(dataset), num_classes


def check_panoptic_dataset(
    dataset: Union[str, Sequence[Mapping]],
    *,
    num_classes: Optional[int] = None,
    read_files: bool = False,
) -> int:
    """Check the dicts of a panoptic dataset; raise on the first problem, naming the file.

    Args:
        dataset: a registered dataset name or a list of detectron2 panoptic dicts.
        num_classes: number of contiguous classes (default: ``len(stuff_classes)`` of the
            dataset's metadata when a name is given; otherwise category ids are not checked).
        read_files: also decode every image and panoptic PNG, and check that image and PNG
            sizes agree and that every segment id occurs in its PNG (slow on big datasets).

    Returns:
        The number of checked dicts.

    Raises:
        FileNotFoundError: an image, panoptic PNG or semantic PNG is missing.
        ValueError: an empty dataset, a corrupt file, a size mismatch, an unknown category id
            a segment id absent from the PNG or a PNG id absent from segments_info.
    """
    dicts, num_classes = _dicts_and_classes(dataset, num_classes)
    if not dicts:
        what = f"dataset {dataset}" if isinstance(dataset, str) else "the list of dataset dicts"
        raise ValueError(f"{what} is empty")
    for d in dicts:
        for key, what in (("file_name", "Image file"), ("pan_seg_file_name", "Panoptic PNG")):
            if key not in d:
                raise ValueError(f"dataset dict of image {d.get('image_id')} has no '{key}'")
            if not os.path.isfile(d[key]):
                raise FileNotFoundError(f"{what} not found: {d[key]}")
        if "sem_seg_file_name" in d and not os.path.isfile(d["sem_seg_file_name"]):
            raise FileNotFoundError(f"Semantic PNG not found: {d['sem_seg_file_name']}")
        check_segments_info(
            d.get("segments_info", []), num_classes=num_classes, file_name=d["pan_seg_file_name"]
        )
        if read_files:
            image = read_image_checked(d["file_name"])
            pan_ids = rgb2id(read_panoptic_png(d["pan_seg_file_name"]))
            if image.shape[:2] != pan_ids.shape:
                raise ValueError(
                    f"{d['pan_seg_file_name']}: size {pan_ids.shape} differs from image "
                    f"{d['file_name']} {image.shape[:2]}"
                )
            check_segment_ids_in_png(pan_ids, d.get("segments_info", []), d["pan_seg_file_name"])
    return len(dicts)

