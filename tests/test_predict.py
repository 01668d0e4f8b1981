"""cxrmem-predict: inputs, CSV columns, calls at the operating points, unreadable files, DICOM, heatmaps.

The fast tests use a run folder holding an untrained tiny network (its memory bank
filled); expected probabilities come from an independent preprocessing (PIL pixels,
/255, ImageNet mean and std written out here) through the same network. The slow
tests train a tiny run once and compare with ``train.py --evaluate``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cxrmem.inference.predict
from cxrmem.data.findings import FINDINGS
from cxrmem.inference.predict import collect_images, main as predict_main

from helpers import CALLS, IMAGENET_MEAN, IMAGENET_STD, SIZE, make_fake_run, run_cli, write_dicom, write_points

pytestmark = pytest.mark.filterwarnings("ignore:.*has no operating points:UserWarning")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("fake") / "run")


@pytest.fixture
def pngs(tiny_data, tmp_path) -> list[Path]:
    """Twelve of the tiny data set's PNGs, in two folders (one nested)."""
    sources = sorted(tiny_data.glob("images_*/images/*.png"))[:12]
    targets = []
    for k, source in enumerate(sources):
        target = tmp_path / "in" / ("" if k < 6 else "nested/deeper") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        targets.append(target)
    return targets


def expected_probs(model, paths) -> np.ndarray:
    """sigmoid(model(x)) with x built here: 8-bit grey -> 3 channels -> /255 -> ImageNet normalisation."""
    grey = np.stack([np.asarray(Image.open(p).convert("L"), np.float32) / 255 for p in paths])
    x = (grey[:, None] - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x.astype(np.float32)))).numpy()


def predict(capsys, tmp_path, *args, name="out.csv"):
    out = tmp_path / name
    status, stdout, stderr = run_cli(predict_main, ["--out", out, *args], capsys)
    return status, (pd.read_csv(out) if status == 0 else None), stdout, stderr


