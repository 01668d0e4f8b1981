"""Experiment files written for the reference implementation (MemAugModel), read as cxrmem files.

The reference's YAML experiment files name a few settings differently. :func:`translate` turns a
raw mapping (as read from YAML, before validation) into cxrmem's form:

* a key with a cxrmem equivalent is moved or rewritten (``phase1.lr -> phase1.base_lr``,
  ``image_size: [224, 224] -> 224``, ``loss: asymmetric -> asl``);
* a key that changes nothing here is removed (``optimizer: adam``, ``save_best: true``, ...);
* a value cxrmem cannot honour is refused with one line giving the reason and the fix;
* every other key, including all of cxrmem's own, is left alone, so a cxrmem file comes back
  unchanged and the schema then validates the result as usual.

Each rule is a function ``rule(t, key, value)`` registered in :data:`RULES` under the dotted key
it handles; a rule that finds its value already in cxrmem's form does nothing. Settings spread
over several reference keys (per-phase ``save_name`` and ``num_workers``) are collected by their
rules and settled by :data:`FINISHERS`. docs/migrating.md lists every key and what it becomes.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..utils.errors import UserError

PHASES = ("phase1", "phase2")

#: The reference's loss names that cxrmem spells differently.
LOSS_NAMES = {"asymmetric": "asl"}

#: fastai's MixUp alpha, used when the reference's boolean ``mixup`` flag was on.
FASTAI_MIXUP_ALPHA = 0.4

#: Memory types of the reference's advanced banks. Its train.py only printed the type and built the
#: plain bank with the file's (or the default) strategy, so a file naming one trains the plain bank here too.
ADVANCED_MEMORY_TYPES = ("loss_aware", "attention", "prototype")
#: Settings read only by those advanced banks (``momentum`` included: the phases set the momentum).
ADVANCED_MEMORY_KEYS = ("update_mode", "adaptive_k", "min_k", "max_k", "num_heads", "dropout",
                        "num_prototypes", "update_freq", "momentum")

OPTIMIZERS = ("adam", "adamw")  # what fastai's default optimiser is: Adam with decoupled weight decay

#: The reference's Python table of experiments (its configs/config.py), one complete cxrmem file per
#: name, shipped inside the package: ``train_fastai.py --experiment NAME`` finds them from any folder.
LEGACY_DIR = Path(__file__).resolve().parent / "legacy"


def legacy_experiments() -> dict[str, Path]:
    """Name -> file of every experiment of the reference's Python table."""
    return {path.stem: path for path in sorted(LEGACY_DIR.glob("*.yaml"))}


@dataclass
class Translation:
    """A raw mapping being translated, and what was done to it (for the ``note:`` line)."""

    raw: dict
    source: str
    changed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    cautions: list[str] = field(default_factory=list)  # one warning each
    save_names: dict[str, str] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    command_line: set[str] = field(default_factory=set)  # dotted keys set by --set: they win over the file

    # dotted-key access; a section that is absent or null holds no keys
    def _parent(self, key: str, create: bool = False) -> tuple[dict | None, str]:
        *sections, last = key.split(".")
        node = self.raw
        for name in sections:
            if create and node.get(name) is None:
                node[name] = {}
            node = node.get(name) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                return None, last
        return node, last

    def has(self, key: str) -> bool:
        parent, last = self._parent(key)
        return parent is not None and last in parent

    def get(self, key: str, default=None):
        parent, last = self._parent(key)
        return default if parent is None else parent.get(last, default)

    def pop(self, key: str):
        parent, last = self._parent(key)
        return parent.pop(last)

    def put(self, key: str, value) -> None:
        parent, last = self._parent(key, create=True)
        parent[last] = value

    def drop(self, key: str) -> None:
        self.pop(key)
        self.dropped.append(key)

    def refuse(self, key: str, reason: str):
        raise UserError(f"{key} in {self.source}: {reason}")

    def summary(self) -> str:
        parts = []
        if self.changed:
            parts.append("translated " + ", ".join(self.changed))
        if self.dropped:
            parts.append("ignored " + compact(self.dropped))
        return f"{self.source} uses the reference's keys: " + "; ".join(parts) + " (docs/migrating.md says why)"

    def announce(self) -> None:
        """Warn about what behaves differently; print one ``note:`` line listing the translation."""
        if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun: rank 0 only
            return
        for message in self.cautions:
            warnings.warn(message, stacklevel=3)
        if self.changed or self.dropped:
            print(f"note: {self.summary()}", file=sys.stderr)


