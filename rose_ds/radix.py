"""Exact order statistics of scores spread over many processes, without gathering them.

Element-granularity selection needs quantiles of one score per parameter element, over all ranks'
shards: gathering them needs O(P) memory on one device, and ``torch.quantile`` refuses more than
2^24 elements. Here each rank keeps only its own shard. Scores (float32) are mapped to int32 keys
whose signed order is the float order; a radix select then fixes the key of every wanted order
statistic one byte per round: each rank histograms the next byte of its candidates (256 bins per
wanted statistic), one all-reduce sums the histograms, and the bin that holds the statistic becomes
the prefix of the next round. Four rounds give the exact key, whatever the distribution (ties,
constants, infinities, 40 orders of magnitude). Traffic: 4 all-reduces of ``targets x 256`` int64
counts, independent of the number of elements; memory: the local keys and candidates, O(P/N).

Pure functions: the caller passes ``all_reduce``, a callable that sums an int64 tensor over the
ranks and returns it (identity in one process; ``rose_ds.zero`` passes a ``deepspeed.comm`` one).

Ordering: NaN sorts above +inf (as in ``torch.sort``), -0.0 equals +0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]
BINS = 256
ROUNDS = 4
# Beyond this many elements torch.quantile refuses, and float32 can no longer hold every rank exactly.
FLOAT32_RANKS = 1 << 24


def _identity(t: Tensor) -> Tensor:
    return t


def order_keys(scores: Tensor, nonnegative: bool = False) -> Tensor:
    """int32 keys whose signed order is the order of the float32 ``scores`` (NaN highest, -0.0 = +0.0).

    ``nonnegative=True`` promises scores without a sign bit (results of ``abs``, +inf, +NaN): their
    bit patterns are already ordered, and the keys are a view of the scores (no pass over them).
    """
    x = scores.detach().to(torch.float32).reshape(-1)
    if nonnegative:
        return x.view(torch.int32)
    # one NaN bit pattern (positive, above +inf) and one zero, so equal floats get equal keys
    x = torch.where(torch.isnan(x), torch.tensor(float("nan")), x) + 0.0
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_value(key: int) -> float:
    """The float32 value of a key (the inverse of :func:`order_keys`), as a Python float."""
    k = torch.tensor([key], dtype=torch.int32)
    return float((k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32))


def _flat(local_scores: Tensor | Sequence[Tensor]) -> list[Tensor]:
    parts = [local_scores] if isinstance(local_scores, Tensor) else list(local_scores)
    return [p.reshape(-1) for p in parts]


def kth_smallest(
    local_scores: Tensor | Sequence[Tensor],
    ks: Sequence[int],
    all_reduce: AllReduce = _identity,
    total: int | None = None,
    nonnegative: bool = False,
) -> list[float]:
    """The ``k``-th smallest (0-based) of the scores of all ranks together, for each ``k`` in ``ks``.

    Every rank calls it with its own shard and the same ``ks``; every rank gets the same values, equal
    to ``torch.sort(torch.cat(all shards)).values[k]`` (and to ``torch.kthvalue(cat, k + 1)``).

    Args:
        local_scores: This rank's scores: a tensor or a list of tensors taken together without
            concatenating them (any shapes, converted to float32; may be empty).
        ks: Order statistics wanted, each in ``[0, total count)``.
        all_reduce: Sums an int64 tensor over the ranks and returns the sum.
        total: The number of scores of all ranks, if the caller knows it (saves one all-reduce).
        nonnegative: The scores have no sign bit set (see :func:`order_keys`): skips the key mapping.

    Raises:
        IndexError: a ``k`` outside ``[0, total count)``.
    """
    parts = _flat(local_scores)
    wanted = list(dict.fromkeys(int(k) for k in ks))
    if total is None:
        total = int(all_reduce(torch.tensor([sum(p.numel() for p in parts)], dtype=torch.int64))[0])
    bad = [k for k in wanted if not 0 <= k < total]
    if bad:
        raise IndexError(f"order statistic {bad[0]} outside [0, {total}) of the scores of all ranks")
    remaining = list(wanted)
    prefixes = [0] * len(wanted)
    # Candidates by prefix: targets that share a prefix share one tensor (many ties: one copy, not one per target).
    candidates: dict[int, Tensor] = {}
    for round_ in range(ROUNDS):
        shift = 8 * (ROUNDS - 1 - round_)
        counts = torch.zeros(len(wanted), BINS, dtype=torch.int64)
        if round_ == 0:  # the top byte: one histogram for every target, kept (1 byte per score) for the cut
            tops = []
            for part in parts:
                tops.append(((order_keys(part, nonnegative) >> shift) + 128).to(torch.uint8))
                counts += torch.bincount(tops[-1], minlength=BINS)
        else:
            histograms = {p: torch.bincount(((c >> shift) & 0xFF).to(torch.int64), minlength=BINS)
                          for p, c in candidates.items()}  # fmt: skip
            for t in range(len(wanted)):
                counts[t] = histograms[prefixes[t]]
        counts = all_reduce(counts)
        for t in range(len(wanted)):
            cumulative = counts[t].cumsum(0)
            digit = int(torch.searchsorted(cumulative, remaining[t], right=True))
            remaining[t] -= int(cumulative[digit - 1]) if digit > 0 else 0
            prefixes[t] = digit - 128 if round_ == 0 else (prefixes[t] << 8) | digit
        if round_ == ROUNDS - 1:
            break
        if round_ == 0:  # only keys with the target's top byte can hold it (usually a small subset)
            pieces: dict[int, list[Tensor]] = {p: [] for p in prefixes}
            for part, top in zip(parts, tops):
                keys = order_keys(part, nonnegative)
                for p in pieces:
                    pieces[p].append(keys[top == p + 128])
            del tops
            candidates = {p: torch.cat(x) if x else torch.empty(0, dtype=torch.int32) for p, x in pieces.items()}
        else:
            candidates = {p: candidates[p >> 8][(candidates[p >> 8] >> shift) == p] for p in set(prefixes)}
    value = {k: key_value(p) for k, p in zip(wanted, prefixes)}
    return [value[int(k)] for k in ks]


def quantiles(
    local_scores: Tensor | Sequence[Tensor],
    qs: Sequence[float],
    all_reduce: AllReduce = _identity,
    nonnegative: bool = False,
) -> Tensor:
    """``torch.quantile(torch.cat(all shards), qs)`` (linear interpolation), computed without gathering.

    Bit for bit equal to ``torch.quantile`` on the float32 concatenation wherever that accepts the input
    (at most 2^24 elements, no NaN): the rank ``q * (n - 1)`` is formed in float32 as torch does.
    Beyond 2^24 elements the rank is formed in float64 (exact) and the two neighbours are those
    ``torch.kthvalue`` returns. With NaN scores present, NaN sorts highest (torch.quantile would
    return NaN for every q).

    Returns:
        float32 tensor with one value per ``q``.
    """
    n = int(all_reduce(torch.tensor([sum(p.numel() for p in _flat(local_scores))], dtype=torch.int64))[0])
    if n == 0:
        raise IndexError("quantiles of no scores at all")
    dtype = torch.float32 if n <= FLOAT32_RANKS else torch.float64
    ranks = torch.tensor(list(qs), dtype=dtype) * (n - 1)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    values = kth_smallest(local_scores, below.tolist() + above.tolist(), all_reduce, total=n, nonnegative=nonnegative)
    v_below = torch.tensor(values[: len(below)], dtype=torch.float32)
    v_above = torch.tensor(values[len(below) :], dtype=torch.float32)
    mixed = torch.lerp(v_below, v_above, (ranks - below).to(torch.float32))
    return torch.where(v_below == v_above, v_below, mixed)  # inf == inf: no inf - inf = NaN in the lerp
