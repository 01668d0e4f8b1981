"""Backbones: a registry of image models cut into a feature-map ``body``.

``build_backbone(name)`` returns a :class:`Backbone` whose ``body`` maps images
``[B, 3, H, W]`` to the model's last feature map (its final block included:
efficientnet's 1x1 conv to 1280 channels, densenet's last norm + ReLU, ...) and
whose ``num_features`` is the pooled feature dimension ``D``, read from the
model itself.

Names: the torchvision models in :data:`BACKBONES`, and any timm model as
``timm/<name>`` (``timm/convnext_tiny``, ``timm/resnet10t.c3_in1k``).

Weights: ``pretrained=True`` takes the ImageNet weights the way torchvision and
timm do: downloaded by their own loaders on first use into their usual caches
(torch hub's ``checkpoints`` folder; the Hugging Face hub cache for timm), read
from there afterwards. :func:`pretrained_file` says which file, from which URL,
into which folder. ``weights=<file>`` loads a local state dict of the full model
or of the body.
"""

from __future__ import annotations

import os
import posixpath
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import timm
import timm.models
import torchvision.models as tvm
from huggingface_hub import hf_hub_url, try_to_load_from_cache
from safetensors.torch import load_file
from torch import Tensor, nn

from ..utils.errors import UserError, closest, describe_error

__all__ = [
    "Backbone", "BACKBONES", "TIMM_PREFIX", "TorchCacheFile", "HubFile", "build_backbone", "pretrained_file",
    "pool_features", "global_average_pool", "input_stats", "IMAGENET_STATS",
]

TIMM_PREFIX = "timm/"
# (mean, std) per channel of images in [0, 1] that torchvision's ImageNet weights were trained on
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


# --------------------------------------------------------------------------- pretrained weights files


@dataclass(frozen=True)
class TorchCacheFile:
    """A file that ``torch.hub.load_state_dict_from_url`` downloads from ``url`` into
    ``<torch hub dir>/checkpoints/<last part of the url>`` (``TORCH_HOME`` moves the hub dir).
    """

    url: str
    cache_name: ClassVar[str] = "torch cache"

    @property
    def filename(self) -> str:
        return posixpath.basename(urlparse(self.url).path)

    @property
    def folder(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        """What timm's ``create_model(cache_dir=...)`` takes for this file."""
        return self.folder

    def cached(self) -> Path | None:
        path = self.folder / self.filename
        return path if path.is_file() else None


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the hub resolves it, but from the environment now (the hub reads it once,
    at import): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else ``$HF_HOME/hub``, else
    ``${XDG_CACHE_HOME:-~/.cache}/huggingface/hub``."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(cache)))


@dataclass(frozen=True)
class HubFile:
    """A weights file of a Hugging Face Hub repository. The hub cache keeps it as
    ``<cache>/models--<owner>--<repo>/snapshots/<revision>/<filename>`` (a commit hash, or
    ``main`` for a file put there by hand); ``filenames`` are the names timm tries, in order.
    """

    repo_id: str
    filenames: tuple[str, ...]
    revision: str | None = None
    cache_name: ClassVar[str] = "Hugging Face cache"

    @property
    def filename(self) -> str:
        return self.filenames[0]

    @property
    def url(self) -> str:
        return hf_hub_url(self.repo_id, self.filename, revision=self.revision)

    @property
    def cache_dir(self) -> Path:
        return _hf_cache_dir()

    @property
    def folder(self) -> Path:
        repo_folder = "models--" + self.repo_id.replace("/", "--")
        return self.cache_dir / repo_folder / "snapshots" / (self.revision or "main")

    def cached(self) -> Path | None:
        for filename in self.filenames:
            found = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.revision)
            if isinstance(found, str):
                return Path(found)
        return None


WeightsFile = Union[TorchCacheFile, HubFile]


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause ("Connection refused", "invalid hash value ...")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return describe_error(error)[:200]


