"""Tests for cxrmem.evaluate: AUC, bootstrap intervals, report layout, files."""

import json
import math
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrmem.errors import UserError
from cxrmem.io import atomic_path
from cxrmem.evaluate import (
    bootstrap_auc_samples,
    bootstrap_ci,
    build_rank_index,
    check_inputs,
    evaluate_split,
    format_report,
    load_predictions,
    mean_auc,
    per_class_auc,
    resample_counts,
    save_predictions,
    unit_counts,
    weighted_auc,
    write_json_atomic,
)

FINDINGS = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
    "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
    "Cardiomegaly", "Nodule", "Mass", "Hernia",
]


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

    result = evaluate_split(probs, targets, labels, n_resamples=50)
    assert result["mean_auc"] == 1.0
    assert result["ci95"]["no_positive"] is None
    assert result["ci95"]["no_negative"] is None
    assert result["n_positive"] == {"A": 2, "B": 2, "no_positive": 0, "no_negative": 4}


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

@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_unit_weights_equal_sklearn_including_ties(decimals):
    probs, targets = synthetic_split(500, n_classes=3, decimals=decimals, seed=3)
    scores, positive, _ = check_inputs(probs, targets, labels_for(3))
    for c in range(3):
        ours = weighted_auc(build_rank_index(scores[:, c], positive[:, c]), unit_counts(500))[0]
        ref = roc_auc_score(positive[:, c], scores[:, c])
        # Ours is the exactly rounded ratio; sklearn integrates the curve in
        # floating point, so the two may differ in the last bit only.
        assert ours == pytest.approx(ref, rel=0, abs=1e-12)


def test_unit_weights_with_all_scores_tied_give_one_half():
    positive = np.array([True, False, True, False, False])
    scores = np.full(5, 0.3)
    assert weighted_auc(build_rank_index(scores, positive), unit_counts(5))[0] == 0.5


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
    counts = resample_counts(np.random.default_rng(1), n, 5)
    assert counts.shape == (5, n + 1) and (counts[:, -1] == 0).all()
    assert (counts[:, :n].sum(axis=1) == n).all()
    aucs = weighted_auc(index, counts)
    for r in range(5):
        w = counts[r, :n]
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
    import cxrmem.evaluate as evaluate

    probs, targets = synthetic_split(200, n_classes=2, seed=4)
    scores, positive, _ = check_inputs(probs, targets, labels_for(2))
    whole = bootstrap_auc_samples(scores, positive, n_resamples=30, seed=1)
    monkeypatch.setattr(evaluate, "_BLOCK_ELEMENTS", 201 * 7)   # blocks of 7 resamples
    blocked = bootstrap_auc_samples(scores, positive, n_resamples=30, seed=1)
    np.testing.assert_array_equal(whole, blocked)


def test_no_resamples_gives_no_intervals():
    probs, targets = synthetic_split(50, n_classes=2)
    per_class, mean_ci = bootstrap_ci(probs, targets, labels_for(2), n_resamples=0)
    assert per_class == {"class_0": None, "class_1": None} and mean_ci is None


# ---------------------------------------------------------------- split summary

def test_evaluate_split_is_plain_json():
    probs, targets = synthetic_split(300, n_classes=14, prevalence=0.1, seed=9)
    targets[:, 13] = 0.0    # Hernia absent from this split
    result = evaluate_split(torch.tensor(probs), torch.tensor(targets), FINDINGS, n_resamples=100)
    assert set(result) == {"mean_auc", "mean_auc_ci95", "per_class", "ci95",
                           "n_images", "n_positive"}
    assert result["n_images"] == 300 and type(result["n_images"]) is int
    assert result["per_class"]["Hernia"] is None and result["ci95"]["Hernia"] is None
    assert type(result["mean_auc"]) is float
    assert all(type(v) is float for v in result["mean_auc_ci95"])
    assert all(type(v) is int for v in result["n_positive"].values())
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result


# ---------------------------------------------------------------- report

def report_input(mean=0.8345, mean_ci=(0.8301, 0.8390)):
    return {
        "mean_auc": mean,
        "mean_auc_ci95": list(mean_ci) if mean_ci else None,
        "per_class": {"Atelectasis": 0.82341, "Cardiomegaly": 0.89558,
                      "Pleural_Thickening": None, "Hernia": 0.9},
        "ci95": {},
        "n_images": 25596,
        "n_positive": {},
    }


def test_format_report_layout():
    expected = "\n".join([
        "== test (25596 images) ==",
        "ROC AUC Labels:",
        "  Atelectasis        : 0.8234",
        "  Cardiomegaly       : 0.8956",
        "  Pleural_Thickening : n/a",
        "  Hernia             : 0.9000",
        "",
        "Mean AUC Score: 0.8345  (95% CI 0.8301-0.8390)",
    ])
    assert format_report("test", report_input()) == expected


