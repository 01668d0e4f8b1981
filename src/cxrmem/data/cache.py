"""A pre-resized copy of ChestX-ray14 that is itself a data set folder.

Decoding a 1024 px ChestX-ray14 PNG and shrinking it costs about 8-9 ms of one
core; a 256 px copy decodes in about 0.5 ms (PNG) or 0.2 ms (JPEG). Training
reads the copy, so the data loaders stop being the bottleneck.

``python -m cxrmem.data.cache --data_dir D [--out D2] --size 256 [--workers N]
[--format png|jpg]`` (or ``cxrmem-cache``) writes::

    D2/Data_Entry_2017.csv        the source's metadata and list files, byte for byte
    D2/train_val_list.txt
    D2/test_list.txt
    D2/images_001/images/*.png    every source image, shorter side shrunk to --size
    ...                           (aspect kept, never enlarged), same folders
    D2/cache.json                 source, size, format, counts, complete flag
    D2/cache_errors.txt           only when source images could not be read

Image names: with ``--format png`` every name and folder is the source's, so the
copy is a drop-in ``data_dir``. With ``--format jpg`` a file ``X.png`` becomes
``X.jpg`` in the same folder (a JPEG under a ``.png`` name would fail the
structural checks of :func:`cxrmem.data.images.find_damaged_images`);
reading such a copy needs the loader to match CSV names to files by stem.

Pixels: read by :func:`cxrmem.data.images.read_shrunk`, so 16-bit grayscale is
scaled ``v8 = round(v16 * 255 / 65535)`` (never clipped at 255), alpha is dropped,
grayscale sources are stored as 8-bit grayscale and colour ones as RGB: the
pixels the training reader gets from the source, before its channel replication.

Robustness: every file is written through :func:`cxrmem.utils.io.atomic_path`, so a
file under its final name is always complete; a run that was killed is resumed
by the next one (finished files are kept, leftover temporary files removed,
truncated targets redone). Unreadable, empty or
truncated source files do not stop the run: all of them are listed in
``cache_errors.txt`` and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils import io
from ..utils.commands import RERUN_TO_RESUME, add_shared_options, guarded
from ..utils.errors import UserError, describe_error
from ..utils.processes import process_pool
from .chestxray14 import METADATA_FILES, find_metadata_csv, image_folders
from .images import IMAGE_SUFFIXES, READ_ERRORS, find_damaged_images, read_shrunk
from .split import TEST_LIST, TRAIN_VAL_LIST

MARKER_NAME = "cache.json"
ERRORS_NAME = "cache_errors.txt"
LOCK_NAME = ".cache.lock"
CACHE_VERSION = 1
FORMATS = {  # --format: (file suffix, PIL save options); PNG level 6 decodes as fast as 1 and is ~15% smaller
    "png": (".png", {"format": "PNG", "compress_level": 6}),
    "jpg": (".jpg", {"format": "JPEG", "quality": 90}),
}
MIN_SIZE = 16


# --------------------------------------------------------------------------- files


def cached_name(name: str, fmt: str) -> str:
    """File name of the cached copy of source file ``name``: same stem, the format's suffix."""
    return Path(name).stem + FORMATS[fmt][0]


def write_image_atomic(image: Image.Image, target: Path, fmt: str) -> None:
    """Save ``image`` as ``target`` in format ``fmt``, atomically."""
    with io.atomic_path(target, durable=False) as tmp:
        image.save(tmp, **FORMATS[fmt][1])


def copy_file_atomic(source: Path, target: Path) -> None:
    with io.atomic_path(target, durable=False) as tmp:
        shutil.copyfile(source, tmp)


def source_images(data_dir: Path) -> list[Path]:
    """Image files under the data set's image folders, as paths relative to ``data_dir``, sorted."""
    found = []
    for folder in image_folders(data_dir):
        for entry in os.scandir(folder):
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                found.append(Path(entry.path).relative_to(data_dir))
    return sorted(found)


