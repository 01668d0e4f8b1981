"""CXRNet: memory read in eval, written in training; splitter; builder; autocast and channels_last."""

import pytest
import torch
from torch import nn

from cxrmem.config import MemoryConfig, ModelConfig
from cxrmem.models.backbones import Backbone
from cxrmem.models.memory import MemoryBank
from cxrmem.models.net import CXRNet, build_model, splitter

DIM = 8


def tiny_backbone() -> Backbone:
    body = nn.Sequential(nn.Conv2d(3, DIM, 3, padding=1), nn.BatchNorm2d(DIM), nn.ReLU())
    return Backbone("tiny", body, DIM)


def tiny_net(strategy="fifo", **bank_kwargs) -> CXRNet:
    torch.manual_seed(0)
    bank = MemoryBank(DIM, MemoryConfig(bank_size=16, update_strategy=strategy, **bank_kwargs))
    return CXRNet(tiny_backbone(), num_classes=14, dropout_rate=0.2, bank=bank)


def test_eval_mode_reads_the_bank_without_touching_it():
    net = tiny_net()
    net.train()
    net(torch.randn(4, 3, 16, 16))
    state = {k: v.clone() for k, v in net.bank.state_dict().items()}
    net.eval()
    with torch.no_grad():
        net(torch.randn(4, 3, 16, 16))
    for key, value in net.bank.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_training_mode_updates_the_bank_with_the_pooled_features():
    net = tiny_net().train()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        pooled = net.features(images)  # train-mode BN: batch statistics, so the same z as in forward
    net(images)
    assert int(net.bank.filled) == 4
    torch.testing.assert_close(net.bank.memory[:4], pooled)


def test_retrieval_changes_the_logits_and_is_differentiable():
    net = tiny_net(top_k=2, self_match_threshold=1.1).train()
    net(torch.randn(8, 3, 16, 16))  # fill some slots
    net.eval()
    images = torch.randn(3, 3, 16, 16)
    with_bank = net(images)
    bank, net.bank = net.bank, None
    without_bank = net(images)
    net.bank = bank
    assert not torch.allclose(with_bank, without_bank)
    net.train()
    net(images).sum().backward()
    assert all(p.grad is not None for p in net.body.parameters())


def test_entropy_strategy_gets_the_predicted_probabilities():
    net = tiny_net("entropy", rarity_threshold=0.5).train()
    net(torch.randn(4, 3, 16, 16))
    assert int(net.bank.filled) == 2  # the top half by prediction entropy


def test_autocast_and_channels_last_keep_the_bank_float32():
    net = tiny_net("diversity").train().to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images)
        logits.float().sum().backward()
    assert logits.shape == (4, 14)
    assert net.bank.memory.dtype == torch.float32 and int(net.bank.filled) > 0


def test_half_model_keeps_the_bank_float32():
    net = tiny_net().half()
    assert net.bank.memory.dtype == torch.float32
    assert net.head[1].weight.dtype == torch.float16


def test_splitter_separates_body_and_head():
    net = tiny_net()
    body, head = splitter(net)
    all_ids = {id(p) for p in net.parameters()}
    assert {id(p) for p in body} | {id(p) for p in head} == all_ids
    assert not {id(p) for p in body} & {id(p) for p in head}
    assert list(net.bank.parameters()) == []


def test_head_layout():
    head = tiny_net().head
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[1].in_features, head[1].out_features, head[4].out_features) == (DIM, 512, 14)
    assert head[3].p == pytest.approx(0.2)


def test_build_model_from_config_objects():
    model_cfg = ModelConfig(backbone="resnet18", pretrained=False, weights=None, num_classes=5, dropout_rate=0.3)
    memory_cfg = MemoryConfig(use_memory=True, bank_size=32, update_strategy="hybrid", top_k=5,
                              normalize_retrieved="memory_only", memory_momentum=0.9)
    net = build_model(model_cfg, memory_cfg)
    assert net.bank.dim == 512 and net.bank.bank_size == 32 and net.bank.top_k == 5
    assert (net.bank.update_strategy, net.bank.normalize_retrieved) == ("hybrid", "memory_only")
    assert net.head[4].out_features == 5 and net.head[3].p == pytest.approx(0.3)
    assert build_model(model_cfg, MemoryConfig(use_memory=False)).bank is None
    assert build_model(model_cfg).bank is None
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("strategy", ["rarity", "hybrid", "fifo", "reservoir"])
def test_bank_and_head_under_cpu_bfloat16_autocast(strategy):
    """Mixed precision where fastai cannot run it on the CPU: the body and the head compute in bfloat16,
    retrieval and the bank's buffers stay float32, and every value and gradient is finite."""
    net = tiny_net(strategy, rarity_threshold=0.05).train()
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # enough batches to fill the 16 slots and then merge, ring or sample
        images = torch.randn(6, 3, 16, 16, generator=g) * torch.rand(6, 1, 1, 1, generator=g) * 4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net.features(images)
            retrieved = net.bank.retrieve(z)
            logits = net(images)
        logits.float().sum().backward()
    assert z.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert retrieved.dtype == torch.float32 and torch.isfinite(retrieved).all()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    state = net.bank.state_dict()
    assert state["memory"].dtype == torch.float32 and state["mean_norm"].dtype == torch.float32
    assert int(net.bank.filled) > 0 and torch.isfinite(state["memory"]).all()
    assert state["memory"][: int(net.bank.filled)].abs().sum(dim=1).min() > 0
