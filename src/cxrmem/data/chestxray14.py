"""ChestX-ray14 on disk, as plain pandas: read the metadata, label, locate images, read the lists, summarise.

The layout: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``), the official
lists, images under ``images_*/images`` or ``images``, and optionally the bounding boxes
``BBox_List_2017.csv`` (:func:`read_bboxes`). Which image goes to which split is
decided by :mod:`cxrmem.data.split`; nothing here imports fastai.

The frame every function passes along has one row per image with the columns
``image_index`` (file name), ``patient_id``, ``patient_age``, ``patient_gender``,
``view_position`` (the CSV's cells as text, empty where it lacks the column), ``path``
(absolute, once located), one 0/1 column per finding (in :data:`FINDINGS` order) and, once split,
``split`` in {"train", "valid", "test"}.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from ..evaluation.auc import is_missing
from ..evaluation.subgroups import Subgroup
from ..utils.errors import UserError, closest, describe_error
from .findings import FINDINGS, NO_FINDING
from .images import IMAGE_SUFFIXES
from .release import DataSet, Loaded, count_labels, view_filter
from .split import SPLITS, TEST_LIST, TRAIN_VAL_LIST, OfficialLists, assign_splits

CSV_NAME = "Data_Entry_2017.csv"  # the 2017 file; the 2020 revision is also accepted under its own name
METADATA_FILES = (CSV_NAME, "Data_Entry_2017_v2020.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
# CSV column -> frame column of the image metadata kept for reporting (empty where the CSV lacks it).
METADATA_COLUMNS = {"Patient Age": "patient_age", "Patient Gender": "patient_gender", "View Position": "view_position"}

BBOX_FILE = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # the split header cell: x, y, w, h in 4 columns
BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
BBOX_ALIASES = {"Infiltrate": "Infiltration"}  # the box file's label -> the finding


# --------------------------------------------------------------------------- metadata


def find_metadata_csv(data_dir: Path) -> Path:
    for name in METADATA_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise UserError(f"no {' or '.join(METADATA_FILES)} in {data_dir}; point data.data_dir (or --data_dir) "
                    f"at the ChestX-ray14 folder")


def read_entries(csv_path: Path) -> pd.DataFrame:
    """Read either CSV variant into the frame (without paths or splits).

    The 2017 file ends every row with a comma (an unnamed 12th column), the 2020
    revision does not; only the three required columns are used, so both read alike.
    """
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv_path} is empty (no header, no rows); restore the original file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({describe_error(exc)}); "
                        f"restore the original file") from None
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise UserError(f"{csv_path}: missing required column(s) {', '.join(missing)}; "
                        f"expected the ChestX-ray14 header ({', '.join(REQUIRED_COLUMNS)}, ...)")
    frame = pd.DataFrame({
        "image_index": raw["Image Index"].str.strip(),
        "patient_id": raw["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
        **{name: raw[column].str.strip() if column in raw else "" for column, name in METADATA_COLUMNS.items()},
    })
    refuse_repeated_images(frame, raw["Finding Labels"], csv_path)
    labels = encode_labels(raw["Finding Labels"], csv_path)
    return pd.concat([frame, labels], axis=1)


def refuse_repeated_images(frame: pd.DataFrame, finding_labels: pd.Series, source) -> None:
    """UserError when an image is listed twice: it would be scored twice, or sit under two patients
    with two label sets (maybe in train and valid at once). Names the rows (lines of the file)."""
    repeated = frame["image_index"].duplicated(keep=False)
    if not repeated.any():
        return
    name = frame.loc[repeated, "image_index"].iloc[0]
    rows = frame.index[frame["image_index"] == name]
    lines = ", ".join(str(int(i) + 2) for i in rows[:5])  # the header is line 1
    patients = frame.loc[rows, "patient_id"].unique()
    labels = finding_labels.loc[rows].str.strip().unique()
    how = (f"under patients {', '.join(patients)}" if len(patients) > 1 else
           f"with labels {' and '.join(map(repr, labels))}" if len(labels) > 1 else "as an exact copy")
    others = int(frame.loc[repeated, "image_index"].nunique()) - 1
    more = f" ({others} other image(s) are repeated too)" if others else ""
    raise UserError(f"{source}: image {name} is listed {len(rows)} times (lines {lines}), {how}{more}; "
                    f"keep one row per image")


def patient_ids(image_index) -> np.ndarray:
    """Patient of every image: ChestX-ray14 names images ``<patient>_<follow-up>.png`` (folders ignored)."""
    return np.array([Path(str(name)).name.split("_", 1)[0] for name in image_index])


def encode_labels(finding_labels: pd.Series, source) -> pd.DataFrame:
    """'A|B' strings -> one 0/1 column per finding. Split on '|', never substring-matched."""
    tokens = finding_labels.fillna("").str.split("|")
    exploded = tokens.explode().str.strip()
    unknown = sorted(set(exploded) - set(FINDINGS) - {NO_FINDING, ""})
    if unknown:
        first = unknown[0]
        line = int(exploded.index[exploded.to_numpy() == first][0]) + 2  # the header is line 1
        guess = closest(first, [*FINDINGS, NO_FINDING])
        hint = f"did you mean {guess!r}? " if guess else ""
        more = f" (and {len(unknown) - 1} other unknown label(s): {', '.join(map(repr, unknown[1:4]))})" \
            if len(unknown) > 1 else ""
        raise UserError(f"{source}: line {line} has the unknown finding label {first!r}{more}; {hint}"
                        f"labels must be among the 14 findings ({', '.join(FINDINGS)}) or '{NO_FINDING}'")
    onehot = pd.crosstab(exploded.index, exploded).reindex(index=finding_labels.index, columns=FINDINGS,
                                                          fill_value=0)
    return (onehot > 0).astype(np.int8).set_axis(finding_labels.index)


# --------------------------------------------------------------------------- bounding boxes


def empty_bboxes() -> pd.DataFrame:
    return pd.DataFrame({"image_index": pd.Series(dtype=str), "finding": pd.Series(dtype=str),
                         **{c: pd.Series(dtype=float) for c in "xywh"}})


def read_bboxes(data_dir) -> pd.DataFrame:
    """``BBox_List_2017.csv`` of ``data_dir`` -> frame [image_index, finding, x, y, w, h].

    The file's header cell ``Bbox [x,y,w,h]`` is split by its commas into the columns
    ``Bbox [x``, ``y``, ``w``, ``h]`` (three empty columns follow); coordinates are pixels
    of the 1024 px originals (:data:`cxrmem.data.release.BOX_FRAME`), x right and y down from the top left corner.
    "Infiltrate" is the finding Infiltration. No file: an empty frame. A file without
    those columns, with a non-numeric or negative-sized box, or an unknown finding: UserError.
    """
    path = Path(data_dir) / BBOX_FILE
    if not path.is_file():
        return empty_bboxes()
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = describe_error(exc)
        raise UserError(f"{path}: not a readable CSV ({reason}); restore the original file") from None
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in BBOX_COLUMNS if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected ChestX-ray14's header "
                        f"{BBOX_HEADER!r}")
    labels = raw["Finding Label"].str.strip()
    findings = labels.map(lambda label: BBOX_ALIASES.get(label, label))
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise UserError(f"{path}: unknown finding label(s) {', '.join(map(repr, unknown[:5]))}; "
                        f"labels must be among the 14 findings or 'Infiltrate'")
    coords = raw[list(BBOX_COLUMNS[2:])].apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    bad = coords.isna().any(axis=1) | (coords[["w", "h]"]] < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{path}: line {row + 2} has no valid box x, y, w, h >= 0 "
                        f"({', '.join(map(str, raw.loc[row, list(BBOX_COLUMNS[2:])]))}); restore the original file")
    coords.columns = list("xywh")
    frame = pd.DataFrame({"image_index": raw["Image Index"].str.strip(), "finding": findings})
    return pd.concat([frame, coords.astype(float)], axis=1)


# --------------------------------------------------------------------------- images on disk


def image_folders(root: Path) -> list[Path]:
    """The image folders of a data set that exist: ``images_*/images`` (sorted), then ``images``."""
    folders = sorted(Path(root).glob("images_*/images")) + [Path(root) / "images"]
    return [f for f in folders if f.is_dir()]


def locate_images(data_dir: Path) -> dict[str, Path]:
    """Map file name -> path over the image folders (the first folder holding a name wins)."""
    found: dict[str, Path] = {}
    for folder in image_folders(data_dir):
        for entry in folder.iterdir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(entry.name, entry)
    return found


def attach_paths(frame: pd.DataFrame, data_dir: Path, missing_images: str = "error"):
    """Add ``path``; handle images listed in the CSV but absent on disk.

    Returns (frame, missing names). ``missing_images='error'`` raises a UserError
    with the count and examples; ``'drop'`` drops them with a warning.
    """
    found = locate_images(data_dir)
    by_stem: dict[str, Path] = {}
    for name, path in found.items():  # a JPEG cache keeps the stems of the PNG names
        by_stem.setdefault(Path(name).stem, path)
    paths = frame["image_index"].map(lambda name: found.get(name) or by_stem.get(Path(name).stem))
    missing = frame.loc[paths.isna(), "image_index"].tolist()
    if missing and missing_images == "error":
        raise UserError(f"{len(missing)} of {len(frame)} images listed in the CSV are not on disk under "
                        f"{data_dir}/images_*/images (e.g. {', '.join(missing[:3])}); restore them or set "
                        f"data.missing_images: drop")
    if missing:
        warnings.warn(f"{len(missing)} images listed in the CSV are missing on disk and were dropped", stacklevel=2)
    out = frame.assign(path=paths.map(lambda p: str(p) if p is not None and p == p else None))
    return out[out["path"].notna()].reset_index(drop=True), missing


# --------------------------------------------------------------------------- official lists


def read_list(path: Path) -> set[str]:
    """The image names of a list file (one a line)."""
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def list_text(names) -> str:
    """A list file's content: the names sorted, one a line."""
    return "".join(f"{n}\n" for n in sorted(names))


