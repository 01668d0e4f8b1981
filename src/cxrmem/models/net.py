"""The classifier: backbone body, optional memory augmentation, MLP head.

::

    z      = pool(body(x))                       # [B, D], global average pooling
    z'     = z + bank.retrieve(z)                # only with a memory bank
    logits = head(z')    head = BN1d(D) -> Linear(D, 512) -> ReLU -> Dropout -> Linear(512, C)

In training mode the bank is then updated with the detached batch ``z`` (so a
sample never retrieves itself from the same step); in eval mode it is only read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MemoryConfig, ModelConfig
from .backbones import IMAGENET_STATS, Backbone, build_backbone, input_stats, pool_features
from .memory import MemoryBank

__all__ = ["CXRNet", "HEAD_HIDDEN", "INPUT_STATS_KEYS", "build_model", "splitter"]

HEAD_HIDDEN = 512
INPUT_STATS_KEYS = ("input_mean", "input_std")  # the buffers recording the input normalisation


def _head(num_features: int, num_classes: int, dropout_rate: float) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(num_features),
        nn.Linear(num_features, HEAD_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout_rate),
        nn.Linear(HEAD_HIDDEN, num_classes),
    )


class CXRNet(nn.Module):
    """Multi-label classifier ``images [B, 3, H, W] -> logits [B, num_classes]``.

    Attributes: ``body`` (the backbone's feature extractor), ``head``, ``bank``
    (a :class:`MemoryBank` or None). Buffers ``input_mean`` and ``input_std`` [3] record the
    normalisation its inputs get, ``x = (pixels / 255 - mean) / std`` (the backbone's, see
    :func:`~cxrmem.models.backbones.input_stats`): they travel in every checkpoint, and the loaders,
    Grad-CAM, predict and export read them there. The network itself does not apply them.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 14,
        dropout_rate: float = 0.2,
        bank: MemoryBank | None = None,
        stats: tuple = IMAGENET_STATS,
    ):
        super().__init__()
        if bank is not None and bank.dim != backbone.num_features:
            raise ValueError(f"memory bank dim {bank.dim} != backbone features {backbone.num_features}")
        self.backbone_name = backbone.name
        self.num_features = backbone.num_features
        self.body = backbone.body
        self.head = _head(backbone.num_features, num_classes, dropout_rate)
        self.bank = bank
        mean, std = stats
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32))

    @property
    def input_stats(self) -> tuple[list[float], list[float]]:
        """(mean, std) per channel, as plain lists."""
        return self.input_mean.tolist(), self.input_std.tolist()

    def features(self, images: Tensor) -> Tensor:
        """``z = pool(body(x))``, ``[B, D]``."""
        return pool_features(self.body, self.body(images)).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        # fastai's TensorImage runs every op through __torch_function__: plain, the step is ~12 % faster (demo, CPU)
        z = self.features(images.as_subclass(Tensor))
        if self.bank is None:
            return self.head(z)
        augmented = z + self.bank.retrieve(z).to(z.dtype)
        logits = self.head(augmented)
        if self.training:
            probs = logits.detach().float().sigmoid() if self.bank.needs_probs else None
            self.bank.update(z.detach(), probs=probs)
        return logits


def splitter(model: CXRNet) -> list[list[nn.Parameter]]:
    """fastai parameter groups: ``[body parameters, head parameters]`` (the bank has none)."""
    return [list(model.body.parameters()), list(model.head.parameters())]


def build_model(model_cfg: ModelConfig, memory_cfg: MemoryConfig | None = None, num_classes: int | None = None) -> CXRNet:
    """A :class:`CXRNet` from the ``model`` and ``memory`` config sections (no bank without
    ``memory_cfg`` or with ``use_memory: false``), with ``num_classes`` outputs (the number of findings
    it predicts; default ``model.num_classes``, else 14)."""
    backbone = build_backbone(model_cfg.backbone, pretrained=model_cfg.pretrained, weights=model_cfg.weights)
    use_memory = memory_cfg is not None and memory_cfg.use_memory
    bank = MemoryBank(backbone.num_features, memory_cfg) if use_memory else None
    outputs = num_classes or model_cfg.num_classes or 14
    return CXRNet(backbone, num_classes=outputs, dropout_rate=model_cfg.dropout_rate, bank=bank,
                  stats=input_stats(model_cfg.backbone))
