"""Image files -> pixels: the one place a file on disk becomes the uint8 pixels the pipeline uses.

Every reader goes through :func:`open_image`, which decodes PNG, JPEG and DICOM of
every kind ChestX-ray14 users meet and returns 8-bit ``L`` for grayscale sources and
8-bit ``RGB`` for all others:

- 16-bit grayscale (``I;16*``, ``I``) is scaled by its bit depth,
  ``v8 = round(v16 * 255 / 65535)`` (exact integer arithmetic: ``v16 / 257`` is never
  a tie), never clipped at 255;
- alpha is dropped, not composited; palette and 1-bit images are expanded;
- DICOM (``.dcm``, or any file of another suffix with the ``DICM`` marker; pydicom,
  the ``dicom`` extra): stored values ``s`` -> modality LUT (rescale slope and
  intercept, or a Modality LUT Sequence) -> VOI LUT Sequence, else window centre and
  width, when the file has one -> ``v8 = round(255 * (v - lo) / (hi - lo))``, clipped
  to [0, 255]; MONOCHROME1 then inverted (``255 - v8``). ``[lo, hi]`` is the range of
  the bit depth, never the image's own minimum and maximum, as for 16-bit PNGs: the
  stored range ``[0, 2**BitsStored - 1]`` (signed: ``[-2**(B-1), 2**(B-1) - 1]``)
  through the rescale, the Modality LUT's or the VOI LUT's output range, which is
  also the range pydicom's windowing maps onto. So a 16-bit DICOM reads exactly as
  the same values in a 16-bit PNG, an 8-bit one as the 8-bit PNG, and brightness is
  never stretched image by image. Compressed transfer syntaxes need pydicom's
  optional decoders; a missing one is a :class:`~cxrmem.utils.errors.UserError` naming
  the packages to install.

On top of it: :func:`read_shrunk` (shorter side to ``size``, aspect kept: the cache),
:func:`read_squished` (``size`` x ``size``: the training reader) and
:func:`find_damaged_images` (a structural check of files, without decoding).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.errors import UserError, describe_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
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


def open_pillow(path, draft: tuple[int, int] | None = None) -> Image.Image:
    """PNG and JPEG (anything Pillow decodes) -> 8-bit ``L`` or ``RGB``."""
    with Image.open(path) as image:
        if draft is not None and image.format == "JPEG":
            image.draft("L" if image.mode == "L" else "RGB", draft)
        image.load()
        return to_8bit(image)


def pillow_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# --------------------------------------------------------------------------- DICOM

DICOM_MARKER = (128, b"DICM")  # offset and bytes of the marker after a Part 10 file's preamble
PIXEL_DATA_TAG = (0x7FE0, 0x0010)
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
SEQUENCE_DELIMITER = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}
DICOM_PACKAGES = {"gdcm": "python-gdcm", "numpy": None}  # pydicom's dependency names -> pip names (None: present)


def import_pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the LUT functions and decoders used below
    except ImportError:
        raise UserError("reading DICOM files needs pydicom; pip install 'cxrmem[dicom]'") from None
    return pydicom


def has_dicom_marker(path) -> bool:
    offset, marker = DICOM_MARKER
    with open(path, "rb") as fh:
        return fh.read(offset + len(marker))[offset:] == marker


def install_hint(missing_dependencies) -> str:
    """pydicom's ``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"`` lines -> pip arguments,
    the pylibjpeg option first: ``pylibjpeg pylibjpeg-libjpeg (or python-gdcm, or pyjpegls)``."""
    options = []
    for line in missing_dependencies:
        requirements = line.split("requires", 1)[-1].split(" and ")
        names = [re.split(r"[<>=!~\s]", r.strip(), maxsplit=1)[0] for r in requirements]
        names = [DICOM_PACKAGES.get(n, n) for n in names if n and DICOM_PACKAGES.get(n, n)]
        if names:
            options.append(" ".join(names))
    options.sort(key=lambda option: not option.startswith("pylibjpeg"))
    if not options:
        return "a pydicom pixel data plugin"
    return options[0] + (f" (or {', or '.join(options[1:])})" if len(options) > 1 else "")


def require_decoder(dataset, path) -> None:
    """A UserError naming what to install when the file's compressed pixel data has no decoder here."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ValueError(f"transfer syntax {syntax} is not supported by pydicom") from None
    if not decoder.is_available:
        raise UserError(f"{path}: no decoder for its {syntax.name} pixel data is installed; pip install "
                        f"{install_hint(decoder.missing_dependencies)}")


