"""The input normalisation comes from the backbone: a timm model trained with mean = std = 0.5 is trained,
checkpointed and exported with those statistics, not ImageNet's."""

from __future__ import annotations

import json

import pytest
import torch
from fastai.callback.core import Callback

from cxrmem.config import MemoryConfig, ModelConfig
from cxrmem.experiment import train_main
from cxrmem.inference.export import main as export_main
from cxrmem.models.backbones import IMAGENET_STATS, input_stats
from cxrmem.models.net import build_model
from cxrmem.train.phases import load_checkpoint

from helpers import on_every_learner, run_cli

BACKBONE = "timm/test_resnet"  # timm's own test model: pretrained configuration mean = std = (0.5, 0.5, 0.5)
HALF = [0.5, 0.5, 0.5]

CONFIG = f"""
experiment_name: stats
model: {{backbone: {BACKBONE}, pretrained: false}}
memory: {{use_memory: false}}
data: {{image_size: 32, num_workers: 0, seed: 0, valid_pct: 0.25}}
phase1: {{filter_normal: false, batch_size: 16, use_lr_finder: false, base_lr: 0.001, freeze_epochs: 0,
         total_epochs: 1, early_stopping_patience: null}}
evaluation: {{bootstrap_resamples: 0}}
"""


class Inputs(Callback):
    """The first validation batch of images the loader hands the model (no augmentation there)."""

    def __init__(self, seen: list):
        self.seen = seen

    def before_batch(self):
        if not self.training and not self.seen:
            self.seen.append(self.learn.xb[0].detach().as_subclass(torch.Tensor).clone())


def test_the_backbones_statistics_are_read_from_its_own_configuration():
    assert input_stats(BACKBONE) == (tuple(HALF), tuple(HALF))
    assert input_stats("resnet18") == IMAGENET_STATS
    assert input_stats("timm/resnet10t") == IMAGENET_STATS


@pytest.mark.slow
def test_training_checkpoint_and_export_use_the_backbones_statistics(tmp_path, tiny_data, capsys, monkeypatch):
    seen = []
    on_every_learner(monkeypatch, lambda: Inputs(seen))
    config, run_dir = tmp_path / "stats.yaml", tmp_path / "run"
    config.write_text(CONFIG)
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir],
                             capsys)
    assert status == 0, err

    # the loader: grey pixels p/255 replicated to 3 channels, then (x - 0.5) / 0.5 -- ImageNet's per-channel
    # statistics would make the channels differ and the pixels fall off the 1/255 grid
    pixels = (seen[0] * 0.5 + 0.5) * 255
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    torch.testing.assert_close(pixels, pixels.round(), atol=2e-3, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2])

    state = torch.load(run_dir / "models" / "stats_phase1.pth", weights_only=True)
    assert state["input_mean"].tolist() == HALF and state["input_std"].tolist() == HALF

    out = tmp_path / "stats.torchscript.pt"
    status, _, err = run_cli(export_main, ["--run", run_dir, "--format", "torchscript", "--out", out], capsys)
    assert status == 0, err
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["mean"] == HALF and meta["std"] == HALF


def test_a_checkpoint_from_before_the_statistics_loads_with_imagenets(tmp_path):
    """Runs trained before checkpoints recorded the statistics were normalised with ImageNet's."""
    model = build_model(ModelConfig(backbone=BACKBONE, pretrained=False), MemoryConfig(use_memory=False))
    assert model.input_stats == (HALF, HALF)
    old = {k: v for k, v in model.state_dict().items() if k not in ("input_mean", "input_std")}
    torch.save(old, tmp_path / "old.pth")
    load_checkpoint(model, tmp_path / "old.pth")
    mean, std = model.input_stats
    assert mean == pytest.approx(IMAGENET_STATS[0]) and std == pytest.approx(IMAGENET_STATS[1])
