"""Clinical figures of a trained classifier: operating points, sensitivity and
friends with patient-level bootstrap intervals, AUPRC, calibration, AUC by
subgroup and the pointing game. Mathematics only: arrays in, plain Python out.

Conventions
-----------
* ``probs`` and ``targets`` are [N, C] array-likes; a target > 0.5 is a
  positive. A call is ``prob >= threshold``.
* Results are keyed by class: by ``labels[c]`` when labels are given, else by
  the column index ``c``.
* A figure that is undefined (a class without positive or without negative
  example for a ranking figure, a zero denominator for a ratio) is ``None``,
  never NaN. Everything returned is plain Python and JSON-serialisable.

Counts
------
For a class with calls k_i = [p_i >= t], positives y_i and image weights w_i
(1 for the sample itself, draw counts in a bootstrap resample)

    TP = sum w k y,   FP = sum w k (1 - y),   FN = sum w (1 - k) y,   TN = sum w (1 - k)(1 - y)
    sensitivity = TP / (TP + FN)       specificity = TN / (TN + FP)
    PPV = TP / (TP + FP)               NPV = TN / (TN + FN)
    F1 = 2 TP / (2 TP + FP + FN)

so R resamples of all classes are the matrix products W [R, N] @ A [N, C].
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "OPERATING_POINT_RULES",
    "parse_operating_point",
    "operating_points",
    "at_threshold",
    "patient_weights",
    "bootstrap_at_threshold",
    "auprc",
    "prevalence",
    "expected_calibration_error",
    "reliability_diagram",
    "age_in_years",
    "SUBGROUPS",
    "subgroup_auc",
    "pointing_game",
]

Key = Union[int, str]
FIGURES = ("sensitivity", "specificity", "ppv", "npv", "f1")

# Images x resamples held in one bootstrap block: bounds memory at a few tens of MB.
_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def as_scores_and_positives(probs, targets):
    """(scores float64 [N, C], positives bool [N, C]); ValueError on bad shapes or non-finite scores."""
    scores = np.asarray(probs, dtype=np.float64)
    target_values = np.asarray(targets, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != target_values.shape:
        raise ValueError(f"probs {scores.shape} and targets {target_values.shape} must both be [N, C]")
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"probs contain {n_bad} NaN/inf values")
    return scores, target_values > 0.5


def class_keys(n_classes: int, labels: Optional[Sequence[str]]) -> List[Key]:
    """``labels`` as strings, or the column indices when no labels are given."""
    if labels is None:
        return list(range(n_classes))
    if len(labels) != n_classes:
        raise ValueError(f"{n_classes} columns but {len(labels)} labels")
    return [str(label) for label in labels]


def has_both_classes(positive: np.ndarray) -> bool:
    """True when a boolean column holds at least one positive and one negative."""
    return 0 < int(positive.sum()) < positive.size


def ratio(numerator: float, denominator: float) -> Optional[float]:
    """numerator / denominator as a float, None when the denominator is 0."""
    return float(numerator / denominator) if denominator > 0 else None


# --------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------

class RocTable(NamedTuple):
    """Every distinct operating point of one class, from the highest threshold down.

    ``thresholds[0]`` is the next float above the highest score (nothing is
    called); ``thresholds[1:]`` are the distinct scores, descending. ``tp`` and
    ``fp`` count the positives / negatives with score >= the threshold.
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
    pos_at = np.bincount(inverse, weights=positive.astype(np.float64), minlength=distinct.size)[::-1]
    all_at = np.bincount(inverse, minlength=distinct.size)[::-1]
    tp = np.concatenate([[0], np.cumsum(pos_at)]).astype(np.int64)
    fp = np.concatenate([[0], np.cumsum(all_at)]).astype(np.int64) - tp
    thresholds = np.concatenate([[np.nextafter(distinct[-1], np.inf)], distinct[::-1]])
    n_pos = int(positive.sum())
    return RocTable(thresholds, tp, fp, n_pos, positive.size - n_pos)


