"""Tests of the semantic and embedding heads."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, build_sem_seg_head

from maskattn_d2.config import add_maskattn_config
from maskattn_d2.modeling.heads import (
    EMBED_HEAD_REGISTRY,
    MaskAttnEmbedHead,
    MaskAttnSemSegHead,
    build_embed_head,
    coordinate_channels,
)

SHAPES = {"dec1": ShapeSpec(channels=8, stride=1), "dec2": ShapeSpec(channels=16, stride=2)}


def _features(batch=2, size=32):
    torch.manual_seed(0)
    return {
        "dec1": torch.randn(batch, 8, size, size),
        "dec2": torch.randn(batch, 16, size // 2, size // 2),
    }


def _cfg():
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 12
    cfg.MODEL.EMBED_HEAD.CONVS_DIM = 12
    cfg.MODEL.EMBED_HEAD.EMBED_DIM = 5
    return cfg


def test_registries_contain_heads():
    assert "MaskAttnSemSegHead" in SEM_SEG_HEADS_REGISTRY
    assert "MaskAttnEmbedHead" in EMBED_HEAD_REGISTRY
    assert "obj(cfg, input_shape)" in EMBED_HEAD_REGISTRY.__doc__


@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_sem_seg_head_shapes(norm):
    head = MaskAttnSemSegHead(SHAPES, num_classes=5, in_feature="dec2", convs_dim=12, norm=norm)
    feats = _features()
    logits = head(feats)
    assert logits.shape == (2, 5, 16, 16)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_embed_head_is_unit_norm():
    head = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=6, convs_dim=12, norm="GN")
    emb = head(_features())["embeddings"]
    assert emb.shape == (2, 6, 32, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 32, 32), atol=1e-5, rtol=0)
    # Embeddings are not collapsed to one direction at initialisation.
    flat = emb.permute(0, 2, 3, 1).reshape(-1, 6)
    assert (flat @ flat.T).min() < 0.5


def test_embed_head_outputs_equal_its_three_predictors_applied_separately():
    # The head runs its three 1x1 predictors as one conv; each output must be the module's own.
    head = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=6, convs_dim=12, norm="GN")
    for layer in (head.offset_predictor, head.seed_predictor):
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    features = _features()
    outputs = head(features)
    x = torch.cat([features["dec1"], coordinate_channels(features["dec1"])], dim=1)
    hidden = head.head.conv(x)
    embeddings = torch.nn.functional.normalize(head.head.predictor(hidden), dim=1, eps=head.EPS)
    torch.testing.assert_close(outputs["embeddings"], embeddings)
    torch.testing.assert_close(outputs["offsets"], head.offset_predictor(hidden))
    torch.testing.assert_close(outputs["seed_logits"], head.seed_predictor(hidden))
    no_spatial = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=6, spatial=False)
    assert set(no_spatial(features)) == {"embeddings"}


def test_embed_head_zero_input_is_finite():
    head = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=4, norm="").eval()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    outputs = head({"dec1": torch.zeros(1, 8, 4, 4)})
    assert torch.isfinite(outputs["embeddings"]).all()


def test_heads_from_config():
    cfg = _cfg()
    sem = build_sem_seg_head(cfg, SHAPES)
    emb = build_embed_head(cfg, SHAPES)
    assert isinstance(sem, MaskAttnSemSegHead) and isinstance(emb, MaskAttnEmbedHead)
    assert sem.in_feature == "dec1" and sem.num_classes == 7
    assert sem.head.conv[0].out_channels == 12
    feats = _features(batch=1, size=16)
    assert sem(feats).shape == (1, 7, 16, 16)
    outputs = emb(feats)
    out = outputs["embeddings"]
    assert out.shape == (1, 5, 16, 16)
    # Spatial embeddings are on by default: offsets (dy, dx) and a seed map in [0, 1].
    assert outputs["offsets"].shape == (1, 2, 16, 16)
    assert outputs["seed_logits"].shape == (1, 1, 16, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 16, 16), atol=1e-5, rtol=0)


def test_unknown_names_and_features_raise():
    cfg = _cfg()
    cfg.MODEL.EMBED_HEAD.NAME = "NoSuchHead"
    with pytest.raises(KeyError):
        build_embed_head(cfg, SHAPES)
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["dec4"]
    with pytest.raises(ValueError, match="dec4"):
        build_sem_seg_head(cfg, SHAPES)
    with pytest.raises(ValueError, match="in_feature"):
        MaskAttnEmbedHead(SHAPES, in_features="enc1", embed_dim=4)


@pytest.mark.parametrize("coord_conv", [False, True])
def test_embed_head_coordinates_make_embeddings_position_dependent(coord_conv):
    """On a constant feature map, interior pixels get one embedding without coordinates and
    different embeddings with them (so identical objects at different places can separate)."""
    torch.manual_seed(0)
    head = MaskAttnEmbedHead(
        SHAPES, in_features="dec1", embed_dim=6, convs_dim=12, norm="", coord_conv=coord_conv
    ).eval()
    emb = head({"dec1": torch.ones(1, 8, 16, 16)})["embeddings"]
    a, b = emb[0, :, 4, 4], emb[0, :, 11, 11]  # two interior pixels
    if coord_conv:
        assert (a - b).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a, b)


def test_embed_head_spatial_outputs_start_neutral_and_learn():
    """Offsets and seed logits start at ~0 (seed map 0.5); all three outputs get gradients from one
    shared hidden conv, and without ``spatial`` only the embeddings exist."""
    head = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=4, convs_dim=12, spatial=True)
    outputs = head(_features())
    assert outputs["offsets"].abs().max() < 0.1
    assert outputs["seed_logits"].abs().max() < 0.1
    total = outputs["offsets"].sum() + outputs["seed_logits"].sum() + outputs["embeddings"].sum()
    total.backward()
    assert all(p.grad is not None for p in head.parameters())
    plain = MaskAttnEmbedHead(SHAPES, in_features="dec1", embed_dim=4, spatial=False)
    assert set(plain(_features())) == {"embeddings"}


@pytest.mark.parametrize("names", [[], ["dec1", "dec2"]])
def test_sem_seg_in_features_must_name_one_feature(names):
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = names
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.IN_FEATURES must name exactly one"):
        build_sem_seg_head(cfg, SHAPES)


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "MODEL.EMBED_HEAD.IN_FEATURES must name at least one"),
        (["dec2", "dec1"], "must have the smallest stride"),
        (["dec1", "dec4"], "add it to MODEL.MASK_ATTN_UNET.OUT_FEATURES"),
    ],
)
def test_embed_in_features_errors_name_the_problem(names, message):
    cfg = _cfg()
    cfg.MODEL.EMBED_HEAD.IN_FEATURES = names
    with pytest.raises(ValueError, match=message):
        build_embed_head(cfg, SHAPES)


def test_embed_head_reads_coarser_features_resized_to_the_first():
    """With IN_FEATURES [dec1, dec2] the hidden convs read dec1, dec2 resized bilinearly to
    dec1's size, then the coordinates; the outputs keep dec1's resolution, and dec2 changes
    them (so the coarser feature is read, not dropped)."""
    cfg = _cfg()
    cfg.MODEL.EMBED_HEAD.IN_FEATURES = ["dec1", "dec2"]
    head = build_embed_head(cfg, SHAPES).eval()
    assert head.in_features == ["dec1", "dec2"]
    assert head.head.conv[0].in_channels == 8 + 16 + 2
    features = _features()
    with torch.no_grad():
        outputs = head(features)
        dec2 = torch.nn.functional.interpolate(
            features["dec2"], size=(32, 32), mode="bilinear", align_corners=False
        )
        x = torch.cat([features["dec1"], dec2, coordinate_channels(features["dec1"])], dim=1)
        hidden = head.head.conv(x)
        torch.testing.assert_close(outputs["seed_logits"], head.seed_predictor(hidden))
        torch.testing.assert_close(outputs["offsets"], head.offset_predictor(hidden))
        changed = dict(features, dec2=features["dec2"] + 1.0)
        assert not torch.allclose(head(changed)["embeddings"], outputs["embeddings"])
    assert outputs["embeddings"].shape == (2, 5, 32, 32)


def test_embed_head_num_convs_widens_what_each_output_sees():
    """NUM_CONVS stacks 3x3 conv-norm-ReLU layers: with two, an input pixel reaches outputs two
    pixels away (one with a single conv); the outputs keep their shapes."""
    cfg = _cfg()
    cfg.MODEL.EMBED_HEAD.NORM = ""
    reach = {}
    for num_convs in (1, 2):
        cfg.MODEL.EMBED_HEAD.NUM_CONVS = num_convs
        head = build_embed_head(cfg, SHAPES).eval()
        convs = [m for m in head.head.conv.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3)] * num_convs
        assert convs[-1].out_channels == 12
        torch.manual_seed(0)
        features = {"dec1": torch.randn(1, 8, 15, 15, requires_grad=True)}
        outputs = head(features)
        assert outputs["offsets"].shape == (1, 2, 15, 15)
        # Which input pixels the seed logit at the centre depends on.
        outputs["seed_logits"][0, 0, 7, 7].backward()
        touched = torch.nonzero(features["dec1"].grad.abs().sum(dim=(0, 1)) > 0)
        reach[num_convs] = int((touched - 7).abs().max())
    assert reach == {1: 1, 2: 2}
    cfg.MODEL.EMBED_HEAD.NUM_CONVS = 0
    with pytest.raises(ValueError, match="NUM_CONVS"):
        build_embed_head(cfg, SHAPES)


def test_seed_map_starts_at_the_prior_of_its_loss():
    """The focal seed loss starts from CenterNet's prior, 0.1 everywhere (at 0.5 its many
    background terms would swamp the other losses); the cross-entropy from 0.5."""
    cfg = _cfg()
    features = {"dec1": torch.randn(1, 8, 6, 6)}
    for loss, prior in (("bce", 0.5), ("focal", 0.1)):
        cfg.MODEL.EMBED_HEAD.SEED_LOSS = loss
        head = build_embed_head(cfg, SHAPES).eval()
        seed_map = torch.sigmoid(head(features)["seed_logits"])
        torch.testing.assert_close(seed_map, torch.full_like(seed_map, prior), atol=0.01, rtol=0)
