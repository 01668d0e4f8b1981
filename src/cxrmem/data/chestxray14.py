"""ChestX-ray14 on disk, as plain pandas: read the metadata, label, locate images, read the lists, summarise.

The layout: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``), the official
lists, images under ``images_*/images`` or ``images``. Which image goes to which split is
decided by :mod:`cxrmem.data.split`; nothing here imports fastai.

The frame every function passes along has one row per image with the columns
``image_index`` (file name), ``patient_id``, ``patient_age``, ``patient_gender``,
``view_position`` (the CSV's cells as text, empty where it lacks the column), ``path``
(absolute, once located), one 0/1 column per finding (in :data:`FINDINGS` order) and, once split,
``split`` in {"train", "valid", "test"}.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from .findings import FINDINGS, NO_FINDING
from .images import IMAGE_SUFFIXES
from .split import TEST_LIST, TRAIN_VAL_LIST, OfficialLists, assign_splits, phase_frame

CSV_NAME = "Data_Entry_2017.csv"  # the 2017 file; the 2020 revision is also accepted under its own name
METADATA_FILES = (CSV_NAME, "Data_Entry_2017_v2020.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
# CSV column -> frame column of the image metadata kept for reporting (empty where the CSV lacks it).
METADATA_COLUMNS = {"Patient Age": "patient_age", "Patient Gender": "patient_gender", "View Position": "view_position"}


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
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]}); "
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
    labels = encode_labels(raw["Finding Labels"], csv_path)
    return pd.concat([frame, labels], axis=1)


def patient_ids(image_index) -> np.ndarray:
    """Patient of every image: ChestX-ray14 names images ``<patient>_<follow-up>.png`` (folders ignored)."""
    return np.array([Path(str(name)).name.split("_", 1)[0] for name in image_index])


def encode_labels(finding_labels: pd.Series, source) -> pd.DataFrame:
    """'A|B' strings -> one 0/1 column per finding. Split on '|', never substring-matched."""
    tokens = finding_labels.fillna("").str.split("|")
    exploded = tokens.explode().str.strip()
    unknown = sorted(set(exploded) - set(FINDINGS) - {NO_FINDING, ""})
    if unknown:
        raise UserError(f"{source}: unknown finding label(s) {', '.join(map(repr, unknown[:5]))}; "
                        f"labels must be among the 14 findings ({', '.join(FINDINGS)}) or '{NO_FINDING}'")
    onehot = pd.crosstab(exploded.index, exploded).reindex(index=finding_labels.index, columns=FINDINGS,
                                                          fill_value=0)
    return (onehot > 0).astype(np.int8).set_axis(finding_labels.index)


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


# --------------------------------------------------------------------------- summary


def describe(rows: pd.DataFrame) -> dict:
    return {
        "n_images": int(len(rows)),
        "n_patients": int(rows["patient_id"].nunique()),
        "positives": {f: int(rows[f].sum()) for f in FINDINGS},
    }


def summarize(frame: pd.DataFrame, split_source: str, missing_images: int) -> dict:
    """The data_summary.json content: per split and for phase 1's train/valid."""
    phase1 = phase_frame(frame, filter_normal=True)
    return {
        "train": describe(frame[frame["split"] == "train"]),
        "valid": describe(frame[frame["split"] == "valid"]),
        "test": describe(frame[frame["split"] == "test"]),
        "phase1_train": describe(phase1[~phase1["is_valid"]]),
        "phase1_valid": describe(phase1[phase1["is_valid"]]),
        "missing_images": int(missing_images),
        "split_source": split_source,
    }


def format_summary(summary: dict) -> str:
    """A fixed-width table: one row per finding, one column per split."""
    parts = ["train", "valid", "test", "phase1_train", "phase1_valid"]
    width = max(map(len, FINDINGS)) + 2
    lines = [f"{'':<{width}}" + "".join(f"{p:>14}" for p in parts)]
    for key in ("n_images", "n_patients"):
        lines.append(f"{key:<{width}}" + "".join(f"{summary[p][key]:>14}" for p in parts))
    lines.append("positives per finding:")
    for f in FINDINGS:
        lines.append(f"  {f:<{width - 2}}" + "".join(f"{summary[p]['positives'][f]:>14}" for p in parts))
    lines.append(f"split: {summary['split_source']}; images missing on disk: {summary['missing_images']}")
    return "\n".join(lines)


def load_frame(data_dir: Path, valid_pct: float, seed: int, missing_images: str = "error"):
    """Metadata -> labelled, located and split frame. Returns (frame, split_source, missing names)."""
    data_dir = Path(data_dir)
    frame = read_entries(find_metadata_csv(data_dir))
    frame, missing = attach_paths(frame, data_dir, missing_images)
    lists, reason = read_official_lists(data_dir)
    frame, source = assign_splits(frame, lists, valid_pct, seed, reason)
    return frame, source, missing
