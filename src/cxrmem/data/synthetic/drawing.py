"""The pixels of one synthetic chest X-ray: anatomy, then one painter per finding, then exposure and noise.

Every image is a chest-like picture (dark lung fields, bright mediastinum, spine, heart
and ribs, per-patient anatomy, per-image pose and exposure, noise) on which each present
finding paints its own pattern in its own region (nodules and masses anywhere in the
lungs), following the ``synthetic_pattern`` column of ``findings.csv``. The patterns are
large enough to survive downscaling to 32-64 px, jittered in position, size and strength,
and a few of them are deliberately subtle. Coordinates: u right, v down, about [-0.5, 0.5]; the patient's right lung is on
the image's left (radiological convention).

Painters of findings with a place (Nodule, Mass, Pneumonia, Atelectasis, Effusion,
Pneumothorax, Cardiomegaly) return their lesion's *footprint*: the weight map, 1 on the
lesion, with which they painted it (before its random strength). :func:`lesion_box` turns
a footprint into the lesion's bounding box: the smallest pixel rectangle holding every
pixel whose footprint is at least 1/2 (for the soft-edged discs and ellipses, exactly
the shape r <= 1). Diffuse patterns (Infiltration, Edema, Emphysema, Fibrosis, ...)
return None: they get no box.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

from ..findings import FINDINGS

# Stream tags keep the independent random streams apart (the metadata stream, 0, is the plan's).
_STREAM_PATIENT, _STREAM_IMAGE, _STREAM_FINDING = 1, 2, 3


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as (x, y) in [-0.5, 0.5], float32, shape [size, size]."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5).astype(np.float32)
    return np.meshgrid(axis, axis)


@lru_cache(maxsize=32)
def _interpolation(size: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left cell index, weight of the left cell, weight of the right cell) per pixel
    for bilinear interpolation from ``cells`` coarse values to ``size`` pixels."""
    position = (np.arange(size) + 0.5) / size * (cells - 1)
    low = np.clip(np.floor(position).astype(np.intp), 0, cells - 2)
    frac = (position - low).astype(np.float32)
    return low, 1.0 - frac, frac


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (about N(0, 0.5) per pixel) varying over ``cells`` steps.

    Bilinear upsampling of a ``cells`` x ``cells`` Gaussian grid, done with gathers
    rather than matrix products (BLAS threads would fight the worker processes).
    """
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    low, w_low, w_high = _interpolation(size, cells)
    rows = coarse[low] * w_low[:, None] + coarse[low + 1] * w_high[:, None]
    return rows[:, low] * w_low[None, :] + rows[:, low + 1] * w_high[None, :]


def ellipse_radius(u, v, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    """Normalised elliptic distance: 1 on the ellipse with centre (cu, cv), axes (au, av)."""
    return np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)


def soft_inside(r: np.ndarray, softness: float) -> np.ndarray:
    """1 well inside (r < 1), 0 outside, a linear ramp ``softness`` wide at r = 1."""
    out = r * np.float32(-1.0 / softness)
    out += np.float32(1.0 / softness + 0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def gaussian(r: np.ndarray) -> np.ndarray:
    """exp(-r^2 / 2): a fuzzy blob of normalised radius ``r``."""
    out = r * r
    out *= np.float32(-0.5)
    return np.exp(out, out=out)


def ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 for x << 0, 1 for x >> 0, linear over ``width`` around 0."""
    out = x * np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class LungShape:
    """One lung field: a rounded apex, a lateral wall widening downwards, a domed base.

    ``side`` is -1 for the patient's right lung (image left) and +1 for the left
    one; ``medial`` and ``width`` are measured along ``side * u``; ``apex`` and
    ``base`` (the costophrenic angle) are v values; ``dome`` is how far the
    diaphragm rises between the angles.
    """

    side: int
    medial: float
    width: float
    apex: float
    base: float
    dome: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.side * (self.medial + self.width / 2), (self.apex + self.base) / 2

    @property
    def half_height(self) -> float:
        return (self.base - self.apex) / 2

    def mask(self, u: np.ndarray, v: np.ndarray, inset: float = 0.0, edge: float = 0.02) -> np.ndarray:
        """Soft mask of the field; ``inset`` pulls the apex and lateral wall inwards."""
        x = u * np.float32(self.side)
        apex = self.apex + inset
        height = np.clip((v - apex) / (self.base - apex), 0.0, 1.0)
        half = self.width / 2
        middle = self.medial + half
        lateral = middle + (half - inset) * np.sqrt(height)
        medial = middle - half * np.sqrt(np.clip(3.0 * height, 0.0, 1.0))
        peak = self.medial + 0.4 * self.width
        diaphragm = self.base - self.dome * np.clip(1.0 - ((x - peak) / (0.6 * self.width)) ** 2, 0.0, 1.0)
        return ramp(x - medial, edge) * ramp(lateral - x, edge) * ramp(diaphragm - v, edge) * ramp(v - apex, edge)


