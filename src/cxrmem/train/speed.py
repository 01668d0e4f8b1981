"""Speed settings on CUDA, from the config: cuDNN's kernel choice, mixed precision and channels_last,
the same for training and for evaluation. On the CPU only the seeds matter.

* ``train.deterministic: false`` (the default): ``cudnn.benchmark`` on, so cuDNN times its algorithms
  for each new input shape and keeps the fastest; two runs of one config then differ in the last bits.
  ``true``: cuDNN's deterministic algorithms and no autotuning, so a run and its resumed copy are
  identical to the bit on a GPU too (fastai's ``set_seed(..., reproducible=True)``).
* ``model.precision``: ``auto`` is bf16 where the GPU supports it, else fp16; evaluation runs under
  the same ``torch.autocast`` as training (fastai's MixedPrecision covers training only).
* ``model.channels_last``: ``auto`` is on with CUDA; the weights are stored NHWC and fastai's
  ChannelsLast callback converts each training batch.
"""

from __future__ import annotations

import contextlib

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.torch_core import set_seed

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def seed_run(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed`` and set cuDNN as ``train.deterministic`` says."""
    set_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def autocast_dtype(model_cfg, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype ``model.precision`` gives on ``device``; None for fp32 (always on the CPU)."""
    if device.type != "cuda":
        return None
    precision = model_cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return PRECISIONS[precision]


def uses_channels_last(model_cfg, device: torch.device) -> bool:
    return device.type == "cuda" and model_cfg.channels_last in ("auto", "true")


def apply_to_learner(learn, model_cfg, device: torch.device) -> None:
    """Mixed precision and channels_last for training on ``device``; the bank's buffers stay fp32."""
    dtype = autocast_dtype(model_cfg, device)
    if dtype == torch.float16:
        learn.to_fp16()
    elif dtype == torch.bfloat16:
        learn.to_bf16()
    if uses_channels_last(model_cfg, device):
        learn.model.to(memory_format=torch.channels_last)
        learn.add_cb(ChannelsLast())


def prepare_for_inference(model, model_cfg, device: torch.device):
    """``model`` on ``device`` in eval mode, stored NHWC where training used channels_last; returns it."""
    model = model.to(device).eval()
    if uses_channels_last(model_cfg, device):
        model.to(memory_format=torch.channels_last)  # cuDNN then runs NHWC kernels on NCHW inputs too
    return model


def inference_autocast(model_cfg, device: torch.device):
    """A context running the forward pass in training's precision (a no-op for fp32 and on the CPU)."""
    dtype = autocast_dtype(model_cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
