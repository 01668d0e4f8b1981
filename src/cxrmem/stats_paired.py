"""Statistics for comparing runs: DeLong's test, Holm's correction, patient-level bootstrap, mean +- SD.

Conventions
-----------
* ``y`` holds the targets (a value > 0.5 is a positive); scores are real numbers,
  higher meaning "more likely positive". Multi-label inputs are [N images, C classes].
* Comparisons are of a reference ``a`` and a candidate ``b`` scored on the same
  images; every difference is ``b - a`` (positive: the candidate is better).
* Nothing returned is NaN: an undefined quantity is ``None``. Returned numbers
  are plain Python floats and ints, so results are JSON-serialisable.

Why patients
------------
ChestX-ray14's test split holds several images of most patients, and a
patient's images resemble each other far more than two patients' do. A
bootstrap that resamples images treats them as independent and so gives
intervals that are too narrow. Resampling patients (the unit that was sampled
independently) and giving each image its patient's draw count keeps the
dependence inside the resample.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "DeLongResult",
    "delong_components",
    "delong_test",
    "delong_per_class",
    "holm",
    "WeightedAUC",
    "UNITS",
    "resample_weights",
    "bootstrap_auc_ci",
    "PairedBootstrap",
    "paired_bootstrap",
    "MeanSD",
    "mean_sd",
]

Interval = Optional[List[float]]

# Below this the standard error (or difference) of two AUCs is rounding noise: AUCs are
# ratios of counts in [0, 1], so any real difference is at least 1 / (n_pos * n_neg).
_ZERO = 1e-12

# Weights (resamples x images) held in one bootstrap block: a few tens of MB at most.
_BLOCK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------

def _as_matrix(x, name: str) -> np.ndarray:
    """float64 [N, C] (a 1-D input becomes one column); NaN or inf is an error."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, C], got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return values


def _as_vector(x, name: str) -> np.ndarray:
    """float64 [N] (an [N, 1] column is accepted); NaN or inf is an error."""
    values = _as_matrix(x, name)
    if values.shape[1] != 1:
        raise ValueError(f"{name} must be one column [N], got shape {values.shape}; "
                         "test one class at a time or use delong_per_class")
    return values[:, 0]


def _check_same_shape(y: np.ndarray, *scores: np.ndarray) -> None:
    for s in scores:
        if s.shape != y.shape:
            raise ValueError(f"targets {y.shape} and scores {s.shape} must have the same shape")


# --------------------------------------------------------------------------
# DeLong's test (fast algorithm of Sun & Xu, 2014)
# --------------------------------------------------------------------------

class DeLongResult(NamedTuple):
    """DeLong's test of AUC(b) - AUC(a) on the same images (fields None where undefined)."""

    auc_a: Optional[float]
    auc_b: Optional[float]
    delta: Optional[float]    # auc_b - auc_a
    var: Optional[float]      # estimated variance of delta
    se: Optional[float]
    z: Optional[float]        # delta / se
    p: Optional[float]        # two-sided, normal approximation
    n_pos: int
    n_neg: int


