"""The momentum-updated memory bank that augments pooled backbone features.

Notation: a batch of pooled features ``z`` of shape ``[B, D]``; the bank holds
``S = bank_size`` slots ``m_0 .. m_{S-1}`` of dimension ``D``, of which
``m_0 .. m_{filled-1}`` are valid (they are filled in that order and a full
bank stays full).

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

Update (:meth:`MemoryBank.update`): a strategy from :data:`STRATEGIES` selects
features of the batch; selected features first fill the free slots in order,
then (bank full) replace or merge according to the strategy's write mode:

* ``ring``: replace the oldest slot (a ring pointer separate from ``filled``);
* ``reservoir``: item number ``t`` of the stream replaces slot ``j`` drawn
  uniformly from ``[0, t)`` if ``j < S`` (Algorithm R), so after ``t`` items
  each one is in the bank with probability ``S / t``;
* ``merge``: each selected feature is assigned to its most similar slot
  (cosine); with ``n_j`` features assigned to slot ``j`` and ``mean_j`` their
  mean, ``m_j <- momentum**n_j * m_j + (1 - momentum**n_j) * mean_j``.

Cost: one ``[B, D] x [D, S]`` product per retrieval, without autograd; the
gradient to the query is written by hand over the k chosen slots only
(:class:`_AttendToNeighbours`), so the backward pass never touches ``[B, S]``.
In training mode under 'both', retrieval also records each query's norm and
closest slot, and the update of the same features that follows (bank
unchanged) reuses them instead of a second product. The slots' inverse norms
are cached and kept in step by the writers.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cxrmem.errors import UserError

__all__ = ["MemoryBank", "STRATEGIES", "NORMALIZE_MODES", "UpdateStrategy"]

_EPS = 1e-8

#: normalize_retrieved mode -> (normalise the query, normalise the slots) for the similarity.
NORMALIZE_MODES: dict[str, tuple[bool, bool]] = {
    "both": (True, True),
    "query_only": (True, False),
    "memory_only": (False, True),
    "none": (False, False),
}


# --------------------------------------------------------------------------- batch view


class _Closest(NamedTuple):
    """For each feature: the cosine of its most similar valid slot and that slot (cosine 0, slot 0 if none)."""

    cosine: Tensor
    slot: Tensor


class _Recorded(NamedTuple):
    """What a training-mode retrieval under 'both' learnt about its queries, for the update that follows."""

    query: Tensor  # detached; same storage as the features the update will receive
    query_version: int
    memory: Tensor
    memory_version: int
    norms: Tensor  # ||q_i||, [B]
    closest: _Closest


class _Batch:
    """One (all-gathered) update batch with the quantities strategies share, computed once."""

    def __init__(self, bank: "MemoryBank", features: Tensor, probs: Tensor | None, recorded: _Recorded | None):
        self.bank = bank
        self.features = features
        self.probs = probs
        self._recorded = recorded

    def __len__(self) -> int:
        return self.features.shape[0]

    @cached_property
    def norms(self) -> Tensor:
        """``||z_i||`` for every feature, ``[B]``."""
        if self._recorded is not None:
            return self._recorded.norms
        return torch.linalg.vector_norm(self.features, dim=1)

    @cached_property
    def closest(self) -> _Closest:
        """Closest valid slot of every feature in the bank as it was before this update."""
        if self._recorded is not None:
            return self._recorded.closest
        return self.bank._closest_slots(self.features, self.norms)

    @property
    def max_cosine_to_bank(self) -> Tensor:
        """``max_j cos(z_i, m_j)`` over the valid slots, ``[B]``; 0 for an empty bank."""
        return self.closest.cosine


# --------------------------------------------------------------------------- selection


def _relative_norm_deviation(norms: Tensor, reference: Tensor) -> Tensor:
    """``r_i = | ||z_i|| - ref | / ref``."""
    return (norms - reference).abs() / reference.clamp_min(_EPS)


def _top_fraction(scores: Tensor, fraction: float) -> Tensor:
    """Mask of the ``max(1, floor(fraction * B))`` highest scores (at most B)."""
    count = min(len(scores), max(1, int(fraction * len(scores))))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[scores.topk(count).indices] = True
    return mask


def _rarity_scores(batch: _Batch) -> Tensor:
    """Rarity against the batch mean norm: ``r_i = | ||z_i|| - mean_j ||z_j|| | / mean_j ||z_j||``."""
    return _relative_norm_deviation(batch.norms, batch.norms.mean())


def _diversity_scores(batch: _Batch) -> Tensor:
    """``d_i = 1 - max_j cos(z_i, m_j)`` (1 for every feature while the bank is empty)."""
    return 1.0 - batch.max_cosine_to_bank


def select_rare(batch: _Batch) -> Tensor:
    """rarity: store the outliers, ``r_i > rarity_threshold``."""
    return _rarity_scores(batch) > batch.bank.rarity_threshold


def select_statistically_rare(batch: _Batch) -> Tensor:
    """statistical: rarity against the running mean norm ``mu`` (the batch mean before any history).

    ``mu`` is the bank's ``mean_norm`` as it was *before* this batch (it is then
    updated by :meth:`MemoryBank.update`: ``mu <- momentum * mu + (1 - momentum) * mean_i ||z_i||``).
    """
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
        raise ValueError(
            "update_strategy 'entropy' scores the model's predicted probabilities: "
            "call MemoryBank.update(features, probs=torch.sigmoid(logits))"
        )
    p = batch.probs.clamp(_EPS, 1.0 - _EPS)
    entropy = -(p * p.log() + (1.0 - p) * (1.0 - p).log()).mean(dim=1)
    return _top_fraction(entropy, batch.bank.rarity_threshold)


def select_all(batch: _Batch) -> slice:
    """fifo / reservoir: every feature is offered to the writer."""
    return slice(None)


@dataclass(frozen=True)
class UpdateStrategy:
    """How a strategy picks features (``select``) and writes them once the bank is full (``write``).

    ``select`` returns an index into the batch (a boolean mask, or a slice for
    "all"); the chosen features keep their batch order. ``write`` is one of
    'merge', 'ring', 'reservoir' (see the module docstring).
    """

    select: Callable[[_Batch], Tensor | slice]
    write: str
    needs_probs: bool = False


#: update_strategy name -> strategy. Adding one is one function and one line.
STRATEGIES: dict[str, UpdateStrategy] = {
    "rarity": UpdateStrategy(select_rare, "merge"),
    "statistical": UpdateStrategy(select_statistically_rare, "merge"),
    "diversity": UpdateStrategy(select_diverse, "merge"),
    "hybrid": UpdateStrategy(select_hybrid, "merge"),
    "entropy": UpdateStrategy(select_uncertain, "merge", needs_probs=True),
    "fifo": UpdateStrategy(select_all, "ring"),
    "reservoir": UpdateStrategy(select_all, "reservoir"),
}


# --------------------------------------------------------------------------- helpers


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.0)
    return match[0] if match else ""


def _canonical_normalize_mode(mode) -> str:
    """True -> 'both', False -> 'none', otherwise one of :data:`NORMALIZE_MODES`."""
    if mode is True:
        return "both"
    if mode is False or mode is None:
        return "none"
    if mode in NORMALIZE_MODES:
        return mode
    raise UserError(
        f"memory.normalize_retrieved: unknown value {mode!r} (did you mean {_closest(mode, NORMALIZE_MODES)}?); "
        f"use one of {', '.join(NORMALIZE_MODES)}, true or false"
    )


def _strategy_named(name: str) -> UpdateStrategy:
    if name not in STRATEGIES:
        raise UserError(
            f"memory.update_strategy: unknown strategy {name!r} (did you mean {_closest(name, STRATEGIES)}?); "
            f"use one of {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[name]


def _distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_rows(rows: Tensor) -> Tensor:
    """Concatenate ``rows`` of every rank in rank order; batch sizes may differ between ranks."""
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


def _gather_batch(features: Tensor, probs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The global batch of all ranks (one collective for features and probabilities together)."""
    if probs is None:
        return _all_gather_rows(features), None
    both = _all_gather_rows(torch.cat([features, probs], dim=1))
    return both[:, : features.shape[1]], both[:, features.shape[1] :]


