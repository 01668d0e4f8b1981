"""A synthetic ChestX-ray14: the real on-disk layout, with drawn, learnable findings.

``generate(out_dir, n_patients)`` (or ``python -m cxrmem.data.synthetic --out DIR
--n-patients N --size PX --seed S``) writes::

    DIR/Data_Entry_2017.csv          2017 format: 11 named columns + trailing comma
    DIR/train_val_list.txt           patient-level split, one image name per line
    DIR/test_list.txt                (about 22.8% of the images, whole patients)
    DIR/images_001/images/*.png      8-bit grayscale PNGs, PX x PX, spread over
    DIR/images_002/images/*.png      at least two folders like the real download
    DIR/synthetic.json               the parameters and a summary (written last)

Every image is a chest-like picture (dark lung fields, bright mediastinum, spine,
heart and ribs, per-patient anatomy, per-image pose and exposure, noise) on which
each present finding paints its own pattern in its own region, following the
``synthetic_pattern`` column of ``findings.csv``. The patterns are large enough to
survive downscaling to 32-64 px, jittered in position, size and strength, and a
few of them are deliberately subtle.

Labels follow the real ChestX-ray14 prevalence from ``findings.csv``: an image is
abnormal with the real probability (1 - 60,361/112,120), an abnormal image gets a
"primary" finding plus independent further findings, with the two probabilities
solved so that every finding's marginal frequency equals the real one (Effusion
also raises the chance of Atelectasis and Edema, with marginals kept). Splits with
at least ``MIN_ABNORMAL_FOR_COVERAGE`` abnormal images get at least one positive of
every finding (added to an already abnormal image); smaller splits are left as
sampled, so tiny data sets may miss rare findings such as Hernia.

Everything is seeded: the metadata comes from one generator seeded with ``seed``;
each image from its own generator seeded with ``(seed, image index)`` and its
patient's anatomy from ``(seed, patient id)``, so the number of worker processes
never changes a single byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from cxrmem.errors import UserError
from cxrmem.io import atomic_path

# --------------------------------------------------------------------------- #
# Facts about the real data set (per-finding counts live in findings.csv).
# --------------------------------------------------------------------------- #
REAL_TOTAL_IMAGES = 112_120
REAL_NO_FINDING_IMAGES = 60_361
REAL_PATIENTS = 30_805
REAL_TEST_IMAGES = 25_596
REAL_MALE_SHARE = 0.565

NO_FINDING = "No Finding"
MEAN_IMAGES_PER_PATIENT = REAL_TOTAL_IMAGES / REAL_PATIENTS  # about 3.64
TEST_IMAGE_SHARE = REAL_TEST_IMAGES / REAL_TOTAL_IMAGES  # about 0.228
MAX_FOLLOW_UPS = 80
IMAGES_PER_FOLDER = 10_000
MIN_ABNORMAL_FOR_COVERAGE = 50  # abnormal images a split needs before rare findings are forced in

CSV_NAME = "Data_Entry_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
MARKER_NAME = "synthetic.json"
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
GENERATOR_VERSION = 1  # bump when drawing or sampling changes: old sets are then redrawn, never resumed
MIN_SIZE = 16

# Effusion makes these findings more likely (their marginal frequency is kept).
CORRELATION_DRIVER = "Effusion"
CORRELATION_BOOST = {"Atelectasis": 2.8, "Edema": 3.5}

ORIGINAL_SIZES = ((2500, 2048), (2048, 2500), (2992, 2991), (3056, 2544), (2544, 3056), (2021, 2021))
ORIGINAL_SIZE_WEIGHTS = (0.35, 0.25, 0.15, 0.1, 0.05, 0.1)
PIXEL_SPACINGS = ("0.143", "0.168", "0.139")
PIXEL_SPACING_WEIGHTS = (0.8, 0.1, 0.1)

# Stream tags keep the independent random streams apart.
_STREAM_METADATA, _STREAM_PATIENT, _STREAM_IMAGE, _STREAM_FINDING = 0, 1, 2, 3


# --------------------------------------------------------------------------- #
# The finding list, read from findings.csv.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Finding:
    """One row of findings.csv: name, real image count, pattern description."""

    name: str
    real_images: int
    pattern: str


@lru_cache(maxsize=None)
def load_findings() -> tuple[Finding, ...]:
    """The 14 findings in the official order, as listed in ``findings.csv``."""
    text = resources.files("cxrmem.data").joinpath("findings.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return tuple(Finding(r["finding"], int(r["images"]), r["synthetic_pattern"]) for r in rows)


def finding_names() -> tuple[str, ...]:
    """Finding names in the official order."""
    return tuple(f.name for f in load_findings())


def real_prevalence() -> dict[str, float]:
    """Share of real ChestX-ray14 images with each finding, plus "No Finding"."""
    shares = {f.name: f.real_images / REAL_TOTAL_IMAGES for f in load_findings()}
    shares[NO_FINDING] = REAL_NO_FINDING_IMAGES / REAL_TOTAL_IMAGES
    return shares


# --------------------------------------------------------------------------- #
# Labels.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LabelModel:
    """How label sets are drawn so that marginals match the real prevalence.

    An image is abnormal with ``p_abnormal``; an abnormal image gets finding k as
    its primary finding with ``primary[k]`` and, when k is not its primary, as a
    further finding with ``secondary[k]``; for k in ``boosted`` that chance is
    ``secondary_with_driver[k]`` / ``secondary_without_driver[k]`` depending on
    whether the driver finding (Effusion) is present.
    """

    p_abnormal: float
    primary: np.ndarray
    secondary: np.ndarray
    driver: int | None
    boosted: tuple[int, ...]
    secondary_with_driver: np.ndarray
    secondary_without_driver: np.ndarray


def _solve_secondary_scale(q: np.ndarray) -> float:
    """alpha in [0, 1) with sum_k q_k (1 - alpha) / (1 - alpha q_k) == 1 (bisection)."""
    if q.sum() < 1.0 or q.max() >= 1.0:
        raise ValueError("findings.csv counts cannot give one finding per abnormal image")

    def primary_total(alpha: float) -> float:
        return float(np.sum(q * (1 - alpha) / (1 - alpha * q)))

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if primary_total(mid) > 1.0 else (low, mid)
    return (low + high) / 2


@lru_cache(maxsize=None)
def label_model() -> LabelModel:
    """The label model fitted to the real counts in ``findings.csv``."""
    names = finding_names()
    p_abnormal = 1.0 - REAL_NO_FINDING_IMAGES / REAL_TOTAL_IMAGES
    q = np.array([f.real_images for f in load_findings()], dtype=np.float64)
    q = q / (REAL_TOTAL_IMAGES - REAL_NO_FINDING_IMAGES)  # P(finding | abnormal)
    alpha = _solve_secondary_scale(q)
    secondary = alpha * q
    primary = (q - secondary) / (1 - secondary)
    primary = primary / primary.sum()

    driver = names.index(CORRELATION_DRIVER) if CORRELATION_DRIVER in names else None
    boosted = tuple(names.index(n) for n in CORRELATION_BOOST if n in names and driver is not None)
    with_driver = secondary.copy()
    without_driver = secondary.copy()
    for k in boosted:
        # P(driver present | k is not the primary finding)
        driver_share = (primary[driver] + (1 - primary[driver] - primary[k]) * secondary[driver]) / (1 - primary[k])
        high = min(0.95, CORRELATION_BOOST[names[k]] * secondary[k])
        low = (secondary[k] - driver_share * high) / (1 - driver_share)
        if low < 0:  # boost too strong for this finding: give the driver all of it
            high, low = secondary[k] / driver_share, 0.0
        with_driver[k], without_driver[k] = high, low
    return LabelModel(p_abnormal, primary, secondary, driver, boosted, with_driver, without_driver)


def sample_label_matrix(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n_images`` label sets: a bool array [n_images, 14] in the official order.

    A row of all False is "No Finding"; every other row has at least one finding.
    The expected share of each column equals the real prevalence.
    """
    model = label_model()
    n_findings = len(model.primary)
    abnormal = rng.random(n_images) < model.p_abnormal
    primary = rng.choice(n_findings, size=n_images, p=model.primary)
    labels = rng.random((n_images, n_findings)) < model.secondary
    if model.driver is not None and model.boosted:
        has_driver = labels[:, model.driver] | (primary == model.driver)
        draws = rng.random((n_images, len(model.boosted)))
        for column, k in enumerate(model.boosted):
            chance = np.where(has_driver, model.secondary_with_driver[k], model.secondary_without_driver[k])
            labels[:, k] = draws[:, column] < chance
    labels[np.arange(n_images), primary] = True
    labels[~abnormal] = False
    return labels


