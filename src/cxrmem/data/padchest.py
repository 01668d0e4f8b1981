"""PadChest (BIMCV, Hospital San Juan, Alicante), as shipped.

Layout: ``data_dir`` holds the label file ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``
(or ``.csv.gz``) and the images in the numbered folders of the download, ``<ImageDir>/<ImageID>``
(16-bit grayscale PNGs, read by their bit depth as every 16-bit PNG is). One row per image:
``ImageID, ImageDir, PatientID, PatientBirth, PatientSex_DICOM, StudyDate_DICOM, Projection,
Labels, ...``; ``Labels`` is the list of the report's findings written as a Python list
(``['pleural effusion', 'cardiomegaly']``, ``['normal']``). A label of label_map.csv is positive
when the list holds it exactly (never a substring match), negative otherwise; a row whose list is
empty or unreadable has every label missing. Projections: PA, AP and AP_horizontal are frontal;
L (lateral) and the others are not. Age: the study year less the birth year. No official split:
a seeded patient-level split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from .findings import label_map
from .release import DataSet, Release, empty_boxes, find_file, read_csv

NAME = "padchest"
LABEL_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = ("ImageID", "ImageDir", "PatientID", "PatientBirth", "PatientSex_DICOM", "StudyDate_DICOM", "Projection",
           "Labels")
LABELS = tuple(label_map(NAME))
FRONTAL_PROJECTIONS = ("PA", "AP", "AP_HORIZONTAL")
LAYOUT = f"{LABEL_FILE} and the numbered image folders 0/, 1/, ..."


def parse_labels(cell: str) -> list[str] | None:
    """``"['a', 'b']"`` -> ['a', 'b'] (stripped, lower case); None for an empty or unreadable cell."""
    try:
        value = ast.literal_eval(cell.strip()) if cell and cell.strip() else None
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)) or not value:
        return None
    return [str(v).strip().lower() for v in value if str(v).strip()]


def age(birth: str, study_date: str) -> str:
    try:
        years = int(str(study_date).strip()[:4]) - int(float(birth))
    except ValueError:
        return ""
    return str(years) if 0 <= years <= 120 else ""


def read(data_dir: Path, data_cfg=None) -> Release:
    data_dir = Path(data_dir)
    path = find_file(data_dir, [LABEL_FILE], NAME, LAYOUT)
    raw = read_csv(path, COLUMNS, f"PadChest's header ({', '.join(COLUMNS)}, ...)")
    projection = raw["Projection"].str.strip().str.upper()
    images = pd.DataFrame({
        "image_index": raw["ImageID"].str.strip(),
        "patient_id": raw["PatientID"].str.strip(),
        "patient_age": [age(b, d) for b, d in zip(raw["PatientBirth"], raw["StudyDate_DICOM"])],
        "patient_gender": raw["PatientSex_DICOM"].str.strip().str.upper().where(lambda s: s.isin(["M", "F"]), ""),
        "view_position": projection,
        "frontal": projection.isin(FRONTAL_PROJECTIONS).to_numpy(),
        "path": [str(data_dir / str(d).strip() / str(i).strip()) for d, i in zip(raw["ImageDir"], raw["ImageID"])],
        "official": "",
    })
    lists = [parse_labels(cell) for cell in raw["Labels"]]
    values = np.array([[np.nan] * len(LABELS) if found is None else [float(label in found) for label in LABELS]
                       for found in lists], dtype=float).reshape(len(lists), len(LABELS))
    labels = pd.DataFrame(values, columns=list(LABELS))
    return Release(images, labels, empty_boxes(), no_split_reason="PadChest has no official split")


DATASET = DataSet(NAME, "PadChest (BIMCV)", LAYOUT, read)
