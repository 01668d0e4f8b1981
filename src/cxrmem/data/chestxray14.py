"""ChestX-ray14 metadata as plain pandas: read, label, locate, split, filter, summarise.

Everything here is a pure function of paths and DataFrames; nothing imports fastai.

The frame every function passes along has one row per image with the columns
``image_index`` (file name), ``patient_id``, ``path`` (absolute, once located),
one 0/1 column per finding (in :data:`FINDINGS` order) and, once split,
``split`` in {"train", "valid", "test"}.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError

METADATA_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
NO_FINDING = "No Finding"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DERIVED_TEST_PCT = 0.2


def load_findings() -> pd.DataFrame:
    """The label list as data: findings.csv (finding, images, synthetic_pattern), official order."""
    with resources.files("cxrmem.data").joinpath("findings.csv").open() as fh:
        return pd.read_csv(fh)


FINDINGS: list[str] = load_findings()["finding"].tolist()


class SplitWarning(UserWarning):
    """The official lists are absent, so the split was derived."""


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
    })
    labels = encode_labels(raw["Finding Labels"], csv_path)
    return pd.concat([frame, labels], axis=1)


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


def locate_images(data_dir: Path) -> dict[str, Path]:
    """Map file name -> path over ``images_*/images/*`` and ``images/*``."""
    folders = sorted(data_dir.glob("images_*/images")) + [data_dir / "images"]
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
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


_SIGNATURES = {  # suffix: (first bytes, last bytes of a complete file)
    ".png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
    ".jpg": (b"\xff\xd8", b"\xff\xd9"),
    ".jpeg": (b"\xff\xd8", b"\xff\xd9"),
}


def find_damaged_images(paths) -> list[tuple[str, str]]:
    """Cheap structural check of every file (no decoding): (path, reason) for each bad one.

    Empty files, a wrong header, or a missing end marker (truncated download) are caught
    before training starts, so no epoch crashes on them.
    """
    damaged = []
    for path in map(Path, paths):
        head_sig, tail_sig = _SIGNATURES.get(path.suffix.lower(), (b"", b""))
        try:
            size = path.stat().st_size
            if size == 0:
                damaged.append((str(path), "empty file"))
                continue
            with path.open("rb") as fh:
                head = fh.read(len(head_sig))
                fh.seek(max(0, size - len(tail_sig) - 16))
                tail = fh.read()
        except OSError as exc:
            damaged.append((str(path), f"unreadable ({exc.strerror})"))
            continue
        if not head.startswith(head_sig):
            damaged.append((str(path), "not a valid image header"))
        elif tail_sig not in tail:
            damaged.append((str(path), "truncated (no end marker)"))
    return damaged


# --------------------------------------------------------------------------- splits


def read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _shuffled_patients(patients, seed: int) -> np.ndarray:
    ordered = np.array(sorted(set(patients), key=lambda p: (len(p), p)))
    return np.random.default_rng(seed).permutation(ordered)


def _hold_out(patients, fraction: float, seed: int) -> set:
    """A seeded ``fraction`` of the unique patients (at least one when there are two or more)."""
    shuffled = _shuffled_patients(patients, seed)
    n = int(round(len(shuffled) * fraction))
    n = min(max(n, 1 if len(shuffled) > 1 else 0), max(len(shuffled) - 1, 0))
    return set(shuffled[:n])


def assign_splits(frame: pd.DataFrame, data_dir: Path, valid_pct: float, seed: int):
    """Add ``split``: official train_val/test lists when present, else a derived patient-level split.

    Validation is ``valid_pct`` of the train_val *patients*, computed once from the
    unfiltered train_val set, so both phases validate on the same patients.
    Returns (frame, split_source) with split_source "official" or "derived".
    """
    train_val_path, test_path = data_dir / TRAIN_VAL_LIST, data_dir / TEST_LIST
    if train_val_path.is_file() and test_path.is_file():
        test_names = read_list(test_path)
        known = read_list(train_val_path) | test_names
        is_test = frame["image_index"].isin(test_names)
        unlisted = ~frame["image_index"].isin(known)
        if unlisted.any():
            warnings.warn(f"{int(unlisted.sum())} images are in neither {TRAIN_VAL_LIST} nor {TEST_LIST}; "
                          f"they are not used", stacklevel=2)
            frame, is_test = frame[~unlisted], is_test[~unlisted]
        source = "official"
    else:
        absent = TRAIN_VAL_LIST if not train_val_path.is_file() else TEST_LIST
        warnings.warn(f"{absent} not found in {data_dir}: deriving a patient-level split "
                      f"({DERIVED_TEST_PCT:.0%} of patients as test, seed {seed})", SplitWarning, stacklevel=2)
        test_patients = _hold_out(frame["patient_id"], DERIVED_TEST_PCT, seed)
        is_test = frame["patient_id"].isin(test_patients)
        source = "derived"
    valid_patients = _hold_out(frame.loc[~is_test, "patient_id"], valid_pct, seed + 1)
    split = np.where(is_test, "test", np.where(frame["patient_id"].isin(valid_patients), "valid", "train"))
    return frame.assign(split=split).reset_index(drop=True), source


def phase_frame(frame: pd.DataFrame, filter_normal: bool) -> pd.DataFrame:
    """Train + valid rows for one phase, with ``is_valid``; only abnormal images if ``filter_normal``."""
    rows = frame[frame["split"].isin(["train", "valid"])]
    if filter_normal:
        rows = rows[rows[FINDINGS].sum(axis=1) > 0]
    return rows.assign(is_valid=rows["split"].eq("valid")).reset_index(drop=True)


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
    frame, source = assign_splits(frame, data_dir, valid_pct, seed)
    return frame, source, missing


__all__ = ["FINDINGS", "NO_FINDING", "load_frame", "read_entries", "encode_labels", "locate_images",
           "attach_paths", "assign_splits", "phase_frame", "summarize", "format_summary", "describe",
           "find_damaged_images", "SplitWarning"]
