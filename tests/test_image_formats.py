"""Every PNG kind ChestX-ray14 users meet (8-bit L, 16-bit I;16, RGB, RGBA) loads as 3-channel uint8.

16-bit values are scaled by the bit depth, round(v * 255 / 65535), never clipped at 255;
alpha is dropped (not composited). Checked for open_xray, for the one-step training reader
read_xray, for the DataLoaders of build_dataloaders and for the cache's reader.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.vision.all import ToTensor, imagenet_stats
from PIL import Image

from cxrmem.data.findings import FINDINGS
from cxrmem.data.images import read_shrunk, target_size
from cxrmem.data.loaders import build_dataloaders, open_xray, read_xray
from cxrmem.models.backbones import IMAGENET_STATS

SIDE = 16


def gradient(top: int, dtype) -> np.ndarray:
    """SIDE x SIDE values rising evenly from 0 to ``top``."""
    return np.rint(np.linspace(0, top, SIDE * SIDE)).astype(dtype).reshape(SIDE, SIDE)


def scaled16(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def kinds():
    """name -> (pixels written, PIL mode expected on reading, expected H x W x 3 uint8)."""
    rng = np.random.default_rng(0)
    gray8 = gradient(255, np.uint8)
    full16, twelve_bit = gradient(65535, np.uint16), gradient(4095, np.uint16)
    rgb = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    rgba = np.concatenate([rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8),
                           rng.integers(0, 256, (SIDE, SIDE, 1), dtype=np.uint8)], axis=2)
    gray3 = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
    return {
        "l8": (gray8, "L", gray3(gray8)),
        "i16_full": (full16, "I;16", gray3(scaled16(full16))),
        "i16_12bit": (twelve_bit, "I;16", gray3(scaled16(twelve_bit))),
        "rgb": (rgb, "RGB", rgb),
        "rgba": (rgba, "RGBA", rgba[..., :3]),
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """name -> (path, expected H x W x 3 uint8) for one PNG of each kind."""
    folder = tmp_path_factory.mktemp("kinds")
    files = {}
    for name, (pixels, mode, expected) in kinds().items():
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        with Image.open(path) as check:
            assert check.mode in ({mode, "I"} if mode == "I;16" else {mode}), (name, check.mode)
        files[name] = (path, expected)
    return files


def test_the_expected_values_really_exceed_8_bits():
    specs = kinds()
    assert specs["i16_full"][0].max() == 65535 and specs["i16_full"][2].max() == 255
    assert specs["i16_12bit"][0].max() == 4095 and specs["i16_12bit"][2].max() == round(4095 * 255 / 65535)
    assert len(np.unique(specs["i16_full"][2])) > 200  # scaled, not clipped at 255
    assert not np.array_equal(specs["rgba"][0][..., :3], specs["rgba"][0])


@pytest.mark.parametrize("name", list(kinds()))
def test_open_xray_gives_three_exact_uint8_channels(image_files, name):
    path, expected = image_files[name]
    tensor = ToTensor()(open_xray(path))
    assert tensor.shape == (3, SIDE, SIDE) and tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("name", list(kinds()))
def test_read_xray_matches_open_xray_and_resizes(image_files, name):
    """Grey files give one channel (replicated on the device), colour files three; the values are open_xray's."""
    path, expected = image_files[name]
    channels = 3 if name in ("rgb", "rgba") else 1
    same = read_xray(path, SIDE)
    assert same.shape == (channels, SIDE, SIDE) and same.dtype == torch.uint8 and same.is_contiguous()
    np.testing.assert_array_equal(same.expand(3, -1, -1).permute(1, 2, 0).numpy(), expected)
    small = read_xray(path, SIDE // 2)
    assert small.shape == (channels, SIDE // 2, SIDE // 2) and small.dtype == torch.uint8


def test_a_grey_image_stored_as_rgb_or_rgba_travels_as_one_channel(tmp_path):
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    for mode in ("RGB", "RGBA"):
        path = tmp_path / f"grey_{mode}.png"
        Image.fromarray(grey).convert(mode).save(path)
        pixels = read_xray(path, 64)
        assert pixels.shape == (1, 64, 64)
        np.testing.assert_array_equal(pixels[0].numpy(), grey)


def test_grey_batches_cross_as_one_channel_and_reach_the_network_as_three(image_files):
    names = [n for n in image_files if n not in ("rgb", "rgba")]
    rows = [dict(image_index=f"{n}.png", patient_id=str(i), path=str(image_files[n][0]), is_valid=valid)
            for valid in (False, True) for i, n in enumerate(names)]
    frame = pd.DataFrame(rows)
    for finding in FINDINGS:
        frame[finding] = 0
    cfg = SimpleNamespace(image_size=SIDE, augment=True, num_workers=0)
    dls = build_dataloaders(frame, cfg, batch_size=len(names), device=torch.device("cpu"), stats=IMAGENET_STATS)
    for dl in (dls.train, dls.valid):
        collated = dl.create_batch(dl.before_batch([dl.dataset[i] for i in range(len(names))]))
        assert collated[0].shape == (len(names), 1, SIDE, SIDE) and collated[0].dtype == torch.uint8
        images = dl.after_batch(collated)[0]  # on the device: augmentation, three channels, normalisation
        assert images.shape == (len(names), 3, SIDE, SIDE)
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in imagenet_stats)
        pixels = images.float() * std + mean
        assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)


