"""Sweeps: one base experiment x variants x seeds, every pair an ordinary training run, then compared.

    cxrmem-sweep configs/sweeps/demo_ablation.yaml              # run what is left, then summarise
    cxrmem-sweep SWEEP.yaml --dry-run                            # one train.py command per run left
    cxrmem-sweep SWEEP.yaml --executor slurm --partition gpu     # one SLURM job array
    cxrmem-sweep SWEEP.yaml --summary                            # summarise the finished runs only

A sweep file (keys in :data:`SWEEP_KEYS`, executor options in :class:`ExecutorOptions`)::

    name: demo_ablation                               # folder runs/<name>/<variant>/seed<k>/
    base: configs/experiments/demo_synthetic.yaml     # relative to the sweep file or the project root
    set: {phase2.epochs: 5}                           # every run
    variants: {baseline: {memory.use_memory: false}, rarity: {}}
    grid: {memory.bank_size: [32, 64], memory.top_k: [1, 3]}    # more variants: bank_size=32,top_k=1, ...
    seeds: [0, 1, 2]                                  # the config key ``seed``: never the split
    reference: baseline
    executor: {name: local, jobs: 1}

Run (v, k) is ``train.py --config BASE --set <set> --set <command-line --set> --set <variant v>
--set seed=k --set experiment_name=<name>-<v>-seed<k> --output_dir ROOT/<v>/seed<k>``, later
settings winning. Its folder decides what is left to do: finished (metrics.json, predictions and a
config.yaml equal to the resolved configuration) -> skipped; config.yaml equal and a resume file ->
``--resume``; otherwise -> started (a finished run of another configuration is an error).

Summary (``ROOT/summary.{json,md,png}``): per variant, test AUC per finding and their mean, as mean
+- SD over seeds; per seed it has in common with the reference, DeLong's test per finding with
Holm's correction over the findings, and a paired bootstrap of the mean-AUC difference, with the
reference run's bootstrap settings (patients by default): the compare command's figures, to the digit. Differences are variant - reference. A finding (or the mean) is marked significant
when p < 0.05 (p_holm; bootstrap p for the mean) with the same sign of the difference in more than
half of the seeds compared.
"""

from __future__ import annotations

import argparse
import json
import itertools
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

# The experiment schema's own helpers, so that a sweep file is validated like an experiment file.
from .config import Config, _build, _closest, flatten, load_config, opt, read_yaml
from .data.prepare import ensure_synthetic, resolve_image_dir
from .evaluation.auc import mean_auc, per_class_auc
from .evaluation.paired import mean_sd
from .experiment import train_main
from .external import EXTERNAL_DIR, EXTERNAL_FILE
from .models.backbones import check_backbone
from .report import AUC_DECIMALS, format_auc, format_number, format_p, markdown_table, plot_auc_bars
from .report.compare import Evaluated, bootstrap_settings, compare_pair, load_evaluated
from .runs.folder import FINISHED, INTERRUPTED, RunFolder
from .utils import io
from .utils.commands import add_shared_options, guarded
from .utils.errors import UserError
from .utils.figures import safe_plot

