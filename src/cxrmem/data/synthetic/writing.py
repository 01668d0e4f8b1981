"""Writing a synthetic data set: the CSV and lists, the images, resumably and atomically.

``generate(out_dir, n_patients)`` writes::

    DIR/Data_Entry_2017.csv          2017 format: 11 named columns + trailing comma
    DIR/train_val_list.txt           patient-level split, one image name per line
    DIR/test_list.txt                (about 22.8% of the images, whole patients)
    DIR/images_001/images/*.png      8-bit grayscale PNGs, PX x PX, spread over
    DIR/images_002/images/*.png      at least two folders like the real download
    DIR/BBox_List_2017.csv           boxes of the placed lesions of every test image (below)
    DIR/synthetic.json               the parameters and a summary (written last)

The box file has ChestX-ray14's format (``Image Index,Finding Label,Bbox [x,y,w,h],,,``)
and, like the real one, boxes on test images only: every test image gets one box per
finding whose painter places it (Atelectasis, Cardiomegaly, Effusion, Mass, Nodule,
Pneumonia, Pneumothorax; see :func:`.drawing.lesion_box`). ChestX-ray14's boxes are in
the pixels of its 1024 x 1024 originals, so a box of the ``size`` px synthetic image is
scaled by ``1024 / size``: pixel column j covers [j, j + 1) * 1024 / size.

Every file appears under its name whole or not at all (``cxrmem.utils.io.atomic_path``).
``synthetic.json`` is written first with ``complete: false`` and last with ``complete:
true``, so a killed run is recognised and resumed, and a finished one is not redone.
Each image comes from its own generator seeded with ``(seed, image index)`` (its
patient's anatomy from ``(seed, patient id)``), so the number of worker processes never
changes a single byte.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ...utils.errors import UserError
from ...utils.io import atomic_path
from ...utils.processes import process_pool
from ..release import BOX_FRAME
from ..summary import count_boxes
from ..chestxray14 import (BBOX_ALIASES, BBOX_FILE, BBOX_HEADER, CSV_NAME, list_text,
                           read_bboxes)
from ..findings import FINDINGS
from ..split import TEST_LIST, TRAIN_VAL_LIST
from .drawing import Box, draw_image
from .labels import label_string
from .plan import DatasetPlan, folder_names, plan_dataset

MARKER_NAME = "synthetic.json"
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
GENERATOR_VERSION = 2  # bump when drawing or sampling changes: old sets are then redrawn, never resumed
MIN_SIZE = 16


# --------------------------------------------------------------------------- #
# Text files.
# --------------------------------------------------------------------------- #
def data_entry_text(plan: DatasetPlan) -> str:
    """The CSV in the 2017 format: split header cells and a trailing comma per row."""
    lines = [CSV_HEADER]
    for i in range(plan.n_images):
        width, height = plan.original_sizes[i]
        spacing = plan.pixel_spacings[i]
        lines.append(
            f"{plan.image_names[i]},{label_string(plan.labels[i], FINDINGS)},{plan.follow_ups[i]},"
            f"{plan.patient_ids[i]},{plan.ages[i]},{plan.genders[i]},{plan.views[i]},"
            f"{width},{height},{spacing},{spacing},"
        )
    return "\n".join(lines) + "\n"


BBOX_LABELS = {finding: label for label, finding in BBOX_ALIASES.items()}  # Infiltration -> Infiltrate


def bbox_text(plan: DatasetPlan, boxes: dict[int, dict[str, Box]], size: int) -> str:
    """BBox_List_2017.csv: one row per (image, finding) box in plan order, in the 1024 px frame."""
    scale = BOX_FRAME / size
    lines = [BBOX_HEADER]
    for i in sorted(boxes):
        for finding, box in boxes[i].items():
            x, y, w, h = (f"{value * scale:.10g}" for value in box)
            lines.append(f"{plan.image_names[i]},{BBOX_LABELS.get(finding, finding)},{x},{y},{w},{h},,,")
    return "\n".join(lines) + "\n"


def split_list_texts(plan: DatasetPlan) -> tuple[str, str]:
    """(train_val_list.txt, test_list.txt) contents: sorted image names, one a line."""
    def as_text(selected: np.ndarray) -> str:
        return list_text(n for n, keep in zip(plan.image_names, selected) if keep)

    return as_text(~plan.in_test), as_text(plan.in_test)


# --------------------------------------------------------------------------- #
# Images and text, atomically.
# --------------------------------------------------------------------------- #
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path, durable=False) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_png_atomic(path: Path, pixels: np.ndarray) -> None:
    """Save 8-bit grayscale pixels as a PNG (fast compression), atomically."""
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)


def _render_job(job: tuple) -> tuple[int, dict[str, Box]]:
    """Worker entry point: draw one image and write it (skipping it when allowed).

    Returns (image index, its boxes when ``want_boxes``, else {}); an image kept from
    an earlier run is drawn again only when its boxes are wanted.
    """
    path, labels, size, seed, image_index, patient_id, view, keep_existing, want_boxes = job
    path = Path(path)
    keep = keep_existing and path.exists()
    if keep and not want_boxes:
        return image_index, {}
    drawing = draw_image(labels, size, seed, image_index, patient_id, view)
    if not keep:
        write_png_atomic(path, drawing.pixels)
    return image_index, drawing.boxes if want_boxes else {}


def _render_all(jobs: list[tuple], workers: int) -> dict[int, dict[str, Box]]:
    """Run the jobs in-process (one worker or few jobs) or over a process pool: {image index: boxes}."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1 or len(jobs) < 4 * workers:
        results = map(_render_job, jobs)
        return {i: boxes for i, boxes in results if boxes}
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with process_pool(workers, __name__) as pool:  # forked from a server: safe from a threaded process
        return {i: boxes for i, boxes in pool.imap_unordered(_render_job, jobs, chunksize=chunk) if boxes}


