"""The random states a resume file keeps: saved, written, read back and restored, every generator
training draws from continues exactly as if nothing had happened."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
from fastai.data.load import DataLoader

from cxrmem.utils import io
from cxrmem.config import MemoryConfig
from cxrmem.models.memory import MemoryBank
from cxrmem.train.resume import random_states, set_bank_state, set_random_states


def draws(learn):
    """One draw from every generator, and one epoch's order from each loader."""
    return (random.random(), float(np.random.rand()), float(torch.rand(())), [list(map(int, torch.cat(list(dl))))
            for dl in learn.dls.loaders], float(torch.rand((), generator=learn.model.bank.generator)))


def test_random_states_round_trip_through_the_resume_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    loaders = [DataLoader(list(range(10)), bs=4, shuffle=True), DataLoader(list(range(6)), bs=4)]
    learn = SimpleNamespace(dls=SimpleNamespace(loaders=loaders), model=SimpleNamespace(bank=MemoryBank(4, MemoryConfig(bank_size=8))))
    draws(learn)  # some history before the save
    io.torch_save({"random": random_states(learn)}, tmp_path / "resume.pth")
    expected = [draws(learn) for _ in range(2)]  # what the uninterrupted run draws next
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # a restarted process: other states
    learn.model.bank.generator.manual_seed(7)
    for dl in loaders:
        dl.rng.seed(7)
    states = io.torch_load(tmp_path / "resume.pth")["random"]  # weights_only, as --resume reads it
    set_random_states(learn, states)
    set_bank_state(learn, states)
    assert [draws(learn) for _ in range(2)] == expected
    assert expected[0][3][0] != expected[1][3][0]  # the loader really reshuffles every epoch


def test_restored_optimizer_state_lands_on_the_device_of_each_parameter():
    """A resume file is read onto the CPU; a run on another device must get every tensor of the optimizer
    state on its parameter's device. The meta device stands in for the GPU: a CPU epoch makes the state,
    a Learner whose parameters live on the meta device resumes from it."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from cxrmem.train.resume import Progress, ResumeState

    def learner(device):
        g = torch.Generator().manual_seed(0)
        items = [(torch.randn(4, generator=g), torch.randn(2, generator=g)) for _ in range(16)]
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(device)
        return Learner(DataLoaders(DataLoader(items, bs=4, shuffle=True), DataLoader(items, bs=4)), model,
                       loss_func=torch.nn.MSELoss())

    cpu = learner("cpu")
    cpu.fit(1, 1e-2)  # Adam's running averages now exist
    opt = cpu.opt.state_dict()
    state = ResumeState(None, resume=False)
    state.saved = {"model": cpu.model.state_dict(), "opt": opt, "progress": {}, "random": {}}
    state.progress = Progress(phase=1, stage="unfrozen", epochs_done=1)
    learn = learner("meta")
    learn.create_opt()
    assert state.restore(learn, 1, "unfrozen") == 1
    restored = [(param, value) for param in learn.opt.all_params().itemgot(0)
                for value in learn.opt.state[param].values() if isinstance(value, torch.Tensor)]
    assert len(restored) >= 4
    assert all(param.device.type == "meta" and value.device == param.device for param, value in restored)


def test_skipping_finished_epochs_keeps_fastais_progress_bar_working():
    """On a terminal fastai's ProgressCallback stays; its master bar must count the skipped epochs,
    or its first update, at the first epoch that runs, fails."""
    from fastai.callback.progress import ProgressCallback
    from fastai.test_utils import synth_learner

    from cxrmem.train.resume import SkipFinishedEpochs

    learn = synth_learner(n_trn=4)
    assert any(isinstance(cb, ProgressCallback) for cb in learn.cbs)
    learn.fit(3, cbs=SkipFinishedEpochs(2))
    assert len(learn.recorder.values) == 1  # epochs 0 and 1 skipped, epoch 2 trained and recorded
