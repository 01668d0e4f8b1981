"""Bad input is one clear line and exit 2 with the run folder untouched; runs resume after a kill;
checkpoint writes are atomic; a non-finite loss stops cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from cxrmem.utils import io
from cxrmem.experiment import train_main
from cxrmem.utils.errors import UserError
from cxrmem.train import phases
from cxrmem.train.callbacks import EarlyStop, EpochLog, SaveCheckpoint
from cxrmem.train.resume import Progress

from helpers import ROOT, on_every_learner, refuse_network, run_cli, tiny_config

def resumable_config(tmp_path, freeze=1, total=1, epochs2=1, name="tiny.yaml"):
    """The tiny experiment, bit-exact (``train.deterministic``, the resume contract on a GPU too)
    and with patience enough that early stopping never ends it."""
    return tiny_config(tmp_path / name, train={"deterministic": True},
                       phase1={"freeze_epochs": freeze, "total_epochs": total, "early_stopping_patience": 20},
                       phase2={"epochs": epochs2, "early_stopping_patience": 20})


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def expect_one_line_error(capsys, argv, fragment, folder=None):
    before = snapshot(folder) if folder else None
    status, _, err = run_cli(train_main, argv, capsys)
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err, err
    if folder:
        assert snapshot(folder) == before
    return err


# --------------------------------------------------------------------------- bad input


def test_config_file_missing(capsys, tmp_path):
    expect_one_line_error(capsys, ["--config", tmp_path / "absent.yaml"], "not found")


def test_yaml_syntax_error(capsys, tmp_path, finished_run):
    _, run_dir = finished_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: [resnet18\n")
    expect_one_line_error(capsys, ["--config", bad, "--output_dir", run_dir], "YAML syntax error", run_dir)


@pytest.mark.parametrize("override, fragment", [
    ("memory.bank_sise=3", "did you mean bank_size?"),
    ("memory.bank_size=many", "memory.bank_size: expected an integer"),
    ("phase2.memory_momentum=1.5", "out of range"),
    ("memory.top_k=99", "larger than memory.bank_size"),
])
def test_config_mistakes(capsys, finished_run, tiny_data, override, fragment):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--set", override], fragment, run_dir)


@pytest.mark.parametrize("override, fragment", [
    ("memory.bank_sise=3", "memory.bank_sise: unknown key in --set memory.bank_sise=3;"),
    ("data.foo.bar=1", "data.foo: unknown key in --set data.foo.bar=1;"),
    ("phase2.lr_max=.inf", "phase2.lr_max: inf in --set phase2.lr_max=.inf is not a finite number"),
])
def test_a_set_mistake_is_blamed_on_the_command_line_not_the_file(capsys, finished_run, tiny_data, override,
                                                                   fragment):
    config, run_dir = finished_run
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                         "--set", override], fragment, run_dir)
    assert str(config) not in err


@pytest.mark.parametrize("backbone, fragment", [
    ("efficientnet-b0", "did you mean timm/efficientnet_b0?"),
    ("resnet-18", "did you mean resnet18?"),
    ("timm/efficentnet_b0", "did you mean timm/efficientnet_b0?"),
    ("timm/vit_tiny_patch16_224", "timm/vit_tiny_patch16_224 takes 224 px images only, and data.image_size is 32"),
])
def test_the_backbone_is_checked_when_the_config_is_loaded(capsys, finished_run, tmp_path, backbone, fragment):
    """Before any data is read (the data folder does not exist), and by --print-config too."""
    config, run_dir = finished_run
    for extra in ([], ["--print-config"]):
        expect_one_line_error(capsys, ["--config", config, "--data_dir", tmp_path / "nowhere", "--output_dir",
                                       run_dir, "--set", f"model.backbone={backbone}", *extra], fragment, run_dir)


def test_a_vit_at_its_own_size_passes_the_check(capsys, finished_run, tmp_path):
    config, _ = finished_run
    status, out, err = run_cli(train_main, ["--config", config, "--set", "model.backbone=timm/vit_tiny_patch16_224",
                                            "--set", "data.image_size=224", "--print-config"], capsys)
    assert status == 0, err


def test_data_dir_missing(capsys, finished_run, tmp_path):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tmp_path / "nowhere", "--output_dir", run_dir],
                          "does not exist", run_dir)


def test_csv_missing_columns(capsys, finished_run, data_copy):
    config, run_dir = finished_run
    csv_path = data_copy / "Data_Entry_2017.csv"
    csv_path.write_text(csv_path.read_text().replace("Finding Labels", "Findings"))
    expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                          "missing required column(s) Finding Labels", run_dir)


def test_finding_outside_the_14(capsys, finished_run, data_copy):
    config, run_dir = finished_run
    csv_path = data_copy / "Data_Entry_2017.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("No Finding", "Normal", 1))
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "No Finding" in row)
    expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                          f"line {line} has the unknown finding label 'Normal'", run_dir)


def test_a_label_typo_suggests_the_finding(capsys, finished_run, data_copy):
    config, run_dir = finished_run
    csv_path = data_copy / "Data_Entry_2017.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Effusion", "Efusion", 1))
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                                "unknown finding label 'Efusion'", run_dir)
    assert "did you mean 'Effusion'?" in err


def test_images_missing_on_disk(capsys, finished_run, data_copy):
    config, run_dir = finished_run
    next(data_copy.glob("images_*/images/*.png")).unlink()
    expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                          "1 of", run_dir)


def test_damaged_images_are_all_listed_before_training(capsys, tiny_data, data_copy, tmp_path):
    config = resumable_config(tmp_path)
    images = sorted(data_copy.glob("images_*/images/*.png"))
    images[0].write_bytes(b"")
    images[1].write_bytes(images[1].read_bytes()[: 100])
    images[2].write_bytes(b"garbage" * 20)
    run_dir = tmp_path / "run"
    expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                          "3 image file(s) are empty, truncated or unreadable")
    listed = (run_dir / "damaged_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(p) for p in images[:3])
    assert not (run_dir / "models").exists()  # training never started


def test_model_path_missing(capsys, finished_run, tiny_data, tmp_path):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--evaluate", "--model_path", tmp_path / "none.pth"], "not found", run_dir)


def test_evaluating_another_checkpoint_writes_beside_the_runs_results(capsys, finished_run, tiny_data, tmp_path):
    config, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    other = run_dir / "models/tiny_phase1.pth"
    status, out, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                            "--evaluate", "--model_path", other], capsys)
    assert status == 0, err
    beside = run_dir / "evaluations" / "tiny_phase1"
    assert f"results go to {beside}" in out
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("evaluations/")} == before  # the run's own: untouched
    for name in ("metrics.json", "report.md", "config.yaml", "roc_test.png"):
        assert (beside / name).is_file(), name
    assert (beside / "model_path.txt").read_text().strip() == str(other.resolve())
    own = json.loads((run_dir / "metrics.json").read_text())["test"]["mean_auc"]
    theirs = json.loads((beside / "metrics.json").read_text())["test"]["mean_auc"]
    assert own != theirs  # the phase-1 weights are another model


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_checkpoint_says_so_with_its_size(capsys, finished_run, tiny_data, tmp_path, cut):
    config, run_dir = finished_run
    whole = (run_dir / "models/tiny_phase2.pth").read_bytes()
    short = tmp_path / "short.pth"
    short.write_bytes(whole[: int(len(whole) * cut)])
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                         "--evaluate", "--model_path", short],
                                f"is damaged or truncated ({short.stat().st_size:,} bytes", run_dir)
    assert err.rstrip().endswith("a complete .pth of this run")  # the advice is whole, not cut mid-word


@pytest.mark.parametrize("content, fragment", [(b"", "is empty (0 bytes)"),
                                               (b"not a checkpoint at all", "is not a PyTorch checkpoint (23 bytes)")])
def test_a_file_that_is_no_checkpoint_says_what_it_is(capsys, finished_run, tiny_data, tmp_path, content, fragment):
    config, run_dir = finished_run
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--evaluate", "--model_path", bad], fragment, run_dir)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint does: run a command when unpickled
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_code_in_it_is_refused_and_never_run(capsys, finished_run, tiny_data, tmp_path):
    config, run_dir = finished_run
    hostile = tmp_path / "hostile.pth"
    torch.save({"weights": _Payload(tmp_path / "ran")}, hostile)
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--evaluate", "--model_path", hostile], "holds Python objects beyond tensors",
                          run_dir)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("override", ["model.backbone=resnet34", "model.findings=Atelectasis,Effusion", "memory.bank_size=32"])
def test_checkpoint_of_another_model(capsys, finished_run, tiny_data, override):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--set", override, "--evaluate",
                                   "--model_path", run_dir / "models/tiny_phase2.pth"],
                          "does not match this model", run_dir)


def test_pretrained_weights_not_available_offline(capsys, finished_run, tiny_data, tmp_path, monkeypatch):
    config, run_dir = finished_run
    refuse_network(monkeypatch)  # the weights would be downloaded on first use: this test never goes online
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", tmp_path / "new",
                                   "--set", "model.backbone=resnet18",  # torchvision's; timm's: test_weights
                                   "--set", "model.pretrained=true"], "model.pretrained: false")


def test_finished_run_of_another_config_is_not_overwritten(capsys, finished_run, tiny_data):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--set", "memory.top_k=2"], "--overwrite", run_dir)


def test_the_same_command_again_never_retrains_a_finished_run(capsys, finished_run, tiny_data):
    config, run_dir = finished_run
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir],
                                "holds a finished run of this configuration", run_dir)
    assert "--overwrite" in err and "--output_dir" in err


def test_the_same_command_again_names_where_an_interrupted_run_stopped(capsys, finished_run, tiny_data, tmp_path):
    config, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace(str(finished), str(run_dir)))  # the copy's own folder
    (run_dir / "metrics.json").unlink()
    progress = {"phase": 1, "stage": "unfrozen", "epochs_done": 3, "stage_complete": False}
    io.torch_save({"progress": progress}, run_dir / "models/tiny_resume.pth")
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir],
                                "interrupted run of this configuration (stopped in phase 1, unfrozen stage, "
                                "after 3 epochs)", run_dir)
    assert "--resume" in err and "--overwrite" in err
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--set", "memory.top_k=2"], "interrupted run of a different configuration",
                          run_dir)


def test_resume_with_nothing_to_resume(capsys, finished_run, tiny_data):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                   "--resume"], "nothing to resume", run_dir)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not found"):
        train_main(["--config", str(tmp_path / "absent.yaml"), "--debug"])


# --------------------------------------------------------------------------- atomic writes


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    target = tmp_path / "models" / "best.pth"
    io.torch_save({"w": torch.ones(3)}, target)

    def dies_halfway(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.torch_save({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(io.torch_load(target)["w"], torch.ones(3))
    assert [p.name for p in target.parent.iterdir()] == ["best.pth"]


# --------------------------------------------------------------------------- non-finite loss


class PoisonedLoss(Callback):
    """The loss of the second training batch of each fit's second epoch becomes NaN."""

    def after_create(self):
        clean, learn, calls = self.learn.loss_func, self.learn, {"n": 0}

        def loss(pred, target):
            value = clean(pred, target)
            if learn.training and learn.epoch == 1:
                calls["n"] += 1
                if calls["n"] == 2:
                    return value * float("nan")
            return value

        self.learn.loss_func = loss


