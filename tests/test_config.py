"""The configuration system: defaults, validation messages, overrides, the experiment files."""

from __future__ import annotations

import pytest
import yaml

from cxrmem.experiment import train_main
from cxrmem.config import from_dict, iter_schema, load_config
from cxrmem.utils.errors import UserError

from helpers import EXPERIMENTS, run_cli

GUIDE_EXPERIMENTS = [
    "baseline_effv2s", "baseline_resnet50", "memory_rarity_effv2s", "memory_rarity_effv2m",
    "memory_rarity_resnet50", "memory_rarity_densenet121", "memory_diversity_effv2s", "memory_hybrid_effv2s",
    "memory_statistical_effv2s", "memory_fifo_effv2s", "ablation_no_normalize", "ablation_topk1",
    "ablation_topk5", "ablation_bank256", "ablation_bank1024",
]


@pytest.mark.parametrize("name", GUIDE_EXPERIMENTS + ["demo_synthetic"])
def test_every_experiment_prints_its_config(name, capsys):
    status, out, err = run_cli(train_main, ["--config", EXPERIMENTS / f"{name}.yaml", "--print-config"], capsys)
    assert status == 0, err
    printed = yaml.safe_load(out)
    assert printed["experiment_name"] == name
    assert from_dict(printed).experiment_name == name  # the printed YAML is itself a valid config


def test_experiment_values_follow_the_guide():
    cfg = {n: load_config(EXPERIMENTS / f"{n}.yaml") for n in GUIDE_EXPERIMENTS}
    # batches: the guide's 64 / 128, and 32 / 64 for EfficientNetV2-M ("24GB VRAM: EfficientNetV2-M with bs=32/64")
    batches = {n: (32, 64) if c.model.backbone == "efficientnet_v2_m" else (64, 128) for n, c in cfg.items()}
    assert batches["memory_rarity_effv2m"] == (32, 64)
    for name, c in cfg.items():
        assert (c.phase1.freeze_epochs, c.phase1.total_epochs) == (3, 20)
        assert (c.phase1.batch_size, c.phase2.batch_size) == batches[name]
        assert c.phase1.use_lr_finder and c.phase1.filter_normal and c.phase1.memory_momentum == 0.9
        assert (c.phase2.epochs, c.phase2.lr_min, c.phase2.lr_max) == (5, 2e-5, 8e-5)
        assert c.phase2.memory_momentum == 0.9999 and not c.phase2.filter_normal
        assert c.model.dropout_rate == 0.3  # the guide is silent; the reference's effective value
    assert not cfg["baseline_effv2s"].memory.use_memory
    assert cfg["baseline_resnet50"].model.backbone == "resnet50"
    assert cfg["memory_rarity_effv2m"].model.backbone == "efficientnet_v2_m"
    assert cfg["memory_rarity_densenet121"].model.backbone == "densenet121"
    for strategy in ("diversity", "hybrid", "statistical", "fifo"):
        assert cfg[f"memory_{strategy}_effv2s"].memory.update_strategy == strategy
    assert cfg["ablation_no_normalize"].memory.normalize_retrieved == "none"
    assert [cfg[f"ablation_topk{k}"].memory.top_k for k in (1, 5)] == [1, 5]
    assert [cfg[f"ablation_bank{n}"].memory.bank_size for n in (256, 1024)] == [256, 1024]


