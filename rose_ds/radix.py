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

:func:`sampled_quantiles` gives the same values with far fewer passes over the scores (what element
granularity uses): a seeded sample of the scores brackets each wanted order statistic, one counting
pass finds how many scores lie below and inside each bracket, and the radix select runs only among
the scores inside (about 1 % of them); when a bracket misses its order statistic, the full radix
select above runs instead. Exact either way, and still a fixed few kilobytes per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from rose_ds import kernels

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
    ranks, below, above = _ranks(qs, n)
    values = kth_smallest(local_scores, below.tolist() + above.tolist(), all_reduce, total=n, nonnegative=nonnegative)
    return _interpolate(values, ranks, below)


def _ranks(qs: Sequence[float], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fractional rank ``q * (n - 1)`` of each quantile (float32 up to 2^24 scores, as torch), and
    the order statistics below and above it."""
    dtype = torch.float32 if n <= FLOAT32_RANKS else torch.float64
    ranks = torch.tensor(list(qs), dtype=dtype) * (n - 1)
    return ranks, ranks.to(torch.long), ranks.ceil().to(torch.long)


def _interpolate(values: Sequence[float], ranks: Tensor, below: Tensor) -> Tensor:
    """torch.quantile's linear interpolation between the order statistics below and above each rank
    (``values``: those below, then those above)."""
    v_below = torch.tensor(values[: len(below)], dtype=torch.float32)
    v_above = torch.tensor(values[len(below) :], dtype=torch.float32)
    mixed = torch.lerp(v_below, v_above, (ranks - below).to(torch.float32))
    return torch.where(v_below == v_above, v_below, mixed)  # inf == inf: no inf - inf = NaN in the lerp


# ------------------------------------------------------------------ sampled bracket
# Scores sampled (over all ranks together) to bracket each order statistic.
SAMPLE = 1 << 18
# A bracket reaches this many standard deviations of a sample order statistic's rank to either side
# of the expected rank: a miss (then the full radix select) has a probability of about 1e-6.
BRACKET_Z = 5.0
# Rounds of the radix select over the sample: 3 bytes fix a bracket end to 2^-15 of its value.
SAMPLE_ROUNDS = 3
# Below this many scores (or a sample this small) the full radix select is as cheap.
MIN_SAMPLE = 64
_BIAS = 1 << 31  # int32 key + 2^31: the same order as unsigned 32-bit numbers
_KEY_MIN, _KEY_MAX = -(1 << 31), (1 << 31) - 1


class ScoreSource(Protocol):
    """Scores that need not be in memory (element granularity computes them from the gradient and the
    momentum as it reads them): what :func:`sampled_quantiles` asks of them. Its parts are taken
    together, in order, as one local vector of scores; every key is that of
    :func:`order_keys` with ``nonnegative=True`` (the scores never carry a sign bit)."""

    def numels(self) -> list[int]:
        """The number of scores of each part."""

    def keys_at(self, part: int, index: Tensor) -> Tensor:
        """int32 keys of the scores ``index`` (int64) of part ``part``."""

    def count(self, lows: list[int], highs: list[int]) -> tuple[Tensor, list[Tensor]]:
        """For each bracket ``[lows[k], highs[k]]`` of keys: how many keys lie below it (int64 tensor), and
        the keys inside it (int32)."""

    def scores(self) -> list[Tensor]:
        """Every part's scores as float32 tensors (the full radix select, when a bracket misses)."""


class _Tensors:
    """Scores in memory as a :class:`ScoreSource` (their keys made once, a view when non-negative)."""

    def __init__(self, parts: list[Tensor], nonnegative: bool) -> None:
        self.parts, self.nonnegative = parts, nonnegative
        self._keys: list[Tensor] | None = None

    def numels(self) -> list[int]:
        return [p.numel() for p in self.parts]

    def keys(self) -> list[Tensor]:
        if self._keys is None:
            self._keys = [order_keys(p, self.nonnegative).contiguous() for p in self.parts]
        return self._keys

    def keys_at(self, part: int, index: Tensor) -> Tensor:
        return order_keys(self.parts[part].reshape(-1)[index], self.nonnegative)

    def count(self, lows: list[int], highs: list[int]) -> tuple[Tensor, list[Tensor]]:
        compiled = kernels.cpu_kernels() if self.nonnegative and kernels.applies(*self.parts) else None
        if compiled is not None:  # a non-negative float's bits are its key: the kernel reads the scores as they are
            under, inside = compiled.bracket_count(self.parts, [None] * len(self.parts), 0.0, lows, highs)
            return under, list(inside)
        return count_brackets(self.keys(), lows, highs)

    def scores(self) -> list[Tensor]:
        return self.parts


def count_brackets(keys: Sequence[Tensor], lows: list[int], highs: list[int]) -> tuple[Tensor, list[Tensor]]:
    """:meth:`ScoreSource.count` over keys in memory, with torch."""
    under = torch.zeros(len(lows), dtype=torch.int64)
    inside = []
    for b, (lo, hi) in enumerate(zip(lows, highs)):
        pieces = []
        for k in keys:
            under[b] += int((k < lo).sum())
            pieces.append(k[(k >= lo) & (k <= hi)])
        inside.append(torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32))
    return under, inside


