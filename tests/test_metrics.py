"""cxrmem.evaluation: AUC and its bootstrap over images and patients, DeLong's test, Holm, the paired
bootstrap, mean +- SD; operating points, figures at a threshold with their bootstrap, AUPRC,
calibration, subgroup AUC and the pointing game. Each is checked against sklearn, brute force,
hand-worked examples or a simulation whose answer is known."""

import math
import statistics
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cxrmem.evaluation.auc
from cxrmem.data.chestxray14 import SUBGROUPS, age_in_years
from cxrmem.evaluation.auc import auprc
from cxrmem.evaluation.auc import prevalence as class_prevalence
from cxrmem.evaluation.calibration import expected_calibration_error, reliability_diagram
from cxrmem.evaluation.localisation import pointing_game
from cxrmem.evaluation.subgroups import subgroup_auc
from cxrmem.evaluation.thresholds import (FIGURES, at_threshold, bootstrap_at_threshold, operating_points,
                                          parse_operating_point)
from cxrmem.evaluation.auc import ImageResampler, PatientResampler, bootstrap_auc_samples, bootstrap_ci, build_rank_index, check_inputs, make_resampler, mean_auc, mean_auc_samples, per_class_auc, weighted_auc
from cxrmem.evaluation.paired import delong_components, delong_per_class, delong_test, holm, mean_sd, paired_bootstrap

from helpers import direct_components, direct_delong, synthetic_split




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
    scores, positive, negative, _ = check_inputs(probs, targets, labels_for(3))
    for c in range(3):
        ours = weighted_auc(build_rank_index(scores[:, c], positive[:, c], ~positive[:, c]), unit_weights(500))[0]
        ref = roc_auc_score(positive[:, c], scores[:, c])
        # Ours is the exactly rounded ratio; sklearn integrates the curve in
        # floating point, so the two may differ in the last bit only.
        assert ours == pytest.approx(ref, rel=0, abs=1e-12)


def test_unit_weights_with_all_scores_tied_give_one_half():
    positive = np.array([True, False, True, False, False])
    scores = np.full(5, 0.3)
    assert weighted_auc(build_rank_index(scores, positive, ~positive), unit_weights(5))[0] == 0.5


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
    index = build_rank_index(scores, positive, ~positive)
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
    scores, positive, negative, _ = check_inputs(probs, targets, ["rare"])
    samples = bootstrap_auc_samples(scores, positive, ~positive, n_resamples=200, seed=0)
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
    scores, positive, negative, _ = check_inputs(probs, targets, labels_for(2))
    whole = bootstrap_auc_samples(scores, positive, ~positive, n_resamples=30, seed=1)
    monkeypatch.setattr(cxrmem.evaluation.auc, "_BLOCK_ELEMENTS", 200 * 7)   # blocks of 7 resamples
    blocked = bootstrap_auc_samples(scores, positive, ~positive, n_resamples=30, seed=1)
    np.testing.assert_array_equal(whole, blocked)


def test_a_resampler_with_per_image_weights_drives_the_bootstrap():
    # Every image twice, both copies belonging to one patient: drawing patients of the doubled
    # set weighs each pair by its draw count, which scales numerator and denominator of AUC(w)
    # by 4 -- the image bootstrap of the original set with the same draws, resample by resample.
    probs, targets = synthetic_split(120, n_classes=3, prevalence=0.2, seed=6, decimals=2)
    doubled = np.repeat(np.arange(120), 2)
    scores, positive, negative, _ = check_inputs(probs, targets, labels_for(3))
    scores2, positive2, negative2, _ = check_inputs(probs[doubled], targets[doubled], labels_for(3))
    by_image = bootstrap_auc_samples(scores, positive, ~positive, n_resamples=40, seed=3)
    by_patient = bootstrap_auc_samples(scores2, positive2, ~positive2, n_resamples=40, seed=3,
                                       resampler=PatientResampler.from_ids(doubled))
    np.testing.assert_array_equal(by_patient, by_image)
    # ... whereas drawing single images of the doubled set gives other resamples.
    assert not np.array_equal(bootstrap_auc_samples(scores2, positive2, ~positive2, n_resamples=40, seed=3), by_image)


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


# ================================================================ comparing runs

# ---------------------------------------------------------------- helpers





def paired_scores(rng, n, prevalence=0.4, signal=1.0, noise=1.0, decimals=None):
    """Targets and two score sets sharing a latent: same distribution, correlated."""
    y = (rng.random(n) < prevalence).astype(float)
    latent = signal * y + rng.normal(size=n)
    a = latent + noise * rng.normal(size=n)
    b = latent + noise * rng.normal(size=n)
    if decimals is not None:
        a, b = np.round(a, decimals), np.round(b, decimals)
    return y, a, b


def clustered(rng, n_patients, per_patient, n_classes=3, prevalence=0.3, signal=1.0):
    """Multi-label data with several images per patient: the label and most of the
    score are the patient's, so a patient's images are near-duplicates."""
    groups = np.repeat(np.arange(n_patients), per_patient)
    y_patient = (rng.random((n_patients, n_classes)) < prevalence).astype(float)
    effect = rng.normal(size=(n_patients, n_classes))
    y = y_patient[groups]
    scores = signal * y + effect[groups] + 0.2 * rng.normal(size=y.shape)
    return y, scores, groups


