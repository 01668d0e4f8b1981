"""Experiment configuration: schema with defaults, YAML loading, validation, overrides.

One YAML file is one experiment. The schema below is the single source of truth:
every key, its type, its default, its allowed range and a one-line meaning.
A file may be short; whatever it leaves out takes the default.

Contract of :func:`load_config`:

* the file is read strictly: an empty file, a key named twice in one mapping, or a
  non-finite number (``.nan``, ``.inf``) -> ``UserError`` naming the file and the key;
* files written for the reference implementation are translated first
  (:mod:`cxrmem.config.reference`), with one ``note:`` line saying what changed;
* unknown keys -> ``UserError`` naming the key, the file and the closest valid key;
* wrong type / out of range -> ``UserError`` naming the key and what is allowed;
* ``--set a.b=value`` overrides are parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..evaluation.thresholds import parse_operating_point  # numpy only: the rules' one home
from . import reference
from ..utils.errors import UserError, closest

# --------------------------------------------------------------------------- schema helpers


def opt(default, doc: str, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, kind=None,
        nullable=False, value_type=None, pattern=None):
    """A schema field: default, meaning and allowed values (closed [lo, hi] unless *_open).

    ``nullable``: null is also allowed (its meaning is in ``doc``); ``value_type``: the value's type
    when the default (null) does not show it; ``pattern``: a regular expression a string value must
    match as a whole, as ``(regex, what it allows in words)``.
    """
    meta = dict(doc=doc, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, kind=kind,
                nullable=nullable, value_type=value_type, pattern=pattern)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section_list(cls, doc: str):
    """A list of sections of ``cls`` (each item a mapping checked as a section is); empty by default."""
    return field(default_factory=list, metadata=dict(doc=doc, items=cls))


def section(cls, doc: str, optional: bool = False):
    """A nested section; ``optional`` sections may be absent (null) in the file."""
    meta = dict(doc=doc, section=cls, optional=optional)
    if optional:
        return field(default=None, metadata=meta)
    return field(default_factory=cls, metadata=meta)


# --------------------------------------------------------------------------- the schema

NORMALIZE_MODES = ("both", "query_only", "memory_only", "none")
STRATEGIES = ("rarity", "statistical", "diversity", "hybrid", "entropy", "fifo", "reservoir")
LOSSES = ("bce", "asl", "focal")
# The data sets of cxrmem.data.registry, by name (a test holds the two equal).
DATASET_NAMES = ("chestxray14", "chexpert", "mimic_cxr", "padchest", "vindr_cxr", "nih_google")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones", "smooth")
EXTERNAL_SPLITS = ("test", "valid", "train", "all")  # what an external evaluation scores of the other data set


@dataclass
class ModelConfig:
    num_classes: int | None = opt(None, "number of output classes; null: one per finding the model predicts "
                                  "(model.findings); a number must equal their count", lo=1, nullable=True,
                                  value_type=int)
    findings: list | None = opt(None, "findings the model predicts, in output order, from the label space of "
                                "docs/datasets.md (a list, or names separated by commas); null: the training data "
                                "set's own (ChestX-ray14's 14 by default)", kind="names", nullable=True)
    backbone: str = opt(
        "efficientnet_v2_s",
        "backbone name: efficientnet_v2_s/m/l, resnet18/34/50, densenet121 or timm/<name>",
    )
    pretrained: bool = opt(True, "start from ImageNet weights (downloaded on first use into the torch / Hugging Face cache, then read from it)")
    weights: str | None = opt(None, "path of a local state dict to start the backbone from", kind="path")
    dropout_rate: float = opt(0.3, "dropout before the last linear layer of the head", lo=0.0, hi=1.0, hi_open=True)
    precision: str = opt("auto", "auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16",
                         choices=("auto", "fp32", "fp16", "bf16"))
    channels_last: str = opt("auto", "auto (on CUDA), true or false", choices=("auto", "true", "false"))


@dataclass
class MemoryConfig:
    use_memory: bool = opt(True, "wrap the backbone with the memory bank")
    bank_size: int = opt(512, "number of slots in the bank", lo=1)
    update_strategy: str = opt("rarity", "how a batch is scored and selected for storage", choices=STRATEGIES)
    rarity_threshold: float = opt(
        0.1, "rarity: relative norm deviation above which a feature is stored; "
        "diversity/hybrid/entropy: fraction of the batch stored", lo=0.0)
    diversity_weight: float = opt(0.5, "hybrid: weight of diversity against rarity", lo=0.0, hi=1.0)
    top_k: int = opt(3, "slots retrieved per query", lo=1)
    normalize_retrieved: str = opt("both", "similarity normalisation: both (cosine), query_only, memory_only, none",
                                   choices=NORMALIZE_MODES, kind="normalize")
    memory_momentum: float = opt(0.9, "momentum of slot merges when no phase sets one (evaluation, custom loops)",
                                 lo=0.0, hi=1.0, hi_open=True)
    self_match_threshold: float = opt(0.99, "slots at least this similar to the query are not retrieved")


@dataclass
class SyntheticConfig:
    n_patients: int = opt(800, "patients to generate (about 3.6 images each)", lo=1)
    size: int = opt(256, "side of the generated PNGs in pixels", lo=16)
    seed: int = opt(0, "generator seed")


@dataclass
class CacheConfig:
    size: int | None = opt(None, "shorter side of the pre-resized images in pixels; null: data.image_size (the "
                           "loader then only decodes)", lo=16, nullable=True, value_type=int)
    dir: str | None = opt(None, "cache folder (default: <data_dir>_<size>px)", kind="path")
    format: str = opt("png", "image format of the cache", choices=("png", "jpg"))


@dataclass
class DataSetFolder:
    """A data set and its folder: a member of data.datasets, and the base of an external test set."""

    dataset: str = opt("chestxray14", "the data set at data_dir", choices=DATASET_NAMES)
    data_dir: str = opt("", "its folder, as its publisher ships it", kind="path")


@dataclass
class DataConfig:
    dataset: str = opt("chestxray14", "the data set at data_dir, as its publisher ships it (docs/datasets.md)",
                       choices=DATASET_NAMES)
    data_dir: str = opt("data/chestxray14", "data set root (ChestX-ray14: Data_Entry_2017.csv, lists, images_*/images; "
                        "the others: docs/datasets.md)", kind="path")
    views: str = opt("frontal", "images kept: frontal (PA and AP), all, or view names separated by commas "
                     "(e.g. PA or PA,AP; a list also works)", kind="names_text")
    uncertain: str = opt("ignore", "uncertain labels (CheXpert, MIMIC-CXR) of the train split: ignore (missing: no "
                         "loss), zeros, ones or smooth (uniform in [0.55, 0.85]); in valid and test always missing",
                         choices=UNCERTAIN_POLICIES)
    mimic_labeler: str = opt("chexpert", "MIMIC-CXR: labels of the chexpert or the negbio labeller",
                             choices=("chexpert", "negbio"))
    radiologists: str = opt("any", "VinDr-CXR: a finding is positive when any radiologist marks it, or a majority",
                            choices=("any", "majority"))
    datasets: list = section_list(DataSetFolder, "train on the union of several data sets: a list of {dataset, "
                                  "data_dir} (dataset and data_dir above are then unused); each is split on its own, "
                                  "the model predicts the union of their findings, a finding one lacks is missing there")
    image_size: int = opt(224, "side of the network input in pixels", lo=16)
    seed: int = opt(42, "seed of the splits (validation patients, derived test); of training too while seed is null")
    valid_pct: float = opt(0.1, "fraction of train_val patients held out for validation; 0: train on every "
                           "train_val image, without early stopping, keeping the last epoch",
                           lo=0.0, hi=1.0, hi_open=True)
    num_workers: int | str = opt("auto", "DataLoader worker processes: auto (GPU: the cores of each process less one; CPU: 0) or a number", lo=0, kind="auto_int")
    missing_images: str = opt("error", "images listed in the CSV but absent on disk: error or drop",
                              choices=("error", "drop"))
    augment: bool = opt(True, "small random rotations, zoom and lighting changes on training batches (no flips)")
    synthetic: SyntheticConfig | None = section(
        SyntheticConfig, "generate a synthetic data set at data_dir on first use", optional=True)
    cache: CacheConfig | None = section(CacheConfig, "train from a pre-resized copy of the data set, built on first "
                                        "use (null: read the original files)", optional=True)


@dataclass
class Phase1Config:
    filter_normal: bool = opt(True, "train and validate on abnormal images only")
    batch_size: int = opt(64, "images per batch (divided over processes under torchrun)", lo=1)
    loss: str = opt("bce", "loss function", choices=LOSSES)
    use_lr_finder: bool = opt(True, "pick base_lr with fastai's LR finder (valley)")
    base_lr: float = opt(1e-3, "learning rate when the LR finder is off", lo=0.0, lo_open=True)
    freeze_epochs: int = opt(3, "epochs with the backbone frozen", lo=0)
    total_epochs: int = opt(20, "epochs with all layers trained, after the frozen ones", lo=0)
    weight_decay: float = opt(1e-2, "AdamW weight decay", lo=0.0)
    early_stopping_patience: int | None = opt(5, "epochs without valid_loss improvement before stopping; "
                                              "null: no early stopping", lo=1, nullable=True)
    memory_momentum: float = opt(0.9, "memory bank momentum during this phase", lo=0.0, hi=1.0, hi_open=True)
    warmup_epochs: int = opt(
        0, "> 0: instead of fastai's fine_tune, fit_one_cycle(warmup_epochs, lr_max=warmup_lr) with the backbone "
        "frozen, then fit_one_cycle(total_epochs, lr_max=base_lr) with every layer at that one LR; "
        "freeze_epochs is then unused", lo=0)
    warmup_lr: float | None = opt(None, "peak LR of the warmup epochs; null: base_lr / 10 (base_lr from the LR "
                                  "finder when it is on)", lo=0.0, lo_open=True, nullable=True, value_type=float)
    mixup: float = opt(0.0, "fastai MixUp alpha: each training image and its targets blended with another "
                       "of the batch, weight lam ~ Beta(alpha, alpha) taken >= 0.5; 0: off", lo=0.0)


@dataclass
class Phase2Config:
    filter_normal: bool = opt(False, "train and validate on abnormal images only")
    batch_size: int = opt(128, "images per batch (divided over processes under torchrun)", lo=1)
    loss: str = opt("bce", "loss function", choices=LOSSES)
    epochs: int = opt(5, "one-cycle epochs", lo=1)
    lr_min: float = opt(2e-5, "discriminative LR of the backbone (slice start)", lo=0.0, lo_open=True)
    lr_max: float = opt(8e-5, "LR of the head (slice end)", lo=0.0, lo_open=True)
    weight_decay: float = opt(1e-2, "AdamW weight decay", lo=0.0)
    early_stopping_patience: int | None = opt(3, "epochs without valid_loss improvement before stopping; "
                                              "null: no early stopping", lo=1, nullable=True)
    memory_momentum: float = opt(0.9999, "memory bank momentum during this phase (keep 0.9999)",
                                 lo=0.0, hi=1.0, hi_open=True)
    mixup: float = opt(0.0, "fastai MixUp alpha on training batches (as phase1.mixup); 0: off", lo=0.0)


@dataclass
class ExternalConfig(DataSetFolder):
    split: str = opt("test", "which of its splits is evaluated", choices=EXTERNAL_SPLITS)


@dataclass
class EvaluationConfig:
    bootstrap_resamples: int = opt(1000, "bootstrap resamples for the 95% intervals (0: none)", lo=0)
    bootstrap_unit: str = opt("patient", "what a bootstrap resample draws: patient (all images of each drawn "
                              "patient; the id is the image name before its first '_') or image",
                              choices=("patient", "image"))
    operating_point: str = opt("youden", "per-finding threshold chosen on the validation split: youden, "
                               "sensitivity:X or specificity:X (0 < X <= 1: the highest threshold reaching that "
                               "sensitivity, the lowest reaching that specificity)")
    save_predictions: bool = opt(True, "write <experiment_name>_predictions.pt")
    external: list = section_list(ExternalConfig, "external validation at the end of training: a list of {dataset, "
                                  "data_dir, split}, each evaluated as cxrmem evaluate --run does, into "
                                  "<run>/external/<dataset>/")

    def __post_init__(self):

        try:
            parse_operating_point(self.operating_point)
        except ValueError as error:
            raise UserError(f"evaluation.operating_point: {error}") from None


@dataclass
class TrackingConfig:
    tensorboard: bool = opt(False, "write TensorBoard event files (losses, metrics, learning rates) under "
                            "<run folder>/tensorboard/phase<N>/")
    mlflow: str | None = opt(None, "MLflow tracking: null (off), true or default (sqlite:///<runs root>/mlflow.db, "
                             "the runs root being the run folder's parent) or a tracking URI used as is",
                             kind="uri_or_bool")
    experiment: str | None = opt(None, "MLflow experiment that groups the runs (default: experiment_name; a sweep "
                                 "sets its own name)")


@dataclass
class TrainConfig:
    deterministic: bool = opt(False, "GPU: true picks cuDNN's deterministic kernels without autotuning, so a run, "
                              "and a resumed run, repeat to the bit; false lets cuDNN time its kernels and keep "
                              "the fastest (cudnn.benchmark), and runs differ in the last bits. No effect on the CPU")


@dataclass
class Config:
    experiment_name: str = opt("experiment", "name of the experiment; names the run folder and files")
    description: str = opt("", "free text")
    save_name: str | None = opt(None, "stem of the checkpoint files (default: experiment_name)")
    output_dir: str | None = opt(None, "run folder (default: runs/<experiment_name>)", kind="path")
    seed: int | None = opt(None, "training seed: initialisation, data order, augmentation and dropout "
                           "(null: data.seed); never moves the split", lo=0, nullable=True, value_type=int)
    model: ModelConfig = section(ModelConfig, "the network")
    memory: MemoryConfig = section(MemoryConfig, "the memory bank")
    data: DataConfig = section(DataConfig, "the data set and loaders")
    train: TrainConfig = section(TrainConfig, "settings of both phases")
    phase1: Phase1Config = section(Phase1Config, "phase 1: abnormal images, frozen then fine-tuned")
    phase2: Phase2Config | None = section(Phase2Config, "phase 2: all images, one cycle (absent: one phase)",
                                          optional=True)
    evaluation: EvaluationConfig = section(EvaluationConfig, "reporting")
    tracking: TrackingConfig = section(TrackingConfig, "experiment tracking: TensorBoard and MLflow (both off)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.experiment_name)

    @property
    def checkpoint_stem(self) -> str:
        return self.save_name or self.experiment_name

    @property
    def train_seed(self) -> int:
        """Seed of initialisation, data order, augmentation and dropout: ``seed``, else ``data.seed``."""
        return self.data.seed if self.seed is None else self.seed

    @property
    def evaluation_batch_size(self) -> int:
        """Images per batch when a trained model is evaluated, predicts, explains or is exported:
        the last phase's batch size."""
        return (self.phase2 or self.phase1).batch_size