def dicom_range(dataset) -> tuple[float, float]:
    """The output range of the modality transform: what windowing maps onto and unwindowed values span."""
    modality_lut = dataset.get("ModalityLUTSequence")
    if modality_lut:
        return 0.0, 2.0 ** int(modality_lut[0].LUTDescriptor[2]) - 1
    bits = int(dataset.BitsStored)
    lo, hi = (0, 2**bits - 1) if int(dataset.PixelRepresentation) == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return float(lo), float(hi)


def dicom_grey(dataset, stored: np.ndarray) -> np.ndarray:
    """Stored grey values -> 8-bit, by the rule of the module docstring."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(stored, dataset)
    voi_lut = dataset.get("VOILUTSequence")
    if voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]:
        values, (lo, hi) = apply_voi(values, dataset), (0.0, 2.0 ** int(voi_lut[0].LUTDescriptor[2]) - 1)
    else:
        values, (lo, hi) = apply_windowing(values, dataset), dicom_range(dataset)  # unchanged without a window
    grey = np.rint(np.clip((np.asarray(values, np.float64) - lo) * 255.0 / (hi - lo), 0, 255)).astype(np.uint8)
    return 255 - grey if dataset.PhotometricInterpretation == "MONOCHROME1" else grey


def open_dicom(path, draft: tuple[int, int] | None = None) -> Image.Image:
    """A DICOM file's first frame -> 8-bit ``L`` (grey) or ``RGB`` (colour, scaled by its bit depth)."""
    pydicom = import_pydicom()
    try:
        dataset = pydicom.dcmread(path)
        require_decoder(dataset, path)
        stored = dataset.pixel_array
        if int(dataset.get("NumberOfFrames") or 1) > 1:
            stored = stored[0]
        if int(dataset.SamplesPerPixel) == 1:
            return Image.fromarray(dicom_grey(dataset, stored))
        top = 2.0 ** int(dataset.BitsStored) - 1  # pydicom has already converted YBR to RGB
        return Image.fromarray(np.rint(stored * (255.0 / top)).astype(np.uint8))
    except (pydicom.errors.InvalidDicomError, AttributeError, KeyError, TypeError, IndexError, RuntimeError,
            NotImplementedError) as exc:
        raise ValueError(f"not a readable DICOM image ({describe_error(exc)})"
                         ) from None


def dicom_size(path) -> tuple[int, int]:
    pydicom = import_pydicom()
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return int(dataset.Columns), int(dataset.Rows)
    except (pydicom.errors.InvalidDicomError, AttributeError, TypeError) as exc:
        raise ValueError(f"not a readable DICOM image ({exc})") from None


def dicom_damage(path: Path, size: int) -> str | None:
    """Structural check of a DICOM file: the DICM marker, a readable header, pixel data all there.

    The header is parsed up to the pixel data element; the element's length (or, for
    compressed data, the sequence delimiter at the end) is checked against the file size.
    """
    pydicom = import_pydicom()
    with path.open("rb") as fh:
        offset, marker = DICOM_MARKER
        if fh.read(offset + len(marker))[offset:] != marker:
            return "not a valid image header"
        fh.seek(0)
        try:
            dataset = pydicom.dcmread(fh, stop_before_pixels=True)
            syntax = dataset.file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a damaged header
            return "unreadable DICOM header"
        if syntax.is_deflated:  # the whole data set is compressed: nothing to measure without inflating
            return None
        start = fh.tell()
        head = fh.read(12)
        fh.seek(max(start, size - 16))
        tail = fh.read()
    endian = "<" if syntax.is_little_endian else ">"
    if len(head) < 8 or struct.unpack(endian + "HH", head[:4]) != PIXEL_DATA_TAG:
        return "no pixel data"
    if syntax.is_implicit_VR:
        header, length = 8, struct.unpack(endian + "I", head[4:8])[0]
    elif head[4:6] in LONG_LENGTH_VRS:
        header, length = 12, struct.unpack(endian + "I", head[8:12])[0] if len(head) == 12 else None
    else:
        header, length = 8, struct.unpack(endian + "H", head[6:8])[0]
    if length == 0xFFFFFFFF:
        return None if SEQUENCE_DELIMITER[syntax.is_little_endian] in tail else "truncated (no end marker)"
    if length is None or start + header + length > size:
        return "truncated (pixel data incomplete)"
    frame = _frame_bytes(dataset)
    if frame is not None and length < frame:
        return f"pixel data shorter than its dimensions need ({length:,} of {frame:,} bytes for one frame)"
    return None


