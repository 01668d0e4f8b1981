"""MemoryBank: retrieval against a plain per-sample loop, every strategy, momentum, persistence."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cxrmem.config import MemoryConfig, from_dict
from cxrmem.utils.errors import UserError
from cxrmem.models.memory import NORMALIZE_MODES, STRATEGIES, MemoryBank

MODES = list(NORMALIZE_MODES)

# A self-match threshold per mode that excludes some, not all, slots of random
# data (similarities are in different units under each mode).
THRESHOLD_FOR_MODE = {"both": 0.6, "query_only": 0.5, "memory_only": 0.5, "none": 0.4}


def reference_retrieve(memory, filled, query, mode, top_k, self_match_threshold):
    """Per-sample loop: filter out self-matches (cosine >= threshold, whatever the mode), top-k of the
    rest by the mode's similarity, softmax-weighted sum of the slots."""
    normalise_query = mode in ("both", "query_only")
    normalise_slots = mode in ("both", "memory_only")
    slots = memory[:filled]
    m_side = slots / slots.norm(dim=1, keepdim=True) if normalise_slots else slots
    rows = []
    for q in query:
        q_side = q / q.norm() if normalise_query else q
        similarities = m_side @ q_side
        cosine = (slots / slots.norm(dim=1, keepdim=True)) @ (q / q.norm())
        allowed = torch.nonzero(cosine < self_match_threshold).flatten()
        k = min(top_k, len(allowed))
        if k == 0:
            rows.append(q * 0)
            continue
        best, order = similarities[allowed].topk(k)
        weights = torch.softmax(best, dim=0)
        rows.append(weights @ slots[allowed[order]])
    return torch.stack(rows)


def make_bank(dim, seed=0, **settings):
    """A bank from a ``memory`` config section: the schema's defaults except ``settings``."""
    return MemoryBank(dim, MemoryConfig(**settings), seed=seed)


def bank_with(memory, filled, **kwargs):
    bank = make_bank(memory.shape[1], bank_size=memory.shape[0], **kwargs)
    bank.memory.copy_(memory)
    bank.filled.fill_(filled)
    return bank


