"""Flip test-time augmentation: views flipped back (offsets with their signs), averaged; the
config keys; the model's inference with it equals the average of flipped inputs run by hand."""
import pytest
import torch

from detectron2.modeling import build_model

from maskattn_d2.modeling.test_time_flips import flip_views_from_config, run_with_flips

from .test_meta_arch import small_cfg

ALL_VIEWS = ("horizontal", "vertical", "both")


def _equivariant_network(images):
    """Outputs that follow the image content exactly: logits and seeds from the pixels,
    offsets (dy, dx) from each pixel to the image's intensity-weighted centroid."""
    n, _, h, w = images.shape
    intensity = images[:, 0]
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(n, h, w)
    mass = intensity.sum(dim=(1, 2)).view(n, 1, 1)
    cy = (intensity * ys).sum(dim=(1, 2)).view(n, 1, 1) / mass
    cx = (intensity * xs).sum(dim=(1, 2)).view(n, 1, 1) / mass
    offsets = torch.stack([cy - ys, cx - xs], dim=1)
    logits = torch.stack([intensity, -intensity], dim=1)
    return logits, {"offsets": offsets, "seed_logits": images[:, :1] * 2.0,
                    "embeddings": images[:, :2].clone()}


@pytest.mark.parametrize("views", [("horizontal",), ("vertical",), ALL_VIEWS])
def test_flips_of_an_equivariant_network_change_nothing(views):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 12, 17, generator=g)  # odd width: no symmetric centre column
    expected_logits, expected = _equivariant_network(images)
    logits, outputs = run_with_flips(_equivariant_network, images, views)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert outputs.keys() == expected.keys()
    for name in expected:  # a wrong offset sign would be off by up to the image size
        assert torch.allclose(outputs[name], expected[name], atol=1e-4), name


def test_flip_average_of_a_fixed_pattern_against_hand_values():
    """A network that ignores its input: a column ramp and constant offsets (dy, dx) = (1, 2)."""
    h, w = 4, 5

    def fixed(images):
        n = images.shape[0]
        ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        offsets = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(n, 2, h, w)
        return ramp, {"offsets": offsets}

    images = torch.zeros(3, 3, h, w)
    logits, outputs = run_with_flips(fixed, images, ("horizontal",))
    assert logits.shape == (3, 1, h, w)
    assert torch.allclose(logits, torch.full_like(logits, (w - 1) / 2))
    assert torch.allclose(outputs["offsets"][:, 0], torch.ones(3, h, w))  # dy kept
    assert torch.allclose(outputs["offsets"][:, 1], torch.zeros(3, h, w))  # dx cancels
    _, outputs = run_with_flips(fixed, images, ("vertical",))
    assert torch.allclose(outputs["offsets"][:, 0], torch.zeros(3, h, w))
    assert torch.allclose(outputs["offsets"][:, 1], torch.full((3, h, w), 2.0))
    logits, outputs = run_with_flips(fixed, images, ALL_VIEWS)
    assert torch.allclose(logits, torch.full_like(logits, (w - 1) / 2))
    assert torch.allclose(outputs["offsets"], torch.zeros(3, 2, h, w))


def test_unknown_view_is_rejected():
    with pytest.raises(ValueError, match="unknown flip views.*diagonal"):
        run_with_flips(_equivariant_network, torch.rand(1, 3, 4, 4), ("diagonal",))


def test_model_rejects_an_unknown_flip_view():
    from maskattn_d2.modeling.meta_arch import MaskAttnUNet

    kwargs = MaskAttnUNet.from_config(small_cfg())
    with pytest.raises(ValueError, match="test_flips.*transpose"):
        MaskAttnUNet(**dict(kwargs, test_flips=("transpose",)))


def test_flip_views_from_config_keys():
    cfg = small_cfg()
    assert flip_views_from_config(cfg) == ()  # detectron2's default: TEST.AUG disabled
    cfg.TEST.AUG.ENABLED = True
    assert flip_views_from_config(cfg) == ("horizontal",)  # detectron2's FLIP defaults to True
    cfg.TEST.AUG.VERTICAL_FLIP = True
    assert flip_views_from_config(cfg) == ALL_VIEWS
    cfg.TEST.AUG.FLIP = False
    assert flip_views_from_config(cfg) == ("vertical",)
    cfg.TEST.AUG.VERTICAL_FLIP = False
    with pytest.raises(ValueError, match="TEST.AUG.FLIP nor TEST.AUG.VERTICAL_FLIP"):
        flip_views_from_config(cfg)


def test_model_inference_with_flips_equals_flipped_inputs_by_hand():
    torch.manual_seed(0)
    plain = build_model(small_cfg()).eval()
    cfg = small_cfg(**{"TEST.AUG.ENABLED": True, "TEST.AUG.VERTICAL_FLIP": True})
    augmented = build_model(cfg).eval()
    augmented.load_state_dict(plain.state_dict())
    assert augmented.test_flips == ALL_VIEWS
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(2)]
    with torch.no_grad():
        logits, heads = augmented.inference([{"image": im} for im in images], do_postprocess=False)
        runs = []
        for dims in [(), (2,), (1,), (1, 2)]:
            flipped = [{"image": im.flip(dims) if dims else im} for im in images]
            view_logits, view_heads = plain.inference(flipped, do_postprocess=False)
            back = [d + 1 for d in dims]  # image dims -> batch dims
            view_logits = view_logits.flip(back) if dims else view_logits
            view_heads = {k: v.flip(back) if dims else v for k, v in view_heads.items()}
            if dims:
                view_heads["offsets"] = view_heads["offsets"] * torch.tensor(
                    [-1.0 if 1 in dims else 1.0, -1.0 if 2 in dims else 1.0]
                ).view(1, 2, 1, 1)
            runs.append((view_logits, view_heads))
    assert torch.allclose(logits, sum(r[0] for r in runs) / 4, atol=1e-4)
    for name, value in heads.items():
        assert torch.allclose(value, sum(r[1][name] for r in runs) / 4, atol=1e-4), name
    # The standard outputs are built from the averaged maps.
    with torch.no_grad():
        results = augmented([{"image": im} for im in images])
    assert len(results) == 2 and {"sem_seg", "instances", "panoptic_seg"} <= results[0].keys()
