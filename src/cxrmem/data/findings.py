"""The 14 ChestX-ray14 findings as data: ``findings.csv`` read once, in the official order.

Each row names a finding, its image count in the real data set (112,120 images)
and the pattern the synthetic generator draws for it. Every other module takes
the label list from here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

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