# --------------------------------------------------------------------------- #
# The marker file: parameters, completeness, summary.
# --------------------------------------------------------------------------- #
def _parameters(n_patients: int, size: int, seed: int) -> dict:
    return {"generator": "cxrmem.data.synthetic", "version": GENERATOR_VERSION,
            "n_patients": n_patients, "size": size, "seed": seed}


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_marker(out: Path, params: dict, complete: bool, summary: dict | None = None) -> None:
    record = {"params": params, "complete": complete, "summary": summary}
    write_text_atomic(out / MARKER_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _listed_images(out: Path) -> list[str] | None:
    """Relative image paths named by an existing synthetic data set (None if unreadable)."""
    try:
        with open(out / CSV_NAME, encoding="utf-8") as handle:
            names = [line.split(",", 1)[0] for line in handle.read().splitlines()[1:] if line]
    except OSError:
        return None
    folders = folder_names(len(names))
    return [f"{folder}/images/{name}" for folder, name in zip(folders, names)]


def _is_complete(out: Path, marker: dict | None, params: dict) -> bool:
    """True when ``out`` holds a finished data set generated with ``params``."""
    if not marker or marker.get("params") != params or not marker.get("complete"):
        return False
    if not all((out / name).is_file() for name in (CSV_NAME, TRAIN_VAL_LIST, TEST_LIST, BBOX_FILE)):
        return False
    listed = _listed_images(out)
    return listed is not None and all((out / rel).is_file() for rel in listed)


def _remove_leftovers(out: Path, keep: set[str]) -> None:
    """Delete temporary files and PNGs of an earlier synthetic set not in ``keep``."""
    for folder in out.glob("images_[0-9][0-9][0-9]/images"):
        for entry in folder.iterdir():
            rel = f"{folder.parent.name}/images/{entry.name}"
            stale_png = entry.suffix == ".png" and rel not in keep
            if entry.is_file() and (entry.name.endswith(".tmp") or stale_png):
                entry.unlink()
        try:  # drop folders the new set no longer uses
            folder.rmdir()
            folder.parent.rmdir()
        except OSError:
            pass


def _holds_foreign_data(out: Path) -> bool:
    """True when ``out`` has a data set CSV or PNG images but no marker of ours.

    (A run of this generator writes its marker before any image, so even a killed
    run leaves one.)
    """
    if (out / CSV_NAME).exists():
        return True
    return any(True for _ in out.glob("images*/**/*.png"))


def _summarise(plan: DatasetPlan, out: Path, seconds: float, skipped: bool) -> dict:
    names = FINDINGS
    share = plan.labels.mean(axis=0) if plan.n_images else np.zeros(len(names))
    no_finding = float((~plan.labels.any(axis=1)).mean()) if plan.n_images else 0.0
    test_patients = len(set(plan.patient_ids[plan.in_test].tolist()))
    return {
        "out_dir": str(out),
        "n_images": plan.n_images,
        "n_patients": int(len(set(plan.patient_ids.tolist()))),
        "n_train_val_images": int((~plan.in_test).sum()),
        "n_test_images": int(plan.in_test.sum()),
        "n_test_patients": test_patients,
        "n_folders": len(set(plan.folders)),
        "no_finding_share": no_finding,
        "prevalence": {name: float(p) for name, p in zip(names, share)},
        "positives": {name: int(n) for name, n in zip(names, plan.labels.sum(axis=0))},
        "boxes": {f: n for f, n in count_boxes(read_bboxes(out), FINDINGS).items() if n},
        "seconds": round(seconds, 3),
        "skipped": skipped,
    }


def format_summary(summary: dict) -> str:
    """The one-line report printed by the command line."""
    verb = "already present" if summary["skipped"] else f"{summary['seconds']:.1f} s"
    return (f"synthetic ChestX-ray14: {summary['n_images']} images, {summary['n_patients']} patients "
            f"({summary['n_test_images']} test images), {verb}, "
            f"No Finding {100 * summary['no_finding_share']:.1f}% -> {summary['out_dir']}")


def wants_generating(out: str | os.PathLike) -> bool:
    """True when ``out`` is missing, empty, or an unfinished set of this generator (a killed run).

    The training pipeline generates only into such a folder; any other folder holds a
    data set, which it uses as it is.
    """
    out = Path(out)
    if not out.is_dir():
        return not out.exists()
    marker = _read_marker(out)
    return (marker is not None and not marker.get("complete")) or not any(out.iterdir())


def is_synthetic(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a data set this generator wrote (its marker file is there)."""
    return _read_marker(Path(folder)) is not None


def holds(out: str | os.PathLike, n_patients: int, size: int = 256, seed: int = 0) -> bool:
    """True when ``out`` holds the finished set that these arguments of :func:`generate` make."""
    return _is_complete(Path(out), _read_marker(Path(out)), _parameters(n_patients, size, seed))


# --------------------------------------------------------------------------- #
# Public entry points.
# --------------------------------------------------------------------------- #
def _validate(n_patients: int, size: int, seed: int, workers: int | None) -> None:
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise UserError(f"n_patients must be an integer >= 1 (got {n_patients!r}); pass e.g. --n-patients 100")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"size must be an integer >= {MIN_SIZE} pixels (got {size!r}); pass e.g. --size 64")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be an integer >= 0 (got {seed!r})")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise UserError(f"workers must be an integer >= 1 (got {workers!r}); leave it out to use every core")


def generate(out_dir: str | os.PathLike, n_patients: int, size: int = 256, seed: int = 0,
             workers: int | None = None) -> dict:
    """Write a synthetic ChestX-ray14 into ``out_dir`` and return a summary dict.

    The summary has n_images, n_patients, n_train_val_images, n_test_images,
    n_test_patients, n_folders, no_finding_share, prevalence {finding: share},
    positives {finding: count}, boxes {finding: count in BBox_List_2017.csv}, seconds,
    skipped and out_dir.

    Same arguments give byte-identical CSV and lists and identical images, whatever
    ``workers`` (default: every core). If ``out_dir`` already holds a complete set
    made with the same parameters, nothing is written (``skipped`` is True); a run
    with the same parameters that was killed is resumed. Every file is written
    atomically. Raises UserError for bad arguments or when ``out_dir`` holds a
    ChestX-ray14 CSV this generator did not write.
    """
    _validate(n_patients, size, seed, workers)
    n_patients, size, seed = int(n_patients), int(size), int(seed)
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a directory for the synthetic data set")
    params = _parameters(n_patients, size, seed)
    marker = _read_marker(out)
    plan = plan_dataset(n_patients, seed)
    if _is_complete(out, marker, params):
        return _summarise(plan, out, time.perf_counter() - started, skipped=True)
    if marker is None and _holds_foreign_data(out):
        raise UserError(f"{out} already holds ChestX-ray14 files not written by this generator; "
                        "choose an empty --out directory")

    out.mkdir(parents=True, exist_ok=True)
    same_parameters = marker is not None and marker.get("params") == params
    relative_paths = [plan.relative_path(i) for i in range(plan.n_images)]
    _remove_leftovers(out, keep=set(relative_paths) if same_parameters else set())
    _write_marker(out, params, complete=False)
    for folder in sorted(set(plan.folders)):
        (out / folder / "images").mkdir(parents=True, exist_ok=True)

    jobs = [
        (str(out / relative_paths[i]), tuple(bool(x) for x in plan.labels[i]), size, seed, i,
         int(plan.patient_ids[i]), plan.views[i], same_parameters, bool(plan.in_test[i]))
        for i in range(plan.n_images)
    ]
    boxes = _render_all(jobs, workers or os.cpu_count() or 1)

    train_val_text, test_text = split_list_texts(plan)
    write_text_atomic(out / TRAIN_VAL_LIST, train_val_text)
    write_text_atomic(out / TEST_LIST, test_text)
    write_text_atomic(out / BBOX_FILE, bbox_text(plan, boxes, size))
    write_text_atomic(out / CSV_NAME, data_entry_text(plan))
    summary = _summarise(plan, out, time.perf_counter() - started, skipped=False)
    _write_marker(out, params, complete=True, summary={k: v for k, v in summary.items() if k != "skipped"})
    return summary

