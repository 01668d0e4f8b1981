"""Tests for cxrmem.stats_paired: DeLong's test, Holm, patient-level bootstrap, mean +- SD."""

import math
import statistics

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrmem.stats_paired import (
    UNITS,
    WeightedAUC,
    bootstrap_auc_ci,
    delong_components,
    delong_per_class,
    delong_test,
    holm,
    mean_sd,
    paired_bootstrap,
    resample_weights,
)


# ---------------------------------------------------------------- helpers

def direct_components(y, scores):
    """DeLong's structural components straight from the definition, O(m n):
    psi(x, y') = 1 if x > y', 0.5 if x == y', 0 otherwise;
    V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j), AUC = mean psi."""
    positive = y > 0.5
    x, y_neg = scores[positive], scores[~positive]
    psi = (x[:, None] > y_neg[None, :]) + 0.5 * (x[:, None] == y_neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def direct_delong(y, a, b):
    """delta, var and two-sided p of DeLong's test from the direct components."""
    auc_a, v10_a, v01_a = direct_components(y, a)
    auc_b, v10_b, v01_b = direct_components(y, b)
    m, n = v10_a.size, v01_a.size
    # var(delta) = var(V10_b - V10_a) / m + var(V01_b - V01_a) / n, sample variances
    var = np.var(v10_b - v10_a, ddof=1) / m + np.var(v01_b - v01_a, ddof=1) / n
    delta = auc_b - auc_a
    z = delta / math.sqrt(var)
    return delta, var, math.erfc(abs(z) / math.sqrt(2.0))


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
    assert WeightedAUC(y, a)(np.ones(300, dtype=int))[0] == pytest.approx(
        roc_auc_score(y, a), abs=1e-15)


def test_weighted_auc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    y, a, _ = paired_scores(rng, 200, decimals=1)
    weights = rng.integers(0, 4, size=(6, 200))
    weights[5, y > 0.5] = 0                               # no positive left
    auc = WeightedAUC(y, a)(weights)
    for r in range(5):
        assert auc[r] == pytest.approx(roc_auc_score(y, a, sample_weight=weights[r]), abs=1e-12)
    assert np.isnan(auc[5])


def test_patient_units_and_weights():
    groups = np.array(["p7", "p3", "p7", "p9", "p3", "p7"])
    units = UNITS["patient"](groups, 6)
    assert units.tolist() == [0, 1, 0, 2, 1, 0]          # numbered by first appearance
    weights = resample_weights(np.random.default_rng(0), units, 50)
    assert weights.shape == (50, 6)
    assert np.array_equal(weights[:, 0], weights[:, 2]) and np.array_equal(weights[:, 0], weights[:, 5])
    assert np.array_equal(weights[:, 1], weights[:, 4])
    assert np.all(weights[:, [0, 1, 3]].sum(axis=1) == 3)  # 3 patients drawn per resample
    with pytest.raises(ValueError, match="patient id"):
        UNITS["patient"](None, 6)
    with pytest.raises(ValueError, match="one id per image"):
        UNITS["patient"](groups[:5], 6)


# ---------------------------------------------------------------- bootstrap intervals

def test_bootstrap_matches_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(4)
    y, scores, groups = clustered(rng, 40, 3)
    scores = np.round(scores, 1)
    labels = ["a", "b", "c"]
    per_class, mean = bootstrap_auc_ci(y, scores, labels, groups=groups, n_resamples=60, seed=9)

    weights = resample_weights(np.random.default_rng(9), UNITS["patient"](groups, y.shape[0]), 60)
    expected = np.full((60, 3), np.nan)
    for r in range(60):
        for c in range(3):
            w = weights[r]
            if (w * y[:, c]).sum() > 0 and (w * (1 - y[:, c])).sum() > 0:
                expected[r, c] = roc_auc_score(y[:, c], scores[:, c], sample_weight=w)
    for c, label in enumerate(labels):
        finite = expected[np.isfinite(expected[:, c]), c]
        assert per_class[label] == pytest.approx(list(np.percentile(finite, [2.5, 97.5])), abs=1e-12)
    complete = expected[np.isfinite(expected).all(axis=1)].mean(axis=1)
    assert mean == pytest.approx(list(np.percentile(complete, [2.5, 97.5])), abs=1e-12)


def test_patient_bootstrap_is_wider_with_repeated_patients():
    rng = np.random.default_rng(7)
    y, scores, groups = clustered(rng, 80, 5)
    labels = ["a", "b", "c"]
    by_patient = bootstrap_auc_ci(y, scores, labels, groups=groups, unit="patient", n_resamples=500)
    by_image = bootstrap_auc_ci(y, scores, labels, groups=groups, unit="image", n_resamples=500)
    for label in labels:
        assert width(by_patient[0][label]) > 1.5 * width(by_image[0][label])
    assert width(by_patient[1]) > 1.5 * width(by_image[1])


def test_patient_bootstrap_equals_image_bootstrap_with_one_image_per_patient():
    rng = np.random.default_rng(8)
    y, scores, _ = clustered(rng, 300, 1)
    groups = [f"patient_{i}" for i in rng.permutation(300)]   # unsorted ids
    labels = ["a", "b", "c"]
    by_patient = bootstrap_auc_ci(y, scores, labels, groups=groups, unit="patient",
                                  n_resamples=300, seed=5)
    by_image = bootstrap_auc_ci(y, scores, labels, unit="image", n_resamples=300, seed=5)
    assert by_patient == by_image


def test_bootstrap_undefined_class_and_argument_checks():
    rng = np.random.default_rng(2)
    y, scores, groups = clustered(rng, 30, 2)
    y[:, 1] = 1.0                                         # no negative
    per_class, mean = bootstrap_auc_ci(y, scores, ["a", "b", "c"], groups=groups, n_resamples=100)
    assert per_class["b"] is None and per_class["a"] is not None and mean is not None
    with pytest.raises(ValueError, match="unit 'visit' unknown"):
        bootstrap_auc_ci(y, scores, ["a", "b", "c"], groups=groups, unit="visit")
    with pytest.raises(ValueError, match="patient id"):
        bootstrap_auc_ci(y, scores, ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels"):
        bootstrap_auc_ci(y, scores, ["a", "b"], groups=groups)


# ---------------------------------------------------------------- paired bootstrap

def test_paired_bootstrap_detects_a_clearly_better_model():
    rng = np.random.default_rng(11)
    y, a, groups = clustered(rng, 150, 3, signal=0.7)
    b = a + 1.0 * y + 0.3 * rng.normal(size=y.shape)
    result = paired_bootstrap(y, a, b, groups=groups, n_resamples=500, seed=1)
    expected = np.mean([roc_auc_score(y[:, c], b[:, c]) - roc_auc_score(y[:, c], a[:, c])
                        for c in range(3)])
    assert result.delta == pytest.approx(expected, abs=1e-12)
    assert result.delta > 0.03 and result.ci[0] > 0
    assert result.p == pytest.approx(2 / 501)             # the smallest p with R = 500
    swapped = paired_bootstrap(y, b, a, groups=groups, n_resamples=500, seed=1)
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
        pvalues.append(paired_bootstrap(y, a, b, groups=groups, n_resamples=200, seed=0).p)
    assert np.mean(np.array(pvalues) < 0.05) <= 0.15
    assert np.median(pvalues) > 0.2

    same = paired_bootstrap(y, a, a, groups=groups, n_resamples=200)
    assert (same.delta, same.ci, same.p, same.n_used) == (0.0, [0.0, 0.0], 1.0, 200)


def test_paired_bootstrap_without_defined_class():
    result = paired_bootstrap(np.ones((6, 2)), np.zeros((6, 2)), np.zeros((6, 2)), unit="image")
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
