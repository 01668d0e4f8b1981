"""Command-line entry points: ``train.py`` (YAML config) and the legacy ``train_fastai.py``.

Both resolve a :class:`~cxrmem.config.Config`, then run the same pipeline:
data -> (check | evaluate | train) -> report. Mistakes a user can fix end with
``error: <one line>`` on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path

from . import io
from .config import dump_yaml, load_config, same_experiment
from .errors import UserError, closest
from .models.backbones import check_backbone

EXPERIMENTS_DIR = Path("configs") / "experiments"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set memory.top_k=5 (repeatable)")
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


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
    root = Path(__file__).resolve().parents[2]  # <root>/src/cxrmem/cli.py in a checkout
    dirs = [Path.cwd() / EXPERIMENTS_DIR]
    if (root / "pyproject.toml").is_file():
        dirs.append(root / EXPERIMENTS_DIR)
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def experiment_config_path(name: str) -> Path:
    """The file behind ``--experiment NAME``: the legacy table's entry first, then NAME.yaml in
    :func:`experiment_dirs`, in order."""
    from .reference import legacy_experiments

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


def protect_run_folder(cfg, overwrite: bool, resume: bool) -> None:
    """Training never replaces a run's work unasked: a folder holding a finished or interrupted run
    needs ``--overwrite`` (or ``--resume`` for an interrupted one of the same configuration)."""
    from .train.phases import resume_path
    from .train.resume import stopped_at

    run_dir, saved = cfg.run_dir, cfg.run_dir / "config.yaml"
    same = saved.is_file() and same_experiment(saved.read_text(), cfg)
    if resume and not same:
        raise UserError(f"cannot resume: {saved} is missing or holds another configuration; resume with the "
                        f"same config and options as the interrupted run")
    if resume or overwrite:
        return
    if not saved.is_file():
        return
    kind, other = ("this", None) if same else ("a different", "pass --output_dir to another folder, or "
                                                                  "--overwrite to replace it")
    if resume_path(cfg).is_file():
        raise UserError(f"{run_dir} holds an interrupted run of {kind} configuration (stopped in "
                        f"{stopped_at(resume_path(cfg))}); "
                        f"{other or 'add --resume to continue it, or --overwrite to start again'}")
    if (run_dir / "metrics.json").is_file():
        raise UserError(f"{run_dir} holds a finished run of {kind} configuration; "
                        f"{other or 'pass --overwrite to train it again, or --output_dir for a new run'}")


def start_run_folder(cfg, args) -> None:
    """Check the run folder may take this run, clear a killed run's temporaries, write config.yaml."""
    protect_run_folder(cfg, args.overwrite, args.resume)
    io.remove_stale_temporaries(cfg.run_dir)
    if args.overwrite and not args.resume:
        clear_results(cfg)  # before the new config.yaml: never old results beside a new configuration
    io.write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))


def run_outputs(cfg) -> list[Path]:
    """What a run writes into its folder, config.yaml apart, as far as it exists (nothing else is named)."""
    stem, run_dir = cfg.checkpoint_stem, cfg.run_dir
    patterns = ["metrics.json", "report.md", "operating_points.json", "data_summary.json", "damaged_images.txt",
                "model_path.txt", "mlflow_run_id.txt", f"{cfg.experiment_name}_predictions.pt", "history_phase*.csv",
                "loss_phase*.png", "roc_*.png", "reliability_*.png", "memory.png", "lr_find_phase*.png",
                f"models/{stem}_phase*.pth", f"models/{stem}_resume.pth", "models/tmp*", "tensorboard",
                "evaluations"]
    return sorted({path for pattern in patterns for path in run_dir.glob(pattern)})


def clear_results(cfg) -> None:
    """Remove the results of the run a folder held, so that a new run in it never sits beside them."""
    for path in run_outputs(cfg):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run(cfg, args) -> int:
    if args.print_config:
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 only
            print(dump_yaml(cfg), end="")
        return 0

    from .train import distributed

    with distributed.session():  # under torchrun: one process group; only rank 0 prints and writes
        if not distributed.is_main_process():
            return run_pipeline(cfg, args, distributed)
        with run_folder_lock(cfg.run_dir):
            return run_pipeline(cfg, args, distributed)


RUN_LOCK = ".cxrmem.lock"


def run_folder_lock(run_dir: Path):
    """The run folder for this process alone: a second command on the same folder stops at once."""
    def busy():
        raise UserError(f"another cxrmem command is using {run_dir} right now (it holds {run_dir / RUN_LOCK}); "
                        f"wait for it to end, or pass --output_dir for another folder")

    return io.folder_lock(run_dir, RUN_LOCK, busy)


