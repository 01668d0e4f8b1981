"""CheXpert (Stanford), v1.0 and CheXpert-v1.0-small, as shipped.

Layout: ``data_dir`` is the unpacked folder (``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``) holding
``train.csv`` and ``valid.csv``; their ``Path`` column is relative to the folder *above* it
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``), so a renamed folder is found
by the rest of the path. Columns: ``Path, Sex, Age, Frontal/Lateral, AP/PA``, then 14 labels, each
1.0, 0.0, -1.0 (uncertain) or blank (not mentioned in the report). Blank counts as negative, as
the labeller's authors train (the data summary counts it as missing, as the file gives it).

Split: ``valid.csv`` (234 images of 200 patients, labelled by radiologists, no uncertain label) is
the test split; validation patients are drawn from ``train.csv``. The patient is the
``patientNNNNN`` folder; sex ``Male``/``Female``; age in years; the view ``AP``/``PA`` for
frontal images (``LATERAL`` for the others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .findings import label_map
from .release import DataSet, Release, empty_boxes, find_file, label_values, read_csv

NAME = "chexpert"
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
IMAGE_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
LABELS = tuple(label_map(NAME))  # the 14 label columns, as the file names them
SEXES = {"Male": "M", "Female": "F"}
LAYOUT = "train.csv, valid.csv and the train/ and valid/ image folders"


def image_path(data_dir: Path, relative: str) -> Path:
    """``Path`` is relative to the folder above the download; a renamed download is found by the rest."""
    parts = Path(relative).parts
    above = data_dir.parent / relative
    return above if above.is_file() or len(parts) < 2 else data_dir.joinpath(*parts[1:])


def read_table(path: Path, official: str, data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = read_csv(path, (*IMAGE_COLUMNS, *LABELS), f"CheXpert's header ({', '.join(IMAGE_COLUMNS)}, ...)")
    frontal = raw["Frontal/Lateral"].str.strip().str.lower().eq("frontal")
    images = pd.DataFrame({
        "image_index": raw["Path"].str.strip(),
        "patient_id": raw["Path"].str.extract(r"(patient\d+)", expand=False).fillna(""),
        "patient_age": raw["Age"].str.strip(),
        "patient_gender": raw["Sex"].str.strip().map(SEXES).fillna(""),
        "view_position": np.where(frontal, raw["AP/PA"].str.strip().str.upper(), "LATERAL"),
        "frontal": frontal.to_numpy(),
        "path": [str(image_path(data_dir, p.strip())) for p in raw["Path"]],
        "official": official,
    })
    labels = pd.DataFrame({label: label_values(raw[label], path) for label in LABELS})
    return images, labels


def read(data_dir: Path, data_cfg=None) -> Release:
    data_dir = Path(data_dir)
    parts = [read_table(find_file(data_dir, [TRAIN_CSV], NAME, LAYOUT), "train_val", data_dir),
             read_table(find_file(data_dir, [VALID_CSV], NAME, LAYOUT), "test", data_dir)]
    images = pd.concat([p[0] for p in parts], ignore_index=True)
    labels = pd.concat([p[1] for p in parts], ignore_index=True)
    return Release(images, labels, empty_boxes(), blank_is_negative=True)


DATASET = DataSet(NAME, "CheXpert v1.0 (Stanford)", LAYOUT, read)
