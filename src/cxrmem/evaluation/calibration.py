"""Calibration: equal-width bins of predicted probability, expected calibration error, reliability diagram."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from .auc import check_inputs, none_for_nan

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

    Returns {"pooled": ece, "per_class": {class: ece}}. "pooled" bins all labelled (probability,
    target) pairs together, every class's every labelled image counting once; "per_class" bins
    each column's labelled images alone. Calibration needs no positive or negative example, so a
    class is None only when no image is labelled for it.
    """
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    labelled = positive | negative
    return {
        "pooled": calibration_bins(scores[labelled], positive[labelled], n_bins).ece,
        "per_class": {key: calibration_bins(scores[labelled[:, c], c], positive[labelled[:, c], c], n_bins).ece
                      for c, key in enumerate(keys)},
    }


def reliability_diagram(probs, targets, n_bins: int = 10,
                        labels: Optional[Sequence[str]] = None) -> dict:
    """Data for a reliability diagram, pooled and per class (bins as in
    :func:`expected_calibration_error`): {"pooled": bins, "per_class": {class: bins}},
    bins = {bin_centres, mean_predicted, observed_frequency, counts}, the middle two None in
    empty bins. Plot observed against mean predicted; the diagonal is perfect calibration.
    """
    scores, positive, negative, keys = check_inputs(probs, targets, labels)
    labelled = positive | negative
    return {
        "pooled": calibration_bins(scores[labelled], positive[labelled], n_bins).as_dict(),
        "per_class": {key: calibration_bins(scores[labelled[:, c], c], positive[labelled[:, c], c], n_bins).as_dict()
                      for c, key in enumerate(keys)},
    }


