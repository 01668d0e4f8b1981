"""Figures of a run: LR finder, loss/AUC history, ROC curves, memory bank, run comparison.

Contract shared by every ``plot_*`` function here:

* it draws on its own ``matplotlib.figure.Figure`` with the Agg canvas, so it
  neither needs a display nor changes pyplot's global backend or state;
* it writes exactly one PNG, atomically (a temporary file in the target's
  folder, renamed over the target on success -- :func:`cxrmem.io.atomic_path`);
* it returns the :class:`~pathlib.Path` written, or ``None`` when there was
  nothing to draw (only :func:`plot_memory` does that);
* it raises on bad input. Wrap a call in :func:`safe_plot` where a drawing
  must never fail the caller: :func:`plot_run` does so for every figure.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .io import atomic_path

__all__ = [
    "plot_lr_find",
    "plot_history",
    "plot_roc",
    "plot_memory",
    "plot_auc_bars",
    "safe_plot",
    "plot_run",
]

DPI = 110
MEMORY_COLUMNS = ("memory_fill", "memory_moved")


# --------------------------------------------------------------------------- helpers


def new_figure(width: float, height: float) -> Figure:
    """A Figure bound to an Agg canvas (no pyplot, no global backend)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically; return the path."""
    path = Path(path)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def as_array(values) -> np.ndarray:
    """A float64 1-D/2-D ndarray from a list, ndarray or (fastai) tensor of numbers or 0-d tensors."""
    if hasattr(values, "detach"):  # a whole tensor
        values = values.detach().cpu().double().numpy()
    if isinstance(values, (list, tuple)):
        values = [float(v) for v in values]  # 0-d tensors, numpy scalars, floats
    return np.asarray(values, dtype=np.float64)


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


# --------------------------------------------------------------------------- single figures


def plot_lr_find(lrs, losses, chosen_lr: Optional[float], path) -> Path:
    """The LR finder's loss against learning rate (log x axis), ``chosen_lr`` marked.

    ``lrs`` and ``losses`` are equal-length sequences (lists, arrays, tensors);
    non-finite losses are left out. The y range covers the curve up to its
    minimum (and the chosen point), so a diverging tail does not flatten it.
    ``chosen_lr=None`` draws the curve without a mark.
    """
    lrs, losses = as_array(lrs).ravel(), as_array(losses).ravel()
    if lrs.shape != losses.shape:
        raise ValueError(f"{lrs.size} learning rates but {losses.size} losses")
    keep = np.isfinite(lrs) & np.isfinite(losses) & (lrs > 0)
    lrs, losses = lrs[keep], losses[keep]
    if lrs.size == 0:
        raise ValueError("the LR finder recorded no finite loss")

    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.plot(lrs, losses, color="tab:blue", label="loss")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss")
    axes.set_title("Learning-rate finder")
    axes.grid(True, which="major", alpha=0.3)

    top = float(losses[: int(np.argmin(losses)) + 1].max())
    if chosen_lr is not None and chosen_lr > 0:
        order = np.argsort(lrs)
        chosen_loss = float(np.interp(math.log(chosen_lr), np.log(lrs[order]), losses[order]))
        axes.axvline(chosen_lr, color="tab:red", linestyle="--", linewidth=1)
        axes.plot([chosen_lr], [chosen_loss], "o", color="tab:red", label=f"chosen lr = {chosen_lr:.2e}")
        top = max(top, chosen_loss)
    bottom = float(losses.min())
    pad = 0.1 * (top - bottom) or 0.1 * abs(top) or 0.1
    axes.set_ylim(bottom - pad, top + pad)
    axes.legend(loc="best")
    return save_figure(figure, path)


def plot_history(history_csv, path, title: str) -> Path:
    """Train and valid loss per epoch, valid AUC on a second y axis, frozen epochs shaded.

    x is the row number of the CSV (epochs of every fit of the phase in order).
    Rows whose ``stage`` is "frozen" get a grey background. NaN cells leave gaps.
    """
    frame = read_history(history_csv)
    x = np.arange(len(frame))
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    handles = []
    for column, colour in (("train_loss", "tab:blue"), ("valid_loss", "tab:orange")):
        if column in frame:
            handles += axes.plot(x, frame[column].astype(float), "o-", color=colour,
                                 label=column.replace("_", " "))
    axes.set_xlabel("epoch (row of the history)")
    axes.set_ylabel("loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)

    if "stage" in frame:
        for number, (first, last) in enumerate(stage_spans(frame["stage"].astype(str).tolist())):
            span = axes.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.15,
                                label="frozen body" if number == 0 else None)
            if number == 0:
                handles.append(span)

    if "valid_auc" in frame:
        auc_axes = axes.twinx()
        handles += auc_axes.plot(x, frame["valid_auc"].astype(float), "s--", color="tab:green",
                                 label="valid AUC")
        auc_axes.set_ylabel("valid mean AUC")
    axes.set_xlim(-0.5, len(frame) - 0.5)
    axes.set_title(title)
    axes.legend(handles=handles, loc="best", fontsize="small")
    return save_figure(figure, path)


def plot_roc(probs, targets, labels: Sequence[str], path, title: str) -> Path:
    """One ROC curve per finding with its AUC in the legend.

    ``probs``/``targets`` are [N, C] arrays or tensors (a target > 0.5 is a
    positive), ``labels`` the C finding names. A finding without both a
    positive and a negative has no curve; the legend lists it as skipped.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, truth = as_array(probs), as_array(targets) > 0.5
    labels = [str(label) for label in labels]
    if scores.ndim != 2 or scores.shape != truth.shape or scores.shape[1] != len(labels):
        raise ValueError(f"probs {scores.shape}, targets {truth.shape} and {len(labels)} labels do not agree")

    figure = new_figure(9, 6)
    axes = figure.add_subplot()
    palette = _palette(len(labels))
    skipped = []
    for column, label in enumerate(labels):
        positive = truth[:, column]
        if positive.all() or not positive.any():
            skipped.append(label)
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, column])
        auc = roc_auc_score(positive, scores[:, column])
        axes.plot(fpr, tpr, color=palette[column], linestyle=("-", "--")[column % 2],
                  linewidth=1.3, label=f"{label} ({auc:.3f})")
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

    figure = new_figure(7, 5.5)
    fill_axes = figure.add_subplot(2, 1, 1)
    moved_axes = figure.add_subplot(2, 1, 2, sharex=fill_axes)
    start = 0
    for number, frame in frames:
        x = np.arange(start, start + len(frame))
        for axes, column, marker in ((fill_axes, "memory_fill", "o-"), (moved_axes, "memory_moved", "s-")):
            if column in frame:
                axes.plot(x, frame[column].astype(float), marker, color=f"C{number - 1}",
                          label=f"phase {number}")
        if start:
            for axes in (fill_axes, moved_axes):
                axes.axvline(start - 0.5, color="black", linestyle=":", linewidth=1)
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
        axes.legend(loc="best", fontsize="small")
    return save_figure(figure, path)


