"""External validation: a trained run evaluated on another data set, on the findings the two share.

``cxrmem evaluate --run RUN --dataset D --data_dir DIR [--split S]`` (and ``evaluation.external``
at the end of training) writes ``RUN/external/<D>/`` (``<D>-<S>`` for a split other than test)::

    metrics.json                      {S: the run's figures on D}: AUC with patient-level intervals,
                                      figures at the run's operating points, AUPRC, calibration, subgroups
    <experiment>_predictions.pt       probabilities and targets of the shared findings
    report.md, roc_<S>.png, reliability_<S>.png
    external.json                     what was evaluated: data set, folder, split, shared findings,
                                      the findings left out, the image-overlap check

The run's network and preprocessing are used as they are; its operating points are the ones
chosen on its own validation split (a new site's thresholds are a calibration question). D is
read as training would read it (its split, ``data.views`` of the run; uncertain labels are
missing). Only the shared findings are scored: a finding the model predicts that D does not
grade, or that D grades and the model does not, is listed in external.json and left out.

A data set that holds the training images (the run's own data set, or ChestX-ray14 with
``nih_google``) is external only on images disjoint from the run's train and valid splits: the
evaluation checks it and refuses otherwise.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from . import report
from .config import DATASET_NAMES, EXTERNAL_SPLITS, ExternalConfig
from .data.findings import dataset_findings
from .data.registry import get_dataset, model_findings, training_datasets
from .data.summary import SYNTHETIC_NOTE
from .data.synthetic import is_synthetic
from .data.union import load_training_data
from .evaluation.auc import make_resampler
from .runs.folder import (REPORT_FILE, RunFolder, predictions_path, read_operating_points, save_predictions,
                          write_metrics)
from .train import distributed
from .train.split_predictions import predict_splits
from .utils import io
from .utils.commands import add_shared_options, guarded
from .utils.errors import UserError

EXTERNAL_DIR = "external"
EXTERNAL_FILE = "external.json"
SHARE_IMAGES = ({"chestxray14", "nih_google"},)  # data sets published on the same images


def external_dir(run_dir, dataset: str, split: str = "test") -> Path:
    return Path(run_dir) / EXTERNAL_DIR / (dataset if split == "test" else f"{dataset}-{split}")


def shares_images(trained_on: Sequence[str], dataset: str) -> Optional[str]:
    """The training data set that holds (or may hold) ``dataset``'s images, or None."""
    for name in trained_on:
        if name == dataset or any({name, dataset} == pair for pair in SHARE_IMAGES):
            return name
    return None


