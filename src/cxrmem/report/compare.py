"""Compare finished runs: one table row per run, the best value of each column marked, and
with a reference run, paired tests of every other run against it.

    cxrmem compare RUN_DIR... [--split test|valid] [--out FILE.md]
                   [--reference RUN_DIR [--json FILE.json]]

Reads each run folder's ``config.yaml`` and ``metrics.json`` (through
:mod:`cxrmem.runs.folder`). The table has
the columns experiment, backbone, strategy, bank size, top_k, mean AUC,
95% CI, then one column per finding (AUC to 4 decimals, "n/a" for null).

* It is printed as Markdown on stdout; with ``--out FILE.md`` it is also
  written to FILE.md, and as CSV to FILE.csv, with a grouped bar chart of the
  AUC per finding in FILE.png. Without ``--out`` nothing is written.
* The best value of the mean-AUC column and of every finding column is
  marked -- bold in Markdown, a trailing ``*`` in CSV. Values are compared as
  printed (4 decimals), so equal-looking values are all marked; nulls never are.
* A run without metrics.json (unfinished), without the split, or with another
  label set than the first usable run is skipped with its reason on stderr.
  When no run is usable the command prints one line ``error: ...`` on stderr
  and exits with status 2.

With ``--reference RUN_DIR`` (one of the runs, or added to them) every other usable run is
compared with it on the same images of the split, read from the runs' predictions files:

* per finding, delta AUC = AUC(run) - AUC(reference), DeLong's p and Holm's adjusted p over
  the findings;
* the mean-AUC difference with a paired bootstrap:
  its 95% interval and two-sided p. Resamples, unit (patients by default) and seed are the
  reference run's ``evaluation.bootstrap_resamples``, ``evaluation.bootstrap_unit`` and
  ``data.seed``.

Both are :func:`cxrmem.evaluation.paired.compare_scores`, through :func:`compare_pair`, which a
sweep's summary uses too: the same two runs get the same figures from either.

The tables follow the comparison table on stdout and in FILE.md; ``--json FILE.json`` writes
the same figures as JSON. Runs evaluated on other images of the split (or with other targets)
than the reference are an error (one line, exit status 2), as is a run without predictions file.

The loading, ranking and formatting functions are pure (no printing) so that
tests and notebooks can call them.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

from ..config import DataConfig, EvaluationConfig
from ..evaluation.auc import make_resampler
from ..evaluation.paired import compare_scores
from ..runs.folder import RunFileError, find_predictions, load_split, read_config, read_metrics
from ..utils.commands import RERUN_TO_RESUME, add_shared_options, guarded
from ..utils.errors import UserError
from ..utils.figures import safe_plot
from ..utils.io import write_json, write_text
from . import (AUC_DECIMALS, format_auc, format_delta, format_interval, format_p, markdown_table,
                plot_auc_bars)

SPLITS = ("test", "valid")
FIXED_COLUMNS = ("experiment", "backbone", "strategy", "bank size", "top_k", "mean AUC", "95% CI")
MEAN_COLUMN = FIXED_COLUMNS.index("mean AUC")
NO_MEMORY = "-"


class SkipRun(Exception):
    """A run folder that cannot be compared; the message is the reason."""


@dataclass
class RunResult:
    """What the table needs from one run folder, for one split."""

    run_dir: Path
    experiment: str
    backbone: str
    use_memory: bool
    strategy: Optional[str]
    bank_size: Optional[int]
    top_k: Optional[int]
    mean_auc: Optional[float]
    mean_ci: Optional[List[float]]
    per_class: Dict[str, Optional[float]]
    ci95: Dict[str, Optional[List[float]]]


class Table(NamedTuple):
    """A table of plain-text cells and the (row, column) positions to mark as best."""

    header: List[str]
    rows: List[List[str]]
    marks: Set[Tuple[int, int]]


# --------------------------------------------------------------------------- loading


def load_run(run_dir, split: str) -> RunResult:
    """Read one run folder for ``split``; raise :class:`SkipRun` naming why it is unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SkipRun("not a folder")
    try:
        metrics, config = read_metrics(run_dir), read_config(run_dir)
    except RunFileError as reason:
        raise SkipRun(str(reason)) from reason
    if split not in metrics:
        present = ", ".join(sorted(metrics)) or "none"
        raise SkipRun(f"no {split!r} split in metrics.json (has: {present})")
    result = metrics[split]
    if not isinstance(result, dict) or not isinstance(result.get("per_class"), dict):
        raise SkipRun(f"metrics.json has no per_class AUCs for {split!r}")
    check_numbers(result)
    model, memory = config.get("model") or {}, config.get("memory") or {}
    use_memory = bool(memory.get("use_memory", False))
    return RunResult(
        run_dir=run_dir,
        experiment=str(config.get("experiment_name", run_dir.name)),
        backbone=str(model.get("backbone", "?")),
        use_memory=use_memory,
        strategy=str(memory.get("update_strategy", "?")) if use_memory else None,
        bank_size=memory.get("bank_size") if use_memory else None,
        top_k=memory.get("top_k") if use_memory else None,
        mean_auc=result.get("mean_auc"),
        mean_ci=result.get("mean_auc_ci95"),
        per_class=dict(result["per_class"]),
        ci95=dict(result.get("ci95") or {}),
    )


