"""Image files -> pixels: the one place a file on disk becomes the uint8 pixels the pipeline uses.

Every reader goes through :func:`open_image`, which decodes PNG and JPEG of every
kind ChestX-ray14 users meet and returns 8-bit ``L`` for grayscale sources and 8-bit
``RGB`` for all others:

- 16-bit grayscale (``I;16*``, ``I``) is scaled by its bit depth,
  ``v8 = round(v16 * 255 / 65535)`` (exact integer arithmetic: ``v16 / 257`` is never
  a tie), never clipped at 255;
- alpha is dropped, not composited; palette and 1-bit images are expanded.

On top of it: :func:`read_shrunk` (shorter side to ``size``, aspect kept: the cache),
:func:`read_squished` (``size`` x ``size``: the training reader) and
:func:`find_damaged_images` (a structural check of files, without decoding).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
GRAY_MODES = {"L", "LA", "La", "1"}
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # what decoding raises

_SIGNATURES = {  # suffix: (first bytes, last bytes of a complete file)
    ".png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
    ".jpg": (b"\xff\xd8", b"\xff\xd9"),
    ".jpeg": (b"\xff\xd8", b"\xff\xd9"),
}


# --------------------------------------------------------------------------- decoding


def to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``L`` (grayscale sources) or ``RGB`` (all others), by the rules above."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if image.mode == "L" or image.mode == "RGB":
        return image
    return image.convert("L" if image.mode in GRAY_MODES else "RGB")


def open_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` into an 8-bit ``L`` or ``RGB`` image, detached from the file.

    ``draft`` (width, height) lets a JPEG decode at the smallest reduced scale that is
    still at least that large. Raises one of :data:`READ_ERRORS` for unreadable files.
    """
    with Image.open(path) as image:
        if draft is not None and image.format == "JPEG":
            image.draft("L" if image.mode == "L" else "RGB", draft)
        image.load()
        return to_8bit(image)


# --------------------------------------------------------------------------- resizing


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the aspect kept; never larger than the source."""
    short = min(width, height)
    if short <= size:
        return width, height
    scale = size / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``image`` at ``size`` (width, height): an integer box ``reduce`` down to 2-4x the target, then ``resample``.

    An image already at ``size`` is returned as it is (its exact values kept).
    """
    if image.size == size:
        return image
    factor = min(image.size) // (2 * min(size))
    if factor >= 2:
        image = image.reduce(factor)
    return image.resize(size, resample)


def stored_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image in ``path``, from its header (nothing decoded)."""
    with Image.open(path) as image:
        return image.size


def read_shrunk(path: str | os.PathLike, size: int) -> Image.Image:
    """The 8-bit image of ``path`` with its shorter side shrunk to ``size`` (Lanczos, aspect kept, never enlarged)."""
    target = target_size(*stored_size(path), size)
    return resize(open_image(path, draft=target), target, Image.Resampling.LANCZOS)


def read_squished(path: str | os.PathLike, size: int) -> np.ndarray:
    """The 8-bit pixels of ``path`` squished to ``size`` x ``size`` (bilinear): uint8 [size, size] or [size, size, 3].

    Grayscale stays one channel (the caller replicates it), so the resize touches a third
    of the values.
    """
    return np.array(resize(open_image(path, draft=(size, size)), (size, size), Image.Resampling.BILINEAR))


# --------------------------------------------------------------------------- checking


def find_damaged_images(paths) -> list[tuple[str, str]]:
    """Cheap structural check of every file (no decoding): (path, reason) for each bad one.

    Empty files, a wrong header, or a missing end marker (truncated download) are caught
    before training starts, so no epoch crashes on them.
    """
    damaged = []
    for path in map(Path, paths):
        head_sig, tail_sig = _SIGNATURES.get(path.suffix.lower(), (b"", b""))
        try:
            size = path.stat().st_size
            if size == 0:
                damaged.append((str(path), "empty file"))
                continue
            with path.open("rb") as fh:
                head = fh.read(len(head_sig))
                fh.seek(max(0, size - len(tail_sig) - 16))
                tail = fh.read()
        except OSError as exc:
            damaged.append((str(path), f"unreadable ({exc.strerror})"))
            continue
        if not head.startswith(head_sig):
            damaged.append((str(path), "not a valid image header"))
        elif tail_sig not in tail:
            damaged.append((str(path), "truncated (no end marker)"))
    return damaged