def probs_by_name(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(name=table["path"].map(lambda p: Path(p).name)).set_index("name")[FINDINGS]


# --------------------------------------------------------------------------- inputs


def test_paths_folders_and_lists_are_collected_in_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/b.png", "d/a.JPG", "d/sub/c.dcm", "d/sub/notes.txt", "d/x.jpeg"):
        (tmp_path / rel).write_bytes(b"x")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text("# comment\n\nrel/one.png\n  /abs/two.dcm  \n")
    (lists / "with_col.csv").write_text("id,path\n1,p/three.png\n2,/abs/four.png\n")
    (lists / "first_col.csv").write_text("file,label\nfive.png,x\n")
    (lists / "headless.csv").write_text("six.dcm,1\nseven.png,0\n")
    (lists / "empty.csv").write_text("")
    (tmp_path / "single.png").write_bytes(b"x")
    got = collect_images([str(tmp_path / "d"), str(lists / "l.txt"), str(lists / "with_col.csv"),
                          str(lists / "first_col.csv"), str(lists / "headless.csv"), str(lists / "empty.csv"),
                          str(tmp_path / "single.png")])
    assert got == [tmp_path / "d/a.JPG", tmp_path / "d/b.png", tmp_path / "d/sub/c.dcm", tmp_path / "d/x.jpeg",
                   lists / "rel/one.png", Path("/abs/two.dcm"), lists / "p/three.png", Path("/abs/four.png"),
                   lists / "five.png", lists / "six.dcm", lists / "seven.png", tmp_path / "single.png"]


def test_a_listed_file_whose_name_starts_with_a_hash_is_not_a_comment(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# scans of ward 3\n#12_a.png\n  # another comment\nb.dcm\n")
    assert collect_images([str(listing)]) == [tmp_path / "#12_a.png", tmp_path / "b.dcm"]


def test_a_folder_in_a_list_is_searched_as_on_the_command_line(tmp_path):
    (tmp_path / "scans" / "sub").mkdir(parents=True)
    for rel in ("scans/b.png", "scans/sub/a.dcm", "scans/readme.md", "extra.png"):
        (tmp_path / rel).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("scans\nextra.png\n")
    assert collect_images([str(listing)]) == collect_images([str(tmp_path / "scans"), str(tmp_path / "extra.png")])
    assert collect_images([str(listing)]) == [tmp_path / "scans/b.png", tmp_path / "scans/sub/a.dcm",
                                              tmp_path / "extra.png"]


def test_a_command_line_path_that_does_not_exist_stops_before_anything_runs(tmp_path, capsys, pngs):
    # the run folder does not exist either: the path is checked first, before any model is loaded
    status, _, _, err = predict(capsys, tmp_path, "--run", tmp_path / "no_run", pngs[0], tmp_path / "typo.png")
    assert status == 2 and err == f"error: {tmp_path / 'typo.png'} does not exist; check the path\n"
    assert not (tmp_path / "out.csv").exists()
    status, _, _, err = predict(capsys, tmp_path, "--run", tmp_path / "no_run", "--heatmaps", tmp_path / "maps",
                                "--heatmap-findings", "Effusion", "Mass", pngs[0])
    assert status == 2 and "Mass is a finding: name findings as --heatmap-findings A,B" in err


def test_nothing_to_predict_is_one_line(tmp_path, fake_run, capsys, pngs):
    (tmp_path / "empty").mkdir()
    status, _, _, err = predict(capsys, tmp_path, "--run", fake_run[0], tmp_path / "empty")
    assert status == 2 and err.startswith("error: no images in") and err.count("\n") == 1
    status, _, _, err = predict(capsys, tmp_path, tmp_path / "empty")
    assert status == 2 and "--run RUN_DIR" in err
    status, _, _, err = predict(capsys, tmp_path, "--run", tmp_path / "nowhere", pngs[0])
    assert status == 2 and "config.yaml not found" in err


# --------------------------------------------------------------------------- predictions


def test_a_folder_of_pngs_gives_one_row_per_image_with_the_evaluation_preprocessing(
        fake_run, pngs, tmp_path, capsys):
    run_dir, model = fake_run
    expected = expected_probs(model, pngs)
    thresholds = {f: float(np.median(expected[:, c])) for c, f in enumerate(FINDINGS)}
    thresholds["Hernia"] = None
    write_points(run_dir, thresholds)
    try:
        with pytest.warns(UserWarning, match="no operating point for Hernia") as caught:
            status, table, out, err = predict(capsys, tmp_path, "--run", run_dir, tmp_path / "in")
    finally:
        (run_dir / "operating_points.json").unlink()
    assert status == 0, err
    assert len([w for w in caught if "operating point" in str(w.message)]) == 1
    assert list(table.columns) == ["path", *FINDINGS, *CALLS]
    assert sorted(table["path"]) == sorted(map(str, pngs)) and len(table) == len(pngs)
    order = [Path(p) for p in table["path"]]
    got = table[FINDINGS].to_numpy()
    np.testing.assert_allclose(got, expected_probs(model, order), atol=1e-5)
    limits = np.array([0.5 if thresholds[f] is None else thresholds[f] for f in FINDINGS])
    np.testing.assert_array_equal(table[CALLS].to_numpy(), (expected_probs(model, order) >= limits).astype(int))
    assert 0 < table[CALLS[:-1]].to_numpy().mean() < 1  # the medians split the images
    assert "wrote" in out and str(len(pngs)) in out and err == ""


def test_without_operating_points_calls_are_at_one_half_with_one_warning(fake_run, pngs, tmp_path, capsys):
    run_dir, model = fake_run
    with pytest.warns(UserWarning, match="no operating points") as caught:
        status, table, _, err = predict(capsys, tmp_path, "--run", run_dir, *pngs[:3])
    assert status == 0, err
    assert len([w for w in caught if "operating point" in str(w.message)]) == 1
    np.testing.assert_array_equal(table[CALLS].to_numpy(), (table[FINDINGS].to_numpy() >= 0.5).astype(int))


def test_batch_size_and_list_input_do_not_change_the_numbers(fake_run, pngs, tmp_path, capsys):
    run_dir, model = fake_run
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in pngs))
    status, table, _, err = predict(capsys, tmp_path, "--run", run_dir, "--batch-size", "5", listing)
    assert status == 0, err
    assert [Path(p) for p in table["path"]] == pngs
    np.testing.assert_allclose(table[FINDINGS].to_numpy(), expected_probs(model, pngs), atol=1e-5)