def sampled_quantiles(
    local_scores: Tensor | Sequence[Tensor] | ScoreSource,
    qs: Sequence[float],
    all_reduce: AllReduce = _identity,
    nonnegative: bool = False,
    sample: int = SAMPLE,
    seed: int = 0,
    z: float = BRACKET_Z,
) -> Tensor:
    """:func:`quantiles` (the same values, bit for bit), through a sampled bracket instead of four
    histogram passes over every score.

    1. Each rank draws a seeded sample of its scores, ``sample * local / total`` of them, and a radix
       select over the sample of all ranks (``SAMPLE_ROUNDS`` all-reduces of 256-bin histograms, one
       per distinct prefix) finds, for each wanted order statistic ``k`` of the ``n`` scores, the
       sample's order statistics ``BRACKET_Z`` standard deviations below and above ``k * S / n``:
       a bracket of keys that holds ``k`` with probability about 1 - 1e-6.
    2. One counting pass (``rose_ds/csrc``, or torch) finds how many scores lie below and inside each
       bracket (one all-reduce); the scores inside are kept.
    3. If every ``k`` falls inside its bracket, a radix select among the kept scores (about
       ``2 * BRACKET_Z / sqrt(sample)`` of all scores; rounds that the bracket's ends already fix are
       skipped) gives the exact ``k``-th score. Otherwise the full radix select of :func:`kth_smallest`
       runs: exact whatever the sample.

    Traffic, whatever the number of scores: at most :func:`sampled_traffic_bound` bytes (28,704 for
    the two quantiles of a band), usually about half; a miss adds the full radix select's.

    Args:
        local_scores, qs, all_reduce, nonnegative: As for :func:`quantiles`; ``all_reduce`` also sums
            int32 tensors. ``local_scores`` may also be a :class:`ScoreSource` (non-negative scores
            computed as they are read, never stored).
        sample: The number of scores sampled over all ranks (at most 1/16 of them).
        seed: Seeds the sample (the same answer for any seed; a run stays bit-reproducible).
        z: The brackets' half-width in standard deviations of a sample rank (smaller: fewer scores
            inside, more misses).

    Returns:
        float32 tensor with one value per ``q``.
    """
    if isinstance(local_scores, (Tensor, list, tuple)):
        source: ScoreSource = _Tensors(_flat(local_scores), nonnegative)
    else:
        source, nonnegative = local_scores, True
    local = sum(source.numels())
    n = int(all_reduce(torch.tensor([local], dtype=torch.int64))[0])
    if n == 0:
        raise IndexError("quantiles of no scores at all")
    ranks, below, above = _ranks(qs, n)
    wanted = sorted(set(below.tolist() + above.tolist()))
    size = min(sample, n >> 4)
    found = _bracketed(source, wanted, n, local, size, seed, z, all_reduce) if size >= MIN_SAMPLE else None
    if found is None:  # a small input, or a bracket missed: the full radix select
        values = kth_smallest(source.scores(), below.tolist() + above.tolist(), all_reduce, total=n,
                              nonnegative=nonnegative)  # fmt: skip
    else:
        values = [key_value(found[k]) for k in below.tolist() + above.tolist()]
    return _interpolate(values, ranks, below)


def sampled_traffic_bound(num_qs: int, wide: bool = False) -> int:
    """The most bytes one :func:`sampled_quantiles` call all-reduces when no bracket misses, for
    ``num_qs`` quantiles: the two counts, ``SAMPLE_ROUNDS`` rounds over the sample and 4 over the
    brackets' scores of at most one 256-bin histogram per order statistic (2 per quantile), and two
    counts per bracket. Histograms are int32, or int64 for a bracket holding ``2^31`` scores or more
    over all ranks (``wide``)."""
    targets = 2 * num_qs
    return 16 + 16 * num_qs + SAMPLE_ROUNDS * targets * BINS * 4 + 4 * targets * BINS * (8 if wide else 4)


