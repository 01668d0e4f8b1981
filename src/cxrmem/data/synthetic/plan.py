"""Everything about a synthetic data set except the pixels: patients, follow-ups, metadata, split, labels.

Drawn from one generator seeded with ``(seed, 0)``, so the same seed gives the same plan.
The test split holds whole patients, about the real share of test images (25,596 of
112,120), drawn by :func:`cxrmem.data.split.hold_out` like every patient-level split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..split import hold_out
from .labels import REAL_TOTAL_IMAGES, ensure_findings_covered, sample_label_matrix

REAL_PATIENTS = 30_805
REAL_TEST_IMAGES = 25_596
REAL_MALE_SHARE = 0.565
MEAN_IMAGES_PER_PATIENT = REAL_TOTAL_IMAGES / REAL_PATIENTS  # about 3.64
TEST_IMAGE_SHARE = REAL_TEST_IMAGES / REAL_TOTAL_IMAGES  # about 0.228
MAX_FOLLOW_UPS = 80
IMAGES_PER_FOLDER = 10_000

ORIGINAL_SIZES = ((2500, 2048), (2048, 2500), (2992, 2991), (3056, 2544), (2544, 3056), (2021, 2021))
ORIGINAL_SIZE_WEIGHTS = (0.35, 0.25, 0.15, 0.1, 0.05, 0.1)
PIXEL_SPACINGS = ("0.143", "0.168", "0.139")
PIXEL_SPACING_WEIGHTS = (0.8, 0.1, 0.1)

_STREAM_METADATA = 0  # the drawing uses 1, 2 and 3 (patients, images, findings)


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

    patient_in_test = hold_out(per_patient, TEST_IMAGE_SHARE * per_patient.sum(), rng)
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

