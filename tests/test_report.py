"""cxrmem.report: metrics.json, the predictions file, the terminal report, the figures of a run."""

from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

import cxrmem.train.figures
from cxrmem import report
from cxrmem.data.chestxray14 import SUBGROUPS
from cxrmem.runs.folder import read_operating_points
from cxrmem.train.figures import plot_lr_find
from cxrmem.utils.errors import UserError
from cxrmem.utils.io import atomic_path
from cxrmem.config import from_dict
from cxrmem.data.chestxray14 import load_frame, patient_ids
from cxrmem.evaluation.thresholds import FIGURES, operating_points
from cxrmem.evaluation.auc import PatientResampler
from cxrmem.evaluation.subgroups import subgroup_auc
from cxrmem.runs.folder import RunFileError, load_predictions, read_config, read_metrics, save_predictions, write_metrics
from cxrmem.report import evaluate_split, format_report

from helpers import synthetic_split

FINDINGS = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
    "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
    "Cardiomegaly", "Nodule", "Mass", "Hernia",
]

# ---------------------------------------------------------------- split summary

def test_undefined_classes_in_the_split_summary():
    # As in test_metrics: A and B perfectly ranked, one class without positive, one without negative.
    targets = np.array([[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=float)
    probs = np.array([[0.9, 0.2, 0.5, 0.5], [0.8, 0.9, 0.4, 0.6],
                      [0.1, 0.7, 0.3, 0.7], [0.2, 0.1, 0.2, 0.8]])
    labels = ["A", "B", "no_positive", "no_negative"]
    result = evaluate_split(probs, targets, labels, n_resamples=50)
    assert result["mean_auc"] == 1.0
    assert result["per_class"] == {"A": 1.0, "B": 1.0, "no_positive": None, "no_negative": None}
    assert result["ci95"]["no_positive"] is None
    assert result["ci95"]["no_negative"] is None
    assert result["n_positive"] == {"A": 2, "B": 2, "no_positive": 0, "no_negative": 4}


def test_evaluate_split_is_plain_json():
    probs, targets = synthetic_split(300, n_classes=14, prevalence=0.1, seed=9)
    targets[:, 13] = 0.0    # Hernia absent from this split
    result = evaluate_split(torch.tensor(probs), torch.tensor(targets), FINDINGS, n_resamples=100)
    assert set(result) == {"mean_auc", "mean_auc_ci95", "per_class", "ci95", "n_images", "n_positive", "n_labelled",
                           "bootstrap_unit", "operating_point", "thresholds", "at_threshold", "at_threshold_ci95",
                           "auprc", "prevalence", "ece", "subgroups"}
    assert result["n_images"] == 300 and type(result["n_images"]) is int
    assert result["per_class"]["Hernia"] is None and result["ci95"]["Hernia"] is None
    assert type(result["mean_auc"]) is float
    assert all(type(v) is float for v in result["mean_auc_ci95"])
    assert all(type(v) is int for v in result["n_positive"].values())
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result


def metadata_frame(names, seed=0):
    """A data frame as load_frame gives it: image names with sex, age (text, one unreadable) and view."""
    rng = np.random.default_rng(seed)
    n = len(names)
    ages = [str(a) for a in rng.integers(5, 95, size=n)]
    ages[0] = "412"
    return pd.DataFrame({"image_index": names, "patient_gender": rng.choice(["M", "F"], size=n),
                         "patient_age": ages, "view_position": rng.choice(["PA", "AP"], size=n)})


def test_evaluate_split_figures_against_sklearn():
    probs, targets = synthetic_split(400, n_classes=3, prevalence=0.25, seed=5, decimals=2)
    labels = ["a", "b", "c"]
    point = {"rule": "youden", "split": "valid", "thresholds": {"a": 0.55, "b": 0.7, "c": None}}
    meta = metadata_frame([f"{i:08d}_000.png" for i in range(400)]).drop(columns="image_index")
    result = evaluate_split(probs, targets, labels, n_resamples=40, seed=1, operating_point=point, metadata=meta)

    assert result["operating_point"] == {"rule": "youden", "split": "valid"}
    assert result["thresholds"] == point["thresholds"] and result["bootstrap_unit"] == "image"
    for c, label in enumerate(labels):
        y = targets[:, c] > 0.5
        assert result["prevalence"][label] == pytest.approx(y.mean())
        assert result["auprc"][label] == pytest.approx(average_precision_score(y, probs[:, c]))
        threshold = point["thresholds"][label]
        if threshold is None:
            assert set(result["at_threshold"][label].values()) == {None}
            assert set(result["at_threshold_ci95"][label].values()) == {None}
            continue
        tn, fp, fn, tp = confusion_matrix(y, probs[:, c] >= threshold).ravel()
        expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp),
                    "npv": tn / (tn + fn), "f1": f1_score(y, probs[:, c] >= threshold)}
        assert result["at_threshold"][label] == pytest.approx(expected)
        for name, (lo, hi) in result["at_threshold_ci95"][label].items():
            assert lo <= expected[name] <= hi
    # ECE by hand: ten equal-width bins of each column, |mean prob - fraction positive| weighted by size.
    for c, label in enumerate(labels):
        bins = np.minimum((probs[:, c] * 10).astype(int), 9)
        gaps = [abs(probs[bins == b, c].mean() - targets[bins == b, c].mean()) * (bins == b).sum()
                for b in range(10) if (bins == b).any()]
        assert result["ece"]["per_class"][label] == pytest.approx(sum(gaps) / 400)
    men = meta["patient_gender"].to_numpy() == "M"
    entry = result["subgroups"]["sex"]["M"]
    assert entry["n_images"] == men.sum()
    assert entry["per_class"] == pytest.approx({label: roc_auc_score(targets[men, c], probs[men, c])
                                                for c, label in enumerate(labels)})
    assert sum(group["n_images"] for group in result["subgroups"]["age"].values()) == 399   # age 412 unreadable
    assert list(result["subgroups"]["view"]) == ["PA", "AP"]


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