# --------------------------------------------------------------------------- validation


def _closest(name: str, valid) -> str:
    match = closest(name, valid, cutoff=0.5)
    return f"; did you mean {match}?" if match else f"; valid keys: {', '.join(valid)}"


def _value_type(f: dataclasses.Field) -> type:
    if f.metadata.get("kind") == "auto_int":
        return int
    return f.metadata.get("value_type") or (str if f.default is None else type(f.default))


def _type_name(f: dataclasses.Field) -> str:
    kind = f.metadata.get("kind")
    if kind == "auto_int":
        return "an integer or 'auto'"
    if kind == "normalize":
        return "true/false or one of " + ", ".join(NORMALIZE_MODES)
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[_value_type(f)]
    return name + " or null" if f.metadata.get("nullable") else name


def check_finite(key: str, value: Any, source: str) -> None:
    """Refuse NaN and infinities (YAML ``.nan``, ``.inf``, ``-.inf``), which pass every range test."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}: {value} in {source} is not a finite number; write a finite value")


def _range_text(m) -> str:
    lo = "" if m["lo"] is None else (f"> {m['lo']}" if m["lo_open"] else f">= {m['lo']}")
    hi = "" if m["hi"] is None else (f"< {m['hi']}" if m["hi_open"] else f"<= {m['hi']}")
    return " and ".join(p for p in (lo, hi) if p)


def _coerce(key: str, f: dataclasses.Field, value: Any, source: str = "<config>") -> Any:
    """Check one scalar against its field: type, then finiteness, choices and range."""
    m = f.metadata
    kind = m.get("kind")
    if kind == "normalize":
        value = {True: "both", False: "none", None: "none"}.get(value, value) if not isinstance(value, str) else value
    if kind == "uri_or_bool" and isinstance(value, bool):  # true: the default store, false: off
        value = "default" if value else None
    if kind == "auto_int" and value == "auto":
        return value
    if kind in ("names", "names_text"):
        return _names(key, value, text=kind == "names_text")
    if value is None and (f.default is None or kind == "path" or m.get("nullable")):
        return None
    if f.name == "channels_last" and isinstance(value, bool):
        value = str(value).lower()
    expected = _value_type(f)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    check_finite(key, value, source)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {_type_name(f)}, got {value!r}")
    if m.get("pattern") and not re.fullmatch(m["pattern"][0], value):
        raise UserError(f"{key}: {value!r} is not allowed here; use {m['pattern'][1]}")
    if m.get("choices") and value not in m["choices"]:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(m['choices'])}"
                        + _closest(str(value), m["choices"]).replace("valid keys", "choices"))
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m["lo_open"] and value == lo)) or \
       hi is not None and (value > hi or (m["hi_open"] and value == hi)):
        raise UserError(f"{key}: {value!r} is out of range; it must be {_range_text(m)}")
    return value


def _names(key: str, value: Any, text: bool) -> Any:
    """A list of names: a YAML list of strings or one string of names separated by commas; returned as a
    list (``text``: as one comma-separated string). Null stays null."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise UserError(f"{key}: expected names (a list, or text separated by commas), got {value!r}")
    names = [v.strip() for v in items if v.strip()]
    if not names:
        raise UserError(f"{key}: no names given; write at least one, or null")
    if len(set(names)) < len(names):
        raise UserError(f"{key}: {next(n for n in names if names.count(n) > 1)!r} is named twice; name it once")
    return ",".join(names) if text else names


