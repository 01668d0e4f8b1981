"""cxrmem.metrics: per-class and mean AUC, the exact weighted AUC, bootstrap intervals."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cxrmem.metrics as metrics
from cxrmem.metrics import (
    ImageResampler,
    bootstrap_auc_samples,
    bootstrap_ci,
    build_rank_index,
    check_inputs,
    mean_auc,
    mean_auc_samples,
    per_class_auc,
    weighted_auc,
)

def synthetic_split(n_images, n_classes=4, prevalence=0.3, signal=1.0, seed=0, decimals=None):
    """Targets with the given prevalence and scores that are informative but noisy."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n_images, n_classes)) < prevalence).astype(np.float32)
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=targets.shape) + signal * targets)))
    if decimals is not None:
        scores = np.round(scores, decimals)   # many ties
    return scores, targets


def labels_for(n_classes):
    return [f"class_{c}" for c in range(n_classes)]


# ---------------------------------------------------------------- point AUC

def test_per_class_auc_equals_sklearn():
    probs, targets = synthetic_split(300, n_classes=5)
    result = per_class_auc(probs, targets, labels_for(5))
    assert list(result) == labels_for(5)
    for c, label in enumerate(labels_for(5)):
        assert result[label] == pytest.approx(roc_auc_score(targets[:, c], probs[:, c]), abs=1e-15)
        assert isinstance(result[label], float)


def test_accepts_torch_and_fastai_tensors():
    from fastai.torch_core import TensorBase, TensorMultiCategory

    probs, targets = synthetic_split(100, n_classes=3)
    from_numpy = per_class_auc(probs, targets, labels_for(3))
    from_torch = per_class_auc(TensorBase(torch.tensor(probs)),
                               TensorMultiCategory(torch.tensor(targets)), labels_for(3))
    assert from_torch == from_numpy


