"""fastai callbacks: per-phase memory momentum and monitoring, the best (or, without a validation
split, the last) checkpoint, early stopping, the epoch log (printed and kept as CSV), and the non-finite-loss stop.

Each is a small hook on fastai's training loop; the loop itself is fastai's. The checkpoint, early
stopping and the non-finite stop are fastai's SaveModelCallback, EarlyStoppingCallback and
TerminateOnNaNCallback, subclassed where they differ on purpose (atomic, rank 0, resumable, a
clear error instead of a silent cancel). A callback finds another through the Learner, by the name
fastai gives it (``learn.epoch_log``, ``learn.save_checkpoint``); one with state that a resumed
run needs has ``resume_state`` / ``load_resume_state`` (see :mod:`.resume`).
"""

from __future__ import annotations

import math

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import (
    EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback, TrackerCallback,
)
from fastai.learner import Metric

from ..utils import io
from ..utils.errors import UserError
from ..evaluation.auc import mean_auc, per_class_auc
from .distributed import is_main_process, load_on_main, unwrap
from .resume import plain


class MemoryMomentum(Callback):
    """Sets the bank's momentum for the phase and measures it per epoch.

    * ``fill``: filled / bank_size after the epoch's training batches;
    * ``moved``: ||M_after - M_before||_F / ||M_before||_F over the epoch (NaN while the
      bank was empty at the epoch's start).
    """

    order = 40  # before the Recorder (50) writes the epoch's line

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.fill, self.moved, self.before = 0.0, 0.0, None

    @property
    def bank(self):
        return getattr(unwrap(self.learn.model), "bank", None)  # inside DDP while fitting under torchrun

    def before_fit(self):
        if self.bank is not None:
            self.bank.momentum = self.momentum

    def before_train(self):
        if self.bank is not None:
            self.before = self.bank.memory.detach().clone()

    def after_train(self):
        if self.bank is None:
            return
        self.fill = self.bank.fill_fraction()
        empty_before = not bool(self.before.any())
        self.moved = float("nan") if empty_before else self.bank.relative_change(self.before)


class MeanAUC(Metric):
    """Macro ROC-AUC on the validation set over the classes that have both labels (NaN if none;
    None without validation batches, shown as "-" in the epoch log)."""

    def __init__(self, labels):
        self.labels = list(labels)

    def reset(self):
        self.probs, self.targets = [], []

    def accumulate(self, learn):
        # learn.to_detach: under torchrun, every rank's predictions (fastai gathers and un-pads them)
        self.probs.append(torch.sigmoid(learn.to_detach(learn.pred).float()))
        self.targets.append(learn.to_detach(learn.y))

    @property
    def value(self):
        if not self.probs:
            return None
        probs = torch.cat(self.probs).numpy()
        targets = torch.cat(self.targets).numpy()
        mean = mean_auc(per_class_auc(probs, targets, self.labels))
        return float("nan") if mean is None else mean

    @property
    def name(self):
        return "valid_auc"


class MemoryValue(Metric):
    """Shows one of :class:`MemoryMomentum`'s figures as a column of the epoch table."""

    def __init__(self, monitor: MemoryMomentum, attribute: str):
        self.monitor, self.attribute = monitor, attribute

    def reset(self):
        pass

    def accumulate(self, learn):
        pass

    @property
    def value(self):
        return getattr(self.monitor, self.attribute)

    @property
    def name(self):
        return f"memory_{self.attribute}"


class SaveCheckpoint(SaveModelCallback):
    """fastai's SaveModelCallback, written for a phase that may be resumed and run under torchrun.

    Keeps the weights (bank included) of the phase's best epoch by ``monitor`` in ``path``, or with
    ``every_epoch`` (no validation split: nothing to choose by) those of its latest epoch, and loads
    them when a fit ends. Where it differs from fastai's, on purpose: the best is that of the phase
    over all its fits (``reset_on_fit=False``) and is carried by the resume file; the file is a
    weights-only state dict written atomically by rank 0 alone; every rank gets the weights from
    rank 0 at the end; the epoch log's ``*`` marks a new best instead of a printed line.
    """

    def __init__(self, path, monitor: str = "valid_loss", every_epoch: bool = False):
        super().__init__(monitor=monitor, every_epoch=every_epoch, reset_on_fit=False)  # writes to path, not fname
        self.path, self.new_best = path, False

    def before_fit(self):
        if self.every_epoch:  # no monitored value to prepare: valid_loss is absent without validation
            self.run = not hasattr(self.learn, "lr_finder")
        else:
            super().before_fit()

    def after_epoch(self):
        if self.every_epoch:
            self.new_best = True
        else:
            TrackerCallback.after_epoch(self)  # sets best and new_best; fastai's own would print and save
        if self.new_best and is_main_process():  # under torchrun every rank holds the same weights
            io.torch_save(unwrap(self.learn.model).state_dict(), self.path)

    def after_fit(self):
        TrackerCallback.after_fit(self)
        model = unwrap(self.learn.model)

        def load():
            if self.path.exists():
                model.load_state_dict(io.torch_load(self.path, map_location=self.learn.dls.device))

        load_on_main(model, load)  # under torchrun: rank 0 reads the file and sends the weights to the others

    def resume_state(self):
        return None if self.best is None else float(self.best)

    def load_resume_state(self, best, mid_stage: bool) -> None:
        if best is not None:
            self.best = best


