"""Sweeps: the sweep file, run states, --dry-run, the executors (local for real, SLURM with a fake
sbatch), the summary's statistics, and the training seed that never moves the split."""

from __future__ import annotations

import json
import math
import os
import shlex
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

import cxrmem
from cxrmem.experiment import train_parser
from cxrmem.config import apply_override, dump_yaml, from_dict, load_config
from cxrmem.data.chestxray14 import FINDINGS, patient_ids
from cxrmem.data.prepare import prepare_data
from cxrmem.utils.errors import UserError
from cxrmem.sweep import ALPHA, gpu_groups, grid_variants, load_sweep, main, plan_runs, run_state, set_argument, significant, train_argv, train_command
from cxrmem.evaluation.auc import mean_auc, per_class_auc
from cxrmem.report.compare import main as compare_main
from cxrmem.train.phases import resume_path
from cxrmem.runs.folder import save_predictions

from helpers import ROOT, run_cli, tiny_config, write_fake_run

SWEEPS = ROOT / "configs" / "sweeps"

def tiny_base(path):
    """The sweep's base: the tiny experiment in one phase of one epoch."""
    return tiny_config(path, phase1={"freeze_epochs": 0}, phase2=None, evaluation={"bootstrap_resamples": 50})


def write_sweep(folder: Path, data_dir, executor="{name: local, jobs: 2}", extra="") -> Path:
    """A 2 variants x 2 seeds sweep of the tiny experiment (one epoch per run)."""
    tiny_base(folder / "tiny.yaml")
    path = folder / "tiny_sweep.yaml"
    path.write_text(f"""
name: tiny_sweep
base: tiny.yaml
set: {{data.data_dir: {data_dir}}}
variants:
  nomem: {{memory.use_memory: false}}
  fifo: {{}}
seeds: [0, 1]
reference: nomem
executor: {executor}
{extra}""")
    return path


# --------------------------------------------------------------------------- the training seed


def test_seed_key_defaults_to_data_seed_and_is_validated():
    assert from_dict({"data": {"seed": 5}}).train_seed == 5  # null: data.seed, as before
    cfg = from_dict({"seed": 7, "data": {"seed": 5}})
    assert (cfg.train_seed, cfg.data.seed) == (7, 5)
    assert from_dict({"seed": 0}).train_seed == 0
    for bad, fragment in [(1.5, "seed: expected an integer or null"), (True, "expected an integer or null"),
                          (-1, "seed: -1 is out of range; it must be >= 0")]:
        with pytest.raises(UserError, match=fragment):
            from_dict({"seed": bad})


def test_seed_never_moves_the_split(tiny_data, tmp_path):
    """Data preparation reads data.seed only: the same split whatever the training seed."""
    def split(**raw):
        cfg = from_dict({"data": {"data_dir": str(tiny_data)}, "output_dir": str(tmp_path), **raw})
        return prepare_data(cfg).frame.set_index("image_index")["split"].sort_index()

    assert split(seed=0).equals(split(seed=1))
    assert not split(seed=0).equals(split(data={"data_dir": str(tiny_data), "seed": 43}))  # data.seed moves it


# --------------------------------------------------------------------------- the sweep file


@pytest.mark.parametrize("value", [5, 0.001, 3e-4, "abc", "true", "1e-3", None, True, {}, {"n_patients": 10},
                                   "a: b", "", "x,y=z", "timm/convnext_tiny"])
def test_set_argument_is_read_back_by_set(value):
    raw = {}
    apply_override(raw, set_argument("model.key", value))
    assert raw["model"]["key"] == value and type(raw["model"]["key"]) is type(value)


def test_grid_expands_a_product_with_readable_names():
    variants = grid_variants({"memory.bank_size": [256, 512], "memory.top_k": [1, 3, 5]}, "grid")
    assert len(variants) == 6
    assert variants["bank_size=256,top_k=5"] == {"memory.bank_size": 256, "memory.top_k": 5}
    clash = grid_variants({"phase1.epochs": [1], "phase2.epochs": [2], "model.backbone": ["timm/resnet10t"]}, "g")
    assert list(clash) == ["phase1.epochs=1,phase2.epochs=2,backbone=timm-resnet10t"]


