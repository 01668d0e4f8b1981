"""The data sets by name (``data.dataset``), and the model's findings.

One module per data set knows everything about it; this table is the only place that lists
them. ChestX-ray14 is the default; the names are the schema's ``DATASET_NAMES``.
"""

from __future__ import annotations

from typing import Dict

from ..utils.errors import UserError, closest
from . import chestxray14, chexpert, mimic_cxr, nih_google, padchest, vindr_cxr
from .findings import dataset_findings, label_space
from .release import DataSet

DATASETS: Dict[str, DataSet] = {m.DATASET.name: m.DATASET
                                for m in (chestxray14, chexpert, mimic_cxr, padchest, vindr_cxr, nih_google)}


def get_dataset(name: str) -> DataSet:
    if name not in DATASETS:
        guess = closest(name, list(DATASETS))
        hint = f"did you mean {guess!r}? " if guess else ""
        raise UserError(f"unknown data set {name!r}; {hint}choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def training_datasets(cfg) -> list[str]:
    """The data sets a run trains on: ``data.datasets``' members, else ``data.dataset``."""
    return [m.dataset for m in cfg.data.datasets] or [cfg.data.dataset]


def model_findings(cfg) -> list[str]:
    """The findings the model predicts, in output order: ``model.findings``, else those the training data
    sets grade, in label-space order (ChestX-ray14's 14 by default). A UserError for a name outside the
    label space, or a ``model.num_classes`` that disagrees."""
    chosen = cfg.model.findings
    space = label_space()
    for name in chosen or ():
        if name not in space:
            guess = closest(name, list(space))
            hint = f"did you mean {guess!r}? " if guess else ""
            raise UserError(f"model.findings: {name!r} is no finding of the label space; {hint}see docs/datasets.md "
                            f"for the findings of every data set")
    names = training_datasets(cfg)
    graded = {f for name in names for f in dataset_findings(name)}
    findings = list(chosen) if chosen else [f for f in space if f in graded]
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(findings):
        source = "model.findings" if chosen else " + ".join(names)
        raise UserError(f"model.num_classes is {cfg.model.num_classes} but the model predicts {len(findings)} findings "
                        f"({source}); set num_classes to {len(findings)} or null")
    return findings
