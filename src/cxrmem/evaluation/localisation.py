"""Localisation: the pointing game of heatmaps against bounding boxes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------

def pointing_game(heatmaps, boxes, findings: Sequence[str], original_size=(1024, 1024)) -> dict:
    """Pointing-game hit rate per finding, with the rate of a uniformly random point.

    ``heatmaps`` [K, H, W]: for each of K (image, box) pairs, the heatmap of the box's image for
    the box's finding, computed on the whole image resized (not cropped) to H x W. ``boxes``
    [K, 4]: x, y, w, h in the original image's pixels (ChestX-ray14's BBox_List_2017.csv:
    1024 x 1024 images). ``original_size``: (width, height), one pair or [K, 2].

    Mapping: heatmap cell (row i, column j) covers the original pixels x in [j W0 / W,
    (j + 1) W0 / W), y in [i H0 / H, (i + 1) H0 / H), and points at its centre
    ((j + 1/2) W0 / W, (i + 1/2) H0 / H). The heatmap's maximum is its first maximal cell in
    row-major order; a hit is a centre inside the closed box x <= px <= x + w, y <= py <= y + h.

    Chance: a uniformly random point hits with probability area(box within the image) / (W0 H0);
    its mean over the pairs. Returns {finding: {"n_boxes", "hit_rate", "chance_rate"}}.
    """
    maps = np.asarray(heatmaps, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    findings = [str(f) for f in findings]
    if maps.ndim != 3 or boxes.shape != (maps.shape[0], 4) or len(findings) != maps.shape[0]:
        raise ValueError(f"heatmaps {maps.shape}, boxes {boxes.shape} and {len(findings)} findings "
                         "must be [K, H, W], [K, 4] and K")
    n, height, width = maps.shape
    size = np.broadcast_to(np.asarray(original_size, dtype=np.float64), (n, 2))
    row, col = np.unravel_index(maps.reshape(n, -1).argmax(axis=1), (height, width))
    px = (col + 0.5) * size[:, 0] / width
    py = (row + 0.5) * size[:, 1] / height
    x, y, w, h = boxes.T
    hit = (x <= px) & (px <= x + w) & (y <= py) & (py <= y + h)

    inside_w = np.clip(np.minimum(x + w, size[:, 0]) - np.maximum(x, 0), 0, None)
    inside_h = np.clip(np.minimum(y + h, size[:, 1]) - np.maximum(y, 0), 0, None)
    chance = inside_w * inside_h / (size[:, 0] * size[:, 1])

    names = np.array(findings, dtype=object)
    return {finding: {"n_boxes": int((names == finding).sum()),
                      "hit_rate": float(hit[names == finding].mean()),
                      "chance_rate": float(chance[names == finding].mean())}
            for finding in dict.fromkeys(findings)}
