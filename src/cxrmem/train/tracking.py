"""Experiment tracking: TensorBoard and MLflow, both optional (``pip install 'cxrmem[tracking]'``).

``tracking.tensorboard: true`` adds fastai's TensorBoardCallback to every phase, writing
``<run folder>/tensorboard/phase<N>/``. ``tracking.mlflow`` (``true``/``default``: a SQLite file in
the runs root, the run folder's parent; any other string: a tracking URI) records one MLflow run
per training run, in the experiment ``tracking.experiment`` (default: ``experiment_name``):

* parameters: the resolved config with dotted keys (``memory.top_k``);
* per epoch: ``phase<N>/<name>`` for each number of the epoch table (train_loss, valid_loss,
  valid_auc, memory_fill, memory_moved) at step = the epochs the phase has finished, 1, 2, ...
  (phase 1 counts its frozen epochs, then its unfrozen ones);
* after the report (:func:`finish`): ``<split>/mean_auc`` and ``<split>/auc/<finding>`` from
  metrics.json (undefined AUCs left out), and the run folder's plots, metrics.json and config.yaml
  as artifacts; the MLflow run then ends as FINISHED.

The MLflow run id is kept in ``<run folder>/mlflow_run_id.txt``. A training that starts at the
first epoch of phase 1 opens a new MLflow run (an interrupted one it replaces is marked KILLED);
a resumed training continues the recorded run while it is still open (RUNNING). Under torchrun
only the main process logs.
"""

from __future__ import annotations

import importlib
import json
import numbers
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Recorder

from ..utils import io
from ..config import flatten, to_dict
from ..utils.errors import UserError, describe_error
from .distributed import is_main_process

RUN_ID_FILE = "mlflow_run_id.txt"
ARTIFACTS = ("*.png", "metrics.json", "config.yaml")
MAX_PARAM_LENGTH = 500  # the longest parameter value every supported MLflow version stores


def callbacks(cfg, phase: int) -> list:
    """The tracking callbacks of one phase's Learner ([] when tracking is off, and on ranks other than 0).

    They count epochs through the phase from ``learn.epoch_log.rows`` (the epoch table, fastai's
    name for the EpochLog callback, restored on ``--resume``). A tracker whose package is missing is
    a UserError on every rank.
    """
    made = [make(cfg, phase) for key, make in TRACKERS.items() if getattr(cfg.tracking, key)]
    return made if is_main_process() else []


def _require(module: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"tracking.{key} is on but {module} cannot be imported ({exc}); "
                        f"pip install 'cxrmem[tracking]' or switch tracking.{key} off") from None


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_callback(cfg, phase: int):
    _require("fastai.callback.tensorboard", "tensorboard")
    log_dir = cfg.run_dir / "tensorboard" / f"phase{phase}"
    return _phase_tensorboard()(log_dir=str(log_dir), trace_model=False, log_preds=False)


@lru_cache(maxsize=None)
def _phase_tensorboard():
    """fastai's TensorBoardCallback stepping over the training batches of the whole phase (imported on first use)."""
    from fastai.callback.tensorboard import TensorBoardCallback

    class PhaseTensorBoard(TensorBoardCallback):
        """Logs at step = training batches the phase has run (epochs finished x batches per epoch + this
        epoch's): per batch the smoothed train_loss and the optimiser's hyper-parameters, per epoch
        valid_loss and the metrics. fastai counts from 0 at every fit: phase 1's two fits (frozen,
        unfrozen) would lie on top of each other, and a resumed fit would start again at 0."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first_step = 0

        def before_epoch(self):
            self.first_step = len(self.learn.epoch_log.rows) * len(self.dls.train)

        @property
        def train_iter(self):  # read by fastai's after_batch and after_epoch in place of the Learner's count
            return self.first_step + (self.iter + 1 if self.training else len(self.dls.train))

        def after_batch(self):
            if self.training:  # fastai's would also write the unchanged train_loss after each validation batch
                super().after_batch()

    return PhaseTensorBoard


# --------------------------------------------------------------------------- MLflow


def mlflow_callback(cfg, phase: int):
    _require("mlflow", "mlflow")
    return MLflowLogger(cfg, phase)


class MLflowLogger(Callback):
    """Logs each epoch's numbers as ``phase<N>/<name>`` at step = epochs the phase has finished.

    The MLflow run is opened (:func:`open_run`) when the first fit of the phase starts: a new
    one when that fit is the first epoch of phase 1, else the recorded one.
    """

    order = Recorder.order + 1  # once the Recorder holds the epoch's values; before early stopping ends a fit

    def __init__(self, cfg, phase: int):
        self.config, self.phase = cfg, phase
        self.run_id, self.epoch_step = None, 0

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")  # the LR finder's mock epochs are not logged
        if self.run and self.run_id is None:
            self.run_id = open_run(self.config, fresh=self.phase == 1 and not self.learn.epoch_log.rows)

    def before_epoch(self):
        self.epoch_step = len(self.learn.epoch_log.rows) + 1

    def after_epoch(self):
        names, values = self.recorder.metric_names[1:], self.recorder.log[1:]  # without the fit's epoch index
        epoch = {f"phase{self.phase}/{n}": v for n, v in zip(names, values) if isinstance(v, numbers.Real)}
        with tolerated(f"logging epoch {self.epoch_step} of phase {self.phase}"):
            log_metrics(self.config, self.run_id, epoch, step=self.epoch_step)


def tracking_uri(cfg) -> str:
    """``tracking.mlflow`` as a URI: ``default`` is ``sqlite:///<runs root>/mlflow.db``, the runs
    root being the run folder's parent (``runs/`` for ``runs/<experiment_name>``)."""
    if cfg.tracking.mlflow == "default":
        return f"sqlite:///{_runs_root(cfg) / 'mlflow.db'}"
    return cfg.tracking.mlflow


