"""What a run writes and prints: metrics.json, the predictions file, the terminal report, the figures.

The files of a run folder that come from here::

    metrics.json                        per split: AUC with intervals, figures at the operating
                                        points, AUPRC, calibration, AUC by subgroup (plain JSON,
                                        null for undefined; keys in :func:`evaluate_split`)
    operating_points.json               {rule, split, thresholds}: one threshold per finding
    report.md                           the long tables of every split
    <experiment_name>_predictions.pt    {probs, targets, labels, image_index, split}
    loss_phase1.png, loss_phase2.png    loss and valid AUC per epoch, from the history CSVs
    roc_test.png (else roc_valid.png)   one ROC curve per finding, from the predictions
    reliability_test.png (else _valid)  reliability diagram, from the predictions
    memory.png                          bank fill and movement per epoch (runs with memory)
    lr_find_phase1.png                  drawn during training (:mod:`cxrmem.train.figures`)

Every ``plot_*`` here follows :mod:`cxrmem.utils.figures` (its own Agg figure, one PNG written
atomically, :func:`~cxrmem.utils.figures.safe_plot` where a drawing must never fail the caller, as
:func:`plot_run` does for every figure). The files' names and the run folder are :mod:`cxrmem.runs.folder`;
the statistics are :mod:`cxrmem.evaluation`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from ..data.chestxray14 import SUBGROUPS, patient_ids
from ..data.summary import SYNTHETIC_NOTE
from ..data.registry import model_findings
from ..data.synthetic import is_synthetic
from ..evaluation.auc import (ImageResampler, auprc, bootstrap_ci, check_inputs, make_resampler, mean_auc,
                              per_class_auc, prevalence)
from ..evaluation.calibration import calibration_bins, expected_calibration_error
from ..evaluation.subgroups import subgroup_auc
from ..evaluation.thresholds import FIGURES, at_threshold, bootstrap_at_threshold, operating_points
from ..runs.folder import (OPERATING_POINTS_FILE, REPORT_FILE, experiment_name, find_predictions, load_predictions,
                           predictions_path, read_metrics, save_predictions, write_metrics, write_operating_points)
from ..utils import io
from ..utils.figures import as_array, legend_outside, new_figure, palette, safe_plot, save_figure, warn_not_drawn

THRESHOLD_SPLIT = "valid"   # where the operating points are chosen
CALIBRATION_BINS = 10       # equal-width bins of the ECE and the reliability diagram
MEMORY_COLUMNS = ("memory_fill", "memory_moved")


# --------------------------------------------------------------------------- run folder


# --------------------------------------------------------------------------- metrics and report


def evaluate_split(probs, targets, labels: Sequence[str], n_resamples: int = 1000, seed: int = 0,
                   resampler=None, operating_point: Optional[dict] = None, metadata: Optional[pd.DataFrame] = None,
                   ) -> dict:
    """Everything metrics.json records for one split (plain, JSON-serialisable values).

    ``resampler``: the bootstrap unit (:mod:`cxrmem.evaluation.auc`; default the image bootstrap);
    ``operating_point``: the content of operating_points.json, or None (no thresholds);
    ``metadata``: one row per image with the columns of :data:`cxrmem.data.chestxray14.SUBGROUPS`, or None.
    Keys (95% percentile intervals over ``n_resamples`` resamples seeded with ``seed``, the same
    resamples for every interval):

    * mean_auc, mean_auc_ci95, per_class, ci95, n_images, n_positive, n_labelled (images whose label
      for the finding is known: a missing label, NaN in ``targets``, is left out of every figure);
    * bootstrap_unit ("patient" or "image");
    * operating_point {rule, split} or None; thresholds {label: t or None};
      at_threshold {label: {sensitivity, specificity, ppv, npv, f1}} and at_threshold_ci95
      {label: {figure: [lo, hi]}} at those thresholds (None without a threshold);
    * auprc {label}, prevalence {label};
    * ece {"pooled", "per_class": {label}} over CALIBRATION_BINS equal-width bins;
    * subgroups {"sex" | "age" | "view": {group: {n_images, mean_auc, per_class}}} ({} without metadata).
    """
    scores, positive, negative, labels = check_inputs(probs, targets, labels)
    targets = np.where(positive, 1.0, np.where(negative, 0.0, np.nan))  # missing labels stay missing
    resampler = resampler or ImageResampler(scores.shape[0])
    per_class = per_class_auc(scores, targets, labels)
    ci95, mean_ci95 = bootstrap_ci(scores, targets, labels, n_resamples, seed, level=0.95, resampler=resampler)
    chosen = (operating_point or {}).get("thresholds") or {}
    thresholds = [chosen.get(label) for label in labels]
    return {
        "mean_auc": mean_auc(per_class),
        "mean_auc_ci95": mean_ci95,
        "per_class": per_class,
        "ci95": ci95,
        "n_images": int(scores.shape[0]),
        "n_positive": {label: int(positive[:, c].sum()) for c, label in enumerate(labels)},
        "n_labelled": {label: int((positive | negative)[:, c].sum()) for c, label in enumerate(labels)},
        "bootstrap_unit": resampler.unit,
        "operating_point": None if operating_point is None else
        {"rule": operating_point["rule"], "split": operating_point["split"]},
        "thresholds": dict(zip(labels, thresholds)),
        "at_threshold": at_threshold(scores, targets, thresholds, labels),
        "at_threshold_ci95": bootstrap_at_threshold(scores, targets, thresholds, n_resamples, seed, 0.95, labels,
                                                    resampler),
        "auprc": auprc(scores, targets, labels),
        "prevalence": prevalence(targets, labels),
        "ece": expected_calibration_error(scores, targets, CALIBRATION_BINS, labels),
        "subgroups": {} if metadata is None else subgroup_auc(scores, targets, metadata, SUBGROUPS, labels),
    }


# ---- the numbers of every table: one spelling each

NOT_AVAILABLE = "n/a"
AUC_DECIMALS = 4


def format_number(value: Optional[float], decimals: int = 3, signed: bool = False) -> str:
    """``decimals`` decimals (a sign always with ``signed``), or 'n/a' for None."""
    if value is None:
        return NOT_AVAILABLE
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def format_auc(value: Optional[float]) -> str:
    """An AUC (or a difference of AUCs: :func:`format_delta`) to 4 decimals, 'n/a' when undefined."""
    return format_number(value, AUC_DECIMALS)


def format_delta(value: Optional[float]) -> str:
    return format_number(value, AUC_DECIMALS, signed=True)


def format_interval(interval: Optional[Sequence[float]]) -> str:
    """[lo, hi] as "[0.7012, 0.7544]", 'n/a' for None."""
    if interval is None:
        return NOT_AVAILABLE
    return f"[{format_auc(interval[0])}, {format_auc(interval[1])}]"


def format_p(p: Optional[float]) -> str:
    """A p-value to 4 decimals, "<0.0001" below that, 'n/a' for None."""
    if p is None:
        return NOT_AVAILABLE
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


#: Below this many positives in a split a finding's AUC and interval rest on too few cases: flagged.
FEW_POSITIVES = 10
FEW_MARK = "†"
FEW_NOTE = (f"{FEW_MARK} fewer than {FEW_POSITIVES} positives in this split: too few to trust this AUC or its "
            "interval, and resamples without a positive leave the finding out of the mean")


def few_positives(result: dict) -> dict[str, int]:
    """{finding: positives} of the findings with 1 to FEW_POSITIVES - 1 positives in a split's result
    (none has no AUC at all, and says so as n/a)."""
    counts = result.get("n_positive", {})
    return {f: n for f, n in counts.items() if 0 < n < FEW_POSITIVES and result["per_class"].get(f) is not None}


def format_report(split_name: str, result: dict) -> str:
    """The terminal report of one split::

        == test (25596 images) ==
        ROC AUC Labels:
          Atelectasis        : 0.8234
          ...

        Mean AUC Score: 0.8345  (95% CI 0.8301-0.8390)

    Labels are padded to one column (longest label + 1); the CI part is left
    out when there is no interval.
    """
    per_class = result["per_class"]
    width = max((len(label) for label in per_class), default=0) + 1
    few = few_positives(result)
    lines = [f"== {split_name} ({result['n_images']} images) ==", "ROC AUC Labels:"]
    lines += [f"  {label:<{width}}: {format_auc(auc)}"
              + (f"  {FEW_MARK} {few[label]} positive{'s' * (few[label] != 1)}" if label in few else "")
              for label, auc in per_class.items()]
    mean_line = f"Mean AUC Score: {format_auc(result['mean_auc'])}"
    interval = result.get("mean_auc_ci95")
    if result["mean_auc"] is not None and interval is not None:
        mean_line += f"  (95% CI {interval[0]:.4f}-{interval[1]:.4f})"
    lines += ["", mean_line]
    if few:
        lines += [FEW_NOTE]
    for name, member in result.get("by_dataset", {}).items():
        lines.append(f"  {name}: mean AUC {with_interval(member['mean_auc'], member['mean_auc_ci95'], AUC_DECIMALS)} "
                     f"({member['n_images']} images)")
    if "at_threshold" in result:
        lines += ["", *clinical_lines(result)]
    return "\n".join(lines)


# Short names of the figures at a threshold, for table headers.
FIGURE_HEADERS = {"sensitivity": "sens", "specificity": "spec", "ppv": "PPV", "npv": "NPV", "f1": "F1"}

# The compact table's columns: header -> value of one finding in a split's result.
COMPACT_COLUMNS = {
    "threshold": lambda r, f: r["thresholds"][f],
    **{FIGURE_HEADERS[name]: (lambda r, f, name=name: r["at_threshold"][f][name]) for name in FIGURES},
    "AUPRC": lambda r, f: r["auprc"][f],
    "prev": lambda r, f: r["prevalence"][f],
    "ECE": lambda r, f: r["ece"]["per_class"][f],
}


def operating_point_text(result: dict) -> str:
    """'youden, chosen on the valid split', or why there are no thresholds."""
    point = result.get("operating_point")
    if point is None:
        return f"no operating points (no {THRESHOLD_SPLIT} split to choose them on)"
    return f"{point['rule']}, chosen on the {point['split']} split"


def clinical_lines(result: dict) -> List[str]:
    """The compact part of the terminal report: figures at the operating points, AUPRC next to
    the prevalence, calibration, and the mean AUC by subgroup (intervals are in report.md)."""
    findings = list(result["per_class"])
    width = max((len(f) for f in findings), default=0) + 1
    lines = [f"At the operating points ({operating_point_text(result)}; intervals in {REPORT_FILE}):",
             f"  {'':<{width}}  " + " ".join(f"{h:>9}" if h == "threshold" else f"{h:>6}" for h in COMPACT_COLUMNS)]
    for finding in findings:
        cells = [format_number(value(result, finding), 4 if header == "threshold" else 3)
                 for header, value in COMPACT_COLUMNS.items()]
        lines.append(f"  {finding:<{width}}: " + " ".join(f"{c:>9}" if i == 0 else f"{c:>6}"
                                                          for i, c in enumerate(cells)))
    lines.append(f"ECE (all findings pooled, {CALIBRATION_BINS} bins): {format_number(result['ece']['pooled'], 4)}")
    for grouping, groups in result["subgroups"].items():
        parts = [f"{group} {format_auc(entry['mean_auc'])} ({entry['n_images']})" for group, entry in groups.items()]
        lines.append(f"Mean AUC by {grouping:<4}: " + (", ".join(parts) or "n/a"))
    return lines


# --------------------------------------------------------------------------- predictions file


# --------------------------------------------------------------------------- a run's results


def choose_operating_points(predictions: dict, rule: str, findings: Sequence[str]) -> Optional[dict]:
    """operating_points.json's content: ``rule``'s threshold per finding on the validation split's
    predictions; None when there is no validation split."""
    if THRESHOLD_SPLIT not in predictions:
        return None
    probs, targets, _ = predictions[THRESHOLD_SPLIT]
    thresholds = operating_points(probs, targets, rule)
    return {"rule": rule, "split": THRESHOLD_SPLIT, "thresholds": dict(zip(findings, thresholds))}


def metadata_rows(metadata: Optional[pd.DataFrame], image_names: Sequence[str]) -> Optional[pd.DataFrame]:
    """The subgroup columns of ``metadata`` (a frame with ``image_index``) for these images, in
    their order (empty cells for unknown images); None when the frame lacks the columns."""
    columns = [grouping.column for grouping in SUBGROUPS.values()]
    if metadata is None or not {"image_index", *columns} <= set(metadata.columns):
        return None
    by_name = metadata.drop_duplicates("image_index").set_index("image_index")[columns]
    return by_name.reindex([str(name) for name in image_names]).reset_index(drop=True)


def patients_of(metadata: Optional[pd.DataFrame], image_names: Sequence[str]) -> list:
    """The patient of every image: the data set frame's ``patient_id`` where it names the image, else the
    ChestX-ray14 rule (the name before its first '_')."""
    fallback = patient_ids(image_names)
    if metadata is None or not {"image_index", "patient_id"} <= set(metadata.columns):
        return list(fallback)
    known = metadata.drop_duplicates("image_index").set_index("image_index")["patient_id"]
    return [known.get(str(name), default) for name, default in zip(image_names, fallback)]


BY_DATASET_KEYS = ("mean_auc", "mean_auc_ci95", "per_class", "ci95", "n_images", "n_labelled")


def add_by_dataset(metrics: dict, predictions: dict, metadata: Optional[pd.DataFrame], findings: Sequence[str],
                   evaluation, seed: int, point: Optional[dict]) -> None:
    """A union's run (``metadata`` with a ``dataset`` column naming several): each split's result gets
    ``by_dataset`` {member: its AUCs with intervals on that member's images}."""
    if metadata is None or "dataset" not in metadata or metadata["dataset"].nunique() < 2:
        return
    member_of = metadata.drop_duplicates("image_index").set_index("image_index")["dataset"]
    for split, (probs, targets, names) in predictions.items():
        member = member_of.reindex([str(n) for n in names]).to_numpy()
        metrics[split]["by_dataset"] = {}
        for name in pd.unique(member):
            rows = member == name
            chosen = [n for n, keep in zip(names, rows) if keep]
            result = evaluate_split(np.asarray(probs)[rows], np.asarray(targets)[rows], findings,
                                    evaluation.bootstrap_resamples, seed,
                                    resampler=make_resampler(evaluation.bootstrap_unit, patients_of(metadata, chosen)),
                                    operating_point=point)
            metrics[split]["by_dataset"][str(name)] = {key: result[key] for key in BY_DATASET_KEYS}


def write_results(cfg, predictions: dict, metadata: Optional[pd.DataFrame] = None) -> dict:
    """metrics.json, operating_points.json, report.md, <experiment>_predictions.pt and the terminal
    report. Returns the metrics.

    ``predictions`` is {split: (probs [N, C], targets [N, C], image names)}, splits in report order;
    ``metadata`` the data set's frame (``image_index`` and the subgroup columns), or None.
    Operating points are chosen on the validation split by ``evaluation.operating_point``; the
    bootstrap draws ``evaluation.bootstrap_unit`` (patients from the data set frame's ``patient_id``, else
    from the image names).
    """
    evaluation = cfg.evaluation
    findings = model_findings(cfg)
    point = choose_operating_points(predictions, evaluation.operating_point, findings)
    if point is None:
        (Path(cfg.run_dir) / OPERATING_POINTS_FILE).unlink(missing_ok=True)  # none chosen: no stale file
    else:
        write_operating_points(cfg.run_dir, point)
    metrics = {split: evaluate_split(probs, targets, findings, evaluation.bootstrap_resamples, cfg.data.seed,
                                     resampler=make_resampler(evaluation.bootstrap_unit, patients_of(metadata, names)),
                                     operating_point=point, metadata=metadata_rows(metadata, names))
               for split, (probs, targets, names) in predictions.items()}
    add_by_dataset(metrics, predictions, metadata, findings, evaluation, cfg.data.seed, point)
    write_metrics(cfg.run_dir, metrics)
    synthetic = is_synthetic(cfg.data.data_dir) or bool(cfg.data.datasets) and \
        all(is_synthetic(m.data_dir) for m in cfg.data.datasets)
    io.write_text(Path(cfg.run_dir) / REPORT_FILE, format_markdown_report(metrics, cfg.experiment_name, synthetic))
    if evaluation.save_predictions:
        splits = list(predictions)
        save_predictions(
            predictions_path(cfg.run_dir, cfg.experiment_name),
            np.concatenate([predictions[s][0] for s in splits]),
            np.concatenate([predictions[s][1] for s in splits]),
            findings,
            [name for s in splits for name in predictions[s][2]],
            [s for s in splits for _ in predictions[s][2]],
            [p for s in splits for p in patients_of(metadata, predictions[s][2])],
        )
    for split, result in metrics.items():
        print("\n" + format_report(split, result))
    if synthetic:
        print(f"\n{SYNTHETIC_NOTE}")
    return metrics


# --------------------------------------------------------------------------- report.md


def with_interval(value: Optional[float], interval: Optional[Sequence[float]], decimals: int = 3) -> str:
    """'0.712 [0.650, 0.770]', the value alone without interval, 'n/a' without value."""
    text = format_number(value, decimals)
    if value is None or interval is None:
        return text
    return f"{text} [{format_number(interval[0], decimals)}, {format_number(interval[1], decimals)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> List[str]:
    """A GitHub Markdown table: the first ``left`` columns left-aligned, the others right-aligned;
    a ``|`` inside a cell is escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|",
            *(line(row) for row in rows)]


def split_markdown(split: str, result: dict) -> List[str]:
    """One split's section of report.md."""
    findings = list(result["per_class"])
    unit = {"patient": "patients", "image": "images"}.get(result.get("bootstrap_unit"), "images")
    lines = [f"## {split} split ({result['n_images']} images)", "",
             f"Mean AUC {with_interval(result['mean_auc'], result['mean_auc_ci95'], 4)}; "
             f"ECE over all findings {format_number(result['ece']['pooled'], 4)} ({CALIBRATION_BINS} bins). "
             f"Operating points: {operating_point_text(result)}. "
             f"Brackets: 95% percentile bootstrap intervals, resampling {unit}.", ""]
    header = ["finding", "positives", "prevalence", "AUC", "AUPRC", "threshold",
              *(FIGURE_HEADERS[name] for name in FIGURES), "ECE"]
    rows = []
    few = few_positives(result)
    for f in findings:
        figures, intervals = result["at_threshold"][f], result["at_threshold_ci95"][f]
        rows.append([f"{f} {FEW_MARK}" if f in few else f, str(result["n_positive"][f]),
                     format_number(result["prevalence"][f]),
                     with_interval(result["per_class"][f], result["ci95"].get(f), 4),
                     format_number(result["auprc"][f]), format_number(result["thresholds"][f], 4),
                     *(with_interval(figures[name], intervals[name]) for name in FIGURES),
                     format_number(result["ece"]["per_class"][f])])
    lines += markdown_table(header, rows)
    if few:
        lines += ["", FEW_NOTE + "."]
    groups = [(f"{grouping} {group}", entry) for grouping, entries in result["subgroups"].items()
              for group, entry in entries.items()]
    if groups:
        lines += ["", "### AUC by subgroup", ""]
        lines += markdown_table(["subgroup", "images", "mean AUC", *findings],
                                [[name, str(entry["n_images"]), format_auc(entry["mean_auc"]),
                                  *(format_auc(entry["per_class"][f]) for f in findings)]
                                 for name, entry in groups])
    members = result.get("by_dataset", {})
    if members:
        lines += ["", "### AUC by data set", ""]
        lines += markdown_table(["data set", "images", "mean AUC", *findings],
                                [[name, str(m["n_images"]), with_interval(m["mean_auc"], m["mean_auc_ci95"], 4),
                                  *(format_auc(m["per_class"][f]) for f in findings)] for name, m in members.items()])
    return lines


def format_markdown_report(metrics: dict, title: str, synthetic: bool = False) -> str:
    """report.md: per split, one row per finding (AUC, AUPRC, prevalence, threshold, the five
    figures at it with intervals, ECE), then the AUC of every finding by subgroup; ``synthetic``
    says so under the title."""
    lines = [f"# {title}: evaluation", ""] + ([f"**{SYNTHETIC_NOTE}**", ""] if synthetic else [])
    for split, result in metrics.items():
        lines += split_markdown(split, result) + [""]
    return "\n".join(lines)


def format_localisation(split_name: str, result: dict) -> str:
    """The pointing game of one split (``result``: {finding: {n_boxes, hit_rate, chance_rate}})::

        Pointing game (test; heatmap maximum inside the box, a random point's rate in brackets):
          Nodule      : 0.6250 (0.0041)  16 boxes
    """
    width = max((len(finding) for finding in result), default=0) + 1
    lines = [f"Pointing game ({split_name}; heatmap maximum inside the box, a random point's rate in brackets):"]
    lines += [f"  {finding:<{width}}: {r['hit_rate']:.4f} ({r['chance_rate']:.4f})  {r['n_boxes']} boxes"
              for finding, r in result.items()]
    return "\n".join(lines)


def add_localisation(run_dir, localisation: dict) -> None:
    """Store {split: pointing game} as each split's ``localisation`` in metrics.json and print it.

    Nothing happens for an empty ``localisation`` (no boxes on the evaluated images).
    """
    if not localisation:
        return
    metrics = read_metrics(run_dir)
    for split, result in localisation.items():
        metrics.setdefault(split, {})["localisation"] = result
        print("\n" + format_localisation(split, result))
    write_metrics(run_dir, metrics)


# --------------------------------------------------------------------------- figure helpers


CHANCE_AUC = 0.5


def plot_auc_bars(names: Sequence[str], labels: Sequence[str], values, path, title: str, errors=None,
                  marks=None, ylabel: str = "ROC AUC") -> Path:
    """Grouped bars: one group per label, one bar per run (named by ``names``), on a fixed 0-1 axis.

    ``values`` is [runs][labels] of AUC or None (no bar; "n/a" is written). Each bar rises from
    chance (AUC 0.5, a dotted line), or falls below it, so that its length is the distance from
    chance and the axis never stretches small differences. ``errors`` (optional) is [runs] of
    [2, labels] distances below and above each value, drawn clipped to [0, 1]; ``marks`` (optional)
    is [runs][labels] of booleans, a star above each marked bar.
    """
    n_runs, n_labels = len(names), len(labels)
    heights = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    if heights.shape != (n_runs, n_labels):
        raise ValueError(f"values have shape {heights.shape}, expected ({n_runs}, {n_labels})")
    figure = new_figure(max(8.0, 0.16 * n_labels * n_runs + 4), 5.5)
    axes = figure.add_subplot()
    width = 0.8 / max(n_runs, 1)
    colours = palette(n_runs)
    for run, name in enumerate(names):
        x = np.arange(n_labels) - 0.4 + width * (run + 0.5)
        shown = np.isfinite(heights[run])
        yerr = None
        if errors is not None:  # clipped: no whisker above AUC 1 or below 0
            below, above = np.asarray(errors[run], dtype=float)
            yerr = np.vstack([np.minimum(below, heights[run]), np.minimum(above, 1.0 - heights[run])])[:, shown]
        axes.bar(x[shown], heights[run][shown] - CHANCE_AUC, width, bottom=CHANCE_AUC, color=colours[run],
                 label=name, yerr=yerr, capsize=2, error_kw={"linewidth": 0.7})
        for i in np.flatnonzero(~shown):
            axes.text(x[i], CHANCE_AUC + 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        for i in np.flatnonzero(shown & np.asarray(marks[run] if marks is not None else [False] * n_labels)):
            top = heights[run][i] + (0.0 if yerr is None else yerr[1][np.flatnonzero(shown).tolist().index(i)])
            axes.text(x[i], min(top, 1.0) + 0.005, "*", ha="center", va="bottom", fontsize=11)
    axes.axhline(CHANCE_AUC, color="black", linestyle=":", linewidth=0.8)
    axes.set_ylim(0.0, 1.05)
    axes.set_xticks(np.arange(n_labels))
    axes.set_xticklabels(labels, rotation=45, ha="right")
    axes.set_ylabel(f"{ylabel} (bars from chance, 0.5)")
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    legend_outside(axes)
    return save_figure(figure, path)


def read_history(history_csv) -> pd.DataFrame:
    """A history CSV as a frame; empty cells are NaN. Raises if the file has no rows."""
    frame = pd.read_csv(history_csv)
    if frame.empty:
        raise ValueError(f"{history_csv} has no epochs")
    return frame


def stage_spans(stages: Sequence[str], value: str = "frozen") -> List[tuple]:
    """[(first_row, last_row)] of the runs of consecutive rows whose stage equals ``value``."""
    spans, start = [], None
    for row, stage in enumerate(list(stages) + [None]):
        if stage == value and start is None:
            start = row
        elif stage != value and start is not None:
            spans.append((start, row - 1))
            start = None
    return spans


# --------------------------------------------------------------------------- figures


def plot_history(history_csv, path, title: str) -> Path:
    """Train and valid loss per epoch, valid AUC on a second y axis, frozen epochs shaded.

    x is the epoch of the phase, counted from 1 over every fit of the phase in order as the log
    counts them. Epochs whose ``stage`` is "frozen" get a grey background. NaN cells leave gaps.
    """
    frame = read_history(history_csv)
    x = np.arange(1, len(frame) + 1)
    figure = new_figure(8, 4.5)
    axes = figure.add_subplot()
    handles = []
    for column, colour in (("train_loss", "tab:blue"), ("valid_loss", "tab:orange")):
        if column in frame:
            handles += axes.plot(x, frame[column].astype(float), "o-", color=colour,
                                 label=column.replace("_", " "))
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)

    if "stage" in frame:
        for number, (first, last) in enumerate(stage_spans(frame["stage"].astype(str).tolist())):
            span = axes.axvspan(first + 0.5, last + 1.5, color="grey", alpha=0.15,
                                label="frozen body" if number == 0 else None)
            if number == 0:
                handles.append(span)

    if "valid_auc" in frame:
        auc_axes = axes.twinx()
        handles += auc_axes.plot(x, frame["valid_auc"].astype(float), "s--", color="tab:green",
                                 label="valid AUC")
        auc_axes.set_ylabel("valid mean AUC")
    axes.set_xlim(0.5, len(frame) + 0.5)
    axes.set_title(title)
    legend_outside(axes, handles, right=1.15 if "valid_auc" in frame else 1.02)  # clear of the AUC axis
    return save_figure(figure, path)


def plot_roc(probs, targets, labels: Sequence[str], path, title: str) -> Path:
    """One ROC curve per finding with its AUC in the legend.

    ``probs``/``targets`` are [N, C] arrays or tensors (a target > 0.5 is a
    positive), ``labels`` the C finding names. A finding without both a
    positive and a negative has no curve; the legend lists it as skipped.
    """
    scores, positive, negative, labels = check_inputs(probs, targets, labels)
    aucs = per_class_auc(probs, targets, labels)

    figure = new_figure(9, 6)
    axes = figure.add_subplot()
    colours = palette(len(labels))
    skipped = []
    for column, label in enumerate(labels):
        if aucs[label] is None:
            skipped.append(label)
            continue
        rows = positive[:, column] | negative[:, column]
        fpr, tpr, _ = roc_curve(positive[rows, column], scores[rows, column])
        axes.plot(fpr, tpr, color=colours[column], linestyle=("-", "--")[column % 2],
                  linewidth=1.3, label=f"{label} ({aucs[label]:.3f})")
    axes.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=0.8, label="chance")
    if skipped:
        axes.plot([], [], " ", label="skipped (one label only): " + ", ".join(skipped))
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="finding (AUC)")
    return save_figure(figure, path)