def test_class_without_positives_or_negatives_is_none_and_left_out_of_mean():
    # Classes 0 and 1 are perfectly ranked (AUC 1.0); class 2 has no positive,
    # class 3 no negative. Counting them as 0.0 would give a mean of 0.5,
    # counting them as NaN would give NaN; the right mean is 1.0.
    targets = np.array([[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=float)
    probs = np.array([[0.9, 0.2, 0.5, 0.5], [0.8, 0.9, 0.4, 0.6],
                      [0.1, 0.7, 0.3, 0.7], [0.2, 0.1, 0.2, 0.8]])
    labels = ["A", "B", "no_positive", "no_negative"]
    per_class = per_class_auc(probs, targets, labels)
    assert per_class == {"A": 1.0, "B": 1.0, "no_positive": None, "no_negative": None}
    assert mean_auc(per_class) == 1.0

    ci95, _ = bootstrap_ci(probs, targets, labels, n_resamples=50)
    assert ci95["no_positive"] is None
    assert ci95["no_negative"] is None


def test_mean_auc_of_nothing_is_none():
    assert mean_auc({"A": None, "B": None}) is None
    assert mean_auc({}) is None
    assert mean_auc({"A": 0.5, "B": None, "C": 1.0}) == 0.75


def test_invalid_inputs_are_reported():
    probs, targets = synthetic_split(10, n_classes=2)
    with pytest.raises(ValueError, match="labels"):
        per_class_auc(probs, targets, ["only_one"])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        per_class_auc(probs, targets[:5], labels_for(2))
    probs[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        per_class_auc(probs, targets, labels_for(2))


# ---------------------------------------------------------------- weighted AUC

def unit_weights(n_images):
    """The original sample itself: one resample in which every image has weight 1."""
    return np.ones((1, n_images), dtype=np.int64)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_unit_weights_equal_sklearn_including_ties(decimals):
    probs, targets = synthetic_split(500, n_classes=3, decimals=decimals, seed=3)
    scores, positive, _ = check_inputs(probs, targets, labels_for(3))
    for c in range(3):
        ours = weighted_auc(build_rank_index(scores[:, c], positive[:, c]), unit_weights(500))[0]
        ref = roc_auc_score(positive[:, c], scores[:, c])
        # Ours is the exactly rounded ratio; sklearn integrates the curve in
        # floating point, so the two may differ in the last bit only.
        assert ours == pytest.approx(ref, rel=0, abs=1e-12)


def test_unit_weights_with_all_scores_tied_give_one_half():
    positive = np.array([True, False, True, False, False])
    scores = np.full(5, 0.3)
    assert weighted_auc(build_rank_index(scores, positive), unit_weights(5))[0] == 0.5


def brute_force_weighted_auc(scores, positive, weights):
    """sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos W_neg)."""
    numerator = 0.0
    for i in np.flatnonzero(positive):
        for j in np.flatnonzero(~positive):
            pair = 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            numerator += weights[i] * weights[j] * pair
    return numerator / (weights[positive].sum() * weights[~positive].sum())


def test_resampled_weights_equal_brute_force_and_repeated_rows():
    rng = np.random.default_rng(7)
    n = 40
    scores = np.round(rng.random(n), 1)
    positive = rng.random(n) < 0.4
    index = build_rank_index(scores, positive)
    counts = ImageResampler(n)(np.random.default_rng(1), 5)
    assert counts.shape == (5, n) and np.issubdtype(counts.dtype, np.integer) and (counts >= 0).all()
    assert (counts.sum(axis=1) == n).all()
    aucs = weighted_auc(index, counts)
    for r in range(5):
        w = counts[r]
        assert aucs[r] == pytest.approx(brute_force_weighted_auc(scores, positive, w), abs=1e-12)
        # A resample is the data set with each image repeated w times.
        repeated = np.repeat(np.arange(n), w)
        assert aucs[r] == pytest.approx(
            roc_auc_score(positive[repeated], scores[repeated]), abs=1e-12)


def test_resample_without_positives_is_skipped():
    # One positive among 30 images: about e^-1 of the resamples miss it.
    probs, targets = synthetic_split(30, n_classes=1, prevalence=0.0, seed=2)
    targets[0, 0] = 1.0
    scores, positive, _ = check_inputs(probs, targets, ["rare"])
    samples = bootstrap_auc_samples(scores, positive, n_resamples=200, seed=0)
    missing = np.isnan(samples[:, 0])
    assert 0.2 < missing.mean() < 0.55
    finite = samples[~missing, 0]
    assert ((finite >= 0) & (finite <= 1)).all()
    per_class, mean_ci = bootstrap_ci(probs, targets, ["rare"], n_resamples=200)
    assert per_class["rare"] is not None and mean_ci is not None
    assert all(math.isfinite(v) for v in per_class["rare"] + mean_ci)


# ---------------------------------------------------------------- intervals

def test_interval_contains_point_estimate():
    probs, targets = synthetic_split(2000, n_classes=4, seed=11)
    labels = labels_for(4)
    point = per_class_auc(probs, targets, labels)
    per_class, mean_ci = bootstrap_ci(probs, targets, labels, n_resamples=300, seed=0)
    for label in labels:
        lo, hi = per_class[label]
        assert lo < point[label] < hi
        assert hi - lo < 0.1
    lo, hi = mean_ci
    assert lo < mean_auc(point) < hi


def test_interval_narrows_as_the_split_grows():
    def width(n_images):
        probs, targets = synthetic_split(n_images, n_classes=1, seed=5)
        per_class, _ = bootstrap_ci(probs, targets, ["A"], n_resamples=300, seed=0)
        lo, hi = per_class["A"]
        return hi - lo

    small, large = width(300), width(6000)
    assert large < small / 2.5      # width shrinks roughly like 1 / sqrt(N)


def test_bootstrap_is_deterministic_for_a_seed():
    probs, targets = synthetic_split(400, n_classes=3, seed=8)
    first = bootstrap_ci(probs, targets, labels_for(3), n_resamples=100, seed=123)
    again = bootstrap_ci(probs, targets, labels_for(3), n_resamples=100, seed=123)
    other = bootstrap_ci(probs, targets, labels_for(3), n_resamples=100, seed=124)
    assert first == again
    assert first != other


def test_block_size_does_not_change_the_resamples(monkeypatch):
    probs, targets = synthetic_split(200, n_classes=2, seed=4)
    scores, positive, _ = check_inputs(probs, targets, labels_for(2))
    whole = bootstrap_auc_samples(scores, positive, n_resamples=30, seed=1)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 200 * 7)   # blocks of 7 resamples
    blocked = bootstrap_auc_samples(scores, positive, n_resamples=30, seed=1)
    np.testing.assert_array_equal(whole, blocked)


@dataclass(frozen=True)
class PatientResampler:
    """Draw patients with replacement; an image's weight is its patient's draw count."""

    patient_of_image: np.ndarray   # int [N]: patient number 0..P-1 of each image

    def __call__(self, rng, n_resamples):
        n_patients = int(self.patient_of_image.max()) + 1
        return ImageResampler(n_patients)(rng, n_resamples)[:, self.patient_of_image]


def test_a_resampler_with_per_image_weights_drives_the_bootstrap():
    # Every image twice, both copies belonging to one patient: drawing patients of the doubled
    # set weighs each pair by its draw count, which scales numerator and denominator of AUC(w)
    # by 4 -- the image bootstrap of the original set with the same draws, resample by resample.
    probs, targets = synthetic_split(120, n_classes=3, prevalence=0.2, seed=6, decimals=2)
    doubled = np.repeat(np.arange(120), 2)
    scores, positive, _ = check_inputs(probs, targets, labels_for(3))
    scores2, positive2, _ = check_inputs(probs[doubled], targets[doubled], labels_for(3))
    by_image = bootstrap_auc_samples(scores, positive, n_resamples=40, seed=3)
    by_patient = bootstrap_auc_samples(scores2, positive2, n_resamples=40, seed=3,
                                       resampler=PatientResampler(doubled))
    np.testing.assert_array_equal(by_patient, by_image)
    # ... whereas drawing single images of the doubled set gives other resamples.
    assert not np.array_equal(bootstrap_auc_samples(scores2, positive2, n_resamples=40, seed=3), by_image)


def test_default_resampler_is_the_image_bootstrap():
    probs, targets = synthetic_split(150, n_classes=2, seed=12)
    explicit = bootstrap_ci(probs, targets, labels_for(2), n_resamples=60, seed=5, resampler=ImageResampler(150))
    assert explicit == bootstrap_ci(probs, targets, labels_for(2), n_resamples=60, seed=5)


def test_resampler_of_the_wrong_width_is_refused():
    probs, targets = synthetic_split(30, n_classes=1, seed=1)
    with pytest.raises(ValueError, match=r"expected \(10, 30\)"):
        bootstrap_ci(probs, targets, ["A"], n_resamples=10, resampler=ImageResampler(29))


def test_no_resamples_gives_no_intervals():
    probs, targets = synthetic_split(50, n_classes=2)
    per_class, mean_ci = bootstrap_ci(probs, targets, labels_for(2), n_resamples=0)
    assert per_class == {"class_0": None, "class_1": None} and mean_ci is None


def test_mean_interval_survives_a_class_with_a_single_positive():
    """A rare class with one positive is undefined in about a third of the resamples; the mean's
    interval must still come from (nearly) all resamples and bracket the point estimate."""
    rng = np.random.default_rng(5)
    n = 300
    targets = (rng.random((n, 3)) < 0.3).astype(float)
    targets[:, 2] = 0.0
    targets[7, 2] = 1.0
    probs = np.clip(targets * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    point = mean_auc(per_class_auc(probs, targets, ["a", "b", "rare"]))
    _, (lo, hi) = bootstrap_ci(probs, targets, ["a", "b", "rare"], n_resamples=400, seed=1)
    assert lo < point < hi
    assert hi - lo > 0.01


def test_mean_samples_leave_out_only_the_undefined_classes():
    samples = np.array([[0.8, 0.6, np.nan], [0.7, np.nan, np.nan], [np.nan, np.nan, np.nan], [0.9, 0.5, 0.4]])
    scored = np.array([True, True, True])
    means = mean_auc_samples(samples, scored)
    assert means[0] == pytest.approx(0.7) and means[1] == pytest.approx(0.7)
    assert np.isnan(means[2]) and means[3] == pytest.approx(0.6)
    assert np.isnan(mean_auc_samples(samples, np.array([False, False, False]))).all()