def test_non_finite_loss_stops_with_phase_epoch_batch_and_keeps_the_best(capsys, tiny_data, tmp_path, monkeypatch):
    on_every_learner(monkeypatch, PoisonedLoss)
    run_dir = tmp_path / "run"
    status, _, err = run_cli(train_main, ["--config", resumable_config(tmp_path, freeze=1, total=2), "--data_dir",
                                          tiny_data, "--output_dir", run_dir], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "non-finite in phase 1, epoch 3, batch 2" in err  # as the epoch log counts: frozen 1, unfrozen 2, 3
    best = run_dir / "models/tiny_phase1.pth"
    state = io.torch_load(best)  # written in epoch 0, intact and loadable
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list(run_dir.rglob("*.tmp"))


# --------------------------------------------------------------------------- kill and resume


def rows(path):
    return len(pd.read_csv(path)) if path.is_file() else 0


RESUMED = dict(freeze=1, total=2, epochs2=3)


def resume_point(run_dir):
    """(phase, stage, epochs done, stage complete) of the run's resume file, None while there is none."""
    try:
        p = io.torch_load(run_dir / "models/tiny_resume.pth")["progress"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return p["phase"], p["stage"], p["epochs_done"], p["stage_complete"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    """The run that the killed-and-resumed ones must reproduce: same config, never interrupted, its own process."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(resumable_config(tmp, **RESUMED)),
                           "--data_dir", str(tiny_data), "--output_dir", str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


class OnATerminal:
    """train.py with stdout and stderr on a pseudo-terminal (fastai's progress bars on), its output read
    by a thread as it comes: ``proc``, and ``output()`` once the process has ended."""

    def __init__(self, argv):
        leader, follower = os.openpty()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, argv)], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
        os.close(follower)
        self.chunks = []
        self.reader = threading.Thread(target=self._read, args=(leader,), daemon=True)
        self.reader.start()

    def _read(self, leader):
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            self.chunks.append(chunk)
        os.close(leader)

    def output(self, timeout=120) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        return b"".join(self.chunks).decode(errors="replace")


@pytest.mark.parametrize("leftover", [False, True])
def test_an_interrupted_lr_finder_leaves_no_copy_of_the_weights(capsys, tiny_data, tmp_path, monkeypatch, leftover):
    """fastai's finder saves the weights to models/tmp*/_tmp.pth and removes them only when it ends normally;
    a copy left by a finder killed outright in an earlier run goes when the next finder starts."""
    from fastai.callback.schedule import LRFinder

    config = resumable_config(tmp_path)
    run_dir = tmp_path / "run"
    if leftover:
        (run_dir / "models" / "tmpdead").mkdir(parents=True)
        (run_dir / "models" / "tmpdead" / "_tmp.pth").write_bytes(b"x" * 1000)
    calls = []

    def interrupt(self):
        calls.append(1)
        if len(calls) == 2:
            assert list((run_dir / "models").glob("tmp*/_tmp.pth"))  # the finder's copy exists meanwhile
            raise KeyboardInterrupt

    monkeypatch.setattr(LRFinder, "after_batch", interrupt)
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                          "--set", "phase1.use_lr_finder=true"] + (["--overwrite"] if leftover else []),
                             capsys)
    assert status == 130 and len(calls) == 2, err
    assert not list((run_dir / "models").glob("tmp*")), list((run_dir / "models").iterdir())



def billion_laughs(levels=9, width=9) -> str:
    lines = ['a0: &a0 "lol"']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "\n".join(lines) + f"\nexperiment_name: *a{levels}\n"


@pytest.mark.parametrize("text, fragment", [
    (billion_laughs(), "aliases expand to over 100,000 values"),
    ("experiment_name: tiny\ndescription: &x [*x]\n", "recursive alias"),
    ("experiment_name: tiny\nmemory: &m {sub: *m}\n", "recursive alias"),
    ("experiment_name: tiny\nmemory: &m {a: [1, {b: *m}]}\n", "recursive alias"),
])
def test_yaml_alias_bombs_are_refused_at_once(capsys, tmp_path, text, fragment):
    import resource

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    err = expect_one_line_error(capsys, ["--config", bomb, "--print-config"], fragment)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: memory stays bounded
    assert str(bomb) in err and "write the values out" in err


def test_aliases_a_config_uses_for_sharing_still_work(capsys, tmp_path):
    shared = tmp_path / "shared.yaml"
    text = resumable_config(tmp_path).read_text()
    text = text.replace("base_lr: 0.001", "base_lr: &lr 0.002").replace("lr_max: 0.001", "lr_max: *lr")
    shared.write_text(text)
    status, out, err = run_cli(train_main, ["--config", shared, "--print-config"], capsys)
    assert status == 0, err
    assert "base_lr: 0.002" in out and "lr_max: 0.002" in out


def test_an_alias_bomb_in_set_is_refused(capsys, finished_run):
    config, run_dir = finished_run
    expect_one_line_error(capsys, ["--config", config, "--set", "description=&x [*x]", "--print-config"],
                          "--set description=&x [*x]: an alias refers to a value that contains it")


def test_a_run_cut_short_after_training_keeps_its_resume_file_and_resume_finishes_it(capsys, finished_run,
                                                                                    tiny_data, tmp_path,
                                                                                    monkeypatch):
    """The window between the end of training and the results (prediction, bootstrap, report, pointing
    game, plots) is long on a real data set: a kill there must not throw the training away."""
    from cxrmem import report

    config, finished = finished_run
    run_dir = tmp_path / "run"
    common = ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "write_results", killed)
        status, _, err = run_cli(train_main, common, capsys)
    assert status == 130, err
    assert phases.resume_path(phases_cfg(config, tiny_data, run_dir)).is_file()
    assert not (run_dir / "metrics.json").exists()
    status, out, err = run_cli(train_main, [*common, "--resume"], capsys)
    assert status == 0, err
    assert "training had finished before the interruption: evaluating its final checkpoint" in out
    assert "phase 1:" not in out and "phase 2:" not in out  # nothing trained again
    assert not phases.resume_path(phases_cfg(config, tiny_data, run_dir)).exists()
    ours = json.loads((run_dir / "metrics.json").read_text())
    theirs = json.loads((finished / "metrics.json").read_text())
    assert ours["test"]["mean_auc"] == theirs["test"]["mean_auc"]  # the uninterrupted run's results


def phases_cfg(config, data_dir, run_dir):
    from cxrmem.config import load_config

    return load_config(config, data_dir=str(data_dir), output_dir=str(run_dir))


def test_a_second_command_on_a_run_folder_in_use_stops_at_once(capsys, finished_run, tiny_data, tmp_path):
    from cxrmem.runs.folder import RUN_LOCK

    config, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(run_dir / RUN_LOCK)!r}, 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--overwrite"], ["--evaluate"]):
            err = expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir",
                                                 run_dir, *extra], f"another cxrmem command is using {run_dir}")
            assert "--output_dir" in err
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run_dir) == before
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                          "--evaluate"], capsys)
    assert status == 0, err  # the lock went with the process that held it


def test_an_overwrite_removes_the_old_results_before_it_trains(capsys, finished_run, tiny_data, tmp_path,
                                                               monkeypatch):
    """Killed after its first epoch, an overwrite leaves the new config.yaml and no old results: a sweep or
    compare can never take the old metrics for the new configuration's."""
    from fastai.learner import Learner

    config, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "notes.txt").write_text("mine")  # a file the toolkit did not write stays
    original = Learner.fit

    def fit_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Learner, "fit", fit_then_stop)
    status, _, err = run_cli(train_main, ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir,
                                          "--set", "memory.top_k=2", "--overwrite"], capsys)
    assert status == 130, err
    assert "top_k: 2" in (run_dir / "config.yaml").read_text()
    left = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    for old in ("metrics.json", "report.md", "tiny_predictions.pt", "operating_points.json", "models/tiny_phase2.pth",
                "roc_test.png", "history_phase2.csv"):
        assert old not in left, left
    assert "notes.txt" in left and "models/tiny_resume.pth" in left


def test_a_moved_run_folder_is_still_the_same_run(capsys, finished_run, tiny_data, tmp_path):
    config, finished = finished_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished, moved)
    expect_one_line_error(capsys, ["--config", config, "--data_dir", tiny_data, "--output_dir", moved],
                          "holds a finished run of this configuration", moved)