def ensure_findings_covered(
    labels: np.ndarray, groups: Iterable[np.ndarray], rng: np.random.Generator,
    min_abnormal: int = MIN_ABNORMAL_FOR_COVERAGE,
) -> np.ndarray:
    """Give every finding at least one positive in each group that is big enough.

    ``groups`` are boolean image masks (e.g. train_val and test). In a group with at
    least ``min_abnormal`` abnormal images, each finding without a positive is added
    to a different, randomly chosen, already abnormal image of that group, so the
    "No Finding" share does not change. Smaller groups are left alone. Returns a
    new array.
    """
    labels = labels.copy()
    for group in groups:
        abnormal_rows = np.flatnonzero(group & labels.any(axis=1))
        if len(abnormal_rows) < min_abnormal:
            continue
        missing = np.flatnonzero(~labels[group].any(axis=0))
        chosen = rng.permutation(abnormal_rows)[: len(missing)]
        labels[chosen, missing] = True
    return labels


def label_string(row: Sequence[bool], names: Sequence[str] | None = None) -> str:
    """"A|B" in the official order, or "No Finding" when no finding is present."""
    names = names or finding_names()
    present = [name for name, flag in zip(names, row) if flag]
    return "|".join(present) if present else NO_FINDING


# --------------------------------------------------------------------------- #
# Metadata: patients, follow-ups, split, CSV rows.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class DatasetPlan:
    """Everything about the data set except the pixels (one entry per image)."""

    image_names: list[str]
    folders: list[str]  # "images_001" ... per image
    patient_ids: np.ndarray
    follow_ups: np.ndarray
    ages: np.ndarray
    genders: list[str]
    views: list[str]
    original_sizes: list[tuple[int, int]]
    pixel_spacings: list[str]
    labels: np.ndarray  # bool [n_images, 14]
    in_test: np.ndarray  # bool per image

    @property
    def n_images(self) -> int:
        return len(self.image_names)

    def relative_path(self, i: int) -> str:
        return f"{self.folders[i]}/images/{self.image_names[i]}"


