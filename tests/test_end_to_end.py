"""End to end on a tiny synthetic set: both phases, outputs, the epoch log, --evaluate, legacy entry, determinism."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from PIL import Image

from cxrmem.experiment import legacy_main, train_main
from cxrmem.data.findings import FINDINGS
from cxrmem.runs.folder import read_operating_points

from helpers import ROOT, on_every_learner, run_cli, tiny_config

pytestmark = pytest.mark.slow

def write_config(tmp_path, memory=True):
    """The tiny experiment; the memory variant also runs the LR finder (and draws its plot)."""
    return tiny_config(tmp_path / f"tiny_{memory}.yaml", memory={"use_memory": memory},
                       phase1={"use_lr_finder": memory}, evaluation={"bootstrap_resamples": 50})


def train_tiny(tmp_path, tiny_data, capsys, name, memory=True, extra=()):
    run_dir = tmp_path / name
    status, out, err = run_cli(train_main, ["--config", write_config(tmp_path, memory), "--data_dir", tiny_data,
                                            "--output_dir", run_dir, *extra], capsys)
    assert status == 0, err
    return run_dir, out


class Spy(Callback):
    """Records, per phase, the bank momentum seen by training batches and the weights at the start."""

    order = 100

    def __init__(self, log):
        self.log = log

    @property
    def phase(self):
        return self.learn.epoch_log.phase

    def before_fit(self):
        if not hasattr(self.learn, "lr_finder"):
            self.log.setdefault(f"start{self.phase}", {k: v.detach().clone()
                                                       for k, v in self.learn.model.state_dict().items()})

    def before_batch(self):
        if self.training:
            self.log.setdefault(f"momentum{self.phase}", set()).add(self.learn.model.bank.momentum)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, tiny_data):
    tmp_path = tmp_path_factory.mktemp("e2e")
    log = {}
    with pytest.MonkeyPatch.context() as mp:
        on_every_learner(mp, lambda: Spy(log))
        run_dir = tmp_path / "memory"
        status = train_main(["--config", str(write_config(tmp_path)), "--data_dir", str(tiny_data),
                             "--output_dir", str(run_dir)])
    assert status == 0
    return run_dir, log, tmp_path


def check_run_folder(run_dir, name="tiny"):
    expected = ["config.yaml", f"models/{name}_phase1.pth", f"models/{name}_phase2.pth",
                f"{name}_predictions.pt", "metrics.json", "history_phase1.csv", "history_phase2.csv"]
    for rel in expected:
        assert (run_dir / rel).is_file() and (run_dir / rel).stat().st_size > 0, rel
    assert not list(run_dir.rglob("*.tmp"))
    return json.loads((run_dir / "metrics.json").read_text())


def test_every_output_is_written_and_valid(memory_run):
    run_dir, _, _ = memory_run
    metrics = check_run_folder(run_dir)
    assert set(metrics) == {"valid", "test"}
    preds = torch.load(run_dir / "tiny_predictions.pt", weights_only=True)
    assert preds["labels"] == FINDINGS and preds["probs"].shape == preds["targets"].shape
    assert preds["probs"].shape[1] == 14 and ((preds["probs"] >= 0) & (preds["probs"] <= 1)).all()
    for split, result in metrics.items():
        assert result["n_images"] == preds["split"].count(split)
        for finding, auc in result["per_class"].items():
            positives = result["n_positive"][finding]
            if positives == 0 or positives == result["n_images"]:
                assert auc is None  # undefined, never 0.0
            else:
                assert math.isfinite(auc) and 0.0 <= auc <= 1.0
        defined = [a for a in result["per_class"].values() if a is not None]
        assert result["mean_auc"] == pytest.approx(sum(defined) / len(defined))
    check_clinical_outputs(run_dir, metrics)
    for png in ("lr_find_phase1.png", "loss_phase1.png", "loss_phase2.png", "roc_test.png", "reliability_test.png",
                "memory.png"):
        with Image.open(run_dir / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100, png
    history = pd.read_csv(run_dir / "history_phase1.csv")
    assert history["stage"].tolist() == ["frozen", "unfrozen"]
    assert {"train_loss", "valid_loss", "valid_auc", "memory_fill", "memory_moved"} <= set(history.columns)
    assert len(pd.read_csv(run_dir / "history_phase2.csv")) == 1


def check_clinical_outputs(run_dir, metrics):
    """Operating points chosen on valid and stored with the run; the figures at them, AUPRC, prevalence,
    ECE and subgroups in metrics.json for both splits; report.md with a row per finding."""
    points = json.loads((run_dir / "operating_points.json").read_text())
    assert (points["rule"], points["split"], list(points["thresholds"])) == ("youden", "valid", FINDINGS)
    assert read_operating_points(run_dir) == points["thresholds"]
    report_md = (run_dir / "report.md").read_text()
    for split, result in metrics.items():
        assert result["bootstrap_unit"] == "patient"
        assert result["operating_point"] == {"rule": "youden", "split": "valid"}
        assert result["thresholds"] == points["thresholds"]
        for finding in FINDINGS:
            figures = result["at_threshold"][finding]
            assert set(figures) == {"sensitivity", "specificity", "ppv", "npv", "f1"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in figures.values())
            assert result["prevalence"][finding] == pytest.approx(result["n_positive"][finding] / result["n_images"])
            n = result["n_positive"][finding]
            flagged = 0 < n < 10 and result["per_class"][finding] is not None  # fewer than 10 positives
            assert f"| {finding}{' †' if flagged else ''} | {n} |" in report_md
        assert 0.0 <= result["ece"]["pooled"] <= 1.0
        assert set(result["subgroups"]) == {"sex", "age", "view"}
        assert sum(g["n_images"] for g in result["subgroups"]["sex"].values()) == result["n_images"]
        assert f"## {split} split ({result['n_images']} images)" in report_md


class ScriptedValidLoss(Callback):
    """Replaces each epoch's valid_loss by the next of ``losses[phase]`` before the trackers read it."""

    order = 55  # after the Recorder (50), before the best checkpoint (61) and the epoch log (62)

    def __init__(self, losses: dict):
        self.losses = {phase: list(values) for phase, values in losses.items()}

    def after_epoch(self):
        column = self.recorder.metric_names.index("valid_loss")
        value = self.losses[self.learn.epoch_log.phase].pop(0)
        self.recorder.log[column] = value
        self.recorder.values[-1][column - 1] = value