def delong_components(y, scores) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components of K score sets, by midranks.

    ``y`` [N] targets, ``scores`` [N, K]. With the m positives X and n negatives Y,
    psi(x, y') = 1 if x > y', 1/2 if x == y', 0 otherwise, and midranks T_X (within
    X), T_Y (within Y), T_Z (within all N = m + n scores):

        V10_i = (1/n) sum_j psi(X_i, Y_j) = (T_Z(X_i) - T_X(X_i)) / n
        V01_j = (1/m) sum_i psi(X_i, Y_j) = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m
        AUC   = mean_i V10_i = (sum_i T_Z(X_i) - m (m + 1) / 2) / (m n)

    Returns (auc [K], v10 [m, K], v01 [n, K]); needs m >= 1 and n >= 1.
    Sorting makes it O(N log N) per score set instead of O(m n).
    """
    positive = np.asarray(y, dtype=np.float64) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    x, y_neg = scores[positive], scores[~positive]
    m, n = x.shape[0], y_neg.shape[0]
    tx = rankdata(x, axis=0)
    ty = rankdata(y_neg, axis=0)
    tz = rankdata(np.concatenate([x, y_neg]), axis=0)
    auc = (tz[:m].sum(axis=0) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return auc, v10, v01


def delong_test(y, scores_a, scores_b) -> DeLongResult:
    """DeLong's test for two correlated AUCs on the same images.

    With the structural components of ``delong_components``, S10 and S01 the
    2 x 2 sample covariances (ddof = 1) of V10 over the m positives and of V01
    over the n negatives,

        S          = S10 / m + S01 / n
        var(delta) = c' S c,   c = (-1, 1),   delta = AUC_b - AUC_a
        z          = delta / sqrt(var(delta)),   p = 2 (1 - Phi(|z|)) = erfc(|z| / sqrt 2).

    Degenerate cases (never NaN):
    * no positive or no negative: every field but the counts is None;
    * fewer than 2 positives or 2 negatives (no covariance to estimate): AUCs and
      delta are given, var, se, z and p are None;
    * zero variance (se <= 1e-12, e.g. identical scores or identical rankings): if
      also |delta| <= 1e-12 the two are indistinguishable, z = 0 and p = 1.0;
      otherwise (both AUCs perfectly determined and different) z and p are None.
    """
    y = _as_vector(y, "y")
    a = _as_vector(scores_a, "scores_a")
    b = _as_vector(scores_b, "scores_b")
    _check_same_shape(y, a, b)
    n_pos = int((y > 0.5).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return DeLongResult(None, None, None, None, None, None, None, n_pos, n_neg)

    auc, v10, v01 = delong_components(y, np.stack([a, b], axis=1))
    delta = float(auc[1] - auc[0])
    result = DeLongResult(float(auc[0]), float(auc[1]), delta, None, None, None, None, n_pos, n_neg)
    if n_pos < 2 or n_neg < 2:
        return result

    covariance = np.cov(v10, rowvar=False) / n_pos + np.cov(v01, rowvar=False) / n_neg
    contrast = np.array([-1.0, 1.0])
    var = max(float(contrast @ covariance @ contrast), 0.0)
    se = math.sqrt(var)
    if se <= _ZERO:
        if abs(delta) <= _ZERO:
            return result._replace(var=var, se=se, z=0.0, p=1.0)
        return result._replace(var=var, se=se)
    z = delta / se
    return result._replace(var=var, se=se, z=z, p=math.erfc(abs(z) / math.sqrt(2.0)))


def delong_per_class(y, scores_a, scores_b, labels: Sequence[str]) -> Dict[str, dict]:
    """DeLong's test for every class, with Holm-adjusted p-values over the tested classes.

    Returns {label: DeLongResult fields as a dict, plus ``p_holm``}; classes whose
    p is None are left out of the correction and keep ``p_holm`` None.
    """
    y = _as_matrix(y, "y")
    a = _as_matrix(scores_a, "scores_a")
    b = _as_matrix(scores_b, "scores_b")
    _check_same_shape(y, a, b)
    if len(labels) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} columns but {len(labels)} labels")
    results = [delong_test(y[:, c], a[:, c], b[:, c])._asdict() for c in range(y.shape[1])]
    adjusted = holm([r["p"] for r in results])
    for r, p_holm in zip(results, adjusted):
        r["p_holm"] = p_holm
    return {str(label): r for label, r in zip(labels, results)}


# --------------------------------------------------------------------------
# Multiple comparisons
# --------------------------------------------------------------------------

def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values, in the input order.

    With the k non-None p-values sorted, p_(1) <= ... <= p_(k),

        p~_(i) = max_{j <= i} min(1, (k - j + 1) p_(j)),

    so adjusted values keep the order of the raw ones and are capped at 1.
    Rejecting where p~ <= alpha controls the family-wise error rate at alpha.
    None entries (untested classes) stay None and do not count in k.
    """
    tested = [i for i, p in enumerate(pvalues) if p is not None]
    raw = np.array([pvalues[i] for i in tested], dtype=np.float64)
    if np.any((raw < 0.0) | (raw > 1.0)) or not np.isfinite(raw).all():
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)}")
    order = np.argsort(raw, kind="stable")
    k = raw.size
    stepped = np.minimum(1.0, (k - np.arange(k)) * raw[order])
    adjusted_sorted = np.maximum.accumulate(stepped)
    adjusted: List[Optional[float]] = [None] * len(pvalues)
    for position, value in zip(order, adjusted_sorted):
        adjusted[tested[position]] = float(value)
    return adjusted


# --------------------------------------------------------------------------
# Weighted AUC and resampling units
# --------------------------------------------------------------------------