@contextmanager
def _fetching(name: str, file: WeightsFile) -> Iterator[None]:
    """Around a library call that downloads ``file`` when it is not cached and loads it.

    A failure leaves no file in the cache when the download failed (both loaders
    write to a temporary file and rename it once complete and, for torchvision,
    hash-checked): then the one-line error says what to fetch from where into
    which folder. A file that is cached but does not load is named for deletion.
    """
    try:
        yield
    except Exception as error:  # urllib, httpx, hub, pickle and torch errors: too many types to list
        cached = file.cached()
        if cached is None:
            raise UserError(
                f"pretrained weights for {name} are not in the {file.cache_name} and could not be downloaded "
                f"({_reason(error)}); put {file.filename} from {file.url} into {file.folder} "
                f"(cxrmem-weights download {name} fetches it on a machine with internet), "
                "or set model.pretrained: false or model.weights: <file>"
            ) from error
        raise UserError(
            f"cached pretrained weights {cached} for {name} could not be loaded ({describe_error(error)}); "
            "delete the file and download it again, or set model.pretrained: false"
        ) from error


@dataclass(frozen=True)
class _Source:
    """Where a backbone comes from: ``create(pretrained)`` -> full model, ``cut(model)`` -> Backbone;
    ``weights_file``: its pretrained weights (None when it has none)."""

    name: str
    create: Callable[[bool], nn.Module]
    cut: Callable[[nn.Module], Backbone]
    weights_file: WeightsFile | None


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


def _create_torchvision(name: str, constructor: Callable, weights, pretrained: bool) -> nn.Module:
    """The full torchvision model; ``pretrained``: torchvision loads ``weights`` through
    ``load_state_dict_from_url`` (downloaded and hash-checked on first use, then from the torch cache)."""
    if not pretrained:
        return constructor(weights=None)
    with _fetching(name, TorchCacheFile(weights.url)):
        return constructor(weights=weights)


def _torchvision(constructor: Callable, weights_enum, cut: Callable) -> Callable[[str], _Source]:
    """Registry entry for a torchvision model (its ImageNet weights: ``weights_enum.DEFAULT``)."""

    def source(name: str) -> _Source:
        weights = weights_enum.DEFAULT
        create = partial(_create_torchvision, name, constructor, weights)
        return _Source(name, create, partial(cut, name), TorchCacheFile(weights.url))

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


#: timm's preferred safetensors twin of a pickled file on the hub
_SAFETENSORS_TWINS = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def _timm_file(model_name: str) -> WeightsFile | None:
    """Where timm takes ``model_name``'s pretrained weights from: its Hugging Face repository when it
    has one (a ``.bin`` file's safetensors twin first), else its URL; None when timm has none."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        twin = _SAFETENSORS_TWINS.get(filename, filename[: -len(".bin")] + ".safetensors")
        filenames = (twin, filename) if filename.endswith(".bin") else (filename,)
        return HubFile(repo_id, filenames, revision or None)
    return TorchCacheFile(cfg.url) if cfg.url else None


def _create_timm(name: str, model_name: str, file: WeightsFile | None, pretrained: bool) -> nn.Module:
    """The full timm model; ``pretrained``: a cached file is loaded as is (no request at all), else
    ``create_model(pretrained=True)`` downloads it into ``file``'s cache."""
    if not pretrained:
        return timm.create_model(model_name, pretrained=False)
    if file is None:
        raise UserError(
            f"model.pretrained: timm has no pretrained weights for {name}; "
            "set model.pretrained: false or pick a model listed by timm.list_pretrained()"
        )
    with _fetching(name, file):
        cached = file.cached()
        if cached is not None:
            return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
        return timm.create_model(model_name, pretrained=True, cache_dir=file.cache_dir)


def _timm_body(name: str, model: nn.Module) -> Backbone:
    """Drop the classifier; D is what ``forward_head(pre_logits=True)`` returns."""
    model.reset_classifier(0)
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(name, TimmBody(model), int(num_features))


