"""Users of the reference implementation: its experiment-file format and its table of experiment names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrmem.experiment import legacy_main, train_main
from cxrmem.config import load_config, read_yaml
from cxrmem.utils.errors import UserError
from cxrmem.config.reference import RULES, legacy_experiments, translate

from helpers import EXPERIMENTS, ROOT, run_cli

# Every key the reference's YAML experiment files use (collected from its configs/experiments).
REFERENCE_KEYS = {
    "experiment_name", "description",
    "model.num_classes", "model.backbone", "model.pretrained", "model.dropout_rate",
    "memory.use_memory", "memory.bank_size", "memory.update_strategy", "memory.rarity_threshold",
    "memory.diversity_weight", "memory.top_k", "memory.normalize_retrieved", "memory.memory_momentum",
    "memory.self_match_threshold", "memory.memory_type", "memory.update_mode", "memory.adaptive_k",
    "memory.min_k", "memory.max_k", "memory.num_heads", "memory.dropout", "memory.num_prototypes",
    "memory.update_freq", "memory.momentum",
    "data.data_dir", "data.image_size", "data.seed", "data.valid_pct",
    "phase1.filter_normal", "phase1.batch_size", "phase1.num_workers", "phase1.loss", "phase1.freeze_epochs",
    "phase1.total_epochs", "phase1.use_lr_finder", "phase1.optimizer", "phase1.lr", "phase1.weight_decay",
    "phase1.memory_momentum", "phase1.early_stopping_patience", "phase1.save_best", "phase1.min_delta",
    "phase1.save_name", "phase1.warmup_epochs", "phase1.warmup_lr",
    "phase2.filter_normal", "phase2.batch_size", "phase2.num_workers", "phase2.loss", "phase2.epochs",
    "phase2.lr_min", "phase2.lr_max", "phase2.optimizer", "phase2.weight_decay", "phase2.memory_momentum",
    "phase2.early_stopping_patience", "phase2.save_best", "phase2.min_delta", "phase2.load_from_phase1",
    "phase2.phase1_checkpoint", "phase2.save_name",
    "evaluation.batch_size", "evaluation.num_workers", "evaluation.save_predictions",
}

# A two-phase experiment in the reference's format (written for this test).
TWO_PHASE = """\
experiment_name: ref_two_phase
description: "a reference-format two-phase run"
model:
  num_classes: 14
  backbone: resnet18
  pretrained: false
  dropout_rate: 0.25
memory:
  use_memory: true
  bank_size: 64
  update_strategy: hybrid
  rarity_threshold: 0.3
  diversity_weight: 0.4
  top_k: 2
  normalize_retrieved: 'memory_only'
  memory_momentum: 0.8
  self_match_threshold: 0.995
data:
  data_dir: /somewhere/cxr14
  image_size: [160, 160]
  seed: 7
  valid_pct: 0.2
phase1:
  filter_normal: true
  batch_size: 16
  num_workers: 3
  loss: focal
  freeze_epochs: 2
  total_epochs: 4
  use_lr_finder: false
  optimizer: adam
  lr: 0.0003
  weight_decay: 0.02
  memory_momentum: 0.85
  early_stopping_patience: 6
  save_best: true
  min_delta: 0.0001
  save_name: trial_phase1
phase2:
  filter_normal: false
  batch_size: 32
  num_workers: 3
  loss: asymmetric
  epochs: 3
  lr_min: 0.00001
  lr_max: 0.00005
  optimizer: Adam
  weight_decay: 0.03
  memory_momentum: 0.999
  early_stopping_patience: 4
  save_best: true
  min_delta: 0.001
  load_from_phase1: true
  phase1_checkpoint: model
  save_name: trial_phase2
evaluation:
  batch_size: 16
  num_workers: 3
  save_predictions: false
"""

# One phase on every train_val image with the warmup schedule and an advanced memory type.
ONE_PHASE_NO_VALIDATION = """\
experiment_name: ref_one_phase
model: {num_classes: 14, backbone: resnet18, pretrained: false, dropout_rate: 0.3}
memory:
  use_memory: true
  memory_type: loss_aware
  bank_size: 32
  update_mode: hard
  adaptive_k: true
  min_k: 2
  max_k: 8
  num_heads: 4
  dropout: 0.1
  num_prototypes: 16
  update_freq: 100
  momentum: 0.9
