"""ROC-AUC per finding, bootstrap confidence intervals, reports, prediction files.

Conventions
-----------
* ``probs`` and ``targets`` are [N, C] (numpy arrays or torch tensors, fastai
  subclasses included); a target > 0.5 is a positive.
* A class with no positive or no negative example has AUC ``None`` -- never
  0.0, never NaN -- and is left out of the mean.
* Everything returned by ``evaluate_split`` is plain Python (float, int, None,
  lists, dicts) and therefore JSON-serialisable.

The bootstrap
-------------
A percentile bootstrap over images. One resample draws N images with
replacement, i.e. a vector of counts w over the original images. The AUC of a
weighted sample is the weighted Mann-Whitney statistic

    AUC(w) = sum_{i pos} sum_{j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j])
             / (W_pos * W_neg),          W_pos = sum_{i pos} w_i, W_neg likewise.

With the negatives sorted by score once per class and K(t) the cumulative
weight of the negatives, the inner sum for positive i is
``K(lo_i) + 0.5 (K(hi_i) - K(lo_i))`` where lo_i / hi_i count the negatives
scoring below / not above s_i (``searchsorted``, computed once). So a block of
resamples costs a gather, a cumulative sum and a dot product per class, in
exact integer arithmetic; with all weights 1 it is the ordinary ROC-AUC, ties
included. A resample with no positive or no negative for a class is skipped
for that class; the mean-AUC interval uses the resamples in which every class
scored on the full split is defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cxrmem import io
from cxrmem.errors import UserError

__all__ = [
    "per_class_auc",
    "mean_auc",
    "bootstrap_ci",
    "evaluate_split",
    "format_report",
    "write_json_atomic",
    "save_predictions",
    "load_predictions",
    "PREDICTION_KEYS",
]

Interval = Optional[List[float]]
PREDICTION_KEYS = ("probs", "targets", "labels", "image_index", "split")

# Elements (images x resamples) held in one bootstrap block; bounds memory at
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
# Bootstrap
# --------------------------------------------------------------------------

class RankIndex(NamedTuple):
    """Per-class precomputation for the weighted AUC (see module docstring)."""

    positives: np.ndarray   # image indices of the positives
    negatives: np.ndarray   # the padding column, then the negatives by ascending score
    below: np.ndarray       # per positive: number of negatives with a lower score
    not_above: np.ndarray   # per positive: number of negatives with a score <= its own
    tied: np.ndarray        # positions (into positives) where below < not_above


def build_rank_index(scores: np.ndarray, positive: np.ndarray) -> RankIndex:
    """Sort the negatives once and locate every positive among them.

    ``negatives`` starts with index N, the always-zero padding column of the
    count matrix, so that the cumulative sum of the gathered weights starts at
    0: column t of it is the weight of the first t negatives.
    """
    positives = np.flatnonzero(positive)
    negatives = np.flatnonzero(~positive)
    negatives_sorted = negatives[np.argsort(scores[negatives], kind="stable")]
    negative_scores = scores[negatives_sorted]
    positive_scores = scores[positives]
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    not_above = np.searchsorted(negative_scores, positive_scores, side="right")
    tied = np.flatnonzero(not_above > below)
    padded_negatives = np.concatenate([[scores.shape[0]], negatives_sorted])
    return RankIndex(positives, padded_negatives, below, not_above, tied)


def weighted_auc(index: RankIndex, counts: np.ndarray) -> np.ndarray:
    """AUC in each row of ``counts`` (int64 [R resamples, N images + 1 zero column]).

    Returns [R] floats, NaN for a resample without positive or without negative
    weight. Twice the numerator is accumulated in int64, so the result is exact
    up to the final division.
    """
    cumulative = np.cumsum(np.take(counts, index.negatives, axis=1), axis=1)
    positive_weights = np.take(counts, index.positives, axis=1)

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


def unit_counts(n_images: int) -> np.ndarray:
    """The count matrix of the original sample itself: one row of ones (+ zero pad)."""
    counts = np.ones((1, n_images + 1), dtype=np.int64)
    counts[:, -1] = 0
    return counts


def resample_counts(rng: np.random.Generator, n_images: int, n_resamples: int) -> np.ndarray:
    """How often each image is drawn in each of ``n_resamples`` draws of N with
    replacement: int64 [R, N + 1], the last column (padding) always 0."""
    width = n_images + 1
    draws = rng.integers(0, n_images, size=(n_resamples, n_images), dtype=np.int32)
    flat = draws.astype(np.int64) + (np.arange(n_resamples, dtype=np.int64) * width)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_resamples * width)
    return counts.reshape(n_resamples, width)


def bootstrap_auc_samples(scores: np.ndarray, positive: np.ndarray,
                          n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """AUC of every class in every resample: float [R, C], NaN where undefined.

    ``scores`` float [N, C] and ``positive`` bool [N, C] as from ``check_inputs``.
    Classes undefined on the full split are NaN throughout.
    """
    n_images, n_classes = scores.shape
    samples = np.full((n_resamples, n_classes), np.nan)
    defined = [c for c in range(n_classes) if has_both_classes(positive[:, c])]
    if not defined or n_resamples == 0:
        return samples
    indexes = {c: build_rank_index(scores[:, c], positive[:, c]) for c in defined}
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // (n_images + 1)))
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        counts = resample_counts(rng, n_images, stop - start)
        for c in defined:
            samples[start:stop, c] = weighted_auc(indexes[c], counts)
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


def bootstrap_ci(probs, targets, labels: Sequence[str], n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> Tuple[Dict[str, Interval], Interval]:
    """Percentile-bootstrap intervals over images, seeded.

    Returns ``(per_class, mean)``: ``per_class`` maps each label to [lo, hi]
    (None where the class AUC is undefined or no resample defines it), and
    ``mean`` is the interval of the mean AUC (None likewise).
    """
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    scores, positive, labels = check_inputs(probs, targets, labels)
    samples = bootstrap_auc_samples(scores, positive, n_resamples, seed)
    scored = np.array([has_both_classes(positive[:, c]) for c in range(len(labels))], dtype=bool)
    per_class = {label: percentile_interval(samples[:, c], level) for c, label in enumerate(labels)}
    return per_class, percentile_interval(mean_auc_samples(samples, scored), level)


# --------------------------------------------------------------------------
# Split summary and report
# --------------------------------------------------------------------------

def evaluate_split(probs, targets, labels: Sequence[str], n_resamples: int = 1000,
                   seed: int = 0) -> dict:
    """Everything metrics.json records for one split (plain, JSON-serialisable values).

    Keys: mean_auc, mean_auc_ci95, per_class, ci95, n_images, n_positive.
    """
    scores, positive, labels = check_inputs(probs, targets, labels)
    per_class = per_class_auc(scores, positive, labels)
    ci95, mean_ci95 = bootstrap_ci(scores, positive, labels, n_resamples, seed, level=0.95)
    return {
        "mean_auc": mean_auc(per_class),
        "mean_auc_ci95": mean_ci95,
        "per_class": per_class,
        "ci95": ci95,
        "n_images": int(scores.shape[0]),
        "n_positive": {label: int(positive[:, c].sum()) for c, label in enumerate(labels)},
    }


def format_auc(value: Optional[float]) -> str:
    """4 decimals, or 'n/a' for an undefined AUC."""
    return "n/a" if value is None else f"{value:.4f}"


def format_report(split_name: str, result: dict) -> str:
    """The terminal report of one split::

        == test (25596 images) ==
        ROC AUC Labels:
          Atelectasis        : 0.8234
          ...

        Mean AUC Score: 0.8345  (95% CI 0.8301-0.8390)

    Labels are padded to one column (longest label + 1); the CI part is left
    out when there is no interval.
    """
    per_class = result["per_class"]
    width = max((len(label) for label in per_class), default=0) + 1
    lines = [f"== {split_name} ({result['n_images']} images) ==", "ROC AUC Labels:"]
    lines += [f"  {label:<{width}}: {format_auc(auc)}" for label, auc in per_class.items()]
    mean_line = f"Mean AUC Score: {format_auc(result['mean_auc'])}"
    interval = result.get("mean_auc_ci95")
    if result["mean_auc"] is not None and interval is not None:
        mean_line += f"  (95% CI {interval[0]:.4f}-{interval[1]:.4f})"
    lines += ["", mean_line]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def write_json_atomic(path: Union[str, Path], obj) -> Path:
    """Write ``obj`` as indented, strict JSON (NaN is an error), atomically."""
    io.write_json(path, obj)
    return Path(path)


def as_float_tensor(x) -> torch.Tensor:
    """A plain, contiguous float32 CPU tensor (its own storage, for a small file)."""
    if isinstance(x, torch.Tensor):
        tensor = x.detach().as_subclass(torch.Tensor).cpu()
    else:
        tensor = torch.as_tensor(np.asarray(x))
    return tensor.to(torch.float32).contiguous().clone()


def save_predictions(path: Union[str, Path], probs, targets, labels: Sequence[str],
                     image_index: Sequence[str], split: Union[str, Sequence[str]]) -> Path:
    """Save {probs, targets, labels, image_index, split} with torch.save, atomically.

    ``probs``/``targets`` become float32 [N, C] tensors; ``image_index`` and
    ``split`` become lists of N strings (a single ``split`` name applies to all).
    """
    probs_t, targets_t = as_float_tensor(probs), as_float_tensor(targets)
    labels = [str(label) for label in labels]
    image_index = [str(name) for name in image_index]
    n_images = probs_t.shape[0]
    splits = [split] * n_images if isinstance(split, str) else [str(s) for s in split]
    if probs_t.ndim != 2 or probs_t.shape != targets_t.shape or probs_t.shape[1] != len(labels):
        raise ValueError(
            f"probs {tuple(probs_t.shape)}, targets {tuple(targets_t.shape)} and "
            f"{len(labels)} labels do not agree"
        )
    if len(image_index) != n_images or len(splits) != n_images:
        raise ValueError(
            f"{n_images} rows but {len(image_index)} image names and {len(splits)} split names"
        )
    payload = {"probs": probs_t, "targets": targets_t, "labels": labels,
               "image_index": image_index, "split": splits}
    io.torch_save(payload, path)
    return Path(path)


def load_predictions(path: Union[str, Path]) -> dict:
    """Load a file written by ``save_predictions`` (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"predictions file not found: {path}; check the path or run the evaluation first"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in PREDICTION_KEYS
               if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise UserError(f"{path} is not a predictions file (missing {', '.join(missing)}); "
                        "pass the <experiment>_predictions.pt of a run")
    return payload
