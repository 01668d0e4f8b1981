"""The ``cxrmem`` command: one subcommand per task, each the entry point of the layer that owns it.

    cxrmem train --config configs/experiments/demo_synthetic.yaml
    cxrmem evaluate --config X.yaml [--model_path P]     # train --evaluate
    cxrmem evaluate --run RUN --dataset chexpert --data_dir DIR   # external validation
    cxrmem check-data --config X.yaml                    # train --check-data
    cxrmem sweep configs/sweeps/demo_ablation.yaml --dry-run

Every older name stays: ``train.py``, ``train_fastai.py``, ``cxrmem-train``, ``cxrmem-compare`` and the
other ``cxrmem-*`` scripts, and ``python -m`` of each module, run the same functions. Nothing imports
this module: it is the top of the layers (docs/architecture.md).
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Sequence

from .data.cache import main as cache_main
from .data.synthetic.__main__ import main as synthetic_main
from .experiment import legacy_main, train_main
from .external import main as external_main
from .inference.export import main as export_main
from .inference.predict import main as predict_main
from .models.weights import main as weights_main
from .report.compare import main as compare_main
from .sweep import main as sweep_main
from .utils.errors import closest


class Subcommand(NamedTuple):
    run: Callable[[Sequence[str]], int]
    help: str


def with_flag(main, flag: str):
    """``main`` with ``flag`` appended to its arguments (``check-data`` is ``train --check-data``)."""
    return lambda argv: main([*argv, flag])


def evaluate_main(argv) -> int:
    """``evaluate --run RUN --dataset D --data_dir DIR``: external validation; otherwise ``train --evaluate``."""
    if any(a == "--run" or a.startswith("--run=") for a in argv):
        return external_main(argv)
    return train_main([*argv, "--evaluate"])


SUBCOMMANDS = {
    "train": Subcommand(train_main, "train and evaluate one experiment file (train.py)"),
    "train-legacy": Subcommand(legacy_main, "run an experiment by name (train_fastai.py --experiment NAME)"),
    "evaluate": Subcommand(evaluate_main, "evaluate a run's checkpoint (train --evaluate), or with --run a finished "
                           "run on another data set (--dataset, --data_dir)"),
    "check-data": Subcommand(with_flag(train_main, "--check-data"),
                             "read and check the data set as training would (train --check-data)"),
    "cache": Subcommand(cache_main, "pre-resize a data set's images (cxrmem-cache)"),
    "synthetic": Subcommand(synthetic_main, "write a synthetic ChestX-ray14, or another data set with --dataset (cxrmem-synthetic)"),
    "compare": Subcommand(compare_main, "compare finished runs, with paired tests (cxrmem-compare)"),
    "sweep": Subcommand(sweep_main, "train variants x seeds, then summarise (cxrmem-sweep)"),
    "predict": Subcommand(predict_main, "predict new images, with Grad-CAM heatmaps (cxrmem-predict)"),
    "export": Subcommand(export_main, "export a run's model to ONNX or TorchScript (cxrmem-export)"),
    "weights": Subcommand(weights_main, "download or list pretrained weights (cxrmem-weights)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: cxrmem <subcommand> [options]   (cxrmem <subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name.ljust(width)}  {command.help}" for name, command in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    command = SUBCOMMANDS.get(name)
    if command is None:
        close = closest(name, SUBCOMMANDS)
        hint = f"did you mean {close}?" if close else f"choose one of {', '.join(SUBCOMMANDS)}"
        print(f"error: no subcommand {name!r}; {hint}", file=sys.stderr)
        return 2
    return command.run(rest)
