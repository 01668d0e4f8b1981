"""The mathematics of evaluation, arrays in and numbers out: ROC-AUC and its bootstrap (over images
or patients), DeLong's test, Holm's correction, the paired bootstrap, mean +- SD over seeds,
operating points and the figures at a threshold, AUPRC, calibration, AUC by subgroup and the
pointing game. Nothing here reads or writes a file or prints.

Conventions
-----------
* ``probs`` and ``targets`` are [N images, C classes] (numpy arrays, lists, or torch tensors,
  fastai subclasses included); a target > 0.5 is a positive. A call is ``prob >= threshold``.
* Results are keyed by ``labels[c]`` when labels are given, else by the column index ``c``.
* An undefined figure is ``None``, never NaN and never 0.0: the AUC of a class without positive
  or without negative example, a ratio whose denominator is 0. Such a class is left out of the
  mean AUC. Returned values are plain Python (float, int, None, lists, dicts), JSON-serialisable,
  except where a docstring says "array".
* Comparisons are of a reference ``a`` and a candidate ``b`` scored on the same images; every
  difference is ``b - a`` (positive: the candidate is better).

The weighted AUC
----------------
Every bootstrap here is a vector of non-negative integer weights w over the N images (how often
each image is in the resample). The AUC of a weighted sample is the weighted Mann-Whitney statistic

    AUC(w) = sum_{i pos} sum_{j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos * W_neg),

W_pos = sum_{i pos} w_i, W_neg likewise. With the negatives sorted by score once per class and K(t)
the cumulative weight of the first t of them (K(0) = 0), the inner sum for positive i is
``K(lo_i) + 0.5 (K(hi_i) - K(lo_i))``, lo_i / hi_i counting the negatives scoring below / not above
s_i (``searchsorted``, computed once). A block of resamples costs a gather, a cumulative sum and a
dot product per class, in exact integer arithmetic; all weights 1 give the ordinary ROC-AUC, ties
included. A resample with no positive or no negative weight leaves the class undefined (NaN inside,
skipped in the intervals).

Images or patients
------------------
ChestX-ray14's test split holds several images of most patients, and a patient's images resemble
each other far more than two patients' do. The image bootstrap (:class:`ImageResampler`) draws N
images with replacement and so treats them as independent: its intervals are too narrow. The
patient bootstrap (:class:`PatientResampler`) draws the P patients with replacement, P times, and
gives every image its patient's draw count, keeping the dependence inside the resample. With one
image per patient the two draw the same resamples for a seed. Every bootstrap below (AUC, mean AUC,
the paired difference, the figures at a threshold) takes either through ``resampler``.

The mean AUC of a resample
--------------------------
The point estimate averages the classes defined on the full split. In a resample, a class whose
few positives were all left out is undefined; the resample's mean averages the classes it defines
among those (:func:`mean_auc_samples`), as the point estimate leaves out undefined classes.
Requiring every class in every resample would keep almost no resample when a rare class has one
or two positives. The paired bootstrap applies the same rule to both score sets; whether a class
is defined depends only on the weights and the targets, so both means of a resample run over the
same classes and their difference is a difference of like with like.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    # inputs and point estimates
    "to_numpy", "check_inputs", "per_class_auc", "mean_auc",
    # weighted AUC and the bootstrap
    "build_rank_index", "weighted_auc", "ImageResampler", "PatientResampler", "RESAMPLERS",
    "make_resampler", "weight_blocks", "bootstrap_auc_samples", "mean_auc_samples",
    "percentile_interval", "bootstrap_ci",
    # comparing runs
    "DeLongResult", "delong_components", "delong_test", "delong_per_class", "holm",
    "PairedBootstrap", "paired_bootstrap", "MeanSD", "mean_sd",
    # operating points and figures at a threshold
    "FIGURES", "OPERATING_POINT_RULES", "parse_operating_point", "operating_points",
    "at_threshold", "bootstrap_at_threshold",
    # precision-recall, calibration, subgroups, localisation
    "auprc", "prevalence", "expected_calibration_error", "reliability_diagram",
    "age_in_years", "SUBGROUPS", "subgroup_auc", "pointing_game",
]

Key = Union[int, str]
Interval = Optional[List[float]]
# (rng, n_resamples) -> int [n_resamples, N]: row r holds the weight of every image in resample r.
Resampler = Callable[[np.random.Generator, int], np.ndarray]

FIGURES = ("sensitivity", "specificity", "ppv", "npv", "f1")

# Weights (resamples x images) drawn in one bootstrap block; bounds memory at a few tens of MB
# per intermediate array.
_BLOCK_ELEMENTS = 4_000_000

# Below this a standard error (or difference) of two AUCs is rounding noise: AUCs are ratios of
# counts in [0, 1], so any real difference is at least 1 / (n_pos * n_neg).
_ZERO = 1e-12


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def to_numpy(x) -> np.ndarray:
    """Any array-like or (fastai) tensor, on any device, as a float64 ndarray."""
    if hasattr(x, "detach") and hasattr(x, "as_subclass"):
        import torch  # already imported by whoever made the tensor; not needed for arrays

        x = x.detach().as_subclass(torch.Tensor).cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def class_keys(n_classes: int, labels: Optional[Sequence[str]]) -> List[Key]:
    """``labels`` as strings, or the column indices when no labels are given."""
    if labels is None:
        return list(range(n_classes))
    if len(labels) != n_classes:
        raise ValueError(f"{n_classes} columns but {len(labels)} labels")
    return [str(label) for label in labels]


def check_inputs(probs, targets, labels: Optional[Sequence[str]] = None
                 ) -> Tuple[np.ndarray, np.ndarray, List[Key]]:
    """Validate shapes and values; return (scores float64 [N, C], positives bool [N, C], class keys)."""
    scores, target_values = to_numpy(probs), to_numpy(targets)
    if scores.ndim != 2 or scores.shape != target_values.shape:
        raise ValueError(f"probs {scores.shape} and targets {target_values.shape} must both be [N, C]")
    keys = class_keys(scores.shape[1], labels)
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"probs contain {n_bad} NaN/inf values; the model output diverged")
    return scores, target_values > 0.5, keys


def has_both_classes(positive: np.ndarray) -> bool:
    """True when a boolean column holds at least one positive and one negative."""
    return 0 < int(positive.sum()) < positive.size


def defined_classes(positive: np.ndarray) -> np.ndarray:
    """bool [C]: the class has at least one positive and one negative."""
    n_pos = positive.sum(axis=0)
    return (n_pos > 0) & (n_pos < positive.shape[0])


def none_for_nan(value) -> Optional[float]:
    return None if np.isnan(value) else float(value)


def ratio(numerator: float, denominator: float) -> Optional[float]:
    """numerator / denominator as a float, None when the denominator is 0."""
    return float(numerator / denominator) if denominator > 0 else None


# --------------------------------------------------------------------------
# Point estimates
# --------------------------------------------------------------------------

def per_class_auc(probs, targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """ROC-AUC of each column: {class: auc}, None where a class lacks positives or negatives."""
    from sklearn.metrics import roc_auc_score  # here, not at the top: sklearn takes seconds to import

    scores, positive, keys = check_inputs(probs, targets, labels)
    return {key: float(roc_auc_score(positive[:, c], scores[:, c])) if has_both_classes(positive[:, c])
            else None for c, key in enumerate(keys)}


def mean_auc(per_class: Dict[Key, Optional[float]]) -> Optional[float]:
    """Mean over the classes whose AUC is defined (not None); None if there are none."""
    defined = [value for value in per_class.values() if value is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------
# Weighted AUC
# --------------------------------------------------------------------------

class RankIndex(NamedTuple):
    """Per-class precomputation for the weighted AUC (see the module docstring)."""

    positives: np.ndarray   # image indices of the positives
    negatives: np.ndarray   # image indices of the negatives, by ascending score
    below: np.ndarray       # per positive: number of negatives with a lower score
    not_above: np.ndarray   # per positive: number of negatives with a score <= its own
    tied: np.ndarray        # positions (into positives) where below < not_above


def build_rank_index(scores: np.ndarray, positive: np.ndarray) -> RankIndex:
    """Sort the negatives of one class once and locate every positive among them."""
    positives = np.flatnonzero(positive)
    negatives = np.flatnonzero(~positive)
    negatives_sorted = negatives[np.argsort(scores[negatives], kind="stable")]
    negative_scores = scores[negatives_sorted]
    positive_scores = scores[positives]
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    not_above = np.searchsorted(negative_scores, positive_scores, side="right")
    tied = np.flatnonzero(not_above > below)
    return RankIndex(positives, negatives_sorted, below, not_above, tied)


def weighted_auc(index: RankIndex, weights: np.ndarray) -> np.ndarray:
    """AUC(w) of every row of ``weights`` (integer [R resamples, N images]): array [R].

    NaN for a resample without positive or without negative weight. Twice the numerator is
    accumulated in int64, so the result is exact up to the final division.
    """
    # Column t of ``cumulative`` is K(t), the weight of the t lowest-scoring negatives.
    cumulative = np.zeros((weights.shape[0], index.negatives.size + 1), dtype=np.int64)
    np.cumsum(np.take(weights, index.negatives, axis=1), axis=1, out=cumulative[:, 1:])
    positive_weights = np.take(weights, index.positives, axis=1).astype(np.int64, copy=False)

    twice_numerator = 2 * np.einsum(
        "rp,rp->r", positive_weights, np.take(cumulative, index.below, axis=1)
    )
    if index.tied.size:
        tie_weight = (np.take(cumulative, index.not_above[index.tied], axis=1)
                      - np.take(cumulative, index.below[index.tied], axis=1))
        twice_numerator += np.einsum(
            "rp,rp->r", np.take(positive_weights, index.tied, axis=1), tie_weight
        )

    pairs = positive_weights.sum(axis=1) * cumulative[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = twice_numerator / (2.0 * pairs)
    auc[pairs == 0] = np.nan
    return auc


# --------------------------------------------------------------------------
# Resampling units
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageResampler:
    """The bootstrap over images: a resample draws ``n_images`` images with replacement, and an
    image's weight is how often it is drawn (each row sums to ``n_images``)."""

    n_images: int
    unit: ClassVar[str] = "image"

    @classmethod
    def from_ids(cls, patient_ids: Sequence) -> "ImageResampler":
        """The image bootstrap of as many images as ``patient_ids`` has entries (ids unused)."""
        return cls(len(patient_ids))

    def __call__(self, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
        """int64 [n_resamples, n_images]; draws row after row, so blocking never changes them."""
        n = self.n_images
        draws = rng.integers(0, n, size=(n_resamples, n), dtype=np.int32)
        flat = draws.astype(np.int64) + (np.arange(n_resamples, dtype=np.int64) * n)[:, None]
        return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


@dataclass(frozen=True, eq=False)
class PatientResampler:
    """The bootstrap over patients: a resample draws the P patients with replacement, P times,
    and an image's weight is its patient's draw count (the image bootstrap of the patients,
    spread over their images)."""

    patient_of_image: np.ndarray   # int [N]: each image's patient, numbered 0..P-1
    unit: ClassVar[str] = "patient"

    @classmethod
    def from_ids(cls, patient_ids: Sequence) -> "PatientResampler":
        """Patients numbered in order of first appearance (so one image per patient gives the
        image bootstrap's resamples); ValueError for a missing id (None or NaN)."""
        numbers: Dict[object, int] = {}
        for patient in patient_ids:
            if is_missing(patient):
                raise ValueError("patient ids contain missing values; give every image its patient id")
            numbers.setdefault(patient, len(numbers))
        return cls(np.array([numbers[p] for p in patient_ids], dtype=np.int64))

    def __call__(self, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
        n_patients = int(self.patient_of_image.max()) + 1 if self.patient_of_image.size else 0
        return ImageResampler(n_patients)(rng, n_resamples)[:, self.patient_of_image]


# What one bootstrap draw picks, by name: unit -> (patient id of every image) -> resampler.
RESAMPLERS: Dict[str, Callable[[Sequence], Resampler]] = {
    "patient": PatientResampler.from_ids,
    "image": ImageResampler.from_ids,
}


def make_resampler(unit: str, patient_ids: Sequence) -> Resampler:
    """The resampler of ``unit`` (a key of :data:`RESAMPLERS`) for images of these patients."""
    if unit not in RESAMPLERS:
        raise ValueError(f"unit {unit!r} unknown; choose one of {', '.join(sorted(RESAMPLERS))}")
    return RESAMPLERS[unit](patient_ids)


def weight_blocks(resampler: Resampler, n_images: int, n_resamples: int,
                  seed: int) -> Iterator[Tuple[slice, np.ndarray]]:
    """The ``n_resamples`` weight rows of a seeded bootstrap, in blocks: (rows, weights [len(rows), N]).

    One generator, seeded once, feeds every block; a block holds about ``_BLOCK_ELEMENTS`` weights.
    """
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // max(n_images, 1)))
    for start in range(0, n_resamples, block):
        rows = slice(start, min(start + block, n_resamples))
        weights = resampler(rng, rows.stop - start)
        if weights.shape != (rows.stop - start, n_images):
            raise ValueError(f"the resampler gave weights {weights.shape}, expected "
                             f"({rows.stop - start}, {n_images})")
        yield rows, weights


# --------------------------------------------------------------------------
# Bootstrap of the AUC
# --------------------------------------------------------------------------

def auc_samples(score_sets: Sequence[np.ndarray], positive: np.ndarray, n_resamples: int, seed: int,
                resampler: Optional[Resampler] = None) -> List[np.ndarray]:
    """AUC of every class in every resample, for each score set [N, C] under the SAME resamples:
    one array [R, C] per set, NaN where undefined (throughout for a class undefined on the split)."""
    n_images, n_classes = positive.shape
    samples = [np.full((n_resamples, n_classes), np.nan) for _ in score_sets]
    defined = np.flatnonzero(defined_classes(positive))
    if defined.size == 0 or n_resamples == 0:
        return samples
    indexes = [{c: build_rank_index(scores[:, c], positive[:, c]) for c in defined} for scores in score_sets]
    resampler = resampler or ImageResampler(n_images)
    for rows, weights in weight_blocks(resampler, n_images, n_resamples, seed):
        for sample, index in zip(samples, indexes):
            for c in defined:
                sample[rows, c] = weighted_auc(index[c], weights)
    return samples


def bootstrap_auc_samples(scores: np.ndarray, positive: np.ndarray, n_resamples: int = 1000,
                          seed: int = 0, resampler: Optional[Resampler] = None) -> np.ndarray:
    """AUC of every class in every resample: array [R, C], NaN where undefined.

    ``scores`` float [N, C] and ``positive`` bool [N, C] as from :func:`check_inputs`;
    ``resampler`` draws the weights (default: :class:`ImageResampler`).
    """
    (samples,) = auc_samples([scores], positive, n_resamples, seed, resampler)
    return samples


def percentile_interval(values: np.ndarray, level: float) -> Interval:
    """Percentile interval of the finite values, [lo, hi]; None if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def mean_auc_samples(samples: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Mean AUC per resample over the ``scored`` classes (bool [C]: defined on the full split): array [R].

    A class a resample leaves undefined is left out of that resample's mean (module docstring);
    a resample defining none of them is NaN (skipped).
    """
    chosen = samples[:, scored]
    defined = np.isfinite(chosen)
    counts = defined.sum(axis=1)
    totals = np.where(defined, chosen, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def check_bootstrap_args(n_resamples: int, level: float) -> None:
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_ci(probs, targets, labels: Optional[Sequence[str]] = None, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95, resampler: Optional[Resampler] = None
                 ) -> Tuple[Dict[Key, Interval], Interval]:
    """Seeded percentile-bootstrap intervals of every class's AUC and of the mean AUC.

    ``resampler``: :class:`ImageResampler` (the default) or :class:`PatientResampler`.
    Returns ``(per_class, mean)``: ``per_class`` maps each class to [lo, hi] over the resamples
    defining it (None where the class AUC is undefined or no resample defines it); ``mean`` is the
    interval of :func:`mean_auc_samples` (None likewise).
    """
    check_bootstrap_args(n_resamples, level)
    scores, positive, keys = check_inputs(probs, targets, labels)
    samples = bootstrap_auc_samples(scores, positive, n_resamples, seed, resampler)
    per_class = {key: percentile_interval(samples[:, c], level) for c, key in enumerate(keys)}
    return per_class, percentile_interval(mean_auc_samples(samples, defined_classes(positive)), level)


# --------------------------------------------------------------------------
# DeLong's test (fast algorithm of Sun & Xu, 2014)
# --------------------------------------------------------------------------

def as_matrix(x, name: str) -> np.ndarray:
    """float64 [N, C] (a 1-D input becomes one column); NaN or inf is an error."""
    values = to_numpy(x)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, C], got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return values


def as_vector(x, name: str) -> np.ndarray:
    """float64 [N] (an [N, 1] column is accepted); NaN or inf is an error."""
    values = as_matrix(x, name)
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

    Returns arrays (auc [K], v10 [m, K], v01 [n, K]); needs m >= 1 and n >= 1.
    Sorting makes it O(N log N) per score set instead of O(m n).
    """
    from scipy.stats import rankdata  # here, not at the top: only comparisons need it

    positive = to_numpy(y) > 0.5
    scores = to_numpy(scores)
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
    y = as_vector(y, "y")
    a = as_vector(scores_a, "scores_a")
    b = as_vector(scores_b, "scores_b")
    check_same_shape(y, a, b)
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

    Returns {label: DeLongResult fields as a dict, plus ``p_holm``}; classes whose p is None are
    left out of the correction and keep ``p_holm`` None.
    """
    y = as_matrix(y, "y")
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
    a, positive, _ = check_inputs(scores_a, targets)
    b, _, _ = check_inputs(scores_b, targets)
    scored = defined_classes(positive)
    if not scored.any():
        return PairedBootstrap(None, None, None, 0)
    observed = [mean_auc(per_class_auc(s, positive)) for s in (a, b)]
    delta = float(observed[1] - observed[0])

    samples_a, samples_b = auc_samples([a, b], positive, n_resamples, seed, resampler)
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
    scores, positive, _ = check_inputs(probs, targets)
    thresholds: List[Optional[float]] = []
    for c in range(scores.shape[1]):
        if not has_both_classes(positive[:, c]):
            thresholds.append(None)
            continue
        table = roc_table(scores[:, c], positive[:, c])
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

def call_matrices(scores: np.ndarray, positive: np.ndarray, thresholds: Sequence[Optional[float]]):
    """Indicator arrays [N, C] (float64) of TP, FP, FN, TN; all zero in a class without threshold."""
    if len(thresholds) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} columns but {len(thresholds)} thresholds")
    defined = np.array([t is not None for t in thresholds], dtype=bool)
    cut = np.array([np.inf if t is None else float(t) for t in thresholds])
    called = (scores >= cut) & defined
    negative = ~positive & defined
    return tuple(m.astype(np.float64) for m in (
        called & positive, called & negative, ~called & positive & defined, ~called & negative))


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
    scores, positive, keys = check_inputs(probs, targets, labels)
    counts = [m.sum(axis=0) for m in call_matrices(scores, positive, thresholds)]
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
    scores, positive, keys = check_inputs(probs, targets, labels)
    n_images, n_classes = scores.shape
    indicators = np.concatenate(call_matrices(scores, positive, thresholds), axis=1)   # [N, 4C]
    counts = np.empty((n_resamples, 4 * n_classes))
    for rows, weights in weight_blocks(resampler or ImageResampler(n_images), n_images, n_resamples, seed):
        counts[rows] = weights.astype(np.float64) @ indicators
    samples = figures_from_counts(*np.split(counts, 4, axis=1))   # each [R, C]
    return {key: {name: percentile_interval(samples[name][:, c], level) for name in FIGURES}
            for c, key in enumerate(keys)}


# --------------------------------------------------------------------------
# Precision-recall
# --------------------------------------------------------------------------

def auprc(probs, targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Area under the precision-recall curve per class (sklearn's average precision,
    AP = sum_k (R_k - R_{k-1}) P_k over the thresholds); None without positive or negative.

    A random ranking scores about the prevalence, so report the two side by side.
    """
    from sklearn.metrics import average_precision_score

    scores, positive, keys = check_inputs(probs, targets, labels)
    return {key: float(average_precision_score(positive[:, c], scores[:, c]))
            if has_both_classes(positive[:, c]) else None
            for c, key in enumerate(keys)}


def prevalence(targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Fraction of positive images per class; None when there are no images."""
    positive = to_numpy(targets) > 0.5
    if positive.ndim != 2:
        raise ValueError(f"targets {positive.shape} must be [N, C]")
    return {key: ratio(positive[:, c].sum(), positive.shape[0])
            for c, key in enumerate(class_keys(positive.shape[1], labels))}


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

class CalibrationBins(NamedTuple):
    """Equal-width bins over [0, 1]; mean_predicted and observed are NaN in empty bins."""

    centres: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> Optional[float]:
        """sum_b (n_b / n) |mean_predicted_b - observed_b| over the non-empty bins."""
        n = self.counts.sum()
        if n == 0:
            return None
        filled = self.counts > 0
        gaps = np.abs(self.mean_predicted[filled] - self.observed[filled])
        return float((self.counts[filled] * gaps).sum() / n)

    def as_dict(self) -> dict:
        return {
            "bin_centres": [float(x) for x in self.centres],
            "mean_predicted": [none_for_nan(x) for x in self.mean_predicted],
            "observed_frequency": [none_for_nan(x) for x in self.observed],
            "counts": [int(x) for x in self.counts],
        }


def calibration_bins(prob: np.ndarray, positive: np.ndarray, n_bins: int) -> CalibrationBins:
    """Bin b holds b/n_bins <= p < (b+1)/n_bins (computed as floor(n_bins p)); p = 1 joins the last bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    prob, positive = prob.ravel(), positive.ravel()
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise ValueError("calibration needs probabilities in [0, 1]")
    index = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=prob, minlength=n_bins)
    hits = np.bincount(index, weights=positive.astype(np.float64), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_predicted = np.where(counts > 0, sums / counts, np.nan)
        observed = np.where(counts > 0, hits / counts, np.nan)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    return CalibrationBins(centres, mean_predicted, observed, counts)


def expected_calibration_error(probs, targets, n_bins: int = 10,
                               labels: Optional[Sequence[str]] = None) -> dict:
    """ECE = sum_b (n_b / n) |mean prob in b - fraction positive in b| over equal-width bins.

    Returns {"pooled": ece, "per_class": {class: ece}}. "pooled" bins all N x C (probability,
    target) pairs together, every class's every image counting once; "per_class" bins each
    column alone. Calibration needs no positive or negative example, so a class is None only
    when there are no images.
    """
    scores, positive, keys = check_inputs(probs, targets, labels)
    return {
        "pooled": calibration_bins(scores, positive, n_bins).ece,
        "per_class": {key: calibration_bins(scores[:, c], positive[:, c], n_bins).ece
                      for c, key in enumerate(keys)},
    }


def reliability_diagram(probs, targets, n_bins: int = 10,
                        labels: Optional[Sequence[str]] = None) -> dict:
    """Data for a reliability diagram, pooled and per class (bins as in
    :func:`expected_calibration_error`): {"pooled": bins, "per_class": {class: bins}},
    bins = {bin_centres, mean_predicted, observed_frequency, counts}, the middle two None in
    empty bins. Plot observed against mean predicted; the diagonal is perfect calibration.
    """
    scores, positive, keys = check_inputs(probs, targets, labels)
    return {
        "pooled": calibration_bins(scores, positive, n_bins).as_dict(),
        "per_class": {key: calibration_bins(scores[:, c], positive[:, c], n_bins).as_dict()
                      for c, key in enumerate(keys)},
    }


# --------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------

_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
MAX_AGE = 120


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


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


class Subgroup(NamedTuple):
    """A way to group images: the metadata column, cell -> group (None leaves the image out),
    and the order of the known groups (others follow, sorted)."""

    column: str
    group_of: Callable[[object], Optional[str]]
    order: tuple = ()


# Columns as in the data frame of cxrmem.data.chestxray14 (from the CSV's 'Patient Gender',
# 'Patient Age' and 'View Position').
SUBGROUPS: Dict[str, Subgroup] = {
    "sex": Subgroup("patient_gender", category, ("F", "M")),
    "age": Subgroup("patient_age", age_band, ("<40", "40-59", "60+")),
    "view": Subgroup("view_position", category, ("PA", "AP")),
}


def subgroup_auc(probs, targets, metadata, labels: Optional[Sequence[str]] = None) -> dict:
    """ROC-AUC per class within each subgroup of :data:`SUBGROUPS` (sex, age band, view).

    ``metadata`` (a DataFrame) has one row per image, in the order of ``probs``, with the
    columns the subgroups name. Returns {"sex": {"M": {"n_images", "mean_auc", "per_class"}, ...},
    "age": ..., "view": ...}; per_class is None where the subgroup has no positive or no negative
    of the class, mean_auc the mean over the defined classes (None if none). Images whose cell
    is missing or unreadable are in no group of that grouping.
    """
    scores, positive, keys = check_inputs(probs, targets, labels)
    missing = [g.column for g in SUBGROUPS.values() if g.column not in metadata.columns]
    if missing:
        raise ValueError(f"metadata lacks the column(s) {', '.join(missing)}")
    if len(metadata) != scores.shape[0]:
        raise ValueError(f"{len(metadata)} metadata rows for {scores.shape[0]} images")

    result: dict = {}
    for name, grouping in SUBGROUPS.items():
        groups = np.array([grouping.group_of(v) for v in metadata[grouping.column].tolist()], dtype=object)
        present = {g for g in groups if g is not None}
        ordered = [g for g in grouping.order if g in present] + sorted(present - set(grouping.order))
        result[name] = {}
        for group in ordered:
            rows = groups == group
            per_class = dict(zip(keys, per_class_auc(scores[rows], positive[rows]).values()))
            result[name][group] = {"n_images": int(rows.sum()), "mean_auc": mean_auc(per_class),
                                   "per_class": per_class}
    return result


# --------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------

def pointing_game(heatmaps, boxes, findings: Sequence[str], original_size=(1024, 1024)) -> dict:
    """Pointing-game hit rate per finding, with the rate of a uniformly random point.

    ``heatmaps`` [K, H, W]: for each of K (image, box) pairs, the heatmap of the box's image for
    the box's finding, computed on the whole image resized (not cropped) to H x W. ``boxes``
    [K, 4]: x, y, w, h in the original image's pixels (ChestX-ray14's BBox_List_2017.csv:
    1024 x 1024 images). ``original_size``: (width, height), one pair or [K, 2].

    Mapping: heatmap cell (row i, column j) covers the original pixels x in [j W0 / W,
    (j + 1) W0 / W), y in [i H0 / H, (i + 1) H0 / H), and points at its centre
    ((j + 1/2) W0 / W, (i + 1/2) H0 / H). The heatmap's maximum is its first maximal cell in
    row-major order; a hit is a centre inside the closed box x <= px <= x + w, y <= py <= y + h.

    Chance: a uniformly random point hits with probability area(box within the image) / (W0 H0);
    its mean over the pairs. Returns {finding: {"n_boxes", "hit_rate", "chance_rate"}}.
    """
    maps = np.asarray(heatmaps, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    findings = [str(f) for f in findings]
    if maps.ndim != 3 or boxes.shape != (maps.shape[0], 4) or len(findings) != maps.shape[0]:
        raise ValueError(f"heatmaps {maps.shape}, boxes {boxes.shape} and {len(findings)} findings "
                         "must be [K, H, W], [K, 4] and K")
    n, height, width = maps.shape
    size = np.broadcast_to(np.asarray(original_size, dtype=np.float64), (n, 2))
    row, col = np.unravel_index(maps.reshape(n, -1).argmax(axis=1), (height, width))
    px = (col + 0.5) * size[:, 0] / width
    py = (row + 0.5) * size[:, 1] / height
    x, y, w, h = boxes.T
    hit = (x <= px) & (px <= x + w) & (y <= py) & (py <= y + h)

    inside_w = np.clip(np.minimum(x + w, size[:, 0]) - np.maximum(x, 0), 0, None)
    inside_h = np.clip(np.minimum(y + h, size[:, 1]) - np.maximum(y, 0), 0, None)
    chance = inside_w * inside_h / (size[:, 0] * size[:, 1])

    names = np.array(findings, dtype=object)
    return {finding: {"n_boxes": int((names == finding).sum()),
                      "hit_rate": float(hit[names == finding].mean()),
                      "chance_rate": float(chance[names == finding].mean())}
            for finding in dict.fromkeys(findings)}