def test_a_short_file_takes_the_defaults(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("experiment_name: short\nmemory:\n  top_k: 5\n")
    cfg = load_config(path)
    assert cfg.memory.top_k == 5 and cfg.memory.bank_size == 512
    assert cfg.phase1.memory_momentum == 0.9 and cfg.phase1.batch_size == 64
    assert str(cfg.run_dir) == "runs/short"
    assert cfg.phase2 is None  # no phase2 section: one phase


def test_an_empty_phase2_section_takes_the_phase2_defaults(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("phase2: {}\n")
    p2 = load_config(path).phase2
    assert (p2.memory_momentum, p2.batch_size, p2.lr_min, p2.lr_max, p2.epochs) == (0.9999, 128, 2e-5, 8e-5, 5)


@pytest.mark.parametrize("value, expected", [(True, "both"), (False, "none"), ("both", "both"),
                                             ("query_only", "query_only"), ("memory_only", "memory_only"),
                                             ("none", "none")])
def test_normalize_retrieved_spellings(value, expected):
    assert from_dict({"memory": {"normalize_retrieved": value}}).memory.normalize_retrieved == expected


@pytest.mark.parametrize("raw, fragment", [
    ({"memory": {"bank_sise": 3}}, "memory.bank_sise: unknown key in <config>; did you mean bank_size?"),
    ({"phase1": {"batchsize": 3}}, "did you mean batch_size?"),
    ({"experimnt_name": "x"}, "did you mean experiment_name?"),
    ({"memory": {"bank_size": 0}}, "memory.bank_size: 0 is out of range; it must be >= 1"),
    ({"memory": {"bank_size": "big"}}, "memory.bank_size: expected an integer"),
    ({"memory": {"bank_size": 2.5}}, "memory.bank_size: expected an integer"),
    ({"memory": {"use_memory": "yes"}}, "memory.use_memory: expected true or false"),
    ({"memory": {"top_k": 9, "bank_size": 4}}, "memory.top_k: 9 is larger than memory.bank_size (4)"),
    ({"phase2": {"memory_momentum": 1.0}}, "phase2.memory_momentum: 1.0 is out of range; it must be >= 0.0 and < 1.0"),
    ({"data": {"valid_pct": -0.1}}, "data.valid_pct: -0.1 is out of range; it must be >= 0.0 and < 1.0"),
    ({"data": {"valid_pct": 1}}, "data.valid_pct: 1.0 is out of range"),
    ({"memory": {"update_strategy": "rarety"}}, "'rarety' is not one of"),
    ({"memory": {"normalize_retrieved": "cosine"}}, "memory.normalize_retrieved: 'cosine' is not one of"),
    ({"memory": 5}, "memory in <config>: expected a mapping"),
])
def test_mistakes_name_the_key_and_the_fix(raw, fragment):
    with pytest.raises(UserError) as info:
        from_dict(raw)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_misspelt_key_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("memory:\n  bank_sise: 256\n")
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "did you mean bank_size?" in err and "Traceback" not in err


def test_yaml_syntax_error_names_its_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  backbone: resnet18\nmemory: [unclosed\n")
    status, _, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and "line 4" in err and "YAML syntax error" in err


def test_missing_config_file(tmp_path, capsys):
    status, _, err = run_cli(train_main, ["--config", tmp_path / "nope.yaml", "--print-config"], capsys)
    assert status == 2 and "not found" in err


def test_set_overrides_and_shorthands(tmp_path, capsys):
    status, out, err = run_cli(train_main, [
        "--config", EXPERIMENTS / "memory_rarity_effv2s.yaml", "--set", "memory.top_k=5",
        "--set", "phase2.lr_max=1e-4", "--set", "memory.normalize_retrieved=false",
        "--data_dir", tmp_path / "d", "--output_dir", tmp_path / "o", "--print-config"], capsys)
    assert status == 0, err
    printed = yaml.safe_load(out)
    assert printed["memory"]["top_k"] == 5 and printed["phase2"]["lr_max"] == 1e-4
    assert printed["memory"]["normalize_retrieved"] == "none"
    assert printed["data"]["data_dir"] == str(tmp_path / "d") and printed["output_dir"] == str(tmp_path / "o")


def test_set_with_a_bad_value_is_validated(capsys):
    status, _, err = run_cli(train_main, ["--config", EXPERIMENTS / "ablation_topk1.yaml",
                                          "--set", "memory.top_k=0", "--print-config"], capsys)
    assert status == 2 and "memory.top_k: 0 is out of range" in err


def test_schema_lists_every_key_with_a_doc():
    keys = {key: doc for key, _, doc, _ in iter_schema()}
    assert "memory.bank_size" in keys and "phase2.memory_momentum" in keys and "data.synthetic.n_patients" in keys
    assert all(doc for doc in keys.values())


def test_every_schema_key_is_in_the_configuration_reference():
    reference = (EXPERIMENTS.parents[1] / "docs" / "configuration.md").read_text()
    undocumented = [key for key, *_ in iter_schema() if f"| `{key}` |" not in reference]
    assert not undocumented, f"add these keys to docs/configuration.md: {undocumented}"


# --------------------------------------------------------------------------- strict reading


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n"])
def test_an_empty_file_is_refused(text, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and f"{path} is empty" in err


def test_an_explicit_empty_mapping_takes_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path) == from_dict({})


@pytest.mark.parametrize("text, key, lines", [
    ("memory:\n  top_k: 3\n  bank_size: 8\n  top_k: 5\n", "memory.top_k", (2, 4)),
    ("experiment_name: a\nmodel:\n  backbone: resnet18\nexperiment_name: b\n", "experiment_name", (1, 4)),
    ("phase1:\n  batch_size: 8\nphase2:\n  batch_size: 8\nphase1:\n  loss: bce\n", "phase1", (1, 5)),
    ("data:\n  synthetic:\n    seed: 1\n    size: 32\n    seed: 2\n", "data.synthetic.seed", (3, 5)),
    ("memory: {top_k: 3, top_k: 4}\n", "memory.top_k", (1, 1)),
])
def test_a_key_named_twice_is_refused_with_both_lines(text, key, lines, tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert f"{path}: {key} is set twice (lines {lines[0]} and {lines[1]})" in err


def test_same_key_in_different_mappings_and_merge_keys_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("phase1: &p\n  batch_size: 8\n  weight_decay: 0.0\n"
                    "phase2:\n  <<: *p\n  filter_normal: false\n  batch_size: 16\n")
    cfg = load_config(path)
    assert (cfg.phase1.batch_size, cfg.phase2.batch_size) == (8, 16)  # the explicit key overrides the merge
    assert cfg.phase2.weight_decay == 0.0


@pytest.mark.parametrize("spelling", [".nan", ".NaN", ".inf", "-.inf", ".Inf"])
@pytest.mark.parametrize("key", ["phase1.base_lr", "phase2.lr_max", "memory.rarity_threshold",
                                 "memory.self_match_threshold", "data.valid_pct", "phase1.mixup"])
def test_non_finite_numbers_are_refused(spelling, key, tmp_path, capsys):
    section, name = key.split(".")
    path = tmp_path / "nan.yaml"
    path.write_text(f"{section}:\n  {name}: {spelling}\n")
    status, out, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and key in err and str(path) in err and "not a finite number" in err


@pytest.mark.parametrize("where", [["--set", "phase1.base_lr=.nan"], ["--set", "phase1.base_lr=nan"],
                                   ["--set", "memory.self_match_threshold=inf"]])
def test_non_finite_numbers_from_set_are_refused(where, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text("experiment_name: ok\n")
    status, _, err = run_cli(train_main, ["--config", path, "--print-config", *where], capsys)
    assert status == 2 and "not a finite number" in err and where[1].split("=")[0] in err


@pytest.mark.parametrize("text, key", [
    ("data:\n  image_size: [.inf, .inf]\n", "data.image_size[0]"),
    ("phase1:\n  min_delta: .nan\n", "phase1.min_delta"),
    ("phase1:\n  early_stopping_patience: .inf\n", "phase1.early_stopping_patience"),
])
def test_non_finite_numbers_are_refused_wherever_they_stand(text, key, tmp_path, capsys):
    path = tmp_path / "nan.yaml"
    path.write_text(text)
    status, _, err = run_cli(train_main, ["--config", path, "--print-config"], capsys)
    assert status == 2 and f"{key}: " in err and str(path) in err and "not a finite number" in err


# --------------------------------------------------------------------------- schema additions


def test_training_without_validation_and_without_early_stopping():
    cfg = from_dict({"data": {"valid_pct": 0}, "phase1": {"early_stopping_patience": None},
                     "phase2": {"early_stopping_patience": None}})
    assert cfg.data.valid_pct == 0.0
    assert cfg.phase1.early_stopping_patience is None and cfg.phase2.early_stopping_patience is None
    defaults = from_dict({"phase2": {}})
    assert (defaults.phase1.early_stopping_patience, defaults.phase2.early_stopping_patience) == (5, 3)


def test_warmup_and_mixup_keys():
    cfg = from_dict({"phase2": {}})
    assert (cfg.phase1.warmup_epochs, cfg.phase1.warmup_lr, cfg.phase1.mixup, cfg.phase2.mixup) == (0, None, 0.0, 0.0)
    cfg = from_dict({"phase1": {"warmup_epochs": 5, "warmup_lr": 1e-5, "freeze_epochs": 0, "total_epochs": 0,
                                "mixup": 0.4}, "phase2": {"mixup": 1}})
    assert (cfg.phase1.warmup_epochs, cfg.phase1.warmup_lr, cfg.phase1.mixup, cfg.phase2.mixup) == (5, 1e-5, 0.4, 1.0)


@pytest.mark.parametrize("raw, fragment", [
    ({"phase1": {"warmup_epochs": -1}}, "phase1.warmup_epochs: -1 is out of range; it must be >= 0"),
    ({"phase1": {"warmup_epochs": 1.5}}, "phase1.warmup_epochs: expected an integer"),
    ({"phase1": {"warmup_lr": 0}}, "phase1.warmup_lr: 0.0 is out of range; it must be > 0.0"),
    ({"phase1": {"warmup_lr": "fast"}}, "phase1.warmup_lr: expected a number or null"),
    ({"phase1": {"mixup": -0.1}}, "phase1.mixup: -0.1 is out of range; it must be >= 0.0"),
    ({"phase1": {"early_stopping_patience": 0}}, "phase1.early_stopping_patience: 0 is out of range; it must be >= 1"),
    ({"phase2": {"early_stopping_patience": "never"}}, "expected an integer or null"),
    ({"phase1": {"freeze_epochs": 0, "total_epochs": 0}},
     "phase1: freeze_epochs (or warmup_epochs) + total_epochs is 0"),
])
def test_new_keys_are_validated(raw, fragment):
    with pytest.raises(UserError) as info:
        from_dict(raw)
    assert fragment in str(info.value)


def test_dropout_default_is_the_reference_value():
    from cxrmem.config import ModelConfig

    assert ModelConfig().dropout_rate == 0.3 and from_dict({}).model.dropout_rate == 0.3


def test_a_saved_config_without_keys_added_later_is_the_same_experiment():
    """config.yaml of a run started before model.findings, data.dataset, ... existed: their defaults fill in."""
    import yaml
    from cxrmem.config import dump_yaml, from_dict, same_experiment
    cfg = from_dict({"experiment_name": "x", "model": {"num_classes": 14}})
    saved = yaml.safe_load(dump_yaml(cfg))
    for section, key in (("model", "findings"), ("data", "dataset"), ("data", "views"), ("data", "uncertain"),
                         ("data", "datasets"), ("evaluation", "external")):
        del saved[section][key]
    assert same_experiment(yaml.safe_dump(saved), cfg)
    saved["data"]["valid_pct"] = 0.3
    assert not same_experiment(yaml.safe_dump(saved), cfg)
    assert not same_experiment("data: {bogus_key: 1}\n", cfg)
