"""Grad-CAM heatmaps through the whole network (memory bank included), overlays, and the pointing game
of a run, checked against a Grad-CAM written out by hand with autograd and against the box file."""

from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cxrmem.inference import explain
from cxrmem.experiment import train_main
from cxrmem.config import load_config
from cxrmem.data.chestxray14 import load_frame, read_bboxes
from cxrmem.data.findings import FINDINGS
from cxrmem.utils.errors import UserError
from cxrmem.models.net import build_model
from cxrmem.evaluation.localisation import pointing_game
from cxrmem.models.backbones import IMAGENET_STATS

from helpers import run_cli, tiny_config

NODULE, MASS = FINDINGS.index("Nodule"), FINDINGS.index("Mass")
MEMORY = SimpleNamespace(use_memory=True, bank_size=16, update_strategy="fifo", top_k=3, normalize_retrieved="both",
                         memory_momentum=0.9, self_match_threshold=0.99, rarity_threshold=0.1, diversity_weight=0.5)


def model_config(backbone="resnet18"):
    return SimpleNamespace(backbone=backbone, pretrained=False, weights=None, num_classes=14, dropout_rate=0.2)


@pytest.fixture(scope="module")
def net():
    """A resnet18 classifier whose bank holds a few batches (written in training mode)."""
    torch.manual_seed(0)
    model = build_model(model_config(), MEMORY)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 3, 96, 96))
    assert int(model.bank.filled) > 0
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def grad_cam_by_hand(model, images, cls):
    """Grad-CAM at layer4: alpha_k = mean_ij dy/dA^k_ij, L = ReLU(sum_k alpha_k A^k), resized bilinearly
    (torch's interpolate, half-pixel centres) to the input size, then scaled to [0, 1]."""
    model.eval()
    store = {}
    handle = model.body.layer4.register_forward_hook(lambda m, i, out: store.setdefault("A", out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    grads = torch.autograd.grad(logits[:, cls].sum(), store["A"])[0]
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * store["A"]).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return (cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)).numpy()


# ---- grad_cam ------------------------------------------------------------------------------------------

def test_heatmaps_have_the_contract_shape_and_range(net, images):
    maps = explain.grad_cam(net, images, [NODULE, MASS, 0])
    assert maps.shape == (3, 3, 96, 96) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    peaks = maps.reshape(9, -1).max(axis=1)
    assert (np.isclose(peaks, 1.0, atol=1e-5) | (peaks == 0.0)).all()  # scaled per map, or ReLU left nothing
    assert (peaks > 0).sum() >= 6


def test_heatmaps_are_grad_cam_of_the_whole_network(net, images):
    maps = explain.grad_cam(net, images, [NODULE, MASS])
    for k, cls in enumerate([NODULE, MASS]):
        np.testing.assert_allclose(maps[:, k], grad_cam_by_hand(net, images.clone(), cls), atol=2e-3)


def test_the_memory_bank_takes_part(net, images):
    without_bank = copy.deepcopy(net)
    without_bank.bank = None
    with_it = explain.grad_cam(net, images, [NODULE])
    without = explain.grad_cam(without_bank, images, [NODULE])
    assert np.abs(with_it - without).max() > 0.05  # retrieval changes the gradients that weigh the maps
    np.testing.assert_allclose(without[:, 0], grad_cam_by_hand(without_bank, images.clone(), NODULE), atol=2e-3)


def test_a_batch_mixing_classes_equals_one_class_at_a_time(net, images):
    mixed = explain.grad_cam_pairs(net, images, [NODULE, MASS, NODULE], batch_size=2)
    per_class = explain.grad_cam(net, images, [NODULE, MASS])
    np.testing.assert_allclose(mixed, per_class[[0, 1, 2], [0, 1, 0]], atol=1e-5)


def test_heatmaps_leave_bank_weights_and_mode_as_they_were(net, images):
    model = copy.deepcopy(net).train()
    model.body.layer1.requires_grad_(False)
    buffers = {name: b.clone() for name, b in model.bank.named_buffers()}
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    explain.grad_cam(model, images, [NODULE, MASS])
    for name, b in model.bank.named_buffers():
        assert torch.equal(b, buffers[name]), name  # the bank is read, never written
    for name, p in model.state_dict().items():
        assert torch.equal(p, weights[name]), name  # batch-norm statistics too: eval mode
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backbone, layer", [
    ("resnet18", lambda body: body.layer4),
    ("efficientnet_v2_s", lambda body: body.features[-1]),
    ("densenet121", lambda body: body.features.denseblock4),
    ("timm/resnet10t", lambda body: body.model.layer4),
    ("timm/mobilenetv3_small_050", lambda body: body.model.blocks),  # its conv_head runs after pooling
])
def test_the_target_is_the_last_convolutional_block(backbone, layer):
    torch.manual_seed(0)
    model = build_model(model_config(backbone)).eval()
    assert explain.target_layer(model, torch.randn(1, 3, 128, 128)) is layer(model.body)
    maps = explain.grad_cam(model, torch.randn(2, 3, 128, 128), [NODULE, MASS])
    assert maps.shape == (2, 2, 128, 128)
    # a map over the 4 x 4 feature grid (a map of a pooled 1 x 1 layer is constant, hence 0 everywhere)
    assert max(np.ptp(m) for m in maps.reshape(4, -1)) > 0.5


