"""VinDr-CXR (Vingroup Big Data Institute), as shipped on PhysioNet or as Kaggle's VinBigData competition.

PhysioNet layout: ``data_dir/annotations/image_labels_train.csv`` (one row per image and radiologist:
``image_id, rad_id``, then one 0/1 column per label), ``image_labels_test.csv`` (the test images'
consensus labels; ``rad_id`` optional), ``annotations_{train,test}.csv`` (boxes: ``image_id, rad_id,
class_name, x_min, y_min, x_max, y_max``), images ``train/<image_id>.dicom`` and ``test/...``.
Kaggle layout: ``data_dir/train.csv`` (one row per box or per "No finding" reading: ``image_id,
class_name, class_id, rad_id, x_min, y_min, x_max, y_max``) and ``train/<image_id>.dicom``.

A finding is positive when any radiologist who read the image marks it (``data.radiologists:
any``, as torchxrayvision reads it) or when more than half of them do (``majority``), negative
otherwise. DICOM images (some MONOCHROME1, inverted on reading). Every image is a frontal (PA)
view; images are anonymised without a patient id, so each image is its own patient. Split:
PhysioNet's test images are the test split; the Kaggle release has test labels only on
Kaggle's server, so its split is derived. Boxes are in pixels of the stored image; they are
rescaled to the 1024 px frame of every data set's boxes by each image's stored size (its DICOM
header), so that they feed the pointing game as ChestX-ray14's do.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .findings import label_map
from .images import stored_size
from .release import BOX_FRAME, DataSet, Release, empty_boxes, read_csv
from ..utils.errors import UserError

NAME = "vindr_cxr"
ANNOTATIONS = "annotations"
PHYSIONET_LABELS = {"train_val": "image_labels_train.csv", "test": "image_labels_test.csv"}
PHYSIONET_BOXES = {"train_val": "annotations_train.csv", "test": "annotations_test.csv"}
IMAGE_FOLDERS = {"train_val": "train", "test": "test"}
KAGGLE_FILE = "train.csv"
BOX_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
LABELS = tuple(label_map(NAME))
KAGGLE_CLASSES = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")  # class_id 0..14
LAYOUT = "annotations/image_labels_{train,test}.csv and train/, test/ (PhysioNet) or train.csv and train/ (Kaggle)"


def combine(readings: pd.DataFrame, labels: list[str], rule: str) -> pd.DataFrame:
    """One row per radiologist's reading (0/1 per label) -> one row per image: positive when any reader
    marks it (``any``) or more than half of them do (``majority``)."""
    grouped = readings.groupby("image_id", sort=False)[labels]
    share = grouped.mean()
    return (share > 0).astype(float) if rule == "any" else (share > 0.5).astype(float)


def box_frame(raw: pd.DataFrame) -> pd.DataFrame:
    meaning = label_map(NAME)
    raw = raw[raw["class_name"].str.strip().map(meaning).notna()]
    coords = raw[list(BOX_COLUMNS[2:])].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    keep = coords.notna().all(axis=1)
    raw, coords = raw[keep], coords[keep]
    return pd.DataFrame({"image_index": raw["image_id"].str.strip(), "finding": raw["class_name"].str.strip().map(meaning),
                         "x": coords["x_min"], "y": coords["y_min"], "w": coords["x_max"] - coords["x_min"],
                         "h": coords["y_max"] - coords["y_min"]}).reset_index(drop=True)


def to_box_frame(boxes: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Boxes in stored pixels -> the BOX_FRAME px frame, by each boxed image's stored size; boxes of an
    image that is not on disk are dropped (the image is, too)."""
    if boxes.empty:
        return boxes
    paths = dict(zip(images["image_index"], images["path"]))
    sizes = {}
    for image in boxes["image_index"].unique():
        path = paths.get(image)
        if path is not None and Path(path).is_file():
            sizes[image] = stored_size(path)
    boxes = boxes[boxes["image_index"].isin(sizes)].reset_index(drop=True)
    width = boxes["image_index"].map(lambda i: sizes[i][0]).astype(float)
    height = boxes["image_index"].map(lambda i: sizes[i][1]).astype(float)
    return boxes.assign(x=boxes["x"] * BOX_FRAME / width, w=boxes["w"] * BOX_FRAME / width,
                        y=boxes["y"] * BOX_FRAME / height, h=boxes["h"] * BOX_FRAME / height)