def youden(table: RocTable) -> int:
    """argmax_t sensitivity(t) + specificity(t) - 1; ties go to the highest threshold.

    Compared exactly as the integer TP * n_neg - FP * n_pos (J times n_pos * n_neg).
    Taking the highest of the tied thresholds calls the fewest images; where
    no threshold beats chance (max J = 0) nothing is called.
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
    accepted = f"expected one of {forms} with 0 < X <= 1"
    name, colon, argument = str(text).strip().partition(":")
    rule = OPERATING_POINT_RULES.get(name.strip().lower())
    if rule is None or bool(colon) != rule.takes_level:
        raise ValueError(f"operating point {text!r}: {accepted}")
    if not rule.takes_level:
        return rule.choose
    try:
        level = float(argument)
    except ValueError:
        level = float("nan")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"operating point {text!r}: {accepted}")
    return functools.partial(rule.choose, level=level)


def operating_points(probs, targets, rule: str) -> List[Optional[float]]:
    """One threshold per class chosen by ``rule`` (see ``parse_operating_point``).

    The candidates are the distinct scores of the class (a call is score >=
    threshold, so each candidate is the lowest score called) plus the next
    float above the highest score (call nothing). None for a class without
    positive or without negative example.
    """
    choose = parse_operating_point(rule)
    scores, positive = as_scores_and_positives(probs, targets)
    thresholds: List[Optional[float]] = []
    for c in range(scores.shape[1]):
        if not has_both_classes(positive[:, c]):
            thresholds.append(None)
            continue
        table = roc_table(scores[:, c], positive[:, c])
        thresholds.append(float(table.thresholds[choose(table)]))
    return thresholds


# --------------------------------------------------------------------------
# Figures at a threshold, and their patient bootstrap
# --------------------------------------------------------------------------

def call_matrices(scores: np.ndarray, positive: np.ndarray, thresholds: Sequence[Optional[float]]):
    """Indicator matrices [N, C] (float64) of TP, FP, FN, TN; all zero in a class without threshold."""
    if len(thresholds) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} columns but {len(thresholds)} thresholds")
    defined = np.array([t is not None for t in thresholds])
    cut = np.array([np.inf if t is None else float(t) for t in thresholds])
    called = (scores >= cut) & defined
    negative = ~positive & defined
    return tuple(m.astype(np.float64) for m in (
        called & positive, called & negative, ~called & positive & defined, ~called & negative))


def figures_from_counts(tp, fp, fn, tn) -> Dict[str, np.ndarray]:
    """The five figures from (weighted) counts of equal shape; NaN where a denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        quotients = {
            "sensitivity": (tp, tp + fn),
            "specificity": (tn, tn + fp),
            "ppv": (tp, tp + fp),
            "npv": (tn, tn + fn),
            "f1": (2 * tp, 2 * tp + fp + fn),
        }
        return {name: np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
                for name, (num, den) in quotients.items()}


def none_for_nan(value) -> Optional[float]:
    return None if np.isnan(value) else float(value)


def at_threshold(probs, targets, thresholds: Sequence[Optional[float]],
                 labels: Optional[Sequence[str]] = None) -> Dict[Key, Dict[str, Optional[float]]]:
    """{class: {sensitivity, specificity, ppv, npv, f1}} with calls prob >= threshold.

    Equations in the module docstring; a figure is None where its denominator
    is 0, and all five are None for a class whose threshold is None.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    keys = class_keys(scores.shape[1], labels)
    counts = [m.sum(axis=0) for m in call_matrices(scores, positive, thresholds)]
    figures = figures_from_counts(*counts)
    return {key: {name: none_for_nan(figures[name][c]) for name in FIGURES}
            for c, key in enumerate(keys)}


def patient_weights(patient_ids: Optional[Sequence[Hashable]], n_images: int,
                    n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Image weights of ``n_resamples`` patient-level resamples: int64 [R, N].

    Each resample draws the P patients with replacement, P times; an image's
    weight is the number of times its patient was drawn. ``patient_ids`` None
    makes every image its own patient (the ordinary image bootstrap).
    """
    if patient_ids is None:
        patient_of_image = np.arange(n_images)
    else:
        if len(patient_ids) != n_images:
            raise ValueError(f"{len(patient_ids)} patient ids for {n_images} images")
        patient_of_image = pd.factorize(pd.Series(list(patient_ids)))[0]
        if (patient_of_image < 0).any():
            raise ValueError("patient ids contain missing values")
    n_patients = int(patient_of_image.max()) + 1 if n_images else 0
    if n_patients == 0:
        return np.zeros((n_resamples, 0), dtype=np.int64)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    offsets = (np.arange(n_resamples) * n_patients)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_patients)
    return counts.reshape(n_resamples, n_patients)[:, patient_of_image]


