"""Bounding boxes: ChestX-ray14's BBox_List_2017.csv read as a frame, the synthetic generator's box file,
and the box counts of --check-data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrmem.experiment import train_main
from cxrmem.data.chestxray14 import BBOX_FILE, read_bboxes, read_list
from cxrmem.data.findings import FINDINGS
from cxrmem.data.synthetic import generate
from cxrmem.data.synthetic.drawing import PAINTERS, draw_image, render_image
from cxrmem.utils.errors import UserError

from helpers import EXPERIMENTS, check_data, run_cli

REAL_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
PLACED = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumonia", "Pneumothorax")


# ---- the reader --------------------------------------------------------------------------------

def test_reader_takes_the_real_header_with_infiltrate_and_trailing_empty_columns(tmp_path):
    (tmp_path / BBOX_FILE).write_text(
        REAL_HEADER + "\n"
        "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n"
        "00014716_007.png,Infiltrate,661.333333333333,223.288888888889,231.822222222222,292.977777777778,,,\n"
        "00029817_009.png,Nodule,353,118,34,31\n"     # a row without the trailing empty cells
    )
    boxes = read_bboxes(tmp_path)
    assert list(boxes.columns) == ["image_index", "finding", "x", "y", "w", "h"]
    assert boxes["image_index"].tolist() == ["00013118_008.png", "00014716_007.png", "00029817_009.png"]
    assert boxes["finding"].tolist() == ["Atelectasis", "Infiltration", "Nodule"]
    np.testing.assert_allclose(boxes.loc[0, ["x", "y", "w", "h"]].to_numpy(float),
                               [225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661])
    np.testing.assert_allclose(boxes.loc[2, ["x", "y", "w", "h"]].to_numpy(float), [353, 118, 34, 31])


def test_absent_box_file_gives_an_empty_frame(tmp_path):
    boxes = read_bboxes(tmp_path)
    assert boxes.empty and list(boxes.columns) == ["image_index", "finding", "x", "y", "w", "h"]


@pytest.mark.parametrize("text, cause", [
    ("Image Index,Finding Label,x,y,w,h\na.png,Nodule,1,2,3,4\n", "missing column"),
    (REAL_HEADER + "\na.png,Nodule,1,two,3,4,,,\n", "line 2"),
    (REAL_HEADER + "\na.png,Nodule,1,2,3,4,,,\nb.png,Mass,1,2,,4,,,\n", "line 3"),
    (REAL_HEADER + "\na.png,Nodule,1,2,-3,4,,,\n", "line 2"),
    (REAL_HEADER + "\na.png,Tumour,1,2,3,4,,,\n", "unknown finding"),
    ("", "not a readable CSV"),
])
def test_malformed_box_file_is_one_line_user_error(tmp_path, text, cause):
    (tmp_path / BBOX_FILE).write_text(text)
    with pytest.raises(UserError, match=cause) as info:
        read_bboxes(tmp_path)
    assert "\n" not in str(info.value) and BBOX_FILE in str(info.value)


# ---- the synthetic generator's box file ---------------------------------------------------------------

N_PATIENTS, SIZE, SEED = 120, 64, 4


@pytest.fixture(scope="module")
def boxed_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("boxes") / "cxr14"
    summary = generate(out, N_PATIENTS, size=SIZE, seed=SEED, workers=1)
    return out, summary


def test_box_file_has_the_real_format_on_test_images_only(boxed_set):
    out, summary = boxed_set
    lines = (out / BBOX_FILE).read_text().splitlines()
    assert lines[0] == REAL_HEADER
    rows = list(csv.reader(lines[1:]))
    assert rows and all(len(row) == 9 and row[6:] == ["", "", ""] for row in rows)
    coords = np.array([[float(v) for v in row[2:6]] for row in rows])
    x, y, w, h = coords.T
    assert (x >= 0).all() and (y >= 0).all() and (w > 0).all() and (h > 0).all()
    assert (x + w <= 1024).all() and (y + h <= 1024).all()
    # one pixel of the SIZE px image is 1024 / SIZE px of the original frame
    assert np.allclose(coords / (1024 / SIZE), np.round(coords / (1024 / SIZE)))

    entries = pd.read_csv(out / "Data_Entry_2017.csv")
    labels = dict(zip(entries["Image Index"], entries["Finding Labels"].str.split("|")))
    test_images = read_list(out / "test_list.txt")
    assert {row[0] for row in rows} <= test_images
    expected = {(name, f) for name in test_images for f in labels[name] if f in PLACED}
    assert {(row[0], row[1]) for row in rows} == expected  # every placed lesion of a test image, once
    assert summary["boxes"] == {f: sum(row[1] == f for row in rows) for f in FINDINGS
                                if any(row[1] == f for row in rows)}
    assert {"Nodule", "Mass"} <= set(summary["boxes"])


@pytest.mark.parametrize("finding", ["Nodule", "Mass"])
def test_boxes_lie_on_the_drawn_lesion(boxed_set, finding):
    """Inside its box the image is brighter than in a ring of the box's size around it."""
    out, _ = boxed_set
    boxes = read_bboxes(out)
    boxes = boxes[boxes["finding"] == finding]
    assert len(boxes) >= 3
    paths = {p.name: p for p in out.glob("images_*/images/*.png")}
    scale = SIZE / 1024
    for row in boxes.itertuples():
        pixels = np.asarray(Image.open(paths[row.image_index]), dtype=float)
        x0, y0 = round(row.x * scale), round(row.y * scale)
        x1, y1 = x0 + round(row.w * scale), y0 + round(row.h * scale)
        inner = pixels[y0:y1, x0:x1]
        mx, my = max(2, (x1 - x0) // 2), max(2, (y1 - y0) // 2)
        window = pixels[max(0, y0 - my):y1 + my, max(0, x0 - mx):x1 + mx]
        inside = inner.mean()
        around = (window.sum() - inner.sum()) / (window.size - inner.size)  # the ring around the box
        assert inside > around + 3, (row.image_index, inside, around)


@pytest.mark.parametrize("finding", PLACED)
def test_a_box_is_where_its_finding_changes_the_image(finding):
    """What a finding changes (the image with it minus the same image without it) is centred in its box
    and, per pixel, over ten times stronger inside the box than outside."""
    present = np.array([f == finding for f in FINDINGS])
    ys, xs = np.mgrid[0:96, 0:96]
    for i in range(12):
        drawn = draw_image(present, 96, seed=2, image_index=i, patient_id=i + 1)
        x, y, w, h = drawn.boxes[finding]
        change = np.abs(drawn.pixels.astype(float) - render_image(np.zeros_like(present), 96, 2, i, i + 1))
        inside = np.zeros(change.shape, bool)
        inside[y:y + h, x:x + w] = True
        assert change[inside].mean() > 10 * change[~inside].mean(), i
        centre_x, centre_y = (change * xs).sum() / change.sum(), (change * ys).sum() / change.sum()
        assert x <= centre_x <= x + w and y <= centre_y <= y + h, i


def test_a_set_without_its_box_file_gets_it_back_and_keeps_its_images(tmp_path):
    out = tmp_path / "set"
    generate(out, 30, size=32, seed=1, workers=1)
    reference = (out / BBOX_FILE).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images_*/images/*.png")}
    (out / BBOX_FILE).unlink()  # a set written before the generator wrote boxes
    summary = generate(out, 30, size=32, seed=1, workers=1)
    assert not summary["skipped"] and (out / BBOX_FILE).read_bytes() == reference
    assert {p: p.stat().st_mtime_ns for p in out.glob("images_*/images/*.png")} == stamps


def test_only_findings_with_a_place_get_a_box():
    everything = np.ones(len(FINDINGS), bool)
    assert set(draw_image(everything, 64, seed=0, image_index=0, patient_id=1).boxes) == set(PLACED)
    assert set(PLACED) <= set(PAINTERS)


# ---- --check-data -----------------------------------------------------------------------------

def test_check_data_counts_boxes_per_finding_and_split(tiny_data, tmp_path, capsys):
    out, summary = check_data(tiny_data, tmp_path / "run", capsys)

    with open(tiny_data / BBOX_FILE, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    test_images = read_list(tiny_data / "test_list.txt")
    findings = [f for f in FINDINGS if any(row[1] == f for row in rows)]
    assert findings and list(summary["bboxes"]) == findings
    assert summary["bboxes"] == {f: sum(row[1] == f for row in rows) for f in findings}
    assert summary["test"]["bboxes"] == {f: sum(row[1] == f and row[0] in test_images for row in rows)
                                         for f in findings}
    assert all(summary[s]["bboxes"] == {f: 0 for f in findings} for s in ("train", "valid", "phase1_train"))
    assert "boxes per finding:" in out
    nodule_line = next(line for line in out.splitlines() if line.strip().startswith("Nodule")
                       and line.split()[1:] == [str(summary[s]["bboxes"]["Nodule"])
                                                for s in ("train", "valid", "test", "phase1_train", "phase1_valid")])
    assert nodule_line


def test_check_data_without_a_box_file_says_so(data_copy, tmp_path, capsys):
    (data_copy / BBOX_FILE).unlink()
    status, out, err = run_cli(train_main, [
        "--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", data_copy, "--output_dir", tmp_path / "run",
        "--set", "data.synthetic=null", "--check-data"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["bboxes"] == {} and summary["test"]["bboxes"] == {}
    assert "boxes: none" in out
