"""demo/demo.py on the real COCO sample, and the embedding / gate pictures it draws."""
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from maskattn_d2.utils.visualization import (
    ReadableVisualizer,
    colorbar_height,
    display_scale,
    drawn_size,
    embeddings_to_rgb,
    gate_probability_maps,
    render_gate_heatmaps,
)

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = REPO / "datasets" / "coco_panoptic_val2017_mini" / "val2017"
CONFIG = REPO / "configs" / "quick_schedules" / "synthetic_instant_test.yaml"
# The quick config predicts 6 classes of the synthetic data; the COCO sample has 133.
COCO_OPTS = [
    "DATASETS.TRAIN", "('coco_mini_panoptic_val',)",
    "DATASETS.TEST", "('coco_mini_panoptic_val',)",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133",
]
# synthetic_instant_test.yaml: gated mask attention at encoder stride 4 and decoder stride 2.
NUM_GATES = 2


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("maskattn_demo", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_png(path: Path) -> np.ndarray:
    """The picture as (H, W, 3) BGR, after checking it is a valid PNG file."""
    assert path.is_file(), f"missing {path.name}"
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    picture = cv2.imread(str(path))
    assert picture is not None, f"unreadable {path.name}"
    return picture


def test_demo_writes_every_picture_at_the_image_size(demo, tmp_path):
    images = sorted(COCO_IMAGES.glob("*.jpg"))
    assert len(images) == 3
    status = demo.main(
        ["--config-file", str(CONFIG), "--input", str(COCO_IMAGES), "--output", str(tmp_path),
         "--show-embeddings", "--show-gates", "--allow-random-weights", "--opts", *COCO_OPTS]
    )
    assert status == 0
    for image_path in images:
        original = cv2.imread(str(image_path))
        height, width = original.shape[:2]
        # 640 x 360..480: the shorter side is drawn at --min-size 512.
        scale = 512 / min(height, width)
        drawn = drawn_size(height, width, scale)
        for kind in ("panoptic", "instances", "semantic", "embeddings"):
            picture = _read_png(tmp_path / f"{image_path.stem}_{kind}.png")
            assert picture.shape == (*drawn, 3), kind
        # Drawings change the image (segments are painted over it).
        panoptic = _read_png(tmp_path / f"{image_path.stem}_panoptic.png")
        resized = cv2.resize(original, drawn[::-1], interpolation=cv2.INTER_NEAREST)
        assert np.abs(panoptic.astype(int) - resized.astype(int)).mean() > 1.0
        # Side by side: the image, then one panel per gate (at most 640 pixels wide), and
        # the colour-bar strip under them.
        gates = _read_png(tmp_path / f"{image_path.stem}_gates.png")
        panel_h, panel_w = drawn_size(height, width, min(scale, 640 / max(height, width)))
        assert gates.shape == (panel_h + colorbar_height(panel_h), (1 + NUM_GATES) * panel_w, 3)
    assert len(list(tmp_path.glob("*.png"))) == 3 * 5


def test_demo_overlay_gates_skips_unreadable_images(demo, tmp_path):
    corrupt = tmp_path / "inputs" / "broken.jpg"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not a JPEG")
    good = COCO_IMAGES / "000000039769.jpg"
    out = tmp_path / "out"
    status = demo.main(
        ["--config-file", str(CONFIG), "--input", str(good), str(corrupt), "--output", str(out),
         "--show-gates", "--gate-layout", "overlay", "--allow-random-weights", "--opts", *COCO_OPTS]
    )
    assert status == 1  # the corrupt image was skipped and reported
    height, width = cv2.imread(str(good)).shape[:2]
    panel_h, panel_w = drawn_size(height, width, 640 / max(height, width))
    gates = _read_png(out / "000000039769_gates.png")
    assert gates.shape == (panel_h + colorbar_height(panel_h), panel_w, 3)
    assert not list(out.glob("broken_*"))


def test_demo_writes_only_the_pictures_the_model_supports(demo, tmp_path):
    # No mask attention (plain UNet): no gates; instances turned off: no instances picture.
    status = demo.main(
        ["--config-file", str(CONFIG), "--input", str(COCO_IMAGES / "000000439180.jpg"),
         "--output", str(tmp_path), "--show-gates", "--allow-random-weights", "--opts", *COCO_OPTS,
         "MODEL.MASK_ATTN.ENCODER_SCALES", "[]", "MODEL.MASK_ATTN.DECODER_SCALES", "[]",
         "MODEL.MASK_ATTN_POSTPROCESS.INSTANCE_ON", "False"]
    )
    assert status == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "000000439180_panoptic.png", "000000439180_semantic.png"
    ]


