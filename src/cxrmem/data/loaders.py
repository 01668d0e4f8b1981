"""fastai DataLoaders from the metadata frame: the only place the data layer meets fastai.

Image files become pixels in :mod:`cxrmem.data.images` (every PNG/JPEG kind: 8-bit L,
16-bit I;16, RGB, RGBA, 8-bit out); here :func:`read_xray` turns them into the 3-channel
uint8 tensors of the training pipeline and :func:`open_xray` into fastai PILImages.
Augmentation and normalisation run as batch transforms (on the GPU when there is one).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fastai.vision.all import (
    ColReader, ColSplitter, DataBlock, IntToFloatTensor, MultiCategoryBlock, Normalize, PILImage, TensorImage,
    Transform, TransformBlock, aug_transforms, imagenet_stats,
)

from .findings import FINDINGS
from .images import open_image, read_squished


def open_xray(path) -> PILImage:
    """Read one image file as a fastai PILImage (8-bit RGB; grayscale replicated to 3 channels)."""
    return PILImage(open_image(path).convert("RGB"))  # convert copies: PILImage() re-classes its argument


def read_xray(path, size: int) -> TensorImage:
    """Read one image file squished to ``size`` x ``size``: a 3 x size x size uint8 TensorImage.

    The pixels of :func:`cxrmem.data.images.read_squished` (like fastai's ``Resize(size,
    method=Squish)`` with bilinear filtering, in one step; an image already ``size`` x ``size``
    keeps its exact values), grayscale replicated to three channels only at the end, as a
    contiguous tensor (cheap to collate).
    """
    pixels = torch.from_numpy(read_squished(path, size))
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
