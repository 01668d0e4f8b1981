"""fastai DataLoaders from the metadata frame: the only place the data layer meets fastai.

Image files become pixels in :mod:`cxrmem.data.images` (every PNG/JPEG kind: 8-bit L,
16-bit I;16, RGB, RGBA, 8-bit out); here :func:`read_xray` turns them into the uint8 tensors
of the training pipeline and :func:`open_xray` into fastai PILImages.

Grey images travel as one channel: from the loader workers, through pinned memory, to the
GPU, where the batch transforms augment them and :class:`ThreeChannels` replicates them for
the ImageNet-style backbones, just before normalisation (a third of the bytes and of the
augmentation work). Augmentation and normalisation run as batch transforms (on the GPU when
there is one).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fastai.vision.all import (
    ColReader, ColSplitter, DataBlock, DisplayedTransform, IntToFloatTensor, MultiCategoryBlock, Normalize, PILImage,
    TensorImage, Transform, TransformBlock, aug_transforms,
)

from .findings import FINDINGS
from .images import READ_ERRORS, UndecodableImage, open_image, read_squished
from ..utils.errors import describe_error


def open_xray(path) -> PILImage:
    """Read one image file as a fastai PILImage (8-bit RGB; grayscale replicated to 3 channels)."""
    return PILImage(open_image(path).convert("RGB"))  # convert copies: PILImage() re-classes its argument


def read_xray(path, size: int) -> TensorImage:
    """Read one image file squished to ``size`` x ``size``: a C x size x size uint8 TensorImage, C = 1 for a
    grey image (also one stored as RGB or RGBA with three equal channels), else 3.

    The pixels of :func:`cxrmem.data.images.read_squished` (like fastai's ``Resize(size,
    method=Squish)`` with bilinear filtering, in one step; an image already ``size`` x ``size``
    keeps its exact values), as a contiguous tensor (cheap to collate). :class:`ThreeChannels`
    replicates a grey batch on the device; :func:`collatable` a grey image in a batch with colour ones.
    """
    try:
        pixels = torch.from_numpy(read_squished(path, size))
    except READ_ERRORS as exc:  # damage inside the compressed data, which the structural check cannot see
        raise UndecodableImage(f"{path} cannot be decoded ({describe_error(exc)}); "
                               f"replace or remove it (--check-data decodes every image and lists the damaged ones), "
                               f"then add --resume to the same command", exc) from None
    if pixels.ndim == 3:
        pixels = pixels.permute(2, 0, 1)
        if torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2]):
            pixels = pixels[:1]
    else:
        pixels = pixels.unsqueeze(0)
    return TensorImage(pixels.contiguous())


def collatable(samples: list) -> list:
    """fastai ``before_batch``: a batch that mixes grey (1-channel) and colour images gets its grey ones
    replicated to three channels, so that the batch stacks; a batch of one kind is left as it is."""
    if len({sample[0].shape[0] for sample in samples}) == 1:
        return samples
    return [(x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x, *rest) for x, *rest in samples]


class ThreeChannels(DisplayedTransform):
    """Batch transform: ``[B, 1, H, W]`` -> ``[B, 3, H, W]`` (the grey channel three times); colour batches pass.

    Ordered after augmentation (fastai's affine and lighting transforms treat every channel alike, so
    augmenting one channel and copying it equals augmenting three) and before normalisation.
    """

    order = 90  # fastai: IntToFloatTensor 10, affine and lighting 30-40, Normalize 99

    def encodes(self, x: TensorImage) -> TensorImage:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
    """get_y: a frame row -> its finding labels as one float32 array, in ``findings`` order (NaN: missing).

    Same values as ``ColReader(findings)`` at a small fraction of the cost: the column
    positions are looked up once per frame (rows of one frame have equal column indexes,
    a cheap identity check) and read from the row's values in one step, instead of one
    pandas look-up per finding and image.
    """

    def __init__(self, findings=FINDINGS):
        self.findings = list(findings)
        self._columns, self._positions = None, None

    def __call__(self, row) -> np.ndarray:
        if self._columns is None or not row.index.equals(self._columns):
            self._columns, self._positions = row.index, row.index.get_indexer(self.findings)
            if (self._positions < 0).any():
                raise KeyError(f"frame lacks finding column(s): {np.asarray(self.findings)[self._positions < 0]}")
        return row.to_numpy()[self._positions].astype(np.float32)


def ResizedXrayBlock(size: int):
    """The training image block: files read and resized to ``size`` in one step by :class:`ReadXray`."""
    return TransformBlock(type_tfms=ReadXray(size), batch_tfms=IntToFloatTensor)


def default_num_workers(on_cuda: bool) -> int:
    """``num_workers: auto``. On CUDA: this process's share of the cores, less one for the process itself
    (the share is the usable cores divided by torchrun's processes on the node, ``LOCAL_WORLD_SIZE``), at
    least one; 15 on a 16-core machine with one GPU. On the CPU none: the training step there uses every
    core and costs several times what loading costs, so a worker only competes with it (and fastai forks
    workers anew each epoch); the demo's phase-2 epochs took 16-21 s with one worker, 11-12 s without."""
    if not on_cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "").strip() or 1)
    return max(1, cores // max(1, processes) - 1)


def batch_transforms(augment: bool, stats):
    """Augmentation (training only), grey to 3 channels, then ``(x - mean) / std`` with ``stats`` = (mean, std)."""
    augmentation = aug_transforms(do_flip=False, max_rotate=5.0, max_zoom=1.1, max_lighting=0.2,
                                  max_warp=0.0, p_affine=0.75, p_lighting=0.75) if augment else []
    return [*augmentation, ThreeChannels(), Normalize.from_stats(*stats)]


def build_dataloaders(frame, data_cfg, batch_size: int, device: torch.device, stats, findings=FINDINGS):
    """Phase frame (with ``is_valid``) -> fastai DataLoaders (train shuffled, valid in frame order),
    images normalised with ``stats`` = (mean, std) per channel (the network's ``input_stats``), targets
    the frame's ``findings`` columns (NaN where missing).

    The shuffling order follows Python's ``random`` state at this call: seed it first.
    """
    on_cuda = device.type == "cuda"
    workers = default_num_workers(on_cuda) if data_cfg.num_workers == "auto" else data_cfg.num_workers
    block = DataBlock(
        blocks=(ResizedXrayBlock(data_cfg.image_size), MultiCategoryBlock(encoded=True, vocab=list(findings))),
        get_x=ColReader("path"),
        get_y=FindingsReader(findings),
        splitter=ColSplitter("is_valid"),
        batch_tfms=batch_transforms(data_cfg.augment, stats),
    )
    block.item_tfms = []  # the blocks' default ToTensor: items are tensors already
    # No persistent_workers: fastai builds a new iterator, so new workers, every epoch and every validation
    # pass anyway, and workers kept alive would hold a stale copy of the loader's shuffling generator.
    return block.dataloaders(frame, bs=batch_size, num_workers=workers, device=device, pin_memory=on_cuda,
                             before_batch=collatable)

