"""The two-phase driver.

Phase 1 learns from abnormal images: the backbone frozen for ``freeze_epochs``,
then every layer for ``total_epochs`` (fastai ``fine_tune``) at the LR finder's
valley, memory momentum 0.9. With ``warmup_epochs`` > 0 the two stages are instead
``fit_one_cycle(warmup_epochs, warmup_lr)`` frozen, then ``fit_one_cycle(total_epochs,
lr)`` unfrozen. Phase 2 (absent: one phase) starts a new Learner on all images from the
best phase-1 weights (memory bank included), unfrozen, ``fit_one_cycle`` over
``slice(lr_min, lr_max)``, memory momentum 0.9999 so the bank stays stable while
normal images arrive.

With a validation split each phase keeps its best epoch by valid_loss and stops early
after ``early_stopping_patience`` epochs without improvement (null: never); without one
(``data.valid_pct: 0``) it keeps its last epoch and never stops early.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from typing import NamedTuple

import torch

from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import valley
from fastai.imports import noop  # fastai tells "no logger" by this very function (not fastcore's noop)
from fastai.learner import Learner

from ..utils import io
from ..data.registry import model_findings
from ..data.loaders import build_dataloaders
from ..data.split import phase_frame
from ..utils.errors import UserError
from ..models.backbones import IMAGENET_STATS
from ..models.net import INPUT_STATS_KEYS, build_model, splitter
from .figures import plot_lr_find
from ..utils.figures import safe_plot
from . import distributed, speed
from .callbacks import (
    EarlyStop, EpochLog, MeanAUC, MemoryMomentum, MemoryValue, SaveCheckpoint, StopOnNonFiniteLoss,
)
from .losses import build_loss
from .resume import ResumeState, SaveProgress, SkipFinishedEpochs, phase_seed, saved_progress
from .tracking import callbacks as tracking_callbacks


def train(cfg, frame, device, resume: bool = False) -> Learner:
    """Train as the config says; returns the last phase's Learner holding its best weights.

    With ``resume``, finished stages and epochs recorded in the resume file are skipped.
    """
    speed.seed_run(cfg.train_seed, cfg.train.deterministic)  # deterministic: bit-exact cuDNN, else autotuned
    model = build_model(cfg.model, cfg.memory, len(model_findings(cfg)))
    distributed.seed_per_rank(cfg.train_seed)  # under torchrun: same weights, own augmentation and dropout
    state = ResumeState(resume_path(cfg), resume)

    # Phase 1: abnormal images; LR from the finder; backbone frozen, then all layers
    # (fastai's fine_tune, spelled out as two one-cycle stages so that each can resume).
    p1 = cfg.phase1
    learn = make_learner(cfg, model, frame, p1, phase=1, device=device)
    lr = state.progress.lr or choose_lr(learn, p1)
    state.progress.lr = lr
    distributed.make_distributed(learn)  # under torchrun: DDP from here on (rank 0 ran the finder alone)
    for stage in phase1_stages(p1, lr):
        fit_stage(learn, state, 1, stage.name, stage.epochs, stage.lr, **stage.one_cycle)

    # Phase 2: all images; a new Learner from the best phase-1 weights and bank; unfrozen; one cycle.
    if cfg.phase2 is not None:
        p2 = cfg.phase2
        speed.seed_run(phase_seed(cfg.train_seed, 2), cfg.train.deterministic)
        distributed.seed_per_rank(phase_seed(cfg.train_seed, 2))
        learn = make_learner(cfg, model, frame, p2, phase=2, device=device)
        distributed.make_distributed(learn)
        distributed.load_on_main(learn.model, lambda: load_checkpoint(learn.model, checkpoint_path(cfg, phase=1)))
        fit_stage(learn, state, 2, "one_cycle", p2.epochs, slice(p2.lr_min, p2.lr_max))
    return learn  # the resume file stays until the run's results are written (finish_run)


def final_stage(cfg) -> tuple[int, str]:
    """(phase, stage) of the last stage that trains: phase 2's one cycle, else phase 1's last stage."""
    if cfg.phase2 is not None and cfg.phase2.epochs > 0:
        return 2, "one_cycle"
    return 1, [stage.name for stage in phase1_stages(cfg.phase1, 1.0) if stage.epochs > 0][-1]


def training_finished(cfg) -> bool:
    """Whether the run's resume file records its final stage as complete: training is done and only
    the evaluation (prediction, results, pointing game, plots) was cut short."""
    progress = saved_progress(resume_path(cfg))
    return progress is not None and progress.stage_complete and (progress.phase, progress.stage) == final_stage(cfg)


def finish_run(cfg) -> None:
    """The run's results are written: the resume file has served its purpose."""
    if distributed.is_main_process():
        resume_path(cfg).unlink(missing_ok=True)