def training_images(cfg, train_frame: Optional[pd.DataFrame]) -> set:
    """The image names of the run's train and valid splits (from ``train_frame``, else read again)."""
    if train_frame is None:
        folders = [m.data_dir for m in cfg.data.datasets] or [cfg.data.data_dir]
        absent = [f for f in folders if not Path(f).is_dir()]
        if absent:
            raise UserError(f"cannot check that the images are disjoint from the run's training split: its data_dir "
                            f"{absent[0]} is not there; restore it (or evaluate on a data set of other images)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_frame = load_training_data(cfg.data, model_findings(cfg)).frame
    return set(train_frame.loc[train_frame["split"].isin(["train", "valid"]), "image_index"])


def check_disjoint(cfg, target: ExternalConfig, rows: pd.DataFrame, train_frame) -> Optional[dict]:
    """None when ``target`` cannot hold the training images; else the check's record, or a UserError
    when some of ``rows`` were trained or validated on."""
    owner = shares_images(training_datasets(cfg), target.dataset)
    if owner is None:
        return None
    seen = training_images(cfg, train_frame)
    overlap = rows["image_index"].isin(seen)
    if overlap.any():
        raise UserError(f"{int(overlap.sum())} of the {len(rows)} images of {target.dataset}'s {target.split} split are "
                        f"in this run's train or valid split ({target.dataset} and {owner} share images): "
                        f"that is no external test; choose a split disjoint from training (e.g. --split test)")
    return {"shares_images_with": owner, "disjoint_from_training": True, "checked_images": int(len(rows))}


def evaluate_on(cfg, model, target: ExternalConfig, device, train_frame: Optional[pd.DataFrame] = None) -> dict:
    """Evaluate ``model`` of the run ``cfg`` on ``target``; write and return its metrics ({split: figures})."""
    findings = model_findings(cfg)
    graded = dataset_findings(target.dataset)
    shared = [f for f in findings if f in graded]
    if not shared:
        raise UserError(f"{target.dataset} grades none of the run's findings ({', '.join(findings)}); there is "
                        f"nothing to evaluate (docs/datasets.md lists each data set's findings)")
    data_cfg = replace(cfg.data, dataset=target.dataset, data_dir=str(target.data_dir), synthetic=None, cache=None,
                       datasets=[])
    if not Path(target.data_dir).is_dir():
        raise UserError(f"external data_dir {target.data_dir} does not exist; point it at the {target.dataset} folder")
    loaded = get_dataset(target.dataset).load(Path(target.data_dir), data_cfg, findings)
    frame = loaded.frame
    rows = frame if target.split == "all" else frame[frame["split"] == target.split]
    if rows.empty:
        raise UserError(f"{target.dataset} at {target.data_dir} has no {target.split} images; choose another --split "
                        f"({', '.join(EXTERNAL_SPLITS)})")
    overlap = check_disjoint(cfg, target, rows, train_frame)
    out = external_dir(cfg.run_dir, target.dataset, target.split)
    # the run's network and findings, read from the external data set
    ext_cfg = replace(cfg, data=data_cfg, model=replace(cfg.model, findings=list(findings)), output_dir=str(out))
    if distributed.is_main_process():
        print(f"external: {target.dataset} {target.split} split, {len(rows)} images, findings {', '.join(shared)}"
              + (f" (images of {overlap['shares_images_with']}: disjoint from the run's training split, checked)"
                 if overlap else ""))
    # as the run's own test was predicted; under torchrun every rank predicts its share, rank 0 gets them all
    predictions = predict_splits(ext_cfg, model, rows.reset_index(drop=True).assign(split="test"), device)
    if not distributed.is_main_process():
        return {}
    probs, targets, names = predictions["test"]
    columns = [findings.index(f) for f in shared]
    probs, targets = probs[:, columns], targets[:, columns]
    thresholds = read_operating_points(cfg.run_dir) or {}
    point = {"rule": cfg.evaluation.operating_point, "split": report.THRESHOLD_SPLIT,
             "thresholds": {f: thresholds.get(f) for f in shared}} if thresholds else None
    patients = report.patients_of(rows, names)
    metrics = {target.split: report.evaluate_split(
        probs, targets, shared, cfg.evaluation.bootstrap_resamples, cfg.data.seed,
        resampler=make_resampler(cfg.evaluation.bootstrap_unit, patients), operating_point=point,
        metadata=report.metadata_rows(rows, names))}
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    synthetic = is_synthetic(target.data_dir)
    title = f"{cfg.experiment_name} on {target.dataset} ({target.split})"
    io.write_text(out / REPORT_FILE, report.format_markdown_report(metrics, title, synthetic))
    save_predictions(predictions_path(out, cfg.experiment_name), probs, targets, shared, list(names),
                     [target.split] * len(names), patients)
    io.write_json(out / EXTERNAL_FILE, {
        "dataset": target.dataset, "data_dir": str(target.data_dir), "split": target.split,
        "trained_on": " + ".join(training_datasets(cfg)), "findings": shared,
        "not_graded_by_dataset": [f for f in findings if f not in graded],
        "not_predicted_by_model": [f for f in graded if f not in findings],
        "n_images": int(len(names)), "split_source": loaded.split_source, "image_overlap": overlap,
        "synthetic": synthetic,
    })
    report.plot_run(out)
    print("\n" + report.format_report(f"{target.dataset} {target.split}", metrics[target.split]))
    if synthetic:
        print(f"\n{SYNTHETIC_NOTE}")
    print(f"\nexternal results: {out}")
    return metrics


def check_external_folders(cfg) -> None:
    """Before training: every ``evaluation.external`` folder exists (a typo found after hours of training
    would cost the evaluation)."""
    for target in cfg.evaluation.external:
        if not Path(target.data_dir).is_dir():
            raise UserError(f"evaluation.external: data_dir {target.data_dir} of {target.dataset} does not exist; "
                            f"fix the path before training")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem evaluate", description="Evaluate a trained run on another data set (external validation), on "
        "the findings the two share; results go to RUN/external/<dataset>/.")
    parser.add_argument("--run", required=True, help="run folder of a finished run")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES,
                        help="the data set at --data_dir")
    parser.add_argument("--data_dir", required=True, help="the data set's folder, as its publisher ships it")
    parser.add_argument("--split", default=ExternalConfig().split, choices=EXTERNAL_SPLITS,
                        help=f"which of its splits (default {ExternalConfig().split})")
    parser.add_argument("--model_path", help="checkpoint (default: the run's final one)")
    return add_shared_options(parser, "debug")


@guarded
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    folder = RunFolder.open(args.run)
    model = folder.load_model(args.model_path)
    target = ExternalConfig(dataset=args.dataset, data_dir=args.data_dir, split=args.split)
    evaluate_on(folder.cfg, model, target, distributed.device())
    return 0
