"""fastai DataLoaders from the metadata frame: the only place the data layer meets fastai.

Images are read by :func:`open_xray`, which turns every PNG/JPEG kind ChestX-ray14
users meet (8-bit L, 16-bit I;16, RGB, RGBA) into a 3-channel 8-bit image for
ImageNet-style backbones; the training pipeline uses :func:`read_xray`, the same
pixels read and resized in one step. Augmentation and normalisation run as batch transforms
(on the GPU when there is one).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fastai.vision.all import (
    ColReader, ColSplitter, DataBlock, IntToFloatTensor, MultiCategoryBlock, Normalize, PILImage, TensorImage,
    Transform, TransformBlock, aug_transforms, imagenet_stats,
)
from PIL import Image

from .cache import to_8bit
from .chestxray14 import FINDINGS

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any grayscale/colour PIL image -> 8-bit RGB.

    16-bit grayscale is scaled by its bit depth, v8 = round(v16 * 255 / 65535),
    never clipped at 255; alpha is dropped; 8-bit grayscale is replicated to 3 channels.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def open_xray(path) -> PILImage:
    """Read one image file as a fastai PILImage (8-bit RGB)."""
    with Image.open(path) as image:
        image.load()
        pixels = to_rgb8(image)
        if pixels is image:  # already RGB: PILImage() would re-class the open file object in place
            pixels = image.copy()
    return PILImage(pixels)


def XrayBlock():
    """An ImageBlock whose reader understands 16-bit and RGBA PNGs."""
    return TransformBlock(type_tfms=open_xray, batch_tfms=IntToFloatTensor)


def read_xray(path, size: int) -> TensorImage:
    """Read one image file squished to ``size`` x ``size``: a 3 x size x size uint8 TensorImage.

    The pixels of ``to_rgb8`` (16-bit scaled by its bit depth, alpha dropped) resized like
    fastai's ``Resize(size, method=Squish)`` with bilinear filtering, in one step: a JPEG is
    decoded at a reduced scale (``draft``), a large image is first box-reduced by an integer
    factor, grayscale stays one channel through the resize and is replicated to three only at
    the end, and the result is a contiguous tensor (cheap to collate). An image already
    ``size`` x ``size`` keeps its exact values.
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("L" if image.mode == "L" else "RGB", (size, size))
        image.load()
        image = to_8bit(image)
    if image.size != (size, size):
        factor = min(image.size) // (2 * size)
        if factor >= 2:
            image = image.reduce(factor)
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image))
    pixels = pixels.unsqueeze(0).expand(3, -1, -1) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return TensorImage(pixels.contiguous())


class ReadXray(Transform):
    """Type transform path -> :func:`read_xray` tensor; replaces open_xray + Resize + ToTensor.

    Skipping the PILImage round trip and fastai's per-item crop/pad machinery roughly halves
    the per-image cost on a pre-resized cache (see docs/performance.md, "Data loading").
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def encodes(self, path) -> TensorImage:
        return read_xray(path, self.size)


class FindingsReader:
    """get_y: a frame row -> its 14 finding labels as one float32 array, in FINDINGS order.

    Same values as ``ColReader(FINDINGS)`` at a small fraction of the cost: the column
    positions are looked up once per frame (rows of one frame have equal column indexes,
    a cheap identity check) and read from the row's values in one step, instead of 14
    pandas look-ups per image.
    """

    def __init__(self):
        self._columns, self._positions = None, None

    def __call__(self, row) -> np.ndarray:
        if self._columns is None or not row.index.equals(self._columns):
            self._columns, self._positions = row.index, row.index.get_indexer(FINDINGS)
            if (self._positions < 0).any():
                raise KeyError(f"frame lacks finding column(s): {np.asarray(FINDINGS)[self._positions < 0]}")
        return row.to_numpy()[self._positions].astype(np.float32)


def ResizedXrayBlock(size: int):
    """The training image block: files read and resized to ``size`` in one step by :class:`ReadXray`."""
    return TransformBlock(type_tfms=ReadXray(size), batch_tfms=IntToFloatTensor)


def default_num_workers(on_cuda: bool) -> int:
    """auto: up to 8 workers on CUDA; on CPU leave a core to the training step."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if on_cuda else max(0, min(4, cores - 1))


def batch_transforms(augment: bool):
    augmentation = aug_transforms(do_flip=False, max_rotate=5.0, max_zoom=1.1, max_lighting=0.2,
                                  max_warp=0.0, p_affine=0.75, p_lighting=0.75) if augment else []
    return [*augmentation, Normalize.from_stats(*imagenet_stats)]


def build_dataloaders(frame, data_cfg, batch_size: int, device: torch.device):
    """Phase frame (with ``is_valid``) -> fastai DataLoaders (train shuffled, valid in frame order).

    The shuffling order follows Python's ``random`` state at this call: seed it first.
    """
    on_cuda = device.type == "cuda"
    workers = default_num_workers(on_cuda) if data_cfg.num_workers == "auto" else data_cfg.num_workers
    block = DataBlock(
        blocks=(ResizedXrayBlock(data_cfg.image_size), MultiCategoryBlock(encoded=True, vocab=FINDINGS)),
        get_x=ColReader("path"),
        get_y=FindingsReader(),
        splitter=ColSplitter("is_valid"),
        batch_tfms=batch_transforms(data_cfg.augment),
    )
    block.item_tfms = []  # the blocks' default ToTensor: items are tensors already
    return block.dataloaders(frame, bs=batch_size, num_workers=workers, device=device,
                             pin_memory=on_cuda, persistent_workers=workers > 0)


def labelled_dataloader(dls, frame):
    """A DataLoader over any frame (e.g. the test split) with the training item pipeline, no shuffle."""
    return dls.test_dl(frame, with_labels=True)
