"""DICOM files read as the same 8-bit pixels as the same image saved as PNG.

Each DICOM is written with pydicom (MONOCHROME1 and MONOCHROME2; 8-bit, 12-bit in 16 and
16-bit; with and without a window, a rescale, a VOI LUT); the expected pixels come from an
independent computation (DICOM PS3.3 C.11.2.1.2 for the window) saved as a PNG and read
through the PNG route. Also: compressed transfer syntaxes, missing decoders, damaged files,
and a data set whose images are .dcm files.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless  # noqa: E402

from cxrmem.data.chestxray14 import load_frame  # noqa: E402
from cxrmem.data.images import (  # noqa: E402
    READ_ERRORS, find_damaged_images, install_hint, open_image, read_shrunk, read_squished, stored_size,
)
from cxrmem.data.loaders import read_xray  # noqa: E402
from cxrmem.utils.errors import UserError

from helpers import write_dicom

ROWS, COLS = 24, 40


def picture(top: int, seed: int = 0) -> np.ndarray:
    """ROWS x COLS values covering 0..top: a ramp (every level band) plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, top, ROWS * COLS).reshape(ROWS, COLS)
    return np.clip(np.rint(ramp + rng.normal(0, top / 50, ramp.shape)), 0, top).astype(np.uint16)




def png_route(tmp_path, pixels: np.ndarray, name: str) -> np.ndarray:
    """``pixels`` (uint8 or uint16) saved as a PNG and read back the way training reads PNGs."""
    path = tmp_path / f"{name}.png"
    Image.fromarray(pixels).save(path)
    return np.asarray(open_image(path))