class Stage(NamedTuple):
    """One ``fit_one_cycle`` of a phase: its name (as the resume file records it), epochs, learning
    rate (a float or a ``slice`` over the layer groups) and fit_one_cycle's other options."""
    name: str
    epochs: int
    lr: object
    one_cycle: dict


#: fastai's own defaults of ``Learner.fine_tune`` (lr_mult, pct_start, div), read from its signature:
#: the unfrozen stage follows the installed fastai rather than a copy of its numbers.
FINE_TUNE = {name: p.default for name, p in inspect.signature(Learner.fine_tune).parameters.items()
             if name in ("lr_mult", "pct_start", "div")}


def phase1_stages(p1, lr: float) -> list[Stage]:
    """Phase 1 as data. By default fastai's ``fine_tune(total_epochs, lr, freeze_epochs)``, stage by
    stage: frozen at ``slice(lr)`` with ``pct_start=0.99`` (fine_tune's frozen fit), then unfrozen at
    ``slice(lr / 2 / lr_mult, lr / 2)`` with its ``pct_start`` and ``div``. With ``warmup_epochs`` the
    reference's warm-up: frozen at ``warmup_lr`` (null: lr / 10), then every layer at ``lr``, both
    with fit_one_cycle's defaults."""
    if p1.warmup_epochs:
        warmup_lr = p1.warmup_lr if p1.warmup_lr is not None else lr / 10
        return [Stage("frozen", p1.warmup_epochs, warmup_lr, {}), Stage("unfrozen", p1.total_epochs, lr, {})]
    top = lr / 2  # fine_tune halves base_lr once it unfreezes
    return [Stage("frozen", p1.freeze_epochs, slice(lr), {"pct_start": 0.99}),
            Stage("unfrozen", p1.total_epochs, slice(top / FINE_TUNE["lr_mult"], top),
                  {"pct_start": FINE_TUNE["pct_start"], "div": FINE_TUNE["div"]})]


def choose_lr(learn: Learner, phase_cfg) -> float:
    """fastai's LR finder (``valley``) when ``use_lr_finder``, else ``base_lr``. Under torchrun rank 0
    runs the finder alone, before the model is wrapped for DDP, and the other ranks get its result."""
    if not phase_cfg.use_lr_finder:
        return phase_cfg.base_lr
    print("phase 1: LR finder (fastai lr_find, up to 100 batches)", flush=True)
    lr = distributed.on_main(lambda: find_lr(learn))
    print(f"phase 1: LR finder (valley) -> {lr:.3g}")
    return lr


def find_lr(learn: Learner) -> float:
    """The LR finder's valley on this process's plain Learner; weights as before; the curve plotted."""
    model, bank = learn.model, learn.model.bank
    if distributed.is_distributed():
        model.bank = None  # its updates are collective, and rank 0 runs the finder alone; it is still empty
    copies = learn.path / learn.model_dir
    for leftover in copies.glob("tmp*/_tmp.pth"):  # of a finder killed outright (SIGKILL) in an earlier run
        shutil.rmtree(leftover.parent, ignore_errors=True)
    try:
        lr = float(learn.lr_find(suggest_funcs=(valley,), show_plot=False).valley)
    finally:
        model.bank = bank
        # fastai deletes its copy of the weights (models/tmp*/_tmp.pth) only when the finder ends normally
        for leftover in copies.glob("tmp*/_tmp.pth"):
            shutil.rmtree(leftover.parent, ignore_errors=True)
    learn.opt = None  # the first fit makes a fresh optimizer, as on ranks that did not run the finder,
    model.zero_grad()  # and no gradients: fastai's optimizer decays frozen weights that hold a (zero) gradient
    safe_plot(plot_lr_find, learn.recorder.lrs, learn.recorder.losses, lr, learn.path / "lr_find_phase1.png")
    return lr


