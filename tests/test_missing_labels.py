"""A missing label (NaN target) is left out of the loss and of every figure, never counted as a negative.

Each figure on targets with NaN is checked against the same figure computed independently
(scikit-learn, or counting by hand) on the images that are labelled for that finding.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrmem.evaluation.auc import (ImageResampler, auprc, bootstrap_ci, build_rank_index, per_class_auc, prevalence,
                                   weighted_auc)
from cxrmem.evaluation.calibration import calibration_bins, expected_calibration_error
from cxrmem.evaluation.paired import delong_per_class, delong_test, paired_bootstrap
from cxrmem.evaluation.thresholds import at_threshold, operating_points
from cxrmem.report import evaluate_split
from cxrmem.train.losses import build_loss

LABELS = ["a", "b", "c"]


@pytest.fixture
def scored():
    """200 images, 3 findings: scores that track the labels; 'b' missing for a third of the images,
    'c' missing for the first 150."""
    rng = np.random.default_rng(5)
    targets = (rng.random((200, 3)) < 0.3).astype(float)
    probs = np.clip(0.35 * targets + 0.65 * rng.random((200, 3)), 0, 1)
    targets[rng.random(200) < 1 / 3, 1] = np.nan
    targets[:150, 2] = np.nan
    return probs, targets


def labelled(targets, c):
    return np.isfinite(targets[:, c])


def test_auc_auprc_and_prevalence_use_only_the_labelled_images(scored):
    probs, targets = scored
    aucs, aps, shares = per_class_auc(probs, targets, LABELS), auprc(probs, targets, LABELS), prevalence(targets, LABELS)
    for c, name in enumerate(LABELS):
        rows = labelled(targets, c)
        assert aucs[name] == pytest.approx(roc_auc_score(targets[rows, c], probs[rows, c]), abs=1e-12)
        assert aps[name] == pytest.approx(average_precision_score(targets[rows, c], probs[rows, c]), abs=1e-12)
        assert shares[name] == pytest.approx(targets[rows, c].mean())
    # counting the missing as negatives would change the AUC of 'c'
    as_negatives = np.nan_to_num(targets)
    assert per_class_auc(probs, as_negatives, LABELS)["c"] != pytest.approx(aucs["c"], abs=1e-6)


def test_a_finding_missing_for_every_image_has_no_figure(scored):
    probs, targets = scored
    targets = targets.copy()
    targets[:, 0] = np.nan
    result = evaluate_split(probs, targets, LABELS, n_resamples=20, seed=0)
    assert result["per_class"]["a"] is None and result["ci95"]["a"] is None
    assert result["n_labelled"] == {"a": 0, "b": int(labelled(targets, 1).sum()), "c": 50}
    assert result["mean_auc"] == pytest.approx(np.mean([result["per_class"]["b"], result["per_class"]["c"]]))


def test_weighted_auc_with_missing_labels_equals_the_auc_of_the_labelled_images(scored):
    probs, targets = scored
    weights = ImageResampler(200)(np.random.default_rng(1), 25)
    rows = labelled(targets, 2)
    y = targets[:, 2]
    full = weighted_auc(build_rank_index(probs[:, 2], y > 0.5, y <= 0.5), weights)
    subset = weighted_auc(build_rank_index(probs[rows, 2], y[rows] > 0.5, y[rows] <= 0.5), weights[:, rows])
    np.testing.assert_array_equal(full, subset)


def test_bootstrap_intervals_ignore_the_missing_images(scored):
    """With 'c' labelled on 50 images only, every class still gets an interval around its AUC
    (the equality per resample is the test above)."""
    probs, targets = scored
    per_class, mean = bootstrap_ci(probs, targets, LABELS, n_resamples=50, seed=2)
    assert all(per_class[n] is not None for n in LABELS) and mean is not None
    lo, hi = per_class["c"]
    assert lo <= per_class_auc(probs, targets, LABELS)["c"] <= hi


def test_thresholds_and_figures_at_them_count_only_the_labelled(scored):
    probs, targets = scored
    thresholds = operating_points(probs, targets, "youden")
    figures = at_threshold(probs, targets, thresholds, LABELS)
    for c, name in enumerate(LABELS):
        rows = labelled(targets, c)
        called, truth = probs[rows, c] >= thresholds[c], targets[rows, c] > 0.5
        assert figures[name]["sensitivity"] == pytest.approx((called & truth).sum() / truth.sum())
        assert figures[name]["specificity"] == pytest.approx((~called & ~truth).sum() / (~truth).sum())
        assert thresholds[c] == operating_points(probs[rows][:, [c]], targets[rows][:, [c]], "youden")[0]


def test_calibration_counts_only_the_labelled(scored):
    probs, targets = scored
    ece = expected_calibration_error(probs, targets, 10, LABELS)
    rows = labelled(targets, 2)
    assert ece["per_class"]["c"] == pytest.approx(calibration_bins(probs[rows, 2], targets[rows, 2] > 0.5, 10).ece)
    known = np.isfinite(targets)
    assert ece["pooled"] == pytest.approx(calibration_bins(probs[known], targets[known] > 0.5, 10).ece)


def test_paired_tests_leave_the_missing_out(scored):
    probs, targets = scored
    other = np.clip(probs + np.random.default_rng(3).normal(0, 0.1, probs.shape), 0, 1)
    per_class = delong_per_class(targets, probs, other, LABELS)
    rows = labelled(targets, 2)
    direct = delong_test(targets[rows, 2], probs[rows, 2], other[rows, 2])
    assert per_class["c"]["p"] == pytest.approx(direct.p) and per_class["c"]["n_neg"] == direct.n_neg
    paired = paired_bootstrap(targets, probs, other, n_resamples=50, seed=0)
    expected = np.mean(list(per_class_auc(other, targets).values())) - np.mean(list(per_class_auc(probs, targets).values()))
    assert paired.delta == pytest.approx(expected)


@pytest.mark.parametrize("name", ["bce", "asl", "focal"])
def test_a_missing_label_gets_no_loss_and_no_gradient(name):
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    targets = (torch.rand(6, 4) < 0.4).float()
    targets[:3, 1] = float("nan")  # finding 1 missing for the first three images (their data set lacks it)
    targets[5, 3] = float("nan")
    loss = build_loss(name)
    value = loss(logits, targets)
    value.backward()
    known = ~torch.isnan(targets)
    assert torch.isfinite(value)
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    # the mean runs over the known elements: the loss of the known ones alone, averaged
    element = build_loss(name, reduction="none")
    direct = element(logits.detach()[known].view(1, -1), targets[known].view(1, -1)).mean()
    assert value.item() == pytest.approx(direct.item(), rel=1e-6)
    assert torch.isfinite(element(logits.detach(), targets)).all()
