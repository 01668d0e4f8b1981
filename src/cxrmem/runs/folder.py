"""A run folder: every file a run writes, whether a folder is empty, finished, interrupted or another
configuration's, and reading back what a finished run holds (config, model, metrics, predictions).

The files (the checkpoints' names come from ``save_name``, else ``experiment_name``)::

    config.yaml                          the resolved configuration
    metrics.json, report.md              per split: AUCs with intervals, figures at the operating points
    operating_points.json                {rule, split, thresholds}: one threshold per finding
    <experiment_name>_predictions.pt     {probs, targets, labels, image_index, split}
    models/<stem>_phase{1,2}.pth         each phase's kept checkpoint (weights only)
    models/<stem>_resume.pth             the resume file, from the first epoch until the results exist
    history_phase*.csv, *.png            the epoch logs and the figures
    evaluations/<checkpoint stem>/       ``--evaluate --model_path`` of another checkpoint
    .cxrmem.lock                         held by the one command using the folder
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import yaml

from ..config import AliasRefused, Config, RepeatedKey, StrictLoader, load_config, same_experiment
from ..data.chestxray14 import patient_ids
from ..data.registry import model_findings
from ..models.net import build_model
from ..train.phases import checkpoint_path, load_checkpoint, resume_path
from ..train.resume import stopped_at
from ..utils import io
from ..utils.errors import UserError



PREDICTION_KEYS = ("probs", "targets", "labels", "image_index", "split")


METRICS_FILE = "metrics.json"


OPERATING_POINTS_FILE = "operating_points.json"


REPORT_FILE = "report.md"


CONFIG_FILE = "config.yaml"


PREDICTIONS_SUFFIX = "_predictions.pt"


class RunFileError(Exception):
    """A file of a run folder that is missing or unreadable; the message says which and why."""


def read_mapping(path: Path, parse: Callable[[str], object]) -> dict:
    """Parse a YAML/JSON file that must hold a mapping; RunFileError naming the reason otherwise."""
    try:
        content = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError, RepeatedKey, AliasRefused) as error:
        raise RunFileError(f"cannot read {path.name} ({type(error).__name__})") from error
    if not isinstance(content, dict):
        raise RunFileError(f"{path.name} does not hold a mapping")
    return content


def read_metrics(run_dir) -> dict:
    """The run's metrics.json ({split: result}); RunFileError when absent or unreadable."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunFileError(f"no {METRICS_FILE} (unfinished run?)")
    return read_mapping(path, json.loads)


def read_config(run_dir) -> dict:
    """The run's resolved configuration (config.yaml) as a plain mapping; RunFileError likewise."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunFileError(f"no {CONFIG_FILE}")
    return read_mapping(path, lambda text: yaml.load(text, Loader=StrictLoader))  # noqa: S506 - a SafeLoader


def write_metrics(run_dir, metrics: dict) -> Path:
    """Write ``metrics`` to the run's metrics.json: indented, strict JSON (NaN is an error), atomically."""
    path = Path(run_dir) / METRICS_FILE
    io.write_json(path, metrics)
    return path


def experiment_name(run_dir) -> Optional[str]:
    """experiment_name from the run's config.yaml, None when it cannot be read."""
    try:
        name = read_config(run_dir).get("experiment_name")
    except RunFileError:
        return None
    return None if name is None else str(name)


def write_operating_points(run_dir, operating_point: dict) -> Path:
    """Write {rule, split, thresholds {finding: t or null}} to the run's operating_points.json."""
    path = Path(run_dir) / OPERATING_POINTS_FILE
    io.write_json(path, operating_point)
    return path


def read_operating_points(run_dir) -> Optional[Dict[str, Optional[float]]]:
    """{finding: threshold or None} from the run's operating_points.json; None when the file is
    absent (the caller then calls at 0.5 and says so). RunFileError when it is unreadable."""
    path = Path(run_dir) / OPERATING_POINTS_FILE
    if not path.is_file():
        return None
    thresholds = read_mapping(path, json.loads).get("thresholds")
    if not isinstance(thresholds, dict):
        raise RunFileError(f"{OPERATING_POINTS_FILE} has no thresholds mapping")
    return {str(k): None if v is None else float(v) for k, v in thresholds.items()}


def predictions_path(run_dir, experiment: str) -> Path:
    """Where a run named ``experiment`` keeps its predictions: <experiment>_predictions.pt."""
    return Path(run_dir) / f"{experiment}{PREDICTIONS_SUFFIX}"


