"""Helpers the tests share: paths, running a command in-process, adding a callback to the Learners a run builds.

Test modules import from here only (never from each other, nor from conftest, which holds the fixtures).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import torch
import yaml
from fastai.learner import defaults

from cxrmem.config import dump_yaml, from_dict
from cxrmem.data.findings import FINDINGS
from cxrmem.models.net import build_model
from cxrmem.runs.folder import CONFIG_FILE, predictions_path, save_predictions, write_metrics
from cxrmem.train.phases import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def run_cli(main, argv, capsys):
    """Run an entry point in-process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_data(data_dir, run_dir, capsys, *options):
    """``train.py --check-data`` of the demo config on ``data_dir``: (printed report, data_summary.json)."""
    from cxrmem.experiment import train_main

    status, out, err = run_cli(train_main, ["--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_dir,
                                            "--output_dir", run_dir, "--set", "data.synthetic=null",
                                            "--check-data", *options], capsys)
    assert status == 0, err
    return out, json.loads((Path(run_dir) / "data_summary.json").read_text())


def on_every_learner(patch, make) -> None:
    """Give every fastai Learner built while ``patch`` (a MonkeyPatch) holds one more callback, ``make()``.

    Through fastai's public ``defaults.callbacks``, whose classes every Learner instantiates once:
    the tests see a run's Learners without knowing how the driver builds them. A callback that
    cares about the phase reads ``self.learn.epoch_log.phase``.
    """
    class Made:
        def __new__(cls):
            return make()

    patch.setattr(defaults, "callbacks", [*defaults.callbacks, Made])


# ---- a machine without internet

LOOPBACK = {"127.0.0.1", "::1", "localhost", b"127.0.0.1", b"localhost"}


def refuse_network(monkeypatch):
    """As on a machine without internet: name lookups and connections beyond 127.0.0.1 fail at once."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK:
            raise socket.gaierror(socket.EAI_NONAME, f"no network in this test ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise ConnectionRefusedError(f"no network in this test ({address[0]})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def set_hub_offline(monkeypatch, offline=True):
    """HF_HUB_OFFLINE=1, the Hugging Face hub's switch for machines without internet (the hub reads the
    variable once, at import, into this constant); without it the hub retries for about 45 s, then gives up."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


# ---- what a run logged (TensorBoard and MLflow are optional extras: imported when used)

def new_mlflow_store(path: Path) -> str:
    """An MLflow SQLite store with its tables made (which takes seconds); returns its URI."""
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def scalars(folder, tag) -> list:
    """(step, value) of every TensorBoard scalar ``tag`` in the event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def metric_history(client, run_id, key) -> list:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- statistics computed straight from their definitions

def synthetic_split(n_images, n_classes=4, prevalence=0.3, signal=1.0, seed=0, decimals=None):
    """Targets with the given prevalence and scores that are informative but noisy."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n_images, n_classes)) < prevalence).astype(np.float32)
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=targets.shape) + signal * targets)))
    if decimals is not None:
        scores = np.round(scores, decimals)   # many ties
    return scores, targets