def bootstrap_at_threshold(probs, targets, thresholds: Sequence[Optional[float]],
                           patient_ids: Optional[Sequence[Hashable]] = None,
                           n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                           labels: Optional[Sequence[str]] = None,
                           ) -> Dict[Key, Dict[str, Optional[List[float]]]]:
    """Percentile intervals of the five ``at_threshold`` figures over patient resamples.

    In resample r the counts are weighted by ``patient_weights`` (TP_r = sum_i
    w_ri k_i y_i, ...), all classes at once as W @ A. The interval of a figure
    is the ((1 - level) / 2, (1 + level) / 2) quantile pair over the resamples
    in which its denominator is positive; None if there are none.
    The thresholds stay fixed: only the test images are resampled.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    keys = class_keys(scores.shape[1], labels)
    n_images, n_classes = scores.shape
    indicators = np.concatenate(call_matrices(scores, positive, thresholds), axis=1)   # [N, 4C]
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(1, n_images))
    blocks = []
    for start in range(0, n_resamples, block):
        weights = patient_weights(patient_ids, n_images, min(block, n_resamples - start), rng)
        blocks.append(weights.astype(np.float64) @ indicators)
    counts = np.concatenate(blocks) if blocks else np.empty((0, 4 * n_classes))
    samples = figures_from_counts(*np.split(counts, 4, axis=1))   # each [R, C]

    quantiles = [(1 - level) / 2, (1 + level) / 2]
    result: Dict[Key, Dict[str, Optional[List[float]]]] = {}
    for c, key in enumerate(keys):
        result[key] = {}
        for name in FIGURES:
            values = samples[name][:, c]
            values = values[~np.isnan(values)]
            result[key][name] = [float(q) for q in np.quantile(values, quantiles)] if values.size else None
    return result


# --------------------------------------------------------------------------
# Precision-recall
# --------------------------------------------------------------------------

def auprc(probs, targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Area under the precision-recall curve per class (sklearn's average precision,
    AP = sum_k (R_k - R_{k-1}) P_k over the thresholds); None without positive or negative.

    A random ranking scores about the prevalence, so report the two side by side.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    return {key: float(average_precision_score(positive[:, c], scores[:, c]))
            if has_both_classes(positive[:, c]) else None
            for c, key in enumerate(class_keys(scores.shape[1], labels))}


def prevalence(targets, labels: Optional[Sequence[str]] = None) -> Dict[Key, Optional[float]]:
    """Fraction of positive images per class; None when there are no images."""
    positive = np.asarray(targets, dtype=np.float64) > 0.5
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

    Returns {"pooled": ece, "per_class": {class: ece}}. "pooled" bins all
    N x C (probability, target) pairs together, every class's every image
    counting once; "per_class" bins each column alone. Calibration needs no
    positive or negative example, so a class is None only when there are no
    images.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    keys = class_keys(scores.shape[1], labels)
    return {
        "pooled": calibration_bins(scores, positive, n_bins).ece,
        "per_class": {key: calibration_bins(scores[:, c], positive[:, c], n_bins).ece
                      for c, key in enumerate(keys)},
    }


def reliability_diagram(probs, targets, n_bins: int = 10,
                        labels: Optional[Sequence[str]] = None) -> dict:
    """Data for a reliability diagram, pooled and per class (bins as in ``expected_calibration_error``):
    {"pooled": bins, "per_class": {class: bins}}, bins = {bin_centres, mean_predicted,
    observed_frequency, counts}, the middle two None in empty bins. Plot observed
    against mean predicted; the diagonal is perfect calibration.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    keys = class_keys(scores.shape[1], labels)
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