def _frame_bytes(dataset) -> int | None:
    """Bytes one uncompressed frame needs: Rows x Columns x SamplesPerPixel x BitsAllocated / 8."""
    try:
        values = [int(dataset.Rows), int(dataset.Columns), int(dataset.get("SamplesPerPixel", 1)),
                  int(dataset.BitsAllocated)]
    except (AttributeError, TypeError, ValueError):
        return None  # the decoder will say what is missing
    rows, columns, samples, bits = values
    return rows * columns * samples * bits // 8


# --------------------------------------------------------------------------- any file


class Reader:
    """How one kind of file is decoded (``open``), measured from its header (``size``) and checked
    for damage without decoding (``damage(path, n_bytes) -> reason or None``)."""

    def __init__(self, open, size, damage):
        self.open, self.size, self.damage = open, size, damage


def signature_damage(path: Path, size: int) -> str | None:
    """PNG and JPEG: the format's first bytes, its end marker near the end of the file, and
    dimensions Pillow agrees to decode (a decompression bomb is refused by the header alone)."""
    head_sig, tail_sig = _SIGNATURES.get(path.suffix.lower(), (b"", b""))
    with path.open("rb") as fh:
        head = fh.read(len(head_sig))
        fh.seek(max(0, size - len(tail_sig) - 16))
        tail = fh.read()
    if not head.startswith(head_sig):
        return "not a valid image header"
    if tail_sig not in tail:
        return "truncated (no end marker)"
    try:
        pillow_size(path)  # the header only; Pillow refuses a decompression bomb already here
    except Image.DecompressionBombError:
        return f"too large to decode (over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} px)"
    except OSError:
        return "unreadable image header"
    return None


PILLOW = Reader(open_pillow, pillow_size, signature_damage)
DICOM = Reader(open_dicom, dicom_size, dicom_damage)
READERS = {".png": PILLOW, ".jpg": PILLOW, ".jpeg": PILLOW, ".dcm": DICOM}


def reader_for(path) -> Reader:
    """By suffix; a file of any other suffix is DICOM when it carries the marker, else left to Pillow."""
    reader = READERS.get(Path(path).suffix.lower())
    if reader is not None:
        return reader
    try:
        return DICOM if has_dicom_marker(path) else PILLOW
    except OSError:
        return PILLOW  # let the decoder report the missing or unreadable file


def open_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` into an 8-bit ``L`` or ``RGB`` image, detached from the file.

    ``draft`` (width, height) lets a JPEG decode at the smallest reduced scale that is
    still at least that large. Raises one of :data:`READ_ERRORS` for unreadable files,
    a UserError when a DICOM file needs a package that is not installed.
    """
    return reader_for(path).open(path, draft)


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
    return reader_for(path).size(path)


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


class UndecodableImage(UserError):
    """A file whose structure looked whole but whose decoding failed; ``original`` is the decoder's error."""

    def __init__(self, message: str, original: BaseException | None = None):  # one argument: as a loader
        # worker's error is raised again in the main process
        super().__init__(message)
        self.original = original


def find_damaged_images(paths, decode: bool = False) -> list[tuple[str, str]]:
    """Check every file: (path, reason) for each bad one.

    The structural check decodes nothing: empty files, a wrong header, a missing end marker
    (a truncated download), dimensions Pillow refuses (a decompression bomb) and, for DICOM,
    pixel data shorter than its header or its dimensions say. It runs before every training.
    With ``decode`` each file is also decoded in full, which finds damage inside the compressed
    data (what only decoding sees) at the cost of reading every byte: ``--check-data`` does it.
    """
    damaged = []
    for path in map(Path, paths):
        try:
            size = path.stat().st_size
            reason = "empty file" if size == 0 else reader_for(path).damage(path, size)
            if reason is None and decode:
                open_image(path)
        except OSError as exc:
            reason = f"unreadable ({exc.strerror})" if exc.strerror else f"cannot be decoded ({describe_error(exc)})"
        except READ_ERRORS as exc:
            reason = f"cannot be decoded ({describe_error(exc)})"
        if reason:
            damaged.append((str(path), reason))
    return damaged

