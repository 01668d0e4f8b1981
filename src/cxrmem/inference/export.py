"""``cxrmem-export``: a run's final model as ONNX or TorchScript, for use without the training stack.

::

    cxrmem-export --run RUN_DIR --format onnx|torchscript [--out FILE]

Contract of the exported model: input ``images``, float32 ``[N, 3, S, S]``, the
pixels normalised as in training (``x = (pixels / 255 - mean) / std`` per
channel); output ``logits``, float32 ``[N, 14]`` (``p = sigmoid(logits)``); ``N``
free. It is the network in eval mode: the memory bank is read, never written, so
its slots are constants of the exported graph. Both formats are recorded by
tracing the network on an example batch (ONNX through PyTorch's TorchScript-based
exporter): whatever depends only on the bank's fixed state is recorded as it
stands, which is exactly the eval-mode computation. Every export is checked
against the PyTorch model on a batch of another size before the command succeeds.

Beside ``FILE`` goes ``FILE.json``: format, labels, image size, normalisation
mean and std, the run's operating points (``thresholds``, null when the run has
none) and its evaluation batch size. ``cxrmem-predict --model FILE`` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.registry import model_findings
from ..runs.folder import RunFolder, read_operating_points
from ..utils import io
from ..utils.commands import add_shared_options, guarded
from ..utils.errors import UserError, describe_error
from .network import TorchNetwork

INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXAMPLE_BATCH = 2  # the batch the trace records
CHECK_BATCH = 3  # the check's batch: another size, so that a batch size fixed by the trace would show
CHECK_TOLERANCE = 1e-4  # max |logit difference| accepted, relative to max(1, |logit|)


def traced_quietly(fn):
    """Run ``fn`` without the tracer's and the TorchScript exporter's warnings: branches on the bank's
    fixed state are recorded as they stand on purpose, and the legacy exporter is the one used on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return fn()


def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    # dynamo=False: the TorchScript-based exporter traces; torch.export cannot take the bank's
    # Python-level decisions on its own (constant) fill state.
    traced_quietly(lambda: torch.onnx.export(
        model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False))


def write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    traced = traced_quietly(lambda: torch.jit.trace(model, example, check_trace=False))
    try:
        traced.save(str(path))
    except RuntimeError as exc:  # a torch.autograd.Function in the forward pass is recorded as a Python call
        if "Python function" not in str(exc):
            raise
        raise UserError("TorchScript cannot hold this network's custom autograd step (a Python function); "
                        "export with --format onnx instead") from None


def onnx_runtime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running ONNX models needs onnxruntime; pip install 'cxrmem[export]'") from None
    return onnxruntime


class OnnxNetwork:
    """An exported ONNX model through onnxruntime (CUDA when this onnxruntime has it, else CPU)."""

    def __init__(self, path, device=None):
        ort = onnx_runtime()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().float().cpu().numpy()})[0]


def torchscript_network(path, device=None):
    device = device or torch.device("cpu")
    return TorchNetwork(traced_quietly(lambda: torch.jit.load(str(path), map_location=device)), device)


@dataclass(frozen=True)
class Format:
    suffix: str
    write: Callable[[torch.nn.Module, torch.Tensor, Path], None]
    load: Callable  # (path, device) -> images -> logits as numpy


FORMATS = {
    "onnx": Format(".onnx", write_onnx, OnnxNetwork),
    "torchscript": Format(".torchscript.pt", write_torchscript, torchscript_network),
}


METADATA_KEYS = ("format", "labels", "image_size", "batch_size", "mean", "std")


def metadata_path(path) -> Path:
    """``FILE.json`` beside ``FILE``."""
    return Path(f"{path}.json")


