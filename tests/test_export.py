"""cxrmem-export: ONNX and TorchScript files that compute the PyTorch network's logits, their JSON,
cxrmem-predict --model, and the onnxruntime example of docs/using-a-model.md run as written."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys

import numpy as np
from PIL import Image
import pandas as pd
import pytest
import torch

from cxrmem.data.findings import FINDINGS
from cxrmem.inference.export import main as export_main
from cxrmem.inference.predict import main as predict_main

from helpers import CALLS, IMAGENET_MEAN, IMAGENET_STD, ROOT, make_fake_run, run_cli, write_points

ort = pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.filterwarnings("ignore:.*has no operating points:UserWarning"),
              pytest.mark.filterwarnings("ignore:no operating point for Hernia:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]
TORCHSCRIPT_REFUSED = "TorchScript cannot hold this network's custom autograd step"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fake run with operating points, exported in both formats: (run_dir, model, {format: file})."""
    run_dir, model = make_fake_run(tmp_path_factory.mktemp("export") / "run")
    write_points(run_dir, {f: 0.3 + 0.02 * c for c, f in enumerate(FINDINGS) if f != "Hernia"})
    files = {"onnx": run_dir / "fake.onnx", "torchscript": tmp_path_factory.mktemp("out") / "m.torchscript.pt"}
    assert export_main(["--run", str(run_dir), "--format", "onnx"]) == 0
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = export_main(["--run", str(run_dir), "--format", "torchscript", "--out", str(files["torchscript"])])
    assert status == 0 or (status == 2 and TORCHSCRIPT_REFUSED in errors.getvalue()), errors.getvalue()
    return run_dir, model, files


def needs_torchscript(files):
    """Skip where the memory bank's retrieval is a torch.autograd.Function, which TorchScript refuses
    (with the one-line error checked in the fixture)."""
    if not files["torchscript"].is_file():
        pytest.skip("this memory bank's retrieval is a custom autograd Function; TorchScript cannot hold it")


