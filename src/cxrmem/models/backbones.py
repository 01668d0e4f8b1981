"""Backbones: a registry of image models cut into a feature-map ``body``.

``build_backbone(name)`` returns a :class:`Backbone` whose ``body`` maps images
``[B, 3, H, W]`` to the model's last feature map (its final block included:
efficientnet's 1x1 conv to 1280 channels, densenet's last norm + ReLU, ...) and
whose ``num_features`` is the pooled feature dimension ``D``, read from the
model itself.

Names: the torchvision models in :data:`BACKBONES`, and any timm model as
``timm/<name>`` (``timm/convnext_tiny``, ``timm/resnet10t.c3_in1k``).

Weights never come from the network: ``pretrained=True`` uses the local torch
hub cache (torchvision, timm URL weights) or the Hugging Face cache (timm), and
``weights=<file>`` loads a local state dict of the full model or of the body.
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from cxrmem.errors import UserError

__all__ = ["Backbone", "BACKBONES", "TIMM_PREFIX", "build_backbone", "pool_features", "global_average_pool"]

TIMM_PREFIX = "timm/"


def global_average_pool(feature_map: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C]``: the mean over the spatial positions."""
    return F.adaptive_avg_pool2d(feature_map, 1).flatten(1)


def pool_features(body: nn.Module, feature_map: Tensor) -> Tensor:
    """The body's own pooling (``body.pool_features``) when it has one, else global average pooling."""
    own_pooling = getattr(body, "pool_features", None)
    return own_pooling(feature_map) if own_pooling is not None else global_average_pool(feature_map)


@dataclass
class Backbone:
    """``body``: images -> feature map; ``num_features``: D of the pooled features."""

    name: str
    body: nn.Module
    num_features: int

    def pool(self, feature_map: Tensor) -> Tensor:
        """Feature map -> ``[B, num_features]``."""
        return pool_features(self.body, feature_map)


@dataclass(frozen=True)
class _Source:
    """Where a backbone comes from: ``create(pretrained)`` -> full model, ``cut(model)`` -> Backbone."""

    name: str
    create: Callable[[bool], nn.Module]
    cut: Callable[[nn.Module], Backbone]


# --------------------------------------------------------------------------- torchvision


def _efficientnet_body(name: str, model: nn.Module) -> Backbone:
    """``features`` (ending with the 1x1 conv + BN + SiLU head block)."""
    body = nn.Sequential(OrderedDict(features=model.features))
    return Backbone(name, body, model.classifier[-1].in_features)