def read_metadata(path) -> dict:
    meta_file = metadata_path(path)
    if not Path(path).is_file():
        raise UserError(f"exported model {path} not found; check the path or run cxrmem-export")
    if not meta_file.is_file():
        raise UserError(f"{meta_file} not found beside {path}; export with cxrmem-export, which writes both")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        meta = None
    missing = [key for key in METADATA_KEYS if key not in meta] if isinstance(meta, dict) else ["all keys"]
    if missing or meta["format"] not in FORMATS:
        lacking = ", ".join(missing) or "known format"
        raise UserError(f"{meta_file} is not the description cxrmem-export writes (no {lacking}); export the "
                        f"model again")
    return meta


def load_exported(path, device=None):
    """(network: normalised images -> logits as numpy, the metadata of ``FILE.json``); a file that
    its runtime cannot load (damaged, truncated, another kind of file) is one UserError."""
    meta = read_metadata(path)
    try:
        network = FORMATS[meta["format"]].load(path, device)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime and torch.jit raise their own types for a bad file
        raise UserError(f"exported model {path} ({Path(path).stat().st_size:,} bytes) cannot be loaded as "
                        f"{meta['format']} ({describe_error(exc)}); it is damaged or not what {metadata_path(path).name} says: "
                        f"export it again with cxrmem-export") from None
    return network, meta


def largest_difference(network, model: torch.nn.Module, image_size: int) -> float:
    """max |logit difference| / max(1, |logit|) between ``network`` and ``model`` on a random batch."""
    images = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).float().numpy()
    got = network(images)
    if got.shape != expected.shape:
        return float("inf")
    return float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())


def export_run(run_dir, fmt: str, out=None) -> Path:
    """Write the run's final model in ``fmt`` to ``out`` (default ``RUN_DIR/<save_name><suffix>``) and
    ``out.json``; returns ``out``."""
    form = FORMATS[fmt]
    folder = RunFolder.open(run_dir)
    cfg, model = folder.cfg, folder.load_model()
    size = cfg.data.image_size
    out = Path(out) if out else Path(run_dir) / f"{cfg.checkpoint_stem}{form.suffix}"
    example = torch.zeros(EXAMPLE_BATCH, 3, size, size)
    with io.atomic_path(out) as tmp:
        with torch.no_grad():
            form.write(model, example, tmp)
        difference = largest_difference(form.load(tmp), model, size)
        if not difference <= CHECK_TOLERANCE:
            raise RuntimeError(f"the exported model differs from the PyTorch one (relative logit difference "
                               f"{difference:.3g}); nothing was written")
    mean, std = model.input_stats  # the backbone's, as training normalised
    io.write_json(metadata_path(out), {
        "format": fmt,
        "file": out.name,
        "experiment_name": cfg.experiment_name,
        "backbone": cfg.model.backbone,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(model_findings(cfg))], "dtype": "float32",
                   "meaning": "logits; probability = 1 / (1 + exp(-logit))"},
        "labels": model_findings(cfg),
        "image_size": size,
        "mean": mean,
        "std": std,
        "preprocessing": "8-bit grey (DICOM through its LUTs), squished to image_size x image_size (bilinear), "
                         "replicated to 3 channels, x = (pixels / 255 - mean) / std per channel",
        "thresholds": read_operating_points(run_dir),
        "batch_size": cfg.evaluation_batch_size,
    })
    print(f"wrote {out} and {metadata_path(out).name} (checked against the PyTorch model on a batch of "
          f"{CHECK_BATCH}: relative logit difference {difference:.1e})")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrmem-export", description="Export a run's final model as ONNX or "
                                "TorchScript, with a JSON description beside it.")
    p.add_argument("--run", required=True, help="run folder (config.yaml and the final checkpoint)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="onnx (onnxruntime) or torchscript")
    p.add_argument("--out", help="file to write (default: RUN_DIR/<save_name>.onnx or .torchscript.pt)")
    return add_shared_options(p, "debug")


@guarded
def main(argv) -> int:
    args = parser().parse_args(argv)
    export_run(args.run, args.format, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