class EarlyStop(EarlyStoppingCallback):
    """fastai's EarlyStoppingCallback that a resumed stage continues: the count of epochs without
    improvement and the best of the interrupted fit come back from the resume file. Its one line
    names the monitored value and the epochs waited (fastai's names an epoch of the current fit,
    which a resumed or multi-stage phase numbers otherwise)."""

    def __init__(self, patience: int, monitor: str = "valid_loss"):
        super().__init__(monitor=monitor, patience=patience)
        self.wait, self.resumed = 0, None

    def before_fit(self):
        super().before_fit()
        if self.run and self.resumed is not None:
            best, self.wait = self.resumed
            self.best = self.best if best is None else best
            self.resumed = None

    def after_epoch(self):
        TrackerCallback.after_epoch(self)
        self.wait = 0 if self.new_best else self.wait + 1
        if self.wait >= self.patience:
            print(f"no improvement of {self.monitor} in {self.wait} epochs: stopping early")
            raise CancelFitException()

    def resume_state(self):
        return None if self.best is None else [float(self.best), int(self.wait)]

    def load_resume_state(self, state, mid_stage: bool) -> None:
        self.resumed = tuple(state) if mid_stage and state is not None else None


class EpochLog(Callback):
    """One line per epoch of a phase, printed and kept in a CSV file (rewritten atomically by rank 0)::

        phase  stage     epoch  train_loss  valid_loss  valid_auc  ...   time  best
            1  frozen        1      0.7133      0.6902     0.5350  ...  00:01  *
            1  unfrozen      2      0.6921      0.6955     0.5871  ...  00:02

    ``stage`` is set by the driver before each fit (frozen, unfrozen, one_cycle); ``epoch``
    counts on over the stages of the phase (1, 2, 3, ...); ``*`` marks the epochs that
    became the best checkpoint. The CSV has the same rows without phase and mark.
    Replaces fastai's own epoch table: the Learner's ``logger`` is fastcore's ``noop``.
    """

    order = TrackerCallback.order + 2  # after the checkpoint (61) decided new_best, before EarlyStop (63) may end the fit

    def __init__(self, path, phase: int):
        self.path, self.phase = path, phase
        self.stage, self.rows, self.header = "", [], None

    @property
    def epoch_number(self) -> int:
        """The number of the epoch under way (or the next one), as the log shows it."""
        return len(self.rows) + 1

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")  # the LR finder's mock epochs are not history

    def after_epoch(self):
        if self.header is None:
            self.header = ["stage", *self.recorder.metric_names]  # metric_names: epoch, train_loss, ..., time
            self._print("phase", "stage", "epoch", self.header[2:], "best")
        epoch, values = self.epoch_number, list(self.recorder.log[1:])
        self.rows.append([self.stage, epoch, *values])
        checkpoint = getattr(self.learn, "save_checkpoint", None)  # fastai names a callback after its class
        self._print(self.phase, self.stage, epoch, values, "*" if checkpoint is not None and checkpoint.new_best else "")
        if is_main_process():
            lines = [",".join(self.header)] + [",".join(map(_cell, r)) for r in self.rows]
            io.write_text(self.path, "\n".join(lines) + "\n")

    def resume_state(self):
        return [[plain(cell) for cell in row] for row in self.rows]

    def load_resume_state(self, rows, mid_stage: bool) -> None:
        self.rows = [list(row) for row in rows or []]

    def _print(self, phase, stage, epoch, values, mark):
        widths = [max(10, len(name)) for name in self.header[2:]]
        cells = [f"{phase:>5}", f"{stage:<9}", f"{epoch:>5}"]
        cells += [f"{_shown(v):>{w}}" for v, w in zip(values, widths)]
        print("  ".join([*cells, mark]).rstrip(), flush=True)


def _shown(value) -> str:
    """A value of the printed table: floats with 4 decimals, "-" for none (no validation split)."""
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(value) -> str:
    """A value of the CSV: empty for none and NaN."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class StopOnNonFiniteLoss(TerminateOnNaNCallback):
    """fastai's TerminateOnNaNCallback, made loud: instead of cancelling the fit silently (the run
    would go on to the next stage and report), stops the run with a one-line error naming phase,
    epoch (as the epoch log numbers them) and batch (1 is the epoch's first).

    Checked after the batch, where fastai reads the loss on the host anyway (its running
    train_loss), so the check adds no wait for the GPU. The run stops before the epoch ends,
    so the weights of that step reach no file: the best checkpoint and the resume file on
    disk are those of the last finished epoch.
    """

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")  # the finder's own stop_div ends its divergence

    def after_batch(self):
        if self.training and not torch.isfinite(self.loss).all():
            log = self.learn.epoch_log
            raise UserError(f"loss became non-finite in phase {log.phase}, epoch {log.epoch_number}, "
                            f"batch {self.iter + 1}; lower the learning rate of phase{log.phase} or check the data")


__all__ = ["MemoryMomentum", "MeanAUC", "MemoryValue", "SaveCheckpoint", "EarlyStop", "EpochLog",
           "StopOnNonFiniteLoss"]