def _timm_source(name: str) -> _Source:
    model_name = name[len(TIMM_PREFIX) :]
    if not timm.is_model(model_name):
        raise UserError(f"model.backbone: unknown timm model {model_name!r}{_did_you_mean(model_name)}; "
                        "see timm.list_models() for the names")
    file = _timm_file(model_name)
    return _Source(name, partial(_create_timm, name, model_name, file), partial(_timm_body, name), file)


# --------------------------------------------------------------------------- lookup and loading


def _did_you_mean(name: str) -> str:
    """`` (did you mean X?)`` over the registry's names and timm's (as ``timm/<name>``), or nothing.
    Names are compared without the prefix and with ``-`` read as ``_`` (``efficientnet-b0``)."""
    bare = name.removeprefix(TIMM_PREFIX).replace("-", "_").lower()
    spelled = {n: n for n in BACKBONES}
    spelled.update({n: TIMM_PREFIX + n for n in timm.list_models() if n not in spelled})
    match = closest(bare, spelled)
    return f" (did you mean {spelled[match]}?)" if match else ""


def _source_for(name: str) -> _Source:
    if name in BACKBONES:
        return BACKBONES[name](name)
    if name.startswith(TIMM_PREFIX):
        return _timm_source(name)
    raise UserError(f"model.backbone: unknown backbone {name!r}{_did_you_mean(name)}; "
                    f"use one of {', '.join(BACKBONES)} or {TIMM_PREFIX}<any timm model>")


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that backbone ``name`` expects of images in [0, 1]: a timm model's own
    pretrained configuration (``timm.data.resolve_data_config``'s source), ImageNet's for the registry's
    torchvision models (their weights' transforms)."""
    _source_for(name)
    if not name.startswith(TIMM_PREFIX):
        return IMAGENET_STATS
    cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX) :])
    if cfg is None or cfg.mean is None or cfg.std is None:
        return IMAGENET_STATS
    return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)


def check_backbone(name: str, image_size: int) -> None:
    """UserError unless ``name`` is a known backbone that takes ``image_size`` px images.

    Reads names and timm's pretrained configuration only (no model is built), so a config can be
    checked as soon as it is loaded. A timm model whose configuration says ``fixed_input_size``
    (the ViTs, whose position embeddings are sized for one grid) takes its ``input_size`` only.
    """
    _source_for(name)
    if not name.startswith(TIMM_PREFIX):
        return
    cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX) :])
    size = cfg.input_size[-1] if cfg is not None and cfg.fixed_input_size else None
    if size is not None and size != image_size:
        raise UserError(f"model.backbone: {name} takes {size} px images only, and data.image_size is "
                        f"{image_size}; set data.image_size: {size} or choose a backbone without a fixed input size")


def _load_file(path: Path):
    """A ``.safetensors`` file (as the Hugging Face hub serves timm weights), else ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(path: Path) -> dict:
    """The file's tensors; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped."""
    if not path.is_file():
        raise UserError(f"model.weights: file {path} does not exist; fix the path or set model.weights: null")
    try:
        state = _load_file(path)
    except Exception as error:  # unpickling failures have many types
        raise UserError(
            f"model.weights: {path} is not a readable weights file ({describe_error(error)}); "
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


def pretrained_file(name: str) -> WeightsFile | None:
    """The file that ``build_backbone(name, pretrained=True)`` loads: its ``filename``, ``url``, cache
    ``folder`` and ``cached()`` path; None for a timm model without pretrained weights."""
    return _source_for(name).weights_file


def build_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None) -> Backbone:
    """The backbone ``name`` with random, pretrained (``pretrained``) or local (``weights``) weights.

    ``weights`` takes precedence over ``pretrained``. Pretrained weights are downloaded on
    first use into the library's cache; when that fails, a UserError names file, URL and folder.
    """
    source = _source_for(name)
    if weights is not None:
        return _load_local_weights(source, Path(weights))
    return source.cut(source.create(bool(pretrained)))
