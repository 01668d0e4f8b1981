"""The README's two commands, as the Makefile runs them (with a stand-in python, so nothing trains)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from helpers import ROOT


@pytest.fixture
def fake_python(tmp_path):
    """A bin/ folder whose python prints the arguments it was given, and a stamp that says "installed"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text('#!/bin/sh\necho "python $*"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    stamp = tmp_path / "installed"
    stamp.touch()
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml: make must not install anything
    return bin_dir, stamp


def make_demo(fake_python, run_dir):
    bin_dir, stamp = fake_python
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "demo", f"BIN={bin_dir}", f"STAMP={stamp}",
                           f"DEMO_RUN={run_dir}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_trains_resumes_or_reprints_as_the_run_folder_says(fake_python, tmp_path):
    run_dir = tmp_path / "runs" / "demo_synthetic"
    out = make_demo(fake_python, run_dir)  # nothing there: train
    assert "python train.py --config configs/experiments/demo_synthetic.yaml" in out and "--resume" not in out

    (run_dir / "models").mkdir(parents=True)
    (run_dir / "models" / "demo_synthetic_resume.pth").write_bytes(b"x")
    out = make_demo(fake_python, run_dir)  # interrupted: continue it
    assert "continuing the interrupted demo" in out and out.rstrip().endswith("--resume")

    (run_dir / "models" / "demo_synthetic_resume.pth").unlink()
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "report.md").write_text("# demo_synthetic\nmean AUC 0.9\n")
    out = make_demo(fake_python, run_dir)  # finished: its report, no training
    assert "holds the finished demo" in out and "mean AUC 0.9" in out and "python" not in out


def test_make_demo_installs_what_the_demo_uses_and_make_test_adds_the_test_extras(tmp_path):
    def planned(target):
        done = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if "pip install" in line]

    demo = planned("demo")
    assert any("torch==" in line for line in demo)  # the tested torch pin stays
    assert any("-e '.[explain]'" in line for line in demo)
    assert not any("[test]" in line or "mlflow" in line or "onnx" in line for line in demo)
    assert any("-e '.[test]'" in line for line in planned("test"))


def test_the_readme_names_the_cpu_build_of_the_pinned_torch():
    import re

    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH\s+\?=\s+(.+)$", makefile, re.M).group(1).split()
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "download.pytorch.org/whl/cpu" in l)
    assert line.startswith("make demo TORCH=")
    assert all(pin in line for pin in pinned), (pinned, line)  # the same versions as the CUDA default
