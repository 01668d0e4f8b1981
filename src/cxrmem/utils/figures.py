"""Figures without pyplot: a Figure on an Agg canvas, written atomically; a drawing never fails its caller.

Contract shared by every ``plot_*`` function of cxrmem:

* it draws on its own ``matplotlib.figure.Figure`` with the Agg canvas, so it
  neither needs a display nor changes pyplot's global backend or state;
* it writes exactly one PNG, atomically (:func:`cxrmem.utils.io.atomic_path`);
* it returns the :class:`~pathlib.Path` written, or ``None`` when there was nothing to draw;
* it raises on bad input. Wrap a call in :func:`safe_plot` where a drawing must never fail
  the caller.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import io


DPI = 110


def new_figure(width: float, height: float) -> Figure:
    """A Figure bound to an Agg canvas (no pyplot, no global backend)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically; return the path."""
    path = Path(path)
    figure.tight_layout()
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def palette(n: int) -> list:
    """n distinguishable colours (tab10 up to 10, tab20 beyond)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def legend_outside(axes, handles=None, right: float = 1.02, **kwargs) -> None:
    """The legend to the right of ``axes`` (``right``: where it starts, in axes widths), never on the data."""
    kwargs = {"fontsize": "small", **kwargs}
    if handles is not None:
        kwargs["handles"] = handles
    axes.legend(loc="upper left", bbox_to_anchor=(right, 1.0), borderaxespad=0.0, **kwargs)


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


def as_array(values) -> np.ndarray:
    """A float64 ndarray from a list of numbers or 0-d tensors, an ndarray or a (fastai) tensor, on any device."""
    if isinstance(values, (list, tuple)):
        values = [float(v) for v in values]  # 0-d tensors, numpy scalars, floats
    if isinstance(values, torch.Tensor):
        values = values.detach().as_subclass(torch.Tensor).cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
