"""Training on several processes (GPUs, nodes) under ``torchrun``, with PyTorch's DistributedDataParallel.

``torchrun --nproc_per_node N train.py --config X.yaml`` starts N copies of the
usual command; torchrun gives each one ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. This module turns those copies into one
run (see docs/distributed.md):

* :func:`session` joins the process group (nccl and ``cuda:LOCAL_RANK`` when
  CUDA is available, gloo and the CPU otherwise; one GPU per process, checked
  before joining) and silences the standard output of every rank but 0, so the
  configuration, the epoch lines and the report are printed once;
* :func:`make_distributed` makes a Learner train on every rank at once: each
  DataLoader gives each rank its own shard of every epoch (fastai's
  ``DistributedDL``) and every fit trains the model inside torch's
  ``DistributedDataParallel`` (:class:`DistributedFit`);
* :func:`per_rank_batch_size`: the configured batch is the global batch, split
  over the processes;
* :func:`on_main` / :func:`load_on_main` / :func:`share_main_state`: work done
  by rank 0 alone (data preparation, checkpoints, the LR finder) and its result,
  or its error, sent to the other ranks, so only rank 0 writes the run folder and
  no rank reads a file before it is written;
* :func:`shard_rows` / :func:`gather_predictions`: evaluation splits a split
  over the ranks and gathers every image's prediction on rank 0, exactly once.

With a single process (no torchrun, or ``WORLD_SIZE=1``) every function here is
a no-op that returns its input, so the single-process behaviour is unchanged.
The one private name of another library relied on is listed in
:data:`RELIED_ON` and checked by :func:`check_private_apis` when distributed
training starts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL
from fastai.torch_core import set_seed
from timm.layers import convert_sync_batchnorm

from ..utils.errors import UserError

__all__ = [
    "rank", "world_size", "local_rank", "is_main_process", "is_distributed", "session", "join", "device", "barrier",
    "unwrap", "seed_per_rank", "per_rank_batch_size", "on_main", "share_main_state", "load_on_main",
    "make_distributed", "DistributedFit", "check_private_apis", "RELIED_ON", "shard_rows", "gather_predictions",
]


# --------------------------------------------------------------------------- who am I


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def is_distributed() -> bool:
    """True inside a joined process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes: the process group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``): its GPU index."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """Rank 0: the process that prints and writes the run folder."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if is_distributed():
        dist.barrier()


def unwrap(model):
    """The module inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model


# --------------------------------------------------------------------------- joining and leaving


PREPARATION_TIMEOUT = timedelta(hours=6)
"""How long the other ranks wait for what rank 0 does alone (:func:`on_main`). A first run's cache build
and damaged-image scan of 112,120 files on slow storage can take longer than the 10 minutes after which
NCCL's default group gives up; torchrun still ends every rank at once if rank 0 dies."""

_preparation_group = None  # gloo group with PREPARATION_TIMEOUT, for on_main's broadcasts; set by join()


