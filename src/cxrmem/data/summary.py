"""The data summary (``--check-data``, ``data_summary.json``): what a run would train and test on.

Per split (train, valid, test) and for phase 1's train and valid: images, patients, positives per
model finding (training targets above 1/2), boxes per finding; per split also ``labels``, the
label file's own counts ({label: {positive, negative, uncertain, missing}} over the rows the split
holds, before any mapping, policy or view filter). Plain pandas and dicts; printed as one table.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .split import phase_frame

SYNTHETIC_NOTE = "data: SYNTHETIC (drawn by cxrmem.data.synthetic, not radiographs; its figures say nothing of real X-rays)"
PARTS = ("train", "valid", "test", "phase1_train", "phase1_valid")


def count_boxes(boxes: pd.DataFrame, box_findings) -> dict[str, int]:
    counts = boxes["finding"].value_counts()
    return {f: int(counts.get(f, 0)) for f in box_findings}


def boxes_in_split(boxes: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The boxes on the images of ``rows`` (a frame with ``image_index``)."""
    return boxes[boxes["image_index"].isin(rows["image_index"])]


def describe(rows: pd.DataFrame, findings: Sequence[str], boxes: pd.DataFrame, box_findings) -> dict:
    return {
        "n_images": int(len(rows)),
        "n_patients": int(rows["patient_id"].nunique()),
        "positives": {f: int((rows[f] > 0.5).sum()) for f in findings},
        "bboxes": count_boxes(boxes_in_split(boxes, rows), box_findings),
    }


def summarize(frame: pd.DataFrame, split_source: str, missing_images: int, boxes: pd.DataFrame,
              synthetic: bool, findings: Sequence[str], labels: dict | None = None, dataset: str = "chestxray14") -> dict:
    """The data_summary.json content: the parts above, and ``bboxes``: {finding: boxes on the data set's
    images} for the findings the box file names (``findings`` order); ``synthetic``: the set was drawn by
    cxrmem.data.synthetic; ``labels`` ({split: counts}) goes into each split's entry."""
    named = set(boxes["finding"])
    box_findings = [f for f in findings if f in named]
    phase1 = phase_frame(frame, filter_normal=True, findings=findings)
    parts = {
        "train": frame[frame["split"] == "train"],
        "valid": frame[frame["split"] == "valid"],
        "test": frame[frame["split"] == "test"],
        "phase1_train": phase1[~phase1["is_valid"]],
        "phase1_valid": phase1[phase1["is_valid"]],
    }
    summary = {name: describe(rows, findings, boxes, box_findings) for name, rows in parts.items()}
    for split, counts in (labels or {}).items():
        summary[split]["labels"] = counts
    summary["bboxes"] = count_boxes(boxes_in_split(boxes, frame), box_findings)
    summary["missing_images"] = int(missing_images)
    summary["split_source"] = split_source
    summary["synthetic"] = bool(synthetic)
    summary["dataset"] = dataset
    summary["findings"] = list(findings)
    return summary


def format_summary(summary: dict) -> str:
    """A fixed-width table: one row per finding, one column per split; then the label file's counts."""
    findings = summary["findings"]
    width = max(map(len, findings)) + 2
    lines = [f"{summary['dataset']}", f"{'':<{width}}" + "".join(f"{p:>14}" for p in PARTS)]
    for key in ("n_images", "n_patients"):
        lines.append(f"{key:<{width}}" + "".join(f"{summary[p][key]:>14}" for p in PARTS))
    lines.append("positives per finding:")
    for f in findings:
        lines.append(f"  {f:<{width - 2}}" + "".join(f"{summary[p]['positives'][f]:>14}" for p in PARTS))
    box_findings = list(summary.get("bboxes", {}))
    if box_findings:
        lines.append("boxes per finding:")
        for f in box_findings:
            lines.append(f"  {f:<{width - 2}}" + "".join(f"{summary[p]['bboxes'][f]:>14}" for p in PARTS))
    else:
        lines.append("boxes: none")
    splits = [s for s in ("train", "valid", "test") if "labels" in summary[s]]
    if splits and any(c["uncertain"] or c["missing"] for s in splits for c in summary[s]["labels"].values()):
        labels = list(summary[splits[0]]["labels"])
        label_width = max(map(len, labels)) + 2
        lines.append("the label file's values per split (positive/negative/uncertain/missing):")
        for label in labels:
            cells = ["/".join(str(summary[s]["labels"][label][k]) for k in ("positive", "negative", "uncertain", "missing"))
                     for s in splits]
            lines.append(f"  {label:<{label_width}}" + "".join(f"{c:>24}" for c in cells))
    lines.append(f"split: {summary['split_source']}; images missing on disk: {summary['missing_images']}")
    if summary.get("synthetic"):
        lines.append(SYNTHETIC_NOTE)
    return "\n".join(lines)