@dataclass
class Canvas:
    """One image under construction, in chest coordinates (u right, v down, ~[-0.5, 0.5]).

    u < 0 is the image's left half, which holds the patient's right lung (radiological
    convention). ``density`` is brightness before exposure and noise; painters add to it.
    """

    u: np.ndarray
    v: np.ndarray
    size: int
    density: np.ndarray
    right: LungShape
    left: LungShape
    right_lung: np.ndarray  # soft masks, 1 inside
    left_lung: np.ndarray
    heart: np.ndarray
    heart_shape: tuple[float, float, float, float]  # centre u, centre v, half-axes u, v
    lung_air: float  # how much darker aerated lung is than soft tissue
    air: np.ndarray  # share of each pixel that is still aerated, visible lung

    @property
    def lungs(self) -> np.ndarray:
        return np.maximum(self.right_lung, self.left_lung)

    @property
    def visible_lungs(self) -> np.ndarray:
        """Lung fields minus the part hidden behind the heart."""
        return self.lungs * (1.0 - self.heart)

    def fill(self, amount: np.ndarray) -> None:
        """Replace up to ``amount`` (per pixel, 0..1) of the remaining aerated lung by
        soft tissue, so overlapping opacities never get brighter than solid tissue."""
        taken = np.minimum(np.clip(amount, 0.0, 1.0), self.air)
        self.air -= taken
        self.density += self.lung_air * taken


@dataclass(frozen=True)
class Anatomy:
    """A patient's body: constant over follow-ups."""

    chest_scale: float
    lung_width: float
    lung_height: float
    heart_scale: float
    heart_shift: float
    lung_air: float
    rib_phase: float
    rib_frequency: float
    contrast: float


def patient_anatomy(seed: int, patient_id: int) -> Anatomy:
    """The anatomy of one patient, drawn from ``(seed, patient_id)``."""
    rng = np.random.default_rng([seed, _STREAM_PATIENT, patient_id])
    return Anatomy(
        chest_scale=float(rng.uniform(0.94, 1.05)),
        lung_width=float(rng.uniform(0.93, 1.06)),
        lung_height=float(rng.uniform(0.93, 1.05)),
        heart_scale=float(rng.normal(1.0, 0.07)),
        heart_shift=float(rng.normal(0.0, 0.01)),
        lung_air=float(rng.uniform(0.27, 0.34)),
        rib_phase=float(rng.uniform(0, 2 * np.pi)),
        rib_frequency=float(rng.uniform(7.0, 8.5)),
        contrast=float(rng.uniform(0.85, 1.15)),
    )