def corrupt_the_middle(path):
    """Random bytes inside the compressed data: header and end marker stay whole."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [1])  # through a loader worker; without one, read_xray's own test
def test_an_undecodable_test_image_is_one_line_and_resume_finishes_after_the_fix(capsys, data_copy, tmp_path,
                                                                                 workers):
    config = resumable_config(tmp_path)
    test_names = (data_copy / "test_list.txt").read_text().split()
    image = next(data_copy.glob(f"images_*/images/{test_names[0]}"))
    whole = image.read_bytes()
    corrupt_the_middle(image)
    run_dir = tmp_path / "run"
    common = ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir, "--set",
              f"data.num_workers={workers}"]
    status, out, err = run_cli(train_main, [*common, "--check-data"], capsys)
    assert status == 2 and str(image) in err and "cannot be decoded" in err  # the full check decodes
    status, _, err = run_cli(train_main, common, capsys)  # training checks structure only: trains, then stops
    assert status == 2, err
    assert err.startswith(f"error: {image} cannot be decoded (") and err.count("\n") == 1, err
    assert "--resume" in err
    assert (run_dir / "models" / "tiny_resume.pth").is_file() and not (run_dir / "metrics.json").exists()
    image.write_bytes(whole)
    status, out, err = run_cli(train_main, [*common, "--resume"], capsys)
    assert status == 0, err
    assert (run_dir / "metrics.json").is_file() and "training had finished" in out


@pytest.mark.parametrize("change, fragment", [
    ("copy", "as an exact copy"),
    ("other_patient", "under patients"),
])
def test_an_image_listed_twice_is_refused_naming_its_lines(capsys, finished_run, data_copy, change, fragment):
    config, run_dir = finished_run
    csv_path = data_copy / "Data_Entry_2017.csv"
    header, first, *rest = csv_path.read_text().splitlines()
    cells = first.split(",")
    if change == "other_patient":
        cells[1], cells[3] = "Mass", "99999"  # Finding Labels, Patient ID
    csv_path.write_text("\n".join([header, first, *rest, ",".join(cells)]) + "\n")
    err = expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                                f"image {cells[0]} is listed 2 times (lines 2, {len(rest) + 3})", run_dir)
    assert fragment in err and "keep one row per image" in err


def test_an_empty_metadata_csv_is_one_line(capsys, finished_run, data_copy):
    config, run_dir = finished_run
    (data_copy / "Data_Entry_2017.csv").write_text("")
    expect_one_line_error(capsys, ["--config", config, "--data_dir", data_copy, "--output_dir", run_dir],
                          "Data_Entry_2017.csv is empty (no header, no rows)", run_dir)


TORCH_WRITE_FAILED = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                                  "file data/0: file write failed")  # torch.save's own wording for a full disk


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), TORCH_WRITE_FAILED])
def test_an_atomic_write_that_runs_out_of_space_is_one_line_and_leaves_the_old_file(tmp_path, error):
    target = tmp_path / "models" / "x.pth"
    io.torch_save({"w": torch.ones(2)}, target)
    with pytest.raises(UserError) as caught:
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise error
    assert str(caught.value).startswith(f"no space left on the device holding {target.parent} (writing x.pth; ")
    assert torch.equal(io.torch_load(target)["w"], torch.ones(2)) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("failing_write, error", [(3, OSError(28, "No space left on device"))])
def test_a_full_disk_is_one_line_keeps_what_was_written_and_resume_finishes(capsys, finished_run, tiny_data,
                                                                           tmp_path, monkeypatch, failing_write,
                                                                           error):
    config, finished = finished_run
    run_dir = tmp_path / "run"
    common = ["--config", config, "--data_dir", tiny_data, "--output_dir", run_dir]
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == failing_write:
            Path(f).write_bytes(b"partial")  # what a full disk leaves: part of the file
            raise error
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        status, _, err = run_cli(train_main, common, capsys)
    assert status == 2, err
    assert err.startswith("error: no space left on the device holding ") and err.count("\n") == 1, err
    assert "--resume" in err
    assert not list(run_dir.rglob("*.tmp"))  # the partial file went with the failed write
    for path in (run_dir / "models").glob("*.pth"):
        io.torch_load(path)  # every file that exists is whole
    status, _, err = run_cli(train_main, [*common, "--resume"], capsys)
    assert status == 0, err
    ours = json.loads((run_dir / "metrics.json").read_text())
    theirs = json.loads((finished / "metrics.json").read_text())
    assert ours["test"]["mean_auc"] == theirs["test"]["mean_auc"]


def start(argv, **streams):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, argv)], cwd=ROOT, **streams)


def stop_when(proc, ready, sig, timeout=300):
    """Send ``sig`` to ``proc`` as soon as ``ready()`` holds; the process must still be running then."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(sig)