def test_findings_with_fewer_than_ten_positives_are_flagged_in_both_reports():
    probs, targets = synthetic_split(300, n_classes=14, prevalence=0.2, seed=4)
    targets[:, 13] = 0.0
    targets[[5, 9], 13] = 1.0                      # Hernia: 2 positives
    targets[:, 6] = 0.0
    targets[np.arange(9) * 30, 6] = 1.0            # Fibrosis: 9, still too few
    targets[:, 0] = 0.0
    targets[np.arange(10) * 30, 0] = 1.0           # Atelectasis: 10, enough
    targets[:, 1] = 0.0                            # Consolidation: none, no AUC at all (n/a, not flagged)
    result = evaluate_split(probs, targets, FINDINGS, n_resamples=20)
    printed = format_report("test", result).splitlines()
    line = {l.split(":")[0].strip(): l for l in printed[2:16]}
    assert line["Hernia"].endswith("† 2 positives") and line["Fibrosis"].endswith("† 9 positives")
    assert "†" not in line["Atelectasis"] and "†" not in line["Consolidation"]
    assert sum("†" in l for l in printed[2:16]) == 2
    assert any(l.startswith("† fewer than 10 positives in this split") for l in printed)
    markdown = "\n".join(report.split_markdown("test", result))
    assert "| Hernia † | 2 |" in markdown and "| Fibrosis † | 9 |" in markdown
    assert "| Atelectasis | 10 |" in markdown and "| Consolidation | 0 |" in markdown
    assert "† fewer than 10 positives in this split" in markdown
    plenty_probs, plenty = synthetic_split(300, n_classes=14, prevalence=0.2, seed=4)
    assert plenty.sum(axis=0).min() >= 10
    plenty_result = evaluate_split(plenty_probs, plenty, FINDINGS, n_resamples=20)
    assert "†" not in format_report("test", plenty_result) + "\n".join(report.split_markdown("test", plenty_result))


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

def test_write_metrics_round_trip_and_no_temp_files(tmp_path):
    run_dir = tmp_path / "sub"
    path = write_metrics(run_dir, {"valid": {"mean_auc": 0.8, "per_class": {"A": None}}})
    assert path == run_dir / "metrics.json"
    write_metrics(run_dir, {"valid": {"mean_auc": 0.9}})        # overwrite
    assert json.loads(path.read_text()) == {"valid": {"mean_auc": 0.9}}
    assert read_metrics(run_dir) == {"valid": {"mean_auc": 0.9}}
    assert os.listdir(path.parent) == ["metrics.json"]


def test_json_with_nan_is_refused_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics(tmp_path, {"ok": 1})
    with pytest.raises(ValueError):
        write_metrics(tmp_path, {"bad": float("nan")})
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