Rule = Callable[[Translation, str, Any], None]


def compact(keys: list[str]) -> str:
    """``["phase1.a", "phase2.a", "phase1.b"]`` -> ``"phase1/phase2.a, phase1.b"``."""
    sections: dict[str, list[str]] = {}
    for key in keys:
        section, _, leaf = key.rpartition(".")
        sections.setdefault(leaf, []).append(section)
    return ", ".join("/".join(s for s in where) + ("." if any(where) else "") + leaf
                     for leaf, where in sections.items())

# --------------------------------------------------------------------------- rules


def square_image_size(t: Translation, key: str, value) -> None:
    """``[h, w]`` with h == w -> the side; cxrmem's inputs are square."""
    if not isinstance(value, list):
        return
    sides_are_ints = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not sides_are_ints:
        t.refuse(key, f"expected an integer or [side, side], got {value}")
    if value[0] != value[1]:
        t.refuse(key, f"{value} is not square; cxrmem resizes to square inputs: write one side, "
                      f"e.g. image_size: {max(value)}")
    t.put(key, value[0])
    t.changed.append(f"{key} {value} -> {value[0]}")


def loss_name(t: Translation, key: str, value) -> None:
    if isinstance(value, str) and value in LOSS_NAMES:
        t.put(key, LOSS_NAMES[value])
        t.changed.append(f"{key} {value} -> {LOSS_NAMES[value]}")


def rename(target: str) -> Rule:
    """A rule moving its key to ``target`` (refused when the file sets both, differently)."""
    def rule(t: Translation, key: str, value) -> None:
        t.pop(key)
        if t.has(target) and t.get(target) != value:
            t.refuse(key, f"{value!r} conflicts with {target} ({t.get(target)!r}), its cxrmem name; keep one")
        t.put(target, value)
        t.changed.append(f"{key} -> {target}")
    return rule


def dropped(t: Translation, key: str, value) -> None:
    t.drop(key)


def optimizer(t: Translation, key: str, value) -> None:
    if str(value).lower() not in OPTIMIZERS:
        t.refuse(key, f"{value!r} is not available; cxrmem trains with fastai's Adam with decoupled weight "
                      f"decay (as the reference did whatever this key said): remove the key")
    t.drop(key)


def save_best(t: Translation, key: str, value) -> None:
    no_validation = t.get("data.valid_pct") == 0
    if value is False and not no_validation:
        t.refuse(key, "false (keep the last epoch) is not available with a validation split; cxrmem keeps "
                      "the epoch with the best valid_loss: remove the key, or set data.valid_pct: 0 to train "
                      "without validation and keep the last epoch")
    t.drop(key)


def load_from_phase1(t: Translation, key: str, value) -> None:
    if value is False:
        t.refuse(key, "false is not available: phase 2 always starts from the best phase-1 weights; "
                      "for a single phase, remove the phase2 section")
    t.drop(key)


def mixup(t: Translation, key: str, value) -> None:
    """The reference's learner took ``mixup`` as a flag (on: fastai's MixUp, alpha 0.4)."""
    if value is None or isinstance(value, bool):
        alpha = FASTAI_MIXUP_ALPHA if value else 0.0
        t.put(key, alpha)
        t.changed.append(f"{key} {value} -> {alpha}")


