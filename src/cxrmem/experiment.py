"""One experiment from the command line: ``train.py`` (YAML config) and the legacy ``train_fastai.py``.

Both resolve a :class:`~cxrmem.config.Config`, then run the same pipeline:
data -> (check | evaluate | train) -> report. Mistakes a user can fix end with
``error: <one line>`` on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from .config import dump_yaml, load_config
from .config.reference import legacy_experiments
from .data.summary import format_summary, summarize
from .data.prepare import prepare_data
from .data.registry import training_datasets
from .external import check_external_folders, evaluate_on
from .inference.explain import pointing_game_of_run
from .models.backbones import check_backbone
from . import report
from .runs.folder import RunFolder
from .train import distributed, phases, tracking
from .train.split_predictions import predict_splits
from .utils import io
from .utils.commands import add_shared_options, guarded
from .utils.errors import UserError, closest

EXPERIMENTS_DIR = Path("configs") / "experiments"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    add_shared_options(parser, "set", "debug")
    parser.add_argument("--data_dir", help="shorthand for --set data.data_dir=DIR")
    parser.add_argument("--output_dir", help="run folder (default: runs/<experiment_name>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check-data", action="store_true",
                        help="load and check the data set as training would, write data_summary.json, exit")
    parser.add_argument("--evaluate", action="store_true", help="evaluate a saved model instead of training")
    parser.add_argument("--model_path", help="checkpoint for --evaluate (default: the run's final checkpoint)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed or interrupted run from its last finished epoch")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again in a run folder that holds a finished or interrupted run")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train and evaluate a ChestX-ray14 classifier "
                                     "from one YAML experiment file.")
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiments/X.yaml")
    add_common_options(parser)
    return parser


def legacy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_fastai.py", description="Legacy entry: run an experiment by name. The nine names of the "
        "reference's Python table (e.g. memory_rarity_effv2s) take that table's settings; any other name runs "
        "configs/experiments/<NAME>.yaml.")
    parser.add_argument("--experiment", required=True, help="experiment name, e.g. memory_rarity_effv2s")
    add_common_options(parser)
    return parser


def experiment_dirs() -> list[Path]:
    """Where ``--experiment NAME`` looks for NAME.yaml after the legacy table: configs/experiments
    under the working directory, then under the source checkout this package runs from (an installed
    wheel has no such checkout, so there only the working directory counts)."""
    root = Path(__file__).resolve().parents[2]  # <root>/src/cxrmem/experiment.py in a checkout
    dirs = [Path.cwd() / EXPERIMENTS_DIR]
    if (root / "pyproject.toml").is_file():
        dirs.append(root / EXPERIMENTS_DIR)
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def experiment_config_path(name: str) -> Path:
    """The file behind ``--experiment NAME``: the legacy table's entry first, then NAME.yaml in
    :func:`experiment_dirs`, in order."""
    legacy = legacy_experiments()
    if name in legacy:
        return legacy[name]
    for folder in experiment_dirs():
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    names = sorted(set(legacy) | {p.stem for d in experiment_dirs() for p in d.glob("*.yaml")})
    close = closest(name, names)
    hint = f"did you mean {close}?" if close else f"choose one of {', '.join(names)}"
    raise UserError(f"no experiment named {name!r} in the legacy table or {EXPERIMENTS_DIR}; {hint}")


# --------------------------------------------------------------------------- the pipeline


def start_run_folder(folder: RunFolder, args) -> None:
    """Check the run folder may take this run, clear a killed run's temporaries, write config.yaml."""
    folder.protect(args.overwrite, args.resume)
    io.remove_stale_temporaries(folder.path)
    if args.overwrite and not args.resume:
        folder.clear()  # before the new config.yaml: never old results beside a new configuration
    io.write_text(folder.config_file, dump_yaml(folder.cfg))


def run(cfg, args) -> int:
    if args.print_config:
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 only
            print(dump_yaml(cfg), end="")
        return 0
    with distributed.session():  # under torchrun: one process group; only rank 0 prints and writes
        if not distributed.is_main_process():
            return run_pipeline(cfg, args)
        with RunFolder(cfg).lock():
            return run_pipeline(cfg, args)


