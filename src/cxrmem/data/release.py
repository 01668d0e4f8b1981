"""A data set as its publisher ships it (:class:`Release`), and the one road from there to the training frame.

A data set's module (:mod:`.chestxray14`, :mod:`.chexpert`, :mod:`.mimic_cxr`, :mod:`.padchest`,
:mod:`.vindr_cxr`, :mod:`.nih_google`) knows its layout and reads its label file, exactly as the
publisher ships it, into a :class:`Release`: one row per image, its labels as the file names
them, each 1 (positive), 0 (negative), -1 (uncertain) or NaN (not given). From there the road is
the same for every data set (:func:`load_release`):

1. split at patient level: the official split where the release has one (its test images are
   the test split), else a seeded patient-level split (:mod:`.split`); validation patients are
   drawn from the rest as for ChestX-ray14;
2. count the labels per split, as the file gives them (``data_summary.json``'s ``labels``);
3. keep the views of ``data.views`` (``frontal``: the frontal images; ``all``; or a list of view
   names, e.g. ``PA,AP``);
4. map the labels onto the findings of the one label space (label_map.csv: a finding is positive
   when any label meaning it is, else uncertain when any is, else negative when any is, else
   missing), one column per model finding, NaN (missing) for a finding the data set lacks;
5. resolve uncertain labels of the *train* split by ``data.uncertain``: ``ignore`` (missing),
   ``zeros``, ``ones`` or ``smooth`` (uniform in [0.55, 0.85], the label smoothing of Pham et al.
   2021, drawn once per label with ``data.seed``); in valid and test an uncertain label is always
   missing, so that every figure counts certain labels only.

Missing labels stay NaN in the frame: the loss and every metric leave them out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from ..utils.errors import UserError, describe_error
from .findings import label_map
from .split import SPLITS, OfficialLists, assign_splits

UNCERTAIN = -1.0
BOX_FRAME = 1024  # every data set's boxes are given in this square frame (ChestX-ray14's originals)
SMOOTH_RANGE = (0.55, 0.85)  # uncertain -> U(0.55, 0.85) under data.uncertain: smooth (Pham et al. 2021)
FRONTAL_VIEWS = ("PA", "AP")
IMAGE_COLUMNS = ("image_index", "patient_id", "patient_age", "patient_gender", "view_position", "frontal", "path",
                 "official")


@dataclass
class Release:
    """A data set as read from its publisher's files.

    ``images``: one row per image with the columns of :data:`IMAGE_COLUMNS`: ``image_index`` (the
    image's unique key, its path relative to data_dir where the file has no name of its own),
    ``patient_id``, ``patient_age`` (years, as text), ``patient_gender`` ("M", "F" or empty),
    ``view_position`` (the file's view name, upper case), ``frontal`` (bool), ``path`` (absolute),
    ``official`` ("train_val", "test", or "" where the release has no official split).
    ``labels``: the same index, one float column per label as the file names it (1, 0, -1, NaN).
    ``boxes``: [image_index, finding, x, y, w, h] in the :data:`BOX_FRAME` px frame (x right, y down from
    the top left corner of the image scaled to BOX_FRAME x BOX_FRAME, as ChestX-ray14's 1024 px
    originals are), findings of the label space (empty without).
    """

    images: pd.DataFrame
    labels: pd.DataFrame
    boxes: pd.DataFrame
    no_split_reason: str = ""  # why the release has no official split ("" when it has one)
    blank_is_negative: bool = False  # a blank label means "not mentioned": negative once counted


@dataclass(frozen=True)
class DataSet:
    """One entry of :data:`cxrmem.data.registry.DATASETS`: its name, what its folder holds, its reader."""

    name: str
    title: str
    layout: str  # one line: what data_dir must hold
    read: Optional[Callable[[Path, object], Release]]  # (data_dir, data config) -> Release

    def load(self, data_dir: Path, data_cfg, findings: Sequence[str]) -> "Loaded":
        """The training frame of this data set at ``data_dir`` (:func:`load_release`)."""
        return load_release(self, data_dir, data_cfg, findings)


def empty_boxes() -> pd.DataFrame:
    return pd.DataFrame({"image_index": pd.Series(dtype=str), "finding": pd.Series(dtype=str),
                         **{c: pd.Series(dtype=float) for c in "xywh"}})


def label_values(column: pd.Series, source, positive=("1", "1.0"), negative=("0", "0.0"),
                 uncertain=("-1", "-1.0"), missing=("",)) -> pd.Series:
    """A label column read as text -> 1.0, 0.0, -1.0 or NaN; any other cell is a UserError naming its line."""
    text = column.fillna("").astype(str).str.strip()
    mapping = {**{v: 1.0 for v in positive}, **{v: 0.0 for v in negative}, **{v: UNCERTAIN for v in uncertain},
               **{v: np.nan for v in missing}}
    unknown = ~text.isin(list(mapping))
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise UserError(f"{source}: line {row + 2}, column {column.name!r}: {text.iloc[row]!r} is not a label value "
                        f"(expected one of {', '.join(repr(v) for v in mapping if v)} or empty); restore the "
                        f"original file")
    return text.map(mapping).astype(float)


def read_csv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """A CSV as text cells (nothing guessed), stripped headers; a UserError for an unreadable file or a
    missing column."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (no header, no rows); restore the original file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a readable CSV ({describe_error(exc)}); restore the original file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; expected {what}")
    return frame


def find_file(data_dir: Path, names: Sequence[str], dataset: str, layout: str) -> Path:
    """The first of ``names`` (or its ``.gz``) in data_dir; a UserError naming the layout otherwise."""
    for name in names:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"no {' or '.join(names)} in {data_dir}; point data.data_dir (or --data_dir) at the "
                    f"{dataset} folder ({layout})")