def test_dicom_files_give_the_probabilities_of_their_pngs(fake_run, pngs, tmp_path, capsys):
    run_dir, _ = fake_run
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k, png in enumerate(pngs):
        pixels = np.asarray(Image.open(png).convert("L"))
        photometric = "MONOCHROME1" if k % 2 else "MONOCHROME2"
        stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
        write_dicom(folder / f"{png.stem}.dcm", stored, photometric, bits=8)
    status, from_dicom, _, err = predict(capsys, tmp_path, "--run", run_dir, folder, name="dcm.csv")
    assert status == 0, err
    status, from_png, _, err = predict(capsys, tmp_path, "--run", run_dir, *pngs, name="png.csv")
    assert status == 0, err
    assert len(from_dicom) == len(pngs)
    dicom = from_dicom.assign(stem=from_dicom["path"].map(lambda p: Path(p).stem)).set_index("stem")
    png = from_png.assign(stem=from_png["path"].map(lambda p: Path(p).stem)).set_index("stem")
    np.testing.assert_allclose(dicom.loc[png.index, FINDINGS].to_numpy(), png[FINDINGS].to_numpy(), atol=1e-6)


def test_unreadable_files_are_named_on_stderr_and_left_out(fake_run, pngs, tmp_path, capsys):
    run_dir, model = fake_run
    damaged = pngs[2]
    damaged.write_bytes(damaged.read_bytes()[:60])
    text = tmp_path / "in" / "nested" / "notes.png"
    text.write_text("not an image")
    absent = tmp_path / "absent.png"  # listed, not named on the command line: skipped like a damaged file
    listing = tmp_path / "list.txt"
    listing.write_text(f"{absent}\n")
    status, table, out, err = predict(capsys, tmp_path, "--run", run_dir, tmp_path / "in", listing)
    assert status == 0, err
    good = [p for p in pngs if p != damaged]
    assert sorted(table["path"]) == sorted(map(str, good))
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("skipped ") for line in lines)
    assert {line.split(": ", 1)[0][len("skipped "):] for line in lines} == {str(damaged), str(text), str(absent)}
    assert "3 skipped" in out
    np.testing.assert_allclose(probs_by_name(table).loc[[p.name for p in good]].to_numpy(),
                               expected_probs(model, good), atol=1e-5)