def width(interval):
    return interval[1] - interval[0]


# ---------------------------------------------------------------- DeLong

@pytest.mark.parametrize("seed", range(5))
def test_fast_delong_equals_direct_components_with_ties(seed):
    rng = np.random.default_rng(seed)
    y, a, b = paired_scores(rng, 150 + 20 * seed, prevalence=0.3, decimals=1)  # many ties
    assert len(np.unique(a)) < a.size / 2

    auc, v10, v01 = delong_components(y, np.stack([a, b], axis=1))
    for k, s in enumerate((a, b)):
        d_auc, d_v10, d_v01 = direct_components(y, s)
        assert auc[k] == pytest.approx(d_auc, abs=1e-10)
        np.testing.assert_allclose(v10[:, k], d_v10, rtol=0, atol=1e-10)
        np.testing.assert_allclose(v01[:, k], d_v01, rtol=0, atol=1e-10)
        assert auc[k] == pytest.approx(roc_auc_score(y, s), abs=1e-10)

    result = delong_test(y, a, b)
    delta, var, p = direct_delong(y, a, b)
    assert result.delta == pytest.approx(delta, abs=1e-10)
    assert result.var == pytest.approx(var, abs=1e-10)
    assert result.se == pytest.approx(math.sqrt(var), abs=1e-10)
    assert result.p == pytest.approx(p, abs=1e-10)
    assert (result.n_pos, result.n_neg) == (int(y.sum()), int((1 - y).sum()))


def test_delong_null_rejects_at_nominal_rate():
    rng = np.random.default_rng(2024)
    pvalues = [delong_test(*paired_scores(rng, 200)).p for _ in range(2000)]
    rate = np.mean(np.array(pvalues) < 0.05)
    assert 0.03 <= rate <= 0.07, rate


def test_delong_detects_a_better_model_and_is_antisymmetric():
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.4).astype(float)
    a = y + rng.normal(size=300)
    b = 2.0 * y + rng.normal(size=300)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ab.delta > 0.05 and ab.p < 0.001
    assert ba.delta == pytest.approx(-ab.delta, abs=1e-15)
    assert ba.z == pytest.approx(-ab.z, abs=1e-12)
    assert ba.p == pytest.approx(ab.p, abs=1e-15)
    assert (ab.auc_a, ab.auc_b) == (ba.auc_b, ba.auc_a)


def test_delong_degenerate_cases_never_nan():
    rng = np.random.default_rng(0)
    y, a, _ = paired_scores(rng, 100)

    same = delong_test(y, a, a)
    assert (same.delta, same.z, same.p) == (0.0, 0.0, 1.0)
    ranked_alike = delong_test(y, a, np.exp(a))          # same ranking, other scale
    assert ranked_alike.p == 1.0

    no_positive = delong_test(np.zeros(10), a[:10], a[:10] + 1)
    assert no_positive.p is None and no_positive.auc_a is None and no_positive.n_neg == 10

    one_positive = delong_test([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.15, 0.1, 0.2, 0.3])
    assert one_positive.auc_a == 1.0 and one_positive.auc_b == pytest.approx(1 / 3)
    assert one_positive.se is None and one_positive.p is None

    # Both AUCs exact (perfect and perfectly reversed): no spread, a real difference.
    y4 = np.array([1, 1, 0, 0])
    flipped = delong_test(y4, [0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8])
    assert flipped.delta == -1.0 and flipped.se == 0.0 and flipped.p is None

    for r in (same, ranked_alike, no_positive, one_positive, flipped):
        assert not any(isinstance(v, float) and math.isnan(v) for v in r)