def memory_type(t: Translation, key: str, value) -> None:
    if value not in ADVANCED_MEMORY_TYPES:
        t.refuse(key, f"{value!r} is not one of the reference's memory types "
                      f"({', '.join(ADVANCED_MEMORY_TYPES)}); remove the key and choose memory.update_strategy")
    t.pop(key)
    strategy = t.get("memory.update_strategy", "rarity")
    t.cautions.append(
        f"{key}: {value!r} in {t.source} is not implemented; training the plain memory bank "
        f"(update_strategy {strategy}), which is what the reference's train.py did too: it only printed the type")


def save_name(t: Translation, key: str, value) -> None:
    """Per-phase checkpoint names; settled by :func:`settle_save_name`."""
    phase = key.split(".")[0]
    t.pop(key)
    if value is not None:
        t.save_names[key] = re.sub(f"_{phase}$", "", str(value))


def num_workers(t: Translation, key: str, value) -> None:
    """Per-loader worker counts; settled by :func:`settle_num_workers`."""
    t.pop(key)
    t.workers[key] = value


RULES: dict[str, Rule] = {
    "data.image_size": square_image_size,
    "memory.memory_type": memory_type,
    **{f"memory.{name}": dropped for name in ADVANCED_MEMORY_KEYS},
    "phase1.lr": rename("phase1.base_lr"),
    "phase1.min_delta_early_stop": dropped,
    **{f"{phase}.{name}": rule for phase in PHASES for name, rule in {
        "loss": loss_name,
        "optimizer": optimizer,
        "min_delta": dropped,
        "save_best": save_best,
        "save_name": save_name,
        "num_workers": num_workers,
        "mixup": mixup,
    }.items()},
    "phase2.load_from_phase1": load_from_phase1,
    "phase2.phase1_checkpoint": dropped,
    "evaluation.batch_size": dropped,
    "evaluation.num_workers": num_workers,
}

# --------------------------------------------------------------------------- finishers


def settle_save_name(t: Translation) -> None:
    """One stem for the checkpoints when the phases' names share one after ``_phase1``/``_phase2``."""
    if not t.save_names:
        return
    keys = compact(list(t.save_names))
    stems = set(t.save_names.values())
    if t.has("save_name") or len(stems) > 1:
        t.dropped += list(t.save_names)  # checkpoints: models/<save_name or experiment_name>_phase<n>.pth
        return
    stem = stems.pop()
    t.put("save_name", stem)
    t.changed.append(f"{keys} -> save_name {stem}")


def settle_num_workers(t: Translation) -> None:
    """The loaders' worker counts -> data.num_workers, the one count cxrmem uses for every loader."""
    if not t.workers:
        return
    if "data.num_workers" in t.command_line:  # the command line wins over the file's per-loader counts
        t.dropped += list(t.workers)
        return
    counts = dict(t.workers)
    if t.has("data.num_workers"):
        counts["data.num_workers"] = t.get("data.num_workers")
    if len(set(map(repr, counts.values()))) > 1:
        listed = ", ".join(f"{k} {v!r}" for k, v in counts.items())
        t.refuse(next(iter(t.workers)), f"the loaders' worker counts differ ({listed}); cxrmem uses one "
                                        f"data.num_workers for every loader: set that instead")
    value = next(iter(counts.values()))
    if not t.has("data.num_workers"):
        t.put("data.num_workers", value)
    t.changed.append(f"{compact(list(t.workers))} -> data.num_workers {value}")


FINISHERS = (settle_save_name, settle_num_workers)


def translate(raw: dict, source: str, command_line=()) -> Translation:
    """Apply every rule whose key is present, then the finishers; ``raw`` itself is not modified.
    ``command_line``: the dotted keys that ``--set`` gave, which win over what the file says."""
    t = Translation(copy.deepcopy(raw), source, command_line=set(command_line))
    for key, rule in RULES.items():
        if t.has(key):
            rule(t, key, t.get(key))
    for finish in FINISHERS:
        finish(t)
    return t
