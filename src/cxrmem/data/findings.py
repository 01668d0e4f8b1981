"""The findings as data: ChestX-ray14's 14 (``findings.csv``) and every data set's labels (``label_map.csv``).

``findings.csv``: each row names a ChestX-ray14 finding, its image count in the real data set
(112,120 images) and the pattern the synthetic generator draws for it, in the official order.

``label_map.csv``: each row names a label as a data set's own file spells it ("Pleural Effusion",
"pleural effusion", "Nodule/Mass") and the finding of the one label space it means (ChestX-ray14's
names where they mean the same, e.g. Effusion; a new name where they do not, e.g. "Nodule or Mass",
never silently merged into Nodule and Mass). Several labels may mean one finding (VinDr's rib and
clavicle fractures are Fracture): it is positive when any of them is. Every other module takes its
label lists from here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

NO_FINDING = "No Finding"  # the label of an image with none of the 14 findings


@dataclass(frozen=True)
class Finding:
    """One row of findings.csv."""

    name: str
    real_images: int  # ChestX-ray14 images that carry it
    pattern: str  # what the synthetic generator draws for it


@lru_cache(maxsize=None)
def load_findings() -> tuple[Finding, ...]:
    """The rows of findings.csv in file order (the official label order)."""
    text = resources.files("cxrmem.data").joinpath("findings.csv").read_text(encoding="utf-8")
    return tuple(Finding(r["finding"], int(r["images"]), r["synthetic_pattern"])
                 for r in csv.DictReader(io.StringIO(text)))


FINDINGS: list[str] = [f.name for f in load_findings()]


# --------------------------------------------------------------------------- the label space of every data set


@dataclass(frozen=True)
class LabelMapping:
    """One row of label_map.csv: a label as a data set's own file names it, and the finding it means
    (None: a label that is no finding of the label space, e.g. "No Finding" or a diagnosis)."""

    dataset: str
    label: str
    finding: Optional[str]
    note: str


@lru_cache(maxsize=None)
def load_label_map() -> tuple[LabelMapping, ...]:
    """The rows of label_map.csv in file order."""
    text = resources.files("cxrmem.data").joinpath("label_map.csv").read_text(encoding="utf-8")
    return tuple(LabelMapping(r["dataset"], r["label"], r["finding"] or None, r["note"])
                 for r in csv.DictReader(io.StringIO(text)))


def label_map(dataset: str) -> dict[str, Optional[str]]:
    """{label as ``dataset``'s file names it: finding or None}, in the file's order."""
    return {m.label: m.finding for m in load_label_map() if m.dataset == dataset}


def dataset_findings(dataset: str) -> list[str]:
    """The findings ``dataset`` grades, in label-space order."""
    graded = {m.finding for m in load_label_map() if m.dataset == dataset and m.finding}
    return [f for f in label_space() if f in graded]


@lru_cache(maxsize=None)
def label_space() -> tuple[str, ...]:
    """Every finding of every data set: ChestX-ray14's 14 in the official order, then the others in
    the order label_map.csv first names them."""
    extra = [m.finding for m in load_label_map() if m.finding and m.finding not in FINDINGS]
    return tuple(FINDINGS) + tuple(dict.fromkeys(extra))
