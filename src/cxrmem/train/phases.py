"""The two-phase driver.

Phase 1 learns from abnormal images: the backbone frozen for ``freeze_epochs``,
then every layer for ``total_epochs`` (fastai ``fine_tune``) at the LR finder's
valley, memory momentum 0.9. Phase 2 starts a new Learner on all images from the
best phase-1 weights (memory bank included), unfrozen, ``fit_one_cycle`` over
``slice(lr_min, lr_max)``, memory momentum 0.9999 so the bank stays stable while
normal images arrive.
"""

from __future__ import annotations

import sys

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import valley
from fastai.callback.tracker import EarlyStoppingCallback
from fastai.learner import Learner
from fastai.torch_core import set_seed

from .. import io
from ..data.chestxray14 import FINDINGS, phase_frame
from ..data.loaders import build_dataloaders
from ..errors import UserError
from ..models.net import build_model, splitter
from .callbacks import AtomicSaveModel, HistoryCSV, MeanAUC, MemoryMomentum, MemoryValue, StopOnNonFiniteLoss
from .losses import build_loss


def train(cfg, frame, device) -> Learner:
    """Train as the config says; returns the last phase's Learner holding its best weights."""
    set_seed(cfg.data.seed, reproducible=True)
    model = build_model(cfg.model, cfg.memory)

    # Phase 1: abnormal images; frozen, then fine-tuned; LR from the finder.
    p1 = cfg.phase1
    learn = make_learner(cfg, model, frame, p1, phase=1, device=device)
    lr = learn.lr_find(suggest_funcs=(valley,), show_plot=False).valley if p1.use_lr_finder else p1.base_lr
    print(f"phase 1: {'LR finder (valley)' if p1.use_lr_finder else 'base_lr'} -> {lr:.3g}")
    learn.fine_tune(p1.total_epochs, lr, freeze_epochs=p1.freeze_epochs)

    # Phase 2: all images; best phase-1 weights and bank; unfrozen; one cycle.
    if cfg.phase2 is not None:
        p2 = cfg.phase2
        learn = make_learner(cfg, model, frame, p2, phase=2, device=device)
        load_checkpoint(learn.model, checkpoint_path(cfg, phase=1))
        learn.unfreeze()
        learn.fit_one_cycle(p2.epochs, slice(p2.lr_min, p2.lr_max))
    return learn


def make_learner(cfg, model, frame, phase_cfg, phase: int, device) -> Learner:
    """A fastai Learner for one phase: its data, loss, weight decay and callbacks."""
    rows = phase_frame(frame, phase_cfg.filter_normal)
    n_train = int((~rows["is_valid"]).sum())
    if n_train < phase_cfg.batch_size:
        raise UserError(f"phase {phase} has {n_train} training images, fewer than phase{phase}.batch_size "
                        f"({phase_cfg.batch_size}); lower the batch size or use more data")
    dls = build_dataloaders(rows, cfg.data, phase_cfg.batch_size, device)
    monitor = MemoryMomentum(phase_cfg.memory_momentum)
    metrics = [MeanAUC(FINDINGS)]
    if getattr(model, "bank", None) is not None:
        metrics += [MemoryValue(monitor, "fill"), MemoryValue(monitor, "moved")]
    callbacks = [
        monitor,
        StopOnNonFiniteLoss(phase),
        AtomicSaveModel(monitor="valid_loss", fname=checkpoint_path(cfg, phase).stem, reset_on_fit=False),
        EarlyStoppingCallback(monitor="valid_loss", patience=phase_cfg.early_stopping_patience),
        HistoryCSV(cfg.run_dir / f"history_phase{phase}.csv"),
    ]
    learn = Learner(dls, model.to(device), loss_func=build_loss(phase_cfg.loss), wd=phase_cfg.weight_decay,
                    metrics=metrics, splitter=splitter, path=cfg.run_dir, model_dir="models", cbs=callbacks)
    apply_cuda_fast_paths(learn, cfg.model, device)
    if not sys.stdout.isatty():
        learn.remove_cb(ProgressCallback)
        learn.logger = print_epoch_line(learn, phase)
    return learn


def apply_cuda_fast_paths(learn: Learner, model_cfg, device) -> None:
    """Mixed precision and channels_last on CUDA (``auto``); the bank's buffers stay fp32."""
    if device.type != "cuda":
        return
    precision = model_cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    if model_cfg.channels_last in ("auto", "true"):
        learn.model.to(memory_format=torch.channels_last)
        learn.add_cb(ChannelsLast())


def print_epoch_line(learn: Learner, phase: int):
    """A plain epoch logger for non-terminals (logs, CI): one aligned line per epoch."""
    state = {"header": False}

    def log(values):
        names = learn.recorder.metric_names
        if not state["header"]:
            print(f"phase {phase}  " + "  ".join(f"{n:>12}" for n in names), flush=True)
            state["header"] = True
        cells = [f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}" for v in values]
        print(f"phase {phase}  " + "  ".join(cells), flush=True)

    return log


def checkpoint_path(cfg, phase: int):
    return cfg.run_dir / "models" / f"{cfg.checkpoint_stem}_phase{phase}.pth"


def load_checkpoint(model, path) -> None:
    """Load a weights-only state dict into ``model``; a mismatch is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train first or pass --model_path to an existing .pth")
    try:
        state = io.torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise UserError(f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:120]}); "
                        f"use a .pth written by this toolkit") from None
    if isinstance(state, dict) and set(state) == {"model", "opt"}:
        state = state["model"]
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    absent = sorted(set(own) - set(state))
    wrong_shape = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or absent or wrong_shape:
        example = (wrong_shape or absent or unexpected)[0]
        raise UserError(f"checkpoint {path} does not match this model ({len(wrong_shape)} tensors of another "
                        f"shape, {len(absent)} missing, {len(unexpected)} unexpected, e.g. {example}); use the "
                        f"config it was trained with (model.backbone, model.num_classes, memory.*)")
    model.load_state_dict(state)