data: {data_dir: /d, image_size: [96, 96], seed: 85, valid_pct: 0.0}
phase1:
  filter_normal: false
  batch_size: 8
  num_workers: 0
  loss: bce
  warmup_epochs: 2
  total_epochs: 3
  use_lr_finder: false
  lr: 0.0002
  warmup_lr: 0.00002
  optimizer: adam
  weight_decay: 0.01
  memory_momentum: 0.9
  early_stopping_patience: null
  save_best: false
  min_delta: null
  save_name: solo
evaluation: {batch_size: 8, num_workers: 0, save_predictions: true}
"""


def keys_of(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from keys_of(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def write(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_test_files_cover_every_reference_key():
    used = set(keys_of(yaml.safe_load(TWO_PHASE))) | set(keys_of(yaml.safe_load(ONE_PHASE_NO_VALIDATION)))
    assert REFERENCE_KEYS <= used, sorted(REFERENCE_KEYS - used)


def test_a_two_phase_reference_file_resolves(tmp_path, capsys):
    cfg = load_config(write(tmp_path, "two.yaml", TWO_PHASE))
    assert cfg.experiment_name == "ref_two_phase" and cfg.description == "a reference-format two-phase run"
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.dropout_rate) == ("resnet18", False, 0.25)
    m = cfg.memory
    assert (m.use_memory, m.bank_size, m.update_strategy, m.rarity_threshold, m.diversity_weight, m.top_k) == \
        (True, 64, "hybrid", 0.3, 0.4, 2)
    assert (m.normalize_retrieved, m.memory_momentum, m.self_match_threshold) == ("memory_only", 0.8, 0.995)
    d = cfg.data
    assert (d.data_dir, d.image_size, d.seed, d.valid_pct, d.num_workers) == ("/somewhere/cxr14", 160, 7, 0.2, 3)
    p1, p2 = cfg.phase1, cfg.phase2
    assert (p1.filter_normal, p1.batch_size, p1.loss, p1.freeze_epochs, p1.total_epochs) == (True, 16, "focal", 2, 4)
    assert (p1.use_lr_finder, p1.base_lr, p1.weight_decay, p1.memory_momentum) == (False, 0.0003, 0.02, 0.85)
    assert (p1.early_stopping_patience, p1.warmup_epochs, p1.mixup) == (6, 0, 0.0)
    assert (p2.filter_normal, p2.batch_size, p2.loss, p2.epochs, p2.lr_min, p2.lr_max) == \
        (False, 32, "asl", 3, 1e-5, 5e-5)
    assert (p2.weight_decay, p2.memory_momentum, p2.early_stopping_patience) == (0.03, 0.999, 4)
    assert cfg.save_name == "trial" and cfg.checkpoint_stem == "trial"
    assert cfg.evaluation.save_predictions is False


def test_the_note_is_one_line_listing_the_translation(tmp_path, capsys):
    path = write(tmp_path, "two.yaml", TWO_PHASE)
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 0, err
    assert yaml.safe_load(out)["data"]["image_size"] == 160  # stdout is still the resolved YAML
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and len(err.splitlines()) == 1
    note = notes[0]
    for fragment in (str(path), "data.image_size [160, 160] -> 160", "phase1.lr -> phase1.base_lr",
                     "phase2.loss asymmetric -> asl", "phase1/phase2.save_name -> save_name trial",
                     "phase1/phase2/evaluation.num_workers -> data.num_workers 3", "phase1/phase2.optimizer",
                     "phase1/phase2.min_delta", "phase1/phase2.save_best", "phase2.load_from_phase1",
                     "phase2.phase1_checkpoint", "evaluation.batch_size"):
        assert fragment in note, fragment


def test_one_phase_without_validation_and_an_advanced_memory_type(tmp_path, recwarn):
    cfg = load_config(write(tmp_path, "one.yaml", ONE_PHASE_NO_VALIDATION))
    messages = [str(w.message) for w in recwarn]
    assert len(messages) == 1 and "memory.memory_type: 'loss_aware'" in messages[0]
    assert "plain memory bank" in messages[0] and "reference" in messages[0]
    assert cfg.phase2 is None and cfg.data.valid_pct == 0.0 and cfg.data.image_size == 96
    assert cfg.memory.use_memory and cfg.memory.update_strategy == "rarity" and cfg.memory.bank_size == 32
    p1 = cfg.phase1
    assert (p1.warmup_epochs, p1.warmup_lr, p1.total_epochs, p1.base_lr) == (2, 2e-5, 3, 2e-4)
    assert p1.early_stopping_patience is None and not p1.filter_normal and p1.batch_size == 8
    assert cfg.save_name == "solo" and cfg.data.num_workers == 0


@pytest.mark.parametrize("memory_type", ["attention", "prototype", "loss_aware"])
def test_memory_types_the_reference_only_printed_load_as_plain_memory(memory_type, tmp_path, capsys):
    path = write(tmp_path, "adv.yaml", f"memory:\n  memory_type: {memory_type}\n  update_strategy: diversity\n")
    with pytest.warns(UserWarning) as warned:
        status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 0, err
    assert yaml.safe_load(out)["memory"]["update_strategy"] == "diversity"
    assert len(warned) == 1
    message = str(warned[0].message)
    assert f"memory.memory_type: '{memory_type}' in {path}" in message and "update_strategy diversity" in message


def test_a_cxrmem_file_is_left_alone():
    for path in sorted(EXPERIMENTS.glob("*.yaml")) + sorted(legacy_experiments().values()):
        raw = read_yaml(path)
        t = translate(raw, str(path))
        assert t.raw == raw and not (t.changed or t.dropped or t.cautions), path


def test_translate_does_not_change_its_input():
    raw = yaml.safe_load(TWO_PHASE)
    before = yaml.safe_dump(raw)
    translate(raw, "x.yaml")
    assert yaml.safe_dump(raw) == before


@pytest.mark.parametrize("text, fragment", [
    ("data:\n  image_size: [224, 256]\n", "data.image_size in {path}: [224, 256] is not square"),
    ("data:\n  image_size: [224, 224, 3]\n", "data.image_size in {path}: expected an integer or [side, side]"),
    ("data:\n  image_size: [224.0, 224.0]\n", "expected an integer or [side, side]"),
    ("memory:\n  memory_type: graph\n", "memory.memory_type in {path}: 'graph' is not one of the reference's"),
    ("phase1:\n  optimizer: sgd\n", "phase1.optimizer in {path}: 'sgd' is not available"),
    ("phase2:\n  save_best: false\n", "phase2.save_best in {path}: false (keep the last epoch) is not available"),
    ("phase2:\n  load_from_phase1: false\n", "phase2.load_from_phase1 in {path}: false is not available"),
    ("phase1:\n  lr: 0.001\n  base_lr: 0.002\n", "phase1.lr in {path}: 0.001 conflicts with phase1.base_lr"),
    ("phase1:\n  num_workers: 4\nphase2:\n  num_workers: 8\n", "the loaders' worker counts differ"),
    ("data:\n  num_workers: 2\nevaluation:\n  num_workers: 4\n", "set that instead"),
])
def test_values_cxrmem_cannot_honour_are_refused_in_one_line(text, fragment, tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", text)
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert fragment.format(path=path) in err


@pytest.mark.parametrize("text", [
    "phase1:\n  num_workers: 4\nphase2:\n  num_workers: 8\n",
    "data:\n  num_workers: 2\nevaluation:\n  num_workers: 4\n",
])
def test_the_command_line_worker_count_wins_over_the_files_per_loader_counts(text, tmp_path, capsys):
    path = write(tmp_path, "workers.yaml", text)
    status, out, err = run_cli(train_main, ["--config", path, "--set", "data.num_workers=1", "--print-config"],
                               capsys)
    assert status == 0, err
    assert yaml.safe_load(out)["data"]["num_workers"] == 1
    assert "num_workers" in err and "ignored" in err  # the note says the file's counts were not used


def test_save_best_false_is_the_last_epoch_without_validation(tmp_path):
    path = write(tmp_path, "noval.yaml", "data:\n  valid_pct: 0\nphase1:\n  save_best: false\n")
    assert load_config(path).data.valid_pct == 0.0


@pytest.mark.parametrize("names, expected", [
    ({"phase1": "phase1_model", "phase2": "phase2_model"}, None),  # no shared stem: named after the experiment
    ({"phase1": "run_a_phase1", "phase2": "run_b_phase2"}, None),
    ({"phase1": "same_phase1", "phase2": "same_phase2"}, "same"),
    ({"phase1": "single"}, "single"),
])
def test_per_phase_save_names(names, expected, tmp_path):
    text = "experiment_name: exp\n" + "".join(f"{p}:\n  save_name: {n}\n" for p, n in names.items())
    cfg = load_config(write(tmp_path, "s.yaml", text))
    assert cfg.save_name == expected
    assert cfg.checkpoint_stem == (expected or "exp")


def test_an_explicit_save_name_wins_over_the_per_phase_ones(tmp_path):
    text = "save_name: mine\nphase1:\n  save_name: a_phase1\nphase2:\n  save_name: a_phase2\n"
    assert load_config(write(tmp_path, "s.yaml", text)).save_name == "mine"


@pytest.mark.parametrize("value, alpha", [(True, 0.4), (False, 0.0), (None, 0.0), (0.2, 0.2)])
def test_mixup_flag_of_the_reference_learner(value, alpha):
    raw = {"phase1": {"mixup": value}, "phase2": {"mixup": value}}
    t = translate(raw, "x.yaml")
    assert t.raw["phase1"]["mixup"] == alpha and t.raw["phase2"]["mixup"] == alpha


def test_every_rule_and_reference_key_is_documented():
    guide = (ROOT / "docs" / "migrating.md").read_text()
    missing = [key for key in sorted(set(RULES) | REFERENCE_KEYS) if f"`{key}`" not in guide]
    assert not missing, f"add these keys to docs/migrating.md: {missing}"


# --------------------------------------------------------------------------- the legacy table

COMMON = {"seed": 85, "valid_pct": 0.125, "dropout": 0.3, "self_match": 0.9999, "rarity_threshold": 0.2,
          "batches": (64, 128), "losses": ("bce", "asl"), "top_k": 3, "bank_size": 512}
LEGACY = {  # the reference's EXPERIMENT_CONFIGS: backbone, memory preset (strategy or None), retrieval
    "baseline_resnet50": ("resnet50", None, "both"),
    "baseline_densenet121": ("densenet121", None, "both"),
    "baseline_effv2s": ("efficientnet_v2_s", None, "both"),
    "memory_rarity_effv2s": ("efficientnet_v2_s", "rarity", "both"),
    "memory_hybrid_effv2s": ("efficientnet_v2_s", "hybrid", "both"),
    "memory_rarity_resnet50": ("resnet50", "rarity", "both"),
    "memory_rarity_densenet121": ("densenet121", "rarity", "both"),
    "memory_normalized_retrieve": ("efficientnet_v2_s", "rarity", "both"),
    "memory_unnormalized_retrieve": ("efficientnet_v2_s", "rarity", "none"),
}


def check_legacy_settings(name, printed):
    backbone, strategy, normalize = LEGACY[name]
    assert printed["experiment_name"] == name and printed["model"]["backbone"] == backbone
    assert printed["model"]["dropout_rate"] == COMMON["dropout"]
    memory = printed["memory"]
    assert memory["use_memory"] is (strategy is not None)
    if strategy is not None:
        assert (memory["update_strategy"], memory["normalize_retrieved"]) == (strategy, normalize)
        assert (memory["top_k"], memory["bank_size"]) == (COMMON["top_k"], COMMON["bank_size"])
        assert memory["rarity_threshold"] == COMMON["rarity_threshold"]
        assert memory["self_match_threshold"] == COMMON["self_match"]
    assert (printed["data"]["seed"], printed["data"]["valid_pct"]) == (COMMON["seed"], COMMON["valid_pct"])
    assert (printed["phase1"]["batch_size"], printed["phase2"]["batch_size"]) == COMMON["batches"]
    assert (printed["phase1"]["loss"], printed["phase2"]["loss"]) == COMMON["losses"]
    assert printed["phase2"]["memory_momentum"] == 0.9999 and printed["phase1"]["memory_momentum"] == 0.9


def test_a_legacy_name_and_the_yaml_experiment_of_that_name_never_share_a_run_folder():
    from cxrmem.config import load_config

    shared = [name for name in legacy_experiments() if (EXPERIMENTS / f"{name}.yaml").is_file()]
    assert "memory_rarity_effv2s" in shared
    for name in shared:
        legacy, yaml_run = load_config(legacy_experiments()[name]), load_config(EXPERIMENTS / f"{name}.yaml")
        assert legacy.run_dir != yaml_run.run_dir, name
        assert legacy.run_dir.as_posix() == f"runs/legacy/{name}"
    readme = (ROOT / "README.md").read_text()
    assert "same outputs" not in readme and "runs/legacy/" in readme


def test_the_table_ships_exactly_the_nine_names():
    assert set(legacy_experiments()) == set(LEGACY)


def branch_env() -> dict:
    """Run this checkout's sources, whatever cxrmem the interpreter has installed."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_outside(command, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=branch_env(), capture_output=True, text=True,
                          timeout=120)


