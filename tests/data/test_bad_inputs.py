"""Unusual and broken inputs on the data path: image modes and bit depths, extreme sizes,
undecodable images, panoptic PNGs with ids their segments_info does not list."""
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from panopticapi.utils import id2rgb
from PIL import Image

from maskattn_d2.data import MaskAttnPanopticMapper, eval_augmentations
from maskattn_d2.data.datasets import check_panoptic_dataset, read_image_checked

NET = (64, 64)


def mapper(**overrides):
    kwargs = dict(
        augmentations=eval_augmentations(NET),
        image_format="RGB",
        network_size=NET,
        ignore_label=255,
        thing_ids=[0],
        min_instance_pixels=1,
        num_classes=2,
    )
    kwargs.update(overrides)
    return MaskAttnPanopticMapper(True, **kwargs)  # builds targets; resize only


def sample(tmp_path, image_file, height, width):
    """A dataset dict for ``image_file``: class 1 (stuff) everywhere, one class-0 thing in the
    top-left quarter (when the image is at least 2x2)."""
    ids = np.full((height, width), 5, np.int32)
    ids[: height // 2, : width // 2] = 9
    pan = tmp_path / "pan.png"
    Image.fromarray(id2rgb(ids)).save(pan)
    segments = [{"id": 5, "category_id": 1, "iscrowd": 0}]
    if height >= 2 and width >= 2:
        segments.append({"id": 9, "category_id": 0, "iscrowd": 0})
    return {"file_name": str(image_file), "pan_seg_file_name": str(pan),
            "height": height, "width": width, "image_id": 1, "segments_info": segments}


RAMP = np.tile(np.arange(16, dtype=np.float64) / 15, (16, 1))  # 0..1 left to right


def _save(path, mode):
    """Save a 16x16 left-to-right ramp image in ``mode``; return its expected 8-bit gray."""
    gray8 = np.rint(RAMP * 255).astype(np.uint8)
    if mode == "L":
        Image.fromarray(gray8).save(path)
    elif mode == "LA":
        Image.fromarray(np.dstack([gray8, np.full_like(gray8, 7)]), "LA").save(path)
    elif mode == "P":
        Image.fromarray(gray8).convert("P").save(path)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([gray8] * 3 + [np.full_like(gray8, 9)])).save(path)
    elif mode == "I;16":
        Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(path)
    elif mode == "RGB;16":
        cv2.imwrite(str(path), np.dstack([np.rint(RAMP * 65535).astype(np.uint16)] * 3))
    elif mode == "CMYK":
        Image.fromarray(np.dstack([gray8] * 3)).convert("CMYK").save(path, quality=100)
    return gray8


@pytest.mark.parametrize(
    "mode,suffix", [("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"),
                    ("I;16", "png"), ("RGB;16", "png"), ("CMYK", "jpg")]
)
def test_image_modes_become_8_bit_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"image.{suffix}"
    gray8 = _save(path, mode)
    image = read_image_checked(str(path), "RGB")
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    # 16-bit images are scaled, not clipped at 255 (PIL's own conversion clips them white).
    tolerance = 3 if mode == "CMYK" else 1  # JPEG / the 16 -> 8 bit rounding
    for channel in range(3):
        np.testing.assert_allclose(image[..., channel], gray8, atol=tolerance)

    out = mapper()(sample(tmp_path, path, 16, 16))
    assert out["image"].shape == (3, *NET) and out["image"].dtype == torch.uint8
    assert out["image"][:, :, -1].float().mean() > 240  # the ramp's white end survives