def test_epoch_log_one_line_per_epoch_numbered_through_the_phase(tmp_path, tiny_data, capsys, monkeypatch):
    scripted = {1: [0.9, 0.95, 0.8], 2: [0.7, 0.75]}  # phase 1: frozen, unfrozen, unfrozen; phase 2: two epochs
    on_every_learner(monkeypatch, lambda: ScriptedValidLoss(scripted))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: fastai's progress bars stay
    run_dir, out = train_tiny(tmp_path, tiny_data, capsys, "log", extra=[
        "--set", "phase1.use_lr_finder=false", "--set", "phase1.total_epochs=2", "--set", "phase2.epochs=2"])
    lines = [line.strip() for line in out.replace("\r", "\n").splitlines()]
    assert "Better model found" not in out and "No improvement since" not in out  # fastai's own lines
    header = [line.split() for line in lines if line.startswith("phase  stage")]
    assert len(header) == 2 and header[0] == header[1]
    assert header[0][:4] == ["phase", "stage", "epoch", "train_loss"] and header[0][-2:] == ["time", "best"]
    assert not [line for line in lines if line.split()[:1] == ["epoch"]]  # no fastai table on a terminal
    rows = [line.split() for line in lines if line.split()[1:2] in (["frozen"], ["unfrozen"], ["one_cycle"])]
    assert [row[:3] for row in rows] == [["1", "frozen", "1"], ["1", "unfrozen", "2"], ["1", "unfrozen", "3"],
                                         ["2", "one_cycle", "1"], ["2", "one_cycle", "2"]]
    column = header[0].index("valid_loss")
    assert [float(row[column]) for row in rows] == scripted[1] + scripted[2]
    assert [row[-1] == "*" for row in rows] == improvements(scripted[1]) + improvements(scripted[2])
    for phase, shown in ((1, rows[:3]), (2, rows[3:])):
        history = pd.read_csv(run_dir / f"history_phase{phase}.csv")
        assert history["epoch"].tolist() == [int(row[2]) for row in shown]
        assert history["stage"].tolist() == [row[1] for row in shown]
        assert history["train_loss"].round(4).tolist() == [float(row[3]) for row in shown]


def improvements(losses):
    """Whether each loss is below every earlier one of its phase (the first always is)."""
    return [loss < min(losses[:i], default=math.inf) for i, loss in enumerate(losses)]


@pytest.fixture(scope="module")
def second_run(memory_run, tiny_data):
    """The memory run's config trained once more, in another folder, off a terminal: (run folder, stdout)."""
    _, _, tmp_path = memory_run
    run_dir, out = tmp_path / "memory_again", io.StringIO()
    with contextlib.redirect_stdout(out):
        status = train_main(["--config", str(write_config(tmp_path)), "--data_dir", str(tiny_data),
                             "--output_dir", str(run_dir)])
    assert status == 0
    return run_dir, out.getvalue()


def test_off_a_terminal_every_stage_says_it_has_begun_and_a_synthetic_set_says_so(second_run):
    run_dir, out = second_run
    lines = [line for line in out.splitlines() if line.startswith(("phase 1: ", "phase 2: ", "evaluating: "))]
    stages = [" ".join(line.split()[:2]) if line.startswith("evaluating") else re.split(r" \(|,| ->", line)[0]
              for line in lines]
    assert stages == ["phase 1: LR finder", "phase 1: LR finder", "phase 1: frozen stage", "phase 1: unfrozen stage",
                      "phase 2: one_cycle stage", "evaluating: predicting", "evaluating: AUCs"]
    assert "data: SYNTHETIC" in out and "data: SYNTHETIC" in (run_dir / "report.md").read_text()


