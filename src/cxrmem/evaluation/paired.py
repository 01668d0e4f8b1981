"""Comparing two score sets on the same images: DeLong's test, Holm's correction, the paired
bootstrap of the mean AUC, and mean +- SD over seeds. Every difference is ``b - a``."""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

from .auc import (_ZERO, Interval, Resampler, auc_samples, check_bootstrap_args, check_inputs, class_keys,
                  defined_classes, mean_auc, mean_auc_samples, per_class_auc, percentile_interval, to_numpy)

# --------------------------------------------------------------------------
# DeLong's test (fast algorithm of Sun & Xu, 2014)
# --------------------------------------------------------------------------

def as_matrix(x, name: str, targets: bool = False) -> np.ndarray:
    """float64 [N, C] (a 1-D input becomes one column); NaN or inf is an error, except NaN in
    ``targets`` (a missing label)."""
    values = to_numpy(x)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, C], got shape {values.shape}")
    if not (np.isfinite(values) | (targets & np.isnan(values))).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return values


def as_vector(x, name: str, targets: bool = False) -> np.ndarray:
    """float64 [N] (an [N, 1] column is accepted); NaN or inf as in :func:`as_matrix`."""
    values = as_matrix(x, name, targets)
    if values.shape[1] != 1:
        raise ValueError(f"{name} must be one column [N], got shape {values.shape}; "
                         "test one class at a time or use delong_per_class")
    return values[:, 0]


def check_same_shape(y: np.ndarray, *scores: np.ndarray) -> None:
    for s in scores:
        if s.shape != y.shape:
            raise ValueError(f"targets {y.shape} and scores {s.shape} must have the same shape")


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

    Returns arrays (auc [K], v10 [m, K], v01 [n, K]); needs m >= 1 and n >= 1. Images with a
    missing (NaN) target are in neither X nor Y.
    Sorting makes it O(N log N) per score set instead of O(m n).
    """
    targets = to_numpy(y)
    scores = to_numpy(scores)
    x, y_neg = scores[targets > 0.5], scores[targets <= 0.5]
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

    With the structural components of :func:`delong_components`, S10 and S01 the 2 x 2 sample
    covariances (ddof = 1) of V10 over the m positives and of V01 over the n negatives,

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
    y = as_vector(y, "y", targets=True)
    a = as_vector(scores_a, "scores_a")
    b = as_vector(scores_b, "scores_b")
    check_same_shape(y, a, b)
    n_pos = int((y > 0.5).sum())
    n_neg = int((y <= 0.5).sum())  # a missing (NaN) target is neither
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

    Returns {label: DeLongResult fields as a dict, plus ``p_holm``}; classes whose p is None are
    left out of the correction and keep ``p_holm`` None.
    """
    y = as_matrix(y, "y", targets=True)
    a = as_matrix(scores_a, "scores_a")
    b = as_matrix(scores_b, "scores_b")
    check_same_shape(y, a, b)
    keys = class_keys(y.shape[1], labels)
    results = [delong_test(y[:, c], a[:, c], b[:, c])._asdict() for c in range(y.shape[1])]
    adjusted = holm([r["p"] for r in results])
    for r, p_holm in zip(results, adjusted):
        r["p_holm"] = p_holm
    return dict(zip(keys, results))


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values, in the input order.

    With the k non-None p-values sorted, p_(1) <= ... <= p_(k),

        p~_(i) = max_{j <= i} min(1, (k - j + 1) p_(j)),

    so adjusted values keep the order of the raw ones and are capped at 1. Rejecting where
    p~ <= alpha controls the family-wise error rate at alpha. None entries (untested classes)
    stay None and do not count in k.
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
# Paired bootstrap of the mean AUC
# --------------------------------------------------------------------------

class PairedBootstrap(NamedTuple):
    """Bootstrap comparison of mean AUC(b) - mean AUC(a) on the same images."""

    delta: Optional[float]   # on the full data, over the classes defined there
    ci: Interval             # percentile interval of the resampled differences
    p: Optional[float]       # two-sided, see ``paired_bootstrap``
    n_used: int              # resamples defining at least one of those classes


def paired_bootstrap(targets, scores_a, scores_b, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, resampler: Optional[Resampler] = None) -> PairedBootstrap:
    """Paired bootstrap of the difference in mean AUC between two score sets on the same images.

    Each resample weights the images once (``resampler``: images by default, or patients) and
    scores both sets under those weights, so the difference keeps the pairing:
    delta* = mean AUC_b* - mean AUC_a*, each mean by :func:`mean_auc_samples` over the classes
    defined on the full data (the same classes in both, see the module docstring). Two-sided p,
    the smaller tail of delta* beyond 0 doubled, with the add-one rule so that it is never 0:

        p = min(1, 2 (1 + min(#{delta* <= 0}, #{delta* >= 0})) / (R + 1)),

    R the resamples defining a class. p <= alpha roughly when 0 lies outside the (1 - alpha)
    percentile interval. Identical score sets give p = 1. No class defined, or no usable
    resample: ci and p None.
    """
    check_bootstrap_args(n_resamples, level)
    a, positive, negative, _ = check_inputs(scores_a, targets)
    b, _, _, _ = check_inputs(scores_b, targets)
    scored = defined_classes(positive, negative)
    if not scored.any():
        return PairedBootstrap(None, None, None, 0)
    observed = [mean_auc(per_class_auc(s, targets)) for s in (a, b)]
    delta = float(observed[1] - observed[0])

    samples_a, samples_b = auc_samples([a, b], positive, negative, n_resamples, seed, resampler)
    deltas = mean_auc_samples(samples_b, scored) - mean_auc_samples(samples_a, scored)
    deltas = deltas[np.isfinite(deltas)]
    if deltas.size == 0:
        return PairedBootstrap(delta, None, None, 0)
    smaller_tail = min(int((deltas <= 0).sum()), int((deltas >= 0).sum()))
    p = min(1.0, 2.0 * (1 + smaller_tail) / (deltas.size + 1))
    return PairedBootstrap(delta, percentile_interval(deltas, level), p, int(deltas.size))


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




# --------------------------------------------------------------------------
# The comparison of two runs
# --------------------------------------------------------------------------

def compare_scores(targets, scores_reference, scores_other, labels: Sequence[str], n_resamples: int, seed: int,
                   resampler: Optional[Resampler] = None) -> dict:
    """``other`` against ``reference`` on the same images (differences other - reference): per class
    DeLong's test with Holm's correction, and the mean AUC's paired bootstrap (``n_resamples`` 0: none).

    The one comparison of two runs, for the compare command and a sweep's summary alike. Returns
    {delta_mean_auc, delta_mean_auc_ci95, p_bootstrap, resamples_used,
    per_class {label: {auc_reference, auc, delta_auc, p_delong, p_holm}}}.
    """
    per_class = delong_per_class(targets, scores_reference, scores_other, labels)
    paired = paired_bootstrap(targets, scores_reference, scores_other, n_resamples, seed, resampler=resampler)
    return {
        "delta_mean_auc": paired.delta,
        "delta_mean_auc_ci95": paired.ci,
        "p_bootstrap": paired.p,
        "resamples_used": paired.n_used,
        "per_class": {label: {"auc_reference": r["auc_a"], "auc": r["auc_b"], "delta_auc": r["delta"],
                              "p_delong": r["p"], "p_holm": r["p_holm"]} for label, r in per_class.items()},
    }