def device() -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` under torchrun with CUDA (one GPU per
    process, see :func:`check_gpus_per_process`), ``cuda`` for one process with CUDA, else the CPU.
    CUDA_VISIBLE_DEVICES decides which GPUs count, as everywhere in PyTorch."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world_size() <= 1:
        return torch.device("cuda")
    check_gpus_per_process()
    return torch.device("cuda", local_rank())


def check_gpus_per_process() -> None:
    """A one-line UserError when torchrun started more processes on this node than GPUs are visible
    (CUDA's own error would be "invalid device ordinal", or NCCL's refusal of two ranks on one GPU).
    Every rank of the node sees the same count, so all of them stop with the same line."""
    count = torch.cuda.device_count()
    per_node = max(_env_int("LOCAL_WORLD_SIZE", 1), local_rank() + 1)
    if per_node > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UserError(f"torchrun started {per_node} processes on this node but {count} GPU(s) are visible"
                        f"{shown}; each process needs a GPU of its own: use --nproc_per_node {count} or fewer")


def join(timeout: timedelta | None = None) -> bool:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; return whether this call joined it.

    nccl on CUDA, gloo otherwise; ``timeout`` is the default group's (None: PyTorch's default). The
    broadcasts of :func:`on_main` use a gloo group of their own that waits :data:`PREPARATION_TIMEOUT`.
    """
    global _preparation_group
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    options = {} if timeout is None else {"timeout": timeout}
    if torch.cuda.is_available():
        check_gpus_per_process()
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", **options)
    else:
        dist.init_process_group("gloo", **options)
    _preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return True


@contextlib.contextmanager
def session():
    """The process group for the duration of a command (no-op without torchrun).

    Inside it, ranks other than 0 write their standard output to /dev/null
    (warnings and errors, on stderr, are kept). There is no barrier at the end:
    the other ranks may leave while rank 0 still writes the report.
    """
    global _preparation_group
    joined = join()
    try:
        if is_main_process():
            yield
        else:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                yield
    finally:
        if joined:
            gc.collect()  # drop unreachable DDP wrappers, which hold the group, while Python is fully alive
            dist.destroy_process_group()
            _preparation_group = None


# --------------------------------------------------------------------------- batches and seeds


def seed_per_rank(seed: int) -> None:
    """Under torchrun, reseed every random generator with ``seed + rank``, so that augmentation and
    dropout differ between ranks (call it after the model is built: the weights stay the same on every
    rank). No-op with one process."""
    if is_distributed():
        set_seed(seed + rank())  # cuDNN's settings stay as the run set them (train.deterministic)


def per_rank_batch_size(batch_size: int, key: str = "batch_size") -> int:
    """The batch of one process: the configured (global) batch divided by the number of processes.

    Raises UserError when that leaves less than one image per process. Unchanged with one process.
    """
    world = world_size()
    if batch_size // world < 1:
        raise UserError(f"{key} is {batch_size}, fewer than the {world} processes; the configured batch is "
                        f"split over the processes, so set {key} to at least {world}")
    return batch_size // world


# --------------------------------------------------------------------------- rank 0 does, everyone knows


def on_main(work):
    """Run ``work()`` on rank 0 alone and return its result on every rank.

    While ``work`` runs, fastai is told that this is the only process
    (``WORLD_SIZE=1``: fastai reads the number of processes from it, and would
    otherwise gather losses from, and wait at barriers for, ranks that are not
    taking part). The other ranks wait up to :data:`PREPARATION_TIMEOUT`. The result must be picklable. If ``work`` raises a UserError
    on rank 0, every rank raises the same UserError; any other exception is
    re-raised on rank 0 and reported as a RuntimeError on the others. With one
    process it simply returns ``work()``.
    """
    if not is_distributed():
        return work()
    outcome = [None]
    if is_main_process():
        try:
            with _fastai_sees_one_process():
                outcome[0] = ("ok", work())
        except UserError as exc:
            outcome[0] = ("user_error", (str(exc), exc.exit_code))
            dist.broadcast_object_list(outcome, src=0, group=_preparation_group)
            raise
        except Exception as exc:  # noqa: BLE001 - the other ranks must learn that rank 0 failed
            outcome[0] = ("failure", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(outcome, src=0, group=_preparation_group)
            raise
    dist.broadcast_object_list(outcome, src=0, group=_preparation_group)
    kind, value = outcome[0]
    if kind == "user_error" and not is_main_process():
        error = UserError(value[0])
        error.exit_code = value[1]
        raise error
    if kind == "failure" and not is_main_process():
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def _fastai_sees_one_process():
    world = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"  # fastai.torch_core.num_distrib() reads it
    try:
        yield
    finally:
        if world is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = world


def _communication_device() -> torch.device:
    """Where the backend's tensors must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def share_main_state(module) -> None:
    """Copy rank 0's parameters and buffers into the same module on every other rank, in place
    (wherever the module lives). No-op with one process."""
    if not is_distributed():
        return
    where = _communication_device()
    for tensor in unwrap(module).state_dict().values():
        if tensor.device == where and tensor.is_contiguous():
            dist.broadcast(tensor, src=0)
        else:
            buffer = tensor.to(where).contiguous()
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def load_on_main(module, load) -> None:
    """``load()`` (which fills ``module`` from a file) on rank 0, then give every rank that state.

    Only rank 0 opens the file, so the other ranks never read a checkpoint
    before it is complete, and other nodes need no shared disk.
    """
    on_main(load)
    share_main_state(module)


# --------------------------------------------------------------------------- training on every rank


def make_distributed(learn):
    """Under torchrun, make ``learn`` train on every rank at once. Returns ``learn``; no-op with one process.

    * every DataLoader becomes a ``DistributedDL``: each rank gets its own shard
      of every epoch (one shuffle, made on rank 0), padded to equal length;
      fastai gathers (and un-pads) predictions and losses for the metrics, so
      every rank sees the same epoch values;
    * every fit trains ``DistributedDataParallel(model)`` (:class:`DistributedFit`):
      gradients are averaged over the ranks in the backward pass, and rank 0's
      buffers are copied to the others before every forward pass;
    * batch norm becomes SyncBatchNorm on CUDA (statistics over the global
      batch; timm's conversion, which keeps timm's fused norm+activation layers
      whole, where torch's would drop the activation), and stays per-rank on gloo
      (SyncBatchNorm needs a GPU), where the buffer copy keeps the running
      statistics identical;
    * the memory bank needs nothing: it all-gathers its updates, so every rank
      applies the same ones (DDP's copy of its buffers changes nothing);
    * ranks other than 0 show no progress bars.

    Call it after the LR finder, which rank 0 runs alone on the plain Learner.
    """
    if not is_distributed():
        return learn
    check_private_apis()
    if dist.get_backend() == "nccl":
        learn.model = synchronised_batch_norm(learn.model)
    learn.dls.loaders = [dl if isinstance(dl, DistributedDL) else _ShardedDL(dl) for dl in learn.dls.loaders]
    learn.add_cb(DistributedFit())
    if not is_main_process():
        learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, ProgressCallback)))
    return learn


class DistributedFit(Callback):
    """Each fit trains ``DistributedDataParallel(model)``, then leaves the plain model in ``learn.model``.

    Wrapped per fit (as fastai's own DistributedTrainer does) because DDP
    registers the parameters that require gradients when it is built, and the
    stages of phase 1 freeze and unfreeze the backbone between fits.
    """

    order = 11  # after the model is on its device (TrainEvalCallback, -10) and mixed precision is set up (10)

    def before_fit(self):
        on_cuda = next(self.learn.model.parameters()).is_cuda
        self.learn.model = torch.nn.parallel.DistributedDataParallel(
            self.learn.model, device_ids=[torch.cuda.current_device()] if on_cuda else None)

    def after_fit(self):
        self.learn.model = unwrap(self.learn.model)


class _ShardedDL(DistributedDL):
    """fastai's DistributedDL, whose shuffled indices are broadcast on the backend's device."""

    def _broadcast(self, t, rank):  # private in fastai: its version moves the indices to CUDA, which gloo cannot send
        indices = torch.tensor(list(t), dtype=torch.long, device=_communication_device())
        dist.broadcast(indices, rank)
        return indices.cpu().tolist()


RELIED_ON = [("fastai", "fastai.distributed", "DistributedDL._broadcast")]
"""(library, module, attribute) for every private name of another library that distributed training uses."""


def check_private_apis() -> None:
    """Raise a one-line UserError naming the first name of :data:`RELIED_ON` the installed libraries lack."""
    for library, module, name in RELIED_ON:
        try:
            functools.reduce(getattr, name.split("."), importlib.import_module(module))
        except AttributeError:
            raise UserError(f"distributed training needs {module}.{name}, which the installed {library} "
                            f"{_installed_version(library)} does not have; install the {library} version "
                            f"pyproject.toml allows (pip install -e .)") from None


def _installed_version(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "(version unknown)"


def synchronised_batch_norm(model):
    """``model`` with every batch norm layer synchronised over the ranks (in place; same parameters
    and buffers, so checkpoints keep their keys). Layers already synchronised are left as they are."""
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return model
    return convert_sync_batchnorm(model)


# --------------------------------------------------------------------------- evaluation


def shard_rows(rows):
    """This rank's share of a frame: rows ``rank, rank + N, rank + 2N, ...`` (all rows with one process)."""
    if not is_distributed():
        return rows
    return rows.iloc[rank()::world_size()]


def gather_predictions(probs: np.ndarray, targets: np.ndarray, names: list, expected: list):
    """Every rank's ``(probs, targets, names)`` joined on rank 0 into the order of ``expected`` (image names).

    Each image of ``expected`` appears exactly once in the result; an image no
    rank predicted is an error. Returns ``(probs, targets, names)`` on rank 0 and
    None on the other ranks; with one process, the input unchanged.
    """
    if not is_distributed():
        return probs, targets, names
    if not len(probs) == len(targets) == len(names):
        raise RuntimeError(f"{len(probs)} predictions and {len(targets)} targets for {len(names)} images")
    parts = [None] * world_size() if is_main_process() else None
    dist.gather_object((np.asarray(probs), np.asarray(targets), list(names)), parts, dst=0)
    if not is_main_process():
        return None
    row_of = {name: row for row, name in enumerate(n for _, _, part_names in parts for n in part_names)}
    missing = [name for name in expected if name not in row_of]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no prediction from any rank (e.g. {missing[0]})")
    rows = [row_of[name] for name in expected]
    all_probs = np.concatenate([p for p, _, _ in parts])
    all_targets = np.concatenate([t for _, t, _ in parts])
    return all_probs[rows], all_targets[rows], list(expected)
