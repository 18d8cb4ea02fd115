"""ROSE selection as pure functions: eligibility, per-tensor scores, the quantile band, the ensemble.

Nothing here knows about devices, processes or DeepSpeed. The score functions take *squared-norm
statistics* (one float per eligible tensor), so a sharded caller can pass sums of squares over its
shard fragments after an all-reduce and get exactly the dense answer.

Conventions (see ``docs/algorithm.md``):

* Scores are computed in float64.
* A tensor whose momentum norm is zero has an infinite second-order score. Non-finite scores (inf,
  and NaN from a NaN gradient) sort above every finite score when the quantiles are taken and are
  never kept: such a tensor is frozen for the step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rose_ds import kernels, radix
from rose_ds.config import ELIGIBILITY_ALIASES, ELIGIBILITY_PRESETS, RoseConfig


class NoEligibleTensorError(ValueError):
    """The eligibility rule selects no parameter, so ROSE would silently do nothing."""


def eligibility_matcher(config: RoseConfig) -> Callable[[str], bool]:
    """Returns the predicate ``name -> eligible`` for the rule configured in ``config``."""
    if config.eligibility_regex is not None:
        pattern = re.compile(config.eligibility_regex)
        return lambda name: pattern.search(name) is not None
    regex = ELIGIBILITY_PRESETS[ELIGIBILITY_ALIASES.get(config.eligibility, config.eligibility)]
    if regex is None:
        return lambda name: "layer" in name and "weight" in name
    pattern = re.compile(regex)
    return lambda name: pattern.search(name) is not None


def eligible_names(names: Sequence[str], config: RoseConfig) -> list[str]:
    """The names, in order, that take part in selection.

    Raises:
        NoEligibleTensorError: when ``config.mode`` is not ``"none"`` and the rule selects nothing.
    """
    match = eligibility_matcher(config)
    chosen = [name for name in names if match(name)]
    if not chosen and config.mode != "none":
        examples = ", ".join(repr(n) for n in list(names)[:3]) or "(no parameters)"
        raise NoEligibleTensorError(
            f"ROSE eligibility rule {config.eligibility_rule} selects no parameter (names look like "
            f"{examples}); choose a matching preset with eligibility=... or set eligibility_regex"
        )
    return chosen


# A LoRA adapter's tensors within the module they adapt (PEFT names: ``<module>.lora_A.<adapter>.weight``).
_ADAPTER_PART = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def selection_units(names: Sequence[str]) -> list[int]:
    """The selection unit of each eligible tensor: tensors of one unit share one score, computed from
    their summed squared norms (as if they were one tensor), and one mask value.

    A LoRA adapter's tensors of one module (``lora_A`` and ``lora_B``, DoRA's magnitude) form one
    unit; every other tensor is a unit of its own. Per tensor, adapters cannot train: ``lora_B``
    starts at zero, so ``lora_A``'s gradient is exactly zero at first; ROSE-First then always keeps
    ``lora_A`` (lowest score) and freezes ``lora_B``, and ROSE-Second freezes ``lora_A`` for good
    (its momentum stays zero). The adapted module's update ``B @ A`` is what a unit scores.

    Returns:
        One unit index per name, numbered in order of first appearance.
    """
    keys: dict[str, int] = {}
    return [keys.setdefault(_ADAPTER_PART.sub(".lora.", name), len(keys)) for name in names]


def first_order_scores(robust_sq_norms: Tensor) -> Tensor:
    """First-order scores ``||dL_rob/dW||_2`` from the squared norms of the robust gradient."""
    return robust_sq_norms.to(torch.float64).clamp_min(0).sqrt()


def second_order_scores(grad_sq_norms: Tensor, momentum_sq_norms: Tensor, coef: float = 0.1) -> Tensor:
    """Second-order scores ``|coef * ||g_t|| / ||m_{t-1}|| - 1|``; infinite where the momentum is zero."""
    g = grad_sq_norms.to(torch.float64).clamp_min(0).sqrt()
    m = momentum_sq_norms.to(torch.float64).clamp_min(0).sqrt()
    score = (coef * g / m - 1.0).abs()
    return torch.where(m == 0, torch.full_like(score, float("inf")), score)


def quantiles(scores: Tensor, qs: Sequence[float]) -> Tensor:
    """Quantiles of a 1-D score vector with ``torch.quantile``'s default (linear) interpolation.

    Equal to ``torch.quantile(scores, qs)`` for finite scores, bit for bit in float64. NaN sorts as
    +inf, and two equal infinite neighbours give inf (where ``torch.quantile`` gives NaN).

    Args:
        scores: 1-D tensor, at least one element.
        qs: Quantile levels in [0, 1].
    """
    s = torch.nan_to_num(scores.to(torch.float64), nan=float("inf")).sort().values
    q = torch.tensor(list(qs), dtype=torch.float64)
    ranks = q * (s.numel() - 1)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    v_below, v_above = s[below], s[above]
    mixed = torch.lerp(v_below, v_above, ranks - below)
    return torch.where(v_below == v_above, v_below, mixed)


def band_mask(scores: Tensor, lower: float, upper: float) -> Tensor:
    """Boolean keep-mask: ``quantile(lower%) <= score <= quantile(upper%)`` and the score is finite."""
    lo, hi = quantiles(scores, (lower / 100.0, upper / 100.0)).tolist()
    s = scores.to(torch.float64)
    return (s >= lo) & (s <= hi) & torch.isfinite(s)


def mask_coefficients(
    config: RoseConfig,
    step: int,
    num_tensors: int,
    robust_sq_norms: Tensor | None = None,
    grad_sq_norms: Tensor | None = None,
    momentum_sq_norms: Tensor | None = None,
    units: Sequence[int] | None = None,
) -> Tensor:
    """The update coefficient ``c`` of every eligible tensor for optimizer step ``step`` (1-based).

    Args:
        config: The ROSE configuration.
        step: The global optimizer step about to be taken, starting at 1.
        num_tensors: Number of eligible tensors.
        robust_sq_norms: Squared norms of the robust-loss gradient; needed when
            :func:`needs_robust_gradient` says so.
        grad_sq_norms: Squared norms of the task gradient as the optimizer sees it (unscaled,
            clipped); needed when :func:`needs_second_order` says so.
        momentum_sq_norms: Squared norms of Adam's first moment before this step; as ``grad_sq_norms``.
        units: The selection unit of each tensor (:func:`selection_units`); tensors of one unit are
            scored on their summed squared norms and share ``c``. None: each tensor its own.

    Returns:
        float64 tensor of ``c`` in [0, 1] (0 frozen, 1 fully updated), one per eligible tensor.
    """
    if units is not None and len(set(units)) < num_tensors:
        index = torch.unique(torch.as_tensor(list(units)), return_inverse=True)[1]
        size = int(index.max()) + 1 if num_tensors else 0

        def pooled(sq_norms: Tensor | None) -> Tensor | None:
            if sq_norms is None:
                return None
            return torch.zeros(size, dtype=torch.float64).index_add_(0, index, sq_norms.to(torch.float64))

        c = mask_coefficients(config, step, size, pooled(robust_sq_norms), pooled(grad_sq_norms),
                              pooled(momentum_sq_norms))  # fmt: skip
        return c[index]
    ones = torch.ones(num_tensors, dtype=torch.float64)
    if not masking_active(config, step) or num_tensors == 0:
        return ones
    m1 = m2 = ones
    if needs_robust_gradient(config):
        m1 = band_mask(first_order_scores(robust_sq_norms), config.lower, config.upper).to(torch.float64)
    if needs_second_order(config, step):
        scores = second_order_scores(grad_sq_norms, momentum_sq_norms, config.second_order_coef)
        m2 = band_mask(scores, config.lower, config.upper).to(torch.float64)
    if config.mode == "first":
        return m1
    if config.mode == "second":
        return m2
    return (1.0 - config.gamma) * m2 + config.gamma * m1


def masking_active(config: RoseConfig, step: int) -> bool:
    """Whether step ``step`` (1-based) is masked at all: a ROSE mode, and past the warm-up."""
    return config.mode != "none" and step > config.warmup_steps


def needs_robust_gradient(config: RoseConfig) -> bool:
    """Whether the mode scores tensors from a robust-loss gradient (two dropout passes)."""
    return config.mode in ("first", "ensemble")


def needs_second_order(config: RoseConfig, step: int) -> bool:
    """Whether step ``step`` needs task-gradient and momentum norms.

    Not on step 1: no momentum exists yet, and the second-order mask is all ones then.
    """
    return config.mode in ("second", "ensemble") and step > 1 and masking_active(config, step)


# ------------------------------------------------------------------------- element granularity
# Scores are float32, one per element, computed exactly as written below; the band is the
# ``torch.quantile`` band of all scores in scope, taken by ``radix.sampled_quantiles`` so that a sharded
# caller (passing its shard and an ``all_reduce``) gets the same band without gathering the scores.
# With rose_ds's C++ kernels (float32 CPU tensors) no score is ever stored: the counting pass and the
# update compute each element's score as they read the gradient and the momentum (ElementBands).


def element_first_order_scores(robust_grad: Tensor) -> Tensor:
    """``|dL_rob/dw|`` per element, float32."""
    return robust_grad.detach().to(torch.float32).abs()


def element_second_order_scores(grad: Tensor, momentum: Tensor, coef: float = 0.1) -> Tensor:
    """``|coef * g / m - 1|`` per element, float32; infinite (never kept) where ``m == 0``."""
    compiled = kernels.cpu_kernels() if kernels.applies(grad, momentum) else None
    if compiled is not None:
        return compiled.second_order_scores(grad.detach(), momentum.detach(), coef)
    g = grad.detach().to(torch.float32)
    m = momentum.detach().to(torch.float32)
    score = (coef * g / m - 1.0).abs()
    return score.masked_fill_(m == 0, float("inf"))


class ElementScores:
    """The element scores of some tensors' local pieces as a :class:`rose_ds.radix.ScoreSource`: first-order
    (``|g_rob|`` of ``robust``) or second-order (``|coef * g / m - 1|`` of ``grads`` and ``momenta``).

    On float32 CPU tensors with rose_ds's kernels, the counting pass computes the scores as it reads
    the tensors (nothing the size of the shard is written); otherwise the scores are made in memory
    once, as :func:`element_first_order_scores` / :func:`element_second_order_scores` make them.
    """

    def __init__(self, robust: Sequence[Tensor] | None = None, grads: Sequence[Tensor] | None = None,
                 momenta: Sequence[Tensor] | None = None, coef: float = 0.1) -> None:  # fmt: skip
        self.second = robust is None
        self.a = [t.detach().reshape(-1) for t in (grads if self.second else robust)]
        self.b = [t.detach().reshape(-1) for t in momenta] if self.second else [None] * len(self.a)
        self.coef = coef
        self._scores: list[Tensor] | None = None

    def _score(self, a: Tensor, b: Tensor | None) -> Tensor:
        return element_second_order_scores(a, b, self.coef) if self.second else element_first_order_scores(a)

    def numels(self) -> list[int]:
        return [a.numel() for a in self.a]

    def keys_at(self, part: int, index: Tensor) -> Tensor:
        b = self.b[part]
        return self._score(self.a[part][index], None if b is None else b[index]).view(torch.int32)

    def count(self, lows: list[int], highs: list[int]) -> tuple[Tensor, list[Tensor]]:
        compiled = kernels.cpu_kernels() if kernels.applies(*self.a, *self.b) else None
        if compiled is not None:
            under, inside = compiled.bracket_count(self.a, self.b, self.coef, lows, highs)
            return under, list(inside)
        return radix.count_brackets([s.view(torch.int32) for s in self.scores()], lows, highs)

    def scores(self) -> list[Tensor]:
        if self._scores is None:
            self._scores = [self._score(a, b) for a, b in zip(self.a, self.b)]
        return self._scores


def element_band_masks(
    scores: Sequence[Tensor],
    lower: float,
    upper: float,
    scope: str = "global",
    all_reduce: radix.AllReduce = radix._identity,
    seed: int = 0,
) -> list[Tensor]:
    """Boolean keep-masks: ``quantile(lower%) <= score <= quantile(upper%)`` and the score is finite.

    The scores must be non-negative (as every element score is: an absolute value, +inf or +NaN).

    ``scope="global"`` takes one band over all tensors' scores together, ``"tensor"`` one per tensor.
    With ``all_reduce`` each rank passes its shard of every tensor (possibly empty) and all ranks get
    masks consistent with one band over the union of the shards. ``seed`` seeds the sample that
    brackets the band (:func:`rose_ds.radix.sampled_quantiles`; the band is exact for any seed).
    """
    bands = _bands([list(scores)] if scope == "global" else [[s] for s in scores], lower, upper, all_reduce, seed)
    if scope == "global":
        bands = bands * len(scores)
    return [element_band_mask(s, lo, hi) for s, (lo, hi) in zip(scores, bands)]


def element_band_mask(scores: Tensor, lo: float, hi: float) -> Tensor:
    """``lo <= score <= hi`` and the score is finite, per element."""
    return (scores >= lo) & (scores <= hi) & torch.isfinite(scores)


def _bands(sources: Sequence, lower: float, upper: float, all_reduce: radix.AllReduce,
           seed: int) -> list[tuple[float, float]]:  # fmt: skip
    """``(lo, hi)`` of each source (a list of score tensors, or an :class:`ElementScores`)."""
    qs = (lower / 100.0, upper / 100.0)
    return [tuple(radix.sampled_quantiles(src, qs, all_reduce, nonnegative=True, seed=seed).tolist())
            for src in sources]  # fmt: skip


@dataclass
class ElementBands:
    """One step's element-granularity bands: ``(lo, hi)`` of each eligible tensor (one shared band when
    the scope is global) for each score the mode uses; an element's ``c`` follows from its scores.

    Attributes:
        mode: ``first``, ``second`` or ``ensemble``.
        gamma: The ensemble's weight of the first-order mask.
        coef: The second-order score's constant.
        first: First-order bands (None: the mode uses none).
        second: Second-order bands (None: the mode uses none, or step 1, when no momentum exists).
    """

    mode: str
    gamma: float
    coef: float
    first: list[tuple[float, float]] | None
    second: list[tuple[float, float]] | None

    def coefficients(self, robust_grads: Sequence[Tensor] | None, grads: Sequence[Tensor] | None,
                     momenta: Sequence[Tensor] | None) -> list[Tensor]:  # fmt: skip
        """The coefficient of every element: boolean for modes first and second, float32
        ``(1 - gamma) * M2 + gamma * M1`` for the ensemble (``M1 ? 1 : 1 - gamma`` on step 1)."""
        m1 = m2 = None
        if self.first is not None:
            m1 = [
                element_band_mask(element_first_order_scores(r), lo, hi)
                for r, (lo, hi) in zip(robust_grads, self.first)
            ]
        if self.second is not None:
            m2 = [element_band_mask(element_second_order_scores(g, m, self.coef), lo, hi)
                  for g, m, (lo, hi) in zip(grads, momenta, self.second)]  # fmt: skip
        if self.mode == "first":
            return m1
        if self.mode == "second":
            return m2
        if m2 is None:  # the ensemble on step 1: M2 is all ones
            return [torch.where(a, 1.0, 1.0 - self.gamma).to(torch.float32) for a in m1]
        return [((1.0 - self.gamma) * b.to(torch.float32)).add_(a.to(torch.float32), alpha=self.gamma)
                for a, b in zip(m1, m2)]  # fmt: skip


def element_bands(
    config: RoseConfig,
    step: int,
    robust_grads: Sequence[Tensor] | None = None,
    grads: Sequence[Tensor] | None = None,
    momenta: Sequence[Tensor] | None = None,
    all_reduce: radix.AllReduce = radix._identity,
    pieces: Sequence[int] | None = None,
) -> ElementBands | None:
    """The bands of every eligible tensor's element scores for step ``step`` (1-based), without any mask.

    Returns None when every element is updated (no masking this step, or mode second on step 1, when
    no momentum exists yet). Each band is exact (:func:`rose_ds.radix.sampled_quantiles`, seeded
    with the step) over all ranks' elements in scope.

    Args:
        config, step, all_reduce: As for :func:`element_coefficients`.
        robust_grads, grads, momenta: This rank's pieces of the eligible tensors.
        pieces: How many consecutive pieces each eligible tensor has (None: one each); a tensor's
            band (scope ``tensor``) is taken over all its pieces, and every piece gets it.
    """
    if not masking_active(config, step):
        return None
    count = len(robust_grads if robust_grads is not None else grads or [])
    sizes = list(pieces) if pieces is not None else [1] * count
    # tensor scope: one source per tensor (its pieces together); global: one source of every piece
    groups = [list(range(sum(sizes[:k]), sum(sizes[: k + 1]))) for k in range(len(sizes))]
    if config.scope == "global":
        groups = [list(range(count))]

    def bands(make) -> list[tuple[float, float]]:
        per_group = _bands([make(g) for g in groups], config.lower, config.upper, all_reduce, step)
        out = [None] * count
        for g, band in zip(groups, per_group):
            for k in g:
                out[k] = band
        return out

    first = second = None
    if needs_robust_gradient(config):
        first = bands(lambda g: ElementScores(robust=[robust_grads[k] for k in g]))
    if needs_second_order(config, step):
        coef = config.second_order_coef
        second = bands(lambda g: ElementScores(grads=[grads[k] for k in g], momenta=[momenta[k] for k in g], coef=coef))
    if config.mode == "second" and second is None:
        return None  # step 1: no momentum yet, every element is kept
    return ElementBands(config.mode, config.gamma, config.second_order_coef, first, second)


def element_coefficients(
    config: RoseConfig,
    step: int,
    robust_grads: Sequence[Tensor] | None = None,
    grads: Sequence[Tensor] | None = None,
    momenta: Sequence[Tensor] | None = None,
    all_reduce: radix.AllReduce = radix._identity,
) -> list[Tensor] | None:
    """The update coefficient of every element of every eligible tensor for step ``step`` (1-based).

    Returns None when every element is updated (no masking this step, or mode second on step 1, when
    no momentum exists yet); otherwise one tensor per eligible tensor: boolean for modes first and
    second (``c`` is 0 or 1), float32 ``(1 - gamma) * M2 + gamma * M1`` for the ensemble.
    """
    bands = element_bands(config, step, robust_grads, grads, momenta, all_reduce)
    return None if bands is None else bands.coefficients(robust_grads, grads, momenta)