# --------------------------------------------------------------------------- the road to the frame


def count_labels(labels: pd.DataFrame) -> dict:
    """{label: {positive, negative, uncertain, missing}} over the rows of ``labels``."""
    return {name: {"positive": int((column == 1).sum()), "negative": int((column == 0).sum()),
                   "uncertain": int((column == UNCERTAIN).sum()), "missing": int(column.isna().sum())}
            for name, column in labels.items()}


def view_filter(images: pd.DataFrame, views: str) -> pd.Series:
    """bool per image: kept by ``data.views`` (frontal, all, or comma-separated view names)."""
    if views == "frontal":
        return images["frontal"].astype(bool)
    if views == "all":
        return pd.Series(True, index=images.index)
    wanted = {v.strip().upper() for v in views.split(",") if v.strip()}
    return images["view_position"].str.upper().isin(wanted)


def to_findings(labels: pd.DataFrame, dataset: str, findings: Sequence[str]) -> pd.DataFrame:
    """The release's labels -> one column per finding (label_map.csv): 1 when any label meaning it is 1,
    else -1 when any is -1, else 0 when any is 0, else NaN; NaN throughout for a finding ``dataset`` lacks."""
    meaning = label_map(dataset)
    columns = {}
    for finding in findings:
        sources = [label for label, f in meaning.items() if f == finding and label in labels.columns]
        if not sources:
            columns[finding] = pd.Series(np.nan, index=labels.index)
            continue
        block = labels[sources]
        columns[finding] = pd.Series(np.select([(block == 1).any(axis=1), (block == UNCERTAIN).any(axis=1),
                                                (block == 0).any(axis=1)], [1.0, UNCERTAIN, 0.0], np.nan),
                                     index=labels.index)
    return pd.DataFrame(columns, index=labels.index)


# data.uncertain -> the values of n uncertain training labels (rng: seeded by data.seed)
UNCERTAIN_POLICIES: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "ignore": lambda n, rng: np.full(n, np.nan),
    "zeros": lambda n, rng: np.zeros(n),
    "ones": lambda n, rng: np.ones(n),
    "smooth": lambda n, rng: rng.uniform(*SMOOTH_RANGE, size=n),
}