def _chest_coordinates(size: int, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid shifted, rotated and scaled by a random per-image pose."""
    x, y = _pixel_grid(size)
    dx, dy = rng.normal(0.0, 0.025, size=2)
    angle = rng.normal(0.0, 0.03)
    scale = scale * rng.uniform(0.97, 1.03)
    c, s = np.float32(np.cos(angle) / scale), np.float32(np.sin(angle) / scale)
    x = x - np.float32(dx)
    y = y - np.float32(dy)
    return c * x + s * y, -s * x + c * y


def _bones(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spine, clavicles, ribs) brightness maps in [0, 1]."""
    au = np.abs(u)
    spine = ramp(0.028 - au, 0.012) * (0.85 + 0.15 * np.cos(v * np.float32(2 * np.pi * 13)))
    clavicle_line = v - (-0.36 - 0.16 * au)
    clavicles = gaussian(clavicle_line / 0.014) * ramp(0.33 - au, 0.03) * ramp(au - 0.03, 0.02)
    arc = v - 0.5 * au + 1.5 * au * au
    ribs = (0.5 + 0.5 * np.cos(arc * np.float32(2 * np.pi * anatomy.rib_frequency) + anatomy.rib_phase)) ** 6
    return spine, clavicles, ribs


def draw_anatomy(size: int, anatomy: Anatomy, view: str, rng: np.random.Generator) -> Canvas:
    """A normal chest: body, lung fields, mediastinum, heart, spine, clavicles, ribs."""
    u, v = _chest_coordinates(size, rng, anatomy.chest_scale)
    w, h = anatomy.lung_width, anatomy.lung_height
    right = LungShape(-1, 0.05, 0.30 * w, -0.38 * h, 0.26 * h, 0.07)
    left = LungShape(+1, 0.055, 0.285 * w, -0.37 * h, 0.28 * h, 0.06)
    right_lung, left_lung = right.mask(u, v), left.mask(u, v)
    lungs = np.maximum(right_lung, left_lung)

    magnification = 1.07 if view == "AP" else 1.0  # AP films enlarge the heart a little
    hs = anatomy.heart_scale * magnification
    heart_shape = (0.035 + anatomy.heart_shift, 0.15 * h, 0.145 * hs, 0.12 * hs)
    heart = soft_inside(ellipse_radius(u, v, *heart_shape), 0.12)

    body_half_width = 0.17 + 0.29 * ramp(v + 0.43, 0.14)
    body = ramp(body_half_width - np.abs(u), 0.05)
    abdomen = ramp(v - 0.2 * h, 0.12)
    mediastinum = ramp(0.065 - np.abs(u - 0.005), 0.03) + 0.6 * soft_inside(ellipse_radius(u, v, 0.07, -0.17, 0.035, 0.035), 0.3)
    spine, clavicles, ribs = _bones(u, v, anatomy)

    density = (
        0.04
        + 0.52 * body
        + 0.06 * abdomen * body
        + 0.06 * np.clip(mediastinum, 0.0, 1.0)
        + 0.08 * spine
        + 0.1 * clavicles
        + 0.07 * ribs * lungs
        - anatomy.lung_air * lungs * (1.0 - heart)
    ).astype(np.float32)
    air = (lungs * (1.0 - heart)).astype(np.float32)
    return Canvas(u, v, size, density, right, left, right_lung, left_lung, heart, heart_shape, anatomy.lung_air, air)


Footprint = Optional[np.ndarray]  # [size, size] float weights, 1 on the lesion; None: diffuse, no box


# ---- one painter per finding: paint(canvas, rng) adds the pattern to canvas.density and returns its
# footprint (None for diffuse patterns). Each return line recomputes the footprint from the painted
# expression without reordering that expression's arithmetic, so the pixels stay bit for bit the same. ----

def paint_atelectasis(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Band of collapse across the upper right lung: a tilted opaque stripe."""
    cu, cv = c.right.centre
    level = cv - 0.5 * c.right.half_height + rng.normal(0, 0.025)
    slope = rng.uniform(-0.3, 0.3)
    thickness = rng.uniform(0.035, 0.05)
    band = gaussian((c.v - level - slope * (c.u - cu)) / thickness)
    c.fill(rng.uniform(0.25, 0.75) * band * c.right_lung)
    return band * c.right_lung


def paint_consolidation(c: Canvas, rng: np.random.Generator) -> None:
    """Dense patch in the left mid lung with an irregular edge."""
    cu, cv = c.left.centre
    centre = (cu + rng.normal(0, 0.02), cv + rng.normal(0, 0.03))
    radius = rng.uniform(0.065, 0.085)
    wobble = 0.25 * smooth_field(rng, c.size, 8)
    patch = soft_inside(ellipse_radius(c.u, c.v, *centre, radius, radius * 1.25) + wobble, 0.3)
    c.fill(rng.uniform(0.35, 0.9) * patch * c.left_lung)


def paint_infiltration(c: Canvas, rng: np.random.Generator) -> None:
    """Diffuse speckle over both lungs: patchy, blotchy opacities (subtle)."""
    blotches = np.clip(smooth_field(rng, c.size, 18), 0.0, None)
    c.density += rng.uniform(0.04, 0.14) * blotches * c.visible_lungs


def paint_pneumothorax(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dark rim along the left lateral wall: collapsed lung edge plus a pleural line."""
    gap = rng.uniform(0.03, 0.07)
    collapsed = c.left.mask(c.u, c.v, inset=gap, edge=0.012)
    rim = c.left_lung * (1.0 - collapsed)
    pleural_line = 4.0 * collapsed * (1.0 - collapsed)
    c.density += -rng.uniform(0.05, 0.14) * rim + rng.uniform(0.03, 0.08) * pleural_line
    return rim


def paint_edema(c: Canvas, rng: np.random.Generator) -> None:
    """Bright haze around the hila on both sides ("bat wings"); subtle."""
    spread = rng.uniform(0.075, 0.095)
    haze = sum(
        gaussian(ellipse_radius(c.u, c.v, side * 0.12 + rng.normal(0, 0.01), -0.03 + rng.normal(0, 0.015), spread, spread * 1.3))
        for side in (-1, 1)
    )
    c.density += rng.uniform(0.04, 0.13) * haze * c.visible_lungs


def paint_emphysema(c: Canvas, rng: np.random.Generator) -> None:
    """Dark, hyperlucent upper zones of both lungs."""
    level = rng.normal(-0.08, 0.02)
    upper = ramp(level - c.v, 0.12)
    c.density -= rng.uniform(0.04, 0.12) * upper * c.lungs


def paint_fibrosis(c: Canvas, rng: np.random.Generator) -> None:
    """Fine reticular lines in the lower left lung (subtle)."""
    _, cv = c.left.centre
    frequency = np.float32(2 * np.pi * rng.uniform(22, 28))
    angle = rng.uniform(0, np.pi / 2)
    a, b = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    net = np.maximum(np.cos((a * c.u + b * c.v) * frequency), np.cos((b * c.u - a * c.v) * frequency))
    lower = ramp(c.v - cv - 0.05 + rng.normal(0, 0.02), 0.1)
    c.density += rng.uniform(0.04, 0.12) * (0.5 + 0.5 * net) ** 2 * lower * c.left_lung * (1.0 - c.heart)


def paint_effusion(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bright right lung base: fluid with a meniscus rising towards the lateral wall."""
    cu, cv = c.right.centre
    level = cv + c.right.half_height * rng.uniform(0.4, 0.8)
    lateral = np.clip(cu - c.u, 0.0, None)
    meniscus = level - 2.0 * lateral * lateral
    fluid = ramp(c.v - meniscus, 0.02)
    c.fill(rng.uniform(0.85, 1.0) * fluid * c.right_lung)
    return fluid * c.right_lung


def paint_pneumonia(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bright fuzzy blob in the right lower lung with a mottled texture."""
    cu, cv = c.right.centre
    centre = (cu + 0.02 + rng.normal(0, 0.025), cv + 0.3 * c.right.half_height + rng.normal(0, 0.025))
    spread = rng.uniform(0.045, 0.06)
    blob = gaussian(ellipse_radius(c.u, c.v, *centre, spread, spread * 1.15))
    texture = 0.7 + 0.3 * smooth_field(rng, c.size, 16)
    c.fill(rng.uniform(0.3, 0.8) * blob * texture * c.right_lung)
    return blob * c.right_lung


def paint_pleural_thickening(c: Canvas, rng: np.random.Generator) -> None:
    """Bright cap along the apex of the right lung, hugging the lung's edge."""
    thickness = rng.uniform(0.02, 0.045)
    cap = c.right_lung * (1.0 - c.right.mask(c.u, c.v, inset=thickness, edge=0.015))
    upper = ramp(c.right.apex + 0.22 - c.v, 0.06)
    c.fill(rng.uniform(0.5, 0.9) * cap * upper)


def paint_cardiomegaly(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Enlarged central heart silhouette: the heart grows and hides more lung."""
    cu, cv, au, av = c.heart_shape
    factor = rng.uniform(1.15, 1.4)
    big = soft_inside(ellipse_radius(c.u, c.v, cu + 0.015, cv + 0.01, au * factor, av * factor * 0.95), 0.12)
    extra = np.clip(big - c.heart, 0.0, 1.0)
    c.fill(extra * c.lungs)
    return big


def lung_point(c: Canvas, rng: np.random.Generator) -> tuple[float, float]:
    """A random point well inside either lung field: across 30-75 % of its width from the
    medial edge, down 20-65 % of its height from the apex.

    Why anywhere: a lesion that always sits in one place can be recognised from any cell of
    a network's last feature map (each sees most of a small image), so its heatmap need not
    point at it; lesions that move make a network find them where they are.
    """
    lung = c.right if rng.random() < 0.5 else c.left
    u = lung.side * (lung.medial + lung.width * rng.uniform(0.3, 0.75))
    v = lung.apex + (lung.base - lung.apex) * rng.uniform(0.2, 0.65)
    return u, v


def paint_nodule(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Small bright spot anywhere in either lung."""
    centre = lung_point(c, rng)
    radius = rng.uniform(0.025, 0.04)
    spot = soft_inside(ellipse_radius(c.u, c.v, *centre, radius, radius), 0.4)
    c.density += rng.uniform(0.15, 0.3) * spot
    return spot


def paint_mass(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Large bright disc with a sharp, slightly lobulated edge anywhere in either lung."""
    centre = lung_point(c, rng)
    radius = rng.uniform(0.055, 0.085)
    lobes = 0.08 * smooth_field(rng, c.size, 6)
    disc = soft_inside(ellipse_radius(c.u, c.v, *centre, radius, radius) + lobes, 0.2)
    c.fill(rng.uniform(0.5, 1.0) * disc)
    c.density += 0.03 * disc
    return disc


def paint_hernia(c: Canvas, rng: np.random.Generator) -> None:
    """Round mass below the diaphragm in the midline, with a dark gas bubble inside."""
    _, cv, _, av = c.heart_shape
    centre = (rng.normal(0, 0.02), cv + av + rng.uniform(0.06, 0.09))
    radius = rng.uniform(0.05, 0.08)
    r = ellipse_radius(c.u, c.v, *centre, radius, radius * 0.9)
    gas = soft_inside(r / 0.7, 0.2) * ramp(centre[1] + 0.1 * radius - c.v, 0.02)
    c.density += 0.08 * soft_inside(r, 0.2) - rng.uniform(0.12, 0.35) * gas


PAINTERS: dict[str, Callable[[Canvas, np.random.Generator], Footprint]] = {
    "Atelectasis": paint_atelectasis,
    "Consolidation": paint_consolidation,
    "Infiltration": paint_infiltration,
    "Pneumothorax": paint_pneumothorax,
    "Edema": paint_edema,
    "Emphysema": paint_emphysema,
    "Fibrosis": paint_fibrosis,
    "Effusion": paint_effusion,
    "Pneumonia": paint_pneumonia,
    "Pleural_Thickening": paint_pleural_thickening,
    "Cardiomegaly": paint_cardiomegaly,
    "Nodule": paint_nodule,
    "Mass": paint_mass,
    "Hernia": paint_hernia,
}


def painter_for(name: str) -> Callable[[Canvas, np.random.Generator], Footprint]:
    """The painter of a finding named in findings.csv (an error names a missing one)."""
    try:
        return PAINTERS[name]
    except KeyError:
        raise ValueError(f"findings.csv lists {name!r} but the synthetic generator has no painter for it") from None


def _expose(density: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Exposure, low-frequency shading and grain; returns uint8 pixels."""
    size = density.shape[0]
    shading = 0.03 * smooth_field(rng, size, 5)
    grain = rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(0.02, 0.05))
    contrast = anatomy.contrast * rng.uniform(0.93, 1.07)
    brightness = rng.normal(0.0, 0.035)
    gamma = rng.uniform(0.85, 1.15)
    value = (density + shading - 0.35) * contrast + 0.35 + brightness + grain
    value = np.clip(value, 0.0, 1.0) ** np.float32(gamma)
    return (value * 255.0 + 0.5).astype(np.uint8)


Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the size x size image (x right, y down)
FOOTPRINT_LEVEL = 0.5


def lesion_box(footprint: Footprint) -> Box | None:
    """The smallest pixel rectangle (x, y, w, h) holding every pixel with footprint >= 1/2.

    Pixel column j covers [j, j + 1), so a footprint over columns j0..j1 gives x = j0,
    w = j1 - j0 + 1. None for no footprint or one nowhere >= 1/2.
    """
    if footprint is None:
        return None
    rows = np.flatnonzero((footprint >= FOOTPRINT_LEVEL).any(axis=1))
    cols = np.flatnonzero((footprint >= FOOTPRINT_LEVEL).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


@dataclass(frozen=True)
class Drawing:
    """One drawn image: ``pixels`` [size, size] uint8 and ``boxes`` {finding: Box} of its placed lesions."""

    pixels: np.ndarray
    boxes: dict[str, Box]


def draw_image(labels: Sequence[bool], size: int, seed: int, image_index: int,
               patient_id: int, view: str = "PA") -> Drawing:
    """Pixels ([size, size] uint8) of one image with the given findings (official order), and the
    boxes of its findings that have a place (:func:`lesion_box` of each painter's footprint).

    Deterministic in (seed, image_index, patient_id, labels, view, size): the pose,
    exposure and noise come from ``(seed, image_index)``, the anatomy from
    ``(seed, patient_id)`` and each finding's jitter from ``(seed, image_index, k)``.
    """
    rng = np.random.default_rng([seed, _STREAM_IMAGE, image_index])
    anatomy = patient_anatomy(seed, patient_id)
    canvas = draw_anatomy(size, anatomy, view, rng)
    boxes = {}
    for k, (finding, present) in enumerate(zip(FINDINGS, labels)):
        if present:
            footprint = painter_for(finding)(canvas, np.random.default_rng([seed, _STREAM_FINDING, image_index, k]))
            box = lesion_box(footprint)
            if box is not None:
                boxes[finding] = box
    return Drawing(_expose(canvas.density, anatomy, rng), boxes)


def render_image(labels: Sequence[bool], size: int, seed: int, image_index: int,
                 patient_id: int, view: str = "PA") -> np.ndarray:
    """The pixels of :func:`draw_image` alone."""
    return draw_image(labels, size, seed, image_index, patient_id, view).pixels