class WeightedAUC:
    """The AUC of one class under many weightings of the same images.

    For image weights w (a resample's draw counts), the weighted Mann-Whitney statistic is

        AUC(w) = sum_{i pos} sum_{j neg} w_i w_j psi(s_i, s_j) / (W_pos W_neg).

    With the negatives sorted by score once and K(t) the total weight of the first
    t of them, the inner sum for positive i is (K(lo_i) + K(hi_i)) / 2, lo_i / hi_i
    being the number of negatives scoring below / not above s_i. So a block of
    weightings costs two gathers, a cumulative sum and a dot product, exact in
    integer arithmetic until the final division. All weights 1: the ordinary AUC.
    """

    def __init__(self, y, scores):
        positive = np.asarray(y, dtype=np.float64) > 0.5
        scores = np.asarray(scores, dtype=np.float64)
        self.positives = np.flatnonzero(positive)
        negatives = np.flatnonzero(~positive)
        self.negatives = negatives[np.argsort(scores[negatives], kind="stable")]
        sorted_negative_scores = scores[self.negatives]
        positive_scores = scores[self.positives]
        self.below = np.searchsorted(sorted_negative_scores, positive_scores, side="left")
        self.not_above = np.searchsorted(sorted_negative_scores, positive_scores, side="right")

    def __call__(self, weights) -> np.ndarray:
        """``weights`` [R, N] (or [N]) non-negative integers -> AUC [R]; NaN where a
        row gives no weight to the positives or none to the negatives."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.int64))
        negative_weights = np.take(weights, self.negatives, axis=1)
        cumulative = np.zeros((weights.shape[0], negative_weights.shape[1] + 1), dtype=np.int64)
        np.cumsum(negative_weights, axis=1, out=cumulative[:, 1:])
        positive_weights = np.take(weights, self.positives, axis=1)
        twice_numerator = np.einsum(
            "rp,rp->r", positive_weights,
            np.take(cumulative, self.below, axis=1) + np.take(cumulative, self.not_above, axis=1),
        )
        pairs = positive_weights.sum(axis=1) * cumulative[:, -1]
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = twice_numerator / (2.0 * pairs)
        auc[pairs == 0] = np.nan
        return auc


def _image_units(groups, n_images: int) -> np.ndarray:
    return np.arange(n_images)


def _patient_units(groups, n_images: int) -> np.ndarray:
    """Patients numbered 0, 1, ... in order of first appearance; [N] unit of each image."""
    if groups is None:
        raise ValueError("unit='patient' needs the patient id of every image (groups); "
                         "pass them, or unit='image'")
    groups = np.asarray(groups)
    if groups.shape != (n_images,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({n_images},): one id per image")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    renumber = np.empty(first.size, dtype=np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(first.size)
    return renumber[inverse.ravel()]


# What one bootstrap draw picks: unit name -> function (groups, n_images) -> unit of each image.
# With one image per patient both give the same units, hence the same resamples for a seed.
UNITS = {"patient": _patient_units, "image": _image_units}


def resample_weights(rng: np.random.Generator, units: np.ndarray, n_resamples: int) -> np.ndarray:
    """Image weights of ``n_resamples`` bootstrap draws: int64 [R, N].

    ``units`` [N] numbers each image's unit 0..U-1. A draw picks U units with
    replacement; an image's weight is the number of times its unit was picked.
    """
    n_units = int(units.max()) + 1 if units.size else 0
    draws = rng.integers(0, n_units, size=(n_resamples, n_units))
    offsets = (np.arange(n_resamples, dtype=np.int64) * n_units)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_units)
    return counts.reshape(n_resamples, n_units)[:, units]


def _bootstrap_samples(y: np.ndarray, score_sets: Sequence[np.ndarray], units: np.ndarray,
                       n_resamples: int, seed: int) -> List[np.ndarray]:
    """AUC of every class in every resample, for each score set under the same resamples:
    one float [R, C] per score set, NaN where undefined (always, for a class undefined
    on the full data)."""
    n_images, n_classes = y.shape
    samples = [np.full((n_resamples, n_classes), np.nan) for _ in score_sets]
    defined = np.flatnonzero(_defined(y))
    if defined.size == 0:
        return samples
    aucs = [[WeightedAUC(y[:, c], s[:, c]) for c in defined] for s in score_sets]
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // max(n_images, 1)))
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        weights = resample_weights(rng, units, stop - start)
        for sample, class_aucs in zip(samples, aucs):
            for c, auc in zip(defined, class_aucs):
                sample[start:stop, c] = auc(weights)
    return samples


def _defined(y: np.ndarray) -> np.ndarray:
    """bool [C]: the class has at least one positive and one negative."""
    n_pos = (y > 0.5).sum(axis=0)
    return (n_pos > 0) & (n_pos < y.shape[0])


def _mean_over_complete(samples: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Mean AUC over the ``defined`` classes of each resample in which all of them are
    defined; the other resamples are dropped."""
    chosen = samples[:, defined]
    if chosen.shape[1] == 0:
        return np.empty(0)
    return chosen[np.isfinite(chosen).all(axis=1)].mean(axis=1)