def _bracketed(source: ScoreSource, wanted: list[int], n: int, local: int, size: int, seed: int, z: float,
               all_reduce: AllReduce) -> dict[int, int] | None:  # fmt: skip
    """The key of each wanted order statistic through a sampled bracket; None when a bracket misses."""
    count = size * local // n  # this rank's share of the sample (exact integer arithmetic)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(local, (count,), generator=generator) if count else torch.empty(0, dtype=torch.long)
    index = index.sort().values  # ascending: the gathers below read memory in order
    drawn, offset = [], 0
    for part, numel in enumerate(source.numels()):
        inside = (index >= offset) & (index < offset + numel)
        if inside.any():
            drawn.append(source.keys_at(part, index[inside] - offset))
        offset += numel
    sample = torch.cat(drawn) if drawn else torch.empty(0, dtype=torch.int32)
    total = int(all_reduce(torch.tensor([count], dtype=torch.int64))[0])
    if total < MIN_SAMPLE:
        return None
    # The sample rank window of each wanted statistic; overlapping windows share one bracket.
    windows: list[list] = []
    for k in wanted:
        p = k / n
        half = z * math.sqrt(total * p * (1.0 - p)) + 2.0
        centre = k * total / n
        low, high = math.floor(centre - half), math.ceil(centre + half)
        if windows and low <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], high)
            windows[-1][2].append(k)
        else:
            windows.append([low, high, [k]])
    ends = sorted({r for low, high, _ in windows for r in (low, high) if 0 <= r < total})
    prefixes = dict(zip(ends, _radix_rounds([sample], [(0, r) for r in ends], all_reduce, [total], [0], 0,
                                            SAMPLE_ROUNDS)))  # fmt: skip
    tail = 8 * (4 - SAMPLE_ROUNDS)  # the unknown low bytes of a bracket end: widen it to cover them
    lows = [(prefixes[low] << tail) - _BIAS if low >= 0 else _KEY_MIN for low, _, _ in windows]
    highs = [((prefixes[high] + 1) << tail) - 1 - _BIAS if high < total else _KEY_MAX for _, high, _ in windows]
    under, candidates = source.count(lows, highs)
    counts = all_reduce(torch.cat([under, torch.tensor([c.numel() for c in candidates], dtype=torch.int64)]))
    under_all, inside_all = counts[: len(windows)].tolist(), counts[len(windows) :].tolist()
    for b, (_, _, ks) in enumerate(windows):
        if not all(under_all[b] <= k < under_all[b] + inside_all[b] for k in ks):
            return None
    # Radix select among the candidates, from the first byte where a bracket's ends differ.
    known = min(_common_bytes(lo + _BIAS, hi + _BIAS) for lo, hi in zip(lows, highs))
    starts = [(lo + _BIAS) >> (32 - 8 * known) if known else 0 for lo in lows]
    targets = [(b, k - under_all[b]) for b, (_, _, ks) in enumerate(windows) for k in ks]
    if known == 4:
        found = [starts[b] for b, _ in targets]
    else:
        found = _radix_rounds(list(candidates), targets, all_reduce, inside_all, starts, known, 4)
    return {k: key - _BIAS for (b, _), k, key in zip(targets, [k for _, _, ks in windows for k in ks], found)}


def _common_bytes(a: int, b: int) -> int:
    """How many leading bytes two 32-bit unsigned values share."""
    same = 0
    while same < 4 and (a >> (24 - 8 * same)) == (b >> (24 - 8 * same)):
        same += 1
    return same


def _radix_rounds(sets: list[Tensor], targets: list[tuple[int, int]], all_reduce: AllReduce, totals: list[int],
                  starts: list[int], first: int, last: int) -> list[int]:  # fmt: skip
    """Radix select rounds ``first`` to ``last - 1`` (round r fixes byte r from the top) over int32 keys.

    ``sets[i]``: this rank's candidate keys of set ``i`` (int32, sharing the top ``first`` bytes of
    their biased value ``key + 2^31``, which are ``starts[i]``), ``totals[i]`` their number over all
    ranks; ``targets``: ``(set, k)`` with ``0 <= k < totals[set]``. One all-reduce per round sums one
    histogram per distinct ``(set, prefix)`` (sorted, so all ranks agree). Returns each target's top
    ``last`` bytes of its biased key.
    """
    dtype = torch.int32 if max(totals, default=0) < (1 << 31) else torch.int64
    prefixes = [starts[s] for s, _ in targets]
    remaining = [k for _, k in targets]
    pool = {(s, starts[s]): sets[s] for s in {s for s, _ in targets}}
    for round_ in range(first, last):
        # byte r of key + 2^31: the key's own byte, with the top byte's sign bit flipped
        shift, flip = 8 * (3 - round_), 0x80 if round_ == 0 else 0
        order = sorted(set(zip((s for s, _ in targets), prefixes)))
        digits = {key: ((pool[key] >> shift) & 0xFF) ^ flip for key in order}
        histograms = [torch.bincount(digits[key], minlength=BINS) for key in order]
        counts = all_reduce(torch.stack(histograms).to(dtype)).to(torch.int64)
        row = {key: counts[i] for i, key in enumerate(order)}
        next_pool = {}
        for t, (s, _) in enumerate(targets):
            cumulative = row[(s, prefixes[t])].cumsum(0)
            digit = int(torch.searchsorted(cumulative, remaining[t], right=True))
            remaining[t] -= int(cumulative[digit - 1]) if digit > 0 else 0
            key = (s, prefixes[t])
            prefixes[t] = (prefixes[t] << 8) | digit
            if round_ < last - 1 and (s, prefixes[t]) not in next_pool:
                next_pool[(s, prefixes[t])] = pool[key][digits[key] == digit]
        pool = next_pool
    return prefixes
