"""Atomic file writes: every file a run writes appears whole or not at all.

Contract of :func:`atomic_path`: the caller writes to a temporary path in the
target's own folder; on success it is flushed to disk and renamed over the
target (``os.replace`` is atomic on POSIX), on failure it is removed and the
previous file, if any, is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager

try:  # advisory locks (POSIX); where fcntl is missing a lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
from pathlib import Path

import torch

from .errors import UserError


def _plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


PLAIN_FILE_MODE = _plain_file_mode()


@contextmanager
def atomic_path(target, durable: bool = True):
    """Yield a temporary path beside ``target``; rename it over ``target`` if the block succeeds.

    ``durable`` also flushes the file to disk before the rename (checkpoints, metrics); bulk
    writers of files that are cheap to redo (generated or cached images) skip it for speed.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, PLAIN_FILE_MODE)  # mkstemp makes 0o600; the file ends up as a plain write would make it
        os.close(fd)
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # first: the space it took is what the message reports as free
        if out_of_space(exc):
            raise UserError(f"no space left on the device holding {target.parent} (writing {target.name}; "
                            f"{free_mb(target.parent)} MB free); free some space, then run the same command again "
                            f"(with --resume when it was training: finished epochs are kept)") from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def out_of_space(exc: BaseException) -> bool:
    """A write that failed for want of space (or quota). torch.save's zip writer reports it as a
    RuntimeError ("... file write failed") without the errno; that message counts too."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "write failed" in str(exc)


def free_mb(folder) -> int:
    try:
        return shutil.disk_usage(folder).free // 2**20
    except OSError:
        return 0


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files a killed process left behind under ``folder`` (their targets are intact)."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()] if Path(folder).is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target, obj) -> None:
    """Indented, strict JSON: NaN or infinity is an error (use null), and the old file stays."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    write_text(target, text)


def torch_save(obj, target) -> None:
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def torch_load(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def unreadable_reason(path, exc: BaseException) -> str:
    """Why :func:`torch_load` failed on ``path``, in words a user can act on.

    ``torch.save`` writes a zip archive whose directory sits at its end, so a file that starts as
    one but does not open as one was cut short (a full disk, a copy or download that stopped);
    weights_only loading refuses pickled objects other than tensors and plain containers.
    """
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "is empty (0 bytes)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"is damaged or truncated ({size:,} bytes; its end is missing)"
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):  # torch names the refused global
        return "holds Python objects beyond tensors, which are not loaded (they could run code)"
    return f"is not a PyTorch checkpoint ({size:,} bytes)"


@contextmanager
def folder_lock(folder, name: str, busy=None):
    """Hold an exclusive advisory lock on ``folder/name`` (created with the folder if need be).

    When another process holds it, ``busy()`` is called first: it may raise (the caller gives up)
    or return (the caller then waits for the lock). Without ``busy`` the caller waits. The lock goes
    with the process, however it ends; the empty lock file stays (deleting it would race a waiter).
    """
    if fcntl is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                busy()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