def test_run_files_that_are_missing_or_unreadable_raise_run_file_error(tmp_path):
    with pytest.raises(RunFileError, match=r"no metrics\.json"):
        read_metrics(tmp_path)
    with pytest.raises(RunFileError, match=r"no config\.yaml"):
        read_config(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(RunFileError, match=r"cannot read metrics\.json \(JSONDecodeError\)"):
        read_metrics(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunFileError, match="does not hold a mapping"):
        read_config(tmp_path)
    assert report.experiment_name(tmp_path) is None
    (tmp_path / "config.yaml").write_text("experiment_name: exp\n")
    assert report.experiment_name(tmp_path) == "exp"


def test_find_predictions_prefers_the_experiment_name(tmp_path):
    assert report.find_predictions(tmp_path) is None
    (tmp_path / "old_predictions.pt").write_bytes(b"")
    assert report.find_predictions(tmp_path) == tmp_path / "old_predictions.pt"   # the only one
    (tmp_path / "other_predictions.pt").write_bytes(b"")
    assert report.find_predictions(tmp_path) is None                             # ambiguous
    (tmp_path / "config.yaml").write_text("experiment_name: exp\n")
    (tmp_path / "exp_predictions.pt").write_bytes(b"")
    assert report.find_predictions(tmp_path) == report.predictions_path(tmp_path, "exp")
    assert report.predictions_path(tmp_path, "exp") == tmp_path / "exp_predictions.pt"


# ---------------------------------------------------------------- a run's results

def fake_config(run_dir, save_predictions=True, unit="patient", rule="youden"):
    """The settings write_results reads, and nothing else."""
    return SimpleNamespace(run_dir=run_dir, experiment_name="exp",
                           model=SimpleNamespace(findings=None, num_classes=None),
                           data=SimpleNamespace(seed=4, data_dir=run_dir / "no_data", dataset="chestxray14", datasets=[]),
                           evaluation=SimpleNamespace(bootstrap_resamples=30, save_predictions=save_predictions,
                                                      bootstrap_unit=unit, operating_point=rule))


def image_names(split, n, per_patient=3):
    """ChestX-ray14-style names: ``per_patient`` follow-ups of each patient, patients unique to the split."""
    offset = {"valid": 0, "test": 50_000}[split]
    return [f"{offset + i // per_patient:08d}_{i % per_patient:03d}.png" for i in range(n)]


def two_splits():
    splits = {}
    for number, (split, n) in enumerate((("valid", 80), ("test", 120))):
        probs, targets = synthetic_split(n, n_classes=14, prevalence=0.2, seed=number)
        splits[split] = (probs.astype(np.float32), targets, image_names(split, n))
    return splits


def test_write_results_writes_metrics_predictions_and_the_report(tmp_path, capsys):
    splits = two_splits()
    metrics = report.write_results(fake_config(tmp_path), splits)

    thresholds = operating_points(splits["valid"][0], splits["valid"][1], "youden")
    point = {"rule": "youden", "split": "valid", "thresholds": dict(zip(FINDINGS, thresholds))}
    expected = {split: evaluate_split(p, t, FINDINGS, n_resamples=30, seed=4, operating_point=point,
                                      resampler=PatientResampler.from_ids([n.split("_")[0] for n in names]))
                for split, (p, t, names) in splits.items()}
    assert metrics == expected
    assert json.loads((tmp_path / "operating_points.json").read_text()) == point
    assert read_operating_points(tmp_path) == point["thresholds"]
    assert (tmp_path / "report.md").read_text() == report.format_markdown_report(expected, "exp")
    assert read_metrics(tmp_path) == json.loads(json.dumps(expected))
    printed = capsys.readouterr().out
    assert printed == "".join("\n" + format_report(split, expected[split]) + "\n" for split in ("valid", "test"))

    saved = load_predictions(tmp_path / "exp_predictions.pt")
    assert saved["split"] == ["valid"] * 80 + ["test"] * 120
    assert saved["image_index"] == splits["valid"][2] + splits["test"][2]
    assert saved["labels"] == FINDINGS
    assert torch.equal(saved["probs"], torch.from_numpy(np.concatenate([splits["valid"][0], splits["test"][0]])))


def test_write_results_without_predictions_file(tmp_path, capsys):
    probs, targets = synthetic_split(50, n_classes=14, prevalence=0.3)
    report.write_results(fake_config(tmp_path, save_predictions=False), {"valid": (probs, targets, ["x"] * 50)})
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "operating_points.json", "report.md"]
    assert "== valid (50 images) ==" in capsys.readouterr().out