def random_bank_and_queries(filled, bank_size=12, dim=8, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(bank_size, dim, generator=g)
    memory[filled:] = 0
    query = torch.randn(batch, dim, generator=g)
    if filled:
        query[0] = memory[0]  # an exact self match
        query[1] = memory[filled - 1] * 1.01 + 0.01
    return memory, query


# --------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("filled", [0, 5, 12])
@pytest.mark.parametrize("top_k", [1, 3, 20])
def test_retrieval_equals_per_sample_loop(mode, filled, top_k):
    memory, query = random_bank_and_queries(filled)
    threshold = THRESHOLD_FOR_MODE[mode]
    bank = bank_with(memory, filled, top_k=top_k, normalize_retrieved=mode, self_match_threshold=threshold)

    query_a = query.clone().requires_grad_(True)
    query_b = query.clone().requires_grad_(True)
    got = bank.retrieve(query_a)
    expected = reference_retrieve(memory, filled, query_b, mode, top_k, threshold)

    assert got.dtype == torch.float32 and got.shape == query.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the same gradient reaches the query
    upstream = torch.randn_like(query)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(query_a.grad, query_b.grad, atol=1e-5, rtol=1e-5)
    assert bank.memory.grad is None and not bank.memory.requires_grad


def test_empty_bank_retrieves_zeros():
    bank = make_bank(8, bank_size=4)
    query = torch.randn(3, 8, requires_grad=True)
    out = bank.retrieve(query)
    assert torch.equal(out, torch.zeros(3, 8))
    (query + out).sum().backward()
    assert torch.isfinite(query.grad).all()


def test_queries_with_every_slot_excluded_retrieve_zeros():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(8, generator=g)
    memory = direction + 1e-3 * torch.randn(6, 8, generator=g)  # every slot ~ the same direction
    bank = bank_with(memory, 6, top_k=3, self_match_threshold=0.99)
    query = torch.stack([direction * 2.0, torch.randn(8, generator=g), torch.randn(8, generator=g)])
    query.requires_grad_(True)
    out = bank.retrieve(query)
    assert torch.equal(out[0], torch.zeros(8))  # cosine ~1 with every slot: all excluded
    assert out[1].abs().sum() > 0 and out[2].abs().sum() > 0  # unrelated directions: nothing excluded
    expected = reference_retrieve(memory, 6, query.detach(), "both", 3, 0.99)
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(query.grad).all()
    assert torch.equal(query.grad[0], torch.zeros(8))


def test_retrieval_in_float32_under_autocast_and_half_module():
    memory, query = random_bank_and_queries(12)
    bank = bank_with(memory, 12).half()
    assert bank.memory.dtype == torch.float32 and bank.mean_norm.dtype == torch.float32
    bank = bank.to(torch.bfloat16)
    assert bank.memory.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bank.retrieve(query.to(torch.bfloat16))
    assert out.dtype == torch.float32
    expected = reference_retrieve(memory, 12, query.to(torch.bfloat16).float(), "both", 3, 0.99)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- strategies


def unit_vectors(count, dim, seed=0):
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_rarity_stores_the_outliers_not_the_common_ones():
    common = unit_vectors(8, 16)  # norm 1
    outliers = 4.0 * unit_vectors(2, 16, seed=1)  # norm 4: r = 2.4 / 1.6 = 1.5 > 0.5
    batch = torch.cat([common[:3], outliers[:1], common[3:], outliers[1:]])
    bank = make_bank(16, bank_size=8, update_strategy="rarity", rarity_threshold=0.5)
    bank.update(batch)
    assert int(bank.filled) == 2
    torch.testing.assert_close(bank.memory[:2], outliers)
    assert bank.memory[2:].abs().sum() == 0


def test_statistical_scores_against_the_running_mean_norm():
    statistical = make_bank(16, bank_size=8, update_strategy="statistical", memory_momentum=0.9)
    rarity = make_bank(16, bank_size=8, update_strategy="rarity")
    first = unit_vectors(6, 16)  # norm 1: nothing rare, sets the running mean to 1
    second = 3.0 * unit_vectors(4, 16, seed=2)  # norm 3: rare for the history, not within the batch
    for bank in (statistical, rarity):
        bank.update(first)
        bank.update(second)
    assert int(rarity.filled) == 0
    assert int(statistical.filled) == 4
    torch.testing.assert_close(statistical.memory[:4], second)
    assert statistical.mean_norm.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0, rel=1e-5)


def test_diversity_stores_the_features_far_from_the_bank():
    eye = torch.eye(8)
    bank = bank_with(torch.cat([eye[:4], torch.zeros(4, 8)]), 4, update_strategy="diversity", rarity_threshold=0.5)
    near = eye[:2] + 0.05 * eye[2:4]
    far = eye[5:7] * 2.0
    bank.update(torch.stack([near[0], far[0], near[1], far[1]]))
    assert int(bank.filled) == 6
    torch.testing.assert_close(bank.memory[4:6], far)


def test_top_fraction_keeps_at_least_one():
    bank = make_bank(8, bank_size=4, update_strategy="diversity", rarity_threshold=0.01)
    bank.update(torch.randn(5, 8))
    assert int(bank.filled) == 1


def hybrid_case(weight):
    eye = torch.eye(8)
    bank = bank_with(
        torch.cat([eye[:4], torch.zeros(4, 8)]), 4,
        update_strategy="hybrid", diversity_weight=weight, rarity_threshold=0.25,
    )
    rare_but_familiar = 5.0 * eye[0]
    common_but_new = eye[6]
    batch = torch.stack([eye[1] * 1.1, rare_but_familiar, common_but_new, eye[2]])
    bank.update(batch)
    return bank.memory[4]


def test_hybrid_weight_moves_from_rarity_to_diversity():
    eye = torch.eye(8)
    torch.testing.assert_close(hybrid_case(0.0), 5.0 * eye[0])
    torch.testing.assert_close(hybrid_case(1.0), eye[6])


