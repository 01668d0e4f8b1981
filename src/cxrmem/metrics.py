"""ROC-AUC per finding and its bootstrap intervals: mathematics only (arrays in, numbers out).

Conventions
-----------
* ``probs`` and ``targets`` are [N, C] (numpy arrays or torch tensors, fastai
  subclasses included); a target > 0.5 is a positive.
* A class with no positive or no negative example has AUC ``None`` -- never
  0.0, never NaN -- and is left out of the mean.
* Results are plain Python (float, None, lists, dicts) or numpy arrays; nothing
  here reads or writes a file or prints.

The bootstrap
-------------
A resample is a vector of non-negative integer weights w over the N images: a
percentile bootstrap over images draws N images with replacement and w_i is how
often image i is drawn; a bootstrap over patients gives every image its
patient's draw count. The AUC of a weighted sample is the weighted
Mann-Whitney statistic

    AUC(w) = sum_{i pos} sum_{j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j])
             / (W_pos * W_neg),          W_pos = sum_{i pos} w_i, W_neg likewise.

With the negatives sorted by score once per class and K(t) the cumulative
weight of the first t of them (K(0) = 0), the inner sum for positive i is
``K(lo_i) + 0.5 (K(hi_i) - K(lo_i))`` where lo_i / hi_i count the negatives
scoring below / not above s_i (``searchsorted``, computed once). So a block of
resamples costs a gather, a cumulative sum and a dot product per class, in
exact integer arithmetic; with all weights 1 it is the ordinary ROC-AUC, ties
included. A resample with no positive or no negative weight for a class is
skipped for that class; a resample's mean AUC averages the classes it defines
among those scored on the full split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "to_numpy",
    "check_inputs",
    "per_class_auc",
    "mean_auc",
    "build_rank_index",
    "weighted_auc",
    "ImageResampler",
    "weight_blocks",
    "bootstrap_auc_samples",
    "mean_auc_samples",
    "percentile_interval",
    "bootstrap_ci",
]

Interval = Optional[List[float]]
# (rng, n_resamples) -> int [n_resamples, N]: row r holds the weight of every image in resample r.
Resampler = Callable[[np.random.Generator, int], np.ndarray]

# Weights (resamples x images) drawn in one bootstrap block; bounds memory at
# a few tens of MB per intermediate array.
_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------

def to_numpy(x) -> np.ndarray:
    """Any array-like or (fastai) tensor, on any device, as a float64 ndarray."""
    if isinstance(x, torch.Tensor):
        x = x.detach().as_subclass(torch.Tensor).cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def check_inputs(probs, targets, labels: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Validate shapes and values; return (scores float64 [N,C], positives bool [N,C], labels)."""
    scores, target_values = to_numpy(probs), to_numpy(targets)
    labels = [str(label) for label in labels]
    if scores.ndim != 2 or scores.shape != target_values.shape:
        raise ValueError(
            f"probs {scores.shape} and targets {target_values.shape} must both be [N, C]"
        )
    if scores.shape[1] != len(labels):
        raise ValueError(f"{scores.shape[1]} columns but {len(labels)} labels")
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"probs contain {n_bad} NaN/inf values; the model output diverged")
    return scores, target_values > 0.5, labels


def has_both_classes(positive: np.ndarray) -> bool:
    """True when a 0/1 column has at least one positive and one negative."""
    n_pos = int(positive.sum())
    return 0 < n_pos < positive.size


# --------------------------------------------------------------------------
# Point estimates
# --------------------------------------------------------------------------

def per_class_auc(probs, targets, labels: Sequence[str]) -> Dict[str, Optional[float]]:
    """ROC-AUC of each column: {label: auc}, None where a class lacks positives or negatives."""
    from sklearn.metrics import roc_auc_score  # here, not at the top: sklearn takes seconds to import

    scores, positive, labels = check_inputs(probs, targets, labels)
    result: Dict[str, Optional[float]] = {}
    for c, label in enumerate(labels):
        if has_both_classes(positive[:, c]):
            result[label] = float(roc_auc_score(positive[:, c], scores[:, c]))
        else:
            result[label] = None
    return result


