"""One phase, training without a validation split, the warm-up schedule and MixUp: the reference's
``*_1phase`` and ``*_1phase_noval`` experiments, shrunk to a tiny synthetic set."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.learner import Learner

from cxrmem.experiment import train_main
from cxrmem.data.split import SplitWarning, assign_splits
from cxrmem.train.callbacks import EarlyStop, SaveCheckpoint

from helpers import on_every_learner, run_cli, tiny_config

def test_valid_pct_0_puts_every_train_val_patient_in_train():
    frame = pd.DataFrame({"image_index": [f"{p:08d}_000.png" for p in range(10)],
                          "patient_id": [str(p) for p in range(10)]})
    with pytest.warns(SplitWarning):
        split, _ = assign_splits(frame, None, 0.0, seed=1)
        with_valid, _ = assign_splits(frame, None, 0.25, seed=1)
    assert "valid" not in set(split["split"]) and 1 <= (split["split"] == "test").sum() <= 9
    assert set(with_valid["split"]) == {"train", "valid", "test"}
    assert (with_valid["split"] == "test").tolist() == (split["split"] == "test").tolist()  # test never moves


class Spy(Callback):
    """Records every fit's callbacks and freezing, the last epoch's weights and the training targets."""

    order = 1  # after MixUp (0) has blended the batch

    def __init__(self, log):
        self.log = log

    def before_fit(self):
        if not hasattr(self.learn, "lr_finder"):
            self.log.setdefault("fits", []).append({
                "cbs": {type(cb): cb for cb in self.learn.cbs}, "frozen_idx": self.learn.opt.frozen_idx,
                "n_groups": len(self.learn.opt.param_groups)})

    def before_batch(self):
        if self.training:
            self.log.setdefault("targets", []).append(self.learn.yb[0].detach().clone())

    def after_epoch(self):
        self.log["last_epoch"] = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}


def run_one_phase(tmp_path, tiny_data, capsys, monkeypatch, valid_pct=0.25, warmup=0, mixup=0.0):
    log, calls = {}, []
    fit_one_cycle = Learner.fit_one_cycle

    def recorded(learn, n_epoch, lr_max=None, *args, **kwargs):
        calls.append((n_epoch, lr_max, {k: v for k, v in kwargs.items() if k != "cbs"}))
        return fit_one_cycle(learn, n_epoch, lr_max, *args, **kwargs)

    on_every_learner(monkeypatch, lambda: Spy(log))
    monkeypatch.setattr(Learner, "fit_one_cycle", recorded)
    config = tiny_config(tmp_path / "solo.yaml", experiment_name="solo", phase2=None, data={"valid_pct": valid_pct},
                         phase1={"filter_normal": False, "warmup_epochs": warmup, "warmup_lr": 0.0002,
                                 "early_stopping_patience": None, "mixup": mixup})
    run_dir = tmp_path / "run"
    status, out, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir],
                               capsys)
    assert status == 0, err
    return run_dir, out, log, calls


@pytest.mark.slow
def test_one_phase_with_validation_and_no_early_stopping(tmp_path, tiny_data, capsys, monkeypatch):
    run_dir, _, log, calls = run_one_phase(tmp_path, tiny_data, capsys, monkeypatch)
    assert not (run_dir / "history_phase2.csv").exists() and not (run_dir / "models/solo_phase2.pth").exists()
    assert (run_dir / "models/solo_phase1.pth").is_file()
    assert set(json.loads((run_dir / "metrics.json").read_text())) == {"valid", "test"}
    assert (run_dir / "operating_points.json").is_file()
    for fit in log["fits"]:
        assert not fit["cbs"][SaveCheckpoint].every_epoch  # the best epoch by valid_loss
        assert EarlyStop not in fit["cbs"]  # patience null: never stops early
    assert [n for n, _, _ in calls] == [1, 1]  # fine_tune: frozen, then unfrozen


@pytest.mark.slow
def test_one_phase_without_validation_warmup_and_mixup(tmp_path, tiny_data, capsys, monkeypatch):
    run_dir, out, log, calls = run_one_phase(tmp_path, tiny_data, capsys, monkeypatch, valid_pct=0, warmup=1,
                                             mixup=0.4)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"test"} and metrics["test"]["mean_auc"] is not None
    assert not (run_dir / "operating_points.json").exists()
    assert "no operating points" in out

    # the warm-up: frozen one cycle at warmup_lr, then every layer at base_lr, fastai's defaults otherwise
    assert calls == [(1, 0.0002, {}), (1, 0.001, {})]
    frozen, unfrozen = log["fits"]
    assert frozen["frozen_idx"] == frozen["n_groups"] - 1 and unfrozen["frozen_idx"] == 0

    # no validation: no early stopping, the last epoch is the checkpoint, the log says "-"
    for fit in log["fits"]:
        assert fit["cbs"][SaveCheckpoint].every_epoch and EarlyStop not in fit["cbs"]
    saved = torch.load(run_dir / "models/solo_phase1.pth", weights_only=True)
    for key, value in log["last_epoch"].items():
        assert torch.equal(saved[key], value), key
    history = pd.read_csv(run_dir / "history_phase1.csv")
    assert len(history) == 2 and history["valid_loss"].isna().all() and history["valid_auc"].isna().all()
    assert history["train_loss"].notna().all()
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] in (["frozen"], ["unfrozen"])]
    header = next(line.split() for line in out.splitlines() if line.startswith("phase  stage"))
    assert len(rows) == 2
    for row in rows:
        assert row[header.index("valid_loss")] == "-" and row[header.index("valid_auc")] == "-"
        assert row[-1] == "*"  # every epoch became the checkpoint

    # MixUp was active and blended the targets the loss saw
    assert all(MixUp in fit["cbs"] for fit in log["fits"])
    targets = torch.cat(log["targets"])
    assert ((targets > 0) & (targets < 1)).any()
    assert ((targets >= 0) & (targets <= 1)).all()


@pytest.mark.parametrize("freeze, total", [(1, 2), (0, 3), (2, 1)])
def test_phase1_is_fastais_fine_tune_stage_by_stage(monkeypatch, freeze, total):
    """The default phase 1 makes the very fit_one_cycle calls of fastai's fine_tune (the installed
    version's); a stage of no epochs trains nothing in either."""
    from types import SimpleNamespace

    from fastai.test_utils import synth_learner

    from cxrmem.train.phases import phase1_stages

    calls = []
    monkeypatch.setattr(Learner, "fit_one_cycle", lambda self, n, lr, **kw: calls.append((n, lr, kw)))
    monkeypatch.setattr(Learner, "freeze", lambda self: None)
    monkeypatch.setattr(Learner, "unfreeze", lambda self: None)
    synth_learner().fine_tune(total, 3e-3, freeze_epochs=freeze)
    calls = [call for call in calls if call[0] > 0]
    p1 = SimpleNamespace(warmup_epochs=0, warmup_lr=None, freeze_epochs=freeze, total_epochs=total)
    ours = [(s.epochs, s.lr, s.one_cycle) for s in phase1_stages(p1, 3e-3) if s.epochs > 0]
    assert len(ours) == len(calls) and len(calls) == (2 if freeze else 1)
    for (n, lr, kw), (m, our_lr, our_kw) in zip(calls, ours):
        assert n == m and kw == our_kw
        assert (lr.start or 0.0, lr.stop) == pytest.approx((our_lr.start or 0.0, our_lr.stop))