def test_entropy_stores_the_uncertain_predictions():
    bank = make_bank(4, bank_size=8, update_strategy="entropy", rarity_threshold=0.5)
    features = torch.arange(16.0).view(4, 4)
    probs = torch.tensor([[0.01, 0.99, 0.02], [0.5, 0.45, 0.6], [0.98, 0.01, 0.03], [0.4, 0.5, 0.55]])
    assert bank.needs_probs
    bank.update(features, probs=probs)
    assert int(bank.filled) == 2
    torch.testing.assert_close(bank.memory[:2], features[[1, 3]])
    with pytest.raises(ValueError, match="probs"):
        bank.update(features)


def fifo_reference(items, bank_size):
    slots, pointer = [], 0
    for item in items:
        if len(slots) < bank_size:
            slots.append(item)
        else:
            slots[pointer] = item
            pointer = (pointer + 1) % bank_size
    return slots


def test_fifo_stores_everything_in_order_and_replaces_the_oldest():
    bank = make_bank(2, bank_size=5, update_strategy="fifo")
    stream = torch.stack([torch.arange(40.0), torch.ones(40)], dim=1)
    start = 0
    for size in [3, 1, 4, 2, 12, 3, 6, 9]:  # includes a batch larger than the bank
        bank.update(stream[start : start + size])
        start += size
        expected = fifo_reference(list(stream[:start]), 5)
        assert int(bank.filled) == len(expected)
        torch.testing.assert_close(bank.memory[: len(expected)], torch.stack(expected))
    assert int(bank.seen) == 40


def test_reservoir_keeps_each_item_with_probability_size_over_t():
    bank_size, stream_length, runs = 20, 400, 300
    stream = torch.stack([torch.arange(float(stream_length)), torch.ones(stream_length)], dim=1)
    inclusion = torch.zeros(stream_length)
    for seed in range(runs):
        bank = make_bank(2, bank_size=bank_size, update_strategy="reservoir", seed=seed)
        for start in range(0, stream_length, 16):
            bank.update(stream[start : start + 16])
        kept = bank.memory[:, 0].long()
        assert int(bank.filled) == bank_size and len(kept.unique()) == bank_size
        inclusion[kept] += 1
    inclusion /= runs
    expected = bank_size / stream_length  # 0.05
    assert inclusion.sum().item() == pytest.approx(bank_size)
    for segment in inclusion.split(100):  # early, middle and late items equally likely
        assert segment.mean().item() == pytest.approx(expected, abs=0.01)
    assert inclusion[:bank_size].mean().item() == pytest.approx(expected, abs=0.015)


def test_reservoir_is_reproducible_with_the_seed():
    stream = torch.randn(100, 4)
    banks = [make_bank(4, bank_size=8, update_strategy="reservoir", seed=7) for _ in range(2)]
    for bank in banks:
        for chunk in stream.split(9):
            bank.update(chunk)
    assert torch.equal(banks[0].memory, banks[1].memory)


def test_a_batch_that_partly_fills_then_merges():
    memory = torch.zeros(4, 4)
    memory[:3] = torch.eye(4)[:3]
    bank = bank_with(memory, 3, update_strategy="diversity", rarity_threshold=1.0, memory_momentum=0.5)
    batch = torch.tensor([[0.0, 0.0, 0.0, 2.0], [3.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.1, 0.0], [2.0, 0.0, 0.1, 0.0]])
    bank.update(batch)
    # all four are selected; in batch order, batch[0] fills the free slot 3 and the rest merge
    expected = memory.clone()
    expected[3] = batch[0]
    expected[0] = 0.25 * memory[0] + 0.75 * (batch[1] + batch[3]) / 2  # two features: momentum**2
    expected[1] = 0.5 * memory[1] + 0.5 * batch[2]
    assert int(bank.filled) == 4
    torch.testing.assert_close(bank.memory, expected)


# --------------------------------------------------------------------------- momentum, wrap, persistence