def metadata_files(data_dir: Path) -> list[Path]:
    """The CSV file(s) and list files present in ``data_dir``."""
    names = (*METADATA_FILES, TRAIN_VAL_LIST, TEST_LIST)
    return [data_dir / n for n in names if (data_dir / n).is_file()]


# --------------------------------------------------------------------------- one image (runs in a worker)


@dataclass(frozen=True)
class Job:
    source: str
    target: str
    size: int
    fmt: str


def is_finished(source: Path, target: Path) -> bool:
    """True when ``target`` exists, is not older than ``source`` and is structurally complete."""
    try:
        if target.stat().st_mtime < source.stat().st_mtime:
            return False
    except OSError:
        return False
    return not find_damaged_images([target])


def cache_one(job: Job) -> tuple[str, str, str]:
    """Cache one image. Returns (outcome, source, reason): outcome is written, skipped or failed."""
    source, target = Path(job.source), Path(job.target)
    if is_finished(source, target):
        return "skipped", job.source, ""
    damaged = find_damaged_images([source])
    if damaged:
        return "failed", job.source, damaged[0][1]
    try:
        write_image_atomic(read_shrunk(source, job.size), target, job.fmt)
    except READ_ERRORS as exc:
        return "failed", job.source, f"{type(exc).__name__}: {describe_error(exc)}"
    return "written", job.source, ""


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress report on stderr, rewritten in place on terminals.

    Off terminals (logs) it prints a line at most every ``log_every`` seconds.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, log_every: float = 30.0):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.interval = 0.25 if self.tty else log_every

    def update(self, done: int, failed: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (f"{self.label}: {done}/{self.total} images ({100 * done / max(self.total, 1):.0f}%), "
                f"{rate:.0f}/s, {elapsed:.0f} s" + (f", {failed} unreadable" if failed else ""))
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self, done: int, failed: int) -> None:
        self.update(done, failed, force=True)
        if self.tty:
            print(file=sys.stderr, flush=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_jobs(jobs: list[Job], workers: int):
    """Run ``cache_one`` over the jobs, in-process or over a process pool; yields results."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        yield from map(cache_one, jobs)
        return
    chunk = max(1, min(64, len(jobs) // (workers * 16)))
    with process_pool(workers, __name__) as pool:  # forked from a server: safe from a threaded process
        yield from pool.imap_unordered(cache_one, jobs, chunksize=chunk)


# --------------------------------------------------------------------------- the marker


def default_cache_dir(data_dir: Path, size: int) -> Path:
    """``<data_dir>_<size>px`` beside ``data_dir``."""
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name}_{size}px"


def read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(out: Path, record: dict) -> None:
    io.write_json(out / MARKER_NAME, record)


def cache_parameters(data_dir: Path, size: int, fmt: str) -> dict:
    """What identifies a cache: its source folder, size and format."""
    return {"tool": "cxrmem.data.cache", "version": CACHE_VERSION, "source": str(Path(data_dir).resolve()),
            "size": int(size), "format": fmt}


def metadata_signature(data_dir: Path) -> dict:
    """{file name: [bytes, mtime_ns]} of the source's CSV and list files (to notice edits)."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in metadata_files(data_dir)}


def is_current(out: Path, data_dir: Path, size: int, fmt: str) -> bool:
    """True when ``out`` holds a complete cache of the current ``data_dir`` at ``size``/``fmt``.

    Cheap: the marker, the source's metadata files and its number of images are compared,
    the images themselves are not opened.
    """
    marker = read_marker(out)
    params = cache_parameters(data_dir, size, fmt)
    if not marker or not marker.get("complete") or any(marker.get(k) != v for k, v in params.items()):
        return False
    if marker.get("metadata") != metadata_signature(data_dir):
        return False
    if not all((out / p.name).is_file() for p in metadata_files(data_dir)):
        return False
    return marker.get("source_images") == len(source_images(data_dir))


def exclusive(out: Path):
    """Hold the cache's lock on ``out``; a second builder says so and waits its turn."""
    def busy():
        print(f"waiting for another process building the cache in {out} ...", file=sys.stderr, flush=True)

    return io.folder_lock(out, LOCK_NAME, busy)


# --------------------------------------------------------------------------- building


@dataclass
class CacheResult:
    """What a build did. ``errors`` lists (source path, reason) for every unreadable source."""

    out: Path
    total: int
    written: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """The one-line report of the command line."""
        return (f"cache: {self.total - len(self.errors)} of {self.total} images in {self.out} "
                f"({self.written} written, {self.skipped} already there) in {self.seconds:.1f} s")

    def error_message(self) -> str:
        """One line naming the count, an example and the listing file."""
        path, reason = self.errors[0]
        return (f"{len(self.errors)} of {self.total} source image(s) are empty, truncated or unreadable "
                f"(e.g. {path}: {reason}); all are listed in {self.out / ERRORS_NAME}; replace them and "
                f"run again (the other images are cached)")


def check_arguments(data_dir: Path, out: Path, size, fmt: str, workers) -> None:
    """UserError (one line) for every mistake found before any work starts."""
    if not data_dir.is_dir():
        raise UserError(f"data_dir {data_dir} does not exist; pass --data_dir the ChestX-ray14 folder")
    find_metadata_csv(data_dir)
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"size must be an integer >= {MIN_SIZE} pixels (got {size!r}); pass e.g. --size 256")
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise UserError(f"workers must be an integer >= 1 (got {workers!r}); leave it out to use every core")
    if out.exists() and not out.is_dir():
        raise UserError(f"cache folder {out} is a file; give a directory")
    if out.resolve() == data_dir.resolve():
        raise UserError(f"the cache folder must differ from data_dir ({data_dir}); choose another --out")