def test_format_report_without_interval_or_mean():
    without_ci = format_report("valid", report_input(mean_ci=None))
    assert without_ci.splitlines()[-1] == "Mean AUC Score: 0.8345"
    without_mean = format_report("valid", report_input(mean=None))
    assert without_mean.splitlines()[-1] == "Mean AUC Score: n/a"


def test_format_report_on_all_findings():
    probs, targets = synthetic_split(200, n_classes=14, prevalence=0.2, seed=1)
    result = evaluate_split(probs, targets, FINDINGS, n_resamples=20)
    lines = format_report("valid", result).splitlines()
    assert lines[0] == "== valid (200 images) =="
    assert lines[1] == "ROC AUC Labels:"
    body = lines[2:16]
    assert [line.split(":")[0].strip() for line in body] == FINDINGS
    assert body[0].startswith("  Atelectasis        : ")
    assert len({line.index(":") for line in body}) == 1          # one column
    assert all(len(line.split(": ")[1]) == 6 for line in body)   # 0.xxxx
    assert lines[16] == ""
    assert lines[17].startswith("Mean AUC Score: ") and "(95% CI " in lines[17]


# ---------------------------------------------------------------- files

def test_write_json_atomic_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"valid": {"mean_auc": 0.8, "per_class": {"A": None}}})
    write_json_atomic(path, {"valid": {"mean_auc": 0.9}})        # overwrite
    assert json.loads(path.read_text()) == {"valid": {"mean_auc": 0.9}}
    assert os.listdir(path.parent) == ["metrics.json"]


def test_json_with_nan_is_refused_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"bad": float("nan")})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_interrupted_write_leaves_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "preds.pt"
    path.write_bytes(b"old")

    def fail_half_way(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            fail_half_way(handle)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["preds.pt"]


def test_predictions_round_trip_with_weights_only(tmp_path):
    probs, targets = synthetic_split(6, n_classes=14, seed=0)
    names = [f"{i:08d}_000.png" for i in range(6)]
    path = tmp_path / "exp_predictions.pt"
    save_predictions(path, torch.tensor(probs, dtype=torch.float64), targets, FINDINGS, names,
                     ["valid"] * 3 + ["test"] * 3)
    assert os.listdir(tmp_path) == ["exp_predictions.pt"]

    loaded = load_predictions(path)   # torch.load(weights_only=True) inside
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"probs", "targets", "labels", "image_index", "split"}
    assert loaded["probs"].dtype == torch.float32 and loaded["targets"].dtype == torch.float32
    assert torch.allclose(loaded["probs"], torch.tensor(probs, dtype=torch.float32))
    assert torch.equal(loaded["targets"], torch.tensor(targets))
    assert loaded["labels"] == FINDINGS
    assert loaded["image_index"] == names
    assert loaded["split"] == ["valid"] * 3 + ["test"] * 3


def test_single_split_name_applies_to_every_image(tmp_path):
    path = tmp_path / "p.pt"
    save_predictions(path, np.zeros((3, 2)), np.zeros((3, 2)), ["A", "B"], ["a", "b", "c"], "test")
    assert load_predictions(path)["split"] == ["test"] * 3


def test_inconsistent_predictions_are_refused(tmp_path):
    zeros = np.zeros((3, 2))
    with pytest.raises(ValueError, match="image names"):
        save_predictions(tmp_path / "p.pt", zeros, zeros, ["A", "B"], ["a"], "test")
    with pytest.raises(ValueError, match="labels"):
        save_predictions(tmp_path / "p.pt", zeros, zeros, ["A"], ["a", "b", "c"], "test")
    assert os.listdir(tmp_path) == []


def test_load_predictions_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_predictions(tmp_path / "missing.pt")
    other = tmp_path / "weights.pt"
    torch.save({"probs": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="missing targets"):
        load_predictions(other)


def test_mean_interval_survives_a_class_with_a_single_positive():
    """A rare class with one positive is undefined in about a third of the resamples; the mean's
    interval must still come from (nearly) all resamples and bracket the point estimate."""
    rng = np.random.default_rng(5)
    n = 300
    targets = (rng.random((n, 3)) < 0.3).astype(float)
    targets[:, 2] = 0.0
    targets[7, 2] = 1.0
    probs = np.clip(targets * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    result = evaluate_split(probs, targets, ["a", "b", "rare"], n_resamples=400, seed=1)
    lo, hi = result["mean_auc_ci95"]
    assert lo < result["mean_auc"] < hi
    assert hi - lo > 0.01


def test_mean_samples_leave_out_only_the_undefined_classes():
    from cxrmem.evaluate import mean_auc_samples

    samples = np.array([[0.8, 0.6, np.nan], [0.7, np.nan, np.nan], [np.nan, np.nan, np.nan], [0.9, 0.5, 0.4]])
    scored = np.array([True, True, True])
    means = mean_auc_samples(samples, scored)
    assert means[0] == pytest.approx(0.7) and means[1] == pytest.approx(0.7)
    assert np.isnan(means[2]) and means[3] == pytest.approx(0.6)
    assert np.isnan(mean_auc_samples(samples, np.array([False, False, False]))).all()
