"""torchrun with two CPU processes (gloo, GPUs hidden) on a tiny synthetic set, both phases, LR finder included.

Checks: one run folder, written by rank 0 only, and one report and epoch log; TensorBoard and
MLflow logged by rank 0 alone, each epoch once; the LR
finder runs on rank 0 alone, on the plain model; the per-process batch
is the configured one halved; the ranks train on different images yet, after every
epoch's training batches, hold the same weights (DDP) and the same memory bank (its
all-gathered updates), they log the same losses and metrics every epoch, and they end
with the final checkpoint's weights and bank; the predictions file
holds every validation and test image exactly once, with its own labels; metrics.json's
AUCs are those of that file. Without torchrun: a private name distributed training
relies on, if missing, is a one-line error naming it and the installed version.

This file doubles as the script torchrun launches: run as ``__main__`` it is
``train.py`` plus spies, which write into ``$CXRMEM_TEST_DUMP`` what each rank
replaced on disk (every atomic write ends with ``os.replace``), the batch size of
its DataLoaders, the model class each LR finder run saw, a fingerprint of each
training batch, its parameters and bank at the end of each epoch's training part,
each epoch's logged values, and its final model state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import metric_history, new_mlflow_store, scalars, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
DUMP_ENV = "CXRMEM_TEST_DUMP"

# --------------------------------------------------------------------------- the launched script


def epoch_spy(batch_sizes: list, batches: list, epochs: list, values: list):
    """A fastai callback class recording each Learner's batch size; every training batch's pixel sum;
    after each epoch's training batches (before validation and before any checkpoint is reloaded),
    the parameters and the bank; and each epoch's recorded losses and metrics (which decide
    checkpoints and early stopping)."""
    from fastai.callback.core import Callback

    from cxrmem.train.distributed import unwrap

    class EpochSpy(Callback):
        order = 100

        def after_create(self):
            batch_sizes.append(self.learn.dls.train.bs)

        def before_batch(self):
            if self.training and not hasattr(self.learn, "lr_finder"):
                batches.append(float(self.xb[0].float().sum()))

        def after_train(self):
            if hasattr(self.learn, "lr_finder"):
                return
            model = unwrap(self.learn.model)
            epochs.append({"parameters": {k: v.detach().clone() for k, v in model.named_parameters()},
                           "bank": {k: v.clone() for k, v in model.bank.state_dict().items()}})

        def after_epoch(self):
            if not hasattr(self.learn, "lr_finder"):
                values.append([float(v) for v in self.recorder.values[-1]])

    return EpochSpy()


def spy_and_train(argv: list[str]) -> int:
    """``train.py argv`` on one rank, recording what the module docstring says in $CXRMEM_TEST_DUMP."""
    from fastai.learner import defaults

    from cxrmem.experiment import train_main
    from cxrmem.train import phases
    from cxrmem.train.distributed import unwrap

    dump, rank = Path(os.environ[DUMP_ENV]), int(os.environ["RANK"])
    replaced, batch_sizes, finders, batches, epochs, values = [], [], [], [], [], []
    real_replace, real_train, real_callbacks = os.replace, phases.train, defaults.callbacks
    real_find_lr = phases.find_lr

    def logged_replace(src, dst, *args, **kwargs):
        replaced.append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    def find_lr(learn):
        finders.append(type(learn.model).__name__)
        return real_find_lr(learn)

    def train(*args, **kwargs):
        learn = real_train(*args, **kwargs)
        torch.save(unwrap(learn.model).state_dict(), dump / f"state_rank{rank}.pt")
        return learn

    os.replace, phases.train, phases.find_lr = logged_replace, train, find_lr
    defaults.callbacks = [*real_callbacks, epoch_spy(batch_sizes, batches, epochs, values)]  # on every Learner
    try:
        return train_main(argv)
    finally:
        record = {"replaced": replaced, "batch_sizes": batch_sizes, "finders": finders, "batches": batches,
                  "values": values}
        (dump / f"rank{rank}.json").write_text(json.dumps(record))
        torch.save(epochs, dump / f"epochs_rank{rank}.pt")


# --------------------------------------------------------------------------- the tests

slow = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from cxrmem.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("ddp")
    data, config, run_dir, dump = tmp / "cxr14", tmp / "tiny.yaml", tmp / "run", tmp / "dump"
    generate(data, n_patients=40, size=32, seed=3, workers=1)
    uri = new_mlflow_store(tmp / "store" / "mlflow.db")
    tiny_config(config, memory={"update_strategy": "rarity", "rarity_threshold": 0.1},
                phase1={"use_lr_finder": True}, evaluation={"bootstrap_resamples": 50},
                tracking={"tensorboard": True, "mlflow": uri, "experiment": "ddp"})
    dump.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               __file__, "--config", str(config), "--data_dir", str(data), "--output_dir", str(run_dir)]
    env = {**os.environ, DUMP_ENV: str(dump), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, also on a machine with GPUs (one GPU cannot take two ranks)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    records = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(WORLD)]
    states = [torch.load(dump / f"state_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    epochs = [torch.load(dump / f"epochs_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return SimpleNamespace(run_dir=run_dir, config=config, data=data, stdout=done.stdout, records=records,
                           states=states, epochs=epochs, mlflow=uri)


def evaluation_frame(run):
    """The prepared metadata frame of the run's configuration (valid and test rows)."""
    from cxrmem.config import load_config
    from cxrmem.data.prepare import prepare_data

    cfg = load_config(run.config, [], data_dir=str(run.data), output_dir=str(run.run_dir))
    frame = prepare_data(cfg).frame
    return frame[frame["split"].isin(["valid", "test"])]


