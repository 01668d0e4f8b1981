"""Synthetic sites: small data sets in the on-disk format of CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR and
the NIH-Google labels, drawn by the same painters as the synthetic ChestX-ray14.

``generate_site(dataset, out_dir, n_patients, size, seed)`` (or ``cxrmem synthetic --dataset D``)
writes the publisher's files: label CSVs with their own label names and values (1.0 / 0.0 / -1.0 /
blank, ``YES``/``NO``, lists, one row per radiologist), laterals, JPEGs, 16-bit PNGs or DICOM (a
share MONOCHROME1), so that every reader and policy runs without a download. The patients, labels
and drawings come from :mod:`.plan` and :mod:`.drawing`; each data set's labels are derived from
the 14 drawn findings (its label_map.csv rows; the few labels no painter draws, such as Fracture
or Support Devices, are drawn at random at a low rate and carry no signal).

Every site has its own acquisition look (:class:`SiteLook`: exposure curve, contrast, noise, a
border, a burnt-in marker), so that a model trained on one site is measurably worse on another,
as on real data. Deterministic in (dataset, n_patients, size, seed). The marker file is written
last, so a killed generation is redone on the next call.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...utils.errors import UserError
from ...utils.io import atomic_path
from .. import chexpert, mimic_cxr, nih_google, padchest, vindr_cxr
from ..findings import FINDINGS, label_map
from .drawing import draw_image
from .plan import DatasetPlan, plan_dataset
from .writing import MARKER_NAME, generate, write_text_atomic

SITE_VERSION = 3  # bump when a look or a writer changes: sets of an older version are redrawn
LATERAL_SHARE = 0.25  # share of the CheXpert, MIMIC and PadChest images drawn as laterals
UNCERTAIN_SHARE = 0.08  # share of the CheXpert / MIMIC label cells of train images written as -1.0
BLANK_SHARE = 0.5  # share of their negative cells written blank ("not mentioned")
RANDOM_LABEL_RATE = 0.04  # labels no painter draws (Fracture, Support Devices, ...): positive at this rate
RADIOLOGISTS = 3  # VinDr-CXR: readers per training image
READER_MISS = 0.15  # a reader misses a present finding with this chance
MONOCHROME1_SHARE = 0.3  # VinDr-CXR: images stored inverted, as MONOCHROME1

# Findings of the label space that the painters draw as a combination of the 14.
DERIVED = {
    "Nodule or Mass": ("Nodule", "Mass"),
    "Lung Lesion": ("Nodule", "Mass"),
    "Lung Opacity": ("Consolidation", "Infiltration", "Pneumonia", "Edema", "Atelectasis"),
    "Airspace Opacity": ("Consolidation", "Pneumonia", "Infiltration"),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
}


@dataclass(frozen=True)
class SiteLook:
    """How a site's detector, positioning and processing change the drawn pixels p in [0, 1]: the chest
    scaled by ``zoom`` about the centre (below 1: smaller, dark around; above 1: cropped), ``blur`` (the
    image shrunk by that factor and enlarged back), then v = clip(contrast * p ** gamma + offset + noise
    * N(0, 1)), a ``border`` px dark frame and a bright ``marker`` square in the top right corner (sizes
    in pixels of a 256 px image)."""

    gamma: float
    contrast: float
    offset: float
    noise: float
    border: int
    marker: int
    blur: float = 1.0
    zoom: float = 1.0

    def place(self, box: tuple, size: int) -> tuple:
        """Where a drawn box (x, y, w, h in pixels) lies after :meth:`apply`'s zoom."""
        side = max(1, round(size * self.zoom))
        offset = (size - side) // 2
        x, y, w, h = box
        return (x * side / size + offset, y * side / size + offset, w * side / size, h * side / size)

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = pixels.shape[0]
        image = Image.fromarray(pixels)
        if self.zoom != 1.0:
            side = max(1, round(size * self.zoom))
            scaled = image.resize((side, side), Image.BILINEAR)
            canvas = Image.new("L", (size, size), 0)
            offset = (size - side) // 2
            canvas.paste(scaled, (offset, offset))  # a negative offset crops
            image = canvas
        if self.blur > 1.0:
            small = max(2, round(size / self.blur))
            image = image.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
        p = np.asarray(image, dtype=np.float32) / 255.0
        v = self.contrast * p ** np.float32(self.gamma) + self.offset
        v = v + self.noise * rng.standard_normal(p.shape, dtype=np.float32)
        v = np.clip(v, 0.0, 1.0)
        b = max(0, round(self.border * size / 256))
        if b:
            v[:b], v[-b:], v[:, :b], v[:, -b:] = 0.0, 0.0, 0.0, 0.0
        m = max(1, round(self.marker * size / 256))
        v[b + m: b + 3 * m, size - b - 3 * m: size - b - m] = 1.0
        return (v * 255.0 + 0.5).astype(np.uint8)