@pytest.mark.slow
def test_killed_three_times_and_resumed_the_run_is_the_one_never_killed(tmp_path, tiny_data, uninterrupted):
    """One run, stopped where work is lost most easily, each time resumed by the same command plus
    --resume: SIGKILL within phase 1's second stage (no handler runs: the resume file of the last
    epoch is all there is); on a terminal, SIGTERM within phase 2 (the one-line message, exit 143;
    fastai's progress bar counts the skipped epoch); SIGKILL later in phase 2; the last resume writes
    to a pipe, as to a log file, where each line must arrive when it is printed. It ends with the
    uninterrupted run's histories, weights (bank included) and AUCs."""
    run_dir = tmp_path / "run"
    argv = ["--config", resumable_config(tmp_path, **RESUMED), "--data_dir", tiny_data, "--output_dir", run_dir]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start(argv, **quiet)  # phase 1: frozen done, one of two unfrozen epochs done
    stop_when(proc, lambda: resume_point(run_dir) == (1, "unfrozen", 1, False), signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (run_dir / "metrics.json").exists()

    terminal = OnATerminal([*argv, "--resume"])
    stop_when(terminal.proc, lambda: resume_point(run_dir) == (2, "one_cycle", 1, False), signal.SIGTERM)
    output = terminal.output()
    assert terminal.proc.returncode == 143, output[-3000:]
    assert "Epoch 2/2" in output  # fastai's bar was on, and ran to the last epoch of the resumed stage
    assert output.strip().splitlines()[-1] == ("terminated (SIGTERM): the last finished epoch is saved; add "
                                               "--resume to the same command to continue (make demo continues "
                                               "by itself)")
    assert "Traceback" not in output

    proc = start([*argv, "--resume"], **quiet)
    stop_when(proc, lambda: resume_point(run_dir) == (2, "one_cycle", 2, False), signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (run_dir / "metrics.json").exists()

    # Python buffers a pipe's output in blocks; a run's lines must reach a log file as they happen
    proc = start([*argv, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("evaluating: predicting"):  # printed without a flush of its own
            assert not (run_dir / "metrics.json").exists()  # read before the results are written
            break
    else:
        raise AssertionError("no evaluation line")
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert rows(run_dir / "history_phase1.csv") == 3 and rows(run_dir / "history_phase2.csv") == 3
    for rel in ("config.yaml", "models/tiny_phase1.pth", "models/tiny_phase2.pth", "tiny_predictions.pt",
                "metrics.json", "roc_test.png", "memory.png"):
        assert (run_dir / rel).is_file(), rel
    assert not (run_dir / "models/tiny_resume.pth").exists() and not list(run_dir.rglob("*.tmp"))

    # the same run as the uninterrupted one: epoch by epoch, weights (bank included) and AUCs
    for name in ("history_phase1.csv", "history_phase2.csv"):
        resumed, alone = (pd.read_csv(folder / name).drop(columns="time") for folder in (run_dir, uninterrupted))
        pd.testing.assert_frame_equal(resumed, alone, rtol=1e-6)
    for name in ("models/tiny_phase1.pth", "models/tiny_phase2.pth"):
        resumed, alone = io.torch_load(run_dir / name), io.torch_load(uninterrupted / name)
        assert set(resumed) == set(alone)
        for key, value in alone.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
    metrics, alone = (json.loads((folder / "metrics.json").read_text()) for folder in (run_dir, uninterrupted))
    assert metrics["test"]["mean_auc"] is not None
    for split in ("valid", "test"):
        assert metrics[split]["per_class"] == pytest.approx(alone[split]["per_class"], abs=1e-6, nan_ok=True)
    assert metrics == alone  # bit-exact: every figure, intervals included


def test_a_resume_file_of_an_earlier_release_gives_each_callback_its_state(tmp_path):
    """Earlier files named three callbacks' states themselves (best, stop, history); they reach the
    callbacks that now carry them, under the names fastai gives those callbacks."""
    saved = {"phase": 1, "stage": "unfrozen", "epochs_done": 2, "stage_complete": False, "lr": 0.01,
             "best": 0.5, "stop": [0.5, 1], "history": [["frozen", 1, 0.7]]}
    progress = Progress.from_saved(saved)
    assert (progress.phase, progress.stage, progress.epochs_done, progress.lr) == (1, "unfrozen", 2, 0.01)
    owners = [SaveCheckpoint(tmp_path / "best.pth"), EarlyStop(3), EpochLog(tmp_path / "log.csv", 1)]
    assert progress.callbacks == dict(zip([cb.name for cb in owners], [0.5, [0.5, 1], [["frozen", 1, 0.7]]]))
    for cb in owners:
        cb.load_resume_state(progress.callbacks[cb.name], mid_stage=True)
    assert owners[0].best == 0.5 and owners[1].resumed == (0.5, 1) and owners[2].rows == [["frozen", 1, 0.7]]
    assert [cb.resume_state() for cb in owners[::2]] == [0.5, [["frozen", 1, 0.7]]]
