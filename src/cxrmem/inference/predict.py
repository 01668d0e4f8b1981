"""``cxrmem-predict``: a trained model on new images, one CSV row per image.

::

    cxrmem-predict --run RUN_DIR [--out predictions.csv] [--heatmaps DIR] PATH...
    cxrmem-predict --model exported.onnx PATH...        # everything from exported.onnx.json

A PATH is an image (.png, .jpg, .jpeg, .dcm), a folder (searched recursively for
them) or a list: a .txt file with one path per line, or a .csv file with a
``path`` column (else its first column); relative entries are relative to the list.

Contract:

* pixels as evaluation sees them: :func:`cxrmem.data.loaders.read_xray` (squished to
  ``data.image_size``), then the validation DataLoader's batch transforms (``/ 255``,
  grey replicated to three channels, the backbone's mean and std as the checkpoint or the export
  JSON records them), the network in eval mode (the memory bank is read, never written), ``p = sigmoid(logit)``;
* the CSV has ``path``, one probability column per finding (named as the finding)
  and one ``<finding>_call`` column, ``1`` when ``p >= threshold`` at the run's
  operating point (``operating_points.json``; 0.5, with one warning, where there is none);
* a file that cannot be read is left out and named on stderr with its reason, one
  line each; when none can be read the command fails (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from fastai.torch_core import default_device
from fastai.vision.all import TensorImage
from fastprogress.fastprogress import progress_bar

from ..data.findings import label_space
from ..data.registry import model_findings
from ..data.images import IMAGE_SUFFIXES, READ_ERRORS, UndecodableImage, open_image
from ..data.loaders import collatable, default_num_workers, read_xray
from ..runs.folder import RunFolder, read_operating_points
from ..utils import io
from ..utils.commands import add_shared_options, guarded
from ..utils.errors import UserError, closest, describe_error
from . import explain
from .export import load_exported
from .network import TorchNetwork, eval_transforms

DEFAULT_THRESHOLD = 0.5  # the call where a run has no operating point
CALL_SUFFIX = "_call"


# --------------------------------------------------------------------------- inputs


def read_text_list(path: Path) -> list[str]:
    """One path per line; blank lines are skipped, and so are comments: lines starting with # that do
    not name an image (``#scan.png`` is a file whose name starts with #, not a comment)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not (line.startswith("#") and not is_image_name(line))]


def is_image_name(text: str) -> bool:
    return Path(text).suffix.lower() in IMAGE_SUFFIXES


def read_csv_list(path: Path) -> list[str]:
    """The ``path`` column, else the first column (whose header counts as an entry when it names an image:
    a list without a header line)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    column = "path" if "path" in table.columns else table.columns[0]
    entries = [entry.strip() for entry in table[column] if entry.strip()]
    headless = column != "path" and Path(column.strip()).suffix.lower() in IMAGE_SUFFIXES
    return [column.strip(), *entries] if headless else entries


LIST_READERS: dict[str, Callable[[Path], list[str]]] = {".txt": read_text_list, ".csv": read_csv_list}


def images_in(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """PATH arguments -> image paths, in the order given: folders sorted, lists in their own order.

    A folder is searched as a folder wherever it is named, on the command line or in a list. A
    path named on the command line must exist (UserError, before anything runs); an entry of a
    list that does not is kept, to be skipped with its reason like any other unreadable file.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        list_reader = LIST_READERS.get(item.suffix.lower())
        if not item.exists():
            hint = (f"; {item} is a finding: name findings as --heatmap-findings A,B" if str(item) in label_space()
                    else "; check the path")
            raise UserError(f"{item} does not exist{hint}")
        if item.is_dir():
            found += images_in(item)
        elif list_reader is not None:
            entries = [item.parent / entry for entry in list_reader(item)]  # absolute entries stay absolute
            found += [path for entry in entries for path in (images_in(entry) if entry.is_dir() else [entry])]
        else:
            found.append(item)
    if not found:
        raise UserError(f"no images in {' '.join(map(str, inputs))}; give image files "
                        f"({', '.join(IMAGE_SUFFIXES)}), folders holding them, or .txt/.csv lists of paths")
    return found


class ImageFiles(torch.utils.data.Dataset):
    """Item i: ``(i, read_xray(paths[i], size), None)``, or ``(i, None, the exception)`` for a file that fails."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, read_xray(self.paths[i], self.size), None
        except UndecodableImage as exc:  # one damaged file among many: skipped, with the decoder's reason
            return i, None, exc.original
        except (*READ_ERRORS, UserError) as exc:
            return i, None, exc


def collate_readable(items):
    """(indexes read, their images as one uint8 batch or None, [(index, exception)] of the others)."""
    read = [(i, image) for i, image, error in items if error is None]
    images = TensorImage(torch.stack([x for x, in collatable([(image,) for _, image in read])])) if read else None
    return [i for i, _ in read], images, [(i, error) for i, _, error in items if error is not None]


# --------------------------------------------------------------------------- models


@dataclass
class Predictor:
    """Everything a prediction needs: the network and the settings it was trained with."""

    network: Callable[[torch.Tensor], np.ndarray]
    image_size: int
    labels: list[str]
    thresholds: Optional[dict]  # {finding: threshold or None}; None: the run has no operating points
    batch_size: int
    num_workers: int
    source: str  # what the thresholds belong to, for messages
    stats: tuple  # (mean, std) per channel the network's inputs are normalised with
    model: Optional[torch.nn.Module] = None  # the PyTorch model, for heatmaps


def workers_for(setting, device: torch.device) -> int:
    return default_num_workers(device.type == "cuda") if setting == "auto" else int(setting)


def run_predictor(run_dir, model_path, device) -> Predictor:
    folder = RunFolder.open(run_dir)
    cfg, model = folder.cfg, folder.load_model(model_path)
    return Predictor(TorchNetwork(model, device, cfg.model), cfg.data.image_size, model_findings(cfg),
                     read_operating_points(run_dir), cfg.evaluation_batch_size,
                     workers_for(cfg.data.num_workers, device), f"run {run_dir}", model.input_stats, model=model)


def exported_predictor(path, run_dir, device) -> Predictor:
    """An exported model with the settings of the JSON beside it; the run's current operating points with ``--run``."""
    network, meta = load_exported(path, device)
    thresholds, source = meta.get("thresholds"), f"{path}.json"
    if run_dir is not None:
        thresholds, source = read_operating_points(run_dir), f"run {run_dir}"
    return Predictor(network, int(meta["image_size"]), list(meta["labels"]), thresholds, int(meta["batch_size"]),
                     workers_for("auto", device), source, (list(meta["mean"]), list(meta["std"])))


def call_thresholds(thresholds: Optional[dict], labels: Sequence[str], source: str) -> np.ndarray:
    """One threshold per label; 0.5 (with one warning) where the source has none."""
    if thresholds is None:
        warnings.warn(f"{source} has no operating points (operating_points.json); calls are at "
                      f"{DEFAULT_THRESHOLD}", stacklevel=2)
        thresholds = {}
    else:
        missing = [label for label in labels if thresholds.get(label) is None]
        if missing:
            warnings.warn(f"no operating point for {', '.join(missing)} in {source}; called at "
                          f"{DEFAULT_THRESHOLD}", stacklevel=2)
    return np.array([DEFAULT_THRESHOLD if thresholds.get(label) is None else float(thresholds[label])
                     for label in labels])


# --------------------------------------------------------------------------- heatmaps


def import_explain():
    """cxrmem.explain, or one line naming the extra when its grad-cam package is missing."""
    try:
        import pytorch_grad_cam  # noqa: F401 - the package behind cxrmem.explain
    except ImportError:
        raise UserError("--heatmaps needs the grad-cam package; pip install 'cxrmem[explain]'") from None
    return explain


@dataclass
class Heatmaps:
    """Grad-CAM overlays ``folder/<image stem>_<finding>.png`` for each image and each finding called
    positive, or for each of ``findings`` when given."""

    explain: object
    folder: Path
    findings: Optional[list[int]]
    written: int = 0

    def write(self, model, images: torch.Tensor, paths: Sequence[Path], probs: np.ndarray, thresholds: np.ndarray,
              labels) -> None:
        """Overlays for one batch; each is captioned with its finding, probability and call."""
        calls = probs.astype(np.float64) >= thresholds
        wanted = [self.findings if self.findings is not None else list(np.flatnonzero(row)) for row in calls]
        chosen = [j for j, classes in enumerate(wanted) if classes]
        if not chosen:
            return
        classes = sorted({c for j in chosen for c in wanted[j]})
        maps = self.explain.grad_cam(model, images[chosen], classes)
        for row, j in enumerate(chosen):
            grey = np.asarray(open_image(paths[j]).convert("L"))
            for c in wanted[j]:
                call = "positive" if calls[j, c] else "negative"
                caption = f"{labels[c]}: p = {probs[j, c]:.3f}, {call} at threshold {thresholds[c]:.3f}"
                metadata = {"finding": labels[c], "probability": f"{probs[j, c]:.6g}", "call": call,
                            "threshold": f"{thresholds[c]:.6g}", "image": str(paths[j])}
                self.explain.save_overlay(grey, maps[row, classes.index(c)],
                                          self.folder / f"{Path(paths[j]).stem}_{labels[c]}.png", caption, metadata)
                self.written += 1


def finding_indexes(names: Sequence[str], labels: Sequence[str]) -> list[int]:
    unknown = [name for name in names if name not in labels]
    if unknown:
        close = closest(unknown[0], labels)
        hint = f"did you mean {close}?" if close else f"choose among {', '.join(labels)}"
        raise UserError(f"--heatmap-findings: unknown finding {unknown[0]!r}; {hint}")
    return [list(labels).index(name) for name in names]


# --------------------------------------------------------------------------- predicting


def predict_images(predictor: Predictor, paths: Sequence[Path], device: torch.device,
                   heatmaps: Optional[Heatmaps] = None, on_failure=None):
    """(paths read, probabilities [n, C] float32, calls [n, C] int) for the readable ``paths``, in order.

    ``on_failure(path, exception)`` is called for each file that cannot be read; a
    missing DICOM decoder (a UserError) stops everything, as no other file of its
    kind would read either.
    """
    thresholds = call_thresholds(predictor.thresholds, predictor.labels, predictor.source)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, predictor.image_size), batch_size=predictor.batch_size,
                                         num_workers=predictor.num_workers, collate_fn=collate_readable)
    transforms = eval_transforms(predictor.image_size, predictor.stats)
    kept, probs = [], []
    batches = progress_bar(loader, leave=False) if sys.stdout.isatty() else loader  # display=False still draws a glyph
    for indexes, images, failures in batches:
        for i, error in failures:
            if isinstance(error, UserError):
                raise error
            if on_failure is not None:
                on_failure(paths[i], error)
        if images is None:
            continue
        batch = transforms(images.to(device)).as_subclass(torch.Tensor)
        batch_probs = torch.sigmoid(torch.from_numpy(predictor.network(batch)).float()).numpy()
        if heatmaps is not None:
            heatmaps.write(predictor.model, batch, [paths[i] for i in indexes], batch_probs, thresholds,
                           predictor.labels)
        kept += [paths[i] for i in indexes]
        probs.append(batch_probs)
    probs = np.concatenate(probs) if probs else np.zeros((0, len(predictor.labels)), np.float32)
    return kept, probs, (probs.astype(np.float64) >= thresholds).astype(int)