LOOKS = {
    "chexpert": SiteLook(gamma=0.6, contrast=1.15, offset=-0.05, noise=0.05, border=0, marker=10, blur=2.0),
    "mimic_cxr": SiteLook(gamma=1.5, contrast=0.8, offset=0.1, noise=0.07, border=8, marker=0, zoom=0.85),
    "padchest": SiteLook(gamma=1.2, contrast=0.65, offset=0.2, noise=0.03, border=16, marker=6, blur=3.0, zoom=0.9),
    "vindr_cxr": SiteLook(gamma=0.75, contrast=1.1, offset=-0.05, noise=0.09, border=4, marker=14, zoom=1.12),
    "nih_google": None,  # ChestX-ray14's own images
}


def lateral(pixels: np.ndarray) -> np.ndarray:
    """A lateral-looking image from a frontal drawing: the chest squeezed to 55 % of its width, one
    lung field, the spine as a bright band behind it, dark air around."""
    size = pixels.shape[0]
    narrow = np.asarray(Image.fromarray(pixels).resize((max(1, int(size * 0.55)), size), Image.BILINEAR))
    out = np.full_like(pixels, 12)
    start = (size - narrow.shape[1]) // 2
    out[:, start:start + narrow.shape[1]] = narrow
    spine = slice(start + int(narrow.shape[1] * 0.78), start + int(narrow.shape[1] * 0.9))
    out[:, spine] = np.maximum(out[:, spine], 200)
    return out


def finding_values(plan: DatasetPlan) -> dict[str, np.ndarray]:
    """Bool per image for the findings the painters draw: the 14, and those derived from them (:data:`DERIVED`)."""
    values = {f: plan.labels[:, k] for k, f in enumerate(FINDINGS)}
    for finding, parts in DERIVED.items():
        values[finding] = np.any([values[p] for p in parts], axis=0)
    return values


