"""Resuming a killed run from its last finished epoch.

Training is a fixed sequence of stages: phase 1 ``frozen`` then ``unfrozen``
(fastai's ``fine_tune``), phase 2 ``one_cycle``. After every finished epoch, and
when a stage ends (early stopping included), :class:`SaveProgress` writes
``models/<save_name>_resume.pth`` atomically:

    {"model": state dict (bank included), "opt": optimizer state,
     "progress": {phase, stage, epochs_done, stage_complete, lr, best, history}}

``--resume`` restores it at the first unfinished stage and skips that stage's
finished epochs with :class:`SkipFinishedEpochs`, so the one-cycle schedule
continues where it stopped (fastai recomputes its position from the epoch number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from fastai.callback.core import Callback, CancelEpochException
from fastcore.foundation import L

from .. import io
from ..errors import UserError
from .distributed import is_main_process, on_main, unwrap

STAGES = [(1, "frozen"), (1, "unfrozen"), (2, "one_cycle")]


@dataclass
class Progress:
    phase: int = 1
    stage: str = "frozen"
    epochs_done: int = 0
    stage_complete: bool = False
    lr: float | None = None          # phase 1's learning rate (LR finder result)
    best: float | None = None        # best valid_loss of the phase so far
    history: list = field(default_factory=list)

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
        self.progress = Progress(**self.saved["progress"]) if self.saved else Progress()

    def stage_done(self, phase: int, stage: str) -> bool:
        if self.saved is None:
            return False
        here, p = STAGES.index((phase, stage)), self.progress
        return here < p.position or (here == p.position and p.stage_complete)

    def restore(self, learn, phase: int, stage: str, log) -> int:
        """At the first unfinished stage: load weights (and, within the phase, optimizer,
        best value and the epoch log's rows). Returns the number of epochs of this stage to skip."""
        if self.saved is None:
            return 0
        saved, p = self.saved, self.progress
        self.saved = None  # restore once
        learn.model.load_state_dict(saved["model"])
        if p.phase != phase:
            return 0
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict({"state": saved["opt"]["state"], "hypers": L(saved["opt"]["hypers"])})
        log.checkpoint.best = p.best if p.best is not None else log.checkpoint.best
        log.rows = [list(row) for row in p.history]
        return p.epochs_done if p.stage == stage and not p.stage_complete else 0


def _read(path):
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found; run without --resume to start training")
    return _load(path)


def _load(path):
    try:
        return io.torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be resumed from
        raise UserError(f"resume file {path} cannot be read ({str(exc).splitlines()[0][:100]}); "
                        f"run without --resume to start over") from None


class SaveProgress(Callback):
    """Writes the resume file after each finished epoch and when the stage ends."""

    order = 80  # after the best checkpoint (61) and the epoch log (62) of the epoch are on disk

    def __init__(self, path, progress: Progress, log):
        self.path, self.progress, self.log = path, progress, log

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
        best = self.log.checkpoint.best
        p.best = float(best) if best is not None else None
        p.history = [[_plain(cell) for cell in row] for row in self.log.rows]
        if not is_main_process():  # under torchrun rank 0 writes; the ranks are in the same state
            return
        opt = self.learn.opt.state_dict()
        hypers = [{k: _plain(v) for k, v in h.items()} for h in opt["hypers"]]
        io.torch_save({"model": unwrap(self.learn.model).state_dict(),
                       "opt": {"state": list(opt["state"]), "hypers": hypers},
                       "progress": asdict(p)}, self.path)


def _plain(value):
    """numpy scalars -> Python numbers, so the file loads with ``weights_only=True``."""
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


class SkipFinishedEpochs(Callback):
    """Skips the first ``n`` epochs of a fit, silencing every other callback for them
    (fastai's own SkipToEpoch would let the Recorder and trackers see empty epochs)."""

    order = -50  # before fastai's own callbacks see the epoch

    def __init__(self, n: int):
        self.n, self.silenced, self.skipping = n, [], False

    def before_epoch(self):
        for cb in self.silenced:
            cb.run = True
        self.silenced = []
        self.skipping = self.epoch < self.n
        if self.skipping:
            self.silenced = [cb for cb in self.learn.cbs if cb is not self and cb.run]
            for cb in self.silenced:
                cb.run = False
            raise CancelEpochException()

    def after_fit(self):
        for cb in self.silenced:
            cb.run = True
        self.silenced = []

