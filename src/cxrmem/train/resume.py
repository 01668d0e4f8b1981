"""Resuming a killed run from its last finished epoch.

Training is a fixed sequence of stages: phase 1 ``frozen`` then ``unfrozen``
(fastai's ``fine_tune``), phase 2 ``one_cycle``. After every finished epoch, and
when a stage ends (early stopping included), :class:`SaveProgress` writes
``models/<save_name>_resume.pth`` atomically:

    {"model": state dict (bank included), "opt": optimizer state,
     "progress": {phase, stage, epochs_done, stage_complete, lr, callbacks},
     "random": every random generator training draws from (see random_states)}

``--resume`` restores it at the first unfinished stage and skips that stage's
finished epochs with :class:`SkipFinishedEpochs`, so the one-cycle schedule
continues where it stopped (fastai recomputes its position from the epoch number).

A callback with state of its own carries it in ``progress["callbacks"]`` under its fastai
name: ``resume_state()`` gives it (plain numbers and lists), ``load_resume_state(state,
mid_stage)`` takes it back when its phase resumes (``mid_stage``: within the interrupted stage).
The resume file knows no callback by name.

A resumed run is the uninterrupted one, to the bit on one CPU process with the same
number of loader workers: within the phase of the interruption the random generators
(Python ``random``, NumPy, torch CPU and CUDA, the DataLoaders' own shuffling generators,
the memory bank's reservoir generator) continue from the last finished epoch; phase 2
starts from a seed of its own (:func:`phase_seed`), so it needs nothing of phase 1's
generators but the bank's.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelEpochException
from fastcore.foundation import L

from ..utils import io
from ..utils.errors import UserError
from .distributed import is_distributed, is_main_process, on_main, unwrap

STAGES = [(1, "frozen"), (1, "unfrozen"), (2, "one_cycle")]


@dataclass
class Progress:
    phase: int = 1
    stage: str = "frozen"
    epochs_done: int = 0
    stage_complete: bool = False
    lr: float | None = None          # phase 1's learning rate (LR finder result)
    callbacks: dict = field(default_factory=dict)  # callback name -> its resume_state()

    @classmethod
    def from_saved(cls, saved: dict) -> "Progress":
        """Also reads a file of an earlier release, which named three callbacks' states itself."""
        saved = dict(saved)
        older = {"save_checkpoint": saved.pop("best", None), "early_stop": saved.pop("stop", None),
                 "epoch_log": saved.pop("history", None)}
        saved.setdefault("callbacks", {k: v for k, v in older.items() if v is not None})
        return cls(**saved)

    @property
    def position(self) -> int:
        return STAGES.index((self.phase, self.stage))


class ResumeState:
    """What a run already did: nothing (a fresh run) or what a resume file says."""

    def __init__(self, path, resume: bool):
        self.path = path
        self.saved = None
        if resume:
            self.saved = on_main(lambda: _read(path))  # under torchrun: rank 0 reads, every rank gets it
        self.progress = Progress.from_saved(self.saved["progress"]) if self.saved else Progress()
        self.smooth_loss = None  # the Recorder's running train_loss within the interrupted stage

    def stage_done(self, phase: int, stage: str) -> bool:
        if self.saved is None:
            return False
        here, p = STAGES.index((phase, stage)), self.progress
        return here < p.position or (here == p.position and p.stage_complete)

    def restore(self, learn, phase: int, stage: str) -> int:
        """At the first unfinished stage: load weights and the bank's generator; within the phase also
        the callbacks' states and the random generators; within the stage the optimizer. Returns the
        number of epochs of this stage to skip."""
        self.smooth_loss = None  # only the interrupted stage continues fastai's running train_loss
        if self.saved is None:
            return 0
        saved, p = self.saved, self.progress
        self.saved = None  # restore once
        learn.model.load_state_dict(saved["model"])
        randomness = saved.get("random", {})
        set_bank_state(learn, randomness)
        if p.phase != phase:
            return 0
        mid_stage = p.stage == stage and not p.stage_complete
        if mid_stage:  # a new stage starts with a clear optimizer state: fastai's freeze / unfreeze clear it
            state = on_parameter_devices(saved["opt"]["state"], learn.opt)
            learn.opt.load_state_dict({"state": state, "hypers": L(saved["opt"]["hypers"])})
            self.smooth_loss = saved.get("smooth_loss")
        for cb in learn.cbs:
            if hasattr(cb, "load_resume_state") and cb.name in p.callbacks:
                cb.load_resume_state(p.callbacks[cb.name], mid_stage)
        if not is_distributed():  # the file holds rank 0's generators; every rank keeps its own seeding
            set_random_states(learn, randomness)
        return p.epochs_done if mid_stage else 0


def on_parameter_devices(states: list, opt) -> list:
    """fastai optimizer states (one dict per parameter, in ``opt.all_params()`` order) with every tensor
    moved to the device of its parameter. The resume file is read onto the CPU, and fastai's
    ``load_state_dict`` keeps tensors where they are, so a CUDA run's next step would mix devices."""
    params = opt.all_params().itemgot(0)
    return [{key: value.to(param.device) if isinstance(value, torch.Tensor) else value for key, value in state.items()}
            for state, param in zip(states, params)]


def phase_seed(seed: int, phase: int) -> int:
    """The seed the random generators get when ``phase`` starts: ``seed`` for phase 1, ``seed + 1``
    for phase 2. Phase 2's data order, augmentation and dropout then depend on neither phase 1's
    draws nor on whether phase 1 was resumed."""
    return seed + phase - 1