def run_pipeline(cfg, args, distributed) -> int:
    from .data.chestxray14 import format_summary, read_bboxes, summarize
    from .data.prepare import prepare_data

    print(f"# {cfg.experiment_name}: resolved configuration\n{dump_yaml(cfg)}")
    data = distributed.on_main(lambda: prepare_data(cfg, decode=args.check_data))
    if args.check_data:
        summary = summarize(data.frame, data.split_source, len(data.missing), read_bboxes(cfg.data.data_dir),
                            data.synthetic)
        print(format_summary(summary))
        if distributed.is_main_process():
            io.write_json(cfg.run_dir / "data_summary.json", summary)
        print(f"\nwrote {cfg.run_dir / 'data_summary.json'}")
        return 0

    from .train import tracking
    from .train.phases import checkpoint_path, finish_run, load_checkpoint, train, training_finished
    from .report import plot_run, write_results
    from .train.predict import predict_splits

    device = distributed.device()
    finished_before = args.resume and not args.evaluate and training_finished(cfg)
    if finished_before:
        print("training had finished before the interruption: evaluating its final checkpoint")
        distributed.on_main(lambda: start_run_folder(cfg, args))
    if args.evaluate or finished_before:
        from .models.net import build_model

        own = checkpoint_path(cfg, 2 if cfg.phase2 else 1)
        path = Path(args.model_path) if args.model_path else own
        if not path.is_file():
            raise UserError(f"model file {path} not found; pass --model_path to an existing .pth or train first")
        model = build_model(replace(cfg.model, pretrained=False, weights=None), cfg.memory)
        distributed.load_on_main(model, lambda: load_checkpoint(model, path))
        if path.resolve() != own.resolve():  # another checkpoint: its results beside the run's, never over them
            cfg = replace(cfg, output_dir=str(evaluation_dir(cfg, path)))
            print(f"evaluating {path}: results go to {cfg.run_dir} (the run's own results stay as they are)")
            if distributed.is_main_process():
                io.write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))
                io.write_text(cfg.run_dir / "model_path.txt", f"{path.resolve()}\n")
    else:
        distributed.on_main(lambda: start_run_folder(cfg, args))
        model = train(cfg, data.frame, device, resume=args.resume).model
    counts = data.frame["split"].value_counts()
    print(f"evaluating: predicting {counts.get('valid', 0)} valid and {counts.get('test', 0)} test images")
    predictions = predict_splits(cfg, model, data.frame, device)  # every rank predicts its share
    if distributed.is_main_process():
        print(f"evaluating: AUCs with {cfg.evaluation.bootstrap_resamples} bootstrap resamples "
              f"(by {cfg.evaluation.bootstrap_unit})")
        write_results(cfg, predictions, data.frame)
        from .explain import pointing_game_of_run
        from .report import add_localisation
        add_localisation(cfg.run_dir, pointing_game_of_run(cfg, model, data.frame))  # when boxes exist
        plot_run(cfg.run_dir)
        tracking.finish(cfg)  # final AUCs and files to the MLflow run, if any
    if not args.evaluate:
        finish_run(cfg)  # only now: until the results exist, --resume can still produce them
    print(f"\nrun folder: {cfg.run_dir}")
    return 0


def evaluation_dir(cfg, model_path: Path) -> Path:
    """Where ``--evaluate --model_path P`` of a checkpoint other than the run's own writes its results:
    ``<run folder>/evaluations/<P's stem>``."""
    return cfg.run_dir / "evaluations" / model_path.stem


TRAINING_INTERRUPTED = ("interrupted: the last finished epoch is saved; add --resume to the same command to "
                        "continue (make demo continues by itself)")
RERUN_TO_RESUME = "interrupted: finished files are kept; run the same command again to continue"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``timeout``): handled as Ctrl-C is, exit status 143."""


def _terminate(signum, frame):
    raise Terminated


def handle_sigterm() -> None:
    """SIGTERM raises :class:`Terminated` in the main thread, unless something else (a launcher such as
    submitit) has installed a handler of its own."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def guarded(main=None, *, interrupted: str = TRAINING_INTERRUPTED):
    """Run ``main(argv)`` for every command line: a user mistake becomes one line on stderr and exit
    status 2, Ctrl-C the line ``interrupted`` and status 130. ``@guarded`` or ``@guarded(interrupted=...)``."""
    if main is None:
        return functools.partial(guarded, interrupted=interrupted)

    def wrapper(argv=None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # off a terminal each line shows when printed, not minutes later
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
        handle_sigterm()
        try:
            return main(argv)
        except UserError as exc:
            if debug:
                raise
            # fastai prefixes errors raised inside callbacks with a line of its own, and a DataLoader worker's
            # error comes back as its traceback text ending "cxrmem.<module>.<UserError class>: <ours>": keep ours
            line = re.sub(r"^cxrmem(\.\w+)+: ", "", str(exc).splitlines()[-1].strip())
            print(f"error: {line}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            cause = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"\n{interrupted.replace('interrupted', cause, 1)}", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        except OSError as exc:
            if debug or not io.out_of_space(exc):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where}; free some space, then run the same command again "
                  f"(with --resume when it was training: finished epochs are kept)", file=sys.stderr)
            return UserError.exit_code
    return wrapper


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