def direct_components(y, scores):
    """DeLong's structural components straight from the definition, O(m n):
    psi(x, y') = 1 if x > y', 0.5 if x == y', 0 otherwise;
    V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j), AUC = mean psi."""
    positive = y > 0.5
    x, y_neg = scores[positive], scores[~positive]
    psi = (x[:, None] > y_neg[None, :]) + 0.5 * (x[:, None] == y_neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def direct_delong(y, a, b):
    """delta, var and two-sided p of DeLong's test from the direct components."""
    auc_a, v10_a, v01_a = direct_components(y, a)
    auc_b, v10_b, v01_b = direct_components(y, b)
    m, n = v10_a.size, v01_a.size
    # var(delta) = var(V10_b - V10_a) / m + var(V01_b - V01_a) / n, sample variances
    var = np.var(v10_b - v10_a, ddof=1) / m + np.var(v01_b - v01_a, ddof=1) / n
    delta = auc_b - auc_a
    z = delta / math.sqrt(var)
    return delta, var, math.erfc(abs(z) / math.sqrt(2.0))


# ---- DICOM files

def write_dicom(path, stored: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8, syntax=None,
                **elements):
    """A secondary-capture DICOM file holding ``stored`` as its pixel data."""
    import pydicom  # the dicom extra
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.set_pixel_data(stored.astype(dtype), photometric, bits)
    for name, value in elements.items():
        setattr(ds, name, value)
    if syntax is not None and syntax != ds.file_meta.TransferSyntaxUID:
        if syntax.is_compressed:
            ds.compress(syntax)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- a run folder without training

SIZE = 32


FAKE_RUN = {
    "experiment_name": "fake",
    "output_dir": "/nonexistent/elsewhere",  # the run folder given on the command line wins
    "model": {"backbone": "timm/test_efficientnet", "pretrained": False},
    "memory": {"use_memory": True, "bank_size": 16, "top_k": 3, "update_strategy": "fifo"},
    "data": {"image_size": SIZE, "num_workers": 0},
    "phase1": {"batch_size": 4},
    "phase2": {"batch_size": 8},
}


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


CALLS = [f"{f}_call" for f in FINDINGS]


def write_points(run_dir, thresholds: dict) -> None:
    (Path(run_dir) / "operating_points.json").write_text(json.dumps(
        {"rule": "youden", "split": "valid", "thresholds": {f: thresholds.get(f) for f in FINDINGS}}))


def write_fake_run(run_dir: Path, config, metrics: dict | None = None, predictions: dict | None = None) -> Path:
    """A run folder made by hand, through the run folder's own writers: config.yaml (``config``: a
    Config, or a plain mapping of the keys a test needs), metrics.json when ``metrics`` is given, the
    predictions file when ``predictions`` ({probs, targets, image_index, split}; labels: the 14) is."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False) if isinstance(config, dict) else dump_yaml(config)
    (run_dir / CONFIG_FILE).write_text(text)
    if metrics is not None:
        write_metrics(run_dir, metrics)
    if predictions is not None:
        name = config["experiment_name"] if isinstance(config, dict) else config.experiment_name
        save_predictions(predictions_path(run_dir, name), labels=FINDINGS, **predictions)
    return run_dir


def make_fake_run(run_dir: Path, memory: bool = True) -> tuple[Path, torch.nn.Module]:
    """A run folder with config.yaml and a final checkpoint of an untrained network whose bank is filled."""
    raw = json.loads(json.dumps(FAKE_RUN))
    raw["memory"]["use_memory"] = memory
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.memory)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE))
    model.eval()
    write_fake_run(run_dir, cfg)
    path = run_dir / checkpoint_path(cfg, 2).relative_to(cfg.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return run_dir, model


# ---- the tiny experiment the training tests run

TINY = {
    "experiment_name": "tiny",
    "model": {"backbone": "timm/test_efficientnet", "pretrained": False},
    "memory": {"use_memory": True, "bank_size": 16, "top_k": 3, "update_strategy": "fifo"},
    "data": {"image_size": 32, "num_workers": 0, "seed": 0, "valid_pct": 0.25},
    "phase1": {"batch_size": 8, "use_lr_finder": False, "base_lr": 0.001, "freeze_epochs": 1, "total_epochs": 1},
    "phase2": {"batch_size": 16, "epochs": 1, "lr_min": 0.0001, "lr_max": 0.001},
    "evaluation": {"bootstrap_resamples": 20},
}


def tiny_config(path, **sections) -> Path:
    """Write the tiny two-phase experiment to ``path``, each keyword a section's changes
    (``phase2=None`` removes phase 2); returns ``path``."""
    raw = json.loads(json.dumps(TINY))
    for section, changes in sections.items():
        if changes is None or not isinstance(changes, dict):
            raw[section] = changes
        else:
            raw.setdefault(section, {}).update(changes)
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Path(path)