def site_labels(dataset: str, plan: DatasetPlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bool per image for every label of ``dataset`` as its file names it: the first label meaning a drawn
    finding is that finding, the others (PadChest's "apical pleural thickening" after "pleural
    thickening") rare and random; "no finding" labels are the absence of every other."""
    values = finding_values(plan)
    out, drawn = {}, set()
    for label, finding in label_map(dataset).items():
        if finding is None:
            continue
        if finding in values and finding not in drawn:  # the first label of a finding carries it; others stay rare
            out[label] = values[finding]
            drawn.add(finding)
        else:
            out[label] = rng.random(plan.n_images) < RANDOM_LABEL_RATE
    anything = np.any(list(out.values()), axis=0) if out else np.zeros(plan.n_images, bool)
    for label, finding in label_map(dataset).items():
        if finding is None:
            out[label] = ~anything if label.lower() in ("no finding", "normal") else \
                rng.random(plan.n_images) < RANDOM_LABEL_RATE
    return {label: out[label] for label in label_map(dataset)}


def draw(plan: DatasetPlan, i: int, size: int, seed: int, look: SiteLook | None, is_lateral: bool) -> np.ndarray:
    drawing = draw_image(tuple(bool(x) for x in plan.labels[i]), size, seed, i, int(plan.patient_ids[i]),
                         plan.views[i])
    pixels = lateral(drawing.pixels) if is_lateral else drawing.pixels
    if look is not None:
        pixels = look.apply(pixels, np.random.default_rng([seed, 11, i]))
    return pixels


def save(path: Path, pixels: np.ndarray, kind: str = "png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        if kind == "jpg":
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=92)
        elif kind == "png16":
            Image.fromarray((pixels.astype(np.uint16) * 257).astype(np.uint16)).save(tmp, format="PNG")
        else:
            Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)


def csv_text(header: list[str], rows: list[list]) -> str:
    def cell(v):
        text = "" if v is None else str(v)
        return f'"{text}"' if any(c in text for c in ',"\n') else text
    return "\n".join([",".join(map(cell, header))] + [",".join(map(cell, r)) for r in rows]) + "\n"


def write_gz(path: Path, text: str) -> None:
    with atomic_path(path, durable=False) as tmp, gzip.open(tmp, "wt", encoding="utf-8", newline="") as handle:
        handle.write(text)


def four_values(positive: bool, rng: np.random.Generator, certain: bool, no_finding: bool = False) -> str:
    """A CheXpert-style cell: 1.0, 0.0, -1.0 or blank."""
    if not certain and not no_finding and rng.random() < UNCERTAIN_SHARE:
        return "-1.0"
    if positive:
        return "1.0"
    return "" if not certain and rng.random() < BLANK_SHARE else "0.0"


def laterals(plan: DatasetPlan, rng: np.random.Generator) -> np.ndarray:
    return rng.random(plan.n_images) < LATERAL_SHARE


# --------------------------------------------------------------------------- one writer per format


def write_chexpert(out: Path, plan: DatasetPlan, size: int, seed: int, rng: np.random.Generator) -> None:
    labels, side = site_labels("chexpert", plan, rng), laterals(plan, rng)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.LABELS]
    tables = {"train": [], "valid": []}
    for i in range(plan.n_images):
        part = "valid" if plan.in_test[i] else "train"
        view = "lateral" if side[i] else "frontal"
        rel = f"CheXpert-v1.0-small/{part}/patient{plan.patient_ids[i]:05d}/study{plan.follow_ups[i] + 1}/view1_{view}.jpg"
        save(out.joinpath(*Path(rel).parts[1:]), draw(plan, i, size, seed, LOOKS["chexpert"], side[i]), "jpg")
        cells = [four_values(bool(labels[label][i]), rng, certain=part == "valid", no_finding=label == "No Finding")
                 for label in chexpert.LABELS]
        tables[part].append([rel, "Male" if plan.genders[i] == "M" else "Female", plan.ages[i],
                             "Lateral" if side[i] else "Frontal", "" if side[i] else plan.views[i], *cells])
    write_text_atomic(out / chexpert.TRAIN_CSV, csv_text(header, tables["train"]))
    write_text_atomic(out / chexpert.VALID_CSV, csv_text(header, tables["valid"]))