def find_predictions(run_dir) -> Optional[Path]:
    """<experiment_name>_predictions.pt, else the only *_predictions.pt in the folder, else None."""
    run_dir = Path(run_dir)
    name = experiment_name(run_dir)
    if name and predictions_path(run_dir, name).is_file():
        return predictions_path(run_dir, name)
    candidates = sorted(run_dir.glob(f"*{PREDICTIONS_SUFFIX}"))
    return candidates[0] if len(candidates) == 1 else None


def as_float_tensor(x) -> torch.Tensor:
    """A plain, contiguous float32 CPU tensor (its own storage, for a small file)."""
    if isinstance(x, torch.Tensor):
        tensor = x.detach().as_subclass(torch.Tensor).cpu()
    else:
        tensor = torch.as_tensor(np.asarray(x))
    return tensor.to(torch.float32).contiguous().clone()


def save_predictions(path: Union[str, Path], probs, targets, labels: Sequence[str],
                     image_index: Sequence[str], split: Union[str, Sequence[str]],
                     patient_id: Optional[Sequence[str]] = None) -> Path:
    """Save {probs, targets, labels, image_index, split[, patient_id]} with torch.save, atomically.

    ``probs``/``targets`` become float32 [N, C] tensors (NaN: a missing label); ``image_index``,
    ``split`` and ``patient_id`` become lists of N strings (a single ``split`` name applies to all).
    ``patient_id`` is what the patient bootstrap of compare and sweep resamples; a file without it
    (written before it existed) takes ChestX-ray14's rule, the image name before its first '_'.
    """
    probs_t, targets_t = as_float_tensor(probs), as_float_tensor(targets)
    labels = [str(label) for label in labels]
    image_index = [str(name) for name in image_index]
    n_images = probs_t.shape[0]
    splits = [split] * n_images if isinstance(split, str) else [str(s) for s in split]
    if probs_t.ndim != 2 or probs_t.shape != targets_t.shape or probs_t.shape[1] != len(labels):
        raise ValueError(
            f"probs {tuple(probs_t.shape)}, targets {tuple(targets_t.shape)} and "
            f"{len(labels)} labels do not agree"
        )
    if len(image_index) != n_images or len(splits) != n_images:
        raise ValueError(
            f"{n_images} rows but {len(image_index)} image names and {len(splits)} split names"
        )
    payload = {"probs": probs_t, "targets": targets_t, "labels": labels,
               "image_index": image_index, "split": splits}
    if patient_id is not None:
        if len(patient_id) != n_images:
            raise ValueError(f"{n_images} rows but {len(patient_id)} patient ids")
        payload["patient_id"] = [str(p) for p in patient_id]
    io.torch_save(payload, path)
    return Path(path)