def sample_follow_up_counts(n_patients: int, rng: np.random.Generator) -> np.ndarray:
    """Images per patient: geometric (at least 1) with the real mean of about 3.64."""
    counts = rng.geometric(1.0 / MEAN_IMAGES_PER_PATIENT, size=n_patients)
    return np.minimum(counts, MAX_FOLLOW_UPS)


def split_patients(images_per_patient: np.ndarray, rng: np.random.Generator,
                   test_share: float = TEST_IMAGE_SHARE) -> np.ndarray:
    """Bool per patient: True for test. Whole patients, about ``test_share`` of images.

    Patients are visited in random order and put in test while they fit under the
    target image count; with two or more patients both sides are non-empty.
    """
    n_patients = len(images_per_patient)
    target = test_share * images_per_patient.sum()
    in_test = np.zeros(n_patients, dtype=bool)
    filled = 0
    for p in rng.permutation(n_patients):
        if filled + images_per_patient[p] <= target:
            in_test[p] = True
            filled += images_per_patient[p]
    if n_patients >= 2 and not in_test.any():
        in_test[int(np.argmin(images_per_patient))] = True
    if n_patients >= 2 and in_test.all():
        in_test[int(np.argmax(images_per_patient))] = False
    return in_test


def folder_names(n_images: int) -> list[str]:
    """Folder of each image: up to 10,000 per folder, at least two folders when n >= 2."""
    n_folders = min(max(2, math.ceil(n_images / IMAGES_PER_FOLDER)), max(n_images, 1))
    per_folder = math.ceil(n_images / n_folders)
    return [f"images_{i // per_folder + 1:03d}" for i in range(n_images)]