@slow
def test_one_run_folder_written_by_rank_0_only_and_one_report(ddp_run):
    run_dir = ddp_run.run_dir
    expected = {"config.yaml", "metrics.json", "tiny_predictions.pt", "history_phase1.csv", "history_phase2.csv",
                "models/tiny_phase1.pth", "models/tiny_phase2.pth", "lr_find_phase1.png", "mlflow_run_id.txt"}
    present = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert expected <= present
    present.discard(".cxrmem.lock")  # rank 0's lock on the folder (an empty file; the lock went with it)
    assert not [p for p in present if "tmp" in p or p.startswith(".")], present  # no leftovers of any rank
    folders = [run_dir / name for name in ("models", "tensorboard", "tensorboard/phase1", "tensorboard/phase2")]
    assert sorted(d for d in run_dir.rglob("*") if d.is_dir()) == folders
    present -= {p for p in present if p.startswith("tensorboard/")}  # appended to, not replaced: next test
    mine = lambda record: [p for p in record["replaced"] if Path(p).is_relative_to(run_dir)]  # noqa: E731
    assert mine(ddp_run.records[1]) == []
    written = {Path(p).relative_to(run_dir).as_posix() for p in mine(ddp_run.records[0])}
    assert written == present | {"models/tiny_resume.pth"}  # the resume file is removed when the run ends
    assert ddp_run.stdout.count("resolved configuration") == 1
    assert ddp_run.stdout.count("Mean AUC Score") == 2  # valid and test, printed once
    assert ddp_run.stdout.count("phase 1: LR finder (valley)") == 1  # one report of the finder, from rank 0
    assert ddp_run.stdout.count("phase 1: LR finder (fastai") == 1  # and one line saying it has begun
    epoch_lines = [line.split()[:3] for line in ddp_run.stdout.splitlines()
                   if line.split()[1:2] in (["frozen"], ["unfrozen"], ["one_cycle"])]
    assert epoch_lines == [["1", "frozen", "1"], ["1", "unfrozen", "2"], ["2", "one_cycle", "1"]]


@slow
def test_only_rank_0_logs_to_tensorboard_and_mlflow(ddp_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ddp_run.mlflow)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for phase, epochs in ((1, 2), (2, 1)):
        logged = metric_history(client, runs[0].info.run_id, f"phase{phase}/valid_loss")
        assert [step for step, _ in logged] == list(range(1, epochs + 1))  # once, not once per rank
        folder = ddp_run.run_dir / "tensorboard" / f"phase{phase}"
        files = list(folder.glob("events.out.tfevents.*"))
        assert len({f.name.split(".")[-2] for f in files}) == 1  # one writing process (its pid in the name)
        assert len(scalars(folder, "valid_loss")) == epochs


@slow
def test_the_lr_finder_runs_on_rank_0_alone_on_the_plain_model(ddp_run):
    assert [record["finders"] for record in ddp_run.records] == [["CXRNet"], []]