def test_demo_rejects_missing_inputs_before_any_work(demo, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match="nope.jpg") as info:
        demo.collect_inputs([str(missing), str(tmp_path / "*.png"), str(COCO_IMAGES)])
    assert "pattern matches no file" in str(info.value)
    out = tmp_path / "out"
    status = demo.main(["--config-file", str(CONFIG), "--input", str(missing),
                        "--output", str(out)])
    assert status == 2
    assert not out.exists()


def test_collect_inputs_expands_folders_and_globs(demo):
    from_folder = demo.collect_inputs([str(COCO_IMAGES)])
    from_glob = demo.collect_inputs([str(COCO_IMAGES / "*.jpg"), str(from_folder[0])])
    assert len(from_folder) == 3 and from_folder == sorted(from_folder)
    assert from_glob == from_folder  # duplicates removed, order kept


def test_embeddings_to_rgb_gives_one_colour_per_cluster():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels = torch.zeros(16, 24, dtype=torch.long)
    labels[:, 8:16], labels[:, 16:] = 1, 2
    embeddings = centres[labels].permute(2, 0, 1) + 0.01 * torch.randn(8, 16, 24)
    picture = embeddings_to_rgb(embeddings, output_size=(32, 48))
    assert picture.shape == (32, 48, 3) and picture.dtype == np.uint8
    small = embeddings_to_rgb(embeddings)
    means = [small[labels.numpy() == k].astype(float).mean(axis=0) for k in range(3)]
    spreads = [small[labels.numpy() == k].astype(float).std(axis=0).max() for k in range(3)]
    for i in range(3):
        assert spreads[i] < 20
        for j in range(i + 1, 3):
            assert np.abs(means[i] - means[j]).max() > 100
    # Deterministic (seeded subset, fixed component signs).
    np.testing.assert_array_equal(small, embeddings_to_rgb(embeddings))
    with pytest.raises(ValueError, match="shape"):
        embeddings_to_rgb(torch.zeros(16, 24))


def test_embeddings_to_rgb_with_fewer_than_three_dimensions():
    embeddings = torch.linspace(-1, 1, 64).view(1, 8, 8)
    picture = embeddings_to_rgb(embeddings, clip_quantile=0.0)
    assert picture[..., 1:].max() == 0  # no second and third component
    assert picture[0, 0, 0] == 0 and picture[-1, -1, 0] == 255


def test_render_gate_heatmaps_layouts_and_colours():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    gates = {"enc4": torch.full((1, 10, 15), 8.0), "dec8": torch.full((1, 1, 5, 8), -8.0)}
    maps = gate_probability_maps(gates, (40, 60))
    assert maps["enc4"].shape == (40, 60) and float(maps["enc4"].min()) > 0.99
    side = render_gate_heatmaps(image, gates, alpha=1.0)
    assert side.shape == (40 + colorbar_height(40), 180, 3)
    # Below the label: gate ~1 is red (JET), gate ~0 is blue, the first panel is the image.
    red, blue = side[30, 60 + 30], side[30, 120 + 30]
    assert red[0] > 100 and red[2] < 50
    assert blue[2] > 100 and blue[0] < 50
    np.testing.assert_array_equal(side[30, 30], image[30, 30])
    overlay = render_gate_heatmaps(image, gates, layout="overlay", alpha=1.0, colorbar=False)
    assert overlay.shape == (40, 60, 3)
    with pytest.raises(ValueError, match="No gates"):
        render_gate_heatmaps(image, {})
    with pytest.raises(ValueError, match="layout"):
        render_gate_heatmaps(image, gates, layout="grid")
    with pytest.raises(ValueError, match="one image"):
        gate_probability_maps({"enc4": torch.zeros(2, 1, 4, 4)}, (8, 8))