def _softmax_over_valid(scores: Tensor, valid: Tensor, shift: Tensor) -> Tensor:
    """Row-wise softmax restricted to ``valid`` entries; rows without one give all zeros (no NaN).

    ``shift`` is any per-row constant close to the row maximum, for stability.
    """
    exponent = (scores - shift).masked_fill_(~valid, float("-inf"))
    weights = exponent.exp_()
    return weights.div_(weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny))


class _AttendToNeighbours(torch.autograd.Function):
    """``r_b = sum_k w_bk n_bk`` with ``w_b = softmax over the valid k of s_b``, ``s_bk = a_b c_bk (q_b . n_bk)``.

    ``a_b = 1 / max(||q_b||, 1e-12)`` when the query is normalised (``query_scale``
    given, ``[B, 1]``), else 1; ``c_bk = 1 / max(||n_bk||, 1e-12)`` when the slots are
    (``slot_scale``, ``[B, k]``), else 1. The similarities ``s`` come in already
    computed (the top-k values of the full similarity matrix). Only the query
    receives a gradient, computed by hand with two small batched products
    (``g`` is the incoming gradient of ``r``)::

        g_w = n . g                                    dL/dw_bk
        g_s = w * (g_w - sum_k w g_w)                  through the softmax
        v   = sum_k g_s a c n                          through the similarities
        g_q = v - a^2 q (q . v)   if normalised, else  v
    """

    @staticmethod
    def forward(ctx, query, similarities, query_scale, neighbours, slot_scale, valid, shift):
        weights = _softmax_over_valid(similarities, valid, shift)
        ctx.save_for_backward(query, query_scale, neighbours, _combined_scale(query_scale, slot_scale), weights)
        return torch.bmm(weights.unsqueeze(1), neighbours).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_retrieved):
        query, query_scale, neighbours, scale, weights = ctx.saved_tensors
        grad_weights = torch.bmm(grad_retrieved.unsqueeze(1), neighbours.transpose(1, 2)).squeeze(1)
        grad_similarities = weights * (grad_weights - (weights * grad_weights).sum(dim=1, keepdim=True))
        if scale is not None:
            grad_similarities.mul_(scale)
        grad_query = torch.bmm(grad_similarities.unsqueeze(1), neighbours).squeeze(1)
        if query_scale is not None:  # remove the radial component: d(q/|q|) = (I - u u^T) / |q|
            radial = torch.linalg.vecdot(query, grad_query, dim=1).unsqueeze(1)
            grad_query.addcmul_(query, radial * query_scale.square(), value=-1.0)
        return grad_query, None, None, None, None, None, None


