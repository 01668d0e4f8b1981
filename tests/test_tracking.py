"""Experiment tracking: the config keys, missing packages, TensorBoard steps over the fits of a phase,
the MLflow run's life (parameters, epochs, resume, final AUCs, artifacts), and tiny two-phase runs
read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from mlflow.tracking import MlflowClient

from cxrmem.experiment import train_main
from cxrmem.config import from_dict
from cxrmem.data.chestxray14 import FINDINGS
from cxrmem.utils.errors import UserError
from cxrmem.train import tracking

from helpers import metric_history, new_mlflow_store, on_every_learner, run_cli, scalars, tiny_config

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite database with its tables made once (making them takes seconds); tests copy it."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    new_mlflow_store(path)
    return path


def store_at(empty_store, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, path)
    return f"sqlite:///{path}"


def config(tmp_path, **tracking_keys):
    cfg = from_dict({"experiment_name": "unit", "output_dir": str(tmp_path / "runs" / "unit"),
                     "tracking": tracking_keys})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


# --------------------------------------------------------------------------- configuration


def test_tracking_is_off_by_default_and_mlflow_takes_true_false_or_a_uri(tmp_path):
    off = from_dict({}).tracking
    assert (off.tensorboard, off.mlflow, off.experiment) == (False, None, None)
    assert tracking.callbacks(from_dict({}), 1) == []
    assert from_dict({"tracking": {"mlflow": True}}).tracking.mlflow == "default"
    assert from_dict({"tracking": {"mlflow": False}}).tracking.mlflow is None
    assert from_dict({"tracking": {"mlflow": "http://host:5000"}}).tracking.mlflow == "http://host:5000"
    with pytest.raises(UserError, match="tracking.mlflow: expected a string"):
        from_dict({"tracking": {"mlflow": 3}})
    with pytest.raises(UserError, match="did you mean tensorboard"):
        from_dict({"tracking": {"tensorbord": True}})

    default = config(tmp_path, mlflow="default")
    assert tracking.tracking_uri(default) == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert tracking.tracking_uri(config(tmp_path, mlflow="http://host:5000")) == "http://host:5000"


def test_only_the_main_process_gets_callbacks(tmp_path, monkeypatch):
    cfg = config(tmp_path, tensorboard=True, mlflow="default")
    made = tracking.callbacks(cfg, 1)
    assert [type(cb).__name__ for cb in made] == ["PhaseTensorBoard", "MLflowLogger"]
    monkeypatch.setenv("RANK", "1")
    assert tracking.callbacks(cfg, 1) == []


@pytest.mark.parametrize("key, modules", [("tensorboard", ["tensorboard", "fastai.callback.tensorboard"]),
                                          ("mlflow", ["mlflow"])])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, key, modules, rank):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # what `import name` meets when it is not installed
    monkeypatch.setenv("RANK", rank)  # every rank fails alike
    cfg = config(tmp_path, **{key: True})
    with pytest.raises(UserError) as error:
        tracking.callbacks(cfg, 1)
    message = str(error.value)
    assert "\n" not in message and f"tracking.{key}" in message and "pip install 'cxrmem[tracking]'" in message


def test_an_unusable_store_is_one_line(tmp_path):
    cfg = config(tmp_path, mlflow="nosuchscheme://somewhere")
    with pytest.raises(UserError, match="tracking.mlflow: cannot log to nosuchscheme://somewhere") as error:
        tracking.open_run(cfg, fresh=True)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- TensorBoard


class EpochLog(Callback):
    """Stands in for the phase's epoch table under its fastai name (``learn.epoch_log``): one row per
    finished epoch, over all fits."""

    order = 60

    def __init__(self):
        self.rows = []

    def after_epoch(self):
        self.rows.append(list(self.recorder.log))


def test_tensorboard_steps_run_on_over_the_fits_of_a_phase(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(96, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    train, valid = list(zip(x[:64], y[:64])), list(zip(x[64:], y[64:]))
    dls = DataLoaders.from_dsets(train, valid, bs=16, device="cpu")
    rows = EpochLog()
    cfg = config(tmp_path, tensorboard=True)
    learn = Learner(dls, torch.nn.Linear(3, 1), loss_func=MSELossFlat(), cbs=[rows, *tracking.callbacks(cfg, 1)])
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2)  # like phase 1's frozen stage
        learn.fit(1, 1e-2)  # and its unfrozen one: fastai counts from 0 again
    n = len(dls.train)
    folder = cfg.run_dir / "tensorboard" / "phase1"
    valid_loss = scalars(folder, "valid_loss")
    assert [step for step, _ in valid_loss] == [n, 2 * n, 3 * n]  # none dropped as a restart
    assert [v for _, v in valid_loss] == pytest.approx([row[2] for row in rows.rows], rel=1e-6)
    train_loss = scalars(folder, "train_loss")
    assert [step for step, _ in train_loss] == list(range(1, 3 * n + 1))  # every training batch, once
    at_epoch_ends = [v for step, v in train_loss if step % n == 0]
    assert at_epoch_ends == pytest.approx([row[1] for row in rows.rows], rel=1e-6)  # the epochs' train_loss


# --------------------------------------------------------------------------- MLflow without training


class FakeLearner(SimpleNamespace):
    """What MLflowLogger reads from a Learner: the Recorder's names and values of the epoch, the epoch table."""

    def __init__(self, epochs):
        names = ["epoch", "train_loss", "valid_loss", "valid_auc", "memory_fill", "memory_moved", "time"]
        super().__init__(recorder=SimpleNamespace(metric_names=names, log=[]), epoch_log=epochs)