@pytest.mark.parametrize("backbone", ["timm/test_vit", "timm/test_mambaout"])
def test_a_backbone_without_a_channels_first_map_is_refused_in_one_line(backbone):
    model = build_model(model_config(backbone))
    with pytest.raises(UserError, match="convolutional backbone") as info:
        explain.grad_cam(model, torch.randn(1, 3, 64, 64), [NODULE])
    assert "\n" not in str(info.value)


def test_missing_grad_cam_package_names_the_install(net, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'cxrmem\[explain\]'") as info:
        explain.grad_cam(net, images, [NODULE])
    assert "\n" not in str(info.value)


# ---- images and overlays -------------------------------------------------------------------------------

def test_prepared_images_are_what_evaluation_feeds_the_network(tiny_data):
    from cxrmem.data.loaders import build_dataloaders

    frame, _, _ = load_frame(tiny_data, valid_pct=0.25, seed=0)
    frame = frame.assign(is_valid=frame["split"] != "train")
    rows = frame[frame["split"] == "test"].head(5)
    data_cfg = SimpleNamespace(image_size=40, num_workers=0, augment=True)
    dls = build_dataloaders(frame, data_cfg, 5, torch.device("cpu"), IMAGENET_STATS)
    batch = dls.test_dl(rows, with_labels=True, bs=5).one_batch()[0]
    torch.testing.assert_close(explain.prepare_images(list(rows["path"]), 40, IMAGENET_STATS), batch.as_subclass(torch.Tensor))


def test_overlay_is_the_heatmap_blended_over_the_image(tmp_path):
    from matplotlib import colormaps

    image = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (64, 1))  # [H=64, W=48]
    heatmap = np.zeros((4, 3), np.float32)
    heatmap[0, 2] = 1.0  # hot top right corner
    pixels = explain.overlay(image, heatmap).astype(float)
    assert pixels.shape == (64, 48, 3)
    cold = 255 * ((1 - explain.OVERLAY_ALPHA) * image[-1, 10] / 255
                  + explain.OVERLAY_ALPHA * np.array(colormaps[explain.OVERLAY_COLORMAP](0.0)[:3]))
    np.testing.assert_allclose(pixels[-1, 10], cold, atol=1.0)  # bottom left: heatmap 0
    assert pixels[0, -1, 0] > pixels[0, -1, 2] + 50  # top right: red of the hot end
    assert pixels[-1, 10, 2] > pixels[-1, 10, 0] + 50  # bottom left: blue of the cold end