def _origin(key: str, source: str, origins: dict[str, str]) -> str:
    """Where ``key`` was set: the command-line option that set it or a key under it, else ``source``."""
    for dotted, option in origins.items():
        if dotted == key or dotted.startswith(key + "."):
            return option
    return source


def _build(cls, raw: Any, prefix: str, source: str, origins: dict[str, str] | None = None):
    """Turn a mapping from YAML into dataclass ``cls``, validating every key; ``origins`` maps the
    dotted keys set on the command line to the option that set them, for the error messages."""
    origins = origins or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "top level"
        raise UserError(f"{where} in {_origin(where, source, origins)}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise UserError(f"{dotted}: unknown key in {_origin(dotted, source, origins)}"
                            f"{_closest(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        sub = f.metadata.get("section")
        items = f.metadata.get("items")
        if sub is not None:
            values[name] = None if raw[name] is None and f.metadata["optional"] else \
                _build(sub, raw[name], f"{prefix}{name}.", source, origins)
        elif items is not None:
            value = [] if raw[name] is None else raw[name]
            if not isinstance(value, list):
                key = f"{prefix}{name}"
                raise UserError(f"{key} in {_origin(key, source, origins)}: expected a list of mappings, got {value!r}")
            values[name] = [_build(items, item, f"{prefix}{name}[{i}].", source, origins) for i, item in enumerate(value)]
        else:
            key = f"{prefix}{name}"
            values[name] = _coerce(key, f, raw[name], _origin(key, source, origins))
    return cls(**values)


def _check_relations(cfg: Config) -> None:
    """Constraints that span several keys."""
    members = [(m.dataset, m.data_dir) for m in cfg.data.datasets]
    if len(set(members)) < len(members):
        raise UserError("data.datasets: a data set is listed twice with the same data_dir; list each once")
    if cfg.data.datasets and (cfg.data.cache is not None or cfg.data.synthetic is not None):
        raise UserError("data.datasets: a union reads each data set as it is; set data.cache and data.synthetic to "
                        "null (generate synthetic members with cxrmem synthetic --dataset)")
    if cfg.memory.use_memory and cfg.memory.top_k > cfg.memory.bank_size:
        raise UserError(f"memory.top_k: {cfg.memory.top_k} is larger than memory.bank_size "
                        f"({cfg.memory.bank_size}); lower top_k or raise bank_size")
    if cfg.phase2 is not None and cfg.phase2.lr_min > cfg.phase2.lr_max:
        raise UserError(f"phase2.lr_min ({cfg.phase2.lr_min}) is larger than phase2.lr_max "
                        f"({cfg.phase2.lr_max}); swap them")
    first = cfg.phase1.warmup_epochs or cfg.phase1.freeze_epochs
    if first + cfg.phase1.total_epochs < 1:
        raise UserError("phase1: freeze_epochs (or warmup_epochs) + total_epochs is 0; train for at least one epoch")


def from_dict(raw: dict, source: str = "<config>", origins: dict[str, str] | None = None) -> Config:
    cfg = _build(Config, raw, "", source, origins)
    _check_relations(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{a: {b: 1}} -> {"a.b": 1}; an empty mapping is a value (e.g. ``data.synthetic: {}``)."""
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def same_experiment(saved_yaml: str, cfg: Config) -> bool:
    """Whether a run folder's config.yaml (its text) describes ``cfg``'s experiment: every key equal
    except ``output_dir``, which says where the folder was, not what was trained (a copied or moved
    run folder is the same run). A key the saved file lacks takes its default, so a run started
    before a version that added keys (with defaults that change nothing) is still the same run."""
    try:
        saved = yaml.load(saved_yaml, Loader=StrictLoader)  # noqa: S506 - a SafeLoader
        saved = to_dict(from_dict(saved)) if isinstance(saved, dict) else saved
    except (yaml.YAMLError, RepeatedKey, AliasRefused, UserError):
        return False
    current = yaml.safe_load(dump_yaml(cfg))  # the form config.yaml has
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "output_dir"} == \
        {k: v for k, v in current.items() if k != "output_dir"}


# --------------------------------------------------------------------------- loading


class RepeatedKey(Exception):
    """A key named twice in one mapping: (dotted key, first line, second line), lines from 1."""


#: Values a document may expand to, aliases followed: a config holds a few hundred; a "billion laughs"
#: file (nine levels of nine aliases) would hold 9^9, and every walk over it would never end.
MAX_YAML_VALUES = 100_000


class AliasRefused(Exception):
    """A YAML document whose aliases refer to themselves or expand past MAX_YAML_VALUES: (reason, line)."""


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def check_aliases(root) -> None:
    """AliasRefused unless the composed node graph is acyclic and expands to at most MAX_YAML_VALUES.

    An alias is the anchored node itself, so the graph is a DAG of shared nodes (or, with a
    recursive alias such as ``&x [*x]``, has a cycle). One depth-first pass: a node met again while
    it is still open closes a cycle; a node's expanded size is 1 plus its children's, each counted
    as often as it is referred to, computed once per node.
    """
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            if size[key] > MAX_YAML_VALUES:
                raise AliasRefused(f"its aliases expand to over {MAX_YAML_VALUES:,} values", node.start_mark.line + 1)
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise AliasRefused("an alias refers to a value that contains it (a recursive alias)",
                               node.start_mark.line + 1)
        open_nodes.add(key)
        stack.append((node, True))
        stack += [(child, False) for child in _children(node) if id(child) not in size]


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key named twice in one mapping is an error.

    PyYAML keeps the last of two equal keys without a word, so a repeated ``top_k`` would
    silently win over the first one. Merge keys (``<<``) still override as YAML says.
    """

    def construct_document(self, node):
        self._paths = {}  # id(mapping node) -> its dotted key, for the error message
        check_aliases(node)
        stack = [(node, "")]
        while stack:  # a tree now (check_aliases refused cycles), small enough to walk with its repeats
            current, path = stack.pop()
            if isinstance(current, yaml.MappingNode):
                self._paths.setdefault(id(current), path)
                stack += [(value, f"{path}{key.value}.") for key, value in current.value
                          if isinstance(key, yaml.ScalarNode)]
            elif isinstance(current, yaml.SequenceNode):
                stack += [(item, path) for item in current.value]
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # complex keys are PyYAML's to judge; merges may override
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    path = getattr(self, "_paths", {}).get(id(node), "")
                    raise RepeatedKey(f"{path}{key}", seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects with :class:`StrictLoader`; mistakes become one-line ``UserError``s."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except RepeatedKey as exc:
        key, first, second = exc.args
        raise UserError(f"{source}: {key} is set twice (lines {first} and {second}); keep one of them") from None
    except AliasRefused as exc:
        reason, line = exc.args
        raise UserError(f"{source}: line {line}: {reason}; write the values out instead of through aliases") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}:{where}: YAML syntax error ({problem}); fix the file") from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing file, e.g. "
                        f"configs/experiments/memory_rarity_effv2s.yaml")
    raw = parse_yaml(path.read_text(), str(path))
    if raw is None:
        raise UserError(f"{path} is empty; write the keys of an experiment into it, e.g. start from a copy of "
                        f"configs/experiments/memory_rarity_effv2s.yaml")
    return raw


def check_finite_everywhere(raw: Any, source: str, prefix: str = "", origins: dict[str, str] | None = None) -> None:
    """:func:`check_finite` on every number of a raw mapping, also in lists and keys the schema drops."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        dotted = f"{prefix}[{key}]" if isinstance(raw, list) else f"{prefix}{'.' if prefix else ''}{key}"
        check_finite(dotted, value, _origin(dotted, source, origins or {}))
        check_finite_everywhere(value, source, dotted, origins)


def apply_override(raw: dict, assignment: str) -> str:
    """Apply one ``section.key=value`` to the raw mapping (value parsed as a YAML scalar); return the key."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected key=value, e.g. --set memory.top_k=5")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.load(text, Loader=StrictLoader) if text.strip() else None  # noqa: S506
    except (yaml.YAMLError, RepeatedKey):
        value = text
    except AliasRefused as exc:
        raise UserError(f"--set {assignment}: {exc.args[0]}; write the value out") from None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment}: {part} is not a section")
    node[parts[-1]] = value
    return ".".join(parts)


