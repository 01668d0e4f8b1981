"""Shared fixtures: one tiny synthetic ChestX-ray14 per test session (helpers live in helpers.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny_config

os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test: one worker per core, so one thread per worker
    os.environ["OMP_NUM_THREADS"] = "1"    # and per process it starts (the variable is inherited)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """~60 patients (~200 images) of 32 px: the read-only reference data set of the session."""
    from cxrmem.data.synthetic import generate

    out = tmp_path_factory.mktemp("tiny") / "cxr14"
    generate(out, n_patients=60, size=32, seed=3, workers=1)
    return out


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny data set that a test may damage."""
    target = tmp_path / "cxr14"
    shutil.copytree(tiny_data, target)
    return target


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_data):
    """The tiny experiment trained once to the end: (config, run folder). Read only: a test that
    changes the folder works on a copy (``shutil.copytree``)."""
    from cxrmem.experiment import train_main

    tmp = tmp_path_factory.mktemp("finished")
    config = tiny_config(tmp / "tiny.yaml", train={"deterministic": True})
    run_dir = tmp / "run"
    assert train_main(["--config", str(config), "--data_dir", str(tiny_data), "--output_dir", str(run_dir)]) == 0
    return config, run_dir