@slow
def test_each_process_gets_the_configured_batch_divided_by_the_world_size(ddp_run):
    for record in ddp_run.records:
        assert record["batch_sizes"] == [8 // WORLD, 16 // WORLD]


@slow
def test_ranks_train_on_different_images_in_step_with_one_bank(ddp_run):
    first, second = (record["batches"] for record in ddp_run.records)
    assert len(first) == len(second) > 0
    assert first != second  # each rank its own shard
    assert len(ddp_run.epochs[0]) == len(ddp_run.epochs[1]) == 3  # phase 1 frozen, unfrozen; phase 2
    for epoch, (mine, theirs) in enumerate(zip(*ddp_run.epochs)):
        for key, value in mine["parameters"].items():
            assert torch.equal(value, theirs["parameters"][key]), (epoch, key)
        for key, value in mine["bank"].items():
            assert torch.equal(value, theirs["bank"][key]), (epoch, key)
        assert int(mine["bank"]["filled"]) > 0


@slow
def test_every_rank_sees_the_same_epoch_losses_and_metrics(ddp_run):
    first, second = ([[repr(v) for v in row] for row in record["values"]] for record in ddp_run.records)
    assert len(first) == 3
    assert first == second  # bit for bit (NaN included), so all ranks save, stop early and reload together


@slow
def test_every_rank_ends_with_the_same_weights_and_bank(ddp_run):
    first, second = ddp_run.states
    assert set(first) == set(second) and "bank.memory" in first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert int(first["bank.filled"]) > 0 and first["bank.memory"].dtype == torch.float32
    final = torch.load(ddp_run.run_dir / "models/tiny_phase2.pth", weights_only=True)
    for key in final:
        assert torch.equal(final[key], first[key]), key


@slow
def test_predictions_hold_every_evaluation_image_once_with_its_labels(ddp_run):
    from cxrmem.data.findings import FINDINGS

    preds = torch.load(ddp_run.run_dir / "tiny_predictions.pt", weights_only=True)
    frame = evaluation_frame(ddp_run)
    names = list(preds["image_index"])
    assert len(names) == len(set(names)) == len(frame)
    assert sorted(zip(names, preds["split"])) == sorted(zip(frame["image_index"], frame["split"]))
    labels = frame.set_index("image_index").loc[names, FINDINGS].to_numpy(dtype="float32")
    assert torch.equal(preds["targets"].float(), torch.from_numpy(labels))
    assert preds["probs"].shape == (len(frame), len(FINDINGS))


@slow
def test_reported_aucs_are_those_of_the_predictions_file(ddp_run):
    from cxrmem.data.findings import FINDINGS
    from cxrmem.report import evaluate_split

    preds = torch.load(ddp_run.run_dir / "tiny_predictions.pt", weights_only=True)
    metrics = json.loads((ddp_run.run_dir / "metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    for split, reported in metrics.items():
        rows = [i for i, s in enumerate(preds["split"]) if s == split]
        again = evaluate_split(preds["probs"][rows].numpy(), preds["targets"][rows].numpy(), FINDINGS,
                               n_resamples=50, seed=0)
        assert reported["n_images"] == len(rows)
        assert reported["per_class"] == pytest.approx(again["per_class"], abs=1e-12)
        assert reported["mean_auc"] == pytest.approx(again["mean_auc"], abs=1e-12)


def test_a_missing_private_name_is_one_line_naming_it_and_the_installed_version(monkeypatch):
    from importlib.metadata import version

    from fastai.distributed import DistributedDL

    from cxrmem.utils.errors import UserError
    from cxrmem.train import distributed

    assert ("fastai", "fastai.distributed", "DistributedDL._broadcast") in distributed.RELIED_ON
    distributed.check_private_apis()  # the installed versions have every name
    monkeypatch.delattr(DistributedDL, "_broadcast")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(UserError) as caught:
        distributed.make_distributed(learn=None)  # checks before it touches the Learner
    message = str(caught.value)
    assert "\n" not in message
    assert "fastai.distributed.DistributedDL._broadcast" in message and f"fastai {version('fastai')}" in message



# --------------------------------------------------------------------------- start-up


def test_more_processes_than_gpus_stop_every_rank_with_one_line_before_joining(monkeypatch, capsys):
    from cxrmem.experiment import train_main
    from cxrmem.utils.errors import UserError
    from cxrmem.train import distributed

    from helpers import EXPERIMENTS, run_cli

    def refuse(*args, **kwargs):
        raise AssertionError("joined a process group")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(name, value)
    for rank in ("0", "1"):  # both ranks of the node, not only the one without a GPU
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        for call in (distributed.join, distributed.device):
            with pytest.raises(UserError) as caught:
                call()
            message = str(caught.value)
            assert "\n" not in message
            assert "2 processes on this node but 1 GPU(s)" in message and "CUDA_VISIBLE_DEVICES=3" in message
            assert "--nproc_per_node 1" in message
    status, _, err = run_cli(train_main, ["--config", EXPERIMENTS / "demo_synthetic.yaml", "--check-data"], capsys)
    assert status == 2 and err.count("\n") == 1 and "each process needs a GPU of its own" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.device() == torch.device("cuda", 1)  # LOCAL_RANK 1 with two GPUs: its own


def slow_preparation(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks whose default group times out after 1 s; rank 0 prepares for 3 s."""
    import time
    from datetime import timedelta

    from cxrmem.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    assert distributed.join(timeout=timedelta(seconds=1))
    try:
        value = distributed.on_main(lambda: time.sleep(3) or 42)
        Path(out, f"rank{rank}").write_text(str(value))
    finally:
        torch.distributed.destroy_process_group()


@slow
def test_work_rank_0_does_alone_may_outlast_the_process_group_timeout(tmp_path, monkeypatch):
    """A first run's data preparation on rank 0 takes longer than the default group's timeout (NCCL's
    is 10 minutes; 1 s here): the other rank waits for it on the preparation group and gets its result."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(slow_preparation, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["42", "42"]


if __name__ == "__main__":
    sys.exit(spy_and_train(sys.argv[1:]))