def full_bank(momentum, strategy="diversity", seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = bank_with(torch.randn(64, 32, generator=g), 64, update_strategy=strategy, memory_momentum=momentum)
    return bank, g


@pytest.mark.parametrize("strategy", ["diversity", "rarity"])
def test_momentum_governs_how_fast_the_content_moves(strategy):
    changes = {}
    for momentum in (0.9999, 0.9):
        bank, g = full_bank(momentum, strategy)
        before = bank.memory.clone()
        for _ in range(200):
            bank.update(torch.randn(16, 32, generator=g) * torch.rand(16, 1, generator=g) * 3)
        changes[momentum] = bank.relative_change(before)
    assert changes[0.9999] < 0.02
    assert changes[0.9] > 0.20


def test_momentum_is_a_plain_attribute_the_loop_can_set():
    bank, g = full_bank(0.9)
    bank.momentum = 0.9999
    before = bank.memory.clone()
    for _ in range(50):
        bank.update(torch.randn(16, 32, generator=g))
    assert bank.relative_change(before) < 0.01


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_wrapped_bank_keeps_every_slot_valid(strategy):
    bank = make_bank(6, bank_size=8, update_strategy=strategy, rarity_threshold=0.3)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        features = torch.randn(5, 6, generator=g) * torch.rand(5, 1, generator=g) * 4
        bank.update(features, probs=torch.rand(5, 3, generator=g))
    assert int(bank.filled) == 8 and bank.fill_fraction() == 1.0
    assert (bank.memory.abs().sum(dim=1) > 0).all()


def test_state_dict_round_trip_gives_identical_retrieval():
    bank = make_bank(16, bank_size=10, update_strategy="fifo")
    for _ in range(3):
        bank.update(torch.randn(4, 16))
    state = bank.state_dict()
    assert {"memory", "filled", "ring_pointer", "seen", "mean_norm"} <= set(state)
    restored = make_bank(16, bank_size=10, update_strategy="fifo")
    restored.load_state_dict(state)
    query = torch.randn(5, 16)
    assert torch.equal(bank.retrieve(query), restored.retrieve(query))
    assert int(restored.ring_pointer) == int(bank.ring_pointer) == 2
    assert int(restored.filled) == 10 and int(restored.seen) == 12


def test_relative_change_is_the_relative_frobenius_norm():
    bank, _ = full_bank(0.9)
    before = bank.memory.clone()
    bank.memory.mul_(1.1)
    assert bank.relative_change(before) == pytest.approx(0.1, rel=1e-5)


def test_a_bank_from_the_validated_config_section_takes_its_settings_and_booleans():
    raw = {"bank_size": 7, "update_strategy": "fifo", "top_k": 2, "normalize_retrieved": False,
           "memory_momentum": 0.5, "self_match_threshold": 0.8}
    bank = MemoryBank(5, from_dict({"memory": raw}).memory)
    assert (bank.bank_size, bank.update_strategy, bank.top_k, bank.normalize_retrieved, bank.momentum) == (
        7, "fifo", 2, "none", 0.5,
    )
    assert MemoryBank(4, from_dict({"memory": {"normalize_retrieved": True}}).memory).normalize_retrieved == "both"
    # the keys left out take the schema's defaults
    defaults = {f.name: f.default for f in dataclasses.fields(MemoryConfig)}
    unset = MemoryBank(5, from_dict({}).memory)
    assert (unset.rarity_threshold, unset.diversity_weight, unset.self_match_threshold, unset.bank_size) == (
        defaults["rarity_threshold"], defaults["diversity_weight"], defaults["self_match_threshold"],
        defaults["bank_size"],
    )
    # and the settings act: 'none' ranks by the raw dot product, the threshold is the configured one
    memory, query = random_bank_and_queries(7, bank_size=7, dim=5)
    bank.memory.copy_(memory)
    bank.filled.fill_(7)
    expected = reference_retrieve(memory, 7, query, "none", 2, 0.8)
    torch.testing.assert_close(bank.retrieve(query), expected, atol=1e-5, rtol=1e-5)


def test_unknown_strategy_or_mode_is_a_one_line_user_error_of_the_config():
    with pytest.raises(UserError, match="did you mean rarity") as error:
        from_dict({"memory": {"update_strategy": "rarty"}})
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="did you mean query_only"):
        from_dict({"memory": {"normalize_retrieved": "query"}})


