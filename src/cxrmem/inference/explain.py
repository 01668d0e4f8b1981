"""Heatmaps: Grad-CAM through the whole network, overlays, and the pointing game against boxes.

Grad-CAM (Selvaraju et al. 2017), computed by the ``grad-cam`` package. For an image,
a class c with logit y^c of the *whole* network (body, pooling, memory retrieval
``z + bank.retrieve(z)``, head) and the K feature maps A^k of the target layer::

    alpha_k = mean_ij  d y^c / d A^k_ij          L = ReLU( sum_k alpha_k A^k )

L is resized (bilinear) to the input's S x S, R = resize(L), and scaled to [0, 1] per
image and class, (R - min R) / (max R - min R); an L that is 0 everywhere stays 0.

Target layer: the backbone's last convolutional block, found by one rule for every
backbone. Consider the children that hold an ``nn.Conv2d`` and that the body runs when
it computes its feature map; start at the network's ``body`` and, while there is exactly
one such child, step into it; the target is then the last of them to run. That is
``layer4`` of the ResNets (torchvision and timm), ``features[-1]`` (the 1x1 head
convolution) of torchvision's EfficientNets, ``denseblock4`` of DenseNet, ``conv_head``
of timm's EfficientNets, ``blocks`` of timm's MobileNetV3 (whose ``conv_head`` runs after
pooling) and ``stages`` of ConvNeXt. Backbones whose body does not give a [B, C, h, w]
feature map (vision transformers' tokens, timm models declaring channels-last output) are
refused with a UserError.

The network is put in eval mode, so the memory bank is read and never written, and its
parameters are frozen while a heatmap is computed (the gradient flows from the input,
which is made to require it), so no ``.grad`` is left behind.

Pointing game (Zhang et al. 2016): a box is hit when the maximum of the heatmap of its
image and finding lies inside it; the chance rate is that of a uniformly random point
(:func:`cxrmem.evaluation.localisation.pointing_game`). :func:`pointing_game_of_run` plays it
for a trained network on the valid and test images that ChestX-ray14's
``BBox_List_2017.csv`` has boxes for.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from ..data.chestxray14 import read_bboxes
from ..data.release import BOX_FRAME
from ..data.summary import boxes_in_split
from ..data.findings import FINDINGS
from ..data.loaders import read_xray
from ..data.registry import model_findings
from ..evaluation.localisation import pointing_game
from ..utils.errors import UserError
from ..utils.io import atomic_path

__all__ = ["grad_cam", "grad_cam_pairs", "target_layer", "overlay", "save_overlay", "prepare_images", "grad_cam_pointing_game",
           "pointing_game_of_run"]

INSTALL_HINT = "pip install 'cxrmem[explain]'"
OVERLAY_ALPHA = 0.45  # weight of the coloured heatmap in an overlay
OVERLAY_COLORMAP = "jet"


def _grad_cam_package():
    """(GradCAM, ClassifierOutputTarget) from the grad-cam package; one-line UserError when absent."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as error:
        raise UserError(f"heatmaps need the grad-cam package ({error}); install it with {INSTALL_HINT}") from None
    return GradCAM, ClassifierOutputTarget


def _children_run_by_body(model: nn.Module, module: nn.Module, probe: Tensor) -> list[nn.Module]:
    """The children of ``module`` whose nn.Conv2d layers ``model.body(probe)`` runs, in the order it first
    runs them (hooks on the convolutions themselves: a timm body calls its model's methods, not the model)."""
    ran: list[nn.Module] = []

    def hook_for(child):
        return lambda conv, inputs, output: ran.append(child) if child not in ran else None

    handles = [conv.register_forward_hook(hook_for(child))
               for child in module.children() for conv in child.modules() if isinstance(conv, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.body(probe)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def target_layer(model: nn.Module, probe: Tensor) -> nn.Module:
    """The backbone's last convolutional block of a :class:`~cxrmem.models.net.CXRNet` (rule above).

    ``probe`` ([1, 3, S, S]) is run through the body to see which children compute the feature
    map (timm runs a MobileNetV3's ``conv_head`` after pooling, outside the feature map). Call
    with the model in eval mode, so that batch-norm statistics stay as they are.
    """
    module = model.body
    while True:
        convolutional = _children_run_by_body(model, module, probe)
        if not convolutional:
            raise UserError(f"heatmaps need a convolutional backbone; {model.backbone_name} has no nn.Conv2d layer")
        if len(convolutional) == 1 and any(True for _ in convolutional[0].children()):
            module = convolutional[0]
            continue
        return convolutional[-1]


class _FeatureMapShape:
    """Forward hook on the body: records the shape of the feature map it returns."""

    def __init__(self):
        self.shape = None

    def __call__(self, module, inputs, output):
        self.shape = tuple(output.shape) if isinstance(output, Tensor) else None

    def check(self, model) -> None:
        """UserError unless the body gave a [B, C, h, w] map (not tokens, not timm's declared channels-last)."""
        declared = getattr(getattr(model.body, "model", model.body), "output_fmt", "NCHW")  # timm models say NHWC
        if self.shape is None or len(self.shape) != 4 or getattr(declared, "value", declared) != "NCHW":
            raise UserError(f"heatmaps need a convolutional backbone with a [B, C, H, W] feature map; "
                            f"{model.backbone_name} gives {list(self.shape or [])} ({declared}); use a CNN backbone")


def grad_cam_pairs(model: nn.Module, images: Tensor, classes: Sequence[int], batch_size: int = 32) -> np.ndarray:
    """Heatmap of image i for class ``classes[i]``: float32 [N, S, S] in [0, 1] (module docstring).

    Images are independent (eval mode: batch norm uses its running statistics and the bank
    is only read), so each batch mixes classes freely. ``images`` are normalised the way
    the network was trained (:func:`prepare_images`).
    """
    GradCAM, ClassifierOutputTarget = _grad_cam_package()
    if images.ndim != 4 or len(classes) != images.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} must be [N, 3, S, S] with one class each "
                         f"({len(classes)} given)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layer = target_layer(model, images[:1].to(device=device, dtype=torch.float32))
    requires_grad = [p.requires_grad for p in model.parameters()]
    shape = _FeatureMapShape()
    handle = model.body.register_forward_hook(shape)
    out, cam = [], None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        cam = GradCAM(model=model, target_layers=[layer])  # not a context manager: its __exit__ swallows IndexErrors
        with torch.enable_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(device=device, dtype=torch.float32).requires_grad_(True)
                targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + batch_size]]
                try:
                    out.append(cam(input_tensor=batch, targets=targets))
                except ValueError:  # the package's word for a feature map it cannot weigh
                    shape.check(model)
                    raise
                shape.check(model)
    finally:
        if cam is not None:
            cam.activations_and_grads.release()
        handle.remove()
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    if not out:
        return np.zeros((0, *images.shape[-2:]), np.float32)
    return np.clip(np.concatenate(out).astype(np.float32), 0.0, 1.0)