def test_patient_intervals_are_wider_with_repeated_patients_and_equal_with_one_image_each(tmp_path, capsys):
    # Five near-identical images per patient: resampling images treats them as independent.
    rng = np.random.default_rng(3)
    n_patients, per_patient = 90, 5
    truth = (rng.random((n_patients, 14)) < 0.3).astype(np.float32)
    score = 1 / (1 + np.exp(-(truth + rng.normal(size=truth.shape))))
    probs = 0.99 * np.repeat(score, per_patient, axis=0) + 0.01 * rng.random((n_patients * per_patient, 14))
    targets = np.repeat(truth, per_patient, axis=0)
    names = image_names("test", n_patients * per_patient, per_patient)
    runs = {unit: report.write_results(fake_config(tmp_path / unit, unit=unit), {"test": (probs, targets, names)})
            for unit in ("patient", "image")}
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    by_patient, by_image = runs["patient"]["test"], runs["image"]["test"]
    assert by_patient["bootstrap_unit"] == "patient" and by_image["bootstrap_unit"] == "image"
    assert width(by_patient["mean_auc_ci95"]) > 1.5 * width(by_image["mean_auc_ci95"])
    assert all(width(by_patient["ci95"][f]) > width(by_image["ci95"][f]) for f in FINDINGS)

    single = (probs[::per_patient], targets[::per_patient], image_names("test", n_patients, per_patient=1))
    once = {unit: report.write_results(fake_config(tmp_path / f"{unit}1", unit=unit),
                                       {"valid": single, "test": single})["test"]
            for unit in ("patient", "image")}
    assert once["patient"].pop("bootstrap_unit") == "patient" and once["image"].pop("bootstrap_unit") == "image"
    assert once["patient"]["at_threshold_ci95"]["Edema"]["sensitivity"] is not None
    assert once["patient"] == once["image"]


def test_write_results_passes_each_images_metadata_to_the_subgroups(tmp_path, capsys):
    splits = two_splits()
    names = splits["valid"][2] + splits["test"][2]
    frame = metadata_frame(names[:-5])                       # five test images unknown to the frame
    frame = frame.sample(frac=1.0, random_state=0)           # in another order than the predictions
    metrics = report.write_results(fake_config(tmp_path), splits, frame)
    probs, targets, test_names = splits["test"]
    rows = frame.set_index("image_index").reindex(test_names).reset_index(drop=True)
    expected = subgroup_auc(probs, targets, rows, SUBGROUPS, FINDINGS)
    assert metrics["test"]["subgroups"] == expected
    assert sum(g["n_images"] for g in expected["sex"].values()) == len(test_names) - 5
    printed = capsys.readouterr().out
    assert "Mean AUC by sex : F " in printed and "Mean AUC by view: PA " in printed
    assert "### AUC by subgroup" in (tmp_path / "report.md").read_text()
    # A frame without the subgroup columns (a CSV without them): no subgroups, no error.
    plain = report.write_results(fake_config(tmp_path), splits, frame[["image_index"]])
    assert plain["test"]["subgroups"] == {}


def test_without_a_validation_split_there_are_no_operating_points(tmp_path, capsys):
    (tmp_path / "operating_points.json").write_text("{}")          # left by an earlier evaluation
    probs, targets, names = two_splits()["test"]
    metrics = report.write_results(fake_config(tmp_path, rule="sensitivity:0.9"), {"test": (probs, targets, names)})
    assert not (tmp_path / "operating_points.json").exists()
    assert read_operating_points(tmp_path) is None
    test = metrics["test"]
    assert test["operating_point"] is None and set(test["thresholds"].values()) == {None}
    assert all(set(figures.values()) == {None} for figures in test["at_threshold"].values())
    assert "no operating points (no valid split" in capsys.readouterr().out


def test_operating_points_follow_the_configured_rule(tmp_path, capsys):
    splits = two_splits()
    report.write_results(fake_config(tmp_path, rule="specificity:0.8"), splits)
    chosen = read_operating_points(tmp_path)
    valid_probs, valid_targets, _ = splits["valid"]
    assert list(chosen) == FINDINGS
    for c, finding in enumerate(FINDINGS):
        negatives = valid_probs[valid_targets[:, c] < 0.5, c]
        assert (negatives < chosen[finding]).mean() >= 0.8              # specificity reached on valid
    saved = json.loads((tmp_path / "operating_points.json").read_text())
    assert (saved["rule"], saved["split"]) == ("specificity:0.8", "valid")


def test_read_operating_points_errors(tmp_path):
    assert read_operating_points(tmp_path) is None
    (tmp_path / "operating_points.json").write_text('{"rule": "youden"}')
    with pytest.raises(RunFileError, match="thresholds"):
        read_operating_points(tmp_path)
    (tmp_path / "operating_points.json").write_text('{"thresholds": {"Edema": 0.25, "Hernia": null}}')
    assert read_operating_points(tmp_path) == {"Edema": 0.25, "Hernia": None}


