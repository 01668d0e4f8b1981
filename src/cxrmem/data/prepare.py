"""From a config's ``data`` section to a checked, split metadata frame.

Order: generate the synthetic set on first use (``data.synthetic``, only into a
missing or empty folder), build or reuse the pre-resized cache (``data.cache``), read
and split the metadata, then check every image file so that none fails mid-epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..utils.errors import UserError
from . import synthetic
from .synthetic.sites import generate_site, holds_site
from .cache import ensure_cache
from .registry import model_findings
from .union import load_training_data
from .images import find_damaged_images

DAMAGED_LIST = "damaged_images.txt"


@dataclass
class PreparedData:
    frame: pd.DataFrame          # one row per usable image, with ``path``, ``split`` and one column per finding
    split_source: str            # "official" or "derived"
    missing: list[str]           # CSV rows without a file (dropped under missing_images: drop)
    data_dir: Path               # where images are read from (the cache when one is used)
    synthetic: bool              # data.data_dir holds a set drawn by cxrmem.data.synthetic
    labels: dict                 # {split: {label: {positive, negative, uncertain, missing}}}, as the file gives them
    boxes: pd.DataFrame          # [image_index, finding, x, y, w, h] (empty without)
    findings: list[str]          # the model's findings, the frame's label columns
    members: dict = field(default_factory=dict)  # a union's members (data.datasets): {name: Loaded}


def ensure_synthetic(data_cfg) -> None:
    """Generate ``data.synthetic`` into data_dir when that is missing, empty or a killed generation.

    A data set already there is used as it is, whatever ``data.synthetic`` says (with a
    warning when it is not the one ``data.synthetic`` describes).
    """
    s = data_cfg.synthetic
    if s is None:
        return
    if data_cfg.dataset != "chestxray14":
        if not holds_site(data_cfg.data_dir, data_cfg.dataset, s.n_patients, s.size, s.seed):
            print(f"generating a synthetic {data_cfg.dataset} in {data_cfg.data_dir} (data.synthetic: {s.n_patients} "
                  f"patients, {s.size} px): drawn images, not radiographs", flush=True)
            generate_site(data_cfg.dataset, data_cfg.data_dir, s.n_patients, s.size, s.seed)
        return
    if synthetic.wants_generating(data_cfg.data_dir):
        print(f"generating a synthetic ChestX-ray14 in {data_cfg.data_dir} (data.synthetic: {s.n_patients} patients, "
              f"{s.size} px): drawn images, not radiographs", flush=True)
        synthetic.generate(data_cfg.data_dir, n_patients=s.n_patients, size=s.size, seed=s.seed)
    elif not synthetic.holds(data_cfg.data_dir, n_patients=s.n_patients, size=s.size, seed=s.seed):
        warnings.warn(f"data.synthetic is not used: {data_cfg.data_dir} already holds a data set, which is used "
                      f"as it is (point data.data_dir at a new folder to generate one)", stacklevel=2)


def resolve_image_dir(data_cfg) -> Path:
    """The folder images are read from: data_dir, or its pre-resized cache when configured (at
    ``data.cache.size``, or at ``data.image_size`` when that is null, so the loader only decodes)."""
    data_dir = Path(data_cfg.data_dir)
    if data_cfg.cache is None:
        return data_dir
    cache = data_cfg.cache if data_cfg.cache.size else replace(data_cfg.cache, size=data_cfg.image_size)
    return ensure_cache(data_dir, cache, data_cfg.missing_images)


def drop_damaged(frame: pd.DataFrame, run_dir: Path, policy: str, decode: bool = False) -> pd.DataFrame:
    """Check every file (``decode``: decode it too); list the damaged ones in the run folder; error or drop them."""
    damaged = find_damaged_images(frame["path"], decode)
    if not damaged:
        return frame
    run_dir.mkdir(parents=True, exist_ok=True)
    listing = run_dir / DAMAGED_LIST
    listing.write_text("".join(f"{path}\t{reason}\n" for path, reason in damaged))
    if policy == "error":
        raise UserError(f"{len(damaged)} image file(s) are empty, truncated or unreadable (e.g. {damaged[0][0]}: "
                        f"{damaged[0][1]}); all are listed in {listing}; replace them or set "
                        f"data.missing_images: drop")
    warnings.warn(f"{len(damaged)} damaged image files were dropped; see {listing}", stacklevel=2)
    bad = {path for path, _ in damaged}
    return frame[~frame["path"].isin(bad)].reset_index(drop=True)


def warn_ungraded(frame: pd.DataFrame, findings) -> None:
    """A warning for every model finding that no training image is labelled for: it would train on nothing."""
    rows = frame[frame["split"] == "train"]
    ungraded = [f for f in findings if rows[f].isna().all()]
    if ungraded:
        warnings.warn(f"model.findings: {', '.join(ungraded)} is labelled on no training image of this data; "
                      f"its output learns nothing (train on a data set that grades it, or leave it out)", stacklevel=3)


def prepare_data(cfg, decode: bool = False) -> PreparedData:
    """The run's data frame, every image checked (``decode``: decoded in full too, as --check-data does)."""
    data = cfg.data
    findings = model_findings(cfg)
    folders = [m.data_dir for m in data.datasets] or [data.data_dir]
    if data.datasets:  # a union reads its members as they are (the schema refuses synthetic and cache)
        image_dir = Path(folders[0])
    else:
        ensure_synthetic(data)
        if not Path(data.data_dir).is_dir():
            raise UserError(f"data_dir {data.data_dir} does not exist; set data.data_dir or pass --data_dir "
                            f"(or add data.synthetic to generate a synthetic set there)")
        if data.cache is not None and data.dataset != "chestxray14":
            raise UserError(f"data.cache: the pre-resized cache is built for ChestX-ray14's layout only; set "
                            f"data.cache to null for {data.dataset}")
        image_dir = resolve_image_dir(data)
    loaded = load_training_data(data, findings, image_dir)
    frame = drop_damaged(loaded.frame, cfg.run_dir, data.missing_images, decode)
    warn_ungraded(frame, findings)
    return PreparedData(frame, loaded.split_source, loaded.missing, image_dir,
                        all(synthetic.is_synthetic(f) for f in folders), loaded.labels, loaded.boxes, findings,
                        loaded.members)
