"""Figures: each plot function writes one valid PNG; failures become warnings; plot_run on fake run folders."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cxrmem import plots

LABELS = ["Atelectasis", "Edema", "Hernia"]


def assert_png(path):
    """The file exists, PIL reads it as a PNG with a non-empty RGB(A) image."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0
        assert image.mode in ("RGB", "RGBA")
        image.verify()


def no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


HISTORY1 = """stage,epoch,train_loss,valid_loss,valid_auc,memory_fill,memory_moved,time
frozen,0,0.70,0.68,0.55,0.5,,00:10
frozen,1,0.62,0.64,0.60,1.0,0.2,00:10
unfrozen,2,0.55,0.60,0.66,1,0.1,00:12
"""
HISTORY2 = """stage,epoch,train_loss,valid_loss,valid_auc,memory_fill,memory_moved,time
unfrozen,0,0.50,0.57,0.70,1,0.001,00:20
unfrozen,1,0.47,,0.71,1,0.0008,00:20
"""
PLAIN_HISTORY = """stage,epoch,train_loss,valid_loss,valid_auc,time
frozen,0,0.70,0.68,0.55,00:10
unfrozen,1,0.60,0.62,0.63,00:10
"""


def fake_predictions(n=40, with_test=True, seed=0):
    """Made-up probabilities: Hernia has no positive, so its ROC is skipped."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    targets[:, 2] = 0
    probs = np.clip(0.6 * targets + 0.4 * rng.random(targets.shape), 0, 1).astype(np.float32)
    split = ["valid"] * (n // 2) + [("test" if with_test else "valid")] * (n - n // 2)
    return {"probs": torch.from_numpy(probs), "targets": torch.from_numpy(targets), "labels": list(LABELS),
            "image_index": [f"{i:05d}.png" for i in range(n)], "split": split}


def make_run(folder, memory=True, phase2=True, with_test=True, predictions=True):
    """A finished-looking run folder written by hand (no training)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"experiment_name": "fake", "model": {"backbone": "resnet18"},
              "memory": {"use_memory": memory, "update_strategy": "fifo", "bank_size": 16, "top_k": 3}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"valid": {"mean_auc": 0.7, "per_class": {}}}))
    if memory:
        (folder / "history_phase1.csv").write_text(HISTORY1)
        if phase2:
            (folder / "history_phase2.csv").write_text(HISTORY2)
    else:
        (folder / "history_phase1.csv").write_text(PLAIN_HISTORY)
        if phase2:
            (folder / "history_phase2.csv").write_text(PLAIN_HISTORY.replace("frozen,0", "unfrozen,0"))
    if predictions:
        torch.save(fake_predictions(with_test=with_test), folder / "fake_predictions.pt")
    return folder


# --------------------------------------------------------------------------- single figures


def test_lr_find_writes_png(tmp_path):
    lrs = np.logspace(-7, 1, 60)
    losses = 0.7 - 0.2 * np.exp(-((np.log10(lrs) + 3) ** 2)) + np.where(lrs > 1e-1, 5 * lrs, 0)
    losses[-1] = np.nan  # a diverged last step is left out
    path = plots.plot_lr_find(lrs, losses, 1e-3, tmp_path / "lr_find_phase1.png")
    assert path == tmp_path / "lr_find_phase1.png"
    assert_png(path)
    assert no_temp_files(tmp_path)


def test_lr_find_accepts_tensors_and_no_choice(tmp_path):
    lrs = [torch.tensor(x) for x in np.logspace(-6, -1, 10)]
    losses = [torch.tensor(0.7 - 0.01 * i) for i in range(10)]
    assert_png(plots.plot_lr_find(lrs, losses, None, tmp_path / "lr.png"))


def test_lr_find_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_lr_find([1e-3, 1e-2], [0.5], 1e-3, tmp_path / "lr.png")
    assert not (tmp_path / "lr.png").exists()


def test_history_writes_png_with_nan_cells(tmp_path):
    csv = tmp_path / "history_phase1.csv"
    csv.write_text(HISTORY1 + "unfrozen,3,0.5,,,1,,00:10\n")
    assert_png(plots.plot_history(csv, tmp_path / "loss_phase1.png", "fake: phase 1"))


def test_history_stage_spans():
    assert plots.stage_spans(["frozen", "frozen", "unfrozen", "frozen"]) == [(0, 1), (3, 3)]
    assert plots.stage_spans(["unfrozen"]) == []