def test_a_saved_overlay_carries_its_caption_and_colour_scale(tmp_path):
    image = np.full((32, 32), 128, np.uint8)
    heatmap = np.zeros((2, 2), np.float32)
    heatmap[0, 0] = 1.0
    path = tmp_path / "out" / "a_Effusion.png"
    explain.save_overlay(image, heatmap, path, "Effusion: p = 0.830, positive at threshold 0.410",
                         {"finding": "Effusion", "probability": "0.83"})
    assert not list(path.parent.glob("*.tmp"))
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.text["finding"] == "Effusion" and png.text["probability"] == "0.83"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB")).astype(int)
    assert min(width, height) >= explain.OVERLAY_MIN_SIDE  # a 32 px image is drawn large enough to read
    assert width > height  # the colour scale sits beside the image
    scale_strip = pixels[height // 4: 3 * height // 4, width - 110: width - 80]
    reds = (scale_strip[..., 0] > 200) & (scale_strip[..., 2] < 80)
    blues = (scale_strip[..., 2] > 200) & (scale_strip[..., 0] < 80)
    assert reds.any() and blues.any()  # both ends of the colour scale are drawn
    caption_rows = pixels[:30, : width - 120]
    assert (caption_rows.sum(axis=-1) < 300).any()  # dark text above the image


# ---- the pointing game of a run --------------------------------------------------------------------------

def test_pointing_game_pools_chunks_exactly(net, tiny_data):
    frame, _, _ = load_frame(tiny_data, valid_pct=0.25, seed=0)
    boxes = read_bboxes(tiny_data)
    assert len(boxes) > 4
    chunked = explain.grad_cam_pointing_game(net, frame, boxes, image_size=96, batch_size=3)
    paths = dict(zip(frame["image_index"], frame["path"]))
    maps = explain.grad_cam_pairs(net, explain.prepare_images([paths[n] for n in boxes["image_index"]], 96, net.input_stats),
                                  [FINDINGS.index(f) for f in boxes["finding"]])
    whole = pointing_game(maps, boxes[list("xywh")].to_numpy(), list(boxes["finding"]))
    assert list(chunked) == [f for f in FINDINGS if f in whole]
    for finding, result in whole.items():
        assert chunked[finding]["n_boxes"] == result["n_boxes"]
        assert chunked[finding]["hit_rate"] == pytest.approx(result["hit_rate"])
        assert chunked[finding]["chance_rate"] == pytest.approx(result["chance_rate"])


def test_evaluate_writes_localisation_into_metrics(tiny_data, tmp_path, capsys):
    config = tiny_config(tmp_path / "tiny.yaml", experiment_name="tiny_eval", data={"image_size": 128},
                         phase1={"freeze_epochs": 0}, phase2=None)
    cfg = load_config(config, [], data_dir=str(tiny_data), output_dir=str(tmp_path / "run"))
    checkpoint = tmp_path / "untrained.pth"
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.memory).state_dict(), checkpoint)
    status, out, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir",
                                            tmp_path / "run", "--evaluate", "--model_path", checkpoint], capsys)
    assert status == 0, err
    metrics = json.loads((tmp_path / "run" / "evaluations" / "untrained" / "metrics.json").read_text())
    assert "localisation" not in metrics["valid"]  # the synthetic set boxes test images only
    localisation = metrics["test"]["localisation"]
    boxes = read_bboxes(tiny_data)
    assert list(localisation) == [f for f in FINDINGS if f in set(boxes["finding"])]
    for finding, result in localisation.items():
        mine = boxes[boxes["finding"] == finding]
        assert result["n_boxes"] == len(mine)
        assert 0.0 <= result["hit_rate"] <= 1.0
        assert result["chance_rate"] == pytest.approx((mine["w"] * mine["h"]).mean() / 1024 ** 2)
    assert "Pointing game (test" in out and "Mean AUC Score" in out


def run_config(data_dir, image_size):
    """The keys of a run's config the pointing game reads."""
    return SimpleNamespace(data=SimpleNamespace(data_dir=data_dir, image_size=image_size, dataset="chestxray14",
                                                datasets=[]),
                           model=SimpleNamespace(findings=None, num_classes=None), evaluation_batch_size=8)


def test_without_grad_cam_a_run_warns_and_skips_the_pointing_game(net, tiny_data, monkeypatch):
    frame, _, _ = load_frame(tiny_data, valid_pct=0.25, seed=0)
    cfg = run_config(tiny_data, 128)
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.warns(UserWarning, match="pointing game skipped.*cxrmem\\[explain\\]"):
        assert explain.pointing_game_of_run(cfg, net, frame) == {}


