"""Operating points (one threshold per class, chosen by a rule on the ROC table) and the
sensitivity, specificity, PPV, NPV and F1 at a threshold, with their bootstrap intervals."""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from .auc import (Interval, Key, Resampler, ImageResampler, check_bootstrap_args, check_inputs, has_both_classes,
                  none_for_nan, percentile_interval, weight_blocks)

FIGURES = ("sensitivity", "specificity", "ppv", "npv", "f1")

# --------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------

class RocTable(NamedTuple):
    """Every distinct operating point of one class, from the highest threshold down.

    ``thresholds[0]`` is the next float above the highest score (nothing is called);
    ``thresholds[1:]`` are the distinct scores, descending. ``tp`` and ``fp`` count the
    positives / negatives with score >= the threshold.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def sensitivity(self) -> np.ndarray:
        return self.tp / self.n_pos

    @property
    def specificity(self) -> np.ndarray:
        return (self.n_neg - self.fp) / self.n_neg


def roc_table(score: np.ndarray, positive: np.ndarray) -> RocTable:
    """All thresholds at which the calls of one class change, with their counts."""
    distinct, inverse = np.unique(score, return_inverse=True)
    inverse = inverse.ravel()
    pos_at = np.bincount(inverse, weights=positive.astype(np.float64), minlength=distinct.size)[::-1]
    all_at = np.bincount(inverse, minlength=distinct.size)[::-1]
    tp = np.concatenate([[0], np.cumsum(pos_at)]).astype(np.int64)
    fp = np.concatenate([[0], np.cumsum(all_at)]).astype(np.int64) - tp
    thresholds = np.concatenate([[np.nextafter(distinct[-1], np.inf)], distinct[::-1]])
    n_pos = int(positive.sum())
    return RocTable(thresholds, tp, fp, n_pos, positive.size - n_pos)


def youden(table: RocTable) -> int:
    """argmax_t sensitivity(t) + specificity(t) - 1; ties go to the highest threshold.

    Compared exactly as the integer TP * n_neg - FP * n_pos (J times n_pos * n_neg). Taking the
    highest of the tied thresholds calls the fewest images; where no threshold beats chance
    (max J = 0) nothing is called.
    """
    return int(np.argmax(table.tp * table.n_neg - table.fp * table.n_pos))


def at_sensitivity(table: RocTable, level: float) -> int:
    """The highest threshold with sensitivity >= level (sensitivity only grows as the threshold falls)."""
    return int(np.argmax(table.sensitivity >= level))


def at_specificity(table: RocTable, level: float) -> int:
    """The lowest threshold with specificity >= level (the call-nothing threshold always qualifies)."""
    meets = table.specificity >= level
    return int(meets.size - 1 - np.argmax(meets[::-1]))


class Rule(NamedTuple):
    """An operating-point rule: ``choose(table[, level]) -> index into table.thresholds``."""

    choose: Callable[..., int]
    form: str          # how it is written, for messages
    takes_level: bool


OPERATING_POINT_RULES: Dict[str, Rule] = {
    "youden": Rule(youden, "youden", False),
    "sensitivity": Rule(at_sensitivity, "sensitivity:X", True),
    "specificity": Rule(at_specificity, "specificity:X", True),
}


def parse_operating_point(text: str) -> Callable[[RocTable], int]:
    """'youden', 'sensitivity:0.9' or 'specificity:0.9' -> a function RocTable -> index.

    ValueError (one line naming the accepted forms) for anything else.
    """
    forms = ", ".join(rule.form for rule in OPERATING_POINT_RULES.values())
    refusal = f"{text!r} is not an operating point; write one of {forms} with 0 < X <= 1"
    name, colon, argument = str(text).strip().partition(":")
    rule = OPERATING_POINT_RULES.get(name.strip().lower())
    if rule is None or bool(colon) != rule.takes_level:
        raise ValueError(refusal)
    if not rule.takes_level:
        return rule.choose
    try:
        level = float(argument)
    except ValueError:
        level = float("nan")
    if not 0.0 < level <= 1.0:
        raise ValueError(refusal)
    return functools.partial(rule.choose, level=level)


def operating_points(probs, targets, rule: str) -> List[Optional[float]]:
    """One threshold per class chosen by ``rule`` (see :func:`parse_operating_point`).

    The candidates are the distinct scores of the class (a call is score >= threshold, so each
    candidate is the lowest score called) plus the next float above the highest score (call
    nothing). None for a class without positive or without negative example.
    """
    choose = parse_operating_point(rule)
    scores, positive, negative, _ = check_inputs(probs, targets)
    thresholds: List[Optional[float]] = []
    for c in range(scores.shape[1]):
        if not has_both_classes(positive[:, c], negative[:, c]):
            thresholds.append(None)
            continue
        rows = positive[:, c] | negative[:, c]
        table = roc_table(scores[rows, c], positive[rows, c])
        thresholds.append(float(table.thresholds[choose(table)]))
    return thresholds


# --------------------------------------------------------------------------
# Figures at a threshold, and their bootstrap
# --------------------------------------------------------------------------
#
# For a class with calls k_i = [p_i >= t], positives y_i and image weights w_i (1 for the sample
# itself, draw counts in a resample):
#
#     TP = sum w k y,   FP = sum w k (1 - y),   FN = sum w (1 - k) y,   TN = sum w (1 - k)(1 - y)
#     sensitivity = TP / (TP + FN)       specificity = TN / (TN + FP)
#     PPV = TP / (TP + FP)               NPV = TN / (TN + FN)
#     F1 = 2 TP / (2 TP + FP + FN)
#
# so R resamples of all classes are the matrix product W [R, N] @ A [N, 4C].

def call_matrices(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                  thresholds: Sequence[Optional[float]]):
    """Indicator arrays [N, C] (float64) of TP, FP, FN, TN; all zero in a class without threshold
    and for a missing label (neither positive nor negative)."""
    if len(thresholds) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} columns but {len(thresholds)} thresholds")
    defined = np.array([t is not None for t in thresholds], dtype=bool)
    cut = np.array([np.inf if t is None else float(t) for t in thresholds])
    called = (scores >= cut) & defined
    positive, negative = positive & defined, negative & defined
    return tuple(m.astype(np.float64) for m in (
        called & positive, called & negative, ~called & positive, ~called & negative))


def figures_from_counts(tp, fp, fn, tn) -> Dict[str, np.ndarray]:
    """The five figures from (weighted) counts of equal shape; NaN where a denominator is 0."""
    quotients = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }
    return {name: np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
            for name, (num, den) in quotients.items()}


def at_threshold(probs, targets, thresholds: Sequence[Optional[float]],
                 labels: Optional[Sequence[str]] = None) -> Dict[Key, Dict[str, Optional[float]]]:
    """{class: {sensitivity, specificity, ppv, npv, f1}} with calls prob >= threshold.

    A figure is None where its denominator is 0; all five are None for a class whose threshold
    is None.
    """
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    counts = [m.sum(axis=0) for m in call_matrices(scores, positive, negative, thresholds)]
    figures = figures_from_counts(*counts)
    return {key: {name: none_for_nan(figures[name][c]) for name in FIGURES}
            for c, key in enumerate(keys)}


def bootstrap_at_threshold(probs, targets, thresholds: Sequence[Optional[float]],
                           n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                           labels: Optional[Sequence[str]] = None, resampler: Optional[Resampler] = None,
                           ) -> Dict[Key, Dict[str, Interval]]:
    """Percentile intervals of the five :func:`at_threshold` figures.

    In resample r the counts are weighted (TP_r = sum_i w_ri k_i y_i, ...), all classes at once as
    W @ A; ``resampler`` as in :func:`bootstrap_ci`. The interval of a figure comes from the
    resamples in which its denominator is positive; None if there are none. The thresholds stay
    fixed: only the evaluated images are resampled.
    """
    check_bootstrap_args(n_resamples, level)
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    n_images, n_classes = scores.shape
    indicators = np.concatenate(call_matrices(scores, positive, negative, thresholds), axis=1)   # [N, 4C]
    counts = np.empty((n_resamples, 4 * n_classes))
    for rows, weights in weight_blocks(resampler or ImageResampler(n_images), n_images, n_resamples, seed):
        counts[rows] = weights.astype(np.float64) @ indicators
    samples = figures_from_counts(*np.split(counts, 4, axis=1))   # each [R, C]
    return {key: {name: percentile_interval(samples[name][:, c], level) for name in FIGURES}
            for c, key in enumerate(keys)}