def test_variants_grid_seeds_and_settings(tmp_path, tiny_data):
    path = write_sweep(tmp_path, tiny_data, extra="grid: {memory.top_k: [1, 2]}\n")
    sweep = load_sweep(path, ["phase1.total_epochs=2"])
    assert list(sweep.variants) == ["nomem", "fifo", "top_k=1", "top_k=2"]
    runs = plan_runs(sweep, tmp_path / "out")
    assert [r.name for r in runs[:4]] == ["nomem/seed0", "fifo/seed0", "top_k=1/seed0", "top_k=2/seed0"]
    assert len(runs) == 8 and {r.seed for r in runs} == {0, 1}
    for run in runs:
        cfg = run.config
        assert cfg.seed == run.seed and cfg.data.seed == 0  # the sweep's seed is the training seed only
        assert cfg.output_dir == str(tmp_path / "out" / run.variant / f"seed{run.seed}")
        assert cfg.phase1.total_epochs == 2 and cfg.data.data_dir == str(tiny_data)
        assert cfg.memory.use_memory == (run.variant != "nomem")
        assert cfg.memory.top_k == {"top_k=1": 1, "top_k=2": 2}.get(run.variant, 3)
    assert len({r.config.experiment_name for r in runs}) == 8


def test_base_is_found_beside_the_sweep_file_or_in_the_project_root(tmp_path, monkeypatch):
    beside = tmp_path / "here.yaml"
    beside.write_text("variants: {a: {}}\nbase: tiny.yaml\n")
    tiny_base(tmp_path / "tiny.yaml")
    assert Path(load_sweep(beside).base).resolve() == (tmp_path / "tiny.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    assert load_sweep(SWEEPS / "demo_ablation.yaml").base.endswith("configs/experiments/demo_synthetic.yaml")


@pytest.mark.parametrize("text, fragment", [
    ("sedes: [0]", "sedes: unknown key in"),
    ("sedes: [0]", "did you mean seeds?"),
    ("reference: nomm", "reference 'nomm' is not a variant; did you mean nomem?"),
    ("executor: {nmae: local}", "executor.nmae: unknown key in"),
    ("executor: {jobs: 0}", "executor.jobs: 0 is out of range; it must be >= 1"),
    ("executor: {name: pbs}", "executor.name: 'pbs' is not one of local, slurm"),
    ("grid: {memory.top_k: []}", "grid.memory.top_k: expected a non-empty list"),
    ("grid: {memory.top_k: 3}", "grid.memory.top_k: expected a non-empty list"),
    ("seeds: [0, 0]", "repeats a seed"),
    ("seeds: [-1]", "seeds: expected a non-empty list of integers >= 0"),
    ("variants: {'a b': {}}", "'a b' is not a usable folder name"),
    ("variants: {x: {memory.bank_sise: 4}}", "(variant x, seed 0): memory.bank_sise: unknown key in"),
    ("variants: {x: {memory.bank_sise: 4}}", "did you mean bank_size?"),
    ("set: {evaluation.save_predictions: false}", "evaluation.save_predictions is false"),
    ("base: nowhere.yaml", "base nowhere.yaml not found"),
])
def test_mistakes_are_one_line_naming_the_key(tmp_path, tiny_data, text, fragment):
    path = write_sweep(tmp_path, tiny_data)
    raw = yaml.safe_load(path.read_text())
    for key, value in yaml.safe_load(text).items():
        raw[key] = raw[key] | value if key == "variants" else value
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as info:
        plan_runs(load_sweep(path), tmp_path / "out")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_command_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("base: x.yaml\nvariant: {a: {}}\n")
    status, out, err = run_cli(main, [path, "--dry-run"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1 and "did you mean variants?" in err


def test_the_sweep_files_of_the_project(monkeypatch):
    monkeypatch.chdir(ROOT)
    demo = load_sweep(SWEEPS / "demo_ablation.yaml")
    runs = plan_runs(demo, Path("runs/demo_ablation"))
    assert list(demo.variants) == ["baseline", "rarity", "diversity", "fifo", "bank32"]
    assert demo.seeds == [0, 1, 2] and demo.reference == "baseline" and len(runs) == 15
    by = {(r.variant, r.seed): r.config for r in runs}
    for cfg in by.values():
        assert not cfg.phase1.use_lr_finder and cfg.phase1.base_lr == 0.001
        assert cfg.phase1.total_epochs == 2 and cfg.phase2.epochs == 3
        assert cfg.data.seed == 42 and cfg.data.data_dir == "data/synthetic_demo"
    assert not by["baseline", 0].memory.use_memory
    assert by["diversity", 1].memory.update_strategy == "diversity"
    assert by["diversity", 1].memory.rarity_threshold == 0.25
    assert by["fifo", 2].memory.update_strategy == "fifo" and by["bank32", 0].memory.bank_size == 32
    assert [by["rarity", s].train_seed for s in (0, 1, 2)] == [0, 1, 2]

    paper = load_sweep(SWEEPS / "paper_ablations.yaml")
    configs = [r.config for r in plan_runs(paper, Path("runs/paper_ablations"))]
    assert paper.executor.name == "slurm" and paper.executor.partition and len(paper.seeds) >= 3
    assert {c.memory.update_strategy for c in configs} >= {"rarity", "diversity", "hybrid", "statistical", "fifo"}
    assert {c.memory.bank_size for c in configs} >= {256, 512, 1024}
    assert {c.memory.top_k for c in configs} >= {1, 3, 5}
    assert {c.memory.normalize_retrieved for c in configs} >= {"both", "none"}
    assert {c.model.backbone for c in configs} >= {"efficientnet_v2_s", "efficientnet_v2_m", "resnet50",
                                                   "densenet121"}
    assert any(not c.memory.use_memory for c in configs)


# --------------------------------------------------------------------------- run states and --dry-run


def fake_finished(run, test_names=None, probs=None, targets=None):
    """A finished run folder as train.py leaves it (config.yaml, metrics.json, predictions)."""
    names = test_names or ["00000001_000.png"]
    probs = np.zeros((len(names), 14)) if probs is None else probs
    targets = np.zeros((len(names), 14)) if targets is None else targets
    write_fake_run(run.run_dir, run.config, metrics={},
                   predictions={"probs": probs, "targets": targets, "image_index": names, "split": "test"})


def test_states_and_dry_run_print_exactly_the_runs_left(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, tiny_data)
    out_dir = tmp_path / "out"
    runs = {r.name: r for r in plan_runs(load_sweep(path), out_dir)}
    fake_finished(runs["nomem/seed0"])
    interrupted = runs["fifo/seed0"]  # config.yaml and a resume file: --resume
    interrupted.run_dir.mkdir(parents=True)
    (interrupted.run_dir / "config.yaml").write_text(dump_yaml(interrupted.config))
    resume_path(interrupted.config).parent.mkdir()
    resume_path(interrupted.config).write_bytes(b"x")
    early = runs["nomem/seed1"]  # killed before its first epoch: config.yaml only -> started again
    early.run_dir.mkdir(parents=True)
    (early.run_dir / "config.yaml").write_text(dump_yaml(early.config))
    assert [run_state(r) for r in runs.values()] == ["done", "resume", "start", "start"]

    status, out, err = run_cli(main, [path, "--output_dir", out_dir, "--dry-run"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    by_dir = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[1] == "train.py" and Path(argv[0]).name.startswith("python")
        args = train_parser().parse_args(argv[2:])
        cfg = load_config(args.config, args.overrides, output_dir=args.output_dir)
        by_dir[args.output_dir] = (args.resume, cfg)
    assert set(by_dir) == {str(runs[n].run_dir) for n in ("fifo/seed0", "nomem/seed1", "fifo/seed1")}
    for name in ("fifo/seed0", "nomem/seed1", "fifo/seed1"):
        resume, cfg = by_dir[str(runs[name].run_dir)]
        assert resume == (name == "fifo/seed0")
        assert dump_yaml(cfg) == dump_yaml(runs[name].config)  # the command is the planned run

    (runs["nomem/seed0"].run_dir / "config.yaml").write_text(dump_yaml(runs["fifo/seed1"].config))
    status, out, err = run_cli(main, [path, "--output_dir", out_dir, "--dry-run"], capsys)
    assert status == 2 and "holds a finished run of another configuration" in err and out == ""


def test_gpu_groups_give_each_slot_its_own_gpus():
    assert gpu_groups(2, 1, [0, 1]) == [[0], [1]]
    assert gpu_groups(2, 2, [4, 5, 6, 7]) == [[4, 5], [6, 7]]
    assert gpu_groups(3, 1, [0]) == [[0], [0], [0]]  # more slots than GPUs: they share
    assert gpu_groups(2, 1, []) == [[], []]  # CPU only


# --------------------------------------------------------------------------- SLURM without a cluster


def test_slurm_executor_submits_one_job_array(tmp_path, tiny_data, capsys, monkeypatch):
    import submitit

    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    scripts = {"sbatch": f'#!/bin/sh\necho "$@" >> {record}/args\ncp "$1" {record}/script.sh\n'
                         f'echo "Submitted batch job 4242"\n',
               "srun": "#!/bin/sh\nexit 1\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, tiny_data, executor="{name: slurm, partition: short, time: 90, jobs: 3}")
    out_dir = tmp_path / "out"
    status, out, err = run_cli(main, [path, "--output_dir", out_dir, "--gpus-per-job", "2", "--partition", "gpu"],
                               capsys)
    assert status == 0, err
    assert (record / "args").read_text().count("\n") == 1  # one sbatch call: one array
    script = (record / "script.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=64GB", "#SBATCH --job-name=sweep-tiny_sweep"):
        assert line in script, line
    assert "submitted SLURM job 4242: 4 runs" in out
    runs = plan_runs(load_sweep(path), out_dir)
    for i, run in enumerate(runs):  # task i trains run i
        submitted = submitit.core.utils.DelayedSubmission.load(out_dir / "slurm" / f"4242_{i}_submitted.pkl")
        argv = submitted.args[0]
        assert argv[argv.index("--output_dir") + 1] == str(run.run_dir)
        assert f"seed={run.seed}" in argv and submitted.function.__name__ == "run_training"


@pytest.mark.parametrize("present, absent", [((), "sbatch and srun"), (("sbatch",), "srun")])
def test_slurm_executor_without_slurm_is_one_line_before_anything_runs(tmp_path, tiny_data, capsys, monkeypatch,
                                                                       present, absent):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in present:
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    path = write_sweep(tmp_path, tiny_data, executor="{name: slurm, partition: short}")
    status, out, err = run_cli(main, [path, "--output_dir", tmp_path / "out"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert f"executor slurm: {absent} not found on this machine" in err and "--executor local" in err
    assert not (tmp_path / "out").exists()
    status, out, _ = run_cli(main, [path, "--output_dir", tmp_path / "out", "--dry-run"], capsys)
    assert status == 0 and out.count("\n") == 4  # a dry run needs no SLURM


@pytest.mark.parametrize("value", ["x\ntouch {marker} #\n", "touch {marker}\n", "a\n\nb"])
def test_a_line_break_in_a_sweep_value_is_refused_before_anything_is_printed(tmp_path, tiny_data, capsys, value):
    marker = tmp_path / "owned"
    extra = "description: sweep\n"
    path = write_sweep(tmp_path, tiny_data)
    text = path.read_text().replace("  fifo: {}", f"  fifo: {{description: {json.dumps(value.format(marker=marker))}}}")
    path.write_text(text + extra)
    status, out, err = run_cli(main, [path, "--output_dir", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert "(variant fifo)" in err and "control character" in err and "one command line" in err


def test_shell_syntax_in_sweep_values_stays_data_when_the_dry_run_is_run_line_by_line(tmp_path, tiny_data, capsys):
    """Each printed line, given to bash as docs/ablations.md says, runs one command with exactly the
    run's arguments (the program swapped for printf, so that nothing trains): nothing else executes."""
    marks = [tmp_path / f"owned{i}" for i in range(5)]
    values = [f"x; touch {marks[0]} #", f"$(touch {marks[1]})", f"`touch {marks[2]}`", f"a' && touch {marks[3]} '",
              f"x\rtouch {marks[4]}"]  # a carriage return: YAML writes it escaped, so the run stays one line
    path = write_sweep(tmp_path, tiny_data)
    variants = "\n".join(f"  v{i}: {{description: {json.dumps(v)}}}" for i, v in enumerate(values))
    path.write_text(path.read_text().replace("  fifo: {}", variants))
    status, out, err = run_cli(main, [path, "--output_dir", tmp_path / "out", "--dry-run"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 * (len(values) + 1)  # one line per run (5 variants x 2 seeds)
    runs = plan_runs(load_sweep(path), tmp_path / "out")
    for line, run in zip(lines, runs):
        program = shlex.join(train_command())
        assert line.startswith(program + " ")
        shown = subprocess.run(["bash", "-c", "printf '%s\\0' " + line[len(program) + 1:]], capture_output=True,
                               cwd=tmp_path, check=True).stdout.decode().split("\0")[:-1]
        assert shown == train_argv(load_sweep(path), run, "start")
    assert not any(mark.exists() for mark in marks)


@pytest.mark.parametrize("field, value", [("partition", "gpu\ntouch {marker} #"), ("partition", "gpu;touch {marker}"),
                                          ("account", "lab $(touch {marker})"), ("partition", "a,,b")])
def test_executor_fields_are_refused_unless_slurm_allows_them(tmp_path, tiny_data, capsys, monkeypatch, field,
                                                              value):
    marker = tmp_path / "owned"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # a stand-in SLURM that runs the batch script it is given
        (bin_dir / name).write_text('#!/bin/sh\nsh "$1" > /dev/null 2>&1; echo "Submitted batch job 7"\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(tmp_path, tiny_data, executor=f"{{name: slurm, {field}: {json.dumps(value.format(marker=marker))}}}")
    status, out, err = run_cli(main, [path, "--output_dir", tmp_path / "out"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"executor.{field}:" in err and "SLURM" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the summary's statistics


def fake_sweep_results(tmp_path, tiny_data, monkeypatch):
    """Three variants x 3 seeds on 240 test images of 80 patients: nomem the reference, fifo a clearly
    better model, same the reference's own scores."""
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, tiny_data, extra="")
    raw = yaml.safe_load(path.read_text())
    raw["variants"]["same"] = {"memory.bank_size": 8}
    raw["seeds"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    sweep = load_sweep(path)
    runs = plan_runs(sweep, tmp_path / "out")
    rng = np.random.default_rng(0)
    names = [f"{p:08d}_{f:03d}.png" for p in range(80) for f in range(3)]
    targets = (rng.random((240, 14)) < 0.3).astype(float)
    targets[:, 13] = 0.0  # Hernia: no positive test image, AUC undefined
    scores = {}
    for run in runs:
        if run.variant == "same":
            probs = scores[("nomem", run.seed)]
        else:
            signal = 0.3 if run.variant == "nomem" else 2.5
            probs = 1 / (1 + np.exp(-(signal * (targets - 0.5) + rng.normal(0, 1, targets.shape))))
        scores[(run.variant, run.seed)] = probs
        order = rng.permutation(240)  # each file lists the images in its own order
        fake_finished(run, [names[i] for i in order], probs[order], targets[order])
    return sweep, runs, scores, targets, names


def test_summary_against_an_independent_computation(tmp_path, tiny_data, capsys, monkeypatch):
    sweep, runs, scores, targets, names = fake_sweep_results(tmp_path, tiny_data, monkeypatch)
    status, out, err = run_cli(main, [sweep.path, "--output_dir", tmp_path / "out", "--summary"], capsys)
    assert status == 0, err

    def strict(constant):
        raise AssertionError(f"{constant} in summary.json")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=strict)
    assert summary["reference"] == "nomem" and list(summary["variants"]) == ["nomem", "fifo", "same"]
    assert summary["test_images"] == 240 and summary["test_patients"] == 80 and summary["missing"] == []

    def sk_aucs(probs):
        return [roc_auc_score(targets[:, c], probs[:, c]) if 0 < targets[:, c].sum() < 240 else None
                for c in range(14)]

    for variant, v in summary["variants"].items():
        assert v["seeds"] == [0, 1, 2]
        per_seed = {s: sk_aucs(scores[(variant, s)]) for s in (0, 1, 2)}
        means = [np.mean([a for a in per_seed[s] if a is not None]) for s in (0, 1, 2)]
        assert v["mean_auc"]["mean"] == pytest.approx(np.mean(means), abs=1e-9)
        assert v["mean_auc"]["sd"] == pytest.approx(np.std(means, ddof=1), abs=1e-9)
        for c, label in enumerate(FINDINGS):
            stats = v["per_class"][label]
            if label == "Hernia":
                assert stats == {"mean": None, "sd": None}
                continue
            assert stats["mean"] == pytest.approx(np.mean([per_seed[s][c] for s in (0, 1, 2)]), abs=1e-9)
            assert stats["sd"] == pytest.approx(np.std([per_seed[s][c] for s in (0, 1, 2)], ddof=1), abs=1e-9)
        if variant == "nomem":
            assert v["vs_reference"] == {}
            continue
        assert set(v["vs_reference"]) == {"0", "1", "2"}
        for seed, comparison in v["vs_reference"].items():
            ref, mine = sk_aucs(scores[("nomem", int(seed))]), per_seed[int(seed)]
            deltas = [m - r for m, r in zip(mine, ref) if m is not None]
            assert comparison["delta_mean_auc"] == pytest.approx(np.mean(deltas), abs=1e-9)
            for c, label in enumerate(FINDINGS):
                entry = comparison["per_class"][label]
                assert set(entry) >= {"delta_auc", "p_delong", "p_holm"}
                if label == "Hernia":
                    assert set(entry.values()) == {None}
                    continue
                assert entry["delta_auc"] == pytest.approx(mine[c] - ref[c], abs=1e-9)
                assert entry["p_holm"] >= entry["p_delong"]
            low, high = comparison["delta_mean_auc_ci95"]
            assert comparison["resamples_used"] > 0 and low <= comparison["delta_mean_auc"] <= high

    same, better = summary["variants"]["same"], summary["variants"]["fifo"]
    for comparison in same["vs_reference"].values():  # identical scores: no difference at all
        assert comparison["delta_mean_auc"] == 0.0 and comparison["p_bootstrap"] == 1.0
        assert all(e["p_delong"] in (1.0, None) for e in comparison["per_class"].values())
    assert not same["significant"]["mean_auc"] and not any(same["significant"]["per_class"].values())
    assert better["significant"]["mean_auc"] and better["delta_mean_auc"]["mean"] > 0.2
    assert sum(better["significant"]["per_class"].values()) == 13  # every defined finding

    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| nomem | 3 |" in markdown and "reference" in markdown
    assert f"| Atelectasis | {reference_cell(summary, 'nomem')}" in markdown
    assert "| fifo | 3 |" in markdown and " * |" in markdown
    assert (tmp_path / "out" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_compare_command_and_the_summary_give_the_same_figures(tmp_path, tiny_data, capsys, monkeypatch):
    sweep, runs, scores, targets, names = fake_sweep_results(tmp_path, tiny_data, monkeypatch)
    status, _, err = run_cli(main, [sweep.path, "--output_dir", tmp_path / "out", "--summary"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    folders = {(run.variant, run.seed): run.run_dir for run in runs}
    for variant, seed in (("fifo", 1), ("same", 2)):
        reference, other = folders[("nomem", seed)], folders[(variant, seed)]
        for folder, key in ((reference, ("nomem", seed)), (other, (variant, seed))):  # the table needs metrics
            per_class = per_class_auc(scores[key], targets, list(FINDINGS))
            (folder / "metrics.json").write_text(json.dumps({"test": {"per_class": per_class,
                                                                       "mean_auc": mean_auc(per_class)}}))
        out = tmp_path / f"compare_{variant}.json"
        status, _, err = run_cli(compare_main, [reference, other, "--reference", reference, "--json", out], capsys)
        assert status == 0, err
        compared = json.loads(out.read_text())["runs"][0]
        swept = summary["variants"][variant]["vs_reference"][str(seed)]
        for key in ("delta_mean_auc", "delta_mean_auc_ci95", "p_bootstrap", "resamples_used"):
            assert compared[key] == swept[key], key
        assert compared["per_class"] == swept["per_class"]  # Δ AUC, DeLong p, Holm p per finding
    assert summary["variants"]["fifo"]["vs_reference"]["1"]["p_bootstrap"] < 0.05  # a real difference, compared


def reference_cell(summary, variant):
    stats = summary["variants"][variant]["per_class"]["Atelectasis"]
    return f"{stats['mean']:.4f} ± {stats['sd']:.4f}"


def test_summary_refuses_runs_tested_on_other_images(tmp_path, tiny_data, capsys, monkeypatch):
    sweep, runs, scores, targets, names = fake_sweep_results(tmp_path, tiny_data, monkeypatch)
    fake_finished(runs[-1], names[:-1], scores[(runs[-1].variant, runs[-1].seed)][:-1], targets[:-1])
    status, _, err = run_cli(main, [sweep.path, "--output_dir", tmp_path / "out", "--summary"], capsys)
    assert status == 2 and "was tested on other images" in err


def test_significance_rule_and_patient_ids():
    p = ALPHA / 2
    assert significant([(0.1, p), (0.1, p), (0.1, 0.5)])  # 2 of 3 seeds, same sign
    assert not significant([(0.1, p), (-0.1, p), (0.1, 0.5)])  # opposite signs
    assert not significant([(0.1, p), (0.1, 0.5)])  # half is not more than half
    assert not significant([])
    assert list(patient_ids(["00000013_005.png", "images/00000013_000.png"])) == ["00000013", "00000013"]


# --------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, tiny_data):
    """2 variants x 2 seeds, one epoch each, through the local executor, two runs at a time."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder, tiny_data)
    out_dir = folder / "out"
    with pytest.MonkeyPatch.context() as mp:  # the job processes import this checkout's sources
        mp.setenv("PYTHONPATH", os.pathsep.join([str(Path(cxrmem.__file__).parents[1]),
                                                 os.environ.get("PYTHONPATH", "")]))
        mp.chdir(ROOT)
        status = main([str(path), "--output_dir", str(out_dir)])
    assert status == 0
    return path, out_dir


@pytest.mark.slow
def test_a_sweep_writes_every_run_and_the_summary(real_sweep):
    _, out_dir = real_sweep
    runs = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.glob("*/seed*"))
    assert runs == ["fifo/seed0", "fifo/seed1", "nomem/seed0", "nomem/seed1"]
    for run in runs:
        assert (out_dir / run / "metrics.json").is_file() and (out_dir / run / "config.yaml").is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference"] == "nomem"
    for variant in ("nomem", "fifo"):
        v = summary["variants"][variant]
        assert v["seeds"] == [0, 1] and set(v["mean_auc"]) == {"mean", "sd"}
        assert set(v["per_class"]) == set(FINDINGS)
        assert all(set(stats) == {"mean", "sd"} for stats in v["per_class"].values())
    vs = summary["variants"]["fifo"]["vs_reference"]
    assert set(vs) == {"0", "1"}
    for comparison in vs.values():
        assert math.isfinite(comparison["delta_mean_auc"])
        assert set(comparison["per_class"]) == set(FINDINGS)
        assert all(set(e) >= {"delta_auc", "p_delong", "p_holm"} for e in comparison["per_class"].values())
    assert (out_dir / "summary.md").is_file() and (out_dir / "summary.png").is_file()


@pytest.mark.slow
def test_every_run_is_tested_on_the_same_images_and_seeds_change_training(real_sweep):
    _, out_dir = real_sweep
    predictions = {}
    for path in out_dir.glob("*/seed*/*_predictions.pt"):
        payload = torch.load(path, weights_only=True)
        predictions[path.parent.relative_to(out_dir).as_posix()] = payload
    assert len(predictions) == 4

    def images(payload, split):
        return {n for n, s in zip(payload["image_index"], payload["split"]) if s == split}

    first = next(iter(predictions.values()))
    assert images(first, "test") and images(first, "valid")
    for payload in predictions.values():
        assert images(payload, "test") == images(first, "test")
        assert images(payload, "valid") == images(first, "valid")
    for variant in ("nomem", "fifo"):  # another seed: other weights, so other probabilities
        assert not torch.allclose(predictions[f"{variant}/seed0"]["probs"], predictions[f"{variant}/seed1"]["probs"])
    for name, payload in predictions.items():
        config = yaml.safe_load((out_dir / name / "config.yaml").read_text())
        assert config["seed"] == int(name[-1]) and config["data"]["seed"] == 0


@pytest.mark.slow
def test_a_killed_sweep_finishes_without_repeating_finished_runs(real_sweep, capsys):
    path, out_dir = real_sweep
    killed = out_dir / "fifo" / "seed1"
    (killed / "metrics.json").unlink()  # killed before its results were written; config.yaml stays
    others = {p: p.stat().st_mtime_ns for p in out_dir.glob("*/seed*/metrics.json")}
    assert len(others) == 3

    status, out, err = run_cli(main, [path, "--output_dir", out_dir, "--dry-run"], capsys)
    assert status == 0, err
    assert len(out.splitlines()) == 1 and f"--output_dir {killed}" in out

    env = os.pathsep.join([str(Path(cxrmem.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", env)
        mp.chdir(ROOT)
        status, out, err = run_cli(main, [path, "--output_dir", out_dir], capsys)
    assert status == 0, err
    assert "4 runs" in out and "3 finished, 0 to resume, 1 to start" in out and "finished fifo/seed1" in out
    assert (killed / "metrics.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in others} == others
    status, out, _ = run_cli(main, [path, "--output_dir", out_dir, "--dry-run"], capsys)
    assert status == 0 and out == ""


def test_the_summary_chart_keeps_sd_bars_below_auc_one(tmp_path, monkeypatch):
    from cxrmem import report
    from cxrmem.sweep import plot_summary

    figures = []
    real = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda figure, path: figures.append(figure) or real(figure, path))
    stat = lambda mean, sd: {"mean": mean, "sd": sd}  # noqa: E731
    labels = ["Atelectasis", "Hernia"]
    variant = lambda mean: {"mean_auc": stat(mean, 0.08), "per_class": {"Atelectasis": stat(0.97, 0.1),  # noqa: E731
                                                                        "Hernia": stat(None, None)},
                            "significant": {"mean_auc": False, "per_class": {"Atelectasis": True, "Hernia": False}}}
    summary = {"labels": labels, "variants": {"ref": variant(0.9), "other": variant(0.98)}, "split": "test",
               "sweep": "s", "reference": "ref"}
    plot_summary(summary, tmp_path / "summary.png")
    axes = figures[0].axes[0]
    tops = [max(y for _, y in segment) for container in axes.containers
            if getattr(container, "errorbar", None) is not None
            for collection in container.errorbar.lines[2] for segment in collection.get_segments()]
    assert tops and max(tops) <= 1.0
    assert axes.get_ylim()[0] == 0.0


def test_summary_gives_each_external_set_its_section(tmp_path, tiny_data, capsys, monkeypatch):
    """Every run evaluated on an external set (3 shared findings, one of them missing for a third of the
    images): the summary scores it as scikit-learn does on the labelled images, and compares the variants."""
    sweep, runs, scores, targets, names = fake_sweep_results(tmp_path, tiny_data, monkeypatch)
    rng = np.random.default_rng(9)
    shared = ["Atelectasis", "Effusion", "Pneumothorax"]
    ext_names = [f"site_{i:03d}.png" for i in range(90)]  # no ChestX-ray14 name: the patients come from the file
    ext_patients = [f"p{i // 3:02d}" for i in range(90)]
    ext_targets = (rng.random((90, 3)) < 0.4).astype(float)
    ext_targets[::3, 2] = np.nan  # Pneumothorax not graded for every third image
    ext_scores = {}
    for run in runs:
        signal = 0.2 if run.variant == "nomem" else 2.0
        probs = 1 / (1 + np.exp(-(signal * (np.nan_to_num(ext_targets) - 0.5) + rng.normal(0, 1, (90, 3)))))
        if run.variant == "same":
            probs = ext_scores[("nomem", run.seed)]
        ext_scores[(run.variant, run.seed)] = probs
        folder = run.run_dir / "external" / "padchest"
        folder.mkdir(parents=True)
        save_predictions(folder / f"{run.config.experiment_name}_predictions.pt", probs, ext_targets, shared,
                         ext_names, ["test"] * 90, ext_patients)
        (folder / "external.json").write_text(json.dumps({"dataset": "padchest", "split": "test"}))
    status, out, err = run_cli(main, [sweep.path, "--output_dir", tmp_path / "out", "--summary"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    external = summary["external"]["padchest"]
    assert external["labels"] == shared and external["test_images"] == 90 and external["test_patients"] == 30
    # the paired bootstrap resampled those 30 patients: the same p as resampling them directly
    from cxrmem.evaluation.auc import PatientResampler
    from cxrmem.evaluation.paired import paired_bootstrap
    from cxrmem.report.compare import bootstrap_settings
    reference_dir = next(run.run_dir for run in runs if (run.variant, run.seed) == ("nomem", 0))
    settings = bootstrap_settings(reference_dir)
    direct = paired_bootstrap(ext_targets, ext_scores[("nomem", 0)], ext_scores[("fifo", 0)], settings.resamples,
                              settings.seed, resampler=PatientResampler.from_ids(ext_patients))
    compared = external["variants"]["fifo"]["vs_reference"]["0"]
    assert compared["p_bootstrap"] == pytest.approx(direct.p) and compared["delta_mean_auc_ci95"] == pytest.approx(direct.ci)
    assert direct.ci[1] - direct.ci[0] > 0.01

    def sk_mean(probs):
        known = [np.isfinite(ext_targets[:, c]) for c in range(3)]
        return np.mean([roc_auc_score(ext_targets[k, c], probs[k, c]) for c, k in enumerate(known)])

    for variant, v in external["variants"].items():
        means = [sk_mean(ext_scores[(variant, s)]) for s in (0, 1, 2)]
        assert v["mean_auc"]["mean"] == pytest.approx(np.mean(means), abs=1e-12)
    assert external["variants"]["fifo"]["significant"]["mean_auc"]
    assert not external["variants"]["same"]["significant"]["mean_auc"]
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "## Train x test" in markdown and "## External: padchest (test split, 90 images)" in markdown
