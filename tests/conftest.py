"""Shared fixtures: one tiny synthetic ChestX-ray14 per test session, and helpers to run the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


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


def check_data(data_dir, run_dir, capsys, *options):
    """``train.py --check-data`` of the demo config on ``data_dir``: (printed report, data_summary.json)."""
    import json

    from cxrmem.experiment import train_main

    status, out, err = run_cli(train_main, ["--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_dir,
                                            "--output_dir", run_dir, "--set", "data.synthetic=null",
                                            "--check-data", *options], capsys)
    assert status == 0, err
    return out, json.loads((Path(run_dir) / "data_summary.json").read_text())


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


def run_cli(main, argv, capsys):
    """Run an entry point in-process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err