def plot_reliability(probs, targets, labels: Sequence[str], path, title: str,
                     n_bins: int = CALIBRATION_BINS) -> Path:
    """Reliability diagrams: observed frequency of positives against mean predicted probability in
    ``n_bins`` equal-width bins; the diagonal is perfect calibration, empty bins leave gaps.

    The first panel pools all findings (ECE in its title) with its bin counts (log scale) below;
    then one small panel per finding on the same axes (its ECE and positives in its title), each
    with the pooled curve in grey for reference, so that no two findings' lines cross.
    """
    scores, positive, negative, labels = check_inputs(probs, targets, labels)
    labelled = positive | negative
    columns = 4
    rows = 1 + math.ceil(len(labels) / columns)
    figure = new_figure(2.6 * columns, 2.6 * rows + 1.2)
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=(2.0, 0.7, *([1.6] * (rows - 1))))
    pooled = calibration_bins(scores[labelled], positive[labelled], n_bins)
    axes = figure.add_subplot(grid[0, :2])
    counts_axes = figure.add_subplot(grid[1, :2], sharex=axes)
    axes.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=0.8)
    axes.plot(pooled.mean_predicted, pooled.observed, "o-", color="black", linewidth=2)
    axes.set_title(f"all findings pooled (ECE {pooled.ece:.3f})", fontsize="medium")
    axes.set_ylabel("observed frequency")
    counts_axes.bar(pooled.centres, pooled.counts, width=1.0 / n_bins, color="grey", edgecolor="white")
    if pooled.counts.any():
        counts_axes.set_yscale("log")
    counts_axes.set_xlabel("mean predicted probability")
    counts_axes.set_ylabel("pairs per bin")
    key = figure.add_subplot(grid[:2, 2:])
    key.set_axis_off()
    key.text(0.05, 0.9, f"{title}\n\ndotted: perfect calibration\nblack, and grey below: all findings pooled\n"
             f"blue: one finding", ha="left", va="top", fontsize="medium", transform=key.transAxes)
    for column, label in enumerate(labels):
        panel = figure.add_subplot(grid[2 + column // columns, column % columns], sharex=axes, sharey=axes)
        bins = calibration_bins(scores[labelled[:, column], column], positive[labelled[:, column], column], n_bins)
        panel.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=0.8)
        panel.plot(pooled.mean_predicted, pooled.observed, "-", color="grey", linewidth=1, alpha=0.7)
        panel.plot(bins.mean_predicted, bins.observed, ".-", color="tab:blue", linewidth=1.2)
        panel.set_title(f"{label} (ECE {bins.ece:.3f}, {int(positive[:, column].sum())} pos.)", fontsize="small")
        panel.tick_params(labelsize="x-small")
    for panel in figure.axes:
        if panel is not key:
            panel.grid(True, alpha=0.3)
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.02, 1.02)
    return save_figure(figure, path)