def mean_auc(per_class: Dict[str, Optional[float]]) -> Optional[float]:
    """Mean over the classes whose AUC is defined (not None); None if there are none."""
    defined = [value for value in per_class.values() if value is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------
# Weighted AUC
# --------------------------------------------------------------------------

class RankIndex(NamedTuple):
    """Per-class precomputation for the weighted AUC (see module docstring)."""

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
    """AUC(w) of every row of ``weights`` (integer [R resamples, N images]).

    Returns [R] floats, NaN for a resample without positive or without negative
    weight. Twice the numerator is accumulated in int64, so the result is exact
    up to the final division.
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
# Bootstrap
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageResampler:
    """The bootstrap over images: a resample draws ``n_images`` images with replacement,
    and an image's weight is how often it is drawn (each row sums to ``n_images``)."""

    n_images: int

    def __call__(self, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
        """int64 [n_resamples, n_images]; draws row after row, so blocking never changes them."""
        n = self.n_images
        draws = rng.integers(0, n, size=(n_resamples, n), dtype=np.int32)
        flat = draws.astype(np.int64) + (np.arange(n_resamples, dtype=np.int64) * n)[:, None]
        return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def weight_blocks(resampler: Resampler, n_images: int, n_resamples: int,
                  seed: int) -> Iterator[Tuple[slice, np.ndarray]]:
    """The ``n_resamples`` weight rows of a seeded bootstrap, in blocks: (rows, weights [len(rows), N]).

    One generator, seeded once, feeds every block; a block holds about
    ``_BLOCK_ELEMENTS`` weights.
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


def bootstrap_auc_samples(scores: np.ndarray, positive: np.ndarray, n_resamples: int = 1000,
                          seed: int = 0, resampler: Optional[Resampler] = None) -> np.ndarray:
    """AUC of every class in every resample: float [R, C], NaN where undefined.

    ``scores`` float [N, C] and ``positive`` bool [N, C] as from ``check_inputs``;
    ``resampler`` draws the weights (default: :class:`ImageResampler`). Classes
    undefined on the full split are NaN throughout.
    """
    n_images, n_classes = scores.shape
    samples = np.full((n_resamples, n_classes), np.nan)
    defined = [c for c in range(n_classes) if has_both_classes(positive[:, c])]
    if not defined or n_resamples == 0:
        return samples
    indexes = {c: build_rank_index(scores[:, c], positive[:, c]) for c in defined}
    resampler = resampler or ImageResampler(n_images)
    for rows, weights in weight_blocks(resampler, n_images, n_resamples, seed):
        for c in defined:
            samples[rows, c] = weighted_auc(indexes[c], weights)
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
    """Mean AUC per resample over the ``scored`` classes (bool [C]: defined on the full split).

    A class a resample leaves undefined (its few positives all left out) is left out of
    that resample's mean, as the point estimate leaves out undefined classes; a resample
    defining none of them is NaN (skipped). Requiring every class in every resample
    would keep almost no resample when a rare class has one or two positives.
    """
    chosen = samples[:, scored]
    defined = np.isfinite(chosen)
    counts = defined.sum(axis=1)
    totals = np.where(defined, chosen, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def bootstrap_ci(probs, targets, labels: Sequence[str], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, resampler: Optional[Resampler] = None
                 ) -> Tuple[Dict[str, Interval], Interval]:
    """Seeded percentile-bootstrap intervals (over images unless ``resampler`` says otherwise).

    Returns ``(per_class, mean)``: ``per_class`` maps each label to [lo, hi]
    (None where the class AUC is undefined or no resample defines it), and
    ``mean`` is the interval of the mean AUC (None likewise).
    """
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    scores, positive, labels = check_inputs(probs, targets, labels)
    samples = bootstrap_auc_samples(scores, positive, n_resamples, seed, resampler)
    scored = np.array([has_both_classes(positive[:, c]) for c in range(len(labels))], dtype=bool)
    per_class = {label: percentile_interval(samples[:, c], level) for c, label in enumerate(labels)}
    return per_class, percentile_interval(mean_auc_samples(samples, scored), level)