def is_auc(value) -> bool:
    """A number (not bool) or None."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_interval(value) -> bool:
    """[lo, hi] of numbers, or None."""
    return value is None or (isinstance(value, list) and len(value) == 2 and all(map(is_auc, value))
                             and None not in value)


def check_numbers(result: dict) -> None:
    """SkipRun unless the split's AUCs are numbers/None and its intervals [lo, hi]/None."""
    aucs = [result.get("mean_auc"), *result["per_class"].values()]
    intervals = [result.get("mean_auc_ci95"), *(result.get("ci95") or {}).values()]
    if not all(map(is_auc, aucs)) or not all(map(is_interval, intervals)):
        raise SkipRun("metrics.json holds values that are not AUCs")


def label_difference(reference: Sequence[str], labels: Sequence[str]) -> str:
    """Describe how ``labels`` differ from ``reference`` ('' when the sets are equal)."""
    missing = [label for label in reference if label not in labels]
    extra = [label for label in labels if label not in reference]
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else [])
    return "; ".join(parts)


def load_runs(run_dirs: Sequence, split: str) -> Tuple[List[RunResult], List[Tuple[Path, str]]]:
    """(usable runs in the given order, [(run_dir, reason)] of the skipped ones).

    The first usable run fixes the label set; a later run whose per_class
    keys differ is skipped.
    """
    runs, skipped = [], []
    for run_dir in run_dirs:
        try:
            run = load_run(run_dir, split)
            if runs:
                difference = label_difference(list(runs[0].per_class), list(run.per_class))
                if difference:
                    raise SkipRun(f"other label set than {runs[0].run_dir} ({difference})")
        except SkipRun as reason:
            skipped.append((Path(run_dir), str(reason)))
            continue
        runs.append(run)
    return runs, skipped


# --------------------------------------------------------------------------- ranking and cells


def best_rows(values: Sequence[Optional[float]]) -> Set[int]:
    """Indices of the highest value, compared as printed (ties all included, None ignored)."""
    rounded = {i: round(v, AUC_DECIMALS) for i, v in enumerate(values) if v is not None}
    if not rounded:
        return set()
    top = max(rounded.values())
    return {i for i, v in rounded.items() if v == top}


def run_names(runs: Sequence[RunResult]) -> List[str]:
    """Experiment names; a name shared by several runs gets its folder name appended."""
    names = [run.experiment for run in runs]
    return [f"{name} ({run.run_dir.name})" if names.count(name) > 1 else name
            for name, run in zip(names, runs)]


