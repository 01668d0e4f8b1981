"""The pre-resized cache: a valid data set, reused, resumed after a kill, damaged sources reported."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from cxrmem.config import CacheConfig
from cxrmem.data import cache
from cxrmem.data.cache import ERRORS_NAME, MARKER_NAME, build_cache, ensure_cache, main
from cxrmem.data.chestxray14 import load_frame
from cxrmem.data.images import find_damaged_images
from cxrmem.data.prepare import resolve_image_dir
from cxrmem.utils.errors import UserError

from helpers import run_cli

SIZE = 16  # the tiny set is 32 px, so every image is really shrunk
METADATA = ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt")


def image_files(root: Path) -> dict[str, Path]:
    """Relative path -> path of every image file under images_*/images."""
    return {str(p.relative_to(root)): p for p in sorted(root.glob("images_*/images/*")) if not p.name.startswith(".")}


def mtimes(root: Path) -> dict[str, int]:
    return {rel: p.stat().st_mtime_ns for rel, p in image_files(root).items()}


def assert_valid_cache(source: Path, out: Path, suffix: str = ".png") -> None:
    """Same metadata bytes, one readable, shrunk image per source image under the same folder and stem."""
    for name in METADATA:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    expected = {str(Path(rel).with_suffix(suffix)) for rel in image_files(source)}
    assert set(image_files(out)) == expected
    for path in image_files(out).values():
        with Image.open(path) as image:
            image.load()
            assert image.size == (SIZE, SIZE) and image.mode == "L", path
    assert find_damaged_images(image_files(out).values()) == []
    assert [p.name for p in out.rglob(".*")] == [cache.LOCK_NAME]  # no temporary file left
    plain = out.parent / "plain-write.txt"
    plain.write_text("a file as open() makes it")
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file() and p.name != cache.LOCK_NAME}
    assert modes == {stat.S_IMODE(plain.stat().st_mode)}  # readable by whoever may read a plain file
    assert json.loads((out / MARKER_NAME).read_text())["complete"] is True


def assert_same_frame(source: Path, out: Path) -> None:
    original, source_split, _ = load_frame(source, 0.2, 0)
    cached, cached_split, missing = load_frame(out, 0.2, 0)
    assert missing == [] and cached_split == source_split
    assert all(Path(p).is_relative_to(out) for p in cached["path"])
    pd.testing.assert_frame_equal(cached.drop(columns="path"), original.drop(columns="path"))


def test_the_cache_is_a_valid_data_set_and_a_second_run_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "cache"
    status, stdout, err = run_cli(main, ["--data_dir", tiny_data, "--out", out, "--size", SIZE, "--workers", 2],
                                  capsys)
    assert status == 0, err
    n_images = len(image_files(tiny_data))
    assert f"{n_images} written, 0 already there" in stdout
    assert_valid_cache(tiny_data, out)
    assert_same_frame(tiny_data, out)

    before = mtimes(out)
    status, stdout, err = run_cli(main, ["--data_dir", tiny_data, "--out", out, "--size", SIZE], capsys)
    assert status == 0, err
    assert f"0 written, {n_images} already there" in stdout
    assert mtimes(out) == before


def test_a_rerun_repairs_half_written_truncated_and_missing_files(tiny_data, tmp_path):
    out = tmp_path / "cache"
    build_cache(tiny_data, out, size=SIZE, workers=1, progress=False)
    files = list(image_files(out).values())
    truncated, empty, deleted = files[0], files[1], files[2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    empty.write_bytes(b"")
    deleted.unlink()
    leftover = files[3].with_name(f".{files[3].name}.k1ll3d.tmp")  # as cxrmem.utils.io.atomic_path names them
    leftover.write_bytes(files[3].read_bytes()[:10])  # a killed writer's temporary file
    marker = json.loads((out / MARKER_NAME).read_text())
    (out / MARKER_NAME).write_text(json.dumps({**marker, "complete": False}))  # as a kill leaves it

    result = build_cache(tiny_data, out, size=SIZE, workers=2, progress=False)
    assert result.written == 3 and result.skipped == len(files) - 3 and not result.errors
    assert not leftover.exists()
    assert_valid_cache(tiny_data, out)


def test_a_killed_run_is_resumed_to_a_complete_data_set(tiny_data, tmp_path, capsys):
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "cxrmem.data.cache", "--data_dir", str(tiny_data), "--out", str(out),
               "--size", str(SIZE), "--workers", "2"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and len(image_files(out) if out.is_dir() else {}) < 5:
        time.sleep(0.002)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # the command and its worker processes
    process.wait()
    if process.returncode == -signal.SIGKILL:
        assert json.loads((out / MARKER_NAME).read_text())["complete"] is False

    status, stdout, err = run_cli(main, ["--data_dir", tiny_data, "--out", out, "--size", SIZE], capsys)
    assert status == 0, err
    assert_valid_cache(tiny_data, out)
    assert_same_frame(tiny_data, out)


def test_damaged_sources_are_all_reported_and_the_rest_is_cached(data_copy, tmp_path, capsys):
    sources = list(image_files(data_copy).values())
    empty, truncated, garbage = sources[0], sources[5], sources[-1]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"this is not an image at all")
    out = tmp_path / "cache"

    status, _, err = run_cli(main, ["--data_dir", data_copy, "--out", out, "--size", SIZE, "--workers", 2], capsys)
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert f"3 of {len(sources)} source image(s)" in errors[0] and str(out / ERRORS_NAME) in errors[0]
    assert any(str(p) in errors[0] for p in (empty, truncated, garbage))
    listed = dict(line.split("\t") for line in (out / ERRORS_NAME).read_text().splitlines())
    assert set(listed) == {str(empty), str(truncated), str(garbage)}
    assert listed[str(empty)] == "empty file"
    assert len(image_files(out)) == len(sources) - 3
    assert json.loads((out / MARKER_NAME).read_text())["complete"] is False


@pytest.mark.parametrize("case", ["missing data_dir", "no csv", "out is data_dir", "foreign out"])
def test_user_mistakes_are_one_line_errors(data_copy, tmp_path, capsys, case):
    data_dir, out = data_copy, tmp_path / "cache"
    if case == "missing data_dir":
        data_dir = tmp_path / "absent"
    elif case == "no csv":
        (data_copy / "Data_Entry_2017.csv").unlink()
    elif case == "out is data_dir":
        out = data_copy
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    status, _, err = run_cli(main, ["--data_dir", data_dir, "--out", out, "--size", SIZE], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_ensure_cache_builds_once_then_reuses_and_notices_changes(data_copy, monkeypatch):
    cfg = CacheConfig(size=SIZE)  # dir None: <data_dir>_16px beside the data
    out = ensure_cache(data_copy, cfg)
    assert out == data_copy.parent / f"{data_copy.name}_{SIZE}px"
    assert_valid_cache(data_copy, out)
    assert_same_frame(data_copy, out)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a complete cache was rebuilt")

    with monkeypatch.context() as patched:
        patched.setattr(cache, "build_cache", no_rebuild)
        assert ensure_cache(data_copy, cfg) == out
        assert resolve_image_dir(SimpleNamespace(data_dir=str(data_copy), cache=cfg, missing_images="error")) == out

    with (data_copy / "test_list.txt").open("a") as fh:  # an edited source is noticed
        fh.write("\n")
    before = mtimes(out)
    assert ensure_cache(data_copy, cfg) == out
    assert (out / "test_list.txt").read_bytes() == (data_copy / "test_list.txt").read_bytes()
    assert mtimes(out) == before  # images were only checked, not rewritten


def test_ensure_cache_raises_on_damaged_sources_unless_dropping(data_copy, tmp_path):
    bad = next(iter(image_files(data_copy).values()))
    bad.write_bytes(b"")
    cfg = SimpleNamespace(size=SIZE, dir=str(tmp_path / "c"), format="png")
    with pytest.raises(UserError, match=r"1 of \d+ source image\(s\) are empty"):
        ensure_cache(data_copy, cfg)
    with pytest.warns(UserWarning, match="1 unreadable source images"):
        out = ensure_cache(data_copy, cfg, missing_images="drop")
    frame, _, missing = load_frame(out, 0.2, 0, missing_images="drop")
    assert missing == [bad.name] and len(frame) == len(image_files(data_copy)) - 1


def test_a_cache_of_another_size_is_not_overwritten(tiny_data, tmp_path):
    out = tmp_path / "cache"
    build_cache(tiny_data, out, size=SIZE, progress=False)
    with pytest.raises(UserError, match="holds a cache of another kind"):
        build_cache(tiny_data, out, size=SIZE + 8, progress=False)


def test_jpg_cache_writes_jpegs_under_the_same_stems(tiny_data, tmp_path):
    out = tmp_path / "cache_jpg"
    result = build_cache(tiny_data, out, size=SIZE, fmt="jpg", workers=2, progress=False)
    assert result.complete and result.written == len(image_files(tiny_data))
    assert_valid_cache(tiny_data, out, suffix=".jpg")
    for path in list(image_files(out).values())[:5]:
        with Image.open(path) as image:
            assert image.format == "JPEG"


def test_jpg_cache_loads_like_the_source(tiny_data, tmp_path):
    out = tmp_path / "cache_jpg"
    build_cache(tiny_data, out, size=SIZE, fmt="jpg", progress=False)
    assert_same_frame(tiny_data, out)


def test_ctrl_c_says_how_to_resume(tiny_data, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "build_cache", interrupted)
    status, _, err = run_cli(main, ["--data_dir", tiny_data, "--out", tmp_path / "cache", "--size", SIZE], capsys)
    assert status == 130
    assert err.strip() == "interrupted: finished files are kept; run the same command again to continue"


def test_a_cache_without_a_size_is_built_at_the_training_size(tiny_data, tmp_path):
    """``data.cache: {}`` (as the guide's experiments have it): the copy is made at data.image_size, so the
    loader reads images that need no resizing."""
    from cxrmem.config import from_dict
    from cxrmem.data.loaders import read_xray

    data = from_dict({"data": {"data_dir": str(tiny_data), "image_size": 24, "cache": {"dir": str(tmp_path / "c")}}}).data
    assert data.cache.size is None
    out = resolve_image_dir(data)
    assert out == tmp_path / "c" and json.loads((out / MARKER_NAME).read_text())["size"] == 24
    first = next(iter(image_files(out).values()))
    with Image.open(first) as image:
        assert image.size == (24, 24)
    assert read_xray(first, 24).shape[-2:] == (24, 24)


def test_every_guide_experiment_trains_from_the_cache_with_the_originals_one_key_away():
    from cxrmem.experiment import experiment_config_path
    from cxrmem.config import load_config
    from cxrmem.config.reference import legacy_experiments

    from helpers import EXPERIMENTS

    files = [p for p in EXPERIMENTS.glob("*.yaml") if p.stem != "demo_synthetic"]
    files += [experiment_config_path(name) for name in legacy_experiments()]
    assert len(files) >= 24
    for path in files:
        assert load_config(path).data.cache == CacheConfig(), path  # on, at image_size
        assert load_config(path, ["data.cache=null"]).data.cache is None, path


def test_an_unwritable_cache_folder_is_one_line_naming_the_way_out(tiny_data, tmp_path, capsys):
    from cxrmem.experiment import train_main

    from helpers import EXPERIMENTS

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status, _, err = run_cli(train_main, ["--config", EXPERIMENTS / "demo_synthetic.yaml", "--data_dir", tiny_data,
                                          "--output_dir", tmp_path / "run", "--set", "data.synthetic=null",
                                          "--set", f"data.cache.dir={blocker / 'cache'}", "--check-data"], capsys)
    error = err.splitlines()[-1]  # after the line announcing the build
    assert status == 2 and error.startswith("error: ") and "Traceback" not in err, err
    assert f"cannot write the cache folder {blocker / 'cache'}" in error and "data.cache: null" in error