def grad_cam(model: nn.Module, images: Tensor, class_indices: Sequence[int], batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps of every image for every class: float32 [N, len(class_indices), S, S] in [0, 1].

    ``images`` [N, 3, S, S], normalised like the training data (:func:`prepare_images`).
    """
    n = images.shape[0]
    maps = [grad_cam_pairs(model, images, [c] * n, batch_size) for c in class_indices]
    if not maps:
        return np.zeros((n, 0, *images.shape[-2:]), np.float32)
    return np.stack(maps, axis=1)


def prepare_images(paths: Sequence, size: int, stats) -> Tensor:
    """Files -> [N, 3, size, size] float32, exactly as evaluation feeds them to the network:
    :func:`cxrmem.data.loaders.read_xray` (squished), grey as 3 channels, / 255, then
    ``(x - mean) / std`` with ``stats`` = (mean, std), the network's ``input_stats``."""
    mean, std = (torch.tensor(s, dtype=torch.float32).view(3, 1, 1) for s in stats)
    if not paths:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    return torch.stack([(read_xray(p, size).as_subclass(Tensor).expand(3, -1, -1).float() / 255.0 - mean) / std
                        for p in paths])


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3]: ``heatmap`` (any h x w, values in [0, 1]) resized (bilinear) to the
    grayscale ``image`` (uint8 [H, W]) and blended over it: (1 - a) gray + a colormap(heatmap),
    a = OVERLAY_ALPHA."""

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be a grayscale [H, W] array, got shape {image.shape}")
    height, width = image.shape
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    colours = colormaps[OVERLAY_COLORMAP](np.clip(np.asarray(resized), 0.0, 1.0))[..., :3]
    gray = (image.astype(np.float32) / 255.0)[..., None]
    blended = (1.0 - OVERLAY_ALPHA) * gray + OVERLAY_ALPHA * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


OVERLAY_MIN_SIDE = 384  # px an overlay is drawn at, at least: a caption stays legible beside a 32 px image
COLOUR_SCALE_LABEL = "Grad-CAM: 0 least, 1 most (this image and finding)"


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path, caption: str = "", metadata=None) -> None:
    """Write a PNG of :func:`overlay` with ``caption`` above it and the colour scale beside it.

    The overlay is drawn at its own pixels (enlarged, without smoothing, to OVERLAY_MIN_SIDE px
    when smaller); ``metadata`` (text keys and values) goes into the PNG's text chunks, so that a
    program finds what the caption says. Written atomically.
    """


    pixels = overlay(image, heatmap)
    height, width = pixels.shape[:2]
    scale = max(1.0, OVERLAY_MIN_SIDE / min(height, width))
    dpi, bar, top = 100, 120, 40  # px beside the image for the colour scale, above it for the caption
    h, w = height * scale, width * scale
    fig = Figure(figsize=((w + bar) / dpi, (h + top) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.add_axes((0, 0, w / (w + bar), h / (h + top)))
    axes.imshow(pixels, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(caption, fontsize=10, loc="left", pad=6)
    scale_axes = fig.add_axes((w / (w + bar) + 12 / (w + bar), 0.05, 14 / (w + bar), 0.85 * h / (h + top)))
    colourbar = fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[OVERLAY_COLORMAP]), cax=scale_axes)
    colourbar.set_label(COLOUR_SCALE_LABEL, fontsize=8)
    colourbar.ax.tick_params(labelsize=8)
    with atomic_path(os.fspath(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi,
                    metadata={"Software": "cxrmem", **{str(k): str(v) for k, v in (metadata or {}).items()}})


# --------------------------------------------------------------------------- the pointing game of a run


def grad_cam_pointing_game(model, frame, boxes, image_size: int, batch_size: int = 32,
                           findings: Sequence[str] = FINDINGS) -> dict:
    """{finding: {n_boxes, hit_rate, chance_rate}} over ``boxes`` ([image_index, finding, x, y, w, h],
    as a data set's reader gives them) on the images of ``frame`` (with ``path``), for the boxes of
    the model's ``findings`` (its outputs, in order).

    Heatmaps are computed on the whole image squished to ``image_size``; boxes are in the
    1024 px frame of every data set's boxes. Chunks of ``batch_size`` boxes are played
    one after the other and pooled (rates weighted by their box counts).
    """
    findings = list(findings)
    paths = dict(zip(frame["image_index"], frame["path"]))
    boxes = boxes_in_split(boxes, frame)
    boxes = boxes[boxes["finding"].isin(findings)].reset_index(drop=True)
    hits, chance, counts = {}, {}, {}
    for start in range(0, len(boxes), batch_size):
        chunk = boxes.iloc[start:start + batch_size]
        images = prepare_images([paths[name] for name in chunk["image_index"]], image_size, model.input_stats)
        classes = [findings.index(f) for f in chunk["finding"]]
        maps = grad_cam_pairs(model, images, classes, batch_size)
        result = pointing_game(maps, chunk[list("xywh")].to_numpy(), list(chunk["finding"]), (BOX_FRAME, BOX_FRAME))
        for finding, r in result.items():
            counts[finding] = counts.get(finding, 0) + r["n_boxes"]
            hits[finding] = hits.get(finding, 0.0) + r["hit_rate"] * r["n_boxes"]
            chance[finding] = chance.get(finding, 0.0) + r["chance_rate"] * r["n_boxes"]
    return {f: {"n_boxes": counts[f], "hit_rate": hits[f] / counts[f], "chance_rate": chance[f] / counts[f]}
            for f in findings if f in counts}


def pointing_game_of_run(cfg, model, frame, boxes=None) -> dict:
    """{split: pointing game} for the valid and test images with boxes of the model's findings:
    ``boxes`` as the data set's reader gave them (default: ``cfg.data.data_dir``'s BBox_List_2017.csv);
    {} without such boxes. Whatever a user can fix (a malformed box file, no
    grad-cam package, a backbone without a feature map) is a warning and {}: it comes after
    training, which it must not fail (``--check-data`` reports a malformed box file as an error)."""

    try:
        findings = model_findings(cfg)
        boxes = read_bboxes(cfg.data.data_dir) if boxes is None else boxes
        boxes = boxes[boxes["finding"].isin(findings)]
        splits = {split: frame[frame["split"] == split] for split in ("valid", "test")}
        played = {split: boxes_in_split(boxes, rows) for split, rows in splits.items()}
        splits = {split: rows for split, rows in splits.items() if not played[split].empty}
        if not splits:
            return {}
        in_play = pd.concat([played[split] for split in splits])
        coarse = too_coarse(model, cfg.data.image_size, in_play)
        if coarse:
            print(f"pointing game skipped: {coarse}")
            return {}
        print(f"pointing game: Grad-CAM on the {len(in_play)} boxes of the {' and '.join(splits)} images")
        batch_size = cfg.evaluation_batch_size
        return {split: grad_cam_pointing_game(model, rows, boxes, cfg.data.image_size, batch_size, findings)
                for split, rows in splits.items()}
    except UserError as error:
        warnings.warn(f"pointing game skipped: {error}", stacklevel=2)
        return {}


def too_coarse(model, image_size: int, boxes) -> str | None:
    """Why the heatmaps of ``model`` at ``image_size`` cannot play the pointing game on ``boxes``, or None.

    A Grad-CAM map has one cell per position of the body's feature map; upsampled, its maximum
    sits at a cell's centre, which a box smaller than half a cell rarely contains. So the game is
    not played when a cell, in the 1024 px frame of the boxes, is wider than twice the median box
    side (sqrt(w h)); its hit rates would say nothing about the model."""

    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    with torch.no_grad():
        cells = model.body(torch.zeros(1, 3, image_size, image_size, device=parameter.device)).shape[-1]
    model.train(was_training)
    cell = BOX_FRAME / max(int(cells), 1)
    side = float(np.median(np.sqrt(boxes["w"].to_numpy() * boxes["h"].to_numpy())))
    if cell <= 2 * side:
        return None
    return (f"the Grad-CAM map is {cells} x {cells} cells at {image_size} px, one cell spanning {cell:.0f} of the "
            f"{BOX_FRAME} px image, over twice the median box ({side:.0f} px); its maximum cannot point inside "
            f"the boxes; train at a larger data.image_size (e.g. 224) for a pointing game")