def as_16bit_png(values: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit samples as a 16-bit PNG holds them: shifted to the top, low bits replicated (PNG spec 12.5)."""
    shift = 16 - bits
    return ((values.astype(np.uint32) << shift) | (values.astype(np.uint32) >> (bits - shift))).astype(np.uint16)


def linear_window(values: np.ndarray, center: float, width: float, lo: float, hi: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), written out: output in [lo, hi]."""
    x = values.astype(np.float64)
    c, w = center - 0.5, width - 1
    out = ((x - c) / w + 0.5) * (hi - lo) + lo
    out[x <= c - w / 2] = lo
    out[x > c + w / 2] = hi
    return out


def to8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint((values - lo) / (hi - lo) * 255).astype(np.uint8)


def assert_within_one_level(got: np.ndarray, expected: np.ndarray):
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_8bit_reads_exactly_as_the_png(tmp_path, photometric):
    image = picture(255).astype(np.uint8)
    stored = 255 - image if photometric == "MONOCHROME1" else image  # MONOCHROME1: low values are white
    path = write_dicom(tmp_path / "x.dcm", stored, photometric, bits=8)
    got = open_image(path)
    assert got.mode == "L" and got.size == (COLS, ROWS)
    np.testing.assert_array_equal(np.asarray(got), png_route(tmp_path, image, "x"))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_12bit_in_16_reads_as_the_16bit_png_within_one_level(tmp_path, photometric):
    image = picture(4095)
    stored = 4095 - image if photometric == "MONOCHROME1" else image
    path = write_dicom(tmp_path / "x.dcm", stored, photometric, bits=12)
    assert pydicom.dcmread(path).BitsAllocated == 16
    got = np.asarray(open_image(path))
    expected = png_route(tmp_path, as_16bit_png(image, 12), "x")
    assert_within_one_level(got, expected)
    assert got.max() == 255 and got.min() == 0  # scaled by the 12-bit range, not left dark in a 16-bit one


def test_16bit_reads_exactly_as_the_16bit_png(tmp_path):
    image = picture(65535)
    path = write_dicom(tmp_path / "x.dcm", image, bits=16)
    np.testing.assert_array_equal(np.asarray(open_image(path)), png_route(tmp_path, image, "x"))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_window_is_applied_over_the_stored_range(tmp_path, photometric):
    image = picture(4095, seed=1)
    stored = 4095 - image if photometric == "MONOCHROME1" else image
    center, width = 1500.0, 1000.0
    path = write_dicom(tmp_path / "x.dcm", stored, photometric, bits=12, WindowCenter=center, WindowWidth=width)
    windowed = to8(linear_window(stored, center, width, 0, 4095), 0, 4095)
    expected = 255 - windowed if photometric == "MONOCHROME1" else windowed
    got = np.asarray(open_image(path))
    assert_within_one_level(got, png_route(tmp_path, expected, "x"))
    assert (got == (0 if photometric == "MONOCHROME2" else 255)).mean() > 0.2  # the window really clips


def test_rescale_then_window_in_rescaled_units(tmp_path):
    stored = picture(4095, seed=2)
    slope, intercept, center, width = 1.0, -1024.0, 200.0, 1500.0
    path = write_dicom(tmp_path / "x.dcm", stored, bits=12, RescaleSlope=slope, RescaleIntercept=intercept,
                       WindowCenter=center, WindowWidth=width)
    lo, hi = intercept, 4095 * slope + intercept
    expected = to8(linear_window(stored * slope + intercept, center, width, lo, hi), lo, hi)
    assert_within_one_level(np.asarray(open_image(path)), png_route(tmp_path, expected, "x"))


def test_rescale_without_a_window_keeps_the_bit_depth_range(tmp_path):
    stored = picture(4095, seed=3)
    path = write_dicom(tmp_path / "x.dcm", stored, bits=12, RescaleSlope=1.0, RescaleIntercept=-1024.0)
    assert_within_one_level(np.asarray(open_image(path)), png_route(tmp_path, as_16bit_png(stored, 12), "x"))


def test_a_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    stored = picture(255, seed=4).astype(np.uint8)
    table = np.rint(np.sqrt(np.arange(256) / 255) * 65535).astype(np.uint16)  # a gamma curve, 16-bit entries
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new(0x00283006, "US", table.tolist())  # LUT Data
    path = write_dicom(tmp_path / "x.dcm", stored, bits=8, VOILUTSequence=[item], WindowCenter=10.0,
                       WindowWidth=5.0)
    expected = np.rint(table[stored] * 255.0 / 65535).astype(np.uint8)
    assert_within_one_level(np.asarray(open_image(path)), png_route(tmp_path, expected, "x"))


def test_implicit_vr_and_rle_compressed_files_read_alike(tmp_path):
    image = picture(4095, seed=5)
    plain = np.asarray(open_image(write_dicom(tmp_path / "plain.dcm", image, bits=12)))
    for syntax in (ImplicitVRLittleEndian, RLELossless):
        path = write_dicom(tmp_path / f"{syntax.name[:8]}.dcm", image, bits=12, syntax=syntax)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(np.asarray(open_image(path)), plain)
        assert find_damaged_images([path]) == []


def test_training_readers_and_sizes(tmp_path):
    image = picture(255).astype(np.uint8)
    dcm = write_dicom(tmp_path / "x.dcm", image, bits=8)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    assert stored_size(dcm) == stored_size(png) == (COLS, ROWS)
    np.testing.assert_array_equal(read_squished(dcm, 16), read_squished(png, 16))
    np.testing.assert_array_equal(np.asarray(read_shrunk(dcm, 12)), np.asarray(read_shrunk(png, 12)))
    assert read_xray(dcm, 16).shape == (1, 16, 16)
    assert bool((read_xray(dcm, 16) == read_xray(png, 16)).all())


def test_a_dicom_file_without_the_suffix_is_recognised(tmp_path):
    image = picture(255).astype(np.uint8)
    path = write_dicom(tmp_path / "scan.dcm", image, bits=8).rename(tmp_path / "IM0001")
    np.testing.assert_array_equal(np.asarray(open_image(path)), image)
    assert find_damaged_images([path]) == []


# --------------------------------------------------------------------------- failures


def test_missing_decoder_is_one_line_naming_the_package(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", picture(4095), bits=12)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not decodable here \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(path, enforce_file_format=True)
    if pydicom.pixels.get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(UserError) as caught:
        open_image(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "JPEG-LS" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and "python-gdcm" in message
    assert find_damaged_images([path]) == []  # complete, only not decodable here


def test_install_hint_turns_pydicom_requirements_into_pip_arguments():
    missing = ["gdcm - requires gdcm>=3.0.10", "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0",
               "pyjpegls - requires numpy and pyjpegls>=1.2"]
    assert install_hint(missing) == "pylibjpeg pylibjpeg-openjpeg (or python-gdcm, or pyjpegls)"
    assert install_hint(["gdcm - requires gdcm>=3.0.10"]) == "python-gdcm"


def test_damaged_dicom_files_are_found_and_fail_cleanly(tmp_path):
    whole = write_dicom(tmp_path / "whole.dcm", picture(4095), bits=12)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-100])
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(data[:300])
    not_dicom = tmp_path / "not_dicom.dcm"
    not_dicom.write_bytes(b"\x89PNG" + bytes(400))
    rle = write_dicom(tmp_path / "rle.dcm", picture(4095), bits=12, syntax=RLELossless)
    rle_cut = tmp_path / "rle_cut.dcm"
    rle_cut.write_bytes(rle.read_bytes()[:-30])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    found = dict(find_damaged_images([whole, truncated, header_only, not_dicom, rle_cut, empty]))
    assert found == {str(truncated): "truncated (pixel data incomplete)", str(header_only): "no pixel data",
                     str(not_dicom): "not a valid image header", str(rle_cut): "truncated (no end marker)",
                     str(empty): "empty file"}
    for path in (truncated, header_only, not_dicom, rle_cut, empty):
        with pytest.raises(READ_ERRORS):
            open_image(path)


def test_without_pydicom_one_line_names_the_extra(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", picture(255).astype(np.uint8), bits=8)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(UserError, match=r"pip install 'cxrmem\[dicom\]'"):
        open_image(path)


# --------------------------------------------------------------------------- a data set of DICOM files


def test_a_data_set_of_dicom_files_is_found_and_read_like_its_pngs(data_copy, tmp_path):
    from cxrmem.data.cache import build_cache

    pngs = sorted(data_copy.glob("images_*/images/*.png"))[:40]
    for png in pngs:
        with Image.open(png) as image:
            write_dicom(png.with_suffix(".dcm"), np.asarray(image.convert("L")), bits=8)
    frame, _, _ = load_frame(data_copy, valid_pct=0.2, seed=1)  # the PNGs are still found first
    by_name = dict(zip(frame["image_index"], frame["path"]))
    for png in pngs:
        png.rename(tmp_path / png.name)  # keep the PNG aside; the data set now holds the DICOM
    frame, _, missing = load_frame(data_copy, valid_pct=0.2, seed=1)
    assert not missing
    dicoms = frame[frame["path"].str.endswith(".dcm")]
    assert len(dicoms) == len(pngs)
    assert find_damaged_images(frame["path"]) == []
    for name, path in zip(dicoms["image_index"], dicoms["path"]):
        assert bool((read_xray(path, 32) == read_xray(tmp_path / name, 32)).all()), name
        assert by_name[name].endswith(".png")
    cache = build_cache(data_copy, tmp_path / "cache", size=16, workers=1, progress=False)
    assert cache is not None
    cached = sorted((tmp_path / "cache").glob("images_*/images/*"))
    assert {p.suffix for p in cached} == {".png"} and len(cached) == len(frame)
    for name in dicoms["image_index"][:5]:
        cached_file = next(p for p in cached if p.name == name)
        np.testing.assert_array_equal(np.asarray(Image.open(cached_file)),
                                      np.asarray(read_shrunk(tmp_path / name, 16)))


def test_pixel_data_shorter_than_the_dimensions_need_is_found_without_decoding(tmp_path):
    path = write_dicom(tmp_path / "short.dcm", picture(255).astype(np.uint8))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = ROWS * 4, COLS * 4  # the header now promises 16 times the pixels the file holds
    ds.save_as(path, enforce_file_format=True)
    found = dict(find_damaged_images([path]))
    assert found[str(path)].startswith(f"pixel data shorter than its dimensions need ({ROWS * COLS:,} of "
                                       f"{ROWS * COLS * 16:,} bytes")
