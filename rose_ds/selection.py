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

import torch
from torch import Tensor

from rose_ds import radix
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
# ``torch.quantile`` band of all scores in scope, taken by ``radix.quantiles`` so that a sharded caller
# (passing its shard and an ``all_reduce``) gets the same band without gathering the scores.


def element_first_order_scores(robust_grad: Tensor) -> Tensor:
    """``|dL_rob/dw|`` per element, float32."""
    return robust_grad.detach().to(torch.float32).abs()


def element_second_order_scores(grad: Tensor, momentum: Tensor, coef: float = 0.1) -> Tensor:
    """``|coef * g / m - 1|`` per element, float32; infinite (never kept) where ``m == 0``."""
    g = grad.detach().to(torch.float32)
    m = momentum.detach().to(torch.float32)
    score = (coef * g / m - 1.0).abs()
    return score.masked_fill_(m == 0, float("inf"))


def element_band_masks(
    scores: Sequence[Tensor],
    lower: float,
    upper: float,
    scope: str = "global",
    all_reduce: radix.AllReduce = radix._identity,
) -> list[Tensor]:
    """Boolean keep-masks: ``quantile(lower%) <= score <= quantile(upper%)`` and the score is finite.

    The scores must be non-negative (as every element score is: an absolute value, +inf or +NaN).

    ``scope="global"`` takes one band over all tensors' scores together, ``"tensor"`` one per tensor.
    With ``all_reduce`` each rank passes its shard of every tensor (possibly empty) and all ranks get
    masks consistent with one band over the union of the shards.
    """
    qs = (lower / 100.0, upper / 100.0)
    if scope == "global":
        bands = [radix.quantiles(scores, qs, all_reduce, nonnegative=True).tolist()] * len(scores)
    else:
        bands = [radix.quantiles(s, qs, all_reduce, nonnegative=True).tolist() for s in scores]
    return [(s >= lo) & (s <= hi) & torch.isfinite(s) for s, (lo, hi) in zip(scores, bands)]


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
    if not masking_active(config, step):
        return None
    m1 = m2 = None
    if needs_robust_gradient(config):
        first = [element_first_order_scores(g) for g in robust_grads]
        m1 = element_band_masks(first, config.lower, config.upper, config.scope, all_reduce)
    if needs_second_order(config, step):
        second = [element_second_order_scores(g, m, config.second_order_coef) for g, m in zip(grads, momenta)]
        m2 = element_band_masks(second, config.lower, config.upper, config.scope, all_reduce)
    if config.mode == "first":
        return m1
    if config.mode == "second":
        return m2  # None on step 1: no momentum yet, every element is kept
    if m2 is None:  # the ensemble on step 1: M2 is all ones
        return [torch.where(a, 1.0, 1.0 - config.gamma).to(torch.float32) for a in m1]
    return [((1.0 - config.gamma) * b.to(torch.float32)).add_(a.to(torch.float32), alpha=config.gamma)
            for a, b in zip(m1, m2)]  # fmt: skip
