"""AUC within subgroups of the images (a data set's :class:`Subgroup` rules say which)."""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np

from .auc import check_inputs, mean_auc, per_class_auc, to_numpy


class Subgroup(NamedTuple):
    """A way to group images: the metadata column, cell -> group (None leaves the image out),
    and the order of the known groups (others follow, sorted)."""

    column: str
    group_of: Callable[[object], Optional[str]]
    order: tuple = ()


def subgroup_auc(probs, targets, metadata, subgroups: Dict[str, Subgroup],
                 labels: Optional[Sequence[str]] = None) -> dict:
    """ROC-AUC per class within each group of every grouping in ``subgroups`` (name -> :class:`Subgroup`).

    ``metadata`` (a DataFrame) has one row per image, in the order of ``probs``, with the
    columns the subgroups name (ChestX-ray14's sex, age band and view: its ``SUBGROUPS``).
    Returns {grouping: {group: {"n_images", "mean_auc", "per_class"}}}, e.g. {"sex": {"M": ...}}; per_class is None where the subgroup has no positive or no negative
    of the class, mean_auc the mean over the defined classes (None if none). Images whose cell
    is missing or unreadable are in no group of that grouping.
    """
    scores, _, _, keys = check_inputs(probs, targets, labels)
    values = to_numpy(targets)  # NaN (missing) kept, so each subgroup leaves it out as the whole split does
    missing = [g.column for g in subgroups.values() if g.column not in metadata.columns]
    if missing:
        raise ValueError(f"metadata lacks the column(s) {', '.join(missing)}")
    if len(metadata) != scores.shape[0]:
        raise ValueError(f"{len(metadata)} metadata rows for {scores.shape[0]} images")

    result: dict = {}
    for name, grouping in subgroups.items():
        groups = np.array([grouping.group_of(v) for v in metadata[grouping.column].tolist()], dtype=object)
        present = {g for g in groups if g is not None}
        ordered = [g for g in grouping.order if g in present] + sorted(present - set(grouping.order))
        result[name] = {}
        for group in ordered:
            rows = groups == group
            per_class = dict(zip(keys, per_class_auc(scores[rows], values[rows]).values()))
            result[name][group] = {"n_images": int(rows.sum()), "mean_auc": mean_auc(per_class),
                                   "per_class": per_class}
    return result