def plot_memory(history_csvs: Iterable, path) -> Optional[Path]:
    """Bank fill fraction and relative movement per epoch, phase after phase.

    ``history_csvs`` are the history CSVs in phase order (missing files are
    skipped). Reads the ``memory_fill`` and ``memory_moved`` columns; when no
    CSV has either (a run without memory) nothing is drawn and ``None`` is
    returned. A dotted line separates the phases; NaN (e.g. "moved" while the
    bank was still empty) leaves a gap. "moved" gets a log axis when its
    values are all positive and span more than a factor of 20.
    """
    frames = [read_history(csv) for csv in history_csvs if Path(csv).is_file()]
    frames = [(number, frame) for number, frame in enumerate(frames, start=1)
              if any(column in frame for column in MEMORY_COLUMNS)]
    if not frames:
        return None

    figure = new_figure(8, 5.5)
    fill_axes = figure.add_subplot(2, 1, 1)
    moved_axes = figure.add_subplot(2, 1, 2, sharex=fill_axes)
    start = 0
    for number, frame in frames:
        x = np.arange(start + 1, start + len(frame) + 1)  # epochs counted from 1, phase 2's after phase 1's
        for axes, column, marker in ((fill_axes, "memory_fill", "o-"), (moved_axes, "memory_moved", "s-")):
            if column in frame:
                axes.plot(x, frame[column].astype(float), marker, color=f"C{number - 1}",
                          label=f"phase {number}")
        if start:
            for axes in (fill_axes, moved_axes):
                axes.axvline(start + 0.5, color="black", linestyle=":", linewidth=1)
        start += len(frame)
    moved = np.concatenate([frame["memory_moved"].astype(float).to_numpy()
                            for _, frame in frames if "memory_moved" in frame] or [np.zeros(0)])
    moved = moved[np.isfinite(moved)]
    if moved.size and (moved > 0).all() and moved.max() / moved.min() > 20:
        moved_axes.set_yscale("log")  # phase 2's slow momentum moves the bank orders of magnitude less
    fill_axes.set_ylabel("bank fill (fraction)")
    fill_axes.set_ylim(-0.05, 1.05)
    fill_axes.set_title("Memory bank per epoch")
    moved_axes.set_ylabel("moved  ||ΔM|| / ||M||")
    moved_axes.set_xlabel("epoch (phase 1, then phase 2)")
    moved_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (fill_axes, moved_axes):
        axes.grid(True, alpha=0.3)
        legend_outside(axes)
    return save_figure(figure, path)