def logits_of(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


def batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_the_json_describes_input_labels_normalisation_and_operating_points(exported):
    run_dir, _, files = exported
    for fmt, path in files.items():
        if not path.is_file():
            continue
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        assert meta["format"] == fmt and meta["file"] == path.name
        assert meta["labels"] == FINDINGS and meta["image_size"] == 32 and meta["batch_size"] == 8
        np.testing.assert_allclose(meta["mean"], IMAGENET_MEAN, atol=1e-6)
        np.testing.assert_allclose(meta["std"], IMAGENET_STD, atol=1e-6)
        assert meta["input"]["name"] == "images" and meta["output"]["name"] == "logits"
        assert meta["thresholds"]["Hernia"] is None
        assert meta["thresholds"]["Effusion"] == pytest.approx(0.3 + 0.02 * FINDINGS.index("Effusion"))


@pytest.mark.parametrize("n", [1, 5])
def test_onnx_computes_the_logits_for_any_batch_size(exported, n):
    _, model, files = exported
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images = batch(n, seed=n)
    got = session.run(["logits"], {"images": images.numpy()})[0]
    assert got.shape == (n, 14)
    np.testing.assert_allclose(sigmoid(got), sigmoid(logits_of(model, images)), atol=1e-5)


@pytest.mark.parametrize("n", [1, 5])
def test_torchscript_computes_the_logits_for_any_batch_size(exported, n):
    _, model, files = exported
    needs_torchscript(files)
    scripted = torch.jit.load(str(files["torchscript"]))
    images = batch(n, seed=10 + n)
    got = logits_of(scripted, images)
    assert got.shape == (n, 14)
    np.testing.assert_allclose(sigmoid(got), sigmoid(logits_of(model, images)), atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_with_an_export_equals_predict_with_the_run(exported, fmt, tiny_data, tmp_path, capsys):
    run_dir, _, files = exported
    if fmt == "torchscript":
        needs_torchscript(files)
    images = sorted(tiny_data.glob("images_*/images/*.png"))[:9]
    status, _, err = run_cli(predict_main, ["--run", run_dir, "--out", tmp_path / "run.csv", *images], capsys)
    assert status == 0, err
    status, _, err = run_cli(predict_main, ["--model", files[fmt], "--out", tmp_path / "x.csv", *images], capsys)
    assert status == 0, err
    from_run, from_export = pd.read_csv(tmp_path / "run.csv"), pd.read_csv(tmp_path / "x.csv")
    assert list(from_export.columns) == list(from_run.columns)
    assert from_export["path"].tolist() == from_run["path"].tolist()
    np.testing.assert_allclose(from_export[FINDINGS].to_numpy(), from_run[FINDINGS].to_numpy(), atol=1e-5)
    np.testing.assert_array_equal(from_export[CALLS].to_numpy(), from_run[CALLS].to_numpy())
    assert 0 < from_run[CALLS].to_numpy().mean() < 1


def test_the_documented_onnxruntime_example_runs_as_written(exported, tiny_data, tmp_path, capsys, monkeypatch):
    run_dir, _, files = exported
    text = (ROOT / "docs" / "using-a-model.md").read_text()
    section = text.split("## The ONNX file without the training stack", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "cxrmem" not in code and "torch" not in code and len(code.splitlines()) <= 16
    image = sorted(tiny_data.glob("images_*/images/*.png"))[0]
    shutil.copy(files["onnx"], tmp_path / "model.onnx")
    shutil.copy(files["onnx"].with_name("fake.onnx.json"), tmp_path / "model.onnx.json")
    shutil.copy(image, tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "using-a-model.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == FINDINGS
    status, _, err = run_cli(predict_main, ["--run", run_dir, "--out", tmp_path / "p.csv", image], capsys)
    assert status == 0, err
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    for line, finding in zip(lines, FINDINGS):
        assert float(line.split()[1]) == pytest.approx(row[finding], abs=1e-4)
        assert line.endswith("positive") == bool(row[f"{finding}_call"])


def test_a_run_without_memory_exports_in_both_formats(tmp_path, capsys):
    run_dir, model = make_fake_run(tmp_path / "plain", memory=False)
    images = batch(4, seed=0)
    for fmt, name in (("onnx", "fake.onnx"), ("torchscript", "fake.torchscript.pt")):
        status, out, err = run_cli(export_main, ["--run", run_dir, "--format", fmt], capsys)
        assert status == 0, err
        assert "checked against the PyTorch model" in out
        assert json.loads((run_dir / f"{name}.json").read_text())["thresholds"] is None
    session = ort.InferenceSession(str(run_dir / "fake.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sigmoid(session.run(["logits"], {"images": images.numpy()})[0]),
                               sigmoid(logits_of(model, images)), atol=1e-5)
    np.testing.assert_allclose(sigmoid(logits_of(torch.jit.load(str(run_dir / "fake.torchscript.pt")), images)),
                               sigmoid(logits_of(model, images)), atol=1e-5)


def test_mistakes_are_one_line(exported, tmp_path, capsys, monkeypatch):
    run_dir, _, files = exported
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(files["onnx"], lonely)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    status, _, err = run_cli(predict_main, ["--model", lonely, image], capsys)
    assert status == 2 and "lonely.onnx.json not found" in err and err.count("\n") == 1
    status, _, err = run_cli(export_main, ["--run", tmp_path / "nowhere", "--format", "onnx"], capsys)
    assert status == 2 and "config.yaml not found" in err
    status, _, err = run_cli(predict_main, ["--model", files["onnx"], "--heatmaps", tmp_path, image], capsys)
    assert status == 2 and "--heatmaps needs the PyTorch model" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    status, _, err = run_cli(export_main, ["--run", run_dir, "--format", "onnx", "--out", tmp_path / "x.onnx"],
                             capsys)
    assert status == 2 and "pip install 'cxrmem[export]'" in err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.onnx.json").exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_export_is_one_line(exported, tmp_path, capsys, fmt, damage):
    _, _, files = exported
    if fmt == "torchscript":
        needs_torchscript(files)
    source = files[fmt]
    broken = tmp_path / source.name
    data = source.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a model" * 50)
    shutil.copy(f"{source}.json", f"{broken}.json")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    status, _, err = run_cli(predict_main, ["--model", broken, "--out", tmp_path / "p.csv", image], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"exported model {broken} ({broken.stat().st_size:,} bytes) cannot be loaded as {fmt}" in err
    assert "export it again with cxrmem-export" in err and not (tmp_path / "p.csv").exists()