def _runs_root(cfg):
    return cfg.run_dir.resolve().parent


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def open_run(cfg, fresh: bool) -> str:
    """The id of the MLflow run this training logs to.

    The recorded run (``mlflow_run_id.txt``) when it is still open and ``fresh`` is false;
    otherwise a new run of the experiment, with the config as parameters, recorded in its place
    (a recorded run still open is then marked KILLED). A store that cannot be used is a UserError.
    """
    from mlflow.exceptions import MlflowException

    try:
        client = _client(cfg)
        previous = recorded_run(client, cfg)
        if previous is not None and previous.info.status == "RUNNING":
            if not fresh:
                return previous.info.run_id
            client.set_terminated(previous.info.run_id, "KILLED")  # this training starts over
        run = client.create_run(_experiment_id(client, cfg), run_name=cfg.experiment_name,
                                tags={"run_dir": str(cfg.run_dir.resolve())})
        client.log_batch(run.info.run_id, params=_params(cfg))
    except MlflowException as exc:
        raise UserError(f"tracking.mlflow: cannot log to {tracking_uri(cfg)} ({describe_error(exc)}); "
                        f"fix the URI or set tracking.mlflow: null") from None
    io.write_text(cfg.run_dir / RUN_ID_FILE, run.info.run_id + "\n")
    return run.info.run_id


def recorded_run(client, cfg):
    """The MLflow run named in the run folder's ``mlflow_run_id.txt`` (None if none or not in this store)."""
    from mlflow.exceptions import MlflowException

    path = cfg.run_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    try:
        return client.get_run(path.read_text().strip())
    except MlflowException:
        return None


def _experiment_id(client, cfg) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.experiment or cfg.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(cfg))
        except MlflowException:  # created meanwhile by a run of the same sweep
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise UserError(f"MLflow experiment {name!r} is deleted in {tracking_uri(cfg)}; restore it "
                        f"(mlflow experiments restore) or set tracking.experiment to another name")
    return experiment.experiment_id


def _artifact_location(cfg) -> str | None:
    """A SQLite store keeps its artifacts in ``mlartifacts/`` beside its database file (MLflow's own
    default, ``./mlruns``, would land in whatever folder the command runs from); others keep theirs."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):].split("?")[0])
    return (database.resolve().parent / "mlartifacts").as_uri()


def _params(cfg) -> list:
    """The resolved config as MLflow parameters: dotted keys, values as JSON writes them (null, true, 0.001)."""
    from mlflow.entities import Param

    return [Param(key, (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_LENGTH])
            for key, value in flatten(to_dict(cfg)).items()]


def log_metrics(cfg, run_id: str, values: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
    _client(cfg).log_batch(run_id, metrics=metrics)


def final_metrics(metrics: dict) -> dict:
    """metrics.json's AUCs as MLflow metrics: ``<split>/mean_auc`` and ``<split>/auc/<finding>`` (nulls left out)."""
    out = {}
    for split, result in metrics.items():
        out[f"{split}/mean_auc"] = result["mean_auc"]
        out.update({f"{split}/auc/{finding}": auc for finding, auc in result["per_class"].items()})
    return {key: value for key, value in out.items() if value is not None}


def finish(cfg) -> None:
    """After the run folder's report is written: the final AUCs and the files go to the training's
    MLflow run, which then ends (FINISHED). Nothing when MLflow is off or the recorded run is not
    open (e.g. ``--evaluate`` of a finished run)."""
    if not cfg.tracking.mlflow:
        return
    _require("mlflow", "mlflow")
    client = _client(cfg)
    run = recorded_run(client, cfg)
    if run is None or run.info.status != "RUNNING":
        return
    run_id = run.info.run_id
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    with tolerated("logging the final AUCs and files"):
        log_metrics(cfg, run_id, final_metrics(metrics), step=0)
        for pattern in ARTIFACTS:
            for path in sorted(cfg.run_dir.glob(pattern)):
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")


@contextmanager
def tolerated(what: str):
    """Once the MLflow run is open, a failing store (a server down, a locked database) is a warning:
    training goes on, and the run folder keeps everything."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        warnings.warn(f"MLflow: {what} failed ({describe_error(exc)}); the run folder keeps everything")


TRACKERS = {"tensorboard": tensorboard_callback, "mlflow": mlflow_callback}  # config key -> callback factory
