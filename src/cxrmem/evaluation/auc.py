"""ROC-AUC, its weighted form and its bootstrap (over images or patients), AUPRC, prevalence.

Arrays in, numbers out; nothing here reads or writes a file or prints.

Conventions (shared by every module of :mod:`cxrmem.evaluation`)
-----------
-----------
* ``probs`` and ``targets`` are [N images, C classes] (numpy arrays, lists, or torch tensors,
  fastai subclasses included); a target > 0.5 is a positive, one <= 0.5 a negative, and NaN a
  *missing* label (a finding the image's data set does not grade, or an uncertain one left out):
  that image is left out of that class's every figure, never counted as a negative. A call is
  ``prob >= threshold``.
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

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

Key = Union[int, str]
Interval = Optional[List[float]]
# (rng, n_resamples) -> int [n_resamples, N]: row r holds the weight of every image in resample r.
Resampler = Callable[[np.random.Generator, int], np.ndarray]

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
    if hasattr(x, "detach") and hasattr(x, "as_subclass"):  # a tensor (duck-typed: no torch import here)
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def is_missing(value) -> bool:
    """None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def class_keys(n_classes: int, labels: Optional[Sequence[str]]) -> List[Key]:
    """``labels`` as strings, or the column indices when no labels are given."""
    if labels is None:
        return list(range(n_classes))
    if len(labels) != n_classes:
        raise ValueError(f"{n_classes} columns but {len(labels)} labels")
    return [str(label) for label in labels]


def check_inputs(probs, targets, labels: Optional[Sequence[str]] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[Key]]:
    """Validate shapes and values; return (scores float64 [N, C], positives bool [N, C],
    negatives bool [N, C], class keys). A missing (NaN) target is in neither."""
    scores, target_values = to_numpy(probs), to_numpy(targets)
    if scores.ndim != 2 or scores.shape != target_values.shape:
        raise ValueError(f"probs {scores.shape} and targets {target_values.shape} must both be [N, C]")
    keys = class_keys(scores.shape[1], labels)
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"probs contain {n_bad} NaN/inf values; the model output diverged")
    return scores, target_values > 0.5, target_values <= 0.5, keys


def has_both_classes(positive: np.ndarray, negative: np.ndarray) -> bool:
    """True when a class (boolean columns) holds at least one positive and one negative."""
    return bool(positive.any() and negative.any())


def defined_classes(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """bool [C]: the class has at least one positive and one negative."""
    return positive.any(axis=0) & negative.any(axis=0)


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
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    labelled = positive | negative
    return {key: float(roc_auc_score(positive[labelled[:, c], c], scores[labelled[:, c], c]))
            if has_both_classes(positive[:, c], negative[:, c]) else None for c, key in enumerate(keys)}


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


def build_rank_index(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> RankIndex:
    """Sort the negatives of one class once and locate every positive among them (images in
    neither, missing labels, weigh nothing)."""
    positives = np.flatnonzero(positive)
    negatives = np.flatnonzero(negative)
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

def auc_samples(score_sets: Sequence[np.ndarray], positive: np.ndarray, negative: np.ndarray, n_resamples: int,
                seed: int, resampler: Optional[Resampler] = None) -> List[np.ndarray]:
    """AUC of every class in every resample, for each score set [N, C] under the SAME resamples:
    one array [R, C] per set, NaN where undefined (throughout for a class undefined on the split)."""
    n_images, n_classes = positive.shape
    samples = [np.full((n_resamples, n_classes), np.nan) for _ in score_sets]
    defined = np.flatnonzero(defined_classes(positive, negative))
    if defined.size == 0 or n_resamples == 0:
        return samples
    indexes = [{c: build_rank_index(scores[:, c], positive[:, c], negative[:, c]) for c in defined}
               for scores in score_sets]
    resampler = resampler or ImageResampler(n_images)
    for rows, weights in weight_blocks(resampler, n_images, n_resamples, seed):
        for sample, index in zip(samples, indexes):
            for c in defined:
                sample[rows, c] = weighted_auc(index[c], weights)
    return samples


def bootstrap_auc_samples(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, n_resamples: int = 1000,
                          seed: int = 0, resampler: Optional[Resampler] = None) -> np.ndarray:
    """AUC of every class in every resample: array [R, C], NaN where undefined.

    ``scores`` float [N, C], ``positive`` and ``negative`` bool [N, C] as from :func:`check_inputs`;
    ``resampler`` draws the weights (default: :class:`ImageResampler`).
    """
    (samples,) = auc_samples([scores], positive, negative, n_resamples, seed, resampler)
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
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    samples = bootstrap_auc_samples(scores, positive, negative, n_resamples, seed, resampler)
    per_class = {key: percentile_interval(samples[:, c], level) for c, key in enumerate(keys)}
    return per_class, percentile_interval(mean_auc_samples(samples, defined_classes(positive, negative)), level)



# --------------------------------------------------------------------------
# Precision-recall
# --------------------------------------------------------------------------

def auprc(probs, targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Area under the precision-recall curve per class (sklearn's average precision,
    AP = sum_k (R_k - R_{k-1}) P_k over the thresholds); None without positive or negative.

    A random ranking scores about the prevalence, so report the two side by side.
    """
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    labelled = positive | negative
    return {key: float(average_precision_score(positive[labelled[:, c], c], scores[labelled[:, c], c]))
            if has_both_classes(positive[:, c], negative[:, c]) else None
            for c, key in enumerate(keys)}


def prevalence(targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Fraction of positive images per class among those labelled for it; None when there are none."""
    values = to_numpy(targets)
    if values.ndim != 2:
        raise ValueError(f"targets {values.shape} must be [N, C]")
    positive, labelled = values > 0.5, np.isfinite(values)
    return {key: ratio(positive[:, c].sum(), labelled[:, c].sum())
            for c, key in enumerate(class_keys(values.shape[1], labels))}


