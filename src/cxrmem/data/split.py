"""Train / valid / test: which images of a labelled frame go where, at patient level.

Pure functions, DataFrames in and DataFrames out (the caller reads the list files):

- test: the official ``train_val_list.txt`` / ``test_list.txt`` when given; otherwise a
  seeded ``DERIVED_TEST_PCT`` of the patients, with a :class:`SplitWarning`;
- valid: ``valid_pct`` of the train_val *patients* (seeded), computed once from the
  unfiltered train_val set, so both training phases validate on the same patients
  (``valid_pct`` 0: no valid split);
- a derived share (:func:`patient_share`) decides each patient by its own id and the
  seed alone, so adding or removing other patients never moves it;
- :func:`phase_frame`: a phase's train + valid rows, only abnormal ones under
  ``filter_normal`` (test is never filtered).

No patient is ever in two of train / valid / test. :func:`hold_out` is the one
patient-level draw behind all of this, also used by the synthetic generator to write
its official-style lists.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .findings import FINDINGS

TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
DERIVED_TEST_PCT = 0.2
SPLITS = ("train", "valid", "test")


class SplitWarning(UserWarning):
    """The official lists are absent, so the split was derived."""


@dataclass(frozen=True)
class OfficialLists:
    """The image names of the official lists (``TRAIN_VAL_LIST``, ``TEST_LIST``)."""

    train_val: frozenset[str]
    test: frozenset[str]


def hold_out(weights: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Bool per patient: held out or not. ``weights[p]`` is patient p's share of the budget (e.g. images).

    Patients are visited in a random order (one ``rng.permutation``) and held out while
    the held-out weight stays <= ``budget``. With two or more patients both sides are
    non-empty: if none fits, the lightest patient is held out; if all fit, the heaviest
    is given back. With unit weights and an integer budget b this is the first b
    patients of the random order.
    """
    n_patients = len(weights)
    held = np.zeros(n_patients, dtype=bool)
    filled = 0
    for p in rng.permutation(n_patients):
        if filled + weights[p] <= budget:
            held[p] = True
            filled += weights[p]
    if n_patients >= 2 and not held.any():
        held[int(np.argmin(weights))] = True
    if n_patients >= 2 and held.all():
        held[int(np.argmax(weights))] = False
    return held


def patient_key(patient: str, seed: int) -> float:
    """Patient's uniform draw in [0, 1): the first 8 bytes of BLAKE2b(``seed``, ``patient``) / 2**64.

    A function of the id and the seed alone, the same on every machine and Python
    (unlike ``hash()``, salted per process).
    """
    digest = hashlib.blake2b(f"{seed}:{patient}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def patient_share(patients, fraction: float, seed: int) -> set:
    """The patients whose :func:`patient_key` is below ``fraction``: a seeded share of ``fraction`` in expectation.

    Each patient's side depends on its own id and the seed only, so appending or removing
    other patients moves nobody else (with n patients the share's standard deviation is
    sqrt(fraction (1 - fraction) / n), 0.17 % of the patients at ChestX-ray14's 30,805).
    With two or more patients both sides are non-empty: if none falls below, the lowest key
    is taken; if all do, the highest is given back.
    """
    unique = sorted(set(patients))
    if not unique:
        return set()
    keys = np.array([patient_key(p, seed) for p in unique])
    held = keys < fraction
    if len(unique) >= 2 and not held.any():
        held[int(np.argmin(keys))] = True
    if len(unique) >= 2 and held.all():
        held[int(np.argmax(keys))] = False
    return {p for p, h in zip(unique, held) if h}


def official_test(frame: pd.DataFrame, lists: OfficialLists) -> tuple[pd.DataFrame, pd.Series]:
    """(rows named by either list, is-test mask); rows in neither list are dropped with a warning."""
    is_test = frame["image_index"].isin(lists.test)
    unlisted = ~frame["image_index"].isin(lists.train_val | lists.test)
    if unlisted.any():
        warnings.warn(f"{int(unlisted.sum())} images are in neither {TRAIN_VAL_LIST} nor {TEST_LIST}; "
                      f"they are not used", stacklevel=3)
    return frame[~unlisted], is_test[~unlisted]


def derived_test(frame: pd.DataFrame, seed: int, reason: str) -> pd.Series:
    """Is-test mask of a seeded patient-level split (``DERIVED_TEST_PCT`` of the patients), with its warning."""
    warnings.warn(f"{reason}: deriving a patient-level split "
                  f"({DERIVED_TEST_PCT:.0%} of patients as test, seed {seed})", SplitWarning, stacklevel=3)
    return frame["patient_id"].isin(patient_share(frame["patient_id"], DERIVED_TEST_PCT, seed))


def valid_patients(train_val: pd.DataFrame, valid_pct: float, seed: int) -> set:
    """The validation patients: ``valid_pct`` of the train_val patients, drawn with ``seed + 1``;
    none when ``valid_pct`` is 0 (every train_val image trains)."""
    if valid_pct == 0:
        return set()
    return patient_share(train_val["patient_id"], valid_pct, seed + 1)


def assign_splits(frame: pd.DataFrame, lists: OfficialLists | None, valid_pct: float, seed: int,
                  reason: str = "no official lists") -> tuple[pd.DataFrame, str]:
    """Add ``split`` in {train, valid, test}. Returns (frame, split source "official" or "derived").

    ``lists`` None derives the test split; ``reason`` (why there are no lists) starts the warning.
    """
    if lists is not None:
        frame, is_test = official_test(frame, lists)
        source = "official"
    else:
        is_test, source = derived_test(frame, seed, reason), "derived"
    valid = frame["patient_id"].isin(valid_patients(frame[~is_test], valid_pct, seed))
    split = np.where(is_test, "test", np.where(valid, "valid", "train"))
    return frame.assign(split=split).reset_index(drop=True), source


def phase_frame(frame: pd.DataFrame, filter_normal: bool, findings=FINDINGS) -> pd.DataFrame:
    """Train + valid rows for one phase, with ``is_valid``; under ``filter_normal`` only abnormal images:
    those with a positive among ``findings`` (a missing label is no positive)."""
    rows = frame[frame["split"].isin(["train", "valid"])]
    if filter_normal:
        rows = rows[(rows[list(findings)] > 0.5).any(axis=1)]
    return rows.assign(is_valid=rows["split"].eq("valid")).reset_index(drop=True)
