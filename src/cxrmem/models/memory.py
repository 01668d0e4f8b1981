"""The momentum-updated memory bank that augments pooled backbone features.

Notation: a batch of pooled features ``z`` of shape ``[B, D]``; the bank holds ``S = bank_size``
slots ``m_0 .. m_{S-1}`` of dimension ``D``, of which ``m_0 .. m_{filled-1}`` are valid (they are
filled in that order and a full bank stays full).

Retrieval (:meth:`MemoryBank.retrieve`), for every query ``q``::

    s_j   = sim(q, m_j)                      over the valid slots j
    E     = { j : cos(q, m_j) >= self_match_threshold }  (excluded: "self matches", cosine in every mode)
    N     = the k = min(top_k, S) largest s_j with j not in E (fewer if fewer remain)
    w_j   = exp(s_j) / sum_{i in N} exp(s_i)   for j in N
    r(q)  = sum_{j in N} w_j * m_j           (zero when N is empty)

``sim`` depends on ``normalize_retrieved``: 'both' -> cosine ``q.m / (|q||m|)``,
'query_only' -> ``q.m / |q|``, 'memory_only' -> ``q.m / |m|``, 'none' -> ``q.m``.
The normalisation only concerns the similarity: the vectors summed are the
stored, unnormalised slots ``m_j``, so ``z + r(z)`` stays on the scale of ``z``.
The self-match test always uses the cosine, so ``self_match_threshold`` means
"a near-duplicate of the query" in every mode (under 'none' a raw-dot-product
threshold would exclude almost every slot of non-negative features).

Update (:meth:`MemoryBank.update`): a strategy from :data:`STRATEGIES` selects features of the batch;
they first fill the free slots in order, then (bank full) follow the strategy's write mode:

* ``ring``: replace the oldest slot (a ring pointer separate from ``filled``);
* ``reservoir``: item number ``t`` of the stream replaces slot ``j`` drawn
  uniformly from ``[0, t)`` if ``j < S`` (Algorithm R), so after ``t`` items
  each one is in the bank with probability ``S / t``;
* ``merge``: each selected feature is assigned to its most similar slot
  (cosine); with ``n_j`` features assigned to slot ``j`` and ``mean_j`` their
  mean, ``m_j <- momentum**n_j * m_j + (1 - momentum**n_j) * mean_j``.

Host synchronisation: none in retrieval or update on one process. Counts stay on the device and
every selection is a mask of fixed shape ``[B]``, so the GPU never waits for the host to read a value
(a test runs both on the ``meta`` device, where any such read fails). Under torch.distributed the
update exchanges the ranks' batch sizes once.

Cost: retrieval forms one ``[B, D] x [D, S]`` product without autograd, only to choose the
neighbours; the ``k`` chosen similarities are recomputed with autograd on the gathered
``[B, k, D]`` neighbours, so the backward pass costs ``O(B k D)`` and never touches ``[B, S]``.
A merging update forms one more product, between the features it merges and the slots (their
nearest slot), and 'diversity' / 'hybrid' one for the whole batch (its distance to the bank).
Settings, their defaults and ranges: :class:`cxrmem.config.MemoryConfig`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import MemoryConfig

__all__ = ["MemoryBank", "STRATEGIES", "NORMALIZE_MODES", "UpdateStrategy"]

_EPS = 1e-8

#: normalize_retrieved mode -> (normalise the query, normalise the slots) for the similarity.
NORMALIZE_MODES = {"both": (True, True), "query_only": (True, False), "memory_only": (False, True),
                   "none": (False, False)}


class _Batch(NamedTuple):
    """One (all-gathered) update batch as the strategies see it."""
    bank: "MemoryBank"
    features: Tensor  # [B, D] float32
    probs: Tensor | None  # [B, C] predicted probabilities, or None
    norms: Tensor  # ||z_i||, [B]


def _relative_norm_deviation(norms: Tensor, reference: Tensor) -> Tensor:
    """``r_i = | ||z_i|| - ref | / ref``."""
    return (norms - reference).abs() / reference.clamp_min(_EPS)


def _top_fraction(scores: Tensor, fraction: float) -> Tensor:
    """Mask of the ``max(1, floor(fraction * B))`` highest scores (at most B)."""
    count = min(len(scores), max(1, int(fraction * len(scores))))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, scores.topk(count).indices, True)


def _rarity_scores(batch: _Batch) -> Tensor:
    """Rarity against the batch mean norm: ``r_i = | ||z_i|| - mean_j ||z_j|| | / mean_j ||z_j||``."""
    return _relative_norm_deviation(batch.norms, batch.norms.mean())


def _diversity_scores(batch: _Batch) -> Tensor:
    """``d_i = 1 - max_j cos(z_i, m_j)`` (1 for every feature while the bank is empty)."""
    return 1.0 - batch.bank.closest_slots(batch.features)[0]


def select_rare(batch: _Batch) -> Tensor:
    """rarity: store the outliers, ``r_i > rarity_threshold``."""
    return _rarity_scores(batch) > batch.bank.rarity_threshold


def select_statistically_rare(batch: _Batch) -> Tensor:
    """statistical: rarity against the running mean norm before this batch (the batch mean before any history)."""
    history = batch.bank.mean_norm
    reference = torch.where(history > 0, history, batch.norms.mean())
    return _relative_norm_deviation(batch.norms, reference) > batch.bank.rarity_threshold


def select_diverse(batch: _Batch) -> Tensor:
    """diversity: the top ``rarity_threshold`` fraction of the batch by ``d_i``."""
    return _top_fraction(_diversity_scores(batch), batch.bank.rarity_threshold)


def select_hybrid(batch: _Batch) -> Tensor:
    """hybrid: top fraction by ``(1 - w) * r_i / max_j r_j + w * d_i``, ``w = diversity_weight``."""
    rarity = _rarity_scores(batch)
    normalised_rarity = rarity / rarity.max().clamp_min(_EPS)
    weight = batch.bank.diversity_weight
    scores = (1.0 - weight) * normalised_rarity + weight * _diversity_scores(batch)
    return _top_fraction(scores, batch.bank.rarity_threshold)


def select_uncertain(batch: _Batch) -> Tensor:
    """entropy: top fraction by ``H_i = mean_c [-p log p - (1 - p) log(1 - p)]`` of the predicted probabilities."""
    if batch.probs is None:
        raise ValueError("update_strategy 'entropy' scores the model's predicted probabilities: "
                         "call MemoryBank.update(features, probs=torch.sigmoid(logits))")
    p = batch.probs.clamp(_EPS, 1.0 - _EPS)
    entropy = -(p * p.log() + (1.0 - p) * (1.0 - p).log()).mean(dim=1)
    return _top_fraction(entropy, batch.bank.rarity_threshold)


def select_all(batch: _Batch) -> Tensor:
    """fifo / reservoir: all features go to the writer."""
    return torch.ones_like(batch.norms, dtype=torch.bool)


@dataclass(frozen=True)
class UpdateStrategy:
    """``select``: batch -> mask ``[B]`` of the features to store (batch order kept).
    ``write``: what happens once the bank is full, 'merge', 'ring' or 'reservoir' (module docstring)."""

    select: Callable[[_Batch], Tensor]
    write: str
    needs_probs: bool = False


#: update_strategy name -> strategy. Adding one is one function and one line (and its name in config.STRATEGIES).
STRATEGIES: dict[str, UpdateStrategy] = {
    "rarity": UpdateStrategy(select_rare, "merge"),
    "statistical": UpdateStrategy(select_statistically_rare, "merge"),
    "diversity": UpdateStrategy(select_diverse, "merge"),
    "hybrid": UpdateStrategy(select_hybrid, "merge"),
    "entropy": UpdateStrategy(select_uncertain, "merge", needs_probs=True),
    "fifo": UpdateStrategy(select_all, "ring"),
    "reservoir": UpdateStrategy(select_all, "reservoir"),
}


def _gather_across_ranks(rows: Tensor) -> Tensor:
    """``rows`` of every rank in rank order (unchanged outside torch.distributed); row counts may differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    local_count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(local_count) for _ in range(world)]
    dist.all_gather(counts, local_count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:count] for chunk, count in zip(gathered, counts)])