def build_table(runs: Sequence[RunResult]) -> Table:
    """The comparison table of usable runs (same label set, that of the first run)."""
    labels = list(runs[0].per_class) if runs else []
    header = [*FIXED_COLUMNS, *labels]
    rows = []
    for name, run in zip(run_names(runs), runs):
        memory = [run.strategy, str(run.bank_size), str(run.top_k)] if run.use_memory else ["none", NO_MEMORY, NO_MEMORY]
        rows.append([name, run.backbone, *memory, format_auc(run.mean_auc), format_interval(run.mean_ci),
                     *(format_auc(run.per_class[label]) for label in labels)])
    marks = {(row, MEAN_COLUMN) for row in best_rows([run.mean_auc for run in runs])}
    for offset, label in enumerate(labels):
        column = len(FIXED_COLUMNS) + offset
        marks |= {(row, column) for row in best_rows([run.per_class[label] for run in runs])}
    return Table(header, rows, marks)


# --------------------------------------------------------------------------- formats


def format_markdown(table: Table, split: str) -> str:
    """The table as GitHub Markdown under a one-line caption; marked cells in bold."""
    rows = [[f"**{c}**" if (r, i) in table.marks else c for i, c in enumerate(row)] for r, row in enumerate(table.rows)]
    lines = [f"ROC AUC on the {split} split (best of each column in bold)", "",
             *markdown_table(table.header, rows, left=MEAN_COLUMN)]
    return "\n".join(lines) + "\n"


def format_csv(table: Table) -> str:
    """The table as CSV (header line first); marked cells end with "*"."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.header)
    for r, row in enumerate(table.rows):
        writer.writerow([f"{c}*" if (r, i) in table.marks else c for i, c in enumerate(row)])
    return buffer.getvalue()


def output_paths(out: Optional[str]) -> Tuple[Optional[Path], Optional[Path], Optional[Path]]:
    """(markdown, csv, png) targets: FILE.md, FILE.csv, FILE.png, or nothing (None, None, None)."""
    if out is None:
        return None, None, None
    markdown = Path(out)
    if markdown.suffix.lower() in (".csv", ".png"):
        raise UserError(f"--out names the Markdown file (got {out}); pass e.g. --out results.md")
    return markdown, markdown.with_suffix(".csv"), markdown.with_suffix(".png")


def draw_chart(runs: Sequence[RunResult], split: str, path: Path):
    """The per-finding grouped bar chart with 95 % intervals (via safe_plot: a failure is a warning). Path or None."""
    labels = list(runs[0].per_class)
    values = [[run.per_class[label] for label in labels] for run in runs]
    errors = [interval_errors([run.per_class[label] for label in labels], [run.ci95.get(label) for label in labels])
              for run in runs]
    return safe_plot(plot_auc_bars, run_names(runs), labels, values, path,
                     f"ROC AUC per finding, {split} split (95 % intervals)", errors=errors)


def interval_errors(values, intervals) -> np.ndarray:
    """[2, L] distances below/above each value from its [lo, hi] interval (0 where either is missing)."""
    errors = np.zeros((2, len(values)))
    for i, (value, interval) in enumerate(zip(values, intervals)):
        if interval is not None and value is not None:
            errors[0, i] = max(0.0, value - float(interval[0]))
            errors[1, i] = max(0.0, float(interval[1]) - value)
    return errors


# --------------------------------------------------------------------------- paired comparison


class Evaluated(NamedTuple):
    """One run's predictions on one split, in image-name order."""

    run_dir: Path
    names: List[str]
    targets: np.ndarray   # [N, C]
    probs: np.ndarray     # [N, C]
    labels: List[str]
    patients: List[str]   # the patient of every image, as the predictions file gives it


class Bootstrap(NamedTuple):
    """How the paired bootstrap resamples: the reference run's settings."""

    unit: str
    resamples: int
    seed: int