def images_frame(data_dir: Path, ids: pd.Index, official: str) -> pd.DataFrame:
    folder = data_dir / IMAGE_FOLDERS[official]
    return pd.DataFrame({"image_index": ids, "patient_id": ids, "patient_age": "", "patient_gender": "",
                         "view_position": "PA", "frontal": True,
                         "path": [str(folder / f"{i}.dicom") for i in ids], "official": official})


def read_physionet(data_dir: Path, rule: str) -> Release:
    images, labels, boxes = [], [], []
    for official, name in PHYSIONET_LABELS.items():
        path = data_dir / ANNOTATIONS / name
        raw = read_csv(path, ("image_id",), "image_id, rad_id and one column per label")
        present = [label for label in LABELS if label in raw.columns]
        if not present:
            raise UserError(f"{path}: none of VinDr-CXR's label columns ({', '.join(LABELS[:4])}, ...); "
                            f"restore the original file")
        values = raw[present].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce")).fillna(0.0)
        per_image = combine(pd.concat([raw[["image_id"]].apply(lambda c: c.str.strip()), values], axis=1),
                            present, rule)
        images.append(images_frame(data_dir, per_image.index, official))
        labels.append(per_image.reset_index(drop=True).reindex(columns=list(LABELS)))
        box_path = data_dir / ANNOTATIONS / PHYSIONET_BOXES[official]
        if box_path.is_file():
            boxes.append(box_frame(read_csv(box_path, BOX_COLUMNS, ", ".join(BOX_COLUMNS))))
    images = pd.concat(images, ignore_index=True)
    boxes = to_box_frame(pd.concat(boxes, ignore_index=True), images) if boxes else empty_boxes()
    return Release(images, pd.concat(labels, ignore_index=True), boxes)


def read_kaggle(data_dir: Path, rule: str) -> Release:
    path = data_dir / KAGGLE_FILE
    raw = read_csv(path, ("image_id", "class_name", "rad_id"), "VinBigData's header (image_id, class_name, class_id, "
                   "rad_id, x_min, y_min, x_max, y_max)")
    raw = raw.apply(lambda c: c.str.strip())
    unknown = sorted(set(raw["class_name"]) - set(KAGGLE_CLASSES))
    if unknown:
        raise UserError(f"{path}: unknown class name(s) {', '.join(map(repr, unknown[:3]))}; restore the original file")
    present = [label for label in LABELS if label in set(raw["class_name"])]
    marks = pd.crosstab([raw["image_id"], raw["rad_id"]], raw["class_name"]).clip(upper=1).astype(float)
    readings = marks.reindex(columns=present, fill_value=0.0).reset_index()
    per_image = combine(readings, present, rule)
    labels = per_image.reset_index(drop=True).reindex(columns=list(LABELS))  # labels of PhysioNet's only: missing
    labels[[c for c in KAGGLE_CLASSES if c not in present]] = 0.0  # a class of the release nobody marked: negative
    images = images_frame(data_dir, per_image.index, "train_val").assign(official="")
    boxes = to_box_frame(box_frame(raw), images) if set(BOX_COLUMNS) <= set(raw.columns) else empty_boxes()
    return Release(images, labels, boxes, no_split_reason="the Kaggle release of VinDr-CXR has no test labels")


def read(data_dir: Path, data_cfg=None) -> Release:
    data_dir = Path(data_dir)
    rule = getattr(data_cfg, "radiologists", "any")
    if (data_dir / ANNOTATIONS / PHYSIONET_LABELS["train_val"]).is_file():
        return read_physionet(data_dir, rule)
    if (data_dir / KAGGLE_FILE).is_file():
        return read_kaggle(data_dir, rule)
    raise UserError(f"no {ANNOTATIONS}/{PHYSIONET_LABELS['train_val']} (PhysioNet) or {KAGGLE_FILE} (Kaggle) in "
                    f"{data_dir}; point data.data_dir (or --data_dir) at the VinDr-CXR folder ({LAYOUT})")


DATASET = DataSet(NAME, "VinDr-CXR (PhysioNet, or Kaggle's VinBigData)", LAYOUT, read)