def _softmax_over_valid(scores: Tensor, valid: Tensor) -> Tensor:
    """Row-wise softmax over the ``valid`` entries; a row without any gives zeros and a zero gradient."""
    empty_rows = ~valid.any(dim=1, keepdim=True)
    logits = scores.masked_fill(~valid, float("-inf")).masked_fill(empty_rows, 0.0)
    return logits.softmax(dim=1) * valid


def _without_autocast(device: torch.device):
    """Autocast off on ``device`` (a no-op where the device has none, e.g. ``meta``)."""
    available = torch.amp.is_autocast_available(device.type)
    return torch.autocast(device_type=device.type, enabled=False) if available else contextlib.nullcontext()


def _inverse_norms(rows: Tensor) -> Tensor:
    """``1 / max(||x||, 1e-12)`` per row (the scaling of ``F.normalize``)."""
    return torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-12).reciprocal()


class MemoryBank(nn.Module):
    """``bank_size`` feature vectors of dimension ``dim``, set up by the (validated) ``memory`` config section.

    Persistent buffers (in every checkpoint): ``memory`` [S, D], ``filled`` (valid slots ``0..filled-1``),
    ``ring_pointer`` (fifo's oldest slot once full), ``seen`` (features offered: the reservoir's stream
    position), ``mean_norm`` (``mu <- momentum * mu + (1 - momentum) * batch mean norm``, the first batch
    sets it); ``memory`` and ``mean_norm`` stay float32 under ``.half()`` / ``.to(bfloat16)``.
    ``momentum`` (initially ``memory_momentum``) is a plain attribute the training loop sets per phase.
    Reservoir draws come from a CPU generator seeded with ``seed`` (the same on every rank; not saved).
    """

    def __init__(self, dim: int, cfg: MemoryConfig, seed: int = 0):
        super().__init__()
        self.dim, self.bank_size, self.top_k = dim, cfg.bank_size, cfg.top_k
        self.update_strategy, self.strategy = cfg.update_strategy, STRATEGIES[cfg.update_strategy]
        self.rarity_threshold, self.diversity_weight = cfg.rarity_threshold, cfg.diversity_weight
        self.normalize_retrieved = cfg.normalize_retrieved
        self.normalise_query, self.normalise_slots = NORMALIZE_MODES[cfg.normalize_retrieved]
        self.self_match_threshold, self.momentum = cfg.self_match_threshold, cfg.memory_momentum
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("memory", torch.zeros(self.bank_size, dim, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ring_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean_norm", torch.zeros((), dtype=torch.float32))

    def _apply(self, fn, *args, **kwargs):
        """Follow device moves, but keep ``memory`` and ``mean_norm`` float32 (values kept exactly)."""
        # nn.Module._apply is the one hook that every .to()/.half()/.cuda() goes through
        originals = {"memory": self.memory, "mean_norm": self.mean_norm}
        super()._apply(fn, *args, **kwargs)
        for name, original in originals.items():
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, original.to(getattr(self, name).device))
        return self

    @property
    def needs_probs(self) -> bool:
        """Whether :meth:`update` needs the model's predicted probabilities."""
        return self.strategy.needs_probs

    def fill_fraction(self) -> float:
        """``filled / bank_size``."""
        return int(self.filled) / self.bank_size

    def relative_change(self, before: Tensor) -> float:
        """``||memory - before||_F / ||before||_F`` (inf if ``before`` is zero and memory is not)."""
        before = before.to(self.memory)
        change, reference = torch.linalg.norm(self.memory - before), torch.linalg.norm(before)
        return float(change / reference) if reference > 0 else (0.0 if change == 0 else math.inf)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, bank_size={self.bank_size}, update_strategy={self.update_strategy!r}, "
                f"top_k={self.top_k}, normalize_retrieved={self.normalize_retrieved!r}, momentum={self.momentum}")

    def _free_slots(self) -> Tensor:
        """True for the slots not yet filled, ``[S]`` (read on the device, no host synchronisation)."""
        return torch.arange(self.bank_size, device=self.memory.device) >= self.filled

    @torch.no_grad()
    def closest_slots(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(max_j cos(z_i, m_j), argmax_j)`` over the valid slots for every feature ``[B, D]`` (0, 0 if none)."""
        cosine = (features @ self.memory.T).mul_(_inverse_norms(self.memory)).mul_(_inverse_norms(features)[:, None])
        best, slot = cosine.masked_fill_(self._free_slots(), float("-inf")).max(dim=1)
        return torch.where(best > float("-inf"), best, torch.zeros_like(best)), slot

    def retrieve(self, query: Tensor) -> Tensor:
        """``r(q)`` of the module docstring, ``[B, D]`` -> ``[B, D]`` float32 (autocast off).

        Gradients reach the query through the chosen slots' similarities and the softmax; the bank gets none.
        """
        with _without_autocast(query.device):
            query = query.float()
            query_scale = _inverse_norms(query).unsqueeze(1)  # [B, 1], with autograd
            with torch.no_grad():
                slot_scale = _inverse_norms(self.memory)  # [S]
                dots = query @ self.memory.T  # [B, S]
                by_slot_norm = dots * slot_scale  # q.m_j / |m_j|
                cosine = by_slot_norm * query_scale
                scores = by_slot_norm if self.normalise_slots else dots  # the query's norm changes no ranking
                excluded = (cosine >= self.self_match_threshold) | self._free_slots()
                best, slots = scores.masked_fill_(excluded, float("-inf")).topk(min(self.top_k, self.bank_size))
                valid = best > float("-inf")  # False where fewer than k slots remain
            neighbours = self.memory.index_select(0, slots.flatten()).view(*slots.shape, self.dim)  # [B, k, D]
            similarities = (query.unsqueeze(1) @ neighbours.transpose(1, 2)).squeeze(1)  # q.n, [B, k]
            if self.normalise_query:
                similarities = similarities * query_scale
            if self.normalise_slots:
                similarities = similarities * slot_scale[slots]
            weights = _softmax_over_valid(similarities, valid)
            return (weights.unsqueeze(1) @ neighbours).squeeze(1)

    @torch.no_grad()
    def update(self, features: Tensor, probs: Tensor | None = None) -> None:
        """Offer a batch ``[B, D]`` (and, for 'entropy', its predicted probabilities ``[B, C]``); then
        ``seen += B`` and ``mean_norm`` moves. Under torch.distributed the batches of all ranks are gathered
        first (rank order), so every rank applies the same update and the banks stay identical."""
        with _without_autocast(features.device):
            rows = features.detach().float()
            if probs is not None:
                rows = torch.cat([rows, probs.detach().float()], dim=1)
            rows = _gather_across_ranks(rows)
            if rows.shape[0] == 0:
                return
            features, probs = rows[:, : self.dim], (rows[:, self.dim :] if probs is not None else None)
            batch = _Batch(self, features, probs, torch.linalg.vector_norm(features, dim=1))
            _WRITERS[self.strategy.write](self, features, self.strategy.select(batch))
            batch_mean = batch.norms.mean()
            moved = self.momentum * self.mean_norm + (1.0 - self.momentum) * batch_mean
            self.mean_norm.copy_(torch.where(self.mean_norm > 0, moved, batch_mean))  # the first batch sets it
            self.seen += features.shape[0]

    def _write_rows(self, slots: Tensor, rows: Tensor) -> None:
        """``m_{slots[i]} <- rows[i]`` for every ``i`` with ``slots[i] < S`` (``S``: write nowhere); of rows
        aimed at one slot the last one wins. Fixed shapes, so nothing waits for the host."""
        writer = torch.full((self.bank_size + 1,), -1, dtype=torch.long, device=rows.device)
        writer.scatter_reduce_(0, slots, torch.arange(rows.shape[0], device=rows.device), reduce="amax")
        writer = writer[: self.bank_size]
        self.memory.copy_(torch.where((writer >= 0).unsqueeze(1), rows[writer.clamp_min(0)], self.memory))

    def _fill_free_slots(self, features: Tensor, chosen: Tensor) -> Tensor:
        """Write the chosen features, in batch order, into the free slots ``filled, filled+1, ...``; return
        the mask of the chosen ones that found no free slot."""
        slot = self.filled + chosen.cumsum(0) - 1  # the n-th chosen feature goes to slot filled + n - 1
        fills = chosen & (slot < self.bank_size)
        self._write_rows(torch.where(fills, slot, self.bank_size), features)
        self.filled += fills.sum()
        return chosen & ~fills

    def _write_merging(self, features: Tensor, chosen: Tensor) -> None:
        """Fill, then ``m_j <- momentum**n_j m_j + (1 - momentum**n_j) mean_j`` at the nearest slots."""
        rest = self._fill_free_slots(features, chosen)
        nearest = torch.where(rest, self.closest_slots(features)[1], self.bank_size)  # S: the rows not merged
        counts = torch.zeros(self.bank_size + 1, device=features.device).index_add_(0, nearest, rest.float())
        sums = torch.zeros(self.bank_size + 1, self.dim, device=features.device).index_add_(0, nearest, features)
        counts, sums = counts[: self.bank_size].unsqueeze(1), sums[: self.bank_size]
        keep = torch.pow(self.momentum, counts)
        merged = keep * self.memory + (1.0 - keep) * (sums / counts.clamp_min(1.0))
        self.memory.copy_(torch.where(counts > 0, merged, self.memory))

    def _write_ring(self, features: Tensor, chosen: Tensor) -> None:
        """Fill, then overwrite the oldest slots in order (only the last ``S`` of a long batch survive)."""
        rest = self._fill_free_slots(features, chosen)
        order = rest.cumsum(0) - 1  # position among the features left for the ring
        slots = torch.remainder(self.ring_pointer + order, self.bank_size)
        self._write_rows(torch.where(rest, slots, self.bank_size), features)
        self.ring_pointer.copy_(torch.remainder(self.ring_pointer + rest.sum(), self.bank_size))

    def _write_reservoir(self, features: Tensor, chosen: Tensor) -> None:
        """Fill, then item ``t`` of the stream replaces slot ``j ~ U[0, t)`` when ``j < S`` (later items win).

        One uniform draw per feature of the batch (the filling ones draw too, unused), from the CPU generator."""
        rest = self._fill_free_slots(features, chosen)
        uniform = torch.rand(features.shape[0], generator=self.generator, dtype=torch.float64)
        if features.is_cuda:  # a pinned, asynchronous copy: a plain one would wait for the GPU to finish
            uniform = uniform.pin_memory().to(features.device, non_blocking=True)
        position = self.seen + torch.arange(1, features.shape[0] + 1, device=features.device)  # t of each item
        slots = (uniform.to(features.device) * position.double()).long()
        self._write_rows(torch.where(rest & (slots < self.bank_size), slots, self.bank_size), features)


#: write mode -> writer of (features, mask of the chosen ones). Each fills free slots first, then applies its rule.
_WRITERS: dict[str, Callable[[MemoryBank, Tensor, Tensor], None]] = {
    "merge": MemoryBank._write_merging,
    "ring": MemoryBank._write_ring,
    "reservoir": MemoryBank._write_reservoir,
}
