"""Tests for cxrmem.train.losses: hand-computed values, stability, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from cxrmem.utils.errors import UserError
from cxrmem.train.losses import (
    LOSSES,
    AsymmetricLoss,
    BCELoss,
    FocalLoss,
    build_loss,
)

LOGITS = [[0.0, 2.0], [-1.0, 3.0]]
TARGETS = [[1.0, 0.0], [0.0, 1.0]]


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def as_tensors():
    return torch.tensor(LOGITS), torch.tensor(TARGETS)


def test_bce_by_hand():
    # -log p for positives, -log(1-p) for negatives, element by element.
    expected = (
        -math.log(sig(0.0))          # x=0,  y=1
        - math.log(1 - sig(2.0))     # x=2,  y=0
        - math.log(1 - sig(-1.0))    # x=-1, y=0
        - math.log(sig(3.0))         # x=3,  y=1
    ) / 4
    assert BCELoss()(*as_tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_bce_matches_torch_on_random_data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 14, generator=g) * 3
    targets = (torch.rand(8, 14, generator=g) > 0.7).float()
    ours = BCELoss()(logits, targets)
    ref = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(ours, ref, atol=1e-7)


def test_asl_by_hand():
    clip = 0.05
    p_pos_a, p_pos_b = sig(0.0), sig(3.0)           # positives
    pm_neg_a, pm_neg_b = sig(2.0) - clip, sig(-1.0) - clip  # negatives, both above clip
    assert pm_neg_a > 0 and pm_neg_b > 0
    expected = (
        -((1 - p_pos_a) ** 1) * math.log(p_pos_a)              # x=0,  y=1
        - (pm_neg_a ** 4) * math.log(1 - pm_neg_a)             # x=2,  y=0
        - (pm_neg_b ** 4) * math.log(1 - pm_neg_b)             # x=-1, y=0
        - ((1 - p_pos_b) ** 1) * math.log(p_pos_b)             # x=3,  y=1
    ) / 4
    assert AsymmetricLoss()(*as_tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_asl_default_hyperparameters():
    loss = build_loss("asl")
    assert (loss.gamma_neg, loss.gamma_pos, loss.clip) == (4, 1, 0.05)


def test_asl_clipped_negative_contributes_exactly_zero():
    # sigmoid(-4) = 0.018 < clip = 0.05, so p_m = 0 and the element loss is 0.
    assert sig(-4.0) < 0.05
    loss = AsymmetricLoss(reduction="none")
    value = loss(torch.tensor([[-4.0]]), torch.tensor([[0.0]]))
    assert value.item() == 0.0
    # Just above the clip it is positive again.
    assert loss(torch.tensor([[-2.0]]), torch.tensor([[0.0]])).item() > 0.0


def test_focal_by_hand():
    a, g = 0.25, 2.0
    pt = [sig(0.0), 1 - sig(2.0), 1 - sig(-1.0), sig(3.0)]   # p_t per element
    at = [a, 1 - a, 1 - a, a]                                 # alpha_t per element
    expected = sum(-at[k] * (1 - pt[k]) ** g * math.log(pt[k]) for k in range(4)) / 4
    assert FocalLoss()(*as_tensors()).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_stable_at_large_logits(name):
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]])   # two right, two badly wrong
    loss = build_loss(name)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert loss.item() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_confident_correct_predictions_cost_almost_nothing(name):
    loss = build_loss(name)(torch.tensor([[50.0, -50.0]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() < 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reduction_modes(name):
    logits, targets = as_tensors()
    elements = build_loss(name, reduction="none")(logits, targets)
    assert elements.shape == (2, 2)
    assert build_loss(name)(logits, targets).item() == pytest.approx(elements.mean().item())
    assert build_loss(name, reduction="sum")(logits, targets).item() == pytest.approx(
        elements.sum().item(), abs=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fastai_tensor_types_and_hooks(name):
    from fastai.torch_core import TensorBase, TensorMultiCategory

    logits, targets = as_tensors()
    loss_func = build_loss(name)
    plain = loss_func(logits, targets)
    wrapped = loss_func(TensorBase(logits), TensorMultiCategory(targets))
    assert type(wrapped) is torch.Tensor
    assert wrapped.item() == pytest.approx(plain.item())
    # Integer targets work too.
    assert loss_func(logits, targets.long()).item() == pytest.approx(plain.item())

    probs = loss_func.activation(logits)
    assert torch.allclose(probs, torch.sigmoid(logits))
    assert loss_func.decodes(probs).tolist() == [[False, True], [False, True]]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        BCELoss()(torch.zeros(2, 3), torch.zeros(2, 2))


def test_fastai_get_preds_uses_activation_and_unreduced_loss():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x = torch.randn(12, 3)
    y = (torch.rand(12, 2) > 0.5).float()
    ds = TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, bs=4), DataLoader(ds, bs=4))
    model = torch.nn.Linear(3, 2)
    learn = Learner(dls, model, loss_func=build_loss("asl"))
    probs, targs, losses = learn.get_preds(ds_idx=1, with_loss=True)
    with torch.no_grad():
        expected = torch.sigmoid(model(x))
    assert torch.allclose(probs, expected, atol=1e-6)
    assert losses.shape == (12,)
    assert learn.loss_func.reduction == "mean"   # restored after get_preds


def test_registry_names():
    assert set(LOSSES) == {"bce", "asl", "focal"}
    assert isinstance(build_loss("BCE"), BCELoss)


def test_unknown_loss_is_a_one_line_user_error():
    with pytest.raises(UserError) as info:
        build_loss("hinge")
    message = str(info.value)
    assert "\n" not in message
    assert "hinge" in message
    for name in ("asl", "bce", "focal"):
        assert name in message