def run_epochs(logger, epochs, values):
    """Drive ``logger`` through one fit whose epochs end with ``values`` (train_loss, valid_loss, ...)."""
    logger.learn = FakeLearner(epochs)
    logger("before_fit")
    for index, row in enumerate(values):
        logger("before_epoch")
        logger.learn.recorder.log = [index, *row, "00:01"]
        logger("after_epoch")
        epochs.rows.append(row)
    logger("after_fit")


def test_mlflow_run_params_epochs_resume_and_final_aucs(tmp_path, empty_store):
    cfg = config(tmp_path, mlflow=True, experiment="grouped")
    uri = store_at(empty_store, tmp_path / "runs" / "mlflow.db")  # the default store: the runs root
    assert uri == tracking.tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)

    # a fresh training: phase 1 frozen (1 epoch) then unfrozen (1 epoch) on one phase-1 Learner
    epochs1 = SimpleNamespace(rows=[])
    logger = tracking.MLflowLogger(cfg, 1)
    run_epochs(logger, epochs1, [[0.9, 0.8, 0.55, 0.25, float("nan")]])
    run_epochs(logger, epochs1, [[0.7, 0.6, 0.65, 0.5, 0.1]])
    run_id = (cfg.run_dir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and client.get_experiment(run.info.experiment_id).name == "grouped"
    params = run.data.params
    assert params["memory.top_k"] == "3" and params["phase1.base_lr"] == "0.001"
    assert params["tracking.mlflow"] == "default" and params["phase2"] == "null" and params["description"] == ""
    assert metric_history(client, run_id, "phase1/valid_loss") == [(1, 0.8), (2, 0.6)]
    assert metric_history(client, run_id, "phase1/memory_fill") == [(1, 0.25), (2, 0.5)]
    assert metric_history(client, run_id, "phase1/train_loss") == [(1, 0.9), (2, 0.7)]
    assert set(run.data.metrics) == {f"phase1/{n}" for n in FakeLearner(None).recorder.metric_names[1:-1]}

    # killed, then resumed in phase 2 (another process): the same MLflow run goes on
    epochs2 = SimpleNamespace(rows=[])
    run_epochs(tracking.MLflowLogger(cfg, 2), epochs2, [[0.5, 0.45, 0.7, 0.5, 0.0]])
    epochs2_resumed = SimpleNamespace(rows=list(epochs2.rows))
    run_epochs(tracking.MLflowLogger(cfg, 2), epochs2_resumed, [[0.4, 0.42, 0.72, 0.5, 0.0]])
    assert (cfg.run_dir / "mlflow_run_id.txt").read_text().strip() == run_id
    assert metric_history(client, run_id, "phase2/valid_loss") == [(1, 0.45), (2, 0.42)]

    # the report: final AUCs (undefined ones left out) and the files; the run ends
    results = {split: {"mean_auc": 0.61 + i / 10, "per_class": {f: (None if f == "Hernia" else 0.5 + j / 100)
                                                              for j, f in enumerate(FINDINGS)}}
               for i, split in enumerate(["valid", "test"])}
    (cfg.run_dir / "metrics.json").write_text(json.dumps(results))
    (cfg.run_dir / "config.yaml").write_text("experiment_name: unit\n")
    (cfg.run_dir / "roc_test.png").write_bytes(b"\x89PNG")
    tracking.finish(cfg)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = {f"{s}/auc/{f}": auc for s, r in results.items() for f, auc in r["per_class"].items() if auc is not None}
    expected.update({f"{s}/mean_auc": r["mean_auc"] for s, r in results.items()})
    final = {k: v for k, v in run.data.metrics.items() if not k.startswith("phase")}
    assert final == pytest.approx(expected) and "test/auc/Hernia" not in final
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.json", "config.yaml", "roc_test.png"}
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # beside the default store

    tracking.finish(cfg)  # e.g. --evaluate afterwards: the finished run is left alone
    assert len(client.get_metric_history(run_id, "test/mean_auc")) == 1

    # a new training in the same folder opens a new run; one that replaces an interrupted run marks it KILLED
    epochs = SimpleNamespace(rows=[])
    run_epochs(tracking.MLflowLogger(cfg, 1), epochs, [[0.9, 0.8, 0.5, 0.2, 0.0]])
    second = (cfg.run_dir / "mlflow_run_id.txt").read_text().strip()
    assert second != run_id and client.get_run(run_id).info.status == "FINISHED"
    epochs = SimpleNamespace(rows=[])
    run_epochs(tracking.MLflowLogger(cfg, 1), epochs, [[0.9, 0.8, 0.5, 0.2, 0.0]])
    assert client.get_run(second).info.status == "KILLED"
    experiment = client.get_experiment_by_name("grouped").experiment_id
    assert len(client.search_runs([experiment])) == 3


def test_a_store_failing_during_training_is_a_warning(tmp_path, empty_store, monkeypatch):
    from mlflow.exceptions import MlflowException

    cfg = config(tmp_path, mlflow=store_at(empty_store, tmp_path / "mlflow.db"))
    epochs = SimpleNamespace(rows=[])
    logger = tracking.MLflowLogger(cfg, 1)

    def unavailable(*args, **kwargs):
        raise MlflowException("database is locked")

    run_epochs(logger, epochs, [[0.9, 0.8, 0.5, 0.2, 0.0]])  # opens the run
    monkeypatch.setattr(MlflowClient, "log_batch", unavailable)
    with pytest.warns(UserWarning, match="MLflow: logging epoch 2 of phase 1 failed .database is locked"):
        run_epochs(logger, epochs, [[0.7, 0.6, 0.6, 0.3, 0.1]])


# --------------------------------------------------------------------------- tiny runs, read back

def tiny_run_argv(tmp_path, tiny_data, uri, finder=True, epochs2=1):
    path = tiny_config(tmp_path / "tiny.yaml", phase1={"use_lr_finder": finder},
                       phase2={"epochs": epochs2, "early_stopping_patience": 5},
                       tracking={"tensorboard": True, "mlflow": str(uri), "experiment": "e2e"})
    return ["--config", path, "--data_dir", tiny_data, "--output_dir", tmp_path / "run"]


@pytest.mark.slow
def test_a_tiny_run_reads_back_in_tensorboard_and_mlflow(tmp_path, tiny_data, empty_store, capsys):
    uri = store_at(empty_store, tmp_path / "store" / "mlflow.db")
    status, _, err = run_cli(train_main, tiny_run_argv(tmp_path, tiny_data, uri), capsys)
    assert status == 0, err
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "e2e"
    assert run.data.params["memory.bank_size"] == "16" and run.data.params["phase1.batch_size"] == "8"

    for phase in (1, 2):
        history = pd.read_csv(run_dir / f"history_phase{phase}.csv")
        columns = ["train_loss", "valid_loss", "valid_auc", "memory_fill", "memory_moved"]
        # TensorBoard: one value per epoch (none from the LR finder), steps running on over the fits
        folder = run_dir / "tensorboard" / f"phase{phase}"
        valid_loss = scalars(folder, "valid_loss")
        assert [v for _, v in valid_loss] == pytest.approx(history["valid_loss"].tolist(), rel=1e-5)
        steps = [step for step, _ in valid_loss]
        assert steps == sorted(set(steps)) and len(steps) == len(history)
        assert [v for _, v in scalars(folder, "valid_auc")] == pytest.approx(history["valid_auc"].tolist(), rel=1e-5)
        assert [v for _, v in scalars(folder, "memory_fill")] == pytest.approx(history["memory_fill"].tolist())
        train_loss = dict(scalars(folder, "train_loss"))
        assert [train_loss[s] for s in steps] == pytest.approx(history["train_loss"].tolist(), rel=1e-5)
        # MLflow: the same epochs at steps 1, 2, ...
        for column in columns:
            logged = metric_history(client, run_id, f"phase{phase}/{column}")
            assert [step for step, _ in logged] == list(range(1, len(history) + 1)), column
            expected = pytest.approx(history[column].tolist(), rel=1e-5, nan_ok=True)  # the CSV has 6 digits
            assert [v for _, v in logged] == expected, column

    final = run.data.metrics
    for split, result in metrics.items():
        assert final[f"{split}/mean_auc"] == pytest.approx(result["mean_auc"])
        for finding, auc in result["per_class"].items():
            assert final.get(f"{split}/auc/{finding}") == (None if auc is None else pytest.approx(auc))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "config.yaml", "lr_find_phase1.png", "loss_phase1.png", "roc_test.png"} <= artifacts
    assert artifacts >= {p.name for p in run_dir.glob("*.png")}
    stored = tmp_path / "store" / "mlartifacts"  # beside the SQLite file, not in the working folder
    assert {p.name for p in stored.rglob("*") if p.is_file()} == artifacts


