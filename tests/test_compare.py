"""cxrmem.report.compare: loading, best-value marks, Markdown/CSV output, skipped runs, exit status, and the
paired comparison with a reference run (--reference, --json)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxrmem.report import compare
from cxrmem import report
from cxrmem.evaluation.auc import PatientResampler
from cxrmem.evaluation.paired import paired_bootstrap
from cxrmem.runs.folder import predictions_path, save_predictions

from helpers import direct_delong, write_fake_run

LABELS = ["Atelectasis", "Edema", "Fibrosis", "Hernia", "Mass"]
#                 Atelectasis Edema   Fibrosis Hernia Mass
AUC_A = {"Atelectasis": 0.70, "Edema": 0.65001, "Fibrosis": None, "Hernia": None, "Mass": 0.91}
AUC_B = {"Atelectasis": 0.90, "Edema": 0.64999, "Fibrosis": 0.60, "Hernia": None, "Mass": 0.80}
# best: mean -> A; Atelectasis -> B; Edema -> tie (both print 0.6500); Fibrosis -> B (A null);
#       Hernia -> nobody (both null); Mass -> A.


def write_run(folder, per_class, mean=0.8, memory=True, splits=("valid", "test"), name=None):
    """A finished run folder made by hand: config.yaml and metrics.json only."""
    config = {"experiment_name": name or folder.name, "model": {"backbone": "resnet18"},
              "memory": {"use_memory": memory, "update_strategy": "rarity", "bank_size": 64, "top_k": 5}}
    result = {"mean_auc": mean, "mean_auc_ci95": [mean - 0.02, mean + 0.02], "per_class": per_class,
              "ci95": {k: (None if v is None else [v - 0.05, min(1.0, v + 0.05)]) for k, v in per_class.items()},
              "n_images": 100, "n_positive": {k: 5 for k in per_class}}
    return write_fake_run(folder, config, metrics={split: result for split in splits})


@pytest.fixture
def two_runs(tmp_path):
    run_a = write_run(tmp_path / "run_a", AUC_A, mean=0.80, memory=True, name="memory_rarity")
    run_b = write_run(tmp_path / "run_b", AUC_B, mean=0.75, memory=False, name="baseline")
    return run_a, run_b


def column(name):
    """Index of a table column by its header."""
    return [*compare.FIXED_COLUMNS, *LABELS].index(name)


# --------------------------------------------------------------------------- pure functions


def test_table_rows_and_columns(two_runs):
    runs, skipped = compare.load_runs(two_runs, "test")
    assert skipped == []
    table = compare.build_table(runs)
    assert table.header == [*compare.FIXED_COLUMNS, *LABELS]
    assert table.header[:7] == ["experiment", "backbone", "strategy", "bank size", "top_k", "mean AUC", "95% CI"]
    assert table.rows == [
        ["memory_rarity", "resnet18", "rarity", "64", "5", "0.8000", "[0.7800, 0.8200]",
         "0.7000", "0.6500", "n/a", "n/a", "0.9100"],
        ["baseline", "resnet18", "none", "-", "-", "0.7500", "[0.7300, 0.7700]",
         "0.9000", "0.6500", "0.6000", "n/a", "0.8000"],
    ]


def test_best_marks_with_tie_and_null(two_runs):
    table = compare.build_table(compare.load_runs(two_runs, "test")[0])
    expected = {(0, column("mean AUC")), (1, column("Atelectasis")), (0, column("Edema")), (1, column("Edema")),
                (1, column("Fibrosis")), (0, column("Mass"))}
    assert table.marks == expected  # Hernia (all null) and the descriptive columns are never marked


def test_best_rows():
    assert compare.best_rows([0.5, None, 0.7, 0.70004]) == {2, 3}
    assert compare.best_rows([None, None]) == set()
    assert compare.best_rows([]) == set()


def test_markdown_bolds_the_marked_cells(two_runs):
    table = compare.build_table(compare.load_runs(two_runs, "test")[0])
    lines = compare.format_markdown(table, "test").splitlines()
    assert "test split" in lines[0]
    body = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in body[0].strip("|").split("|")]
    assert header == table.header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body[1:]]
    assert rows[0][column("mean AUC")] == "**0.8000**"
    assert rows[1][column("mean AUC")] == "0.7500"
    assert rows[0][column("Edema")] == rows[1][column("Edema")] == "**0.6500**"
    assert rows[0][column("Fibrosis")] == "n/a" and rows[1][column("Fibrosis")] == "**0.6000**"
    assert rows[0][column("Hernia")] == rows[1][column("Hernia")] == "n/a"
    assert sum(cell.startswith("**") for row in rows for cell in row) == len(table.marks)


def test_csv_matches_table(two_runs):
    table = compare.build_table(compare.load_runs(two_runs, "test")[0])
    parsed = list(csv.reader(io.StringIO(compare.format_csv(table))))
    assert parsed[0] == table.header
    expected = [[f"{c}*" if (r, i) in table.marks else c for i, c in enumerate(row)]
                for r, row in enumerate(table.rows)]
    assert parsed[1:] == expected
    assert parsed[1][column("Mass")] == "0.9100*" and parsed[2][column("Mass")] == "0.8000"


def test_unfinished_missing_split_and_other_labels_are_skipped(tmp_path, two_runs):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("experiment_name: unfinished\n")
    valid_only = write_run(tmp_path / "valid_only", AUC_A, splits=("valid",))
    other = write_run(tmp_path / "other", {"Atelectasis": 0.7, "Nodule": 0.6})
    runs, skipped = compare.load_runs([two_runs[0], unfinished, valid_only, other, two_runs[1],
                                       tmp_path / "absent"], "test")
    assert [run.experiment for run in runs] == ["memory_rarity", "baseline"]
    reasons = dict(skipped)
    assert list(reasons) == [unfinished, valid_only, other, tmp_path / "absent"]
    assert "metrics.json" in reasons[unfinished]
    assert "'test'" in reasons[valid_only]
    assert "label set" in reasons[other] and "Nodule" in reasons[other]
    assert "not a folder" in reasons[tmp_path / "absent"]


def test_malformed_metrics_are_skipped(tmp_path):
    bad = write_run(tmp_path / "bad", AUC_A)
    (bad / "metrics.json").write_text(json.dumps({"test": {"mean_auc": 0.8, "per_class": {"Atelectasis": "high"}}}))
    broken = write_run(tmp_path / "broken", AUC_A)
    (broken / "metrics.json").write_text("{not json")
    runs, skipped = compare.load_runs([bad, broken], "test")
    assert runs == [] and [path for path, _ in skipped] == [bad, broken]


def test_same_experiment_name_gets_folder_name(tmp_path):
    runs, _ = compare.load_runs([write_run(tmp_path / "x1", AUC_A, name="same"),
                                 write_run(tmp_path / "x2", AUC_B, name="same")], "valid")
    assert [row[0] for row in compare.build_table(runs).rows] == ["same (x1)", "same (x2)"]


# --------------------------------------------------------------------------- command line


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 0 and image.mode in ("RGB", "RGBA")


def test_auc_bars_writes_png_with_nulls(tmp_path):
    values = [[0.8, None, 0.6], [0.7, 0.9, None]]
    intervals = [[[0.7, 0.9], None, [0.5, 0.7]], [None, [0.85, 0.95], None]]
    errors = [compare.interval_errors(v, i) for v, i in zip(values, intervals)]
    np.testing.assert_allclose(errors[0], [[0.1, 0.0, 0.1], [0.1, 0.0, 0.1]])
    path = report.plot_auc_bars(["a", "b"], LABELS[:3], values, tmp_path / "bars.png", "t", errors=errors)
    assert path == tmp_path / "bars.png"
    assert_png(path)


def test_auc_bars_reject_values_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        report.plot_auc_bars(["a", "b"], LABELS[:3], [[0.8, 0.7, 0.6]], tmp_path / "bars.png", "t")
    assert not (tmp_path / "bars.png").exists()


def test_main_writes_markdown_csv_and_chart(tmp_path, two_runs, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    out = tmp_path / "report" / "results.md"
    status = compare.main([*two_runs, unfinished, "--out", out])
    captured = capsys.readouterr()
    assert status == 0
    assert out.read_text() == captured.out
    assert "**0.8000**" in captured.out
    assert f"skipped {unfinished}" in captured.err and "metrics.json" in captured.err
    table = compare.build_table(compare.load_runs(two_runs, "test")[0])
    assert out.with_suffix(".csv").read_text() == compare.format_csv(table)
    assert_png(out.with_suffix(".png"))


def test_main_without_out_prints_and_writes_nothing(tmp_path, two_runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert compare.main([*two_runs, "--split", "valid"]) == 0
    captured = capsys.readouterr()
    assert "valid split" in captured.out and "| baseline |" in captured.out
    assert "--out FILE.md" in captured.err
    assert sorted(tmp_path.rglob("*")) == before  # no compare.png (or anything else) in the working directory


def test_main_exits_2_with_one_line_when_no_run_is_usable(tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    valid_only = write_run(tmp_path / "valid_only", AUC_A, splits=("valid",))
    status = compare.main([unfinished, valid_only, "--out", tmp_path / "r.md"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "unfinished" in lines[0] and "valid_only" in lines[0]
    assert not (tmp_path / "r.md").exists()


def test_main_rejects_csv_as_out(tmp_path, two_runs, capsys):
    assert compare.main([*two_runs, "--out", tmp_path / "r.csv"]) == 2
    assert capsys.readouterr().err.startswith("error: --out")


# --------------------------------------------------------------------------- --reference and --json


def predictions_run(folder, probs, targets, names, resamples=200, unit="patient", seed=7, name=None):
    """A finished run with config.yaml, metrics.json and a predictions file of the test split."""
    write_run(folder, {label: 0.7 for label in LABELS}, name=name)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.update(evaluation={"bootstrap_resamples": resamples, "bootstrap_unit": unit}, data={"seed": seed})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_predictions(predictions_path(folder, config["experiment_name"]), probs, targets, LABELS, names, "test")
    return folder


def clustered_scores(seed=0, n_patients=60, per_patient=3):
    """Targets of patients with several images, a reference score and a better candidate score."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), per_patient)
    targets = (rng.random((n_patients, len(LABELS))) < 0.3).astype(np.float32)[patient]
    latent = targets + rng.normal(size=(n_patients, len(LABELS)))[patient]
    reference = 1 / (1 + np.exp(-(latent + 0.8 * rng.normal(size=targets.shape))))
    candidate = 1 / (1 + np.exp(-(latent + 0.7 * targets + 0.8 * rng.normal(size=targets.shape))))
    names = [f"{p:08d}_{i % per_patient:03d}.png" for i, p in enumerate(patient)]
    return targets, reference.astype(np.float32), candidate.astype(np.float32), names