def test_report_keeps_the_guides_block_and_adds_a_compact_table(tmp_path):
    probs, targets = synthetic_split(150, n_classes=14, prevalence=0.2, seed=2)
    thresholds = dict(zip(FINDINGS, operating_points(probs, targets, "youden")))
    result = evaluate_split(probs, targets, FINDINGS, n_resamples=20,
                            operating_point={"rule": "youden", "split": "valid", "thresholds": thresholds},
                            metadata=metadata_frame(image_names("test", 150)))
    base = {key: result[key] for key in ("mean_auc", "mean_auc_ci95", "per_class", "ci95", "n_images", "n_positive")}
    lines = format_report("test", result).splitlines()
    assert lines[:18] == format_report("test", base).splitlines()      # ROC AUC Labels: ... Mean AUC Score:
    assert lines[18] == ""
    assert lines[19] == "At the operating points (youden, chosen on the valid split; intervals in report.md):"
    assert lines[20].split() == ["threshold", "sens", "spec", "PPV", "NPV", "F1", "AUPRC", "prev", "ECE"]
    for finding, line in zip(FINDINGS, lines[21:35]):
        name, cells = line.split(":")
        figures = result["at_threshold"][finding]
        assert name.strip() == finding
        assert cells.split() == [f"{thresholds[finding]:.4f}", *(f"{figures[k]:.3f}" for k in FIGURES),
                                 f"{result['auprc'][finding]:.3f}", f"{result['prevalence'][finding]:.3f}",
                                 f"{result['ece']['per_class'][finding]:.3f}"]
    assert lines[35] == f"ECE (all findings pooled, 10 bins): {result['ece']['pooled']:.4f}"
    assert [line.split(":")[0] for line in lines[36:]] == ["Mean AUC by sex ", "Mean AUC by age ", "Mean AUC by view"]

    markdown = report.format_markdown_report({"test": result}, "exp")
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| finding | positives | prevalence | AUC | AUPRC | threshold | sens | spec |")
    hernia = next(line for line in table if line.startswith("| Hernia |"))
    cells = [cell.strip() for cell in hernia.strip("|").split("|")]
    lo, hi = result["at_threshold_ci95"]["Hernia"]["sensitivity"]
    assert cells[6] == f"{result['at_threshold']['Hernia']['sensitivity']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert cells[3] == (f"{result['per_class']['Hernia']:.4f} [{result['ci95']['Hernia'][0]:.4f}, "
                        f"{result['ci95']['Hernia'][1]:.4f}]")
    groups = [line.split("|")[1].strip() for line in table if line.split("|")[1].strip().startswith(("sex", "age", "view"))]
    assert groups == ["sex F", "sex M", "age <40", "age 40-59", "age 60+", "view PA", "view AP"]


def test_patient_ids_from_image_names_and_metadata_in_the_frame(tiny_data):
    assert patient_ids(["00000013_005.png", "00000013_000.png", "00030805_000.png"]).tolist() == \
        ["00000013", "00000013", "00030805"]
    frame, _, _ = load_frame(tiny_data, valid_pct=0.25, seed=0)
    assert set(frame["patient_gender"]) == {"M", "F"} and set(frame["view_position"]) == {"PA", "AP"}
    assert frame["patient_age"].astype(int).between(0, 120).all()
    # The patient of an image name is the CSV's Patient ID (there without its leading zeros).
    assert [p.lstrip("0") or "0" for p in patient_ids(frame["image_index"])] == frame["patient_id"].tolist()


@pytest.mark.parametrize("text", ["youden", "sensitivity:0.9", "specificity:1", "Specificity: 0.85"])
def test_config_accepts_operating_point_forms(text):
    assert from_dict({"evaluation": {"operating_point": text}}).evaluation.operating_point == text


@pytest.mark.parametrize("text", ["youdn", "sensitivity", "sensitivity:1.5", "ppv:0.9", "specificity:0"])
def test_config_refuses_other_operating_points_in_one_line(text):
    with pytest.raises(UserError) as caught:
        from_dict({"evaluation": {"operating_point": text}})
    message = str(caught.value)
    assert message.startswith("evaluation.operating_point: ") and "\n" not in message
    assert all(form in message for form in ("youden", "sensitivity:X", "specificity:X"))


def test_config_bootstrap_unit_is_patient_by_default():
    assert from_dict({}).evaluation.bootstrap_unit == "patient"
    with pytest.raises(UserError, match="bootstrap_unit"):
        from_dict({"evaluation": {"bootstrap_unit": "study"}})


# ---------------------------------------------------------------- figures

LABELS = ["Atelectasis", "Edema", "Hernia"]


