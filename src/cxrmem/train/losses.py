"""Multi-label losses for logits ``x`` [B, C] and targets ``y`` [B, C] in [0, 1], NaN where missing.

Every loss here is an ``nn.Module`` that fastai can use as ``loss_func``:

* ``activation(x) = sigmoid(x)`` -- what ``Learner.get_preds`` applies to the
  gathered logits, so predictions come back as probabilities;
* ``decodes(p) = p > thresh`` (thresh 0.5) -- probabilities to 0/1 labels;
* a ``reduction`` attribute ('mean', 'sum' or 'none'); fastai sets it to
  'none' in ``get_preds(with_loss=True)``. 'mean' averages over all B*C
  elements, 'none' returns the [B, C] element losses.

A missing target (NaN: a finding the image's data set does not grade, or an
uncertain label under ``data.uncertain: ignore``) contributes exactly zero loss
and zero gradient, and 'mean' then averages over the known elements only:
``L = sum_{known} l / #known``. A batch with every target known takes
``l.mean()`` as before, to the bit.

Inputs may be fastai ``TensorBase`` subclasses (``TensorMultiCategory`` ...);
they are viewed as plain tensors first, and the arithmetic runs in float32 so
that mixed-precision logits do not overflow. All losses are finite for
logits as large as +-50 (log-probabilities come from ``logsigmoid``, never
from ``log(sigmoid(x))``).

Losses are looked up by name in ``LOSSES``; ``build_loss(name, **kwargs)``
constructs one and reports an unknown name as a ``UserError``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import UserError

__all__ = [
    "MultiLabelLoss",
    "BCELoss",
    "AsymmetricLoss",
    "FocalLoss",
    "LOSSES",
    "build_loss",
]

_REDUCTIONS = ("mean", "sum", "none")


def as_plain_float(t: torch.Tensor) -> torch.Tensor:
    """View a (possibly fastai-subclassed) tensor as a plain float32 tensor."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor).float()


class MultiLabelLoss(nn.Module):
    """Base class: casting, shape check, reduction and the fastai hooks.

    Subclasses implement ``elementwise(logits, targets) -> [B, C]`` on plain
    float32 tensors.
    """

    def __init__(self, reduction: str = "mean", thresh: float = 0.5):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.thresh = thresh

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = as_plain_float(logits), as_plain_float(targets)
        if logits.shape != targets.shape:
            raise ValueError(
                f"{type(self).__name__}: logits {tuple(logits.shape)} and targets "
                f"{tuple(targets.shape)} must have the same shape"
            )
        known = ~torch.isnan(targets)
        if bool(known.all()):  # one host sync, as fastai's per-batch loss logging already makes
            losses = self.elementwise(logits, targets)
            return losses.mean() if self.reduction == "mean" else losses.sum() if self.reduction == "sum" else losses
        # missing targets are zero-filled for elementwise() and their losses replaced by 0: no gradient flows
        losses = torch.where(known, self.elementwise(logits, torch.where(known, targets, 0.0)), 0.0)
        if self.reduction == "mean":
            return losses.sum() / known.sum().clamp(min=1)
        return losses.sum() if self.reduction == "sum" else losses

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Logits to probabilities: sigmoid(x)."""
        return torch.sigmoid(x)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities to labels: x > thresh."""
        return x > self.thresh


class BCELoss(MultiLabelLoss):
    """Binary cross-entropy with logits.

    l = -[ y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)) ]
    """

    def elementwise(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


class AsymmetricLoss(MultiLabelLoss):
    """Asymmetric loss (Ridnik et al., 2021, "Asymmetric Loss for Multi-Label
    Classification").

        p    = sigmoid(x)
        p_m  = max(p - clip, 0)                        (shifted probability, negatives)
        L+   = (1 - p)^gamma_pos * log(p)
        L-   = p_m^gamma_neg * log(1 - p_m)
        l    = -[ y L+ + (1 - y) L- ]

    A negative whose probability is below ``clip`` has p_m = 0 and contributes
    exactly 0. log(p) is computed as logsigmoid(x) and 1 - p as sigmoid(-x), so
    both stay accurate at large |x|; log(1 - p_m) is clamped at ``eps``
    (it is at least log(clip) whenever clip > 0).
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                 clip: float = 0.05, eps: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {clip}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def positive_term(self, logits):
        """L+ = (1 - p)^gamma_pos * log(p)."""
        return torch.sigmoid(-logits).pow(self.gamma_pos) * F.logsigmoid(logits)

    def negative_term(self, logits):
        """L- = p_m^gamma_neg * log(1 - p_m), p_m = max(p - clip, 0)."""
        p = torch.sigmoid(logits)
        p_shifted = (p - self.clip).clamp(min=0.0)
        one_minus_shifted = (torch.sigmoid(-logits) + self.clip).clamp(max=1.0)
        return p_shifted.pow(self.gamma_neg) * one_minus_shifted.clamp(min=self.eps).log()

    def elementwise(self, logits, targets):
        return -(targets * self.positive_term(logits)
                 + (1.0 - targets) * self.negative_term(logits))


class FocalLoss(MultiLabelLoss):
    """Focal loss (Lin et al., 2017), binary per element.

        p_t     = p if y = 1 else 1 - p             (p = sigmoid(x))
        alpha_t = alpha if y = 1 else 1 - alpha
        l       = -alpha_t (1 - p_t)^gamma log(p_t)

    -log(p_t) is the element BCE (stable for any x); p_t = exp(-BCE) and
    1 - p_t = -expm1(-BCE).
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.gamma, self.alpha = gamma, alpha

    def elementwise(self, logits, targets):
        neg_log_pt = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        one_minus_pt = -torch.expm1(-neg_log_pt)
        alpha_t = self.alpha * targets + (1.0 - self.alpha) * (1.0 - targets)
        return alpha_t * one_minus_pt.pow(self.gamma) * neg_log_pt


LOSSES: Dict[str, Callable[..., MultiLabelLoss]] = {
    "bce": BCELoss,
    "asl": AsymmetricLoss,
    "focal": FocalLoss,
}


def build_loss(name: str, **kwargs) -> MultiLabelLoss:
    """Construct the loss registered as ``name`` (case-insensitive).

    Raises ``UserError`` (one line, listing the valid names) for an unknown name.
    """
    key = str(name).strip().lower()
    if key not in LOSSES:
        valid = ", ".join(sorted(LOSSES))
        raise UserError(f"unknown loss {name!r}; valid losses are: {valid}")
    return LOSSES[key](**kwargs)