def resolve_uncertain(values: pd.DataFrame, policy: str, training: pd.Series, seed: int) -> pd.DataFrame:
    """Uncertain (-1) labels -> ``policy`` on the ``training`` rows (row by row, finding by finding), missing
    (NaN) on the others."""
    uncertain = values.to_numpy() == UNCERTAIN
    train_rows = training.to_numpy()[:, None]
    out = values.to_numpy(dtype=float, copy=True)
    out[uncertain & ~train_rows] = np.nan
    chosen = uncertain & train_rows
    out[chosen] = UNCERTAIN_POLICIES[policy](int(chosen.sum()), np.random.default_rng([seed, 7]))
    return pd.DataFrame(out, index=values.index, columns=values.columns)


class Loaded(NamedTuple):
    frame: pd.DataFrame  # the training frame: image columns, one column per finding, split
    split_source: str  # "official" or "derived"
    missing: list  # images listed but not on disk (dropped under missing_images: drop)
    labels: dict  # {split: count_labels(...)} before view filter, mapping and policy
    boxes: pd.DataFrame
    members: dict = {}  # a union's members: {name: Loaded} (data.datasets)


def attach_existing(images: pd.DataFrame, data_dir: Path, policy: str) -> tuple[pd.Series, list]:
    """bool per image: its file exists; the missing ones error (``policy`` error) or are dropped."""
    exists = images["path"].map(lambda p: Path(p).is_file())
    missing = images.loc[~exists, "image_index"].tolist()
    if missing and policy == "error":
        raise UserError(f"{len(missing)} of {len(images)} images listed in the label file are not on disk under "
                        f"{data_dir} (e.g. {', '.join(missing[:3])}); restore them or set data.missing_images: drop")
    if missing:
        warnings.warn(f"{len(missing)} images listed in the label file are missing on disk and were dropped",
                      stacklevel=3)
    return exists, missing


def load_release(dataset: DataSet, data_dir: Path, data_cfg, findings: Sequence[str]) -> Loaded:
    """Read ``dataset`` at ``data_dir`` and walk steps 1-5 of the module docstring."""
    release = dataset.read(Path(data_dir), data_cfg)
    images, labels = release.images.reset_index(drop=True), release.labels.reset_index(drop=True)
    exists, missing = attach_existing(images, data_dir, data_cfg.missing_images)
    images, labels = images[exists.to_numpy()].reset_index(drop=True), labels[exists.to_numpy()].reset_index(drop=True)
    official = images["official"]
    lists = None
    if (official == "test").any() and official.isin(["train_val", "test"]).all():
        lists = OfficialLists(frozenset(images.loc[official == "train_val", "image_index"]),
                              frozenset(images.loc[official == "test", "image_index"]))
    reason = release.no_split_reason or f"{dataset.name} has no official test split"
    split_frame, source = assign_splits(images.drop(columns="official").assign(_row=np.arange(len(images))),
                                        lists, data_cfg.valid_pct, data_cfg.seed, reason)
    labels = labels.iloc[split_frame["_row"].to_numpy()].reset_index(drop=True)
    split_frame = split_frame.drop(columns="_row")
    counts = {split: count_labels(labels[split_frame["split"].eq(split).to_numpy()]) for split in SPLITS}
    if release.blank_is_negative:
        labels = labels.fillna(0.0)
    keep = view_filter(split_frame, data_cfg.views).to_numpy()
    split_frame, labels = split_frame[keep].reset_index(drop=True), labels[keep].reset_index(drop=True)
    values = to_findings(labels, dataset.name, findings)
    values = resolve_uncertain(values, data_cfg.uncertain, split_frame["split"].eq("train"), data_cfg.seed)
    frame = pd.concat([split_frame, values], axis=1)
    return Loaded(frame, source, missing, counts, release.boxes)

