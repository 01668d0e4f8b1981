"""ChestX-ray14 images with the expert labels of Google Health (Majkowska et al., Radiology 2020).

Layout: the ChestX-ray14 folder (images under ``images_*/images`` or ``images``) with the Google
label file put beside ``Data_Entry_2017.csv``: either the combined
``google2019_nih-chest-xray-labels.csv`` (ChestX-ray14's columns, then ``Fracture, Pneumothorax,
Airspace opacity, Nodule or mass, Set Id``) or the two files of the release,
``four_findings_expert_labels_validation_labels.csv`` and ``..._test_labels.csv``. Labels ``YES``
or ``NO`` (anything else: missing). ``Set Id`` (or the file) gives the split: ``test`` images are
the test split, ``val`` the rest. 4,376 images of 1,695 patients, every one a ChestX-ray14 image:
a model trained on ChestX-ray14 has seen those its own split put in train or valid, so
``cxrmem evaluate`` refuses to call this set external unless the images are disjoint.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .chestxray14 import locate_images, patient_ids
from .findings import label_map
from .release import FRONTAL_VIEWS, DataSet, Release, empty_boxes, label_values, read_csv
from ..utils.errors import UserError

NAME = "nih_google"
COMBINED_FILE = "google2019_nih-chest-xray-labels.csv"
SET_FILES = {"val": "four_findings_expert_labels_validation_labels.csv",
             "test": "four_findings_expert_labels_test_labels.csv"}
LABELS = tuple(label_map(NAME))
OFFICIAL = {"val": "train_val", "validation": "train_val", "test": "test"}
LAYOUT = f"the ChestX-ray14 images and {COMBINED_FILE} (or the two four_findings_expert_labels_*.csv files)"


def read_tables(data_dir: Path) -> list[tuple[pd.DataFrame, Path]]:
    for name in (COMBINED_FILE, f"{COMBINED_FILE}.gz"):
        if (data_dir / name).is_file():
            raw = read_csv(data_dir / name, ("Image Index", "Set Id", *LABELS), f"Image Index, ..., {', '.join(LABELS)}, Set Id")
            return [(raw, data_dir / name)]
    if all((data_dir / n).is_file() for n in SET_FILES.values()):
        return [(read_csv(data_dir / n, ("Image Index", *LABELS), f"Image Index, ..., {', '.join(LABELS)}")
                 .assign(**{"Set Id": s}), data_dir / n) for s, n in SET_FILES.items()]
    raise UserError(f"no {COMBINED_FILE} or {' and '.join(SET_FILES.values())} in {data_dir}; put the Google expert "
                    f"labels beside the ChestX-ray14 images and point data.data_dir there")


def read(data_dir: Path, data_cfg=None) -> Release:
    data_dir = Path(data_dir)
    found = locate_images(data_dir)
    images, labels = [], []
    for raw, path in read_tables(data_dir):
        names = raw["Image Index"].str.strip()
        view = raw["View Position"].str.strip().str.upper() if "View Position" in raw else pd.Series("PA", index=raw.index)
        images.append(pd.DataFrame({
            "image_index": names,
            "patient_id": patient_ids(names),
            "patient_age": raw["Patient Age"].str.strip() if "Patient Age" in raw else "",
            "patient_gender": raw["Patient Gender"].str.strip().str.upper() if "Patient Gender" in raw else "",
            "view_position": view,
            "frontal": view.isin(FRONTAL_VIEWS).to_numpy(),
            "path": [str(found.get(n, data_dir / "images" / n)) for n in names],
            "official": raw["Set Id"].str.strip().str.lower().map(OFFICIAL).fillna("train_val"),
        }))
        labels.append(pd.DataFrame({label: label_values(raw[label], path, positive=("YES",), negative=("NO",),
                                                        uncertain=(), missing=("",)) for label in LABELS}))
    return Release(pd.concat(images, ignore_index=True), pd.concat(labels, ignore_index=True), empty_boxes())


DATASET = DataSet(NAME, "ChestX-ray14 with Google's expert labels", LAYOUT, read)