def run_pipeline(cfg, args) -> int:
    print(f"# {cfg.experiment_name}: resolved configuration\n{dump_yaml(cfg)}")
    data = distributed.on_main(lambda: prepare_data(cfg, decode=args.check_data))
    if args.check_data:
        summary = summarize(data.frame, data.split_source, len(data.missing), data.boxes, data.synthetic,
                            data.findings, data.labels, " + ".join(training_datasets(cfg)))
        if data.members:  # a union: each member's own summary too
            summary["datasets"] = {name: summarize(m.frame, m.split_source, len(m.missing), m.boxes, data.synthetic,
                                                   data.findings, m.labels, name) for name, m in data.members.items()}
            for member in summary["datasets"].values():
                print(format_summary(member) + "\n")
        print(format_summary(summary))
        if distributed.is_main_process():
            io.write_json(cfg.run_dir / "data_summary.json", summary)
        print(f"\nwrote {cfg.run_dir / 'data_summary.json'}")
        return 0

    folder = RunFolder(cfg)
    device = distributed.device()
    finished_before = args.resume and not args.evaluate and phases.training_finished(cfg)
    if finished_before:
        print("training had finished before the interruption: evaluating its final checkpoint")
        distributed.on_main(lambda: start_run_folder(folder, args))
    if args.evaluate or finished_before:
        own = folder.final_checkpoint
        path = Path(args.model_path) if args.model_path else own
        model = folder.untrained_model()
        distributed.load_on_main(model, lambda: phases.load_checkpoint(model, path))
        if path.resolve() != own.resolve():  # another checkpoint: its results beside the run's, never over them
            cfg = replace(cfg, output_dir=str(folder.evaluation_dir(path)))
            print(f"evaluating {path}: results go to {cfg.run_dir} (the run's own results stay as they are)")
            if distributed.is_main_process():
                io.write_text(RunFolder(cfg).config_file, dump_yaml(cfg))
                io.write_text(cfg.run_dir / "model_path.txt", f"{path.resolve()}\n")
    else:
        check_external_folders(cfg)
        distributed.on_main(lambda: start_run_folder(folder, args))
        model = phases.train(cfg, data.frame, device, resume=args.resume).model
    counts = data.frame["split"].value_counts()
    print(f"evaluating: predicting {counts.get('valid', 0)} valid and {counts.get('test', 0)} test images")
    predictions = predict_splits(cfg, model, data.frame, device)  # every rank predicts its share
    if distributed.is_main_process():
        print(f"evaluating: AUCs with {cfg.evaluation.bootstrap_resamples} bootstrap resamples "
              f"(by {cfg.evaluation.bootstrap_unit})")
        report.write_results(cfg, predictions, data.frame)
        report.add_localisation(cfg.run_dir, pointing_game_of_run(cfg, model, data.frame, data.boxes))  # when boxes exist
        report.plot_run(cfg.run_dir)
    for target in cfg.evaluation.external:  # every rank predicts its share, as for the run's own test
        evaluate_on(cfg, model, target, device, train_frame=data.frame)
    if distributed.is_main_process():
        tracking.finish(cfg)  # final AUCs and files to the MLflow run, if any
    if not args.evaluate:
        phases.finish_run(cfg)  # only now: until the results exist, --resume can still produce them
    print(f"\nrun folder: {cfg.run_dir}")
    return 0


def resolve(path, args):
    """The run's configuration, its backbone checked before any data is read."""
    cfg = load_config(path, args.overrides, data_dir=args.data_dir, output_dir=args.output_dir)
    check_backbone(cfg.model.backbone, cfg.data.image_size)
    return cfg


@guarded
def train_main(argv) -> int:
    args = train_parser().parse_args(argv)
    return run(resolve(args.config, args), args)


@guarded
def legacy_main(argv) -> int:
    args = legacy_parser().parse_args(argv)
    return run(resolve(experiment_config_path(args.experiment), args), args)