class Interrupt(Callback):
    """Ctrl-C once the resume file holds the first epoch of phase 2."""

    order = 90  # after SaveProgress (80)

    def after_epoch(self):
        if self.learn.epoch_log.phase == 2:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_steps(tmp_path, tiny_data, empty_store, capsys):
    uri = store_at(empty_store, tmp_path / "store" / "mlflow.db")
    argv = tiny_run_argv(tmp_path, tiny_data, uri, finder=False, epochs2=2)
    with pytest.MonkeyPatch.context() as mp:
        on_every_learner(mp, Interrupt)
        status, _, _ = run_cli(train_main, argv, capsys)
    assert status == 130
    run_dir = tmp_path / "run"
    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert client.get_run(run_id).info.status == "RUNNING"

    status, _, err = run_cli(train_main, [*argv, "--resume"], capsys)
    assert status == 0, err
    assert (run_dir / "mlflow_run_id.txt").read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id])) == 1
    for phase in (1, 2):
        history = pd.read_csv(run_dir / f"history_phase{phase}.csv")
        logged = metric_history(client, run_id, f"phase{phase}/valid_loss")
        assert [step for step, _ in logged] == [1, 2]  # each epoch once, phase 2's second one after the resume
        assert [v for _, v in logged] == pytest.approx(history["valid_loss"].tolist(), rel=1e-5)
    # TensorBoard: the resumed epoch is the phase's second, its steps n+1..2n (what the killed process
    # wrote of the first epoch may or may not have reached the disk)
    folder = run_dir / "tensorboard" / "phase2"
    last = scalars(folder, "valid_loss")[-1][0]
    train_steps = {step for step, _ in scalars(folder, "train_loss")}
    assert last % 2 == 0 and max(train_steps) == last and set(range(last // 2 + 1, last + 1)) <= train_steps