def test_phase2_starts_from_the_best_phase1_weights_and_bank(memory_run):
    run_dir, log, _ = memory_run
    phase1 = torch.load(run_dir / "models/tiny_phase1.pth", weights_only=True)
    start2 = log["start2"]
    assert set(phase1) == set(start2) and "bank.memory" in phase1
    for key, value in phase1.items():
        assert torch.equal(value, start2[key]), key
    assert int(phase1["bank.filled"]) > 0


def test_the_lr_finder_leaves_the_weights_and_the_empty_bank_as_they_were(memory_run, tiny_data):
    from fastai.torch_core import set_seed

    from cxrmem.config import load_config
    from cxrmem.models.net import build_model

    _, log, tmp_path = memory_run
    cfg = load_config(write_config(tmp_path), data_dir=str(tiny_data))
    assert cfg.phase1.use_lr_finder
    set_seed(cfg.data.seed, reproducible=True)  # as training starts
    fresh = build_model(cfg.model, cfg.memory).state_dict()
    start1 = log["start1"]  # phase 1's first fit, after the finder
    assert set(start1) == set(fresh) and int(start1["bank.filled"]) == 0
    for key, value in fresh.items():
        assert torch.equal(value, start1[key]), key


def test_bank_momentum_is_0_9_in_phase1_and_0_9999_in_phase2(memory_run):
    _, log, _ = memory_run
    assert log["momentum1"] == {0.9}
    assert log["momentum2"] == {0.9999}


def test_evaluate_reproduces_the_aucs(memory_run, tiny_data, capsys):
    run_dir, _, tmp_path = memory_run
    before = json.loads((run_dir / "metrics.json").read_text())
    status, out, err = run_cli(train_main, ["--config", write_config(tmp_path), "--data_dir", tiny_data,
                                            "--output_dir", run_dir, "--evaluate"], capsys)
    assert status == 0, err
    after = json.loads((run_dir / "metrics.json").read_text())
    for split in before:
        assert after[split]["per_class"] == pytest.approx(before[split]["per_class"], abs=1e-6)
    assert "Mean AUC Score:" in out and "ROC AUC Labels:" in out


def test_evaluate_with_an_explicit_model_path(memory_run, tiny_data, tmp_path, capsys):
    run_dir, _, config_dir = memory_run
    status, _, err = run_cli(train_main, ["--config", write_config(config_dir), "--data_dir", tiny_data,
                                          "--output_dir", tmp_path / "eval",
                                          "--evaluate", "--model_path", run_dir / "models/tiny_phase1.pth"], capsys)
    assert status == 0, err
    assert (tmp_path / "eval" / "evaluations" / "tiny_phase1" / "metrics.json").is_file()


def test_same_config_and_seed_give_identical_aucs(memory_run, second_run):
    run_dir, again = memory_run[0], second_run[0]
    first = json.loads((run_dir / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    for split in first:
        assert first[split]["per_class"] == second[split]["per_class"]
        assert first[split]["mean_auc"] == second[split]["mean_auc"]


def test_without_memory(tmp_path, tiny_data, capsys):
    run_dir, _ = train_tiny(tmp_path, tiny_data, capsys, "plain", memory=False)
    check_run_folder(run_dir)
    state = torch.load(run_dir / "models/tiny_phase2.pth", weights_only=True)
    assert not any(k.startswith("bank.") for k in state)
    assert not (run_dir / "memory.png").exists() and (run_dir / "roc_test.png").is_file()
    assert "memory_fill" not in pd.read_csv(run_dir / "history_phase1.csv").columns


def test_legacy_entry_writes_the_same_layout(tmp_path, tiny_data, capsys, monkeypatch, memory_run):
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "legacy"
    status, _, err = run_cli(legacy_main, [
        "--experiment", "demo_synthetic", "--data_dir", tiny_data, "--output_dir", run_dir,
        "--set", "data.synthetic=null", "--set", "data.image_size=32", "--set", "data.num_workers=0",
        "--set", "phase1.use_lr_finder=false", "--set", "phase1.freeze_epochs=0", "--set", "phase1.total_epochs=1",
        "--set", "phase1.batch_size=8", "--set", "phase2.epochs=1", "--set", "phase2.batch_size=16",
        "--set", "memory.bank_size=16", "--set", "evaluation.bootstrap_resamples=20"], capsys)
    assert status == 0, err
    check_run_folder(run_dir, name="demo_synthetic")
    layout = lambda d: sorted(p.relative_to(d).as_posix().replace("demo_synthetic", "tiny")  # noqa: E731
                              for p in d.rglob("*") if p.is_file() and p.name != "lr_find_phase1.png")
    assert layout(run_dir) == layout(memory_run[0])  # the legacy run skips the LR finder


def test_legacy_entry_unknown_experiment(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    status, _, err = run_cli(legacy_main, ["--experiment", "memory_rarity_effv2", "--data_dir", "x"], capsys)
    assert status == 2 and "did you mean memory_rarity_effv2m?" in err or "did you mean memory_rarity_effv2s?" in err