def holm_by_hand(pvalues):
    """Holm's adjustment written out: the i-th smallest of k times (k - i + 1), running max, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def test_reference_comparison_per_finding_and_paired_bootstrap(tmp_path, capsys):
    targets, reference, candidate, names = clustered_scores()
    run_a = predictions_run(tmp_path / "ref", reference, targets, names, name="reference")
    shuffle = np.random.default_rng(1).permutation(len(names))          # same images in another order
    run_b = predictions_run(tmp_path / "cand", candidate[shuffle], targets[shuffle], [names[i] for i in shuffle],
                            name="candidate")
    out, json_path = tmp_path / "cmp.md", tmp_path / "cmp.json"
    assert compare.main([run_a, run_b, "--reference", run_a, "--out", out, "--json", json_path]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    result = json.loads(json_path.read_text())

    assert result["reference"] == {"run_dir": str(run_a), "name": "reference"}
    assert (result["split"], result["n_images"], result["n_patients"]) == ("test", 180, 60)
    assert result["bootstrap"] == {"unit": "patient", "resamples": 200, "seed": 7, "level": 0.95}
    (run,) = result["runs"]
    assert run["name"] == "candidate" and run["run_dir"] == str(run_b)
    deltas = []
    for c, label in enumerate(LABELS):
        entry = run["per_class"][label]
        auc_a, auc_b = roc_auc_score(targets[:, c], reference[:, c]), roc_auc_score(targets[:, c], candidate[:, c])
        assert entry["auc_reference"] == pytest.approx(auc_a, abs=1e-12)
        assert entry["auc"] == pytest.approx(auc_b, abs=1e-12)
        assert entry["delta_auc"] == pytest.approx(auc_b - auc_a, abs=1e-12)
        _, _, p = direct_delong(targets[:, c], reference[:, c].astype(float), candidate[:, c].astype(float))
        assert entry["p_delong"] == pytest.approx(p, abs=1e-10)
        deltas.append(auc_b - auc_a)
    assert [run["per_class"][f]["p_holm"] for f in LABELS] == pytest.approx(
        holm_by_hand([run["per_class"][f]["p_delong"] for f in LABELS]), abs=1e-15)

    assert run["delta_mean_auc"] == pytest.approx(np.mean(deltas), abs=1e-12)
    expected = paired_bootstrap(targets, reference, candidate, 200, 7,
                                resampler=PatientResampler.from_ids([n[:8] for n in names]))
    assert run["delta_mean_auc_ci95"] == pytest.approx(expected.ci, abs=1e-12)
    assert run["p_bootstrap"] == pytest.approx(expected.p) and run["resamples_used"] == expected.n_used
    assert run["delta_mean_auc"] > 0 and run["delta_mean_auc_ci95"][0] > 0     # the candidate is better

    assert "Against the reference reference on the test split (180 images, 60 patients)" in printed
    assert f"| candidate | {run['delta_mean_auc']:+.4f} |" in printed
    assert sum(line.startswith(f"| {label} |") for line in printed.splitlines() for label in LABELS) == len(LABELS)


def test_reference_outside_the_run_list_is_added_and_image_bootstrap_follows_its_config(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    targets, reference, candidate, names = clustered_scores(seed=2)
    run_a = predictions_run(tmp_path / "ref", reference, targets, names, unit="image", resamples=100, seed=3)
    run_b = predictions_run(tmp_path / "cand", candidate, targets, names)
    json_path = tmp_path / "cmp.json"
    assert compare.main([run_b, "--reference", run_a, "--json", json_path]) == 0
    result = json.loads(json_path.read_text())
    assert result["bootstrap"]["unit"] == "image" and [r["name"] for r in result["runs"]] == ["cand"]
    expected = paired_bootstrap(targets, reference, candidate, 100, 3)
    assert result["runs"][0]["delta_mean_auc_ci95"] == pytest.approx(expected.ci, abs=1e-12)
    assert "| ref |" in capsys.readouterr().out                                # in the table too
    assert not (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("damage, fragment", [
    ("other images", "other test images than the reference"),
    ("other targets", "other labels or targets"),
    ("no predictions", "no predictions file"),
])
def test_reference_comparison_refuses_runs_it_cannot_pair(tmp_path, capsys, damage, fragment):
    targets, reference, candidate, names = clustered_scores(seed=3)
    run_a = predictions_run(tmp_path / "ref", reference, targets, names)
    if damage == "other images":
        names = names[:-1] + ["99999999_000.png"]
    if damage == "other targets":
        targets = targets.copy()
        targets[0, 0] = 1 - targets[0, 0]
    run_b = predictions_run(tmp_path / "cand", candidate, targets, names)
    if damage == "no predictions":
        next(run_b.glob("*_predictions.pt")).unlink()
    json_path = tmp_path / "cmp.json"
    assert compare.main([run_a, run_b, "--reference", run_a, "--json", json_path]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert captured.out == "" and not json_path.exists()


def test_json_needs_a_reference(tmp_path, two_runs, capsys):
    assert compare.main([*two_runs, "--json", tmp_path / "cmp.json"]) == 2
    assert capsys.readouterr().err == "error: --json writes the comparison with a reference run; add --reference RUN_DIR\n"