def _sample_ages(images_per_patient: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Age per image: a patient's first age, growing slowly over the follow-ups."""
    first = np.clip(np.rint(rng.normal(47.0, 16.5, size=len(images_per_patient))), 1, 90)
    ages = []
    for start, count in zip(first, images_per_patient):
        years = np.floor(np.cumsum(rng.exponential(0.35, size=count)) - rng.exponential(0.35))
        ages.append(np.clip(start + np.maximum(years, 0), 1, 95))
    return np.concatenate(ages).astype(int)


def plan_dataset(n_patients: int, seed: int) -> DatasetPlan:
    """Draw patients, follow-ups, metadata, split and labels (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, _STREAM_METADATA])
    per_patient = sample_follow_up_counts(n_patients, rng)
    patient_ids = np.repeat(np.arange(1, n_patients + 1), per_patient)
    follow_ups = np.concatenate([np.arange(c) for c in per_patient])
    n_images = len(patient_ids)

    patient_in_test = split_patients(per_patient, rng)
    in_test = patient_in_test[patient_ids - 1]
    ages = _sample_ages(per_patient, rng)
    male = rng.random(n_patients) < REAL_MALE_SHARE
    genders = ["M" if male[p - 1] else "F" for p in patient_ids]
    ap_chance = np.where(follow_ups == 0, 0.25, 0.46)
    views = ["AP" if ap else "PA" for ap in rng.random(n_images) < ap_chance]
    size_index = rng.choice(len(ORIGINAL_SIZES), size=n_images, p=ORIGINAL_SIZE_WEIGHTS)
    spacing_index = rng.choice(len(PIXEL_SPACINGS), size=n_images, p=PIXEL_SPACING_WEIGHTS)

    labels = sample_label_matrix(n_images, rng)
    labels = ensure_findings_covered(labels, [~in_test, in_test], rng)
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patient_ids, follow_ups)]
    return DatasetPlan(
        image_names=names,
        folders=folder_names(n_images),
        patient_ids=patient_ids,
        follow_ups=follow_ups,
        ages=ages,
        genders=genders,
        views=views,
        original_sizes=[ORIGINAL_SIZES[i] for i in size_index],
        pixel_spacings=[PIXEL_SPACINGS[i] for i in spacing_index],
        labels=labels,
        in_test=in_test,
    )


def data_entry_text(plan: DatasetPlan) -> str:
    """The CSV in the 2017 format: split header cells and a trailing comma per row."""
    names = finding_names()
    lines = [CSV_HEADER]
    for i in range(plan.n_images):
        width, height = plan.original_sizes[i]
        spacing = plan.pixel_spacings[i]
        lines.append(
            f"{plan.image_names[i]},{label_string(plan.labels[i], names)},{plan.follow_ups[i]},"
            f"{plan.patient_ids[i]},{plan.ages[i]},{plan.genders[i]},{plan.views[i]},"
            f"{width},{height},{spacing},{spacing},"
        )
    return "\n".join(lines) + "\n"


def split_list_texts(plan: DatasetPlan) -> tuple[str, str]:
    """(train_val_list.txt, test_list.txt) contents: sorted image names, one a line."""
    def as_text(selected: np.ndarray) -> str:
        chosen = sorted(n for n, keep in zip(plan.image_names, selected) if keep)
        return "".join(f"{n}\n" for n in chosen)

    return as_text(~plan.in_test), as_text(plan.in_test)


# --------------------------------------------------------------------------- #
# Drawing: coordinate grids, anatomy, findings.
# --------------------------------------------------------------------------- #
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


# ---- one painter per finding: paint(canvas, rng) adds the pattern to canvas.density ----

def paint_atelectasis(c: Canvas, rng: np.random.Generator) -> None:
    """Band of collapse across the upper right lung: a tilted opaque stripe."""
    cu, cv = c.right.centre
    level = cv - 0.5 * c.right.half_height + rng.normal(0, 0.025)
    slope = rng.uniform(-0.3, 0.3)
    thickness = rng.uniform(0.035, 0.05)
    band = gaussian((c.v - level - slope * (c.u - cu)) / thickness)
    c.fill(rng.uniform(0.25, 0.75) * band * c.right_lung)


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


def paint_pneumothorax(c: Canvas, rng: np.random.Generator) -> None:
    """Dark rim along the left lateral wall: collapsed lung edge plus a pleural line."""
    gap = rng.uniform(0.03, 0.07)
    collapsed = c.left.mask(c.u, c.v, inset=gap, edge=0.012)
    rim = c.left_lung * (1.0 - collapsed)
    pleural_line = 4.0 * collapsed * (1.0 - collapsed)
    c.density += -rng.uniform(0.05, 0.14) * rim + rng.uniform(0.03, 0.08) * pleural_line


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


def paint_effusion(c: Canvas, rng: np.random.Generator) -> None:
    """Bright right lung base: fluid with a meniscus rising towards the lateral wall."""
    cu, cv = c.right.centre
    level = cv + c.right.half_height * rng.uniform(0.4, 0.8)
    lateral = np.clip(cu - c.u, 0.0, None)
    meniscus = level - 2.0 * lateral * lateral
    fluid = ramp(c.v - meniscus, 0.02)
    c.fill(rng.uniform(0.85, 1.0) * fluid * c.right_lung)


def paint_pneumonia(c: Canvas, rng: np.random.Generator) -> None:
    """Bright fuzzy blob in the right lower lung with a mottled texture."""
    cu, cv = c.right.centre
    centre = (cu + 0.02 + rng.normal(0, 0.025), cv + 0.3 * c.right.half_height + rng.normal(0, 0.025))
    spread = rng.uniform(0.045, 0.06)
    blob = gaussian(ellipse_radius(c.u, c.v, *centre, spread, spread * 1.15))
    texture = 0.7 + 0.3 * smooth_field(rng, c.size, 16)
    c.fill(rng.uniform(0.3, 0.8) * blob * texture * c.right_lung)


def paint_pleural_thickening(c: Canvas, rng: np.random.Generator) -> None:
    """Bright cap along the apex of the right lung, hugging the lung's edge."""
    thickness = rng.uniform(0.02, 0.045)
    cap = c.right_lung * (1.0 - c.right.mask(c.u, c.v, inset=thickness, edge=0.015))
    upper = ramp(c.right.apex + 0.22 - c.v, 0.06)
    c.fill(rng.uniform(0.5, 0.9) * cap * upper)


def paint_cardiomegaly(c: Canvas, rng: np.random.Generator) -> None:
    """Enlarged central heart silhouette: the heart grows and hides more lung."""
    cu, cv, au, av = c.heart_shape
    factor = rng.uniform(1.15, 1.4)
    big = soft_inside(ellipse_radius(c.u, c.v, cu + 0.015, cv + 0.01, au * factor, av * factor * 0.95), 0.12)
    extra = np.clip(big - c.heart, 0.0, 1.0)
    c.fill(extra * c.lungs)


def paint_nodule(c: Canvas, rng: np.random.Generator) -> None:
    """Small bright spot in the left upper lung."""
    cu, cv = c.left.centre
    centre = (cu + rng.normal(0, 0.035), cv - 0.45 * c.left.half_height + rng.normal(0, 0.04))
    radius = rng.uniform(0.022, 0.036)
    spot = soft_inside(ellipse_radius(c.u, c.v, *centre, radius, radius), 0.4)
    c.density += rng.uniform(0.08, 0.25) * spot


def paint_mass(c: Canvas, rng: np.random.Generator) -> None:
    """Large bright disc with a sharp, slightly lobulated edge in the right upper lung."""
    cu, cv = c.right.centre
    centre = (cu - 0.02 + rng.normal(0, 0.02), cv - 0.05 + rng.normal(0, 0.025))
    radius = rng.uniform(0.055, 0.085)
    lobes = 0.08 * smooth_field(rng, c.size, 6)
    disc = soft_inside(ellipse_radius(c.u, c.v, *centre, radius, radius) + lobes, 0.2)
    c.fill(rng.uniform(0.5, 1.0) * disc)
    c.density += 0.03 * disc


def paint_hernia(c: Canvas, rng: np.random.Generator) -> None:
    """Round mass below the diaphragm in the midline, with a dark gas bubble inside."""
    _, cv, _, av = c.heart_shape
    centre = (rng.normal(0, 0.02), cv + av + rng.uniform(0.06, 0.09))
    radius = rng.uniform(0.05, 0.08)
    r = ellipse_radius(c.u, c.v, *centre, radius, radius * 0.9)
    gas = soft_inside(r / 0.7, 0.2) * ramp(centre[1] + 0.1 * radius - c.v, 0.02)
    c.density += 0.08 * soft_inside(r, 0.2) - rng.uniform(0.12, 0.35) * gas


PAINTERS: dict[str, Callable[[Canvas, np.random.Generator], None]] = {
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


def painter_for(name: str) -> Callable[[Canvas, np.random.Generator], None]:
    """The painter of a finding named in findings.csv (an error names a missing one)."""
    try:
        return PAINTERS[name]
    except KeyError:
        raise ValueError(f"findings.csv lists {name!r} but synthetic.py has no painter for it") from None


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


def render_image(labels: Sequence[bool], size: int, seed: int, image_index: int,
                 patient_id: int, view: str = "PA") -> np.ndarray:
    """Pixels ([size, size] uint8) of one image with the given findings (official order).

    Deterministic in (seed, image_index, patient_id, labels, view, size): the pose,
    exposure and noise come from ``(seed, image_index)``, the anatomy from
    ``(seed, patient_id)`` and each finding's jitter from ``(seed, image_index, k)``.
    """
    rng = np.random.default_rng([seed, _STREAM_IMAGE, image_index])
    anatomy = patient_anatomy(seed, patient_id)
    canvas = draw_anatomy(size, anatomy, view, rng)
    for k, (finding, present) in enumerate(zip(finding_names(), labels)):
        if present:
            painter_for(finding)(canvas, np.random.default_rng([seed, _STREAM_FINDING, image_index, k]))
    return _expose(canvas.density, anatomy, rng)


# --------------------------------------------------------------------------- #
# Writing files.
# --------------------------------------------------------------------------- #
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path, durable=False) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_png_atomic(path: Path, pixels: np.ndarray) -> None:
    """Save 8-bit grayscale pixels as a PNG (fast compression), atomically."""
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)


