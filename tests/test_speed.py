"""Speed settings: cuDNN's kernel choice from train.deterministic, the mixed precision of model.precision in
training and evaluation, and the non-finite-loss check placed where fastai reads the loss anyway."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cxrmem.config import ModelConfig, from_dict
from cxrmem.train import speed

CUDA = torch.device("cuda")  # a device object; nothing here runs on it


@pytest.mark.parametrize("deterministic", [True, False])
def test_seed_run_seeds_every_generator_and_sets_cudnn(deterministic, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", not deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", deterministic)
    speed.seed_run(5, deterministic)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)
    speed.seed_run(5, deterministic)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_deterministic_is_off_by_default_and_reaches_the_training_seed(monkeypatch):
    assert from_dict({}).train.deterministic is False
    from cxrmem.train import phases

    seen = []

    def record(seed, deterministic):
        seen.append((seed, deterministic))
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(speed, "seed_run", record)
    for value in (True, False):
        cfg = from_dict({"seed": 9, "train": {"deterministic": value}})
        with pytest.raises(KeyboardInterrupt):
            phases.train(cfg, frame=None, device=torch.device("cpu"))
    assert seen == [(9, True), (9, False)]


@pytest.mark.parametrize(("precision", "bf16", "expected"), [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float16), ("fp16", True, torch.float16),
    ("bf16", False, torch.bfloat16), ("fp32", True, None)])
def test_precision_on_cuda_and_always_fp32_on_the_cpu(precision, bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    model_cfg = ModelConfig(precision=precision)
    assert speed.autocast_dtype(model_cfg, CUDA) == expected
    assert speed.autocast_dtype(model_cfg, torch.device("cpu")) is None
    assert speed.uses_channels_last(ModelConfig(channels_last="auto"), CUDA)
    assert not speed.uses_channels_last(ModelConfig(channels_last="false"), CUDA)
    assert not speed.uses_channels_last(ModelConfig(channels_last="true"), torch.device("cpu"))


def test_evaluation_runs_under_the_autocast_of_training(tiny_data, monkeypatch):
    """The CPU stands in for a GPU whose training ran in bfloat16: every evaluation forward pass, in the
    report's predictions and in cxrmem-predict's network, is under that autocast; probabilities come out float32."""
    from cxrmem.data.prepare import prepare_data
    from cxrmem.models.net import build_model
    from cxrmem.inference.network import TorchNetwork
    from cxrmem.train.split_predictions import predict_splits

    monkeypatch.setattr(speed, "autocast_dtype", lambda model_cfg, device: torch.bfloat16)
    cfg = from_dict({"model": {"backbone": "resnet18", "pretrained": False}, "memory": {"bank_size": 8},
                     "data": {"data_dir": str(tiny_data), "image_size": 32, "num_workers": 0},
                     "phase1": {"batch_size": 16}, "phase2": None, "evaluation": {"bootstrap_resamples": 0}})
    frame = prepare_data(cfg).frame
    model = build_model(cfg.model, cfg.memory)
    under = []
    model.register_forward_hook(lambda module, args, output: under.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype)))
    out = predict_splits(cfg, model, frame, torch.device("cpu"))
    assert under and all(entry == (True, torch.bfloat16, torch.bfloat16) for entry in under)
    assert out["test"][0].dtype == np.float32 and np.isfinite(out["test"][0]).all()
    under.clear()
    logits = TorchNetwork(model, torch.device("cpu"), cfg.model)(torch.randn(2, 3, 32, 32))
    assert under == [(True, torch.bfloat16, torch.bfloat16)] and logits.dtype == np.float32