def age_in_years(value) -> Optional[float]:
    """An age as written in ChestX-ray14's 'Patient Age': an int (58) or a DICOM age
    string ('058Y'; M, W, D are months, weeks, days). None when unreadable or outside
    0..120 years (the 2017 file holds a few impossible ages such as 412).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
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
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().upper()
    return text or None


class Subgroup(NamedTuple):
    """A way to group images: the metadata column, cell -> group (None leaves the image out),
    and the order of the known groups (others follow, sorted)."""

    column: str
    group_of: Callable[[object], Optional[str]]
    order: tuple = ()


SUBGROUPS: Dict[str, Subgroup] = {
    "sex": Subgroup("Patient Gender", category, ("F", "M")),
    "age": Subgroup("Patient Age", age_band, ("<40", "40-59", "60+")),
    "view": Subgroup("View Position", category, ("PA", "AP")),
}


def subgroup_auc(probs, targets, metadata: pd.DataFrame,
                 labels: Optional[Sequence[str]] = None) -> dict:
    """ROC-AUC per class within each subgroup of ``SUBGROUPS`` (sex, age band, view).

    ``metadata`` has one row per image, in the order of ``probs``, with
    ChestX-ray14's 'Patient Gender', 'Patient Age' and 'View Position' columns.
    Returns {"sex": {"M": {"n_images", "mean_auc", "per_class"}, ...}, "age": ..., "view": ...};
    per_class is None where the subgroup has no positive or no negative of the
    class, mean_auc the mean over the defined classes (None if none). Images
    whose cell is missing or unreadable are in no group of that grouping.
    """
    scores, positive = as_scores_and_positives(probs, targets)
    keys = class_keys(scores.shape[1], labels)
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
            per_class = {key: float(roc_auc_score(positive[rows, c], scores[rows, c]))
                         if has_both_classes(positive[rows, c]) else None
                         for c, key in enumerate(keys)}
            defined = [v for v in per_class.values() if v is not None]
            result[name][group] = {
                "n_images": int(rows.sum()),
                "mean_auc": float(np.mean(defined)) if defined else None,
                "per_class": per_class,
            }
    return result


# --------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------

def pointing_game(heatmaps, boxes, findings: Sequence[str], original_size=(1024, 1024)) -> dict:
    """Pointing-game hit rate per finding, with the rate of a uniformly random point.

    ``heatmaps`` [K, H, W]: for each of K (image, box) pairs, the heatmap of the
    box's image for the box's finding, computed on the whole image resized
    (not cropped) to H x W. ``boxes`` [K, 4]: x, y, w, h in the original image's
    pixels (ChestX-ray14's BBox_List_2017.csv: 1024 x 1024 images).
    ``original_size``: (width, height), one pair or [K, 2].

    Mapping: heatmap cell (row i, column j) covers the original pixels
    x in [j W0 / W, (j + 1) W0 / W), y in [i H0 / H, (i + 1) H0 / H), and points at
    its centre ((j + 1/2) W0 / W, (i + 1/2) H0 / H). The heatmap's maximum is its
    first maximal cell in row-major order; a hit is a centre inside the closed box
    x <= px <= x + w, y <= py <= y + h.

    Chance: a uniformly random point hits with probability
    area(box within the image) / (W0 H0); its mean over the pairs.
    Returns {finding: {"n_boxes", "hit_rate", "chance_rate"}}.
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