SWEEP_KEYS = {
    "name": "names the sweep and its folder runs/<name> (default: the file's name)",
    "description": "free text",
    "base": "the experiment file every run starts from, relative to the sweep file or the project root",
    "set": "{dotted key: value} applied to every run",
    "variants": "{variant name: {dotted key: value}}; {} or null: the base as it is",
    "grid": "{dotted key: [values]}; every combination is one more variant, named key=value,...",
    "seeds": "training seeds (the config key seed); every variant runs once per seed (default [0])",
    "reference": "the variant every other one is compared with (default: the first)",
    "executor": "how runs are executed: name, jobs, partition, account, time, gpus_per_job, cpus_per_job, mem_gb",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")  # a newline in one run's arguments would make two commands
TEST_SPLIT = "test"
ALPHA = 0.05
POLL_SECONDS = 1.0
LOG_DIR = "logs"
SIGNIFICANCE_RULE = (f"p < {ALPHA} (p_holm per finding, paired bootstrap p for the mean AUC) with the same "
                     f"sign of the difference in more than half of the seeds compared with the reference")


@dataclass
class ExecutorOptions:
    name: str = opt("local", "local (processes on this machine) or slurm (one job array)", choices=("local", "slurm"))
    jobs: int = opt(1, "runs at a time (local: processes, each on its own GPU(s); slurm: array tasks)", lo=1)
    partition: str | None = opt(None, "slurm: partition, or several separated by commas (default: the cluster's)",
                                pattern=(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*",
                                         "a SLURM partition name (letters, digits, _ . -), or several separated by commas"))
    account: str | None = opt(None, "slurm: account to charge",
                              pattern=(r"[A-Za-z0-9_.-]+", "a SLURM account name (letters, digits, _ . -)"))
    time: int = opt(1440, "minutes a run may take before it is stopped", lo=1)
    gpus_per_job: int = opt(1, "GPUs per run (0: CPU; several: one process per GPU, as under torchrun)", lo=0)
    cpus_per_job: int = opt(8, "slurm: CPU cores per run", lo=1)
    mem_gb: int = opt(64, "slurm: memory per run in GB", lo=1)


@dataclass
class Sweep:
    name: str
    path: Path                           # the sweep file
    base: str                            # the experiment file, as train.py is given it
    common: list[str]                    # --set arguments of every run
    variants: dict[str, dict[str, Any]]  # name -> {dotted key: value}
    seeds: list[int]
    reference: str
    executor: ExecutorOptions


@dataclass
class Run:
    variant: str
    seed: int
    run_dir: Path
    overrides: list[str]
    config: Config = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


# --------------------------------------------------------------------------- the sweep file


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML (flow style) that reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("...").strip()  # the end-of-document marker YAML puts after a plain scalar


def set_argument(key: str, value: Any) -> str:
    """``key=value`` that ``--set`` reads back as ``value``."""
    return f"{key}={flow_yaml(value)}"


def _mapping(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of dotted keys to values, got {raw!r}")
    return flatten({str(k): v for k, v in raw.items()})


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{where}: {name!r} is not a usable folder name; use letters, digits and _ . , = + -")
    return name


def _value_text(value: Any) -> str:
    text = flow_yaml(value).strip("'\"")
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text)


def grid_variants(grid: dict[str, list], where: str) -> dict[str, dict[str, Any]]:
    """Every combination of the grid's values, named ``key=value,...`` by the keys' last parts
    (the whole dotted key where two last parts are equal)."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    if not keys:
        return {}
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    return {",".join(f"{label}={_value_text(v)}" for label, v in zip(labels, combo)): dict(zip(keys, combo))
            for combo in itertools.product(*(grid[k] for k in keys))}


def find_base(base: Any, sweep_path: Path) -> str:
    """The base experiment file: beside the sweep file, in a folder above it (the project root),
    or relative to the working directory."""
    if not isinstance(base, str) or not base:
        raise UserError(f"{sweep_path}: base: name the experiment file every run starts from, "
                        f"e.g. base: configs/experiments/demo_synthetic.yaml")
    folders = [sweep_path.parent, *sweep_path.resolve().parents, Path.cwd()]
    for folder in folders:
        candidate = folder / base
        if candidate.is_file():
            relative = os.path.relpath(candidate.resolve())
            return relative if not relative.startswith("..") else str(candidate.resolve())
    raise UserError(f"{sweep_path}: base {base} not found beside the sweep file, above it or in the working "
                    f"directory; give the experiment file's path from the project root")


def _seeds(raw: Any, where: str) -> list[int]:
    seeds = [0] if raw is None else raw
    if not isinstance(seeds, list) or not seeds or \
            any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"{where}: expected a non-empty list of integers >= 0, e.g. seeds: [0, 1, 2]; got {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: {seeds} repeats a seed; list each seed once")
    return seeds


def load_sweep(path, overrides=(), executor_overrides=None) -> Sweep:
    """Read and check a sweep file; ``overrides`` are command-line ``--set`` arguments for every run,
    ``executor_overrides`` command-line executor options (they win over the file's)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} not found; pass an existing file, e.g. configs/sweeps/demo_ablation.yaml")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise UserError(f"{key}: unknown key in {path}{_closest(str(key), SWEEP_KEYS)}")
    name = _check_name(raw.get("name", path.stem), f"{path}: name")

    named = raw.get("variants") or {}
    if not isinstance(named, dict):
        raise UserError(f"{path}: variants: expected a mapping of variant names to settings, got {named!r}")
    variants = {_check_name(str(v), f"{path}: variants"): _mapping(s, f"{path}: variants.{v}")
                for v, s in named.items()}
    for variant, settings in grid_variants(_mapping(raw.get("grid"), f"{path}: grid"), f"{path}: grid").items():
        if variant in variants:
            raise UserError(f"{path}: the grid makes a variant named {variant}, as variants does; rename one")
        variants[_check_name(variant, f"{path}: grid")] = settings
    if not variants:
        raise UserError(f"{path}: no runs; add variants (name: {{key: value}}) or a grid (key: [values])")

    reference = raw.get("reference", next(iter(variants)))
    if reference not in variants:
        raise UserError(f"{path}: reference {reference!r} is not a variant{_closest(str(reference), variants)}")
    executor_raw = raw.get("executor") or {}
    if not isinstance(executor_raw, dict):
        raise UserError(f"{path}: executor: expected a mapping, e.g. executor: {{name: local, jobs: 2}}")
    executor = _build(ExecutorOptions, {**executor_raw, **(executor_overrides or {})}, "executor.", str(path))
    common = [set_argument(k, v) for k, v in _mapping(raw.get("set"), f"{path}: set").items()]
    return Sweep(name=name, path=path, base=find_base(raw.get("base"), path), common=common + list(overrides),
                 variants=variants, seeds=_seeds(raw.get("seeds"), f"{path}: seeds"), reference=reference,
                 executor=executor)


# --------------------------------------------------------------------------- runs and their state


def plan_runs(sweep: Sweep, root: Path) -> list[Run]:
    """Every (variant, seed) with its resolved configuration, seed by seed; any invalid setting
    fails here, before anything runs."""
    runs = []
    for seed, (variant, settings) in itertools.product(sweep.seeds, sweep.variants.items()):
        run_dir = root / variant / f"seed{seed}"
        overrides = sweep.common + [set_argument(k, v) for k, v in settings.items()] + [
            f"seed={seed}", set_argument("experiment_name", f"{sweep.name}-{variant}-seed{seed}")]
        for argument in (sweep.base, str(run_dir), *overrides):
            if CONTROL_CHARACTER.search(argument):
                raise UserError(f"{sweep.path} (variant {variant}): {argument!r} holds a line break or another "
                                f"control character, and each run must stay one command line; remove it")
        try:
            cfg = load_config(sweep.base, overrides, output_dir=str(run_dir))
            check_backbone(cfg.model.backbone, cfg.data.image_size)
        except UserError as exc:
            raise UserError(f"{sweep.path} (variant {variant}, seed {seed}): {exc}") from None
        if not cfg.evaluation.save_predictions:
            raise UserError(f"{sweep.path}: evaluation.save_predictions is false, but the summary compares the "
                            f"runs' predictions; remove that setting")
        runs.append(Run(variant, seed, run_dir, overrides, cfg))
    return runs


def run_state(run: Run) -> str:
    """done | resume | start (see the module's docstring)."""
    folder = RunFolder(run.config)
    same, state = folder.holds_this_config(), folder.state()
    if state == FINISHED and not same:
        raise UserError(f"{run.run_dir} holds a finished run of another configuration (the sweep file changed?); "
                        f"delete that folder or give the sweep another --output_dir")
    if same and state == FINISHED and folder.predictions_file.is_file():
        return "done"
    return "resume" if same and state == INTERRUPTED else "start"


STATE_FLAGS = {"start": [], "resume": ["--resume"]}


def train_argv(sweep: Sweep, run: Run, state: str) -> list[str]:
    sets = [arg for assignment in run.overrides for arg in ("--set", assignment)]
    return ["--config", sweep.base, *sets, "--output_dir", str(run.run_dir), *STATE_FLAGS[state]]


def train_command() -> list[str]:
    """The shell form of a run: the project's train.py from the project root (where the relative
    paths of experiment files point), else the installed entry point."""
    return [sys.executable, "train.py"] if Path("train.py").is_file() else ["cxrmem-train"]


# --------------------------------------------------------------------------- executors


def run_training(argv: list[str]) -> None:
    """One run inside a submitit job: train.py with ``argv``; a failure fails the job.

    With several tasks per job (gpus_per_job > 1) every task is one process of a torchrun-style
    group: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the job.
    """
    import submitit
    import submitit.helpers

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    status = train_main(argv)
    if status:
        raise RuntimeError(f"train.py exited with status {status}")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("running a sweep needs submitit; pip install 'cxrmem[sweep]' (or use --dry-run and "
                        "run the printed commands yourself)") from None
    return submitit


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES is honoured)."""
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(listed) == count and all(d.isdigit() for d in listed):
        return [int(d) for d in listed]
    return list(range(count))


def gpu_groups(jobs: int, gpus_per_job: int, gpus: list[int]) -> list[list[int]]:
    """The GPUs of each of ``jobs`` slots: slot s takes the next ``gpus_per_job`` GPUs in turn,
    so with at least jobs x gpus_per_job GPUs no two slots share one."""
    if not gpus or gpus_per_job == 0:
        return [[] for _ in range(jobs)]
    return [[gpus[(slot * gpus_per_job + i) % len(gpus)] for i in range(gpus_per_job)] for slot in range(jobs)]


def prepare_shared_data(runs: list[Run]) -> None:
    """Generate the synthetic set and build the cache once, before parallel runs would race to."""
    seen = set()
    for run in runs:
        key = repr(run.config.data)
        if key not in seen:
            seen.add(key)
            ensure_synthetic(run.config.data)
            resolve_image_dir(run.config.data)


def run_local(sweep: Sweep, work: list[tuple[Run, list[str]]], root: Path) -> list[str]:
    """Run everything here, ``jobs`` at a time, each in its own process; returns the failed runs."""
    submitit = _submitit()
    options = sweep.executor
    groups = gpu_groups(options.jobs, options.gpus_per_job, visible_gpus())
    if options.jobs > 1 and len(work) > 1:
        prepare_shared_data([run for run, _ in work])
    pending, running, failed = list(work), {}, []
    total, finished = len(work), 0
    try:
        while pending or running:
            for slot in range(options.jobs):
                if slot in running or not pending:
                    continue
                run, argv = pending.pop(0)
                executor = submitit.LocalExecutor(folder=root / LOG_DIR)
                executor.update_parameters(timeout_min=options.time, gpus_per_node=len(groups[slot]),
                                           visible_gpus=groups[slot], tasks_per_node=max(1, len(groups[slot])))
                running[slot] = (run, executor.submit(run_training, argv), time.monotonic())
                gpus = ",".join(map(str, groups[slot])) or "none"
                print(f"started {run.name} (GPUs {gpus}); log {running[slot][1].paths.stdout}", flush=True)
            time.sleep(POLL_SECONDS)
            for slot, (run, job, started) in list(running.items()):
                if not job.done():
                    continue
                del running[slot]
                finished += 1
                minutes = (time.monotonic() - started) / 60
                if job.exception() is None:
                    print(f"[{finished}/{total}] finished {run.name} in {minutes:.1f} min", flush=True)
                else:
                    failed.append(run.name)
                    lines = (job.stderr() or "").splitlines()
                    cause = next((line for line in reversed(lines) if line.startswith("error: ")), "error")
                    print(f"[{finished}/{total}] FAILED {run.name} after {minutes:.1f} min ({cause}); see "
                          f"{job.paths.stderr}", flush=True)
    except KeyboardInterrupt:
        for _, job, _ in running.values():
            job.cancel(check=False)
        raise
    return failed


def check_slurm() -> None:
    """UserError unless SLURM's sbatch and srun are on PATH (submitit needs both), before anything is planned."""
    absent = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if absent:
        raise UserError(f"executor slurm: {' and '.join(absent)} not found on this machine (no SLURM here); run "
                        f"from a SLURM login node, or pass --executor local, or --dry-run to print the commands")


def submit_slurm(sweep: Sweep, work: list[tuple[Run, list[str]]], root: Path) -> None:
    """Submit every run as one SLURM job array (``jobs`` tasks at a time) and return at once."""
    submitit = _submitit()
    options = sweep.executor
    tasks = max(1, options.gpus_per_job)
    executor = submitit.SlurmExecutor(folder=root / "slurm")
    parameters = dict(job_name=f"sweep-{sweep.name}", partition=options.partition, account=options.account,
                      time=options.time, ntasks_per_node=tasks, cpus_per_task=max(1, options.cpus_per_job // tasks),
                      mem=f"{options.mem_gb}GB", gpus_per_node=options.gpus_per_job or None,
                      array_parallelism=options.jobs)
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    jobs = executor.map_array(run_training, [argv for _, argv in work])
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted SLURM job {array_id}: {len(jobs)} runs, {options.jobs} at a time; logs in {root / 'slurm'}")
    print(f"when it has finished: cxrmem-sweep {sweep.path} --summary (or run this command again to "
          f"submit what is left)")
    return None


# Each returns the runs that failed, or None when the runs were handed to a scheduler.
EXECUTORS = {"local": run_local, "slurm": submit_slurm}


# --------------------------------------------------------------------------- the summary


def class_aucs(test: Evaluated) -> dict[str, Optional[float]]:
    """ROC AUC per finding (None without a positive or a negative)."""
    return per_class_auc(test.probs, test.targets, test.labels)


def significant(pairs: list[tuple[Optional[float], Optional[float]]]) -> bool:
    """(difference, p) per seed -> the rule of :data:`SIGNIFICANCE_RULE`."""
    up = sum(1 for d, p in pairs if p is not None and d is not None and p < ALPHA and d > 0)
    down = sum(1 for d, p in pairs if p is not None and d is not None and p < ALPHA and d < 0)
    return bool(pairs) and 2 * max(up, down) > len(pairs)


def _mean_sd(values) -> dict:
    result = mean_sd(list(values))
    return {"mean": result.mean, "sd": result.sd}


def same_test(tests: dict, run_dirs: dict, where: str) -> Evaluated:
    """The first run's test predictions; UserError when another run was tested on other images or labels."""
    (first_key, first), *_ = tests.items()
    for key, test in tests.items():
        if test.names != first.names or test.labels != first.labels or \
                not np.array_equal(test.targets, first.targets, equal_nan=True):
            raise UserError(f"{run_dirs[key]} was tested on other images or labels than {run_dirs[first_key]}{where}; "
                            f"every run of a sweep needs the same data.data_dir, data.seed and data.valid_pct")
    return first


def compare_variants(sweep: Sweep, tests: dict, run_dirs: dict, labels: list[str]) -> dict:
    """{variant: its AUCs over seeds and its paired comparison with the reference run of each seed}."""
    variants = {}
    order = [sweep.reference] + [v for v in sweep.variants if v != sweep.reference]
    for variant, settings in ((v, sweep.variants[v]) for v in order):
        seeds = [s for s in sweep.seeds if (variant, s) in tests]
        aucs = {s: class_aucs(tests[(variant, s)]) for s in seeds}
        compared = [s for s in seeds if (sweep.reference, s) in tests] if variant != sweep.reference else []
        vs = {s: compare_pair(tests[(sweep.reference, s)], tests[(variant, s)],
                              bootstrap_settings(run_dirs[(sweep.reference, s)])) for s in compared}
        variants[variant] = {
            "settings": settings,
            "seeds": seeds,
            "mean_auc": _mean_sd(mean_auc(aucs[s]) for s in seeds),
            "per_class": {label: _mean_sd(aucs[s][label] for s in seeds) for label in labels},
            "per_seed": {str(s): {"mean_auc": mean_auc(aucs[s]), "per_class": aucs[s]} for s in seeds},
            "vs_reference": {str(s): vs[s] for s in compared},
            "delta_mean_auc": _mean_sd(vs[s]["delta_mean_auc"] for s in compared),
            "significant": {
                "mean_auc": significant([(vs[s]["delta_mean_auc"], vs[s]["p_bootstrap"])
                                         for s in compared]),
                "per_class": {label: significant([(vs[s]["per_class"][label]["delta_auc"],
                                                   vs[s]["per_class"][label]["p_holm"]) for s in compared])
                              for label in labels},
            },
        }
    return variants


def external_sets(runs: list[Run]) -> list[str]:
    """The external evaluations (folders of <run>/external/ with their external.json) every run has."""
    present = [{p.name for p in (run.run_dir / EXTERNAL_DIR).glob("*") if (p / EXTERNAL_FILE).is_file()}
               for run in runs]
    return sorted(set.intersection(*present)) if present else []


def sweep_summary(sweep: Sweep, runs: list[Run]) -> Optional[dict]:
    """The summary.json contract (None when no run has finished). Each variant is compared with the
    reference run of the same seed as the compare command does (:func:`cxrmem.report.compare.compare_pair`,
    with the reference run's bootstrap settings), so both give the same figures; ``external`` holds the
    same comparison on every external data set all the runs were evaluated on."""
    finished = [run for run in runs if run_state(run) == "done"]
    if not finished:
        return None
    run_dirs = {(run.variant, run.seed): run.run_dir for run in finished}
    tests = {(run.variant, run.seed): load_evaluated(run.run_dir, TEST_SPLIT) for run in finished}
    first = same_test(tests, run_dirs, "")
    external = {}
    for name in external_sets(finished):
        info = json.loads((finished[0].run_dir / EXTERNAL_DIR / name / EXTERNAL_FILE).read_text())
        ext = {(run.variant, run.seed): load_evaluated(run.run_dir / EXTERNAL_DIR / name, info["split"])
               for run in finished}
        ext_first = same_test(ext, run_dirs, f" on {name}")
        external[name] = {"dataset": info["dataset"], "split": info["split"], "labels": ext_first.labels,
                          "test_images": len(ext_first.names), "test_patients": len(set(ext_first.patients)),
                          "variants": compare_variants(sweep, ext, run_dirs, ext_first.labels)}
    return {
        "sweep": sweep.name, "base": sweep.base, "split": TEST_SPLIT, "reference": sweep.reference,
        "seeds": sweep.seeds, "labels": first.labels,
        "test_images": len(first.names), "test_patients": len(set(first.patients)),
        "alpha": ALPHA, "significance_rule": SIGNIFICANCE_RULE,
        "missing": [run.name for run in runs if (run.variant, run.seed) not in tests],
        "variants": compare_variants(sweep, tests, run_dirs, first.labels),
        "external": external,
    }


def mean_sd_text(stats: dict, signed: bool = False) -> str:
    """{mean, sd} as "0.7012 ± 0.0100" (the mean alone without an SD), 'n/a' without a mean."""
    text = format_number(stats["mean"], AUC_DECIMALS, signed)
    return text if stats["mean"] is None or stats["sd"] is None else f"{text} ± {format_auc(stats['sd'])}"


def mean_auc_table(variants: dict, ref: str) -> list[str]:
    rows = []
    for name, v in variants.items():
        star = " *" if v["significant"]["mean_auc"] else ""
        delta = "reference" if name == ref else mean_sd_text(v["delta_mean_auc"], signed=True) + star
        ps = ", ".join(f"{s}: {format_p(c['p_bootstrap'])}" for s, c in v["vs_reference"].items())
        rows.append([name, str(len(v["seeds"])), mean_sd_text(v["mean_auc"]), delta, ps])
    return markdown_table(["variant", "seeds", "mean AUC (mean ± SD)", f"Δ vs {ref} (mean ± SD)",
                           "paired bootstrap p per seed"], rows, left=5)


def per_finding_table(variants: dict, labels: list[str]) -> list[str]:
    rows = [[label, *(mean_sd_text(v["per_class"][label]) + (" *" if v["significant"]["per_class"][label] else "")
                      for v in variants.values())] for label in labels]
    return markdown_table(["finding", *variants], rows, left=len(variants) + 1)


def summary_markdown(summary: dict) -> str:
    ref, variants = summary["reference"], summary["variants"]
    lines = [f"# Sweep {summary['sweep']}", "",
             f"Base `{summary['base']}`; seeds {', '.join(map(str, summary['seeds']))}; reference **{ref}**. "
             f"Every run was tested on the same {summary['test_images']} {summary['split']} images "
             f"({summary['test_patients']} patients).", ""]
    if summary["missing"]:
        lines += [f"Not finished (left out): {', '.join(summary['missing'])}.", ""]
    lines += ["## Mean AUC", "", *mean_auc_table(variants, ref)]
    lines += ["", "## AUC per finding (mean ± SD over seeds)", "", *per_finding_table(variants, summary["labels"])]
    external = summary.get("external", {})
    if external:
        header = ["variant", f"{summary['split']} (own data)", *(f"{name} ({e['test_images']} images)"
                                                                 for name, e in external.items())]
        rows = [[name, mean_sd_text(v["mean_auc"]), *(mean_sd_text(e["variants"][name]["mean_auc"])
                                                      for e in external.values())] for name, v in variants.items()]
        lines += ["", "## Train x test: mean AUC on each test set (mean ± SD over seeds)", "",
                  *markdown_table(header, rows, left=len(header)),
                  "", "External sets are scored on the findings they share with the model (external.json of each run)."]
        for name, e in external.items():
            lines += ["", f"## External: {name} ({e['split']} split, {e['test_images']} images)", "",
                      *mean_auc_table(e["variants"], ref), "", *per_finding_table(e["variants"], e["labels"])]
    lines += ["", f"`*`: different from {ref}: {summary['significance_rule']}. "
              "Per-seed differences, DeLong p-values, Holm-adjusted p-values and bootstrap intervals are in "
              "summary.json.", ""]
    return "\n".join(lines)


def plot_summary(summary: dict, path) -> Path:
    """Test AUC per finding and their mean: one bar per variant (mean over seeds, SD as error bar,
    clipped to [0, 1]), a star above a bar that differs from the reference by the significance rule."""
    groups = ["Mean AUC"] + summary["labels"]
    names = list(summary["variants"])
    values, errors, marks = [], [], []
    for name in names:
        v = summary["variants"][name]
        stats = [v["mean_auc"]] + [v["per_class"][label] for label in summary["labels"]]
        values.append([s["mean"] for s in stats])
        sds = [0.0 if s["sd"] is None else s["sd"] for s in stats]
        errors.append(np.array([sds, sds]))
        marks.append([v["significant"]["mean_auc"]] + [v["significant"]["per_class"][label]
                                                       for label in summary["labels"]])
    return plot_auc_bars(names, groups, values, path,
                         f"Sweep {summary['sweep']}: * differs from {summary['reference']}", errors=errors,
                         marks=marks, ylabel=f"{summary['split']} ROC AUC, mean ± SD over seeds")


def write_summary(sweep: Sweep, runs: list[Run], root: Path) -> Optional[dict]:
    """summary.json, summary.md and summary.png in ``root``; None (nothing written) without a finished run."""
    summary = sweep_summary(sweep, runs)
    if summary is None:
        return None
    io.write_json(root / "summary.json", summary)
    io.write_text(root / "summary.md", summary_markdown(summary))
    safe_plot(plot_summary, summary, root / "summary.png")
    return summary


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrmem-sweep", description="Train every variant x seed of a sweep file "
                                "(skipping finished runs, resuming interrupted ones), then compare them.")
    p.add_argument("sweep", help="sweep file, e.g. configs/sweeps/demo_ablation.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print one train.py command per run still to do (nothing else) and exit")
    mode.add_argument("--summary", action="store_true", help="only write the summary of the finished runs")
    add_shared_options(p, "set", "debug")  # --set: in every run
    p.add_argument("--output_dir", help="the sweep's folder (default: runs/<sweep name>)")
    p.add_argument("--executor", help="local or slurm (default: the sweep file's executor.name)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: the sweep file's executor.jobs)")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time", type=int, help="minutes a run may take")
    p.add_argument("--gpus-per-job", type=int, dest="gpus_per_job", help="GPUs per run")
    return p


@guarded
def main(argv) -> int:
    args = parser().parse_args(argv)
    cli_executor = {"name": args.executor, "jobs": args.jobs, "partition": args.partition, "time": args.time,
                    "gpus_per_job": args.gpus_per_job}
    sweep = load_sweep(args.sweep, args.overrides, {k: v for k, v in cli_executor.items() if v is not None})
    root = Path(args.output_dir) if args.output_dir else Path("runs") / sweep.name
    if sweep.executor.name == "slurm" and not (args.dry_run or args.summary):
        check_slurm()
    runs = plan_runs(sweep, root)
    if args.summary:
        return report_summary(sweep, runs, root)
    states = [(run, run_state(run)) for run in runs]
    work = [(run, train_argv(sweep, run, state)) for run, state in states if state != "done"]
    if args.dry_run:
        for _, argv in work:
            print(shlex.join(train_command() + argv))
        return 0
    counts = {state: sum(1 for _, s in states if s == state) for state in ("done", "resume", "start")}
    print(f"sweep {sweep.name}: {len(runs)} runs in {root}: {counts['done']} finished, {counts['resume']} to "
          f"resume, {counts['start']} to start", flush=True)
    failed = []
    if work:
        try:
            failed = EXECUTORS[sweep.executor.name](sweep, work, root)
        except KeyboardInterrupt:
            print("\ninterrupted: finished epochs are saved; run the same command again to go on", file=sys.stderr)
            return 130
        if failed is None:
            return 0
    return report_summary(sweep, runs, root, failed)


def report_summary(sweep: Sweep, runs: list[Run], root: Path, failed=()) -> int:
    """Write the summary of the finished runs; status 1 if runs failed, a UserError if none finished."""
    summary = write_summary(sweep, runs, root)
    if summary is not None:
        print(f"summary: {root / 'summary.md'} ({root / 'summary.json'}, {root / 'summary.png'})")
    if failed:
        print(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); see their logs in {root / LOG_DIR}, "
              f"then run the same command again", file=sys.stderr)
        return 1
    if summary is None:
        raise UserError(f"no finished run of sweep {sweep.name} in {root}; run the sweep first")
    return 0



if __name__ == "__main__":  # python -m cxrmem.sweep, the older spelling of cxrmem sweep
    sys.exit(main())