@pytest.mark.parametrize("key, registry", [("update_strategy", STRATEGIES), ("normalize_retrieved", NORMALIZE_MODES)])
def test_the_registries_hold_exactly_the_schema_choices(key, registry):
    field = {f.name: f for f in dataclasses.fields(MemoryConfig)}[key]
    assert tuple(registry) == tuple(field.metadata["choices"])


def test_update_ignores_autograd_and_stores_float32():
    bank = make_bank(4, bank_size=4, update_strategy="fifo")
    features = torch.randn(2, 4, requires_grad=True).to(torch.bfloat16)
    bank.update(features)
    assert bank.memory.dtype == torch.float32 and not bank.memory.requires_grad
    torch.testing.assert_close(bank.memory[:2], features.detach().float())
    assert math.isfinite(bank.mean_norm.item())


# --------------------------------------------------------------------------- retrieval leaves no state behind


@pytest.mark.parametrize("strategy", ["rarity", "diversity", "hybrid", "entropy", "statistical"])
def test_update_after_retrieval_equals_update_alone(strategy):
    """A retrieval before the update (of the same tensor, a copy, or one changed in place) changes nothing."""
    g = torch.Generator().manual_seed(4)
    start = torch.randn(16, 8, generator=g)
    reusing, plain = (bank_with(start, 16, update_strategy=strategy, memory_momentum=0.7) for _ in range(2))
    for step in range(20):
        z = torch.randn(12, 8, generator=g) * torch.rand(12, 1, generator=g) * 3
        probs = torch.rand(12, 3, generator=g)
        if step % 5 == 4:  # an in-place change between retrieval and update
            reusing.retrieve(z)
            z.mul_(-1)
        elif step % 5 == 3:  # retrieval of a copy
            reusing.retrieve(z.clone())
        else:
            reusing.retrieve(z)
        reusing.update(z, probs=probs)
        plain.update(z.clone(), probs=probs)
        torch.testing.assert_close(reusing.memory, plain.memory, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_retrieval_after_updates_equals_a_freshly_loaded_bank(strategy):
    """A bank's retrieval depends on its state dict only, after updates and after changes outside the writers."""
    g = torch.Generator().manual_seed(6)
    bank = make_bank(8, bank_size=10, update_strategy=strategy, rarity_threshold=0.3, top_k=2)
    for _ in range(12):
        z = torch.randn(4, 8, generator=g) * torch.rand(4, 1, generator=g) * 3
        bank.retrieve(z)
        bank.update(z, probs=torch.rand(4, 3, generator=g))
        fresh = make_bank(8, bank_size=10, update_strategy=strategy, top_k=2)
        fresh.load_state_dict(bank.state_dict())
        query = torch.randn(5, 8, generator=g)
        torch.testing.assert_close(bank.retrieve(query), fresh.retrieve(query), atol=1e-6, rtol=1e-6)
    bank.memory.mul_(2.0)  # a change outside the writers
    fresh.memory.mul_(2.0)
    torch.testing.assert_close(bank.retrieve(query), fresh.retrieve(query), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- no host synchronisation


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_retrieval_and_update_never_read_a_value_on_the_host(strategy):
    """On the meta device a tensor has a shape and no values: reading one on the host (``int(filled)``,
    ``if mean_norm > 0``, a boolean-mask index, ``unique``, ``bincount``) raises, as on a GPU it would make
    the host wait for the device. A run of fills, a partly filling batch and updates of a full bank must pass."""
    bank = make_bank(8, bank_size=12, update_strategy=strategy, rarity_threshold=0.3).to("meta")
    for size in (5, 5, 6, 9):
        features = torch.empty(size, 8, device="meta")
        probs = torch.empty(size, 3, device="meta") if bank.needs_probs else None
        assert bank.retrieve(features).shape == (size, 8)
        bank.update(features, probs=probs)
    assert bank.memory.device.type == "meta" and bank.memory.dtype == torch.float32