def _render_job(job: tuple) -> None:
    """Worker entry point: render one image and write it (skipping it when allowed)."""
    path, labels, size, seed, image_index, patient_id, view, keep_existing = job
    path = Path(path)
    if keep_existing and path.exists():
        return
    write_png_atomic(path, render_image(labels, size, seed, image_index, patient_id, view))


def _render_all(jobs: list[tuple], workers: int) -> None:
    """Run the jobs in-process (one worker or few jobs) or over a process pool."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1 or len(jobs) < 4 * workers:
        for job in jobs:
            _render_job(job)
        return
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_job, jobs, chunksize=chunk):
            pass


# --------------------------------------------------------------------------- #
# The marker file: parameters, completeness, summary.
# --------------------------------------------------------------------------- #
def _parameters(n_patients: int, size: int, seed: int) -> dict:
    return {"generator": "cxrmem.data.synthetic", "version": GENERATOR_VERSION,
            "n_patients": n_patients, "size": size, "seed": seed}


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_marker(out: Path, params: dict, complete: bool, summary: dict | None = None) -> None:
    record = {"params": params, "complete": complete, "summary": summary}
    write_text_atomic(out / MARKER_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _listed_images(out: Path) -> list[str] | None:
    """Relative image paths named by an existing synthetic data set (None if unreadable)."""
    try:
        with open(out / CSV_NAME, encoding="utf-8") as handle:
            names = [line.split(",", 1)[0] for line in handle.read().splitlines()[1:] if line]
    except OSError:
        return None
    folders = folder_names(len(names))
    return [f"{folder}/images/{name}" for folder, name in zip(folders, names)]


def _is_complete(out: Path, marker: dict | None, params: dict) -> bool:
    """True when ``out`` holds a finished data set generated with ``params``."""
    if not marker or marker.get("params") != params or not marker.get("complete"):
        return False
    if not all((out / name).is_file() for name in (CSV_NAME, TRAIN_VAL_LIST, TEST_LIST)):
        return False
    listed = _listed_images(out)
    return listed is not None and all((out / rel).is_file() for rel in listed)


def _remove_leftovers(out: Path, keep: set[str]) -> None:
    """Delete temporary files and PNGs of an earlier synthetic set not in ``keep``."""
    for folder in out.glob("images_[0-9][0-9][0-9]/images"):
        for entry in folder.iterdir():
            rel = f"{folder.parent.name}/images/{entry.name}"
            stale_png = entry.suffix == ".png" and rel not in keep
            if entry.is_file() and (entry.name.endswith(".tmp") or stale_png):
                entry.unlink()
        try:  # drop folders the new set no longer uses
            folder.rmdir()
            folder.parent.rmdir()
        except OSError:
            pass


def _holds_foreign_data(out: Path) -> bool:
    """True when ``out`` has a data set CSV or PNG images but no marker of ours.

    (A run of this generator writes its marker before any image, so even a killed
    run leaves one.)
    """
    if (out / CSV_NAME).exists():
        return True
    return any(True for _ in out.glob("images*/**/*.png"))


def _summarise(plan: DatasetPlan, out: Path, seconds: float, skipped: bool) -> dict:
    names = finding_names()
    share = plan.labels.mean(axis=0) if plan.n_images else np.zeros(len(names))
    no_finding = float((~plan.labels.any(axis=1)).mean()) if plan.n_images else 0.0
    test_patients = len(set(plan.patient_ids[plan.in_test].tolist()))
    return {
        "out_dir": str(out),
        "n_images": plan.n_images,
        "n_patients": int(len(set(plan.patient_ids.tolist()))),
        "n_train_val_images": int((~plan.in_test).sum()),
        "n_test_images": int(plan.in_test.sum()),
        "n_test_patients": test_patients,
        "n_folders": len(set(plan.folders)),
        "no_finding_share": no_finding,
        "prevalence": {name: float(p) for name, p in zip(names, share)},
        "positives": {name: int(n) for name, n in zip(names, plan.labels.sum(axis=0))},
        "seconds": round(seconds, 3),
        "skipped": skipped,
    }


def format_summary(summary: dict) -> str:
    """The one-line report printed by the command line."""
    verb = "already present" if summary["skipped"] else f"{summary['seconds']:.1f} s"
    return (f"synthetic ChestX-ray14: {summary['n_images']} images, {summary['n_patients']} patients "
            f"({summary['n_test_images']} test images), {verb}, "
            f"No Finding {100 * summary['no_finding_share']:.1f}% -> {summary['out_dir']}")


# --------------------------------------------------------------------------- #
# Public entry points.
# --------------------------------------------------------------------------- #
def _validate(n_patients: int, size: int, seed: int, workers: int | None) -> None:
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise UserError(f"n_patients must be an integer >= 1 (got {n_patients!r}); pass e.g. --n-patients 100")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"size must be an integer >= {MIN_SIZE} pixels (got {size!r}); pass e.g. --size 64")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be an integer >= 0 (got {seed!r})")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise UserError(f"workers must be an integer >= 1 (got {workers!r}); leave it out to use every core")


def generate(out_dir: str | os.PathLike, n_patients: int, size: int = 256, seed: int = 0,
             workers: int | None = None) -> dict:
    """Write a synthetic ChestX-ray14 into ``out_dir`` and return a summary dict.

    The summary has n_images, n_patients, n_train_val_images, n_test_images,
    n_test_patients, n_folders, no_finding_share, prevalence {finding: share},
    positives {finding: count}, seconds, skipped and out_dir.

    Same arguments give byte-identical CSV and lists and identical images, whatever
    ``workers`` (default: every core). If ``out_dir`` already holds a complete set
    made with the same parameters, nothing is written (``skipped`` is True); a run
    with the same parameters that was killed is resumed. Every file is written
    atomically. Raises UserError for bad arguments or when ``out_dir`` holds a
    ChestX-ray14 CSV this generator did not write.
    """
    _validate(n_patients, size, seed, workers)
    n_patients, size, seed = int(n_patients), int(size), int(seed)
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the synthetic data set")
    params = _parameters(n_patients, size, seed)
    marker = _read_marker(out)
    plan = plan_dataset(n_patients, seed)
    if _is_complete(out, marker, params):
        return _summarise(plan, out, time.perf_counter() - started, skipped=True)
    if marker is None and _holds_foreign_data(out):
        raise UserError(f"{out} already holds ChestX-ray14 files not written by this generator; "
                        "choose an empty --out directory")

    out.mkdir(parents=True, exist_ok=True)
    same_parameters = marker is not None and marker.get("params") == params
    relative_paths = [plan.relative_path(i) for i in range(plan.n_images)]
    _remove_leftovers(out, keep=set(relative_paths) if same_parameters else set())
    _write_marker(out, params, complete=False)
    for folder in sorted(set(plan.folders)):
        (out / folder / "images").mkdir(parents=True, exist_ok=True)

    jobs = [
        (str(out / relative_paths[i]), tuple(bool(x) for x in plan.labels[i]), size, seed, i,
         int(plan.patient_ids[i]), plan.views[i], same_parameters)
        for i in range(plan.n_images)
    ]
    _render_all(jobs, workers or os.cpu_count() or 1)

    train_val_text, test_text = split_list_texts(plan)
    write_text_atomic(out / TRAIN_VAL_LIST, train_val_text)
    write_text_atomic(out / TEST_LIST, test_text)
    write_text_atomic(out / CSV_NAME, data_entry_text(plan))
    summary = _summarise(plan, out, time.perf_counter() - started, skipped=False)
    _write_marker(out, params, complete=True, summary={k: v for k, v in summary.items() if k != "skipped"})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrmem-synthetic",
        description="Write a synthetic data set in ChestX-ray14's exact on-disk layout.")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--n-patients", type=int, default=100,
                        help="number of patients (about 3.6 images each; default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes drawing images (default: every core)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate the data set, print a one-line summary, return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = generate(args.out, args.n_patients, size=args.size, seed=args.seed, workers=args.workers)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