def _combined_scale(row_scale: Tensor | None, column_scale: Tensor | None) -> Tensor | None:
    if row_scale is None:
        return column_scale
    return row_scale if column_scale is None else row_scale * column_scale


# --------------------------------------------------------------------------- the bank


class MemoryBank(nn.Module):
    """A bank of ``bank_size`` feature vectors with retrieval and strategy-driven updates.

    Buffers (all persistent, so saved in every checkpoint): ``memory`` [S, D]
    float32, ``filled`` (valid slots are ``0..filled-1``), ``ring_pointer`` (the
    oldest slot for fifo once full), ``seen`` (features offered so far: the
    reservoir's stream position), ``mean_norm`` (running mean feature norm,
    ``mu <- momentum * mu + (1 - momentum) * batch mean``, the first batch sets it).
    ``memory`` and ``mean_norm`` stay float32 under ``.half()`` / ``.to(bfloat16)``.

    ``momentum`` is a plain attribute (initially ``memory_momentum``): the
    training loop sets it per phase. Reservoir draws come from a CPU
    ``torch.Generator`` owned by the module and seeded with ``seed`` (so every
    rank draws the same numbers); its state is not part of the checkpoint.
    Besides the buffers the module keeps only derived, self-validating caches
    (slot norms, whether the bank is full, the last retrieval's record).
    """

    def __init__(
        self,
        dim: int,
        bank_size: int = 512,
        update_strategy: str = "rarity",
        rarity_threshold: float = 0.5,
        diversity_weight: float = 0.5,
        top_k: int = 3,
        normalize_retrieved: str | bool = "both",
        memory_momentum: float = 0.9,
        self_match_threshold: float = 0.99,
        seed: int = 0,
    ):
        super().__init__()
        if dim < 1 or bank_size < 1 or top_k < 1:
            raise UserError(
                f"memory bank needs dim >= 1, bank_size >= 1 and top_k >= 1 (got {dim}, {bank_size}, {top_k}); "
                "fix memory.bank_size / memory.top_k"
            )
        self.dim = int(dim)
        self.bank_size = int(bank_size)
        self.update_strategy = update_strategy
        self.strategy = _strategy_named(update_strategy)
        self.rarity_threshold = float(rarity_threshold)
        self.diversity_weight = float(diversity_weight)
        self.top_k = int(top_k)
        self.normalize_retrieved = _canonical_normalize_mode(normalize_retrieved)
        self.momentum = float(memory_momentum)
        self.self_match_threshold = float(self_match_threshold)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("memory", torch.zeros(self.bank_size, self.dim, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ring_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean_norm", torch.zeros((), dtype=torch.float32))
        self._recorded: _Recorded | None = None  # see _record
        self._fullness: tuple = (None, -1, False)  # see _is_full
        self._norm_cache: tuple | None = None  # see _inverse_slot_norms

    _CONFIG_KEYS = (
        "bank_size",
        "update_strategy",
        "rarity_threshold",
        "diversity_weight",
        "top_k",
        "normalize_retrieved",
        "memory_momentum",
        "self_match_threshold",
    )

    @classmethod
    def from_config(cls, dim: int, memory_cfg) -> "MemoryBank":
        """Build from any object (or mapping) with the constructor's key names; missing keys keep defaults."""
        if isinstance(memory_cfg, Mapping):
            values = {key: memory_cfg[key] for key in cls._CONFIG_KEYS if key in memory_cfg}
        else:
            values = {key: getattr(memory_cfg, key) for key in cls._CONFIG_KEYS if hasattr(memory_cfg, key)}
        return cls(dim, **values)

    # ------------------------------------------------------------------ dtype policy

    _FLOAT32_BUFFERS = ("memory", "mean_norm")

    def _apply(self, fn, *args, **kwargs):
        """Follow device moves, but ignore dtype casts of the float32 buffers (values kept exactly)."""
        originals = {name: getattr(self, name) for name in self._FLOAT32_BUFFERS}
        super()._apply(fn, *args, **kwargs)
        for name, original in originals.items():
            converted = getattr(self, name)
            if converted.dtype != torch.float32:
                setattr(self, name, original.to(converted.device))
        return self

    # ------------------------------------------------------------------ small queries

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
        change = torch.linalg.norm(self.memory - before)
        reference = torch.linalg.norm(before)
        if reference == 0:
            return 0.0 if change == 0 else math.inf
        return float(change / reference)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, bank_size={self.bank_size}, update_strategy={self.update_strategy!r}, "
            f"top_k={self.top_k}, normalize_retrieved={self.normalize_retrieved!r}, momentum={self.momentum}"
        )

    # ------------------------------------------------------------------ similarities

    def _inverse_slot_norms(self) -> Tensor:
        """``1 / max(||m_j||, 1e-12)`` for every slot (the scaling of ``F.normalize``), ``[S]``.

        Cached for the current ``memory`` (tensor and version); :meth:`_write_rows`
        keeps the cache in step, any other change of ``memory`` invalidates it.
        """
        if not self._norm_cache_is_current():
            inverse = torch.linalg.vector_norm(self.memory, dim=1).clamp_min(1e-12).reciprocal()
            self._norm_cache = (self.memory, self.memory._version, inverse)
        return self._norm_cache[2]

    def _norm_cache_is_current(self) -> bool:
        cache = self._norm_cache
        return cache is not None and cache[0] is self.memory and cache[1] == self.memory._version

    def _write_rows(self, rows, values: Tensor) -> None:
        """``memory[rows] = values`` (rows: slice, indices or mask), keeping the norm cache in step."""
        in_step = self._norm_cache_is_current()
        self.memory[rows] = values
        if in_step:
            inverse = self._norm_cache[2]
            inverse[rows] = torch.linalg.vector_norm(values, dim=1).clamp_min(1e-12).reciprocal()
            self._norm_cache = (self.memory, self.memory._version, inverse)

    def _is_full(self) -> bool:
        """Whether every slot is valid; ``filled`` is read from its device only after it changed."""
        last_tensor, last_version, full = self._fullness
        if last_tensor is not self.filled or last_version != self.filled._version:
            full = int(self.filled) == self.bank_size
            self._fullness = (self.filled, self.filled._version, full)
        return full

    def _unfilled_bias(self) -> Tensor:
        """0 for the valid slots, -inf for the free ones, ``[S]`` (no host synchronisation)."""
        free = torch.arange(self.bank_size, device=self.memory.device) >= self.filled
        return torch.zeros(self.bank_size, device=self.memory.device).masked_fill_(free, float("-inf"))

    def _scores(self, query: Tensor, column_scale: Tensor | None) -> Tensor:
        """``column_scale_j * (q_b . m_j)`` for every slot, -inf at the free ones, ``[B, S]``.

        A per-query (row) scale is left to the callers: it changes no ranking,
        so it is applied to the few values kept rather than to the whole matrix.
        """
        scores = query @ self.memory.T
        if column_scale is not None:
            scores.mul_(column_scale)
        return scores if self._is_full() else scores.add_(self._unfilled_bias())

    @torch.no_grad()
    def _closest_slots(self, features: Tensor, norms: Tensor) -> _Closest:
        """Most similar valid slot (cosine) of every feature, given the features' norms."""
        row_scale = norms.clamp_min(1e-12).reciprocal().unsqueeze(1)
        return self._closest(self._scores(features, self._inverse_slot_norms()), row_scale)

    @staticmethod
    def _closest(scores: Tensor, row_scale: Tensor) -> _Closest:
        """Row maxima of ``row_scale * scores`` (0 where a row has no valid slot) and where they are."""
        best, slot = scores.max(dim=1)
        best = best * row_scale.squeeze(1)
        return _Closest(torch.where(best > float("-inf"), best, torch.zeros_like(best)), slot)

    # ------------------------------------------------------------------ retrieval

    def retrieve(self, query: Tensor) -> Tensor:
        """``r(q)`` of the module docstring for a batch ``[B, D]`` -> ``[B, D]`` float32.

        Gradients reach the query through the similarities of the chosen slots
        and the softmax; the bank gets none. Computed in float32 with autocast off.
        """
        normalise_query, normalise_slots = NORMALIZE_MODES[self.normalize_retrieved]
        with torch.autocast(device_type=query.device.type, enabled=False):
            query32 = query.float()
            with torch.no_grad():
                norms = torch.linalg.vector_norm(query32, dim=1)
                inverse_query_norms = norms.clamp_min(1e-12).reciprocal().unsqueeze(1)
                query_scale = inverse_query_norms if normalise_query else None
                inverse_slot_norms = self._inverse_slot_norms() if normalise_slots else None
                scores = self._scores(query32, inverse_slot_norms)
                self._record(query, norms if normalise_query else None, scores, query_scale)
                self._exclude_self_matches(scores, inverse_query_norms, None if normalise_slots else
                                           self._inverse_slot_norms())
                similarities, slots, valid, shift = self._top_k_allowed(scores, query_scale)
                neighbours = self.memory.index_select(0, slots.flatten()).view(*slots.shape, self.dim)
                slot_scale = inverse_slot_norms[slots] if normalise_slots else None
            return _AttendToNeighbours.apply(query32, similarities, query_scale, neighbours, slot_scale, valid, shift)

    def _exclude_self_matches(self, scores: Tensor, inverse_query_norms: Tensor,
                              missing_slot_scale: Tensor | None) -> None:
        """Mask (in place, -inf) the slots whose *cosine* similarity to the query is >= self_match_threshold.

        The test is on the cosine in every normalisation mode, so the threshold keeps one meaning
        (a near-duplicate of the query) whatever similarity ranks the neighbours. ``scores`` already
        carries the slots' inverse norms unless ``missing_slot_scale`` supplies them.
        """
        threshold = self.self_match_threshold / inverse_query_norms
        if missing_slot_scale is None:
            scores.masked_fill_(scores >= threshold, float("-inf"))
        else:
            scores.masked_fill_(scores * missing_slot_scale >= threshold, float("-inf"))

    def _top_k_allowed(self, scores: Tensor, row_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k similarities ``s = row_scale * scores`` ``[B, k]`` among the slots not masked,
        their slots, their validity (False where fewer than k slots remain) and a softmax shift."""
        best, slots = scores.topk(min(self.top_k, self.bank_size), dim=1)
        if row_scale is not None:
            best = best * row_scale
        valid = best > float("-inf")
        shift = torch.where(valid[:, :1], best[:, :1], torch.zeros_like(best[:, :1]))
        return best, slots, valid, shift

    def _record(self, query: Tensor, norms: Tensor | None, scores: Tensor, row_scale: Tensor | None) -> None:
        """In training under 'both', keep the queries' norms and closest slots for the update that follows.

        The record is used only by an update of the very same tensor (same
        storage, shape and version) while ``memory`` is unchanged.
        """
        self._recorded = None
        useful = self.training and self.normalize_retrieved == "both" and self.strategy.write == "merge"
        if useful and not query.is_inference():
            self._recorded = _Recorded(query.detach(), query._version, self.memory, self.memory._version,
                                       norms, self._closest(scores, row_scale))

    def _take_record(self, features: Tensor) -> _Recorded | None:
        """The record of a retrieval of exactly ``features`` against the current memory, else None."""
        recorded, self._recorded = self._recorded, None
        if recorded is None or features.is_inference():
            return None
        query = recorded.query
        same_features = (
            features.data_ptr() == query.data_ptr()
            and features.shape == query.shape
            and features.stride() == query.stride()
            and features.dtype == query.dtype
            and features._version == recorded.query_version
        )
        same_memory = recorded.memory is self.memory and self.memory._version == recorded.memory_version
        return recorded if same_features and same_memory else None

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, features: Tensor, probs: Tensor | None = None) -> None:
        """Offer a batch ``[B, D]`` (and, for 'entropy', its predicted probabilities ``[B, C]``).

        Under torch.distributed the batches of all ranks are gathered first (rank
        order), so every rank applies the same update and the banks stay identical.
        """
        recorded = self._take_record(features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.detach().float()
            probs = probs.detach().float() if probs is not None else None
            if _distributed_world_size() > 1:
                features, probs = _gather_batch(features, probs)
                recorded = None
            if features.shape[0] == 0:
                return
            batch = _Batch(self, features, probs, recorded)
            chosen = self.strategy.select(batch)
            _WRITERS[self.strategy.write](self, batch, chosen)
            self._track_stream(batch)

    def _track_stream(self, batch: _Batch) -> None:
        """``seen += B``; ``mean_norm <- momentum * mean_norm + (1 - momentum) * mean ||z||``."""
        batch_mean = batch.norms.mean()
        if self.mean_norm > 0:
            batch_mean = self.momentum * self.mean_norm + (1.0 - self.momentum) * batch_mean
        self.mean_norm.copy_(batch_mean)
        self.seen += len(batch)

    def _fill_free_slots(self, features: Tensor) -> int:
        """Write the leading features into the free slots ``filled, filled+1, ...``; return how many."""
        filled = int(self.filled)
        count = min(self.bank_size - filled, features.shape[0])
        if count > 0:
            self._write_rows(slice(filled, filled + count), features[:count])
            self.filled += count
        return count

    def _write_merging(self, batch: _Batch, chosen: Tensor | slice) -> None:
        """Fill, then ``m_j <- momentum**n_j m_j + (1 - momentum**n_j) mean_j`` at the nearest slots."""
        features = batch.features[chosen]
        stored = self._fill_free_slots(features)
        if stored == features.shape[0]:
            return
        if stored == 0:  # the bank was full before this update: the batch's closest slots still hold
            nearest = batch.closest.slot[chosen]
        else:
            rest = features[stored:]
            nearest = self._closest_slots(rest, torch.linalg.vector_norm(rest, dim=1)).slot
        self._merge(features[stored:], nearest)

    def _merge(self, features: Tensor, nearest: Tensor) -> None:
        """Batched momentum merge; only the touched slots are read and written."""
        slots, assignment = torch.unique(nearest, return_inverse=True)
        counts = torch.bincount(assignment, minlength=slots.shape[0]).to(self.memory.dtype).unsqueeze(1)
        means = torch.zeros(slots.shape[0], self.dim, device=features.device).index_add_(0, assignment, features)
        means /= counts
        keep = torch.pow(self.momentum, counts)
        self._write_rows(slots, keep * self.memory[slots] + (1.0 - keep) * means)

    def _write_ring(self, batch: _Batch, chosen: Tensor | slice) -> None:
        """Fill, then overwrite the oldest slots in order (only the last ``S`` of a long batch survive)."""
        features = batch.features[chosen]
        rest = features[self._fill_free_slots(features) :]
        if rest.shape[0] == 0:
            return
        skipped = max(0, rest.shape[0] - self.bank_size)
        rest = rest[skipped:]
        start = (int(self.ring_pointer) + skipped) % self.bank_size
        slots = (start + torch.arange(rest.shape[0], device=rest.device)) % self.bank_size
        self._write_rows(slots, rest)
        self.ring_pointer.fill_((start + rest.shape[0]) % self.bank_size)

    def _write_reservoir(self, batch: _Batch, chosen: Tensor | slice) -> None:
        """Fill, then item ``t`` of the stream replaces slot ``j ~ U[0, t)`` when ``j < S`` (later items win)."""
        features = batch.features[chosen]
        stored = self._fill_free_slots(features)
        rest = features[stored:]
        if rest.shape[0] == 0:
            return
        first_position = int(self.seen) + stored + 1
        positions = torch.arange(first_position, first_position + rest.shape[0], dtype=torch.float64)
        draws = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * positions).long()
        kept = draws < self.bank_size
        slots = draws[kept].to(rest.device)
        items = torch.nonzero(kept).squeeze(1).to(rest.device)
        last_writer = torch.full((self.bank_size,), -1, dtype=torch.long, device=rest.device)
        last_writer.scatter_reduce_(0, slots, items, reduce="amax")
        hit = last_writer >= 0
        self._write_rows(hit, rest[last_writer[hit]])


#: write mode -> writer of the chosen features. Each fills free slots first, then applies its rule.
_WRITERS: dict[str, Callable[[MemoryBank, _Batch, Tensor | slice], None]] = {
    "merge": MemoryBank._write_merging,
    "ring": MemoryBank._write_ring,
    "reservoir": MemoryBank._write_reservoir,
}