def _resnet_body(name: str, model: nn.Module) -> Backbone:
    """Stem and the four stages (everything before ``avgpool``/``fc``)."""
    parts = OrderedDict((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc"))
    return Backbone(name, nn.Sequential(parts), model.fc.in_features)


def _densenet_body(name: str, model: nn.Module) -> Backbone:
    """``features`` (ending with ``norm5``) plus the ReLU torchvision applies in ``forward``."""
    body = nn.Sequential(OrderedDict(features=model.features, final_relu=nn.ReLU()))
    return Backbone(name, body, model.classifier.in_features)


def _torch_cache_checkpoint(url: str) -> Path:
    """Where ``torch.hub`` keeps the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _not_cached(name: str, where: str) -> UserError:
    return UserError(
        f"pretrained weights for {name} are not in the {where}; "
        "set model.pretrained: false or model.weights: <file>"
    )


def _create_torchvision(name: str, constructor: Callable, weights, pretrained: bool) -> nn.Module:
    """The full torchvision model; pretrained weights only from the local torch hub cache."""
    if not pretrained:
        return constructor(weights=None)
    checkpoint = _torch_cache_checkpoint(weights.url)
    if not checkpoint.is_file():
        raise _not_cached(name, f"torch cache ({checkpoint})")
    try:
        return constructor(weights=weights)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(
            f"cached pretrained weights {checkpoint} for {name} could not be loaded ({_first_line(error)}); "
            "delete the file and download it again, or set model.pretrained: false"
        ) from error


def _torchvision(constructor: Callable, weights_enum, cut: Callable) -> Callable[[str], _Source]:
    """Registry entry for a torchvision model (its ImageNet weights: ``weights_enum.DEFAULT``)."""

    def source(name: str) -> _Source:
        create = partial(_create_torchvision, name, constructor, weights_enum.DEFAULT)
        return _Source(name, create, partial(cut, name))

    return source


#: backbone name -> builder of its source. Add a backbone with one line.
BACKBONES: dict[str, Callable[[str], _Source]] = {
    "efficientnet_v2_s": _torchvision(tvm.efficientnet_v2_s, tvm.EfficientNet_V2_S_Weights, _efficientnet_body),
    "efficientnet_v2_m": _torchvision(tvm.efficientnet_v2_m, tvm.EfficientNet_V2_M_Weights, _efficientnet_body),
    "efficientnet_v2_l": _torchvision(tvm.efficientnet_v2_l, tvm.EfficientNet_V2_L_Weights, _efficientnet_body),
    "resnet18": _torchvision(tvm.resnet18, tvm.ResNet18_Weights, _resnet_body),
    "resnet34": _torchvision(tvm.resnet34, tvm.ResNet34_Weights, _resnet_body),
    "resnet50": _torchvision(tvm.resnet50, tvm.ResNet50_Weights, _resnet_body),
    "densenet121": _torchvision(tvm.densenet121, tvm.DenseNet121_Weights, _densenet_body),
}


# --------------------------------------------------------------------------- timm


class TimmBody(nn.Module):
    """A timm model seen as a body: ``forward`` is ``forward_features``.

    ``pool_features`` is timm's own head up to the pre-logits (global pooling
    plus whatever the model applies after it, e.g. convnext's LayerNorm), so
    token- and NHWC-shaped feature maps are pooled correctly.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)

    def pool_features(self, feature_map: Tensor) -> Tensor:
        return self.model.forward_head(feature_map, pre_logits=True)


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "huggingface" / "hub"


def _cached_timm_weights(model_name: str) -> Path | None:
    """A locally cached weights file for a timm model (Hugging Face cache first, then the torch cache)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=_hf_cache_dir())
            if isinstance(found, str):
                return Path(found)
    if cfg.url and _torch_cache_checkpoint(cfg.url).is_file():
        return _torch_cache_checkpoint(cfg.url)
    return None


def _create_timm(name: str, model_name: str, pretrained: bool) -> nn.Module:
    """The full timm model; pretrained weights only from a local cache file (never downloaded)."""
    import timm

    if not pretrained:
        return timm.create_model(model_name, pretrained=False)
    cached = _cached_timm_weights(model_name)
    if cached is None:
        where = f"Hugging Face cache ({_hf_cache_dir()}) or torch cache ({Path(torch.hub.get_dir()) / 'checkpoints'})"
        raise _not_cached(name, where)
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise UserError(
            f"cached pretrained weights {cached} for {name} could not be loaded ({_first_line(error)}); "
            "delete the file and download it again, or set model.pretrained: false"
        ) from error


def _timm_body(name: str, model: nn.Module) -> Backbone:
    """Drop the classifier; D is what ``forward_head(pre_logits=True)`` returns."""
    model.reset_classifier(0)
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(name, TimmBody(model), int(num_features))


def _timm_source(name: str) -> _Source:
    import timm

    model_name = name[len(TIMM_PREFIX) :]
    if not timm.is_model(model_name):
        closest = TIMM_PREFIX + _closest(model_name, timm.list_models())
        raise UserError(
            f"model.backbone: unknown timm model {model_name!r} (did you mean {closest}?); "
            "see timm.list_models() for the names"
        )
    return _Source(name, partial(_create_timm, name, model_name), partial(_timm_body, name))


# --------------------------------------------------------------------------- lookup and loading


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.0)
    return match[0] if match else ""


def _source_for(name: str) -> _Source:
    if name in BACKBONES:
        return BACKBONES[name](name)
    if name.startswith(TIMM_PREFIX):
        return _timm_source(name)
    raise UserError(
        f"model.backbone: unknown backbone {name!r} (did you mean {_closest(name, BACKBONES)}?); "
        f"use one of {', '.join(BACKBONES)} or {TIMM_PREFIX}<any timm model>"
    )


def _read_state_dict(path: Path) -> dict:
    """``torch.load(weights_only=True)``; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped."""
    if not path.is_file():
        raise UserError(f"model.weights: file {path} does not exist; fix the path or set model.weights: null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling failures have many types
        raise UserError(
            f"model.weights: {path} is not a readable weights file ({_first_line(error)}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(
            f"model.weights: {path} holds a {type(state).__name__}, not a state dict; save model.state_dict()"
        )
    return state


def _mismatch(module: nn.Module, state: dict) -> str:
    """Empty when ``state`` fits ``module`` exactly (same keys and shapes), else a short description."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        key for key in expected
        if key in state and hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    parts = [
        f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
        if keys
    ]
    return "; ".join(parts)


def _load_local_weights(source: _Source, path: Path) -> Backbone:
    """Load ``path`` into the full model, or else into the body; UserError when it fits neither."""
    state = _read_state_dict(path)
    model = source.create(False)
    full_mismatch = _mismatch(model, state)
    if not full_mismatch:
        model.load_state_dict(state)
        return source.cut(model)
    backbone = source.cut(model)
    body_mismatch = _mismatch(backbone.body, state)
    if not body_mismatch:
        backbone.body.load_state_dict(state)
        return backbone
    raise UserError(
        f"model.weights: {path} does not match backbone {source.name} (as the full model: {full_mismatch}); "
        f"use weights saved from a {source.name} model or its body, or change model.backbone"
    )


def build_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None) -> Backbone:
    """The backbone ``name`` with random, cached-pretrained (``pretrained``) or local (``weights``) weights.

    ``weights`` takes precedence over ``pretrained``. Nothing is downloaded.
    """
    source = _source_for(name)
    if weights is not None:
        return _load_local_weights(source, Path(weights))
    return source.cut(source.create(bool(pretrained)))
