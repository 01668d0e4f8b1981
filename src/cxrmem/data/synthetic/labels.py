"""Label sets of the synthetic ChestX-ray14: real prevalence, co-occurrence, every finding covered.

An image is abnormal with the real probability (1 - 60,361/112,120); an abnormal image
gets a "primary" finding plus independent further findings, with the two probabilities
solved so that every finding's marginal frequency equals the real one from
``findings.csv``. Effusion also raises the chance of Atelectasis and Edema, with their
marginals kept. Splits with at least ``MIN_ABNORMAL_FOR_COVERAGE`` abnormal images get at
least one positive of every finding (added to an already abnormal image); smaller splits
are left as sampled, so tiny data sets may miss rare findings such as Hernia.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from ..findings import FINDINGS, NO_FINDING, load_findings

REAL_TOTAL_IMAGES = 112_120  # per-finding counts live in findings.csv
REAL_NO_FINDING_IMAGES = 60_361
MIN_ABNORMAL_FOR_COVERAGE = 50  # abnormal images a split needs before rare findings are forced in

# Effusion makes these findings more likely (their marginal frequency is kept).
CORRELATION_DRIVER = "Effusion"
CORRELATION_BOOST = {"Atelectasis": 2.8, "Edema": 3.5}


def real_prevalence() -> dict[str, float]:
    """Share of real ChestX-ray14 images with each finding, plus "No Finding"."""
    shares = {f.name: f.real_images / REAL_TOTAL_IMAGES for f in load_findings()}
    shares[NO_FINDING] = REAL_NO_FINDING_IMAGES / REAL_TOTAL_IMAGES
    return shares


@dataclass(frozen=True)
class LabelModel:
    """How label sets are drawn so that marginals match the real prevalence.

    An image is abnormal with ``p_abnormal``; an abnormal image gets finding k as
    its primary finding with ``primary[k]`` and, when k is not its primary, as a
    further finding with ``secondary[k]``; for k in ``boosted`` that chance is
    ``secondary_with_driver[k]`` / ``secondary_without_driver[k]`` depending on
    whether the driver finding (Effusion) is present.
    """

    p_abnormal: float
    primary: np.ndarray
    secondary: np.ndarray
    driver: int | None
    boosted: tuple[int, ...]
    secondary_with_driver: np.ndarray
    secondary_without_driver: np.ndarray


def _solve_secondary_scale(q: np.ndarray) -> float:
    """alpha in [0, 1) with sum_k q_k (1 - alpha) / (1 - alpha q_k) == 1 (bisection)."""
    if q.sum() < 1.0 or q.max() >= 1.0:
        raise ValueError("findings.csv counts cannot give one finding per abnormal image")

    def primary_total(alpha: float) -> float:
        return float(np.sum(q * (1 - alpha) / (1 - alpha * q)))

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if primary_total(mid) > 1.0 else (low, mid)
    return (low + high) / 2


@lru_cache(maxsize=None)
def label_model() -> LabelModel:
    """The label model fitted to the real counts in ``findings.csv``."""
    names = FINDINGS
    p_abnormal = 1.0 - REAL_NO_FINDING_IMAGES / REAL_TOTAL_IMAGES
    q = np.array([f.real_images for f in load_findings()], dtype=np.float64)
    q = q / (REAL_TOTAL_IMAGES - REAL_NO_FINDING_IMAGES)  # P(finding | abnormal)
    alpha = _solve_secondary_scale(q)
    secondary = alpha * q
    primary = (q - secondary) / (1 - secondary)
    primary = primary / primary.sum()

    driver = names.index(CORRELATION_DRIVER) if CORRELATION_DRIVER in names else None
    boosted = tuple(names.index(n) for n in CORRELATION_BOOST if n in names and driver is not None)
    with_driver = secondary.copy()
    without_driver = secondary.copy()
    for k in boosted:
        # P(driver present | k is not the primary finding)
        driver_share = (primary[driver] + (1 - primary[driver] - primary[k]) * secondary[driver]) / (1 - primary[k])
        high = min(0.95, CORRELATION_BOOST[names[k]] * secondary[k])
        low = (secondary[k] - driver_share * high) / (1 - driver_share)
        if low < 0:  # boost too strong for this finding: give the driver all of it
            high, low = secondary[k] / driver_share, 0.0
        with_driver[k], without_driver[k] = high, low
    return LabelModel(p_abnormal, primary, secondary, driver, boosted, with_driver, without_driver)


def sample_label_matrix(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n_images`` label sets: a bool array [n_images, 14] in the official order.

    A row of all False is "No Finding"; every other row has at least one finding.
    The expected share of each column equals the real prevalence.
    """
    model = label_model()
    n_findings = len(model.primary)
    abnormal = rng.random(n_images) < model.p_abnormal
    primary = rng.choice(n_findings, size=n_images, p=model.primary)
    labels = rng.random((n_images, n_findings)) < model.secondary
    if model.driver is not None and model.boosted:
        has_driver = labels[:, model.driver] | (primary == model.driver)
        draws = rng.random((n_images, len(model.boosted)))
        for column, k in enumerate(model.boosted):
            chance = np.where(has_driver, model.secondary_with_driver[k], model.secondary_without_driver[k])
            labels[:, k] = draws[:, column] < chance
    labels[np.arange(n_images), primary] = True
    labels[~abnormal] = False
    return labels


def ensure_findings_covered(
    labels: np.ndarray, groups: Iterable[np.ndarray], rng: np.random.Generator,
    min_abnormal: int = MIN_ABNORMAL_FOR_COVERAGE,
) -> np.ndarray:
    """Give every finding at least one positive in each group that is big enough.

    ``groups`` are boolean image masks (e.g. train_val and test). In a group with at
    least ``min_abnormal`` abnormal images, each finding without a positive is added
    to a different, randomly chosen, already abnormal image of that group, so the
    "No Finding" share does not change. Smaller groups are left alone. Returns a
    new array.
    """
    labels = labels.copy()
    for group in groups:
        abnormal_rows = np.flatnonzero(group & labels.any(axis=1))
        if len(abnormal_rows) < min_abnormal:
            continue
        missing = np.flatnonzero(~labels[group].any(axis=0))
        chosen = rng.permutation(abnormal_rows)[: len(missing)]
        labels[chosen, missing] = True
    return labels


def label_string(row: Sequence[bool], names: Sequence[str] | None = None) -> str:
    """"A|B" in the official order, or "No Finding" when no finding is present."""
    names = names or FINDINGS
    present = [name for name, flag in zip(names, row) if flag]
    return "|".join(present) if present else NO_FINDING

