"""normalize_images: detectron2's per-channel normalisation and the per-image one."""
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from maskattn_d2 import add_maskattn_config
from maskattn_d2.modeling.meta_arch import normalize_images

REPO = Path(__file__).resolve().parents[2]
MEAN = torch.tensor([120.0, 110.0, 100.0]).view(3, 1, 1)
STD = torch.tensor([60.0, 55.0, 50.0]).view(3, 1, 1)


def test_dataset_normalization_is_detectron2s():
    images = 255 * torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(normalize_images(images, MEAN, STD, False), (images - MEAN) / STD)


def test_per_image_normalization_standardises_each_image_and_ignores_brightness():
    g = torch.Generator().manual_seed(1)
    # A colour cast: the channels' means differ (red darkest).
    cast = torch.tensor([0.0, 30.0, 60.0]).view(3, 1, 1)
    bright = 60 + 120 * torch.rand(1, 3, 16, 16, generator=g) + cast
    dim = 0.2 * bright + 3  # the same scene, dimmer and with less contrast
    out = normalize_images(torch.cat([bright, dim]), MEAN, STD, True)
    for image in out:
        assert abs(float(image.mean())) < 1e-5
        assert abs(float(image.square().mean().sqrt()) - 1) < 1e-5
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-4)
    # Statistics over all channels together: the colour cast stays.
    channel_means = out[0].mean(dim=(1, 2))
    assert float(channel_means[1] - channel_means[0]) > 0.3
    assert float(channel_means[2] - channel_means[1]) > 0.3


def test_per_image_normalization_of_a_flat_image_is_zero_not_nan():
    flat = torch.full((1, 3, 4, 4), 42.0)
    nearly_flat = flat.clone()
    nearly_flat[0, 0, 0, 0] += 0.5  # std far below one grey level: divided by 1
    out = normalize_images(torch.cat([flat, nearly_flat]), MEAN, STD, True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert float(out[1].abs().max()) < 0.5


def test_model_resizes_then_normalises_each_image():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PER_IMAGE_NORMALIZATION = True
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    image = 255 * torch.rand(3, 40, 90, generator=g)
    x = model.preprocess_image([{"image": image}, {"image": 0.5 * image + 7}])
    assert x.shape[-2:] == tuple(cfg.INPUT.NETWORK_SIZE)
    assert abs(float(x[0].mean())) < 1e-5 and abs(float(x[0].square().mean()) - 1) < 1e-4
    torch.testing.assert_close(x[0], x[1], rtol=0, atol=1e-4)