def test_delong_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        delong_test([1, 0, 1], [0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        delong_test([1, 0], [0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="delong_per_class"):
        delong_test(np.eye(3), np.eye(3), np.eye(3))


def test_delong_per_class_applies_holm_over_tested_classes():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    y[:, 2] = 0.0                                         # undefined class
    a = y + rng.normal(size=y.shape)
    b = 1.5 * y + rng.normal(size=y.shape)
    result = delong_per_class(y, a, b, ["x", "y", "z"])
    assert list(result) == ["x", "y", "z"]
    raw = [delong_test(y[:, c], a[:, c], b[:, c]).p for c in range(2)]
    assert [result[k]["p"] for k in ("x", "y")] == raw
    assert [result[k]["p_holm"] for k in ("x", "y")] == holm(raw)
    assert result["z"]["p"] is None and result["z"]["p_holm"] is None


# ---------------------------------------------------------------- Holm

def test_holm_hand_worked():
    # Four tested p-values (the None is untested, k = 4). Sorted with their multipliers:
    #   0.005 * 4 = 0.020
    #   0.010 * 3 = 0.030                -> max(0.020, 0.030) = 0.030
    #   0.030 * 2 = 0.060                -> 0.060
    #   0.040 * 1 = 0.040 (below 0.060)  -> 0.060 (step-down keeps it monotone)
    adjusted = holm([0.01, 0.04, 0.03, 0.005, None])
    assert adjusted[4] is None
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # Capped at 1: 0.6 * 2 = 1.2 -> 1.0, then max(1.0, 0.7) = 1.0.
    assert holm([0.7, 0.6]) == [1.0, 1.0]
    # Tied p-values get the same adjusted value: 0.01 * 2 = 0.02, max(0.02, 0.01) = 0.02.
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02], abs=1e-15)
    assert holm([0.2]) == [0.2]
    assert holm([None, None]) == [None, None]


def test_holm_is_monotone_and_bounded():
    rng = np.random.default_rng(3)
    raw = rng.random(14) ** 3
    adjusted = np.array(holm(list(raw)))
    assert np.all(adjusted >= raw) and np.all(adjusted <= 1.0)
    order = np.argsort(raw)
    assert np.all(np.diff(adjusted[order]) >= 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


# ---------------------------------------------------------------- weighted AUC, units

def test_weighted_auc_with_unit_weights_equals_sklearn():
    rng = np.random.default_rng(0)
    y, a, _ = paired_scores(rng, 300, decimals=1)
    index = build_rank_index(a, y > 0.5, y <= 0.5)
    assert weighted_auc(index, np.ones((1, 300), dtype=np.int64))[0] == pytest.approx(
        roc_auc_score(y, a), abs=1e-15)


def test_weighted_auc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    y, a, _ = paired_scores(rng, 200, decimals=1)
    weights = rng.integers(0, 4, size=(6, 200))
    weights[5, y > 0.5] = 0                               # no positive left
    auc = weighted_auc(build_rank_index(a, y > 0.5, y <= 0.5), weights)
    for r in range(5):
        assert auc[r] == pytest.approx(roc_auc_score(y, a, sample_weight=weights[r]), abs=1e-12)
    assert np.isnan(auc[5])


def test_patient_units_and_weights():
    groups = np.array(["p7", "p3", "p7", "p9", "p3", "p7"])
    resampler = PatientResampler.from_ids(groups)
    assert resampler.patient_of_image.tolist() == [0, 1, 0, 2, 1, 0]   # numbered by first appearance
    weights = resampler(np.random.default_rng(0), 50)
    assert weights.shape == (50, 6)
    assert np.array_equal(weights[:, 0], weights[:, 2]) and np.array_equal(weights[:, 0], weights[:, 5])
    assert np.array_equal(weights[:, 1], weights[:, 4])
    assert np.all(weights[:, [0, 1, 3]].sum(axis=1) == 3)  # 3 patients drawn per resample
    with pytest.raises(ValueError, match="patient id"):
        PatientResampler.from_ids(["p1", None, "p2"])
    with pytest.raises(ValueError, match="patient id"):
        make_resampler("patient", ["p1", float("nan")])
    y, scores = (np.arange(6) % 2)[:, None].astype(float), np.arange(6.0)[:, None]
    with pytest.raises(ValueError, match=r"expected \(10, 6\)"):              # one id per image
        bootstrap_ci(scores, y, ["a"], n_resamples=10, resampler=PatientResampler.from_ids(groups[:5]))


# ---------------------------------------------------------------- bootstrap intervals

def test_bootstrap_matches_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(4)
    y, scores, groups = clustered(rng, 40, 3)
    scores = np.round(scores, 1)
    labels = ["a", "b", "c"]
    per_class, mean = bootstrap_ci(scores, y, labels, n_resamples=60, seed=9,
                                   resampler=PatientResampler.from_ids(groups))

    weights = PatientResampler.from_ids(groups)(np.random.default_rng(9), 60)
    expected = np.full((60, 3), np.nan)
    for r in range(60):
        for c in range(3):
            w = weights[r]
            if (w * y[:, c]).sum() > 0 and (w * (1 - y[:, c])).sum() > 0:
                expected[r, c] = roc_auc_score(y[:, c], scores[:, c], sample_weight=w)
    for c, label in enumerate(labels):
        finite = expected[np.isfinite(expected[:, c]), c]
        assert per_class[label] == pytest.approx(list(np.percentile(finite, [2.5, 97.5])), abs=1e-12)
    # The mean of a resample averages the classes it defines (mean_auc_samples' rule).
    means = [row[np.isfinite(row)].mean() for row in expected if np.isfinite(row).any()]
    assert mean == pytest.approx(list(np.percentile(means, [2.5, 97.5])), abs=1e-12)


def test_patient_bootstrap_is_wider_with_repeated_patients():
    rng = np.random.default_rng(7)
    y, scores, groups = clustered(rng, 80, 5)
    labels = ["a", "b", "c"]
    by_patient = bootstrap_ci(scores, y, labels, n_resamples=500, resampler=make_resampler("patient", groups))
    by_image = bootstrap_ci(scores, y, labels, n_resamples=500, resampler=make_resampler("image", groups))
    for label in labels:
        assert width(by_patient[0][label]) > 1.5 * width(by_image[0][label])
    assert width(by_patient[1]) > 1.5 * width(by_image[1])


def test_patient_bootstrap_equals_image_bootstrap_with_one_image_per_patient():
    rng = np.random.default_rng(8)
    y, scores, _ = clustered(rng, 300, 1)
    groups = [f"patient_{i}" for i in rng.permutation(300)]   # unsorted ids
    labels = ["a", "b", "c"]
    by_patient = bootstrap_ci(scores, y, labels, n_resamples=300, seed=5,
                              resampler=make_resampler("patient", groups))
    by_image = bootstrap_ci(scores, y, labels, n_resamples=300, seed=5)
    assert by_patient == by_image


def test_bootstrap_undefined_class_and_argument_checks():
    rng = np.random.default_rng(2)
    y, scores, groups = clustered(rng, 30, 2)
    y[:, 1] = 1.0                                         # no negative
    by_patient = PatientResampler.from_ids(groups)
    per_class, mean = bootstrap_ci(scores, y, ["a", "b", "c"], n_resamples=100, resampler=by_patient)
    assert per_class["b"] is None and per_class["a"] is not None and mean is not None
    with pytest.raises(ValueError, match="unit 'visit' unknown"):
        make_resampler("visit", groups)
    with pytest.raises(ValueError, match="patient id"):
        make_resampler("patient", [None] * len(groups))
    with pytest.raises(ValueError, match="labels"):
        bootstrap_ci(scores, y, ["a", "b"], resampler=by_patient)


# ---------------------------------------------------------------- paired bootstrap

def test_paired_bootstrap_detects_a_clearly_better_model():
    rng = np.random.default_rng(11)
    y, a, groups = clustered(rng, 150, 3, signal=0.7)
    b = a + 1.0 * y + 0.3 * rng.normal(size=y.shape)
    by_patient = PatientResampler.from_ids(groups)
    result = paired_bootstrap(y, a, b, n_resamples=500, seed=1, resampler=by_patient)
    expected = np.mean([roc_auc_score(y[:, c], b[:, c]) - roc_auc_score(y[:, c], a[:, c])
                        for c in range(3)])
    assert result.delta == pytest.approx(expected, abs=1e-12)
    assert result.delta > 0.03 and result.ci[0] > 0
    assert result.p == pytest.approx(2 / 501)             # the smallest p with R = 500
    swapped = paired_bootstrap(y, b, a, n_resamples=500, seed=1, resampler=by_patient)
    assert swapped.delta == pytest.approx(-result.delta, abs=1e-15)
    assert swapped.ci == pytest.approx([-result.ci[1], -result.ci[0]], abs=1e-12)
    assert swapped.p == result.p


def test_paired_bootstrap_is_not_small_under_the_null():
    rng = np.random.default_rng(12)
    pvalues = []
    for _ in range(40):
        y, latent, groups = clustered(rng, 60, 3, n_classes=2)
        a = latent + 0.5 * rng.normal(size=y.shape)
        b = latent + 0.5 * rng.normal(size=y.shape)
        pvalues.append(paired_bootstrap(y, a, b, n_resamples=200, seed=0,
                                        resampler=PatientResampler.from_ids(groups)).p)
    assert np.mean(np.array(pvalues) < 0.05) <= 0.15
    assert np.median(pvalues) > 0.2

    same = paired_bootstrap(y, a, a, n_resamples=200, resampler=PatientResampler.from_ids(groups))
    assert (same.delta, same.ci, same.p, same.n_used) == (0.0, [0.0, 0.0], 1.0, 200)


def test_paired_bootstrap_uses_the_mean_rule_of_the_single_bootstrap():
    """A class with one positive is undefined in about a third of the resamples: the paired
    difference still uses (nearly) every resample, each resample's means left out that class in
    both runs, and equals the difference of the single bootstraps' means on the same resamples."""
    rng = np.random.default_rng(21)
    y, a, groups = clustered(rng, 100, 2, n_classes=3)
    y[:, 2] = 0.0
    y[10, 2] = 1.0
    b = a + 0.5 * y + 0.3 * rng.normal(size=y.shape)
    resampler = PatientResampler.from_ids(groups)
    result = paired_bootstrap(y, a, b, n_resamples=300, seed=4, resampler=resampler)
    positive = y > 0.5
    scored = np.array([True, True, True])
    means = [mean_auc_samples(bootstrap_auc_samples(s, positive, ~positive, 300, seed=4, resampler=resampler), scored)
             for s in (a, b)]
    deltas = means[1] - means[0]
    assert np.isnan(bootstrap_auc_samples(a, positive, ~positive, 300, seed=4, resampler=resampler)[:, 2]).mean() > 0.2
    assert result.n_used == np.isfinite(deltas).sum() == 300
    assert result.ci == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    expected = np.mean([roc_auc_score(y[:, c], b[:, c]) - roc_auc_score(y[:, c], a[:, c]) for c in range(3)])
    assert result.delta == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_without_defined_class():
    result = paired_bootstrap(np.ones((6, 2)), np.zeros((6, 2)), np.zeros((6, 2)))
    assert tuple(result) == (None, None, None, 0)


# ---------------------------------------------------------------- seeds

def test_mean_sd_over_seeds():
    values = [0.81, 0.84, 0.79, 0.83]
    result = mean_sd(values)
    assert result.mean == pytest.approx(statistics.mean(values), abs=1e-15)
    assert result.sd == pytest.approx(statistics.stdev(values), abs=1e-15)   # ddof = 1
    assert result.n == 4
    assert mean_sd([0.8, None, 0.9]) == pytest.approx((0.85, statistics.stdev([0.8, 0.9]), 2))
    assert mean_sd([0.8]) == (0.8, None, 1)
    assert mean_sd([]) == (None, None, 0)


# ================================================================ clinical figures

# --------------------------------------------------------------------------
# Helpers: brute force, one threshold at a time
# --------------------------------------------------------------------------

def candidates(score):
    """Every threshold that gives a different set of calls, highest first: above all, then each score."""
    distinct = sorted(set(score.tolist()), reverse=True)
    return [np.nextafter(distinct[0], np.inf)] + distinct


def counts_at(score, positive, t):
    called = score >= t
    return (int((called & positive).sum()), int((called & ~positive).sum()),
            int((~called & positive).sum()), int((~called & ~positive).sum()))


def sens_spec(score, positive, t):
    tp, fp, fn, tn = counts_at(score, positive, t)
    return tp / (tp + fn), tn / (tn + fp)


def random_scores(seed, n=80, n_classes=4, decimals=2):
    """Scores rounded to create ties, targets correlated with them."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, n_classes)) < 0.3).astype(float)
    probs = np.clip(0.5 * rng.random((n, n_classes)) + 0.4 * targets * rng.random((n, n_classes)), 0, 1)
    return np.round(probs, decimals), targets


# --------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_youden_equals_brute_force_with_ties_to_the_highest_threshold(seed):
    probs, targets = random_scores(seed, decimals=1 if seed % 2 else 2)
    chosen = operating_points(probs, targets, "youden")
    for c in range(probs.shape[1]):
        score, positive = probs[:, c], targets[:, c] > 0.5
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        best, best_t = None, None
        for t in candidates(score):                      # highest first: strict > keeps the highest tie
            tp, fp, fn, tn = counts_at(score, positive, t)
            j = Fraction(tp, n_pos) + Fraction(tn, n_neg) - 1
            if best is None or j > best:
                best, best_t = j, t
        assert chosen[c] == best_t


def test_youden_calls_nothing_when_no_threshold_beats_chance():
    # Every positive scores below every negative: J = 0 both when calling nothing and everything.
    probs = np.array([[0.1], [0.2], [0.7], [0.9]])
    targets = np.array([[1], [1], [0], [0]])
    (t,) = operating_points(probs, targets, "youden")
    assert t > 0.9 and at_threshold(probs, targets, [t])[0]["sensitivity"] == 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("rule, figure, beyond", [
    ("sensitivity", 0, lambda u, t: u > t),  # the highest threshold whose sensitivity is at least level
    ("specificity", 1, lambda u, t: u < t),  # the lowest threshold whose specificity is at least level
])
def test_constraint_rules_pick_the_extreme_threshold_that_meets_them(seed, level, rule, figure, beyond):
    probs, targets = random_scores(seed)
    chosen = operating_points(probs, targets, f"{rule}:{level}")
    for c, t in enumerate(chosen):
        score, positive = probs[:, c], targets[:, c] > 0.5
        assert sens_spec(score, positive, t)[figure] >= level
        assert all(sens_spec(score, positive, u)[figure] < level for u in candidates(score) if beyond(u, t))
        assert t in candidates(score)


def test_specificity_one_with_a_negative_on_top_calls_nothing():
    probs = np.array([[0.2], [0.5], [0.9]])
    targets = np.array([[0], [1], [0]])
    (t,) = operating_points(probs, targets, "specificity:1")
    assert t > 0.9
    (t,) = operating_points(probs, targets, "sensitivity:1")
    assert t == 0.5


def test_class_without_positive_or_negative_has_no_threshold():
    probs = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    targets = np.array([[0, 1, 0], [0, 1, 1], [0, 1, 0]])
    for rule in ("youden", "sensitivity:0.9", "specificity:0.9"):
        thresholds = operating_points(probs, targets, rule)
        assert thresholds[:2] == [None, None] and thresholds[2] is not None


@pytest.mark.parametrize("text", ["Youden", " youden ", "SENSITIVITY:0.9", "specificity: 0.85", "sensitivity:1"])
def test_rule_strings_accepted(text):
    probs, targets = random_scores(0)
    assert all(t is not None for t in operating_points(probs, targets, text))


@pytest.mark.parametrize("text", ["", "youdn", "youden:0.5", "sensitivity", "sensitivity:", "sensitivity:abc",
                                  "sensitivity:1.5", "specificity:0", "specificity:-0.1", "ppv:0.9",
                                  "sensitivity:nan"])
def test_bad_rule_string_is_one_line_naming_the_forms(text):
    with pytest.raises(ValueError) as caught:
        parse_operating_point(text)
    message = str(caught.value)
    assert "\n" not in message
    for form in ("youden", "sensitivity:X", "specificity:X"):
        assert form in message


# --------------------------------------------------------------------------
# Figures at a threshold
# --------------------------------------------------------------------------

def test_at_threshold_against_hand_worked_confusion_matrices():
    score = [0.9, 0.8, 0.6, 0.4, 0.3, 0.1]
    probs = np.array([score] * 5).T
    truth = [1, 0, 1, 1, 0, 0]
    targets = np.array([truth, truth, [0] * 6, truth, truth]).T
    thresholds = [0.35, 0.6, 0.7, 0.95, None]
    # c0, t = 0.35: calls 0.9 0.8 0.6 0.4 -> TP 3 (0.9 0.6 0.4), FP 1 (0.8), FN 0, TN 2 (0.3 0.1)
    #     sens 3/3, spec 2/3, PPV 3/4, NPV 2/2, F1 6/(6+1+0) = 6/7
    # c1, t = 0.6 (a call is >=, so 0.6 is called): TP 2, FP 1, FN 1 (0.4), TN 2
    #     sens 2/3, spec 2/3, PPV 2/3, NPV 2/3, F1 4/6
    # c2, t = 0.7, no positive: TP 0, FP 2 (0.9 0.8), FN 0, TN 4
    #     sens None (0/0), spec 4/6, PPV 0/2, NPV 4/4, F1 0/(0+2+0) = 0
    # c3, t = 0.95, nothing called: TP 0, FP 0, FN 3, TN 3
    #     sens 0/3, spec 3/3, PPV None (0/0), NPV 3/6, F1 0/3
    # c4, no threshold: all None
    expected = {
        "a": dict(sensitivity=1.0, specificity=2 / 3, ppv=3 / 4, npv=1.0, f1=6 / 7),
        "b": dict(sensitivity=2 / 3, specificity=2 / 3, ppv=2 / 3, npv=2 / 3, f1=2 / 3),
        "c": dict(sensitivity=None, specificity=2 / 3, ppv=0.0, npv=1.0, f1=0.0),
        "d": dict(sensitivity=0.0, specificity=1.0, ppv=None, npv=0.5, f1=0.0),
        "e": dict(sensitivity=None, specificity=None, ppv=None, npv=None, f1=None),
    }
    result = at_threshold(probs, targets, thresholds, labels=list("abcde"))
    assert list(result) == list("abcde")
    for key, figures in expected.items():
        for name, value in figures.items():
            assert result[key][name] == (None if value is None else pytest.approx(value)), (key, name)
    by_index = at_threshold(probs, targets, thresholds)
    assert list(by_index) == [0, 1, 2, 3, 4] and by_index[0] == result["a"]


def test_at_threshold_rejects_wrong_number_of_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        at_threshold(np.zeros((3, 2)), np.zeros((3, 2)), [0.5])


# --------------------------------------------------------------------------
# Patient bootstrap
# --------------------------------------------------------------------------

def test_patient_weights_share_a_patients_draw_count():
    patients = ["p1", "p1", "p2", "p3", "p3", "p3", "p4"]
    weights = PatientResampler.from_ids(patients)(np.random.default_rng(0), 200)
    assert weights.shape == (200, 7) and weights.min() >= 0
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    per_patient = weights[:, [0, 2, 3, 6]]
    assert (per_patient.sum(axis=1) == 4).all()          # four patients drawn per resample
    assert per_patient.std() > 0
    assert np.allclose(per_patient.mean(), 1.0, atol=0.15)


def test_bootstrap_equals_resamples_materialised_image_by_image():
    probs, targets = random_scores(7, n=40, n_classes=3)
    patients = np.arange(40) // 3
    thresholds = operating_points(probs, targets, "youden")
    n_resamples, seed = 50, 11
    result = bootstrap_at_threshold(probs, targets, thresholds, n_resamples, seed,
                                            resampler=PatientResampler.from_ids(patients))

    weights = PatientResampler.from_ids(patients)(np.random.default_rng(seed), n_resamples)
    values = {(c, name): [] for c in range(3) for name in FIGURES}
    for row in weights:
        rows = np.repeat(np.arange(40), row)            # the resample as an explicit data set
        figures = at_threshold(probs[rows], targets[rows], thresholds)
        for (c, name), bucket in values.items():
            if figures[c][name] is not None:
                bucket.append(figures[c][name])
    for (c, name), bucket in values.items():
        assert result[c][name] == pytest.approx(list(np.quantile(bucket, [0.025, 0.975])))


def test_bootstrap_intervals_contain_the_point_estimate():
    probs, targets = random_scores(3, n=300, n_classes=4)
    patients = np.arange(300) // 4
    thresholds = operating_points(probs, targets, "youden")
    point = at_threshold(probs, targets, thresholds)
    intervals = bootstrap_at_threshold(probs, targets, thresholds, n_resamples=300, seed=0,
                                               resampler=PatientResampler.from_ids(patients))
    for c in range(4):
        for name in FIGURES:
            lo, hi = intervals[c][name]
            assert lo <= point[c][name] <= hi and lo < hi


def test_bootstrap_is_wider_with_repeated_correlated_patients():
    rng = np.random.default_rng(5)
    n_patients, per_patient = 80, 5
    truth = rng.random((n_patients, 2)) < 0.4
    score = np.clip(0.3 + 0.35 * truth + 0.3 * rng.standard_normal((n_patients, 2)), 0, 1)
    # Every image of a patient repeats the patient's score and labels: fully correlated.
    probs, targets = np.repeat(score, per_patient, axis=0), np.repeat(truth, per_patient, axis=0).astype(float)
    patients = np.repeat(np.arange(n_patients), per_patient)
    thresholds = [0.5, 0.5]
    by_patient = bootstrap_at_threshold(probs, targets, thresholds, n_resamples=400, seed=1,
                                                resampler=PatientResampler.from_ids(patients))
    by_image = bootstrap_at_threshold(probs, targets, thresholds, n_resamples=400, seed=1)
    for c in range(2):
        for name in FIGURES:
            width_patient = np.diff(by_patient[c][name])[0]
            width_image = np.diff(by_image[c][name])[0]
            assert width_patient > 1.5 * width_image, (c, name)   # about sqrt(5) = 2.2 expected


def test_bootstrap_gives_none_where_undefined_and_is_seeded():
    probs, targets = random_scores(2, n=30, n_classes=2)
    targets[:, 1] = 0
    a = bootstrap_at_threshold(probs, targets, [0.4, 0.4], n_resamples=30, seed=3)
    b = bootstrap_at_threshold(probs, targets, [0.4, 0.4], n_resamples=30, seed=3)
    assert a == b
    assert a[1]["sensitivity"] is None and a[1]["specificity"] is not None
    assert all(v is None for v in bootstrap_at_threshold(probs, targets, [None, None], n_resamples=5)[0].values())


# --------------------------------------------------------------------------
# AUPRC and prevalence
# --------------------------------------------------------------------------

def average_precision_by_hand(score, positive):
    """Mean over the positives of the precision among the images ranked at or above it (no ties)."""
    order = np.argsort(-score)
    hits = positive[order]
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return precision_at[hits].mean()


def test_auprc_against_hand_computation_and_prevalence():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 3)) < [0.1, 0.3, 0.0]).astype(float)
    probs = rng.random((200, 3)) + 0.3 * targets                       # continuous: no ties
    result = auprc(probs, targets, labels=["x", "y", "z"])
    for c, key in enumerate("xy"):
        assert result[key] == pytest.approx(average_precision_by_hand(probs[:, c], targets[:, c] > 0.5))
    assert result["z"] is None
    prevalence = class_prevalence(targets, labels=["x", "y", "z"])
    assert prevalence == pytest.approx({"x": targets[:, 0].mean(), "y": targets[:, 1].mean(), "z": 0.0})


def test_auprc_of_a_random_ranking_is_the_prevalence():
    rng = np.random.default_rng(1)
    targets = (rng.random((20000, 1)) < 0.2).astype(float)
    result = auprc(rng.random((20000, 1)), targets)
    assert result[0] == pytest.approx(class_prevalence(targets)[0], abs=0.02)


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def test_ece_small_when_calibrated_and_large_when_distorted():
    rng = np.random.default_rng(0)
    p = rng.random((10000, 2))
    targets = (rng.random((10000, 2)) < p).astype(float)          # targets ~ Bernoulli(p): calibrated
    calibrated = expected_calibration_error(p, targets)
    assert calibrated["pooled"] < 0.02
    assert all(v < 0.03 for v in calibrated["per_class"].values())
    distorted = expected_calibration_error(p ** 3, targets)      # E|p - p^3| = 1/2 - 1/4 = 0.25
    assert distorted["pooled"] > 0.15
    assert distorted["pooled"] == pytest.approx(0.25, abs=0.03)


def test_ece_hand_worked_pooled_and_per_class():
    # Column 0: bins (n_bins = 10) {0.05} -> |0.05 - 0|, {0.15, 0.18} -> |0.165 - 0.5|, {0.95} -> |0.95 - 1|
    #   ECE = (1 * 0.05 + 2 * 0.335 + 1 * 0.05) / 4 = 0.1925
    # Column 1: {0.0} -> 0, {0.55} -> |0.55 - 1|, {0.58} -> same bin 5: {0.55, 0.58} -> |0.565 - 0.5|,
    #   {1.0} in the last bin -> |1 - 1|.  Bins: 0: {0.0}, 5: {0.55, 0.58}, 9: {1.0}
    #   ECE = (0 + 2 * 0.065 + 0) / 4 = 0.0325
    # Pooled: 8 pairs. Bin 0: {0.05, 0.0} mean 0.025, freq 0 -> 0.025; bin 1: {0.15, 0.18} 0.165 vs 0.5;
    #   bin 5: {0.55, 0.58} 0.565 vs 0.5; bin 9: {0.95, 1.0} mean 0.975, freq 1 -> 0.025
    #   ECE = (2 * 0.025 + 2 * 0.335 + 2 * 0.065 + 2 * 0.025) / 8 = 0.9 / 8 = 0.1125
    probs = np.array([[0.05, 0.0], [0.15, 0.55], [0.18, 0.58], [0.95, 1.0]])
    targets = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    result = expected_calibration_error(probs, targets, n_bins=10, labels=["a", "b"])
    assert result["per_class"] == pytest.approx({"a": 0.1925, "b": 0.0325})
    assert result["pooled"] == pytest.approx(0.1125)

    diagram = reliability_diagram(probs, targets, n_bins=10)
    a = diagram["per_class"][0]
    assert a["bin_centres"] == pytest.approx([0.05 + 0.1 * b for b in range(10)])
    assert a["counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert a["mean_predicted"][1] == pytest.approx(0.165) and a["observed_frequency"][1] == 0.5
    assert a["mean_predicted"][2] is None and a["observed_frequency"][2] is None
    assert diagram["pooled"]["counts"] == [2, 2, 0, 0, 0, 2, 0, 0, 0, 2]
    assert diagram["pooled"]["mean_predicted"][9] == pytest.approx(0.975)


def test_ece_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([[1.5]]), np.array([[1]]))


# --------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value, years", [
    (58, 58), ("058Y", 58), (" 58 ", 58), ("006M", 0.5), ("039y", 39), (np.int64(61), 61), (61.0, 61),
    (412, None), ("abc", None), (None, None), (float("nan"), None), ("", None),
])
def test_age_in_years(value, years):
    assert age_in_years(value) == (None if years is None else pytest.approx(years))


def test_subgroup_auc_equals_sklearn_on_the_subgroup_rows():
    rng = np.random.default_rng(4)
    n = 240
    targets = (rng.random((n, 3)) < 0.35).astype(float)
    probs = np.clip(0.5 * rng.random((n, 3)) + 0.3 * targets, 0, 1)
    years = rng.integers(18, 90, size=n)
    ages = [f"{y:03d}Y" if i % 3 == 0 else int(y) for i, y in enumerate(years)]   # ints and '058Y' strings
    ages[5] = 412                                                           # impossible: in no age band
    sex = rng.choice(["M", "F"], size=n)
    view = rng.choice(["PA", "AP"], size=n)
    targets[(sex == "F"), 2] = 0                                           # class 2 undefined among women
    frame = pd.DataFrame({"patient_gender": sex, "patient_age": ages, "view_position": view,
                          "Image Index": [f"{i:08d}_000.png" for i in range(n)]})
    result = subgroup_auc(probs, targets, frame, SUBGROUPS, labels=["a", "b", "c"])

    band = np.where(years < 40, "<40", np.where(years < 60, "40-59", "60+")).astype(object)
    band[5] = None
    masks = {"sex": {g: sex == g for g in ("F", "M")},
             "age": {g: band == g for g in ("<40", "40-59", "60+")},
             "view": {g: view == g for g in ("PA", "AP")}}
    assert {k: list(v) for k, v in result.items()} == {k: list(v) for k, v in masks.items()}
    for grouping, groups in masks.items():
        for group, rows in groups.items():
            entry = result[grouping][group]
            assert entry["n_images"] == rows.sum()
            expected = {}
            for c, key in enumerate("abc"):
                y = targets[rows, c]
                expected[key] = roc_auc_score(y, probs[rows, c]) if 0 < y.sum() < y.size else None
            assert entry["per_class"] == pytest.approx(expected)
            defined = [v for v in expected.values() if v is not None]
            assert entry["mean_auc"] == pytest.approx(np.mean(defined))
    assert result["sex"]["F"]["per_class"]["c"] is None
    assert sum(g["n_images"] for g in result["age"].values()) == n - 1


def test_subgroup_auc_names_missing_columns():
    frame = pd.DataFrame({"patient_gender": ["M", "F"], "patient_age": [50, 60]})
    with pytest.raises(ValueError, match="view_position"):
        subgroup_auc(np.zeros((2, 1)), np.zeros((2, 1)), frame, SUBGROUPS)


# --------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------

def test_pointing_game_scales_heatmap_cells_to_box_coordinates():
    # 8 x 8 heatmaps of 1024 px images: a cell is 128 px; the peak at row 2, column 5 points at
    # ((5 + 0.5) * 128, (2 + 0.5) * 128) = (704, 320).
    heatmap = np.zeros((8, 8))
    heatmap[2, 5] = 1.0
    heatmaps = np.stack([heatmap] * 4)
    boxes = np.array([
        [650, 300, 100, 50],     # x 650..750, y 300..350: contains (704, 320) -> hit
        [0, 0, 700, 1024],       # x up to 700 < 704 -> miss (unscaled (5, 2) would be inside)
        [300, 650, 100, 100],    # (x, y) swapped: (320, 704) would be inside -> miss
        [704, 320, 10, 10],      # the centre on the box's corner: closed box -> hit
    ])
    result = pointing_game(heatmaps, boxes, ["Nodule", "Mass", "Mass", "Nodule"])
    assert list(result) == ["Nodule", "Mass"]
    assert result["Nodule"]["hit_rate"] == 1.0 and result["Nodule"]["n_boxes"] == 2
    assert result["Mass"]["hit_rate"] == 0.0 and result["Mass"]["n_boxes"] == 2
    # Chance: box area / image area. Nodule: (100*50 + 10*10) / 1024^2 / 2; Mass: (700*1024 + 100*100) / 1024^2 / 2
    assert result["Nodule"]["chance_rate"] == pytest.approx((5000 + 100) / 1024 ** 2 / 2)
    assert result["Mass"]["chance_rate"] == pytest.approx((700 * 1024 + 10000) / 1024 ** 2 / 2)


def test_pointing_game_non_square_original_and_heatmap():
    # Heatmap 4 rows x 8 columns over an 800 (wide) x 400 (high) original: cells 100 x 100 px.
    # Peak at row 3, column 1 -> centre (150, 350).
    heatmap = np.zeros((4, 8))
    heatmap[3, 1] = 2.0
    heatmap[0, 7] = 1.0
    boxes = np.array([[100, 300, 100, 100], [340, 140, 20, 20], [100, 300, 100, 100]])
    sizes = np.array([[800, 400], [800, 400], [400, 800]])   # third: 50 x 200 px cells -> (75, 700)
    result = pointing_game(np.stack([heatmap] * 3), boxes, ["a", "b", "c"], original_size=sizes)
    assert result["a"]["hit_rate"] == 1.0
    assert result["b"]["hit_rate"] == 0.0        # (350, 150) -- the transposed point -- is inside this box
    assert result["c"]["hit_rate"] == 0.0
    # A box partly outside the image counts only its inside part for chance: 100 x 100 of 800 x 400.
    clipped = pointing_game(heatmap[None], np.array([[750, 350, 100, 100]]), ["a"], (800, 400))
    assert clipped["a"]["chance_rate"] == pytest.approx(50 * 50 / (800 * 400))


def test_pointing_game_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        pointing_game(np.zeros((2, 4, 4)), np.zeros((3, 4)), ["a", "b"])