def load_evaluated(run_dir: Path, split: str) -> Evaluated:
    """The ``split`` rows of a run's predictions file; UserError when there are none."""
    source = find_predictions(run_dir)
    if source is None:
        raise UserError(f"{run_dir} has no predictions file (*_predictions.pt) to compare; evaluate it with "
                        f"evaluation.save_predictions: true")
    rows = load_split(source, split, "compare on a split the runs were evaluated on")
    return Evaluated(Path(run_dir), rows.names, rows.targets, rows.probs, rows.labels, rows.patients)


def check_same_images(reference: Evaluated, other: Evaluated, split: str) -> None:
    """UserError unless ``other`` was evaluated on the reference's images, labels and targets."""
    if other.names != reference.names:
        missing = len(set(reference.names) - set(other.names))
        extra = len(set(other.names) - set(reference.names))
        raise UserError(f"{other.run_dir} was evaluated on other {split} images than the reference "
                        f"{reference.run_dir} ({missing} missing, {extra} extra); compare runs evaluated on the "
                        f"same data and split")
    if other.labels != reference.labels or not np.array_equal(other.targets, reference.targets, equal_nan=True):
        raise UserError(f"{other.run_dir} has other labels or targets than the reference {reference.run_dir} on the "
                        f"same {split} images; compare runs of the same data set")


def bootstrap_settings(run_dir: Path) -> Bootstrap:
    """The reference run's bootstrap settings from its config.yaml (the schema's defaults where absent)."""
    config = read_config(run_dir)
    evaluation, data = config.get("evaluation") or {}, config.get("data") or {}
    defaults = EvaluationConfig()
    return Bootstrap(str(evaluation.get("bootstrap_unit", defaults.bootstrap_unit)),
                     int(evaluation.get("bootstrap_resamples", defaults.bootstrap_resamples)),
                     int(data.get("seed", DataConfig().seed)))


def compare_pair(reference: Evaluated, other: Evaluated, bootstrap: Bootstrap) -> dict:
    """``other`` against ``reference`` (:func:`cxrmem.evaluation.paired.compare_scores`), resampled as the
    reference run's settings say."""
    resampler = make_resampler(bootstrap.unit, reference.patients)
    return compare_scores(reference.targets, reference.probs, other.probs, reference.labels, bootstrap.resamples,
                          bootstrap.seed, resampler=resampler)


def paired_comparison(runs: Sequence[RunResult], reference_dir: Path, split: str) -> dict:
    """Every run of ``runs`` but the reference against the reference (the --json content)."""
    names = dict(zip((run.run_dir.resolve() for run in runs), run_names(runs)))
    reference = load_evaluated(reference_dir, split)
    bootstrap = bootstrap_settings(reference_dir)
    compared = []
    for run in runs:
        if run.run_dir.resolve() == reference_dir.resolve():
            continue
        other = load_evaluated(run.run_dir, split)
        check_same_images(reference, other, split)
        compared.append({"run_dir": str(run.run_dir), "name": names[run.run_dir.resolve()],
                         **compare_pair(reference, other, bootstrap)})
    return {
        "split": split,
        "reference": {"run_dir": str(reference_dir), "name": names[reference_dir.resolve()]},
        "n_images": len(reference.names),
        "n_patients": len(set(reference.patients)),
        "bootstrap": {**bootstrap._asdict(), "level": 0.95},
        "runs": compared,
    }