def random_states(learn) -> dict:
    """The state of every random generator training draws from, loadable with ``weights_only``:
    Python ``random`` (fastai's augmentation choices), NumPy, torch CPU (weights, dropout, affine
    augmentation, MixUp, the workers' seeds) and CUDA, each DataLoader's shuffling generator
    (fastai draws every epoch's order from the loader's own ``random.Random``), and the memory
    bank's reservoir generator."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
              "torch": torch.get_rng_state(),
              "loaders": [dl.rng.getstate() if hasattr(dl, "rng") else None  # torchrun's DistributedDL: none
                          for dl in learn.dls.loaders]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    bank = getattr(unwrap(learn.model), "bank", None)
    if bank is not None:
        states["bank"] = bank.generator.get_state()
    return states


def set_random_states(learn, states: dict) -> None:
    """Put back what :func:`random_states` saved (all but the bank's; see :func:`set_bank_state`)."""
    if not states:
        return
    random.setstate(_tuples(states["python"]))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for dl, state in zip(learn.dls.loaders, states["loaders"]):
        if state is not None:
            dl.rng.setstate(_tuples(state))


def set_bank_state(learn, states: dict) -> None:
    bank = getattr(unwrap(learn.model), "bank", None)
    if bank is not None and "bank" in states:
        bank.generator.set_state(states["bank"])


def _tuples(value):
    """A ``random`` state as ``setstate`` wants it (tuples all the way down)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def saved_progress(path) -> Progress | None:
    """The progress a resume file records; None when there is none or it cannot be read."""
    try:
        return Progress.from_saved(_load(path)["progress"]) if Path(path).is_file() else None
    except (UserError, KeyError, TypeError):
        return None


def stopped_at(path) -> str:
    """Where the run behind resume file ``path`` stopped, e.g. ``phase 1, unfrozen stage, after 3
    epochs``; ``at an unknown point`` when the file cannot be read."""
    try:
        p = Progress.from_saved(_load(path)["progress"])
    except (UserError, KeyError, TypeError):
        return "at an unknown point"
    done = "finished" if p.stage_complete else f"after {p.epochs_done} epoch{'s' * (p.epochs_done != 1)}"
    return f"phase {p.phase}, {p.stage} stage, {done}"


def _read(path):
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found; run without --resume to start training")
    return _load(path)


def _load(path):
    try:
        return io.torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be resumed from
        raise UserError(f"resume file {path} {io.unreadable_reason(path, exc)}; "
                        f"run with --overwrite to start over") from None


class SaveProgress(Callback):
    """Writes the resume file after each finished epoch and when the stage ends."""

    order = 80  # after the best checkpoint (61) and the epoch log (62) of the epoch are on disk

    def __init__(self, path, progress: Progress):
        self.path, self.progress = path, progress

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")

    def after_epoch(self):
        self.progress.epochs_done = self.epoch + 1
        self._write()

    def after_fit(self):
        self.progress.stage_complete = True
        self._write()

    def _write(self):
        p = self.progress
        p.callbacks = {cb.name: cb.resume_state() for cb in self.learn.cbs if hasattr(cb, "resume_state")}
        if not is_main_process():  # under torchrun rank 0 writes; the ranks are in the same state
            return
        opt = self.learn.opt.state_dict()
        hypers = [{k: plain(v) for k, v in h.items()} for h in opt["hypers"]]
        io.torch_save({"model": unwrap(self.learn.model).state_dict(),
                       "opt": {"state": list(opt["state"]), "hypers": hypers},
                       "progress": asdict(p), "random": random_states(self.learn),
                       "smooth_loss": smooth_loss_state(self.learn)}, self.path)


def smooth_loss_state(learn) -> list:
    """fastai logs as train_loss a running average carried over the epochs of a fit: [count, value]."""
    smooth = learn.recorder.smooth_loss
    return [int(smooth.count), torch.as_tensor(smooth.val).detach().cpu().clone()]


def plain(value):
    """numpy scalars -> Python numbers, so the file loads with ``weights_only=True``."""
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


class SkipFinishedEpochs(Callback):
    """Skips the first ``n`` epochs of a fit, silencing every other callback for them
    (fastai's own SkipToEpoch would let the Recorder and trackers see empty epochs) except that the
    progress bar counts them, then
    gives the Recorder back its running train_loss ``smooth_loss`` ([count, value]) as the
    interrupted fit had it."""

    order = -50  # before fastai's own callbacks see the epoch

    def __init__(self, n: int, smooth_loss=None):
        self.n, self.smooth_loss, self.silenced, self.skipping = n, smooth_loss, [], False

    def before_epoch(self):
        for cb in self.silenced:
            cb.run = True
        self.silenced = []
        self.skipping = self.epoch < self.n
        if self.skipping:
            progress = getattr(self.learn, "progress", None)  # fastai's ProgressCallback (on a terminal)
            if progress is not None:
                progress.before_epoch()  # its master bar must see epoch 0, or its first update(k > 0) fails
            self.silenced = [cb for cb in self.learn.cbs if cb is not self and cb.run]
            for cb in self.silenced:
                cb.run = False
            raise CancelEpochException()
        if self.smooth_loss is not None:
            smooth = self.learn.recorder.smooth_loss
            smooth.count, smooth.val = self.smooth_loss[0], self.smooth_loss[1].to(smooth.val.device)
            self.smooth_loss = None

    def after_fit(self):
        for cb in self.silenced:
            cb.run = True
        self.silenced = []