def load_config(path, overrides=(), data_dir=None, output_dir=None) -> Config:
    """Read ``path``, apply ``--set`` overrides and shorthands, translate reference-format keys
    (printing one ``note:`` line when there were any), validate, return a :class:`Config`."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    origins = {apply_override(raw, assignment): f"--set {assignment}" for assignment in overrides}
    if data_dir is not None:
        origins[apply_override(raw, f"data.data_dir={data_dir}")] = "--data_dir"
    if output_dir is not None:
        origins[apply_override(raw, f"output_dir={output_dir}")] = "--output_dir"
    check_finite_everywhere(raw, str(path), origins=origins)
    translated = reference.translate(raw, str(path), command_line=set(origins))
    translated.announce()
    return from_dict(translated.raw, str(path), origins)


def iter_schema(cls=Config, prefix: str = ""):
    """Yield (dotted key, default, doc, allowed) for every leaf key: the configuration reference."""
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("section")
        if sub is not None:
            yield from iter_schema(sub, f"{prefix}{f.name}.")
            continue
        m = f.metadata
        allowed = ", ".join(m["choices"]) if m.get("choices") else _range_text(m) if m.get("lo") is not None \
            or m.get("hi") is not None else ""
        if m.get("nullable"):
            allowed = f"{allowed} or null" if allowed else "null"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f"{prefix}{f.name}", default, m["doc"], allowed
        if m.get("items") is not None:
            yield from iter_schema(m["items"], f"{prefix}{f.name}[].")