def test_float_images_are_refused_with_the_file_name(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(RAMP.astype(np.float32)).save(path)
    with pytest.raises(ValueError, match=r"float\.tif.*floating-point"):
        read_image_checked(str(path), "RGB")


def test_too_many_pixels_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    # PIL refuses images of more than 2 * MAX_IMAGE_PIXELS (its decompression-bomb guard).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"big\.png is too large.*MAX_IMAGE_PIXELS"):
        read_image_checked(str(path), "RGB")


@pytest.mark.parametrize("height,width", [(1, 1), (1, 300), (2400, 3200)])
def test_extreme_image_sizes_are_mapped_to_the_network_size(tmp_path, height, width):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    out = mapper()(sample(tmp_path, path, height, width))
    assert out["image"].shape == (3, *NET)
    assert (out["height"], out["width"]) == (height, width)
    assert out["sem_seg"].shape == NET
    assert set(out["sem_seg"].unique().tolist()) <= {0, 1}  # no void invented by the resize


def test_png_ids_missing_from_segments_info_are_void_with_a_warning(tmp_path, caplog):
    path = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(path)
    d = sample(tmp_path, path, 16, 16)
    d["segments_info"] = [s for s in d["segments_info"] if s["id"] != 9]  # the thing's id
    m = mapper(network_size=(16, 16), augmentations=eval_augmentations((16, 16)))
    with caplog.at_level(logging.WARNING):
        out = m(d)
        m(d)
    assert (out["sem_seg"][:8, :8] == 255).all() and (out["sem_seg"][8:] == 1).all()
    assert (out["instance_ids"] == 0).all()
    warnings = [r for r in caplog.records if "not in segments_info" in r.getMessage()]
    assert len(warnings) == 1  # once per file
    assert "pan.png" in warnings[0].getMessage() and "[9]" in warnings[0].getMessage()
    # The full audit refuses the annotation.
    d["segments_info"] = [dict(s, category_id=1) for s in d["segments_info"]]
    with pytest.raises(ValueError, match=r"pan\.png.*ids \[9\].*does not list"):
        check_panoptic_dataset([d], read_files=True)


@pytest.mark.parametrize("mode", ["L", "I;16", "1"])
def test_greyscale_panoptic_png_is_refused_at_load_naming_the_file(tmp_path, mode):
    """Issue 11 item 3: a one-channel panoptic PNG used to be read as grey * 65793 ids, so
    training ran on 100 % void pixels (a warning per file) and evaluation crashed inside
    panopticapi. The loader (first PNG), the mapper, the evaluators' reader and the audit
    now refuse it with the file name."""
    from maskattn_d2.data.datasets import load_panoptic_json, panoptic_metadata
    from maskattn_d2.data.datasets.panoptic_conversion import read_panoptic_ids

    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    record = sample(tmp_path, image, 8, 8)
    grey = tmp_path / "pan.png"
    Image.fromarray(np.array(Image.open(grey).convert("L"))).convert(mode).save(grey)
    assert Image.open(grey).mode == mode
    message = rf"{grey}.* mode '{mode}'"
    with pytest.raises(ValueError, match=message):
        mapper()(record)
    with pytest.raises(ValueError, match=message):
        read_panoptic_ids(str(grey))
    with pytest.raises(ValueError, match=message):
        check_panoptic_dataset([record], read_files=True)

    categories = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff"}]
    json_file = tmp_path / "panoptic.json"
    json_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": image.name, "height": 8, "width": 8}],
        "annotations": [{"image_id": 1, "file_name": grey.name, "segments_info": [
            {"id": 5, "category_id": 2, "iscrowd": 0}, {"id": 9, "category_id": 1, "iscrowd": 0}
        ]}],
        "categories": categories,
    }))
    with pytest.raises(ValueError, match=message):
        load_panoptic_json(str(json_file), str(tmp_path), str(tmp_path),
                           panoptic_metadata(categories))
    # An RGB, RGBA or palette PNG of the same ids is read as before.
    ids = np.full((8, 8), 5, np.int32)
    ids[:4, :4] = 9
    rgb = Image.fromarray(id2rgb(ids))
    for png in (rgb, rgb.convert("RGBA"), rgb.convert("P", palette=Image.Palette.ADAPTIVE)):
        png.save(grey)
        np.testing.assert_array_equal(read_panoptic_ids(str(grey)), ids)