def _percentile_interval(values: np.ndarray, level: float) -> Interval:
    """[lo, hi] percentile interval of the finite values; None if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _check_bootstrap_args(n_resamples: int, level: float, unit: str) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r} unknown; choose one of {sorted(UNITS)}")


# --------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------

def bootstrap_auc_ci(y, scores, labels: Sequence[str], groups=None, unit: str = "patient",
                     n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Tuple[Dict[str, Interval], Interval]:
    """Percentile-bootstrap intervals of per-class AUC and of the mean AUC, seeded.

    ``y`` and ``scores`` [N, C]; ``groups`` [N] the patient id of each image
    (needed for ``unit="patient"``); ``unit`` one of ``UNITS``. Returns
    ``(per_class, mean)``: ``per_class`` maps each label to [lo, hi] over the
    resamples in which that class has a positive and a negative (None if the class
    is undefined on the full data or in every resample); ``mean`` is the interval
    of the mean AUC over the classes defined on the full data, from the resamples
    in which every one of them is defined (None if there is none).
    """
    _check_bootstrap_args(n_resamples, level, unit)
    y, scores = _as_matrix(y, "y"), _as_matrix(scores, "scores")
    _check_same_shape(y, scores)
    if len(labels) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} columns but {len(labels)} labels")
    units = UNITS[unit](groups, y.shape[0])
    (samples,) = _bootstrap_samples(y, [scores], units, n_resamples, seed)
    per_class = {str(label): _percentile_interval(samples[:, c], level)
                 for c, label in enumerate(labels)}
    return per_class, _percentile_interval(_mean_over_complete(samples, _defined(y)), level)


class PairedBootstrap(NamedTuple):
    """Bootstrap comparison of mean AUC(b) - mean AUC(a) on the same images."""

    delta: Optional[float]   # on the full data, over the classes defined there
    ci: Interval             # percentile interval of the resampled differences
    p: Optional[float]       # two-sided, see ``paired_bootstrap``
    n_used: int              # resamples in which every such class is defined


def paired_bootstrap(y, scores_a, scores_b, groups=None, unit: str = "patient",
                     n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> PairedBootstrap:
    """Paired bootstrap of the difference in mean AUC between two score sets.

    Each resample weights the images once (by patient with ``unit="patient"``) and
    scores both sets under those weights, so the difference keeps the pairing:
    delta* = mean_c AUC_b*(c) - mean_c AUC_a*(c) over the classes defined on the
    full data, from the R resamples defining them all. Two-sided p, the smallest
    tail of delta* beyond 0 doubled, with the add-one rule so that it is never 0:

        p = min(1, 2 (1 + min(#{delta* <= 0}, #{delta* >= 0})) / (R + 1)).

    p <= alpha roughly when 0 lies outside the (1 - alpha) percentile interval. Identical
    score sets give p = 1. No class defined, or no usable resample: ci and p None.
    """
    _check_bootstrap_args(n_resamples, level, unit)
    y = _as_matrix(y, "y")
    a, b = _as_matrix(scores_a, "scores_a"), _as_matrix(scores_b, "scores_b")
    _check_same_shape(y, a, b)
    defined = _defined(y)
    if not defined.any():
        return PairedBootstrap(None, None, None, 0)
    full = np.ones((1, y.shape[0]), dtype=np.int64)
    observed = [np.mean([WeightedAUC(y[:, c], s[:, c])(full)[0] for c in np.flatnonzero(defined)])
                for s in (a, b)]
    delta = float(observed[1] - observed[0])

    units = UNITS[unit](groups, y.shape[0])
    samples_a, samples_b = _bootstrap_samples(y, [a, b], units, n_resamples, seed)
    deltas = _mean_over_complete(samples_b, defined) - _mean_over_complete(samples_a, defined)
    n_used = int(deltas.size)
    if n_used == 0:
        return PairedBootstrap(delta, None, None, 0)
    smaller_tail = min(int((deltas <= 0).sum()), int((deltas >= 0).sum()))
    p = min(1.0, 2.0 * (1 + smaller_tail) / (n_used + 1))
    return PairedBootstrap(delta, _percentile_interval(deltas, level), p, n_used)


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------

class MeanSD(NamedTuple):
    """Mean and sample standard deviation over seeds."""

    mean: Optional[float]
    sd: Optional[float]
    n: int


def mean_sd(values: Sequence[Optional[float]]) -> MeanSD:
    """Mean and sample SD, sqrt(sum (x - mean)^2 / (n - 1)), of the non-None values.

    None entries (e.g. an AUC undefined in one run) are left out and not counted in n.
    One value: SD None; none: mean and SD None.
    """
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return MeanSD(None, None, 0)
    if not np.isfinite(present).all():
        raise ValueError(f"values must be finite, got {list(values)}")
    sd = float(np.std(present, ddof=1)) if present.size > 1 else None
    return MeanSD(float(present.mean()), sd, int(present.size))