# --------------------------------------------------------------------------- never failing


# --------------------------------------------------------------------------- a whole run


def plot_run(run_dir) -> List[Path]:
    """Draw what a finished run folder allows; return the PNGs written.

    loss_phase1.png / loss_phase2.png from the history CSVs present; roc_test.png and
    reliability_test.png (roc_valid.png and reliability_valid.png when the predictions hold no
    test split) from the predictions file; memory.png when the histories have memory columns.
    Each figure goes through :func:`safe_plot`: a failure is a warning, never an exception.
    """
    run_dir = Path(run_dir)
    title = experiment_name(run_dir) or run_dir.name
    written = []
    for phase in (1, 2):
        history = run_dir / f"history_phase{phase}.csv"
        if history.is_file():
            written.append(safe_plot(plot_history, history, run_dir / f"loss_phase{phase}.png",
                                     f"{title}: phase {phase}"))
    evaluated = _evaluated_split(run_dir)
    if evaluated is not None:
        split, probs, targets, labels = evaluated
        caption = f"on the {split} split ({probs.shape[0]} images)"
        written.append(safe_plot(plot_roc, probs, targets, labels, run_dir / f"roc_{split}.png",
                                 f"{title}: ROC {caption}"))
        written.append(safe_plot(plot_reliability, probs, targets, labels, run_dir / f"reliability_{split}.png",
                                 f"{title}: calibration {caption}"))
    histories = [run_dir / f"history_phase{phase}.csv" for phase in (1, 2)]
    written.append(safe_plot(plot_memory, histories, run_dir / "memory.png"))
    return [path for path in written if path is not None]


def _evaluated_split(run_dir: Path) -> Optional[tuple]:
    """(split, probs, targets, labels) of the test split (else valid) in the run's predictions;
    None when there is no predictions file, or (with a warning) when it cannot be used."""
    source = find_predictions(run_dir)
    if source is None:
        return None
    try:
        payload = load_predictions(source)
        splits = np.asarray(payload["split"])
        split = "test" if (splits == "test").any() else "valid"
        rows = splits == split
        if not rows.any():
            raise ValueError(f"{source.name} holds neither a test nor a valid split")
    except Exception as error:  # noqa: BLE001 - a broken file costs its figures, never the run
        warn_not_drawn(f"{run_dir / 'roc_*.png'} and reliability_*.png", error)
        return None
    return split, as_array(payload["probs"])[rows], as_array(payload["targets"])[rows], payload["labels"]
