"""The figure drawn during training: the LR finder's curve (contract: :mod:`cxrmem.utils.figures`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..utils.figures import as_array, legend_outside, new_figure, save_figure


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
    legend_outside(axes)
    return save_figure(figure, path)