def test_a_map_too_coarse_for_the_boxes_skips_the_game_and_says_why(net, tiny_data, capsys):
    """resnet18 maps are image_size / 32 cells across; the tiny set's median box side is 169 px of 1024."""
    frame, _, _ = load_frame(tiny_data, valid_pct=0.25, seed=0)
    boxes = read_bboxes(tiny_data)
    side = float(np.median(np.sqrt(boxes["w"] * boxes["h"])))
    for size in (64, 96, 128, 160):  # cells of 512, 341, 256, 205 px
        cell = 1024 / (size // 32)
        assert (explain.too_coarse(net, size, boxes) is not None) == (cell > 2 * side), size
    cfg = run_config(tiny_data, 64)
    assert explain.pointing_game_of_run(cfg, net, frame) == {}
    out = capsys.readouterr().out
    assert "pointing game skipped: the Grad-CAM map is 2 x 2 cells at 64 px" in out and "data.image_size" in out


# ---- the demo check: a model trained by the test, its pointing game -------------------------------------

DEMO = """
experiment_name: demo_boxes
model: {backbone: timm/test_resnet, pretrained: false}
memory: {use_memory: true, bank_size: 64, top_k: 3, update_strategy: rarity, rarity_threshold: 0.1}
data: {image_size: 160, num_workers: 0, seed: 0, valid_pct: 0.25}
phase1: {batch_size: 32, use_lr_finder: false, base_lr: 0.004, freeze_epochs: 0, total_epochs: 1}
phase2: {batch_size: 32, epochs: 9, lr_min: 0.003, lr_max: 0.003, filter_normal: false,
         early_stopping_patience: null}
evaluation: {bootstrap_resamples: 20}
"""


def _lesions_and_as_many_normals(rows: list[str], cap: int | None = None) -> list[str]:
    labels = [row.split(",")[1].split("|") for row in rows]
    lesions = [row for row, found in zip(rows, labels) if {"Nodule", "Mass"} & set(found)][:cap]
    normals = [row for row, found in zip(rows, labels) if found == ["No Finding"]][: len(lesions)]
    return lesions + normals


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo-like run on a synthetic set kept to its Nodule and Mass images and as many normal ones:
    800 train_val images and every such test image (290, with 85 Nodule and 73 Mass boxes), 160 px
    (a 5 x 5 Grad-CAM grid), two phases, 10 epochs (after 6 the model hits no Nodule box yet);
    about a minute on two cores."""
    from cxrmem.data.synthetic import generate

    root = tmp_path_factory.mktemp("demo_boxes")
    data = root / "cxr14"
    generate(data, 1600, size=128, seed=0, workers=2)
    test_names = set((data / "test_list.txt").read_text().split())
    csv_path = data / "Data_Entry_2017.csv"
    header, *rows = csv_path.read_text().splitlines()
    in_test = [row.split(",")[0] in test_names for row in rows]
    train_val = _lesions_and_as_many_normals([r for r, t in zip(rows, in_test) if not t], cap=400)
    test = _lesions_and_as_many_normals([r for r, t in zip(rows, in_test) if t])
    csv_path.write_text("\n".join([header, *train_val, *test]) + "\n")
    config = root / "demo.yaml"
    config.write_text(DEMO)
    run_dir = root / "run"
    assert train_main(["--config", str(config), "--data_dir", str(data), "--output_dir", str(run_dir)]) == 0
    return data, config, run_dir


@pytest.mark.slow
def test_a_training_run_plays_the_pointing_game_on_its_final_model(demo_run):
    data, config, run_dir = demo_run
    cfg = load_config(config, [], data_dir=str(data), output_dir=str(run_dir))
    localisation = json.loads((run_dir / "metrics.json").read_text())["test"]["localisation"]
    frame, _, _ = load_frame(data, cfg.data.valid_pct, cfg.data.seed)
    test = frame[frame["split"] == "test"]
    boxes = read_bboxes(data)
    boxes = boxes[boxes["image_index"].isin(test["image_index"])].reset_index(drop=True)
    assert {"Nodule", "Mass"} <= set(localisation)

    from cxrmem.train.phases import checkpoint_path, load_checkpoint

    model = build_model(cfg.model, cfg.memory)
    load_checkpoint(model, checkpoint_path(cfg, 2))
    paths = dict(zip(test["image_index"], test["path"]))
    maps = explain.grad_cam_pairs(model, explain.prepare_images([paths[n] for n in boxes["image_index"]], 160, model.input_stats),
                                  [FINDINGS.index(f) for f in boxes["finding"]])
    expected = pointing_game(maps, boxes[list("xywh")].to_numpy(), list(boxes["finding"]))
    assert set(localisation) == set(expected)
    for finding, result in expected.items():
        assert localisation[finding]["n_boxes"] == result["n_boxes"]
        assert localisation[finding]["hit_rate"] == pytest.approx(result["hit_rate"])
        assert localisation[finding]["chance_rate"] == pytest.approx(result["chance_rate"])
    print("pointing game:", {f: localisation[f] for f in ("Nodule", "Mass")})


@pytest.mark.slow
def test_demo_model_points_at_nodules_and_masses_well_above_chance(demo_run):
    from scipy.stats import binom

    _, _, run_dir = demo_run
    localisation = json.loads((run_dir / "metrics.json").read_text())["test"]["localisation"]
    results = [localisation[finding] for finding in ("Nodule", "Mass")]
    for finding, r in zip(("Nodule", "Mass"), results):
        assert r["hit_rate"] > 5 * r["chance_rate"], (finding, r)
    # Jointly: a nodule box is a few cells of the 5 x 5 map at most, so Nodule alone gets only a handful of
    # hits (9 of 85 boxes, chance 0.0044, with today's training); Nodule and Mass together must be far
    # beyond chance. P(>= hits by chance): boxes differ in area, so the count is Poisson-binomial; for counts
    # above its mean the binomial of the same mean has the heavier tail (Hoeffding 1956): conservative.
    hits = sum(round(r["hit_rate"] * r["n_boxes"]) for r in results)
    boxes = sum(r["n_boxes"] for r in results)
    chance = sum(r["chance_rate"] * r["n_boxes"] for r in results) / boxes
    assert binom.sf(hits - 1, boxes, chance) < 1e-3, results