def load_predictions(path: Union[str, Path]) -> dict:
    """Load a file written by ``save_predictions`` (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"predictions file not found: {path}; check the path or run the evaluation first"
        )
    try:
        payload = io.torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise UserError(f"predictions file {path} {io.unreadable_reason(path, exc)}; "
                        "run the evaluation again (--evaluate)") from None
    missing = [key for key in PREDICTION_KEYS
               if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise UserError(f"{path} is not a predictions file (missing {', '.join(missing)}); "
                        "pass the <experiment>_predictions.pt of a run")
    return payload


class SplitRows(NamedTuple):
    """One split of a predictions file, rows in image-name order."""

    names: List[str]
    targets: np.ndarray  # [N, C] float64
    probs: np.ndarray    # [N, C] float64
    labels: List[str]
    patients: List[str]  # the file's patient_id, else ChestX-ray14's rule on the names


def load_split(path: Union[str, Path], split: str, why: str) -> SplitRows:
    """The ``split`` rows of a predictions file sorted by image name (so two runs line up row by row);
    UserError ending with ``why`` when the file holds none."""
    payload = load_predictions(path)
    rows = np.flatnonzero(np.asarray(payload["split"]) == split)
    if rows.size == 0:
        raise UserError(f"{path} holds no {split} predictions; {why}")
    names = np.asarray(payload["image_index"])[rows]
    order = np.argsort(names, kind="stable")
    rows = rows[order]
    as_array = lambda key: np.asarray(payload[key], dtype=np.float64)[rows]  # noqa: E731
    names = [str(n) for n in names[order]]
    patients = [str(p) for p in np.asarray(payload["patient_id"])[rows]] if "patient_id" in payload else \
        [str(p) for p in patient_ids(names)]
    return SplitRows(names, as_array("targets"), as_array("probs"), [str(label) for label in payload["labels"]],
                     patients)


RUN_LOCK = ".cxrmem.lock"

# the states of a folder against a configuration (RunFolder.state)
EMPTY, FINISHED, INTERRUPTED = "empty", "finished", "interrupted"


class RunFolder:
    """The folder of the run ``cfg`` describes: its paths, its state, and what it holds."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = cfg.run_dir

    @classmethod
    def open(cls, run_dir) -> "RunFolder":
        """The finished run in ``run_dir``, configured by its own config.yaml."""
        run_dir = Path(run_dir)
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise UserError(f"{config} not found; pass --run the folder of a trained run (it holds config.yaml)")
        return cls(load_config(config, output_dir=str(run_dir)))

    # ---------------------------------------------------------------- paths

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def predictions_file(self) -> Path:
        return predictions_path(self.path, self.cfg.experiment_name)

    @property
    def final_phase(self) -> int:
        return 2 if self.cfg.phase2 else 1

    @property
    def final_checkpoint(self) -> Path:
        return checkpoint_path(self.cfg, self.final_phase)

    @property
    def resume_file(self) -> Path:
        return resume_path(self.cfg)

    def evaluation_dir(self, model_path: Path) -> Path:
        """Where ``--evaluate --model_path P`` of a checkpoint other than the run's own writes its
        results: ``<run folder>/evaluations/<P's stem>``."""
        return self.path / "evaluations" / Path(model_path).stem

    def outputs(self) -> list[Path]:
        """What a run writes into its folder, config.yaml apart, as far as it exists (nothing else is named)."""
        stem = self.cfg.checkpoint_stem
        patterns = ["metrics.json", "report.md", "operating_points.json", "data_summary.json",
                    "damaged_images.txt", "model_path.txt", "mlflow_run_id.txt", self.predictions_file.name,
                    "history_phase*.csv", "loss_phase*.png", "roc_*.png", "reliability_*.png", "memory.png",
                    "lr_find_phase*.png", f"models/{stem}_phase*.pth", f"models/{stem}_resume.pth", "models/tmp*",
                    "tensorboard", "evaluations"]
        return sorted({path for pattern in patterns for path in self.path.glob(pattern)})

    # ---------------------------------------------------------------- state

    def holds_this_config(self) -> bool:
        """config.yaml exists and describes this configuration (the output folder aside)."""
        return self.config_file.is_file() and same_experiment(self.config_file.read_text(), self.cfg)

    def state(self) -> str:
        """EMPTY (no config.yaml), INTERRUPTED (a resume file), FINISHED (metrics.json), else EMPTY:
        whichever configuration config.yaml holds (:meth:`holds_this_config` tells)."""
        if not self.config_file.is_file():
            return EMPTY
        if self.resume_file.is_file():
            return INTERRUPTED
        return FINISHED if self.metrics_file.is_file() else EMPTY

    def protect(self, overwrite: bool, resume: bool) -> None:
        """Training never replaces a run's work unasked: a folder holding a finished or interrupted run
        needs ``--overwrite`` (or ``--resume`` for an interrupted one of the same configuration)."""
        same = self.holds_this_config()
        if resume and not same:
            raise UserError(f"cannot resume: {self.config_file} is missing or holds another configuration; resume "
                            f"with the same config and options as the interrupted run")
        state = self.state()
        if resume or overwrite or state == EMPTY:
            return
        kind, other = ("this", None) if same else ("a different", "pass --output_dir to another folder, or "
                                                                      "--overwrite to replace it")
        if state == INTERRUPTED:
            raise UserError(f"{self.path} holds an interrupted run of {kind} configuration (stopped in "
                            f"{stopped_at(self.resume_file)}); "
                            f"{other or 'add --resume to continue it, or --overwrite to start again'}")
        raise UserError(f"{self.path} holds a finished run of {kind} configuration; "
                        f"{other or 'pass --overwrite to train it again, or --output_dir for a new run'}")

    def clear(self) -> None:
        """Remove the results of the run the folder held, so that a new run in it never sits beside them."""
        for path in self.outputs():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def lock(self):
        """The run folder for this process alone: a second command on the same folder stops at once."""
        def busy():
            raise UserError(f"another cxrmem command is using {self.path} right now (it holds "
                            f"{self.path / RUN_LOCK}); wait for it to end, or pass --output_dir for another folder")

        return io.folder_lock(self.path, RUN_LOCK, busy)

    # ---------------------------------------------------------------- what it holds

    def untrained_model(self) -> torch.nn.Module:
        """The run's network with fresh weights (never downloaded: a checkpoint replaces them)."""
        return build_model(replace(self.cfg.model, pretrained=False, weights=None), self.cfg.memory,
                           len(model_findings(self.cfg)))

    def load_model(self, model_path=None) -> torch.nn.Module:
        """The run's network (its final checkpoint, or ``model_path``) on the CPU, in eval mode."""
        model = self.untrained_model()
        load_checkpoint(model, Path(model_path) if model_path else self.final_checkpoint)
        return model.eval()
