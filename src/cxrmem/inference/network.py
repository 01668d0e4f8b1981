"""A trained network as inference sees it: images in, logits out, and the preprocessing it expects."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from fastai.vision.all import Pipeline

from ..data.loaders import ResizedXrayBlock, batch_transforms
from ..train import speed


def eval_transforms(image_size: int, stats) -> Pipeline:
    """The validation DataLoader's batch transforms: the image block's (uint8 -> float / 255), then
    ``batch_transforms(augment=False, stats)`` (``stats`` = (mean, std): the network's ``input_stats``).

    ``Normalize.from_stats`` keeps its statistics on fastai's ``default_device()``, the device batches go to.
    """
    return Pipeline([*ResizedXrayBlock(image_size).batch_tfms, *batch_transforms(False, stats)])


class TorchNetwork:
    """A PyTorch model: normalised images on ``device`` -> logits as float32 numpy. With a run's ``model``
    config section, in the precision and memory format its training and evaluation used (on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, model_cfg=None):
        self.model_cfg, self.device = model_cfg, device
        self.model = speed.prepare_for_inference(model, model_cfg, device) if model_cfg else model.to(device).eval()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        precision = speed.inference_autocast(self.model_cfg, self.device) if self.model_cfg else nullcontext()
        with torch.no_grad(), precision:
            return self.model(images).float().cpu().numpy()