LEGACY_SCRIPT = [sys.executable, ROOT / "train_fastai.py"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "cxrmem-train-legacy"


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_names_resolve_from_another_folder(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(legacy_main, ["--experiment", name, "--print-config", "--data_dir", tmp_path / "d"],
                               capsys)
    assert status == 0, err
    assert err == ""  # the table's files are cxrmem files: no note
    printed = yaml.safe_load(out)
    check_legacy_settings(name, printed)
    assert printed["data"]["data_dir"] == str(tmp_path / "d")


FROM_OUTSIDE = sorted(LEGACY)[0]  # one name per spelling in a process of its own: the script finds its package


def test_the_legacy_script_resolves_from_outside_the_project(tmp_path):
    result = run_outside(LEGACY_SCRIPT + ["--experiment", FROM_OUTSIDE, "--print-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_legacy_settings(FROM_OUTSIDE, yaml.safe_load(result.stdout))


@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason="the cxrmem-train-legacy console script is not installed")
def test_the_legacy_console_script_resolves_from_outside_the_project(tmp_path):
    result = run_outside([CONSOLE_SCRIPT, "--experiment", FROM_OUTSIDE, "--print-config", "--data_dir", tmp_path / "d"],
                         tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    check_legacy_settings(FROM_OUTSIDE, printed)
    assert printed["data"]["data_dir"] == str(tmp_path / "d")


def test_a_name_in_both_places_takes_the_table_under_the_legacy_entry(capsys):
    status, out, err = run_cli(legacy_main, ["--experiment", "memory_rarity_effv2s", "--print-config"], capsys)
    assert status == 0, err
    legacy = yaml.safe_load(out)
    status, out, err = run_cli(train_main, ["--config", EXPERIMENTS / "memory_rarity_effv2s.yaml",
                                            "--print-config"], capsys)
    assert status == 0, err
    own = yaml.safe_load(out)
    assert (legacy["data"]["seed"], legacy["phase2"]["loss"], legacy["data"]["valid_pct"]) == (85, "asl", 0.125)
    assert (own["data"]["seed"], own["phase2"]["loss"], own["data"]["valid_pct"]) == (42, "bce", 0.1)


def test_yaml_experiments_resolve_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(legacy_main, ["--experiment", "ablation_topk1", "--print-config"], capsys)
    assert status == 0, err
    assert yaml.safe_load(out)["memory"]["top_k"] == 1


def test_the_working_directory_comes_before_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "configs" / "experiments"
    own.mkdir(parents=True)
    (own / "ablation_topk1.yaml").write_text("experiment_name: mine\nmemory:\n  top_k: 2\n")
    (own / "only_here.yaml").write_text("experiment_name: only_here\n")
    for name, key, expected in (("ablation_topk1", "top_k", 2), ("only_here", None, "only_here")):
        status, out, err = run_cli(legacy_main, ["--experiment", name, "--print-config"], capsys)
        assert status == 0, err
        printed = yaml.safe_load(out)
        assert (printed["memory"][key] if key else printed["experiment_name"]) == expected


def test_an_unknown_name_from_another_folder_lists_the_choices(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(legacy_main, ["--experiment", "zzz", "--print-config"], capsys)
    assert status == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith("error: no experiment named 'zzz'")
    choices = line.split("choose one of ", 1)[1].split(", ")
    expected = set(LEGACY) | {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    assert set(choices) == expected
    status, _, err = run_cli(legacy_main, ["--experiment", "baseline_densenet12", "--print-config"], capsys)
    assert status == 2 and "did you mean baseline_densenet121?" in err


def test_every_legacy_file_is_a_valid_config():
    for name, path in legacy_experiments().items():
        cfg = load_config(path)
        assert cfg.experiment_name == name and cfg.phase2 is not None


def test_translation_errors_are_user_errors():
    with pytest.raises(UserError):
        translate({"data": {"image_size": [1, 2]}}, "x.yaml")


def test_a_reference_file_run_prints_one_warning_and_one_note(tmp_path):
    path = write(tmp_path, "one.yaml", ONE_PHASE_NO_VALIDATION)
    result = run_outside([sys.executable, ROOT / "train.py", "--config", path, "--print-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: memory.memory_type: 'loss_aware'")
    assert lines[1].startswith(f"note: {path} uses the reference's keys")
    assert "memory.update_mode" in lines[1] and "phase1.save_best" in lines[1]