def format_comparison(comparison: dict) -> str:
    """The --reference tables as Markdown: the mean-AUC differences, then one table per run."""
    boot = comparison["bootstrap"]
    reference = comparison["reference"]["name"]
    lines = [f"Against the reference {reference} on the {comparison['split']} split ({comparison['n_images']} images, "
             f"{comparison['n_patients']} patients): differences run - reference; paired bootstrap over "
             f"{boot['unit']}s ({boot['resamples']} resamples); DeLong per finding, Holm over the findings", ""]
    lines += markdown_table(["run", "Δ mean AUC", "95% CI", "p (bootstrap)"],
                            [[run["name"], format_delta(run["delta_mean_auc"]),
                              format_interval(run["delta_mean_auc_ci95"]), format_p(run["p_bootstrap"])]
                             for run in comparison["runs"]])
    for run in comparison["runs"]:
        lines += ["", f"{run['name']} - {reference} per finding", ""]
        lines += markdown_table(["finding", "AUC reference", "AUC", "Δ AUC", "p DeLong", "p Holm"],
                                [[label, format_auc(r["auc_reference"]), format_auc(r["auc"]), format_delta(r["delta_auc"]),
                                  format_p(r["p_delong"]), format_p(r["p_holm"])]
                                 for label, r in run["per_class"].items()])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrmem-compare", description="Compare the AUCs of finished runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.json)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to compare (default: test)")
    parser.add_argument("--out", metavar="FILE.md",
                        help="write the table to FILE.md and FILE.csv, the chart to FILE.png "
                             "(default: print only, write nothing)")
    parser.add_argument("--reference", metavar="RUN_DIR",
                        help="compare every other run with this one on the same images: DeLong and Holm per finding, "
                             "paired bootstrap of the mean AUC (reads the runs' predictions files)")
    parser.add_argument("--json", metavar="FILE.json", help="with --reference: write the comparison as JSON")
    return add_shared_options(parser, "debug")


def compare(run_dirs: Sequence, split: str, out: Optional[str], reference: Optional[str] = None,
            json_path: Optional[str] = None) -> int:
    """Load, report skips on stderr, print and write the outputs. Raises UserError if no run is usable,
    or if the reference is not."""
    markdown_path, csv_path, png_path = output_paths(out)
    if json_path is not None and reference is None:
        raise UserError("--json writes the comparison with a reference run; add --reference RUN_DIR")
    if reference is not None and Path(reference).resolve() not in {Path(d).resolve() for d in run_dirs}:
        run_dirs = [reference, *run_dirs]
    runs, skipped = load_runs(run_dirs, split)
    if not runs:
        reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped)
        raise UserError(f"no usable run for the {split} split ({reasons}); pass finished run folders")
    if reference is not None and Path(reference).resolve() not in {run.run_dir.resolve() for run in runs}:
        reason = dict((path.resolve(), why) for path, why in skipped).get(Path(reference).resolve(), "unusable")
        raise UserError(f"the reference {reference} cannot be compared ({reason}); pass a finished run as --reference")
    comparison = None if reference is None else paired_comparison(runs, Path(reference), split)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    table = build_table(runs)
    markdown = format_markdown(table, split)
    if comparison is not None:
        markdown += "\n" + format_comparison(comparison)
    print(markdown, end="")
    if markdown_path is not None:
        write_text(markdown_path, markdown)
        write_text(csv_path, format_csv(table))
        print(f"wrote {markdown_path} and {csv_path}", file=sys.stderr)
    if json_path is not None:
        write_json(Path(json_path), comparison)
        print(f"wrote {json_path}", file=sys.stderr)
    if png_path is not None and draw_chart(runs, split, png_path) is not None:
        print(f"wrote {png_path}", file=sys.stderr)
    if markdown_path is None:
        print("(printed only: --out FILE.md writes the table, its CSV and a chart)", file=sys.stderr)
    return 0


@guarded(interrupted=RERUN_TO_RESUME)
def main(argv) -> int:
    """Entry point of ``cxrmem-compare``: exit status 0, or 2 with ``error: ...`` on stderr."""
    args = build_parser().parse_args([str(a) for a in argv])
    return compare(args.run_dirs, args.split, args.out, args.reference, args.json)


if __name__ == "__main__":
    sys.exit(main())