def test_roc_writes_png_and_skips_one_label_classes(tmp_path):
    payload = fake_predictions()
    assert_png(plots.plot_roc(payload["probs"], payload["targets"], LABELS, tmp_path / "roc.png", "fake"))


def test_roc_rejects_label_count(tmp_path):
    payload = fake_predictions()
    with pytest.raises(ValueError):
        plots.plot_roc(payload["probs"], payload["targets"], LABELS[:2], tmp_path / "roc.png", "fake")


def test_memory_writes_png_across_phases(tmp_path):
    (tmp_path / "h1.csv").write_text(HISTORY1)
    (tmp_path / "h2.csv").write_text(HISTORY2)
    path = plots.plot_memory([tmp_path / "h1.csv", tmp_path / "h2.csv"], tmp_path / "memory.png")
    assert path == tmp_path / "memory.png"
    assert_png(path)


def test_memory_returns_none_without_memory_columns(tmp_path):
    (tmp_path / "h1.csv").write_text(PLAIN_HISTORY)
    assert plots.plot_memory([tmp_path / "h1.csv", tmp_path / "missing.csv"], tmp_path / "memory.png") is None
    assert not (tmp_path / "memory.png").exists()


def test_auc_bars_writes_png_with_nulls(tmp_path):
    values = [[0.8, None, 0.6], [0.7, 0.9, None]]
    intervals = [[[0.7, 0.9], None, [0.5, 0.7]], [None, [0.85, 0.95], None]]
    assert_png(plots.plot_auc_bars(["a", "b"], LABELS, values, tmp_path / "bars.png", "t", intervals=intervals))


def test_figures_stay_out_of_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_lr_find([1e-4, 1e-3, 1e-2], [0.7, 0.6, 0.9], 1e-3, tmp_path / "lr.png")
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- safe_plot


def failing_plot(data, path):
    raise RuntimeError("boom")


def test_safe_plot_turns_failure_into_warning(tmp_path):
    target = tmp_path / "broken.png"
    with pytest.warns(UserWarning, match=r"could not draw .*broken\.png: RuntimeError: boom"):
        assert plots.safe_plot(failing_plot, [1, 2], target) is None
    with pytest.warns(UserWarning, match=r"could not draw .*broken\.png"):
        assert plots.safe_plot(failing_plot, [1, 2], path=target) is None
    assert not target.exists()


def test_safe_plot_passes_result_through(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plots.safe_plot(plots.plot_lr_find, [1e-4, 1e-3], [0.7, 0.6], 1e-3, tmp_path / "lr.png")
    assert result == tmp_path / "lr.png"


def test_safe_plot_warns_on_bad_input(tmp_path):
    with pytest.warns(UserWarning, match="could not draw"):
        assert plots.safe_plot(plots.plot_history, tmp_path / "absent.csv", tmp_path / "x.png", "t") is None


# --------------------------------------------------------------------------- plot_run


def test_plot_run_memory_run_with_test_split(tmp_path):
    run = make_run(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plots.plot_run(run)
    names = {"loss_phase1.png", "loss_phase2.png", "roc_test.png", "memory.png"}
    assert {p.name for p in written} == names
    for name in names:
        assert_png(run / name)
    assert not (run / "roc_valid.png").exists()
    assert no_temp_files(run)


def test_plot_run_without_memory_phase2_or_test(tmp_path):
    run = make_run(tmp_path / "run", memory=False, phase2=False, with_test=False)
    written = plots.plot_run(run)
    assert {p.name for p in written} == {"loss_phase1.png", "roc_valid.png"}
    assert not (run / "memory.png").exists()


def test_plot_run_without_predictions_file(tmp_path):
    run = make_run(tmp_path / "run", predictions=False)
    assert {p.name for p in plots.plot_run(run)} == {"loss_phase1.png", "loss_phase2.png", "memory.png"}


def test_plot_run_survives_broken_files(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "fake_predictions.pt").write_bytes(b"not a torch file")
    (run / "history_phase2.csv").write_text("")
    with pytest.warns(UserWarning, match="could not draw") as record:
        written = plots.plot_run(run)
    messages = " ".join(str(w.message) for w in record)
    assert "roc_" in messages and "loss_phase2.png" in messages
    assert "loss_phase1.png" in {p.name for p in written}
    assert_png(run / "loss_phase1.png")