def assert_png(path):
    """The file exists, PIL reads it as a PNG with a non-empty RGB(A) image."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0
        assert image.mode in ("RGB", "RGBA")
        image.verify()


def no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


HISTORY1 = """stage,epoch,train_loss,valid_loss,valid_auc,memory_fill,memory_moved,time
frozen,0,0.70,0.68,0.55,0.5,,00:10
frozen,1,0.62,0.64,0.60,1.0,0.2,00:10
unfrozen,2,0.55,0.60,0.66,1,0.1,00:12
"""
HISTORY2 = """stage,epoch,train_loss,valid_loss,valid_auc,memory_fill,memory_moved,time
unfrozen,0,0.50,0.57,0.70,1,0.001,00:20
unfrozen,1,0.47,,0.71,1,0.0008,00:20
"""
PLAIN_HISTORY = """stage,epoch,train_loss,valid_loss,valid_auc,time
frozen,0,0.70,0.68,0.55,00:10
unfrozen,1,0.60,0.62,0.63,00:10
"""


def fake_predictions(n=40, with_test=True, seed=0):
    """Made-up probabilities: Hernia has no positive, so its ROC is skipped."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    targets[:, 2] = 0
    probs = np.clip(0.6 * targets + 0.4 * rng.random(targets.shape), 0, 1).astype(np.float32)
    split = ["valid"] * (n // 2) + [("test" if with_test else "valid")] * (n - n // 2)
    return {"probs": torch.from_numpy(probs), "targets": torch.from_numpy(targets), "labels": list(LABELS),
            "image_index": [f"{i:05d}.png" for i in range(n)], "split": split}


def make_run(folder, memory=True, phase2=True, with_test=True, predictions=True):
    """A finished-looking run folder written by hand (no training)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"experiment_name": "fake", "model": {"backbone": "resnet18"},
              "memory": {"use_memory": memory, "update_strategy": "fifo", "bank_size": 16, "top_k": 3}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"valid": {"mean_auc": 0.7, "per_class": {}}}))
    if memory:
        (folder / "history_phase1.csv").write_text(HISTORY1)
        if phase2:
            (folder / "history_phase2.csv").write_text(HISTORY2)
    else:
        (folder / "history_phase1.csv").write_text(PLAIN_HISTORY)
        if phase2:
            (folder / "history_phase2.csv").write_text(PLAIN_HISTORY.replace("frozen,0", "unfrozen,0"))
    if predictions:
        torch.save(fake_predictions(with_test=with_test), folder / "fake_predictions.pt")
    return folder


# --------------------------------------------------------------------------- single figures


def test_lr_find_writes_png(tmp_path):
    lrs = np.logspace(-7, 1, 60)
    losses = 0.7 - 0.2 * np.exp(-((np.log10(lrs) + 3) ** 2)) + np.where(lrs > 1e-1, 5 * lrs, 0)
    losses[-1] = np.nan  # a diverged last step is left out
    path = plot_lr_find(lrs, losses, 1e-3, tmp_path / "lr_find_phase1.png")
    assert path == tmp_path / "lr_find_phase1.png"
    assert_png(path)
    assert no_temp_files(tmp_path)


def test_lr_find_accepts_tensors_and_no_choice(tmp_path):
    lrs = [torch.tensor(x) for x in np.logspace(-6, -1, 10)]
    losses = [torch.tensor(0.7 - 0.01 * i) for i in range(10)]
    assert_png(plot_lr_find(lrs, losses, None, tmp_path / "lr.png"))


def test_lr_find_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError):
        plot_lr_find([1e-3, 1e-2], [0.5], 1e-3, tmp_path / "lr.png")
    assert not (tmp_path / "lr.png").exists()


def test_history_writes_png_with_nan_cells(tmp_path):
    csv = tmp_path / "history_phase1.csv"
    csv.write_text(HISTORY1 + "unfrozen,3,0.5,,,1,,00:10\n")
    assert_png(report.plot_history(csv, tmp_path / "loss_phase1.png", "fake: phase 1"))


def test_history_stage_spans():
    assert report.stage_spans(["frozen", "frozen", "unfrozen", "frozen"]) == [(0, 1), (3, 3)]
    assert report.stage_spans(["unfrozen"]) == []


def test_roc_writes_png_and_skips_one_label_classes(tmp_path):
    payload = fake_predictions()
    assert_png(report.plot_roc(payload["probs"], payload["targets"], LABELS, tmp_path / "roc.png", "fake"))


def test_reliability_writes_png(tmp_path):
    preds = fake_predictions(n=60)
    path = report.plot_reliability(preds["probs"], preds["targets"], LABELS, tmp_path / "reliability.png", "t")
    assert path == tmp_path / "reliability.png"
    assert_png(path)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report.plot_reliability(preds["probs"] + 2, preds["targets"], LABELS, tmp_path / "bad.png", "t")
    assert not (tmp_path / "bad.png").exists() and no_temp_files(tmp_path)


def test_roc_rejects_label_count(tmp_path):
    payload = fake_predictions()
    with pytest.raises(ValueError):
        report.plot_roc(payload["probs"], payload["targets"], LABELS[:2], tmp_path / "roc.png", "fake")


def test_memory_writes_png_across_phases(tmp_path):
    (tmp_path / "h1.csv").write_text(HISTORY1)
    (tmp_path / "h2.csv").write_text(HISTORY2)
    path = report.plot_memory([tmp_path / "h1.csv", tmp_path / "h2.csv"], tmp_path / "memory.png")
    assert path == tmp_path / "memory.png"
    assert_png(path)


def test_memory_returns_none_without_memory_columns(tmp_path):
    (tmp_path / "h1.csv").write_text(PLAIN_HISTORY)
    assert report.plot_memory([tmp_path / "h1.csv", tmp_path / "missing.csv"], tmp_path / "memory.png") is None
    assert not (tmp_path / "memory.png").exists()


def test_figures_stay_out_of_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_lr_find([1e-4, 1e-3, 1e-2], [0.7, 0.6, 0.9], 1e-3, tmp_path / "lr.png")
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- safe_plot


def failing_plot(data, path):
    raise RuntimeError("boom")


def test_safe_plot_turns_failure_into_warning(tmp_path):
    target = tmp_path / "broken.png"
    with pytest.warns(UserWarning, match=r"could not draw .*broken\.png: RuntimeError: boom"):
        assert report.safe_plot(failing_plot, [1, 2], target) is None
    with pytest.warns(UserWarning, match=r"could not draw .*broken\.png"):
        assert report.safe_plot(failing_plot, [1, 2], path=target) is None
    assert not target.exists()


def test_safe_plot_passes_result_through(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = report.safe_plot(plot_lr_find, [1e-4, 1e-3], [0.7, 0.6], 1e-3, tmp_path / "lr.png")
    assert result == tmp_path / "lr.png"


def test_safe_plot_warns_on_bad_input(tmp_path):
    with pytest.warns(UserWarning, match="could not draw"):
        assert report.safe_plot(report.plot_history, tmp_path / "absent.csv", tmp_path / "x.png", "t") is None


# --------------------------------------------------------------------------- plot_run


def test_plot_run_memory_run_with_test_split(tmp_path):
    run = make_run(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = report.plot_run(run)
    names = {"loss_phase1.png", "loss_phase2.png", "roc_test.png", "reliability_test.png", "memory.png"}
    assert {p.name for p in written} == names
    for name in names:
        assert_png(run / name)
    assert not (run / "roc_valid.png").exists()
    assert no_temp_files(run)


def test_plot_run_without_memory_phase2_or_test(tmp_path):
    run = make_run(tmp_path / "run", memory=False, phase2=False, with_test=False)
    written = report.plot_run(run)
    assert {p.name for p in written} == {"loss_phase1.png", "roc_valid.png", "reliability_valid.png"}
    assert not (run / "memory.png").exists()


def test_plot_run_without_predictions_file(tmp_path):
    run = make_run(tmp_path / "run", predictions=False)
    assert {p.name for p in report.plot_run(run)} == {"loss_phase1.png", "loss_phase2.png", "memory.png"}


def test_plot_run_survives_broken_files(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "fake_predictions.pt").write_bytes(b"not a torch file")
    (run / "history_phase2.csv").write_text("")
    with pytest.warns(UserWarning, match="could not draw") as record:
        written = report.plot_run(run)
    messages = " ".join(str(w.message) for w in record)
    assert "roc_" in messages and "reliability_" in messages and "loss_phase2.png" in messages
    assert "loss_phase1.png" in {p.name for p in written}
    assert_png(run / "loss_phase1.png")


# --------------------------------------------------------------------------- what the figures show


@pytest.fixture
def drawn(monkeypatch):
    """The Figures the plot functions save, kept for inspection (every plot goes through report.save_figure)."""
    figures = []
    real = report.save_figure

    def keep(figure, path):
        figures.append(figure)
        return real(figure, path)

    monkeypatch.setattr(report, "save_figure", keep)
    monkeypatch.setattr(cxrmem.train.figures, "save_figure", keep)  # the LR finder's plot, drawn in training
    return figures


def boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_legends_off_the_data(figure):
    renderer = figure.canvas.get_renderer()
    legends = [(axes, axes.get_legend()) for axes in figure.axes if axes.get_legend() is not None]
    assert legends
    for owner, legend in legends:
        box = legend.get_window_extent(renderer)
        for axes in figure.axes:
            area = axes.get_window_extent(renderer) if axes is owner else axes.get_tightbbox(renderer)
            assert not boxes_overlap(box, area), (legend.get_texts()[0].get_text(), axes.get_ylabel())


def test_loss_plot_numbers_epochs_from_one_as_the_log_does(tmp_path, drawn):
    csv = tmp_path / "history_phase1.csv"
    csv.write_text(HISTORY1)
    report.plot_history(csv, tmp_path / "loss_phase1.png", "fake: phase 1")
    axes = drawn[0].axes[0]
    train = next(line for line in axes.get_lines() if line.get_label() == "train loss")
    assert list(train.get_xdata()) == [1, 2, 3]
    assert axes.get_xlim() == (0.5, 3.5)
    frozen = next(p for p in axes.patches if p.get_label() == "frozen body")
    assert frozen.get_x() == 0.5 and frozen.get_width() == 2.0  # epochs 1 and 2 were frozen
    assert_legends_off_the_data(drawn[0])


def test_memory_plot_numbers_epochs_from_one_across_the_phases(tmp_path, drawn):
    (tmp_path / "h1.csv").write_text(HISTORY1)
    (tmp_path / "h2.csv").write_text(HISTORY2)
    report.plot_memory([tmp_path / "h1.csv", tmp_path / "h2.csv"], tmp_path / "memory.png")
    fill = drawn[0].axes[0]
    assert [list(line.get_xdata()) for line in fill.get_lines() if line.get_label().startswith("phase")] == \
        [[1, 2, 3], [4, 5]]
    assert_legends_off_the_data(drawn[0])


def test_lr_finder_legend_is_off_the_curve(tmp_path, drawn):
    lrs = np.logspace(-7, 1, 60)
    plot_lr_find(lrs, 0.7 - 0.2 * np.exp(-((np.log10(lrs) + 3) ** 2)), 1e-3, tmp_path / "lr.png")
    assert_legends_off_the_data(drawn[0])


def test_reliability_is_the_pooled_curve_and_one_small_panel_per_finding(tmp_path, drawn):
    preds = fake_predictions(n=200)
    report.plot_reliability(preds["probs"], preds["targets"], LABELS, tmp_path / "reliability.png", "t")
    titles = [axes.get_title() for axes in drawn[0].axes]
    assert titles[0].startswith("all findings pooled (ECE ")
    for label in LABELS:
        panel = [axes for axes, title in zip(drawn[0].axes, titles) if title.startswith(f"{label} (ECE ")]
        assert len(panel) == 1, label
        assert len(panel[0].get_lines()) == 3  # the diagonal, the pooled curve and this finding: no tangle
        positives = int(preds["targets"][:, LABELS.index(label)].sum())
        assert f"{positives} pos.)" in panel[0].get_title()


def error_bar_tops(axes) -> list[float]:
    tops = []
    for container in axes.containers:
        if getattr(container, "errorbar", None) is not None:
            for collection in container.errorbar.lines[2]:
                tops += [max(y for _, y in segment) for segment in collection.get_segments()]
    return tops


def test_auc_bars_rise_from_chance_on_a_fixed_axis_and_never_pass_one(tmp_path, drawn):
    values = [[0.95, 0.6, None], [0.99, 0.4, 0.7]]
    errors = [np.array([[0.1, 0.1, 0.0], [0.2, 0.1, 0.0]]), np.array([[0.05, 0.3, 0.1], [0.3, 0.1, 0.1]])]
    report.plot_auc_bars(["a", "b"], ["x", "y", "z"], values, tmp_path / "bars.png", "t", errors=errors,
                         marks=[[True, False, False], [False, False, True]])
    axes = drawn[0].axes[0]
    assert axes.get_ylim()[0] == 0.0  # the same axis whatever the values: differences keep their size
    bars = [patch for patch in axes.patches]
    assert len(bars) == 5  # no bar where there is no value
    assert all(bar.get_y() == 0.5 for bar in bars)  # from chance
    assert sorted(round(bar.get_y() + bar.get_height(), 6) for bar in bars) == [0.4, 0.6, 0.7, 0.95, 0.99]
    tops = error_bar_tops(axes)
    assert tops and max(tops) <= 1.0  # SD or interval whiskers clipped at AUC 1
    assert sum(text.get_text() == "*" for text in axes.texts) == 2
    assert any(text.get_text() == "n/a" for text in axes.texts)
    assert_legends_off_the_data(drawn[0])