def check_out_folder(out: Path, params: dict) -> None:
    """Refuse a folder holding someone else's files, or a cache of another source/size/format."""
    marker = read_marker(out)
    if marker is None:
        if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
            raise UserError(f"{out} is not empty and holds no {MARKER_NAME}; choose an empty or new cache folder")
        return
    differs = [k for k in ("source", "size", "format") if marker.get(k) != params[k]]
    if differs or marker.get("version") != params["version"]:
        what = ", ".join(f"{k} {marker.get(k)}" for k in ("source", "size", "format"))
        raise UserError(f"{out} holds a cache of another kind ({what}); delete it or choose another cache folder")


def build_cache(data_dir, out=None, size: int = 256, fmt: str = "png", workers: int | None = None,
                progress: bool = True) -> CacheResult:
    """Write (or resume, or top up) the cache of ``data_dir`` in ``out`` and return what was done.

    Finished images are kept, missing, older or damaged ones (re)written, leftover
    temporary files removed; the metadata files are copied; ``cache.json`` is written
    first (complete: false) and last (complete: true unless a source failed). Source
    files that fail are listed in ``<out>/cache_errors.txt`` (the build goes on).
    Raises UserError for bad arguments or an ``out`` holding other files.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else default_cache_dir(data_dir, size)
    check_arguments(data_dir, out, size, fmt, workers)
    params = cache_parameters(data_dir, size, fmt)
    check_out_folder(out, params)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out)  # a folder that exists can still be read-only
        probe.close()
    except OSError as exc:
        raise UserError(f"cannot write the cache folder {out} ({exc.strerror or exc}); give a writable one "
                        f"(data.cache.dir, or --out), or set data.cache: null to train from the original images") from None
    with exclusive(out):
        check_out_folder(out, params)
        sources = source_images(data_dir)
        if not sources:
            raise UserError(f"no images under {data_dir}/images_*/images or {data_dir}/images; "
                            f"point --data_dir at the ChestX-ray14 folder")
        write_marker(out, {**params, "complete": False})
        io.remove_stale_temporaries(out)
        with contextlib.suppress(FileNotFoundError):
            (out / ERRORS_NAME).unlink()
        result = CacheResult(out, total=len(sources))
        cache_images(data_dir, out, sources, size, fmt, workers or usable_cores(), result, progress)
        for path in metadata_files(data_dir):
            copy_file_atomic(path, out / path.name)
        if result.errors:
            result.errors.sort()
            (out / ERRORS_NAME).write_text("".join(f"{p}\t{r}\n" for p, r in result.errors), encoding="utf-8")
        write_marker(out, {**params, "complete": result.complete, "count": result.total - len(result.errors),
                           "source_images": len(sources), "errors": len(result.errors),
                           "metadata": metadata_signature(data_dir)})
    result.seconds = time.perf_counter() - started
    return result


def cache_images(data_dir: Path, out: Path, sources: list[Path], size: int, fmt: str, workers: int,
                 result: CacheResult, show_progress: bool) -> None:
    """Convert every source image in parallel, counting outcomes into ``result``."""
    for folder in sorted({rel.parent for rel in sources}):
        (out / folder).mkdir(parents=True, exist_ok=True)
    jobs = [Job(str(data_dir / rel), str(out / rel.parent / cached_name(rel.name, fmt)), size, fmt)
            for rel in sources]
    bar = Progress(len(jobs), f"caching {data_dir.name} at {size} px {fmt}", enabled=show_progress)
    done = 0
    for outcome, source, reason in run_jobs(jobs, workers):
        done += 1
        if outcome == "written":
            result.written += 1
        elif outcome == "skipped":
            result.skipped += 1
        else:
            result.errors.append((source, reason))
        bar.update(done, len(result.errors))
    bar.close(done, len(result.errors))


def ensure_cache(data_dir, cache_cfg, missing_images: str = "error") -> Path:
    """The cache folder for ``cache_cfg`` (``.size``, ``.dir``, ``.format``), built or completed if needed.

    ``cache_cfg.dir`` None means ``<data_dir>_<size>px`` beside ``data_dir``. A complete,
    current cache is returned at once (no image opened). Otherwise the build runs
    (resuming any earlier one); if source images fail it raises UserError, unless
    ``missing_images == "drop"``, where it warns and the failed images are simply
    absent from the cache.
    """
    data_dir = Path(data_dir)
    size, fmt = int(cache_cfg.size), getattr(cache_cfg, "format", "png") or "png"
    out = Path(cache_cfg.dir) if getattr(cache_cfg, "dir", None) else default_cache_dir(data_dir, size)
    if data_dir.is_dir() and is_current(out, data_dir, size, fmt):
        return out
    print(f"building the {size} px {fmt} cache of {data_dir} in {out} (resumable; reused by later runs)",
          file=sys.stderr, flush=True)
    result = build_cache(data_dir, out, size=size, fmt=fmt)
    print(result.summary(), file=sys.stderr, flush=True)
    if result.errors:
        if missing_images != "drop":
            raise UserError(result.error_message())
        warnings.warn(f"{len(result.errors)} unreadable source images are not in the cache; see "
                      f"{out / ERRORS_NAME}", stacklevel=2)
    return out


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem-cache",
        description="Write a pre-resized copy of a ChestX-ray14 folder that trains like the original, faster.")
    parser.add_argument("--data_dir", required=True, help="the ChestX-ray14 folder (CSV, lists, images_*/images)")
    parser.add_argument("--out", default=None, help="cache folder (default: <data_dir>_<size>px)")
    parser.add_argument("--size", type=int, default=256, help="shorter image side in pixels (default 256)")
    add_shared_options(parser, "workers", "debug")
    parser.add_argument("--format", choices=tuple(FORMATS), default="png",
                        help="png keeps every file name; jpg is smaller and faster to decode (default png)")
    return parser


@guarded(interrupted=RERUN_TO_RESUME)
def main(argv) -> int:
    """Build or resume the cache; exit status 0 when complete, 2 (``error: ...``) on a mistake or unreadable sources."""
    args = build_parser().parse_args(argv)
    result = build_cache(args.data_dir, args.out, size=args.size, fmt=args.format, workers=args.workers)
    print(result.summary())
    if result.errors:
        raise UserError(result.error_message())
    return 0


if __name__ == "__main__":
    sys.exit(main())