def prediction_table(paths, probs: np.ndarray, calls: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """``path``, one probability column per label, one ``<label>_call`` column per label."""
    table = pd.DataFrame({"path": [str(p) for p in paths]})
    table[list(labels)] = probs
    table[[f"{label}{CALL_SUFFIX}" for label in labels]] = calls
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    """The CSV, atomically; probabilities with 6 significant digits."""
    with io.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrmem-predict", description="Predict the 14 findings on new images "
                                "(PNG, JPEG, DICOM) with a trained run or an exported model.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image, folder (searched recursively) or .txt/.csv list of image paths")
    p.add_argument("--run", help="run folder (config.yaml, final checkpoint, operating points)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model_path", help="checkpoint .pth to use instead of the run's final one")
    source.add_argument("--model", help="exported model (.onnx or TorchScript from cxrmem-export); its settings "
                        "come from the .json beside it")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv here)")
    p.add_argument("--heatmaps", metavar="DIR", help="write Grad-CAM overlays DIR/<image stem>_<finding>.png "
                   "for the findings called positive")
    p.add_argument("--heatmap-findings", action="extend", type=lambda text: [f.strip() for f in text.split(",")],
                   metavar="F[,F...]", help="draw these findings for every image instead of the positive calls "
                   "(comma-separated or repeated, e.g. --heatmap-findings Effusion,Mass)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's evaluation batch size)")
    return add_shared_options(p, "debug")


