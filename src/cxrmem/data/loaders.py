"""fastai DataLoaders from the metadata frame: the only place the data layer meets fastai.

Images are read by :func:`open_xray`, which turns every PNG/JPEG kind ChestX-ray14
users meet (8-bit L, 16-bit I;16, RGB, RGBA) into a 3-channel 8-bit image for
ImageNet-style backbones. Augmentation and normalisation run as batch transforms
(on the GPU when there is one).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fastai.vision.all import (
    ColReader, ColSplitter, DataBlock, IntToFloatTensor, MultiCategoryBlock, Normalize, PILImage, Resize,
    ResizeMethod, TransformBlock, aug_transforms, imagenet_stats,
)
from PIL import Image

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
        return PILImage(to_rgb8(image))


def XrayBlock():
    """An ImageBlock whose reader understands 16-bit and RGBA PNGs."""
    return TransformBlock(type_tfms=open_xray, batch_tfms=IntToFloatTensor)


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
        blocks=(XrayBlock, MultiCategoryBlock(encoded=True, vocab=FINDINGS)),
        get_x=ColReader("path"),
        get_y=ColReader(FINDINGS),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(data_cfg.image_size, method=ResizeMethod.Squish),
        batch_tfms=batch_transforms(data_cfg.augment),
    )
    return block.dataloaders(frame, bs=batch_size, num_workers=workers, device=device,
                             pin_memory=on_cuda, persistent_workers=workers > 0)


def labelled_dataloader(dls, frame):
    """A DataLoader over any frame (e.g. the test split) with the training item pipeline, no shuffle."""
    return dls.test_dl(frame, with_labels=True)
