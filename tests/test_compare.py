"""cxrmem.compare: loading, best-value marks, Markdown/CSV output, skipped runs, exit status."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from PIL import Image

from cxrmem import compare

LABELS = ["Atelectasis", "Edema", "Fibrosis", "Hernia", "Mass"]
#                 Atelectasis Edema   Fibrosis Hernia Mass
AUC_A = {"Atelectasis": 0.70, "Edema": 0.65001, "Fibrosis": None, "Hernia": None, "Mass": 0.91}
AUC_B = {"Atelectasis": 0.90, "Edema": 0.64999, "Fibrosis": 0.60, "Hernia": None, "Mass": 0.80}
# best: mean -> A; Atelectasis -> B; Edema -> tie (both print 0.6500); Fibrosis -> B (A null);
#       Hernia -> nobody (both null); Mass -> A.


def write_run(folder, per_class, mean=0.8, memory=True, splits=("valid", "test"), name=None):
    """A finished run folder made by hand: config.yaml and metrics.json only."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"experiment_name": name or folder.name, "model": {"backbone": "resnet18"},
              "memory": {"use_memory": memory, "update_strategy": "rarity", "bank_size": 64, "top_k": 5}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = {"mean_auc": mean, "mean_auc_ci95": [mean - 0.02, mean + 0.02], "per_class": per_class,
              "ci95": {k: (None if v is None else [v - 0.05, min(1.0, v + 0.05)]) for k, v in per_class.items()},
              "n_images": 100, "n_positive": {k: 5 for k in per_class}}
    (folder / "metrics.json").write_text(json.dumps({split: result for split in splits}))
    return folder


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
    path = compare.plot_auc_bars(["a", "b"], LABELS[:3], values, tmp_path / "bars.png", "t", intervals=intervals)
    assert path == tmp_path / "bars.png"
    assert_png(path)


def test_auc_bars_reject_values_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        compare.plot_auc_bars(["a", "b"], LABELS[:3], [[0.8, 0.7, 0.6]], tmp_path / "bars.png", "t")
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


def test_main_without_out_prints_and_draws_in_cwd(tmp_path, two_runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compare.main([*two_runs, "--split", "valid"]) == 0
    captured = capsys.readouterr()
    assert "valid split" in captured.out and "| baseline |" in captured.out
    assert_png(tmp_path / "compare.png")
    assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.csv"))


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
