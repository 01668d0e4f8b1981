"""MIMIC-CXR-JPG v2 (PhysioNet), as shipped.

Layout: ``data_dir`` holds ``mimic-cxr-2.0.0-chexpert.csv`` (or ``-negbio``, chosen by
``data.mimic_labeler``), ``mimic-cxr-2.0.0-metadata.csv`` and ``mimic-cxr-2.0.0-split.csv`` (each
also as the published ``.csv.gz``) and the images ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``
(XX: the subject's first two digits). Labels are per study (``subject_id, study_id``), 1.0, 0.0,
-1.0 (uncertain) or blank (not mentioned: negative, as for CheXpert); every image of the study
takes them. The view is the metadata's ``ViewPosition`` (PA, AP frontal; LATERAL, LL and others
not). Split: the file's ``test`` images are the test split, ``train`` and ``validate`` the rest,
validation patients drawn from them. Sex and age are not part of MIMIC-CXR-JPG (they are in
MIMIC-IV): empty.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .findings import label_map
from .release import FRONTAL_VIEWS, DataSet, Release, empty_boxes, find_file, label_values, read_csv

NAME = "mimic_cxr"
PREFIX = "mimic-cxr-2.0.0"
LABEL_FILES = {"chexpert": f"{PREFIX}-chexpert.csv", "negbio": f"{PREFIX}-negbio.csv"}
METADATA_FILE, SPLIT_FILE = f"{PREFIX}-metadata.csv", f"{PREFIX}-split.csv"
LABELS = tuple(label_map(NAME))
LAYOUT = f"{PREFIX}-chexpert.csv, -metadata.csv, -split.csv and files/pXX/..."
OFFICIAL = {"train": "train_val", "validate": "train_val", "test": "test"}


def image_path(data_dir: Path, subject: str, study: str, dicom: str) -> Path:
    return data_dir / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def read(data_dir: Path, data_cfg=None) -> Release:
    data_dir = Path(data_dir)
    labeler = getattr(data_cfg, "mimic_labeler", "chexpert")
    label_path = find_file(data_dir, [LABEL_FILES[labeler]], NAME, LAYOUT)
    studies = read_csv(label_path, ("subject_id", "study_id", *LABELS), "subject_id, study_id and the 14 labels")
    metadata = read_csv(find_file(data_dir, [METADATA_FILE], NAME, LAYOUT), ("dicom_id", "subject_id", "study_id",
                        "ViewPosition"), "dicom_id, subject_id, study_id, ViewPosition, ...")
    split = read_csv(find_file(data_dir, [SPLIT_FILE], NAME, LAYOUT), ("dicom_id", "split"), "dicom_id, split")
    rows = metadata.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    rows = rows.merge(studies, on=["subject_id", "study_id"], how="inner")  # a study without a report has no labels
    view = rows["ViewPosition"].str.strip().str.upper()
    images = pd.DataFrame({
        "image_index": rows["dicom_id"].str.strip(),
        "patient_id": rows["subject_id"].str.strip(),
        "patient_age": "",
        "patient_gender": "",
        "view_position": view,
        "frontal": view.isin(FRONTAL_VIEWS).to_numpy(),
        "path": [str(image_path(data_dir, s.strip(), t.strip(), d.strip()))
                 for s, t, d in zip(rows["subject_id"], rows["study_id"], rows["dicom_id"])],
        "official": rows["split"].fillna("").str.strip().map(OFFICIAL).fillna("train_val"),
    })
    labels = pd.DataFrame({label: label_values(rows[label], label_path) for label in LABELS})
    return Release(images, labels, empty_boxes(), blank_is_negative=True)


DATASET = DataSet(NAME, "MIMIC-CXR-JPG v2.0.0 (PhysioNet)", LAYOUT, read)