def write_mimic(out: Path, plan: DatasetPlan, size: int, seed: int, rng: np.random.Generator) -> None:
    labels, side = site_labels("mimic_cxr", plan, rng), laterals(plan, rng)
    studies, metadata, split = [], [], []
    for i in range(plan.n_images):
        subject, study = str(10_000_000 + int(plan.patient_ids[i])), str(50_000_000 + i)
        dicom = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=10).hexdigest()
        save(mimic_cxr.image_path(out, subject, study, dicom), draw(plan, i, size, seed, LOOKS["mimic_cxr"], side[i]),
             "jpg")
        certain = bool(plan.in_test[i])
        studies.append([subject, study, *[four_values(bool(labels[label][i]), rng, certain, label == "No Finding")
                                          for label in mimic_cxr.LABELS]])
        metadata.append([dicom, subject, study, "CHEST (PA AND LAT)", "LATERAL" if side[i] else plan.views[i]])
        split.append([dicom, study, subject, "test" if plan.in_test[i] else ("validate" if i % 17 == 0 else "train")])
    write_gz(out / f"{mimic_cxr.LABEL_FILES['chexpert']}.gz",
             csv_text(["subject_id", "study_id", *mimic_cxr.LABELS], studies))
    write_gz(out / f"{mimic_cxr.METADATA_FILE}.gz", csv_text(
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"], metadata))
    write_gz(out / f"{mimic_cxr.SPLIT_FILE}.gz", csv_text(["dicom_id", "study_id", "subject_id", "split"], split))


def write_padchest(out: Path, plan: DatasetPlan, size: int, seed: int, rng: np.random.Generator) -> None:
    labels, side = site_labels("padchest", plan, rng), laterals(plan, rng)
    rows = []
    for i in range(plan.n_images):
        image_id = f"{hashlib.blake2b(f'{seed}:{i}'.encode(), digest_size=8).hexdigest()}.png"
        folder = str(i % 2)
        save(out / folder / image_id, draw(plan, i, size, seed, LOOKS["padchest"], side[i]), "png16")
        present = [label for label in padchest.LABELS if label != "normal" and labels[label][i]]
        found = present or ["normal"]
        projection = "L" if side[i] else ("AP_horizontal" if plan.views[i] == "AP" else "PA")
        birth = 2015 - int(plan.ages[i])
        rows.append([image_id, folder, f"pat{plan.patient_ids[i]:06d}", str(birth), plan.genders[i], "20150612",
                     projection, repr(found)])
    write_text_atomic(out / padchest.LABEL_FILE, csv_text(list(padchest.COLUMNS), rows))


def write_dicom(path: Path, pixels: np.ndarray, inverted: bool) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    stored = (pixels.astype(np.uint16) * 16)  # 12-bit values, as a detector stores them
    if inverted:
        stored = 4095 - stored
    ds.PhotometricInterpretation = "MONOCHROME1" if inverted else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_vindr(out: Path, plan: DatasetPlan, size: int, seed: int, rng: np.random.Generator) -> None:
    labels = site_labels("vindr_cxr", plan, rng)
    names = list(vindr_cxr.LABELS)
    rows = {"train_val": [], "test": []}
    boxes = {"train_val": [], "test": []}
    inverted = rng.random(plan.n_images) < MONOCHROME1_SHARE
    for i in range(plan.n_images):
        part = "test" if plan.in_test[i] else "train_val"
        image_id = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).hexdigest()
        drawing = draw_image(tuple(bool(x) for x in plan.labels[i]), size, seed, i, int(plan.patient_ids[i]), "PA")
        pixels = LOOKS["vindr_cxr"].apply(drawing.pixels, np.random.default_rng([seed, 11, i]))
        write_dicom(out / vindr_cxr.IMAGE_FOLDERS[part] / f"{image_id}.dicom", pixels, bool(inverted[i]))
        present = np.array([bool(labels[n][i]) for n in names])
        readers = [f"R{r + 1}" for r in range(RADIOLOGISTS)] if part == "train_val" else [None]
        for reader in readers:
            seen = present & (rng.random(len(names)) >= READER_MISS) if reader else present
            no_finding = names.index("No finding")
            seen[no_finding] = not seen[[k for k in range(len(names)) if k != no_finding]].any()
            rows[part].append([image_id, *([reader] if reader else []), *[int(v) for v in seen]])
            for finding, drawn in drawing.boxes.items():
                x, y, w, h = (round(v, 2) for v in LOOKS["vindr_cxr"].place(drawn, size))
                label = {"Effusion": "Pleural effusion", "Nodule": "Nodule/Mass", "Mass": "Nodule/Mass"}.get(finding, finding)
                if label in names and seen[names.index(label)]:
                    boxes[part].append([image_id, reader or "", label, x, y, x + w, y + h])
    for part in ("train_val", "test"):
        reader_column = ["rad_id"] if part == "train_val" else []
        write_text_atomic(out / vindr_cxr.ANNOTATIONS / vindr_cxr.PHYSIONET_LABELS[part],
                          csv_text(["image_id", *reader_column, *names], rows[part]))
        write_text_atomic(out / vindr_cxr.ANNOTATIONS / vindr_cxr.PHYSIONET_BOXES[part],
                          csv_text(["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], boxes[part]))


def write_nih_google(out: Path, plan: DatasetPlan, size: int, seed: int, rng: np.random.Generator) -> None:
    generate(out, n_patients=int(plan.patient_ids.max()), size=size, seed=seed, workers=1)
    labels = site_labels("nih_google", plan, rng)
    rows = []
    for i in range(plan.n_images):
        if not plan.in_test[i] and i % 3:  # the expert labels cover the test images and a third of the others
            continue
        rows.append([plan.image_names[i], plan.patient_ids[i], plan.ages[i], plan.genders[i], plan.views[i],
                     *["YES" if labels[label][i] else "NO" for label in nih_google.LABELS],
                     "test" if plan.in_test[i] else "val"])
    write_text_atomic(out / nih_google.COMBINED_FILE, csv_text(
        ["Image Index", "Patient ID", "Patient Age", "Patient Gender", "View Position", *nih_google.LABELS, "Set Id"],
        rows))


WRITERS = {"chexpert": write_chexpert, "mimic_cxr": write_mimic, "padchest": write_padchest,
           "vindr_cxr": write_vindr, "nih_google": write_nih_google}
SITE_MARKER = "synthetic_site.json"


def site_parameters(dataset: str, n_patients: int, size: int, seed: int) -> dict:
    return {"generator": "cxrmem.data.synthetic.sites", "version": SITE_VERSION, "dataset": dataset,
            "n_patients": n_patients, "size": size, "seed": seed}


def holds_site(out, dataset: str, n_patients: int, size: int, seed: int) -> bool:
    try:
        marker = json.loads((Path(out) / SITE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("params") == site_parameters(dataset, n_patients, size, seed) and marker.get("complete", False)


def generate_site(dataset: str, out_dir, n_patients: int, size: int = 128, seed: int = 0) -> dict:
    """Write a synthetic ``dataset`` in its publisher's format into ``out_dir``; returns {dataset, n_images,
    out_dir, skipped}. Nothing is written when ``out_dir`` already holds this very set."""
    if dataset not in WRITERS:
        raise UserError(f"no synthetic generator for {dataset!r}; choose one of chestxray14, {', '.join(WRITERS)}")
    out = Path(out_dir)
    plan = plan_dataset(n_patients, seed)
    if holds_site(out, dataset, n_patients, size, seed):
        return {"dataset": dataset, "n_images": plan.n_images, "out_dir": str(out), "skipped": True}
    if out.exists() and any(out.iterdir()) and not (out / SITE_MARKER).is_file():
        raise UserError(f"{out} already holds files not written by this generator; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    params = site_parameters(dataset, n_patients, size, seed)
    write_text_atomic(out / SITE_MARKER, json.dumps({"params": params, "complete": False}) + "\n")
    WRITERS[dataset](out, plan, size, seed, np.random.default_rng([seed, 23]))
    if dataset != "nih_google":  # nih_google's ChestX-ray14 images carry the generator's own marker
        write_text_atomic(out / MARKER_NAME, json.dumps({"params": params, "complete": True}) + "\n")
    write_text_atomic(out / SITE_MARKER, json.dumps({"params": params, "complete": True}) + "\n")
    return {"dataset": dataset, "n_images": plan.n_images, "out_dir": str(out), "skipped": False}