def test_when_no_file_can_be_read_the_exit_status_is_2(fake_run, tmp_path, capsys):
    bad = [tmp_path / "a.png", tmp_path / "b.dcm"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad[1].write_bytes(b"nothing")
    status, _, _, err = predict(capsys, tmp_path, "--run", fake_run[0], *bad)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("error: none of the 2 image(s) could be read")
    assert not (tmp_path / "out.csv").exists()


# --------------------------------------------------------------------------- heatmaps


@pytest.fixture
def fake_explain(monkeypatch):
    """A stand-in cxrmem.inference.explain with the contract's signatures, recording its calls."""
    calls = {"grad_cam": [], "save_overlay": []}

    def grad_cam(model, images, class_indices):
        assert not model.training and images.ndim == 4
        calls["grad_cam"].append((images.shape[0], list(class_indices)))
        side = images.shape[-1]
        return np.full((images.shape[0], len(class_indices), side, side), 0.5, np.float32)

    def save_overlay(image, heatmap, path, caption, metadata):
        assert image.dtype == np.uint8 and image.ndim == 2 and heatmap.ndim == 2
        calls["save_overlay"].append(Path(path))
        calls.setdefault("captions", []).append((caption, metadata))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    module = types.SimpleNamespace(grad_cam=grad_cam, save_overlay=save_overlay)
    monkeypatch.setattr(cxrmem.inference.predict, "explain", module)
    return calls


def test_heatmaps_for_the_positive_calls(fake_run, pngs, tmp_path, capsys, fake_explain):
    run_dir, _ = fake_run
    write_points(run_dir, {"Cardiomegaly": 0.0, "Effusion": 2.0, "Nodule": 0.0})  # always, never, always
    try:
        with pytest.warns(UserWarning):
            status, table, _, err = predict(capsys, tmp_path, "--run", run_dir, "--heatmaps", tmp_path / "maps",
                                            *pngs[:5])
    finally:
        (run_dir / "operating_points.json").unlink()
    assert status == 0, err
    expected = set()
    for path, row in zip(table["path"], table[CALLS].to_numpy()):
        expected |= {tmp_path / "maps" / f"{Path(path).stem}_{FINDINGS[c]}.png" for c in np.flatnonzero(row)}
    assert set(fake_explain["save_overlay"]) == expected == set((tmp_path / "maps").iterdir())
    assert {f"{Path(p).stem}_Cardiomegaly.png" for p in table["path"]} <= {p.name for p in expected}
    assert not any("Effusion" in p.name for p in expected)


def test_heatmaps_for_chosen_findings(fake_run, pngs, tmp_path, capsys, fake_explain):
    with pytest.warns(UserWarning):
        status, _, _, err = predict(capsys, tmp_path, "--run", fake_run[0], "--heatmaps", tmp_path / "maps",
                                    "--heatmap-findings", "Hernia,Mass", *pngs[:3])  # paths after the option
    assert status == 0, err
    assert fake_explain["grad_cam"] == [(3, [FINDINGS.index("Mass"), FINDINGS.index("Hernia")])]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(
        f"{p.stem}_{f}.png" for p in pngs[:3] for f in ("Hernia", "Mass"))
    status, _, _, err = predict(capsys, tmp_path, "--run", fake_run[0], "--heatmaps", tmp_path / "maps",
                                *pngs[:3], "--heatmap-findings", "Cardiomegally")
    assert status == 2 and "did you mean Cardiomegaly?" in err


def test_heatmaps_without_grad_cam_name_the_extra(fake_run, pngs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    status, _, _, err = predict(capsys, tmp_path, "--run", fake_run[0], "--heatmaps", tmp_path / "maps", pngs[0])
    assert status == 2
    assert err.strip() == "error: --heatmaps needs the grad-cam package; pip install 'cxrmem[explain]'"


# --------------------------------------------------------------------------- a trained run (slow)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data, finished_run):
    """The session's finished run, copied, then evaluated again with --evaluate: (run_dir, predictions)."""
    from cxrmem.experiment import train_main

    config, finished = finished_run
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(finished, run_dir)
    common = ["--config", str(config), "--data_dir", str(tiny_data), "--output_dir", str(run_dir)]
    (run_dir / "tiny_predictions.pt").unlink()
    assert train_main([*common, "--evaluate"]) == 0
    predictions = torch.load(run_dir / "tiny_predictions.pt", weights_only=True)
    return run_dir, predictions


def evaluated(predictions, split: str = "test") -> pd.DataFrame:
    """The probabilities of ``split`` in a run's predictions file, by image name."""
    rows = [i for i, s in enumerate(predictions["split"]) if s == split]
    return pd.DataFrame(predictions["probs"][rows].numpy(), columns=predictions["labels"],
                        index=[predictions["image_index"][i] for i in rows])


def data_set_paths(tiny_data, names) -> list[Path]:
    from cxrmem.data.chestxray14 import locate_images

    found = locate_images(tiny_data)
    return [found[name] for name in names]


@pytest.mark.slow
def test_predict_gives_the_probabilities_of_evaluate(trained_run, tiny_data, tmp_path, capsys):
    run_dir, predictions = trained_run
    expected = evaluated(predictions)
    assert len(expected) > 10
    status, table, _, err = predict(capsys, tmp_path, "--run", run_dir, *data_set_paths(tiny_data, expected.index))
    assert status == 0, err
    got = probs_by_name(table)
    assert sorted(got.index) == sorted(expected.index)
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-5)
    assert expected.to_numpy().std() > 1e-3  # a trained network, not a constant


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_of_the_trained_run_gives_the_probabilities_of_evaluate(trained_run, tiny_data, tmp_path,
                                                                         capsys, fmt):
    from cxrmem.inference.export import main as export_main

    run_dir, predictions = trained_run
    expected = evaluated(predictions)
    model = tmp_path / f"tiny.{fmt}"
    status, _, err = run_cli(export_main, ["--run", run_dir, "--format", fmt, "--out", model], capsys)
    if fmt == "torchscript" and status == 2 and "custom autograd step" in err:
        pytest.skip("this memory bank's retrieval is a custom autograd Function; TorchScript cannot hold it")
    assert status == 0, err
    status, table, _, err = predict(capsys, tmp_path, "--model", model, *data_set_paths(tiny_data, expected.index))
    assert status == 0, err
    np.testing.assert_allclose(probs_by_name(table).loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_real_heatmaps_of_the_trained_run(trained_run, tiny_data, tmp_path, capsys):
    pytest.importorskip("pytorch_grad_cam")
    run_dir, predictions = trained_run
    names = list(evaluated(predictions).index[:2])
    status, table, out, err = predict(capsys, tmp_path, "--run", run_dir, "--heatmaps", tmp_path / "maps",
                                      *data_set_paths(tiny_data, names), "--heatmap-findings", "Cardiomegaly")
    assert status == 0, err
    assert f"wrote 2 heatmap(s) to {tmp_path / 'maps'}" in out
    written = sorted((tmp_path / "maps").iterdir())
    assert [p.name for p in written] == sorted(f"{Path(n).stem}_Cardiomegaly.png" for n in names)
    probability = dict(zip(table["path"].map(lambda p: Path(p).stem), table["Cardiomegaly"]))
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > SIZE  # the caption and colour scale around it
            assert image.text["finding"] == "Cardiomegaly"
            stem = path.stem.removesuffix("_Cardiomegaly")
            assert float(image.text["probability"]) == pytest.approx(probability[stem], abs=1e-5)


def test_a_command_off_a_terminal_prints_only_its_own_lines(trained_run, tiny_data, tmp_path):
    """No library deprecation warning, no progress-bar glyph before 'wrote', the heatmaps mentioned."""
    run_dir, predictions = trained_run
    images = data_set_paths(tiny_data, list(evaluated(predictions).index[:2]))
    done = subprocess.run([sys.executable, "-m", "cxrmem.predict", "--run", str(run_dir), "--out",
                           str(tmp_path / "p.csv"), "--heatmaps", str(tmp_path / "maps"), *map(str, images)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "jit" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
    assert all(line.startswith("warning: ") for line in done.stderr.splitlines()), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'p.csv'}: 2 image(s)", done.stdout  # nothing drawn before it
    written = len(list((tmp_path / "maps").glob("*.png")))
    assert lines[1] == f"wrote {written} heatmap(s) to {tmp_path / 'maps'} (<image stem>_<finding>.png)"


def test_heatmaps_when_nothing_is_called_positive_say_so(fake_run, pngs, tmp_path, capsys, fake_explain):
    run_dir, _ = fake_run
    write_points(run_dir, {f: 2.0 for f in FINDINGS})  # never positive
    try:
        status, _, out, err = predict(capsys, tmp_path, "--run", run_dir, "--heatmaps", tmp_path / "maps", *pngs[:2])
    finally:
        (run_dir / "operating_points.json").unlink()
    assert status == 0, err
    assert "no heatmaps: no finding was called positive on these images" in out
    assert not (tmp_path / "maps").exists()