def test_small_images_are_drawn_upscaled_and_huge_ones_capped(demo, tmp_path):
    """Issue 11 item 7: a 128-pixel image is drawn at 512 (labels no longer cover it), a
    4000x3000 one at 1600x1200 (it took 33 s, 4.2 GB and a 54 MB gates PNG at full size);
    --min-size 0 keeps the image size."""
    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "small.png"), rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    big = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (4000, 3000))
    cv2.imwrite(str(inputs / "big.jpg"), big)
    out = tmp_path / "out"
    args = ["--config-file", str(CONFIG), "--input", str(inputs), "--output", str(out),
            "--show-gates", "--allow-random-weights"]
    assert demo.main(args) == 0
    assert _read_png(out / "small_panoptic.png").shape == (512, 512, 3)
    assert _read_png(out / "big_panoptic.png").shape == (1200, 1600, 3)
    gates = _read_png(out / "big_gates.png")
    assert gates.shape == (480 + colorbar_height(480), (1 + NUM_GATES) * 640, 3)
    assert (out / "big_gates.png").stat().st_size < 5e6
    assert demo.main(args[:-2] + ["--allow-random-weights", "--min-size", "0",
                                  "--output", str(tmp_path / "plain")]) == 0
    assert _read_png(tmp_path / "plain" / "small_panoptic.png").shape == (128, 128, 3)
    assert display_scale(100, 200, min_size=512, max_size=800) == 4.0  # 400 x 800
    assert display_scale(100, 400, min_size=512, max_size=800) == 2.0  # capped by max


def test_demo_refuses_random_or_mismatched_weights(demo, tmp_path, caplog):
    """Issue 11 item 5: without weights, or with a checkpoint of another model, the demo
    stops (status 2, nothing written) unless --allow-random-weights."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from maskattn_d2 import add_maskattn_config
    from maskattn_d2.engine import AtomicCheckpointer

    image = str(COCO_IMAGES / "000000439180.jpg")
    out = tmp_path / "out"
    base = ["--config-file", str(CONFIG), "--input", image, "--output", str(out)]
    assert demo.main(base + ["--opts", *COCO_OPTS]) == 2
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    AtomicCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("six_classes")
    weights = str(tmp_path / "six_classes.pth")  # 6 classes; COCO_OPTS asks for 133
    assert demo.main(base + ["--weights", weights, "--opts", *COCO_OPTS]) == 2
    assert not out.exists()
    assert demo.main(base + ["--weights", weights, "--opts"]) == 0  # the config it fits


def test_labels_stay_inside_the_picture():
    """Labels of segments at the border were clipped ("circle 96%gle 95%"): the readable
    visualizer moves them inside, and sizes them for the drawn picture."""
    visualizer = ReadableVisualizer(np.zeros((128, 128, 3), np.uint8), None, scale=4.0)
    visualizer.draw_text("triangle 95%", (1, 127))
    visualizer.draw_text("circle 96%", (127, 0))
    figure = visualizer.output.fig
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for text in visualizer.output.ax.texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= 512 and box.y0 >= 0 and box.y1 <= 512, box
        assert box.y1 > 400 or box.x0 < 100  # still near where it was asked for
        assert 8 <= text.get_fontsize() <= 40  # points, on the 512-pixel picture


def test_gate_colours_are_stretched_and_have_a_colour_bar():
    """Gates of a trained model differ by a few hundredths: "stretch" spans each panel's own
    range (low blue, high red) and the colour bar under it shows that range."""
    image = np.full((60, 60, 3), 128, dtype=np.uint8)
    logits = torch.logit(torch.linspace(0.45, 0.55, 60).repeat(60, 1))  # 0.45 .. 0.55
    picture = render_gate_heatmaps(image, {"enc4": logits}, alpha=1.0)
    panel = picture[:60, 60:]
    assert panel[40, 2, 2] > 100 and panel[40, 2, 0] < 60  # left: blue
    assert panel[40, -3, 0] > 100 and panel[40, -3, 2] < 60  # right: red
    full = render_gate_heatmaps(image, {"enc4": logits}, alpha=1.0, value_range="full")
    spread_full = np.abs(full[40, 62].astype(int) - full[40, 117].astype(int)).max()
    spread_stretched = np.abs(picture[40, 62].astype(int) - picture[40, 117].astype(int)).max()
    assert spread_full < 120 and spread_stretched > 150
    bar = picture[60:, 60:]
    assert bar.shape[0] == colorbar_height(60)
    assert bar[2, 1, 2] > 100 and bar[2, -2, 0] > 100  # the bar runs blue -> red


@pytest.fixture(autouse=True, scope="module")
def _restore_sys_path():
    saved = list(sys.path)
    yield
    sys.path[:] = saved