def plot_auc_bars(run_names: Sequence[str], labels: Sequence[str], values, path, title: str,
                  intervals=None) -> Path:
    """Grouped bars: one group per label, one bar per run.

    ``values`` is [runs][labels] of AUC or None (None draws no bar and writes
    "n/a"); ``intervals`` (optional) is the same shape with [lo, hi] or None,
    drawn as error bars.
    """
    n_runs, n_labels = len(run_names), len(labels)
    heights = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    if heights.shape != (n_runs, n_labels):
        raise ValueError(f"values have shape {heights.shape}, expected ({n_runs}, {n_labels})")
    figure = new_figure(max(8.0, 0.55 * n_labels * max(n_runs, 2) * 0.6 + 3), 5.5)
    axes = figure.add_subplot()
    width = 0.8 / max(n_runs, 1)
    centres = np.arange(n_labels)
    palette = _palette(n_runs)
    finite = heights[np.isfinite(heights)]
    bottom = max(0.0, min(0.5, float(finite.min()) - 0.05) if finite.size else 0.5)
    for run, name in enumerate(run_names):
        x = centres - 0.4 + width * (run + 0.5)
        errors = _error_bars(heights[run], None if intervals is None else intervals[run])
        axes.bar(x, np.nan_to_num(heights[run], nan=0.0), width, color=palette[run], label=name,
                 yerr=errors, capsize=2, error_kw={"linewidth": 0.7})
        for position, height in zip(x, heights[run]):
            if np.isnan(height):
                axes.text(position, bottom + 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    axes.set_ylim(bottom, 1.0)
    axes.set_xticks(centres)
    axes.set_xticklabels(labels, rotation=45, ha="right")
    axes.set_ylabel("ROC AUC")
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(figure, path)


def _palette(n: int) -> list:
    """n distinguishable colours (tab10 up to 10, tab20 beyond)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _error_bars(heights: np.ndarray, intervals) -> Optional[np.ndarray]:
    """[2, L] distances below/above each bar from [lo, hi] intervals (0 where missing)."""
    if intervals is None:
        return None
    errors = np.zeros((2, heights.size))
    for i, (height, interval) in enumerate(zip(heights, intervals)):
        if interval is not None and np.isfinite(height):
            errors[0, i] = max(0.0, height - float(interval[0]))
            errors[1, i] = max(0.0, float(interval[1]) - height)
    return errors


# --------------------------------------------------------------------------- never failing


def warn_not_drawn(target, error: BaseException) -> None:
    """The one warning for a figure that could not be drawn."""
    warnings.warn(f"could not draw {target}: {type(error).__name__}: {error}", stacklevel=3)


def safe_plot(fn: Callable, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` and return its result; on any exception warn
    ``could not draw <path>: ...`` (``path`` being fn's argument of that name,
    else fn's name) and return ``None``. Drawing never fails a run."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - by contract, nothing escapes
        warn_not_drawn(_target_of(fn, args, kwargs), error)
        return None


def _target_of(fn: Callable, args, kwargs) -> str:
    """The ``path`` argument of a call, for messages; fn's name when there is none."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
        if "path" in bound:
            return str(bound["path"])
    except (TypeError, ValueError):
        pass
    return getattr(fn, "__name__", repr(fn))


# --------------------------------------------------------------------------- a whole run


def plot_run(run_dir) -> List[Path]:
    """Draw what a finished run folder allows; return the PNGs written.

    loss_phase1.png / loss_phase2.png from the history CSVs present,
    roc_test.png (roc_valid.png when the predictions hold no test split) from
    ``<experiment_name>_predictions.pt``, memory.png when the histories have
    memory columns. Each figure goes through :func:`safe_plot`: a failure is a
    warning, never an exception.
    """
    run_dir = Path(run_dir)
    written = []
    for phase in (1, 2):
        history = run_dir / f"history_phase{phase}.csv"
        if history.is_file():
            written.append(safe_plot(plot_history, history, run_dir / f"loss_phase{phase}.png",
                                     f"{_experiment_name(run_dir) or run_dir.name}: phase {phase}"))
    written.append(_plot_run_roc(run_dir))
    histories = [run_dir / f"history_phase{phase}.csv" for phase in (1, 2)]
    written.append(safe_plot(plot_memory, histories, run_dir / "memory.png"))
    return [path for path in written if path is not None]


def _experiment_name(run_dir: Path) -> Optional[str]:
    """experiment_name from the run's config.yaml, None if unreadable."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return str(config["experiment_name"])
    except Exception:  # noqa: BLE001 - a missing name only changes titles and the file lookup
        return None


def _predictions_file(run_dir: Path) -> Optional[Path]:
    """<experiment_name>_predictions.pt, else the only *_predictions.pt in the folder, else None."""
    name = _experiment_name(run_dir)
    if name and (run_dir / f"{name}_predictions.pt").is_file():
        return run_dir / f"{name}_predictions.pt"
    candidates = sorted(run_dir.glob("*_predictions.pt"))
    return candidates[0] if len(candidates) == 1 else None


def _plot_run_roc(run_dir: Path) -> Optional[Path]:
    """ROC of the test split (else valid) from the run's predictions; None if there are none."""
    source = _predictions_file(run_dir)
    if source is None:
        return None
    try:
        from .evaluate import load_predictions

        payload = load_predictions(source)
        splits = np.asarray(payload["split"])
        split = "test" if (splits == "test").any() else "valid"
        rows = splits == split
        if not rows.any():
            raise ValueError(f"{source.name} holds neither a test nor a valid split")
    except Exception as error:  # noqa: BLE001
        warn_not_drawn(run_dir / "roc_*.png", error)
        return None
    probs = as_array(payload["probs"])[rows]
    targets = as_array(payload["targets"])[rows]
    title = f"{_experiment_name(run_dir) or run_dir.name}: ROC on the {split} split ({int(rows.sum())} images)"
    return safe_plot(plot_roc, probs, targets, payload["labels"], run_dir / f"roc_{split}.png", title)