@guarded
def main(argv) -> int:
    args = parser().parse_args(argv)
    if args.run is None and args.model is None:
        raise UserError("nothing to predict with; pass --run RUN_DIR (a trained run) or --model FILE (an export)")
    if args.model_path and args.run is None:
        raise UserError("--model_path needs --run RUN_DIR (the config the checkpoint was trained with)")
    if args.heatmaps and args.model:
        raise UserError("--heatmaps needs the PyTorch model; pass --run RUN_DIR without --model")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    paths = collect_images(args.paths)  # before anything loads: a path that does not exist stops here
    device = default_device()
    predictor = (exported_predictor(args.model, args.run, device) if args.model
                 else run_predictor(args.run, args.model_path, device))
    if args.batch_size:
        predictor.batch_size = args.batch_size
    heatmaps = None
    if args.heatmaps or args.heatmap_findings:
        if not args.heatmaps:
            raise UserError("--heatmap-findings needs --heatmaps DIR (where to write the overlays)")
        findings = None if args.heatmap_findings is None else finding_indexes(args.heatmap_findings, predictor.labels)
        heatmaps = Heatmaps(import_explain(), Path(args.heatmaps), findings)

    def report_failure(path, error):
        print(f"skipped {path}: {describe_error(error)}", file=sys.stderr)

    kept, probs, calls = predict_images(predictor, paths, device, heatmaps, on_failure=report_failure)
    if not kept:
        raise UserError(f"none of the {len(paths)} image(s) could be read (each is named above); check the files")
    out = Path(args.out)
    write_table(prediction_table(kept, probs, calls, predictor.labels), out)
    skipped = len(paths) - len(kept)
    print(f"wrote {out}: {len(kept)} image(s)" + (f", {skipped} skipped (named on stderr)" if skipped else ""))
    if heatmaps is not None and heatmaps.written:
        print(f"wrote {heatmaps.written} heatmap(s) to {heatmaps.folder} (<image stem>_<finding>.png)")
    elif heatmaps is not None:
        print("no heatmaps: no finding was called positive on these images (--heatmap-findings F,... draws "
              "chosen findings on every image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