def read_official_lists(data_dir: Path) -> tuple[OfficialLists | None, str]:
    """(the official lists, or None with the reason they cannot be used)."""
    train_val_path, test_path = data_dir / TRAIN_VAL_LIST, data_dir / TEST_LIST
    if train_val_path.is_file() and test_path.is_file():
        return OfficialLists(frozenset(read_list(train_val_path)), frozenset(read_list(test_path))), ""
    absent = TRAIN_VAL_LIST if not train_val_path.is_file() else TEST_LIST
    return None, f"{absent} not found in {data_dir}"


def load_frame(data_dir: Path, valid_pct: float, seed: int, missing_images: str = "error"):
    """Metadata -> labelled, located and split frame. Returns (frame, split_source, missing names)."""
    data_dir = Path(data_dir)
    frame = read_entries(find_metadata_csv(data_dir))
    frame, missing = attach_paths(frame, data_dir, missing_images)
    lists, reason = read_official_lists(data_dir)
    frame, source = assign_splits(frame, lists, valid_pct, seed, reason)
    return frame, source, missing


# --------------------------------------------------------------------------- subgroups: sex, age band, view

_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
MAX_AGE = 120


def age_in_years(value) -> Optional[float]:
    """An age as written in ChestX-ray14's 'Patient Age': an int (58) or a DICOM age string
    ('058Y'; M, W, D are months, weeks, days). None when unreadable or outside 0..120 years
    (the 2017 file holds a few impossible ages such as 412).
    """
    if is_missing(value):
        return None
    match = _AGE_PATTERN.match(str(value))
    if match is None:
        return None
    years = float(match.group(1)) * _AGE_UNITS[match.group(2).upper() or "Y"]
    return years if 0 <= years <= MAX_AGE else None


