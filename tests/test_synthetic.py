"""Tests of the synthetic ChestX-ray14 generator (tiny sets, a few seconds in all)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrmem.data import findings
from cxrmem.data.findings import FINDINGS
from cxrmem.data.synthetic import generate
from cxrmem.data.synthetic.__main__ import main
from cxrmem.data.synthetic.drawing import PAINTERS, draw_image, render_image
from cxrmem.data.synthetic.labels import ensure_findings_covered, real_prevalence, sample_label_matrix
from cxrmem.data.synthetic.plan import plan_dataset
from cxrmem.data.synthetic.writing import data_entry_text
from cxrmem.utils.errors import UserError

from helpers import run_cli

N_PATIENTS = 40
SIZE = 48
SEED = 7
EXACT_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
PANDAS_COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "cxr14"
    summary = generate(out, N_PATIENTS, size=SIZE, seed=SEED, workers=2)
    return out, summary


@pytest.fixture(scope="module")
def entries(dataset) -> pd.DataFrame:
    out, _ = dataset
    return pd.read_csv(out / "Data_Entry_2017.csv")


def read_list(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def image_files(out: Path) -> dict[str, Path]:
    return {p.name: p for p in out.glob("images_*/images/*.png")}


def file_digests(out: Path) -> dict[str, str]:
    files = [out / "Data_Entry_2017.csv", out / "train_val_list.txt", out / "test_list.txt"]
    files += sorted(out.glob("images_*/images/*.png"))
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---- layout -----------------------------------------------------------------

def test_csv_is_in_the_2017_format(dataset, entries):
    out, summary = dataset
    lines = (out / "Data_Entry_2017.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == EXACT_HEADER
    assert all(line.endswith(",") for line in lines)
    assert list(entries.columns) == PANDAS_COLUMNS
    assert entries["Unnamed: 11"].isna().all()
    assert len(entries) == summary["n_images"] > N_PATIENTS


def test_rows_have_realistic_metadata(entries):
    for name, patient, follow_up in zip(entries["Image Index"], entries["Patient ID"], entries["Follow-up #"]):
        assert re.fullmatch(r"\d{8}_\d{3}\.png", name)
        assert name == f"{patient:08d}_{follow_up:03d}.png"
    assert entries["Patient ID"].nunique() == N_PATIENTS
    follow_ups = entries.groupby("Patient ID")["Follow-up #"].apply(sorted)
    assert all(f == list(range(len(f))) for f in follow_ups)
    assert (follow_ups.apply(len) > 1).any()
    assert entries["Patient Age"].between(1, 100).all()
    assert set(entries["Patient Gender"]) <= {"M", "F"}
    assert entries.groupby("Patient ID")["Patient Gender"].nunique().max() == 1
    assert set(entries["View Position"]) <= {"PA", "AP"}
    assert (entries["OriginalImage[Width"] > 1000).all() and (entries["Height]"] > 1000).all()
    assert entries["OriginalImagePixelSpacing[x"].between(0.1, 0.2).all()


def test_every_row_has_its_png_in_one_of_several_folders(dataset, entries):
    out, _ = dataset
    files = image_files(out)
    assert set(files) == set(entries["Image Index"])
    folders = {p.parent.parent.name for p in files.values()}
    assert len(folders) >= 2 and all(re.fullmatch(r"images_\d{3}", f) for f in folders)
    for path in list(files.values())[:20]:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE) and image.format == "PNG"
    assert not list(out.rglob("*.tmp"))


def test_lists_split_whole_patients(dataset, entries):
    out, summary = dataset
    train_val = read_list(out / "train_val_list.txt")
    test = read_list(out / "test_list.txt")
    assert train_val and test
    assert len(set(train_val) | set(test)) == len(train_val) + len(test) == len(entries)
    assert set(train_val) | set(test) == set(entries["Image Index"])
    patient_of = dict(zip(entries["Image Index"], entries["Patient ID"]))
    assert not {patient_of[n] for n in train_val} & {patient_of[n] for n in test}
    assert 0.1 < len(test) / len(entries) < 0.35
    assert summary["n_test_images"] == len(test)


def test_labels_use_only_the_fourteen_findings_or_no_finding(entries):
    names = FINDINGS
    for labels in entries["Finding Labels"]:
        if labels == "No Finding":
            continue
        parts = labels.split("|")
        assert all(p in names for p in parts), labels
        assert parts == sorted(parts, key=names.index) and len(set(parts)) == len(parts)


def test_summary_matches_the_csv(dataset, entries):
    _, summary = dataset
    no_finding = (entries["Finding Labels"] == "No Finding").mean()
    assert summary["no_finding_share"] == pytest.approx(no_finding)
    for name, share in summary["prevalence"].items():
        has = entries["Finding Labels"].str.split("|").apply(lambda parts: name in parts)
        assert share == pytest.approx(has.mean())
    assert not summary["skipped"]


# ---- determinism and reruns ---------------------------------------------------

def test_same_arguments_give_identical_files_whatever_the_workers(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate(again, N_PATIENTS, size=SIZE, seed=SEED, workers=1)
    assert file_digests(again) == file_digests(out)


def test_another_seed_gives_another_data_set(tmp_path):
    first = plan_dataset(30, seed=1)
    second = plan_dataset(30, seed=2)
    assert data_entry_text(first) != data_entry_text(second)


def test_complete_data_set_is_not_rewritten(tmp_path):
    out = tmp_path / "set"
    generate(out, 6, size=16, seed=0, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = generate(out, 6, size=16, seed=0, workers=1)
    assert summary["skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_interrupted_run_is_completed_identically(tmp_path):
    out = tmp_path / "set"
    generate(out, 8, size=16, seed=0, workers=1)
    reference = file_digests(out)
    marker = json.loads((out / "synthetic.json").read_text())
    marker["complete"] = False
    (out / "synthetic.json").write_text(json.dumps(marker))
    victim = sorted(out.glob("images_*/images/*.png"))[-1]
    victim.unlink()
    (victim.parent / f".{victim.name}.123.tmp").write_bytes(b"half a png")
    (out / "Data_Entry_2017.csv").unlink()
    summary = generate(out, 8, size=16, seed=0, workers=1)
    assert not summary["skipped"]
    assert file_digests(out) == reference
    assert not list(out.rglob("*.tmp"))


def test_other_parameters_replace_an_earlier_synthetic_set(tmp_path):
    out = tmp_path / "set"
    generate(out, 12, size=16, seed=0, workers=1)
    generate(out, 3, size=16, seed=1, workers=1)
    entries = pd.read_csv(out / "Data_Entry_2017.csv")
    assert set(image_files(out)) == set(entries["Image Index"])
    assert json.loads((out / "synthetic.json").read_text())["params"]["n_patients"] == 3


def test_a_foreign_data_set_is_never_overwritten(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n")
    with pytest.raises(UserError, match="not written by this generator"):
        generate(tmp_path, 5, size=16)


# ---- arguments and command line ---------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"n_patients": 0}, {"n_patients": 5, "size": 8}, {"n_patients": 5, "seed": -1},
                                    {"n_patients": 5, "workers": 0}])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    with pytest.raises(UserError) as error:
        generate(tmp_path / "x", **kwargs)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x").exists()


def test_command_line_reports_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--n-patients", "4", "--size", "16", "--workers", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "images" in printed[0] and "No Finding" in printed[0]
    assert main(["--out", str(tmp_path / "bad"), "--n-patients", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")


def test_python_dash_m_runs_the_command_line(tmp_path):
    command = [sys.executable, "-m", "cxrmem.data.synthetic", "--n-patients", "3", "--size", "16", "--workers", "1"]
    done = subprocess.run(command + ["--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 patients" in done.stdout and (tmp_path / "m" / "Data_Entry_2017.csv").is_file()



def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    status, _, err = run_cli(main, ["--n-patients", "3", "--size", "16", "--workers", "1", "--out", tmp_path / "file"],
                             capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


# ---- labels ----------------------------------------------------------------------

def test_findings_come_from_the_csv_and_all_have_a_painter():
    rows = list(csv.DictReader((Path(findings.__file__).parent / "findings.csv").open(encoding="utf-8")))
    assert FINDINGS == [r["finding"] for r in rows]
    assert len(FINDINGS) == 14
    assert set(FINDINGS) <= set(PAINTERS)


def test_label_prevalence_tracks_the_real_one():
    labels = sample_label_matrix(20_000, np.random.default_rng(0))
    names = FINDINGS
    real = real_prevalence()
    assert (~labels.any(axis=1)).mean() == pytest.approx(real["No Finding"], abs=0.02)
    share = labels.mean(axis=0)
    for name, observed in zip(names, share):
        tolerance = 4 * np.sqrt(real[name] / 20_000) + 0.05 * real[name]
        assert observed == pytest.approx(real[name], abs=tolerance), name
    assert names[int(np.argmax(share))] == "Infiltration"
    assert names[int(np.argmin(share))] == "Hernia"
    abnormal = labels[labels.any(axis=1)]
    assert 1.3 < abnormal.sum(axis=1).mean() < 1.9  # findings co-occur
    effusion, atelectasis = names.index("Effusion"), names.index("Atelectasis")
    assert labels[labels[:, effusion], atelectasis].mean() > 1.5 * share[atelectasis]


def test_rare_findings_are_added_only_to_big_enough_groups():
    rng = np.random.default_rng(0)
    labels = np.zeros((200, 14), dtype=bool)
    labels[:120, 2] = True  # 120 abnormal images, all with the same finding
    big = np.arange(200) < 150
    small = ~big
    labels[150:160, 2] = True  # the small group: 10 abnormal images only
    covered = ensure_findings_covered(labels, [big, small], rng)
    assert covered[big].any(axis=0).all()
    assert (covered[small] == labels[small]).all()
    assert (covered.any(axis=1) == labels.any(axis=1)).all()  # No Finding unchanged
    assert (covered.sum(axis=1) - labels.sum(axis=1)).max() == 1


def test_large_enough_data_sets_have_every_finding_in_both_splits():
    plan = plan_dataset(600, seed=0)
    assert plan.labels[plan.in_test].any(axis=0).all()
    assert plan.labels[~plan.in_test].any(axis=0).all()


# ---- pictures -------------------------------------------------------------------

# Where each finding must change the picture, in image coordinates (x right, y down,
# 0..1; the patient's right lung is on the image's left), and whether it brightens.
EXPECTED_REGIONS = {
    "Atelectasis": ((0.0, 0.5), (0.0, 0.42), +1),
    "Consolidation": ((0.5, 1.0), (0.3, 0.62), +1),
    "Infiltration": ((0.4, 0.6), (0.3, 0.65), +1),
    "Pneumothorax": ((0.6, 1.0), (0.2, 0.7), -1),
    "Edema": ((0.4, 0.6), (0.3, 0.65), +1),
    "Emphysema": ((0.4, 0.6), (0.0, 0.42), -1),
    "Fibrosis": ((0.5, 1.0), (0.5, 1.0), +1),
    "Effusion": ((0.0, 0.5), (0.55, 1.0), +1),
    "Pneumonia": ((0.0, 0.5), (0.4, 0.68), +1),
    "Pleural_Thickening": ((0.0, 0.5), (0.0, 0.32), +1),
    "Cardiomegaly": ((0.45, 0.75), (0.5, 0.85), +1),
    "Hernia": ((0.4, 0.6), (0.75, 1.0), 0),
}


def pattern_difference(finding: str, size: int = 48, n: int = 10) -> np.ndarray:
    """Summed pixel difference made by one finding on otherwise identical images."""
    names = FINDINGS
    present = np.array([name == finding for name in names])
    absent = np.zeros(len(names), dtype=bool)
    total = np.zeros((size, size))
    for i in range(n):
        with_it = render_image(present, size, seed=1, image_index=i, patient_id=i + 1).astype(float)
        without = render_image(absent, size, seed=1, image_index=i, patient_id=i + 1).astype(float)
        total += with_it - without
    return total


@pytest.mark.parametrize("finding", sorted(EXPECTED_REGIONS))
def test_each_finding_draws_its_pattern_in_its_region(finding):
    (x_low, x_high), (y_low, y_high), sign = EXPECTED_REGIONS[finding]
    difference = pattern_difference(finding)
    weight = np.abs(difference)
    assert weight.sum() > 0
    ys, xs = np.mgrid[0:difference.shape[0], 0:difference.shape[1]] / (difference.shape[0] - 1)
    centre_x, centre_y = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
    assert x_low <= centre_x <= x_high and y_low <= centre_y <= y_high, (centre_x, centre_y)
    if sign:
        assert np.sign(difference.sum()) == sign


@pytest.mark.parametrize("finding", ["Nodule", "Mass"])
def test_nodules_and_masses_sit_anywhere_inside_either_lung(finding):
    present = np.array([name == finding for name in FINDINGS])
    size, centres = 64, []
    for i in range(40):
        box = draw_image(present, size, seed=3, image_index=i, patient_id=i + 1).boxes[finding]
        without = render_image(np.zeros(len(FINDINGS), dtype=bool), size, seed=3, image_index=i, patient_id=i + 1)
        x, y = int(box[0] + box[2] / 2), int(box[1] + box[3] / 2)
        spine = float(without[16:48, size // 2 - 1:size // 2 + 1].mean())
        assert without[y, x] + 30 < spine, (i, box)  # the lesion's centre is on an aerated lung field
        centres.append(((x + 0.5) / size, (y + 0.5) / size))
    u, v = np.array(centres).T
    assert (u < 0.4).sum() >= 10 and (u > 0.6).sum() >= 10  # both lungs
    assert np.ptp(v) > 0.2 and np.ptp(u[u < 0.4]) > 0.08  # spread, not one spot


def test_images_are_chest_like():
    pixels = render_image(np.zeros(14, dtype=bool), 64, seed=0, image_index=0, patient_id=1).astype(float)
    lung_fields = pixels[20:40, 12:22].mean(), pixels[20:40, 42:52].mean()
    spine = pixels[20:40, 31:33].mean()
    below_diaphragm = pixels[56:62, 10:54].mean()
    assert max(lung_fields) + 30 < min(spine, below_diaphragm)


def standardised_thumbnail(labels, index: int) -> np.ndarray:
    pixels = render_image(labels, 32, seed=11, image_index=index, patient_id=index // 2 + 1).astype(np.float32)
    thumbnail = pixels.reshape(16, 2, 16, 2).mean(axis=(1, 3)).ravel()
    return (thumbnail - thumbnail.mean()) / thumbnail.std()


# A fixed pixel-wise weighting only learns patterns with a place; nodules and masses move (the
# demo check of test_explain.py trains a network that finds them).
@pytest.mark.parametrize("finding", ["Effusion", "Atelectasis", "Consolidation", "Cardiomegaly"])
def test_frequent_patterns_are_learnable_from_16px_thumbnails(finding):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    names = FINDINGS
    present = np.array([name == finding for name in names])
    n = 100
    positives = [standardised_thumbnail(present, 10_000 + i) for i in range(n)]
    negatives = [standardised_thumbnail(np.zeros(len(names), dtype=bool), 20_000 + i) for i in range(n)]
    features = np.vstack(positives + negatives)
    target = np.r_[np.ones(n), np.zeros(n)]
    model = LogisticRegression(C=0.1, max_iter=500)
    scores = cross_val_predict(model, features, target, cv=4, method="predict_proba")[:, 1]
    assert roc_auc_score(target, scores) > 0.8