def fit_stage(learn: Learner, state: ResumeState, phase: int, stage: str, epochs: int, lr, **one_cycle) -> None:
    """One ``fit_one_cycle`` stage, skipped or resumed as the resume state says."""
    if epochs == 0 or state.stage_done(phase, stage):
        return
    learn.freeze() if stage == "frozen" else learn.unfreeze()
    skip = state.restore(learn, phase, stage)
    progress = state.progress
    progress.phase, progress.stage, progress.stage_complete = phase, stage, False
    learn.epoch_log.stage = stage  # fastai names a Learner's callbacks after their class
    if skip < epochs:
        done = f" ({skip} done before)" if skip else ""
        print(f"phase {phase}: {stage} stage, {epochs} epoch{'s' * (epochs != 1)}{done}", flush=True)
    callbacks = [SaveProgress(state.path, progress), SkipFinishedEpochs(skip, state.smooth_loss)]
    learn.fit_one_cycle(epochs, lr, cbs=callbacks, **one_cycle)


def make_learner(cfg, model, frame, phase_cfg, phase: int, device) -> Learner:
    """A fastai Learner for one phase: its data, loss, weight decay and callbacks; our epoch log
    instead of fastai's table (fastai's progress bars stay on a terminal)."""
    findings = model_findings(cfg)
    rows = phase_frame(frame, phase_cfg.filter_normal, findings)
    n_train = int((~rows["is_valid"]).sum())
    if n_train < phase_cfg.batch_size:
        raise UserError(f"phase {phase} has {n_train} training images, fewer than phase{phase}.batch_size "
                        f"({phase_cfg.batch_size}); lower the batch size or use more data")
    batch_size = distributed.per_rank_batch_size(phase_cfg.batch_size, f"phase{phase}.batch_size")
    dls = build_dataloaders(rows, cfg.data, batch_size, device, distributed.unwrap(model).input_stats, findings)
    monitor = MemoryMomentum(phase_cfg.memory_momentum)
    metrics = [MeanAUC(findings)]
    if getattr(model, "bank", None) is not None:
        metrics += [MemoryValue(monitor, "fill"), MemoryValue(monitor, "moved")]
    validated = bool(rows["is_valid"].any())  # data.valid_pct 0: no valid loss to choose or stop by
    log = EpochLog(cfg.run_dir / f"history_phase{phase}.csv", phase)
    callbacks = [monitor, StopOnNonFiniteLoss(), log,
                 SaveCheckpoint(checkpoint_path(cfg, phase), monitor="valid_loss", every_epoch=not validated)]
    if validated and phase_cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStop(phase_cfg.early_stopping_patience, monitor="valid_loss"))
    if phase_cfg.mixup > 0:
        callbacks.append(MixUp(phase_cfg.mixup))  # blends targets too: our losses take float targets
    callbacks += tracking_callbacks(cfg, phase)  # TensorBoard / MLflow when the config asks
    learn = Learner(dls, model.to(device), loss_func=build_loss(phase_cfg.loss), wd=phase_cfg.weight_decay,
                    metrics=metrics, splitter=splitter, path=cfg.run_dir, model_dir="models", cbs=callbacks)
    learn.logger = noop  # the epoch table is the log's
    speed.apply_to_learner(learn, cfg.model, device)  # mixed precision and channels_last on CUDA
    if not sys.stdout.isatty():
        learn.remove_cb(ProgressCallback)
    return learn


def checkpoint_path(cfg, phase: int):
    return cfg.run_dir / "models" / f"{cfg.checkpoint_stem}_phase{phase}.pth"


def resume_path(cfg):
    return cfg.run_dir / "models" / f"{cfg.checkpoint_stem}_resume.pth"


def load_checkpoint(model, path) -> None:
    """Load a weights-only state dict into ``model``; a mismatch is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"model file {path} not found; pass --model_path to an existing .pth or train first")
    try:
        state = io.torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise UserError(f"checkpoint {path} {io.unreadable_reason(path, exc)}; retrain it, or pass "
                        f"--model_path to a complete .pth of this run") from None
    if isinstance(state, dict) and set(state) == {"model", "opt"}:
        state = state["model"]
    own = model.state_dict()
    for key, value in zip(INPUT_STATS_KEYS, IMAGENET_STATS):  # written before checkpoints recorded them:
        if key in own and key not in state:                   # those runs were trained on ImageNet's
            state = {**state, key: torch.tensor(value, dtype=own[key].dtype)}
    unexpected = sorted(set(state) - set(own))
    absent = sorted(set(own) - set(state))
    wrong_shape = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or absent or wrong_shape:
        example = (wrong_shape or absent or unexpected)[0]
        raise UserError(f"checkpoint {path} does not match this model ({len(wrong_shape)} tensors of another "
                        f"shape, {len(absent)} missing, {len(unexpected)} unexpected, e.g. {example}); use the "
                        f"config it was trained with (model.backbone, model.num_classes, memory.*)")
    model.load_state_dict(state)