def age_band(value) -> Optional[str]:
    """'<40', '40-59' or '60+' by age in years; None when the age is unreadable."""
    years = age_in_years(value)
    if years is None:
        return None
    return "<40" if years < 40 else "40-59" if years < 60 else "60+"


def category(value) -> Optional[str]:
    """A categorical cell stripped and upper-cased ('m ' -> 'M'); None when empty or missing."""
    if is_missing(value):
        return None
    text = str(value).strip().upper()
    return text or None



# Columns as in the data frame of cxrmem.data.chestxray14 (from the CSV's 'Patient Gender',
# 'Patient Age' and 'View Position').
SUBGROUPS: Dict[str, Subgroup] = {
    "sex": Subgroup("patient_gender", category, ("F", "M")),
    "age": Subgroup("patient_age", age_band, ("<40", "40-59", "60+")),
    "view": Subgroup("view_position", category, ("PA", "AP")),
}


# --------------------------------------------------------------------------- the registry entry


class ChestXray14(DataSet):
    """ChestX-ray14's entry: its own road (:func:`load_frame`), kept as it always was, so every experiment
    file trains on exactly the frame it did; only the label counts and the view filter are added."""

    def load(self, data_dir: Path, data_cfg, findings) -> Loaded:
        frame, source, missing = load_frame(data_dir, data_cfg.valid_pct, data_cfg.seed, data_cfg.missing_images)
        counts = {split: count_labels(frame.loc[frame["split"].eq(split), FINDINGS].astype(float))
                  for split in SPLITS}
        if data_cfg.views not in ("frontal", "all"):  # every ChestX-ray14 image is a frontal PA or AP view
            frame = frame[view_filter(frame, data_cfg.views).to_numpy()].reset_index(drop=True)
        absent = [f for f in findings if f not in FINDINGS]
        if absent:  # findings ChestX-ray14 does not grade: missing
            frame = frame.assign(**{f: np.nan for f in absent})
        return Loaded(frame, source, missing, counts, read_bboxes(data_cfg.data_dir))  # the original folder: a cache has no box file


DATASET = ChestXray14("chestxray14", "ChestX-ray14 (NIH Clinical Center)",
                      f"{CSV_NAME}, {TRAIN_VAL_LIST}, {TEST_LIST} and images_*/images", read=None)
