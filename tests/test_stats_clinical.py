"""Operating points, figures at a threshold with patient bootstrap intervals, AUPRC, calibration,
subgroup AUC and the pointing game, each checked against brute force, hand-worked examples,
sklearn on the raw rows, or a simulation whose answer is known."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrmem import stats_clinical as sc


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
    chosen = sc.operating_points(probs, targets, "youden")
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
    (t,) = sc.operating_points(probs, targets, "youden")
    assert t > 0.9 and sc.at_threshold(probs, targets, [t])[0]["sensitivity"] == 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_sensitivity_rule_is_the_highest_threshold_meeting_it(seed, level):
    probs, targets = random_scores(seed)
    chosen = sc.operating_points(probs, targets, f"sensitivity:{level}")
    for c, t in enumerate(chosen):
        score, positive = probs[:, c], targets[:, c] > 0.5
        assert sens_spec(score, positive, t)[0] >= level
        assert all(sens_spec(score, positive, u)[0] < level for u in candidates(score) if u > t)
        assert t in candidates(score)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_specificity_rule_is_the_lowest_threshold_meeting_it(seed, level):
    probs, targets = random_scores(seed)
    chosen = sc.operating_points(probs, targets, f"specificity:{level}")
    for c, t in enumerate(chosen):
        score, positive = probs[:, c], targets[:, c] > 0.5
        assert sens_spec(score, positive, t)[1] >= level
        assert all(sens_spec(score, positive, u)[1] < level for u in candidates(score) if u < t)
        assert t in candidates(score)


def test_specificity_one_with_a_negative_on_top_calls_nothing():
    probs = np.array([[0.2], [0.5], [0.9]])
    targets = np.array([[0], [1], [0]])
    (t,) = sc.operating_points(probs, targets, "specificity:1")
    assert t > 0.9
    (t,) = sc.operating_points(probs, targets, "sensitivity:1")
    assert t == 0.5


def test_class_without_positive_or_negative_has_no_threshold():
    probs = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    targets = np.array([[0, 1, 0], [0, 1, 1], [0, 1, 0]])
    for rule in ("youden", "sensitivity:0.9", "specificity:0.9"):
        thresholds = sc.operating_points(probs, targets, rule)
        assert thresholds[:2] == [None, None] and thresholds[2] is not None


@pytest.mark.parametrize("text", ["Youden", " youden ", "SENSITIVITY:0.9", "specificity: 0.85", "sensitivity:1"])
def test_rule_strings_accepted(text):
    probs, targets = random_scores(0)
    assert all(t is not None for t in sc.operating_points(probs, targets, text))


@pytest.mark.parametrize("text", ["", "youdn", "youden:0.5", "sensitivity", "sensitivity:", "sensitivity:abc",
                                  "sensitivity:1.5", "specificity:0", "specificity:-0.1", "ppv:0.9",
                                  "sensitivity:nan"])
def test_bad_rule_string_is_one_line_naming_the_forms(text):
    with pytest.raises(ValueError) as caught:
        sc.parse_operating_point(text)
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
    result = sc.at_threshold(probs, targets, thresholds, labels=list("abcde"))
    assert list(result) == list("abcde")
    for key, figures in expected.items():
        for name, value in figures.items():
            assert result[key][name] == (None if value is None else pytest.approx(value)), (key, name)
    by_index = sc.at_threshold(probs, targets, thresholds)
    assert list(by_index) == [0, 1, 2, 3, 4] and by_index[0] == result["a"]


def test_at_threshold_rejects_wrong_number_of_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        sc.at_threshold(np.zeros((3, 2)), np.zeros((3, 2)), [0.5])


# --------------------------------------------------------------------------
# Patient bootstrap
# --------------------------------------------------------------------------

def test_patient_weights_share_a_patients_draw_count():
    patients = ["p1", "p1", "p2", "p3", "p3", "p3", "p4"]
    weights = sc.patient_weights(patients, len(patients), 200, np.random.default_rng(0))
    assert weights.shape == (200, 7) and weights.min() >= 0
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    per_patient = weights[:, [0, 2, 3, 6]]
    assert (per_patient.sum(axis=1) == 4).all()          # four patients drawn per resample
    assert per_patient.std() > 0
    assert np.allclose(per_patient.mean(), 1.0, atol=0.15)


def test_bootstrap_equals_resamples_materialised_image_by_image():
    probs, targets = random_scores(7, n=40, n_classes=3)
    patients = np.arange(40) // 3
    thresholds = sc.operating_points(probs, targets, "youden")
    n_resamples, seed = 50, 11
    result = sc.bootstrap_at_threshold(probs, targets, thresholds, patients, n_resamples, seed)

    weights = sc.patient_weights(patients, 40, n_resamples, np.random.default_rng(seed))
    values = {(c, name): [] for c in range(3) for name in sc.FIGURES}
    for row in weights:
        rows = np.repeat(np.arange(40), row)            # the resample as an explicit data set
        figures = sc.at_threshold(probs[rows], targets[rows], thresholds)
        for (c, name), bucket in values.items():
            if figures[c][name] is not None:
                bucket.append(figures[c][name])
    for (c, name), bucket in values.items():
        assert result[c][name] == pytest.approx(list(np.quantile(bucket, [0.025, 0.975])))


def test_bootstrap_intervals_contain_the_point_estimate():
    probs, targets = random_scores(3, n=300, n_classes=4)
    patients = np.arange(300) // 4
    thresholds = sc.operating_points(probs, targets, "youden")
    point = sc.at_threshold(probs, targets, thresholds)
    intervals = sc.bootstrap_at_threshold(probs, targets, thresholds, patients, n_resamples=300, seed=0)
    for c in range(4):
        for name in sc.FIGURES:
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
    by_patient = sc.bootstrap_at_threshold(probs, targets, thresholds, patients, n_resamples=400, seed=1)
    by_image = sc.bootstrap_at_threshold(probs, targets, thresholds, None, n_resamples=400, seed=1)
    for c in range(2):
        for name in sc.FIGURES:
            width_patient = np.diff(by_patient[c][name])[0]
            width_image = np.diff(by_image[c][name])[0]
            assert width_patient > 1.5 * width_image, (c, name)   # about sqrt(5) = 2.2 expected


def test_bootstrap_gives_none_where_undefined_and_is_seeded():
    probs, targets = random_scores(2, n=30, n_classes=2)
    targets[:, 1] = 0
    a = sc.bootstrap_at_threshold(probs, targets, [0.4, 0.4], n_resamples=30, seed=3)
    b = sc.bootstrap_at_threshold(probs, targets, [0.4, 0.4], n_resamples=30, seed=3)
    assert a == b
    assert a[1]["sensitivity"] is None and a[1]["specificity"] is not None
    assert all(v is None for v in sc.bootstrap_at_threshold(probs, targets, [None, None], n_resamples=5)[0].values())


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
    result = sc.auprc(probs, targets, labels=["x", "y", "z"])
    for c, key in enumerate("xy"):
        assert result[key] == pytest.approx(average_precision_by_hand(probs[:, c], targets[:, c] > 0.5))
    assert result["z"] is None
    prevalence = sc.prevalence(targets, labels=["x", "y", "z"])
    assert prevalence == pytest.approx({"x": targets[:, 0].mean(), "y": targets[:, 1].mean(), "z": 0.0})


def test_auprc_of_a_random_ranking_is_the_prevalence():
    rng = np.random.default_rng(1)
    targets = (rng.random((20000, 1)) < 0.2).astype(float)
    result = sc.auprc(rng.random((20000, 1)), targets)
    assert result[0] == pytest.approx(sc.prevalence(targets)[0], abs=0.02)


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def test_ece_small_when_calibrated_and_large_when_distorted():
    rng = np.random.default_rng(0)
    p = rng.random((10000, 2))
    targets = (rng.random((10000, 2)) < p).astype(float)          # targets ~ Bernoulli(p): calibrated
    calibrated = sc.expected_calibration_error(p, targets)
    assert calibrated["pooled"] < 0.02
    assert all(v < 0.03 for v in calibrated["per_class"].values())
    distorted = sc.expected_calibration_error(p ** 3, targets)      # E|p - p^3| = 1/2 - 1/4 = 0.25
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
    result = sc.expected_calibration_error(probs, targets, n_bins=10, labels=["a", "b"])
    assert result["per_class"] == pytest.approx({"a": 0.1925, "b": 0.0325})
    assert result["pooled"] == pytest.approx(0.1125)

    diagram = sc.reliability_diagram(probs, targets, n_bins=10)
    a = diagram["per_class"][0]
    assert a["bin_centres"] == pytest.approx([0.05 + 0.1 * b for b in range(10)])
    assert a["counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert a["mean_predicted"][1] == pytest.approx(0.165) and a["observed_frequency"][1] == 0.5
    assert a["mean_predicted"][2] is None and a["observed_frequency"][2] is None
    assert diagram["pooled"]["counts"] == [2, 2, 0, 0, 0, 2, 0, 0, 0, 2]
    assert diagram["pooled"]["mean_predicted"][9] == pytest.approx(0.975)


def test_ece_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sc.expected_calibration_error(np.array([[1.5]]), np.array([[1]]))


# --------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value, years", [
    (58, 58), ("058Y", 58), (" 58 ", 58), ("006M", 0.5), ("039y", 39), (np.int64(61), 61), (61.0, 61),
    (412, None), ("abc", None), (None, None), (float("nan"), None), ("", None),
])
def test_age_in_years(value, years):
    assert sc.age_in_years(value) == (None if years is None else pytest.approx(years))


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
    frame = pd.DataFrame({"Patient Gender": sex, "Patient Age": ages, "View Position": view,
                          "Image Index": [f"{i:08d}_000.png" for i in range(n)]})
    result = sc.subgroup_auc(probs, targets, frame, labels=["a", "b", "c"])

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
    frame = pd.DataFrame({"Patient Gender": ["M", "F"], "Patient Age": [50, 60]})
    with pytest.raises(ValueError, match="View Position"):
        sc.subgroup_auc(np.zeros((2, 1)), np.zeros((2, 1)), frame)


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
    result = sc.pointing_game(heatmaps, boxes, ["Nodule", "Mass", "Mass", "Nodule"])
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
    result = sc.pointing_game(np.stack([heatmap] * 3), boxes, ["a", "b", "c"], original_size=sizes)
    assert result["a"]["hit_rate"] == 1.0
    assert result["b"]["hit_rate"] == 0.0        # (350, 150) -- the transposed point -- is inside this box
    assert result["c"]["hit_rate"] == 0.0
    # A box partly outside the image counts only its inside part for chance: 100 x 100 of 800 x 400.
    clipped = sc.pointing_game(heatmap[None], np.array([[750, 350, 100, 100]]), ["a"], (800, 400))
    assert clipped["a"]["chance_rate"] == pytest.approx(50 * 50 / (800 * 400))


def test_pointing_game_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        sc.pointing_game(np.zeros((2, 4, 4)), np.zeros((3, 4)), ["a", "b"])
