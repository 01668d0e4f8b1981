"""fastai callbacks: per-phase memory momentum and monitoring, atomic checkpoints, CSV history.

Each is a small hook on fastai's training loop; the loop itself is fastai's.
"""

from __future__ import annotations

import math

import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.learner import Metric

from .. import io
from ..errors import UserError
from ..metrics import mean_auc, per_class_auc
from .distributed import is_main_process, load_on_main, unwrap


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
    """Macro ROC-AUC on the validation set over the classes that have both labels (NaN if none)."""

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
            return float("nan")
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


class AtomicSaveModel(SaveModelCallback):
    """SaveModelCallback whose checkpoint files are written atomically and reloaded weights-only."""

    def _save(self, name):
        path = self.learn.path / self.learn.model_dir / f"{name}.pth"
        if is_main_process():  # under torchrun rank 0 writes; every rank holds the same weights
            io.torch_save(unwrap(self.learn.model).state_dict(), path)
        self.last_saved_path = path

    def after_fit(self, **kwargs):
        path = self.learn.path / self.learn.model_dir / f"{self.fname}.pth"
        model = unwrap(self.learn.model)

        def load():
            if path.exists():
                model.load_state_dict(io.torch_load(path, map_location=self.learn.dls.device))

        load_on_main(model, load)  # under torchrun: rank 0 reads the file and sends the weights to the others


class HistoryCSV(Callback):
    """One line per epoch (all fits of the phase), rewritten atomically after every epoch."""

    order = 60  # after the Recorder has composed the epoch's log

    def __init__(self, path):
        self.path, self.rows, self.header = path, [], None

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")  # the LR finder's mock epochs are not history

    def after_epoch(self):
        names = ["stage", *self.recorder.metric_names]
        self.header = self.header or names
        stage = "frozen" if _is_frozen(self.learn) else "unfrozen"
        self.rows.append([stage, len(self.rows), *self.recorder.log[1:]])
        lines = [",".join(self.header)] + [",".join(map(_cell, row)) for row in self.rows]
        if is_main_process():
            io.write_text(self.path, "\n".join(lines) + "\n")


def _is_frozen(learn) -> bool:
    return learn.opt is not None and learn.opt.frozen_idx > 0


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class StopOnNonFiniteLoss(Callback):
    """Stops the run when the training loss is NaN or infinite, naming phase, epoch and batch.

    Raised before the backward pass, so no non-finite step is taken; the best
    checkpoint already on disk is left as it is.
    """

    order = -10

    def __init__(self, phase: int):
        self.phase = phase

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss).all():
            raise UserError(f"loss became non-finite in phase {self.phase}, epoch {self.epoch}, batch {self.iter}; "
                            f"lower the learning rate of phase{self.phase} or check the data")


__all__ = ["MemoryMomentum", "MeanAUC", "MemoryValue", "AtomicSaveModel", "HistoryCSV", "StopOnNonFiniteLoss"]