@pytest.mark.parametrize("name", list(kinds()))
def test_the_cache_reader_keeps_grayscale_gray_and_scales_16_bit(image_files, name):
    path, expected = image_files[name]
    image = read_shrunk(path, SIDE)
    assert image.mode == ("RGB" if name in ("rgb", "rgba") else "L")
    stored = np.asarray(image)
    np.testing.assert_array_equal(stored if stored.ndim == 3 else np.repeat(stored[..., None], 3, 2), expected)
    assert read_shrunk(path, SIDE // 2).size == (SIDE // 2, SIDE // 2)


def test_a_grayscale_jpeg_is_read_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(path, quality=95)
    assert read_xray(path, 32).shape == (1, 32, 32)
    assert read_shrunk(path, 32).size == (32, 32)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_the_cache_reader_keeps_the_aspect_of_the_source(tmp_path, suffix):
    path = tmp_path / f"tall{suffix}"
    Image.fromarray(np.tile(np.arange(1001, dtype=np.uint16) % 256, (2000, 1)).astype(np.uint8)).save(path)
    expected = target_size(1001, 2000, 250)
    assert expected == (250, 500)  # 2000 * 250 / 1001 = 499.5005
    assert read_shrunk(path, 250).size == expected  # a JPEG too, though decoded at a quarter of its size


def test_the_dataloaders_deliver_every_kind(image_files):
    names = list(image_files)
    rows = [dict(image_index=f"{n}.png", patient_id=str(i), path=str(image_files[n][0]), is_valid=valid)
            for valid in (False, True) for i, n in enumerate(names)]
    frame = pd.DataFrame(rows)
    for j, finding in enumerate(FINDINGS):
        frame[finding] = [(i + j) % 2 for i in range(len(frame))]
    cfg = SimpleNamespace(image_size=SIDE, augment=False, num_workers=0)
    dls = build_dataloaders(frame, cfg, batch_size=len(names), device=torch.device("cpu"), stats=IMAGENET_STATS)
    images, labels = dls.valid.one_batch()  # valid keeps the frame order
    assert images.shape == (len(names), 3, SIDE, SIDE) and labels.shape == (len(names), len(FINDINGS))
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in imagenet_stats)
    pixels = (images.float().cpu() * std + mean) * 255  # undo IntToFloatTensor and Normalize
    assert torch.allclose(pixels, pixels.round(), atol=1e-2)
    for k, name in enumerate(names):
        np.testing.assert_array_equal(pixels[k].round().to(torch.uint8).permute(1, 2, 0).numpy(),
                                      image_files[name][1], err_msg=name)
    np.testing.assert_array_equal(labels.cpu().numpy(), frame.loc[frame["is_valid"], FINDINGS].to_numpy())
    train_images, _ = dls.train.one_batch()
    assert train_images.shape == (len(names), 3, SIDE, SIDE)


def png_bytes(width: int, height: int, rows: bytes) -> bytes:
    """A PNG file written by hand: IHDR (8-bit grey), one IDAT of ``rows`` (zlib), IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_found_by_its_header(tmp_path):
    from cxrmem.data.images import find_damaged_images

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(30000, 30000, b"\x00" * 30001))  # 900 Mpx promised, a few bytes stored
    found = dict(find_damaged_images([bomb]))
    assert found[str(bomb)].startswith("too large to decode (over Pillow's limit of")


def test_damage_inside_the_compressed_data_is_found_by_decoding_and_named_by_the_loader(tmp_path):
    from cxrmem.data.images import find_damaged_images
    from cxrmem.utils.errors import UserError

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 200] = np.random.default_rng(1).integers(0, 255, 200, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    assert find_damaged_images([good, bad]) == []  # header and end marker are whole
    found = dict(find_damaged_images([good, bad], decode=True))
    assert list(found) == [str(bad)] and found[str(bad)].startswith("cannot be decoded (")
    with pytest.raises(UserError) as caught:
        read_xray(bad, 32)
    message = str(caught.value)
    assert message.startswith(f"{bad} cannot be decoded (") and "--check-data" in message and "--resume" in message
    assert "\n" not in message
