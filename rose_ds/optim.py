"""RoseAdamW: AdamW that freezes, at every step, the eligible tensors whose update looks unrobust.

The update rule is ``masked_adamw_`` (pure tensor arithmetic, no distributed code); the selection
comes from :mod:`rose_ds.selection`. The optimizer itself only gathers the per-tensor statistics,
asks for the mask and applies the update.

It does so once, over a :class:`Segments` view: its own tensors (each one whole segment, no
communication), or the segments of flat ZeRO partitions that a :class:`SegmentsProvider` attached
with :meth:`RoseAdamW.attach` supplies together with the all-reduce over the ranks
(:mod:`rose_ds.zero`). Statistics are summed per eligible index over the segments, reduced, and the
same band rule and masked update follow whatever the layout.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from rose_ds import kernels, radix
from rose_ds.config import RoseConfig
from rose_ds.methods import MethodConfig, childtuning_d_masks, childtuning_f_, tensor_key
from rose_ds.selection import (
    ElementBands,
    element_bands,
    eligible_names,
    mask_coefficients,
    masking_active,
    needs_robust_gradient,
    needs_second_order,
    selection_units,
)


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    coefficients: Sequence[float | Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    foreach: bool = True,
    fused: bool | None = None,
    momentum_norms: bool | Sequence[bool] = False,
) -> Tensor | None:
    """One masked AdamW step, in place, over lists of tensors (ROSE spec section 4).

    With ``c`` the coefficient of a tensor::

        g' = c * g + (1 - c) * m
        m  = beta1 * m + (1 - beta1) * g'
        v  = beta2 * v + (1 - beta2) * g'^2
        p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * c * m / (sqrt(v) + eps)
        p *= 1 - lr * weight_decay * c

    ``c == 1`` is exact AdamW (no temporary for ``g'``); ``c == 0`` leaves ``m`` and ``p`` untouched
    and only moves ``v`` toward ``m^2``. Only tensors with ``0 < c < 1`` allocate ``g'``.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: Same-length lists of same-shape tensors (views of a
            flat buffer are fine).
        coefficients: ``c`` per tensor, in [0, 1]: a float, or a tensor shaped as the parameter for
            element granularity (boolean: kept / frozen, no float mask is made; float: the ensemble's
            mix), whose elements follow the same formulas one by one.
        lr, beta1, beta2, eps, weight_decay: AdamW hyper-parameters of the group.
        step: The global step ``t`` (1-based) used for bias correction.
        foreach: On torch's path, use its multi-tensor kernels; the per-tensor path gives
            bit-identical results.
        fused: ``None`` (default): rose_ds's C++ kernel (:mod:`rose_ds.kernels`) where it applies
            (every tensor float32, contiguous, on the CPU, and the kernel built): one pass over
            ``p, g, m, v`` per tensor, the momentum norms in the same pass; torch's path otherwise.
            ``True``: torch's fused Adam kernel (one pass; much faster than foreach on CPU and GPU).
            Same formulas, different rounding: ``eps`` is passed as ``eps / sqrt(1 - beta2^t)``
            so that torch's ``sqrt(v) / sqrt(1 - beta2^t) + eps'`` equals ROSE's
            ``(sqrt(v) + eps) / sqrt(1 - beta2^t)``, the step is scaled by ``c`` through the
            learning rate, and the weight decay is applied afterwards as in the specification.
            ``False``: torch's foreach (or per-tensor) kernels, never the C++ kernel.
        momentum_norms: Also return ``||m_t||^2`` of each tensor (or of those flagged True in a
            sequence; 0 for the others) as :func:`sum_of_squares` takes it, bit for bit: the next
            step's second-order statistic. The C++ kernel takes it in the pass that writes ``m_t``;
            torch's path reads the momenta again after the update.

    Returns:
        float64 CPU tensor of the squared momentum norms when ``momentum_norms`` asks for any, else None.
    """
    flags = [bool(momentum_norms)] * len(params) if isinstance(momentum_norms, bool) else list(momentum_norms)
    compiled = _cpu_kernel(fused, params, grads, exp_avgs, exp_avg_sqs, coefficients)
    if compiled is not None:
        norms = compiled.masked_adamw(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
            [1.0 if isinstance(c, Tensor) else float(c) for c in coefficients],
            [c if isinstance(c, Tensor) else None for c in coefficients], flags, lr, beta1, beta2, eps, weight_decay,
            step,
        )  # fmt: skip
        return norms if any(flags) else None
    _torch_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, lr, beta1, beta2, eps, weight_decay,
                         step, foreach, bool(fused))  # fmt: skip
    if not any(flags):
        return None
    norms = torch.zeros(len(params), dtype=torch.float64)
    wanted = [i for i, f in enumerate(flags) if f]
    norms[wanted] = sum_of_squares([exp_avgs[i] for i in wanted])
    return norms


def _cpu_kernel(fused, params, grads, exp_avgs, exp_avg_sqs, coefficients):
    """rose_ds's compiled kernels when ``fused`` is None and they can take every tensor, else None."""
    if fused is not None or not params:
        return None
    if not kernels.applies(*params, *grads, *exp_avgs, *exp_avg_sqs):
        return None
    for c in coefficients:
        if isinstance(c, Tensor) and not (c.dtype in (torch.bool, torch.float32) and c.device.type == "cpu"
                                          and c.is_contiguous()):  # fmt: skip
            return None
    return kernels.cpu_kernels()


def _torch_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, lr, beta1, beta2, eps, weight_decay,
                         step, foreach, fused) -> None:  # fmt: skip
    """:func:`masked_adamw_` with torch's kernels."""
    hyper = (lr, beta1, beta2, eps, weight_decay, step)
    per_element = [i for i, c in enumerate(coefficients) if isinstance(c, Tensor)]
    if per_element:
        for i in per_element:
            _masked_adamw_elements_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], coefficients[i], *hyper)
        rest = [i for i, c in enumerate(coefficients) if not isinstance(c, Tensor)]
        params, grads, exp_avgs, exp_avg_sqs, coefficients = (
            [x[i] for i in rest] for x in (params, grads, exp_avgs, exp_avg_sqs, coefficients)
        )
    if fused:
        _fused_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, *hyper)
        return
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    live = [i for i, c in enumerate(coefficients) if c > 0]
    frozen = [i for i, c in enumerate(coefficients) if c == 0]

    # g' = lerp(m, g, c) only where 0 < c < 1, grouped by value so each group is one foreach call.
    mixed: dict[float, list[int]] = defaultdict(list)
    for i in live:
        if coefficients[i] != 1:
            mixed[coefficients[i]].append(i)
    g_live = {i: grads[i] for i in live}
    for c, idx in mixed.items():
        ms, gs = [exp_avgs[i] for i in idx], [grads[i] for i in idx]
        lerped = torch._foreach_lerp(ms, gs, c) if foreach else [torch.lerp(m, g, c) for m, g in zip(ms, gs)]
        g_live.update(zip(idx, lerped))

    p_live = [params[i] for i in live]
    m_live = [exp_avgs[i] for i in live]
    gp_live = [g_live[i] for i in live]
    c_live = [coefficients[i] for i in live]
    # A frozen tensor's g' is its momentum, so its m is unchanged and v moves toward m^2.
    v_all = [exp_avg_sqs[i] for i in live + frozen]
    gp_all = gp_live + [exp_avgs[i] for i in frozen]
    decay = [1.0 - lr * weight_decay * c for c in c_live]
    scale = [-step_size * c for c in c_live]

    if foreach:
        if m_live:
            torch._foreach_lerp_(m_live, gp_live, 1.0 - beta1)
        if v_all:
            torch._foreach_mul_(v_all, beta2)
            torch._foreach_addcmul_(v_all, gp_all, gp_all, 1.0 - beta2)
        if p_live:
            denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in live])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p_live, m_live, denom, scale)
            if weight_decay != 0:
                torch._foreach_mul_(p_live, decay)
        return

    for m, g in zip(m_live, gp_live):
        m.lerp_(g, 1.0 - beta1)
    for v, g in zip(v_all, gp_all):
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    for k, i in enumerate(live):
        denom = exp_avg_sqs[i].sqrt().add_(eps)
        params[i].addcdiv_(exp_avgs[i], denom, value=scale[k])
        if weight_decay != 0:
            params[i].mul_(decay[k])


def _fused_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, lr, beta1, beta2, eps, weight_decay, step):
    by_c: dict[float, list[int]] = defaultdict(list)
    for i, c in enumerate(coefficients):
        by_c[c].append(i)
    eps_torch = eps / math.sqrt(1.0 - beta2**step)
    for c, idx in by_c.items():
        if c == 0:  # frozen: g' = m, so m stays and v moves toward m^2
            vs, ms = [exp_avg_sqs[i] for i in idx], [exp_avgs[i] for i in idx]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, ms, ms, 1.0 - beta2)
            continue
        ps, ms = [params[i] for i in idx], [exp_avgs[i] for i in idx]
        gs = [grads[i] for i in idx] if c == 1 else torch._foreach_lerp(ms, [grads[i] for i in idx], c)
        steps = [torch.tensor(float(step), device=p.device) for p in ps]
        # ROSE decays after the step, p' = d * (p - a * u) with d = 1 - lr * wd * c; torch's fused AdamW
        # decays before it, p * (1 - lr' * wd') - lr' * u. With lr' = a * d and lr' * wd' = 1 - d the two
        # are the same, and the decay costs no separate pass over p.
        decay = 1.0 - lr * weight_decay * c
        lr_t = lr * c * decay
        torch._fused_adamw_(
            ps, gs, ms, [exp_avg_sqs[i] for i in idx], [], steps, amsgrad=False, lr=lr_t, beta1=beta1, beta2=beta2,
            weight_decay=(1.0 - decay) / lr_t if lr_t != 0 else 0.0, eps=eps_torch, maximize=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip


def _masked_adamw_elements_(param, grad, exp_avg, exp_avg_sq, c: Tensor, lr, beta1, beta2, eps, weight_decay, step):
    """:func:`masked_adamw_` for one tensor whose ``c`` varies per element: the formulas of the tensor
    path, element by element; a frozen element keeps its weight and momentum exactly while ``v`` moves
    toward ``m^2``."""
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    g = torch.where(c, grad, exp_avg) if c.dtype == torch.bool else torch.lerp(exp_avg, grad, c.to(grad.dtype))
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    update = exp_avg_sq.sqrt().add_(eps)
    torch.div(exp_avg, update, out=update).mul_(c)
    param.add_(update, alpha=-step_size)
    if weight_decay != 0:
        if c.dtype == torch.bool:
            param.mul_(torch.where(c, 1.0 - lr * weight_decay, 1.0).to(param.dtype))
        else:
            param.mul_(c.to(param.dtype).mul(-lr * weight_decay).add_(1.0))


# What the dense step tells a user who forgot the robust gradient (a provider supplies its own).
CAPTURE_HINT = "call opt.capture_robust_grads() after loss_rob.backward(retain_graph=True), before step()"


@dataclass
class _MomentumNorms:
    """Squared norms of one momentum tensor's segments, as the update of step ``step`` wrote them.

    Attributes:
        momentum: The momentum tensor (a weak reference: a replaced state invalidates the entry).
        version: Its ``_version`` after that update: any in-place write since (a checkpoint load,
            an external edit) makes the norms stale.
        step: The step that wrote the momentum.
        segments: The segment layout the norms belong to.
        values: ``(start, numel) -> ||m||^2`` of each eligible segment.
    """

    momentum: weakref.ref
    version: int
    step: int
    segments: tuple
    values: dict[tuple[int, int], float]


@dataclass
class Shard:
    """One stepped tensor (a model tensor, a master copy or a flat ZeRO partition) and its segments.

    Attributes:
        group: The param group whose hyper-parameters apply.
        param: The stepped tensor.
        grad: Its gradient this step; None: not updated (its step count still advances).
        state: ``optimizer.state[param]`` (``step``, ``exp_avg``, ``exp_avg_sq``, maybe ``child_mask``).
        segments: ``(start, numel, eligible index or -1)`` of the model tensors' pieces in ``param``.
        names: ``(start, numel, tensor name, start in that tensor)`` of the pieces: ChildTuning-F's hash
            (empty when the method does not need it).
        whole: A dense tensor: its one segment is the tensor itself, in its own shape.
    """

    group: dict[str, Any]
    param: Tensor
    grad: Tensor | None
    state: dict[str, Any]
    segments: list[tuple[int, int, int]]
    names: list[tuple[int, int, str, int]] = field(default_factory=list)
    whole: bool = False

    def view(self, x: Tensor, start: int, numel: int) -> Tensor:
        """Segment ``(start, numel)`` of ``x`` (``param``, ``grad`` or a state tensor)."""
        return x if self.whole else x.narrow(0, start, numel)

    def flat(self, x: Tensor, start: int, numel: int) -> Tensor:
        """:meth:`view` as a 1-D view, in the tensor's flattened element order."""
        return x.view(-1) if self.whole else x.narrow(0, start, numel)


@dataclass
class Segments:
    """What one ROSE step acts on: the optimizer's own tensors, or this rank's ZeRO segments.

    Attributes:
        units: Shards, grouped so that each unit is one masked-AdamW call (its shards share a param group).
        reduce: Sums a tensor over the ranks that share the selection (identity for dense tensors).
        sharded: Ranks hold pieces of the tensors: every eligible index takes part in every step, so
            that all ranks make the same collective calls whatever they hold.
        capture_hint: How to capture the robust gradient, for the error when none was captured.
    """

    units: list[list[Shard]]
    reduce: Callable[[Tensor], Tensor] = radix._identity
    sharded: bool = False
    capture_hint: str = CAPTURE_HINT


class SegmentsProvider(Protocol):
    """Supplies the segments RoseAdamW steps instead of its own tensors (see :meth:`RoseAdamW.attach`)."""

    def segments(self, opt: RoseAdamW) -> Segments | None:
        """The segments of this ``step()`` call, or None to wait for more calls of the same step."""

    def resident(self, opt: RoseAdamW) -> Segments:
        """Every segment held here, for setting state outside a step (no gradient needed)."""

    def stepped(self, segments: Segments) -> None:
        """Called after the update of ``segments``."""


@dataclass
class RobustCapture:
    """The robust-loss gradient recorded for the coming step, by eligible index.

    Attributes:
        squares: float64 squared norm per eligible tensor (tensor granularity); this rank's partial
            sums when the segments are sharded.
        grads: The gradient per eligible tensor (None: none), shaped as the parameter, or this rank's
            flat fragment when sharded.
        from_grad: Recorded from ``.grad`` (``capture_robust_grads()`` without a loss): once per step.
    """

    squares: Tensor | None = None
    grads: list[Tensor | None] | None = None
    from_grad: bool = False

    @property
    def empty(self) -> bool:
        """Nothing was recorded."""
        return self.squares is None and self.grads is None


class RoseAdamW(torch.optim.Optimizer):
    """AdamW with ROSE selection: eligible tensors judged unrobust are frozen for the step.

    Construct it torch-style from *named* parameters, so eligibility can be decided by name::

        opt = RoseAdamW(model.named_parameters(), lr=2e-5, betas=(0.9, 0.98), eps=1e-6,
                        weight_decay=0.01, rose=RoseConfig(mode="ensemble", upper=70))

    or from param groups whose ``params`` are ``(name, tensor)`` pairs, or tensors plus a
    ``param_names`` list. One step (gradient accumulation 1)::

        loss_task, loss_rob = rose_losses(model, inputs, labels)    # two dropout passes
        loss_rob.backward(retain_graph=True); opt.capture_robust_grads(); opt.zero_grad()
        loss_task.backward(); opt.step(); opt.zero_grad()

    With ``N`` micro-batches per step, pass the robust loss itself, which takes its gradient with
    ``torch.autograd.grad`` and leaves the accumulating task gradients in ``.grad`` alone::

        for inputs, labels in micro_batches:
            loss_task, loss_rob = rose_losses(model, inputs, labels)
            opt.capture_robust_grads(loss_rob)    # sums over micro-batches
            (loss_task / N).backward()
        opt.step(); opt.zero_grad()

    The update differs from ``torch.optim.AdamW`` as ROSE's reference (Hugging Face's former AdamW)
    does: ``eps`` is added to ``sqrt(v)`` before bias correction, and weight decay is applied after
    the Adam step, on the updated weights. Non-eligible tensors always get ``c = 1``.

    Args:
        params: Named parameters or param groups (see above).
        lr: Learning rate.
        betas: Adam's ``(beta1, beta2)``.
        eps: Added to ``sqrt(v)``.
        weight_decay: Decoupled weight decay, scaled by ``c``.
        rose: The ROSE configuration; ``RoseConfig()`` when omitted.
        foreach: On torch's path, use its multi-tensor kernels (default True).
        fused: Which kernel steps (see :func:`masked_adamw_`). ``None`` (default): rose_ds's C++
            kernel for float32 CPU tensors (ZeRO-Offload's partitions, a model on the CPU): one pass
            per tensor that also keeps each momentum's norm for the next step's ROSE-Second
            statistics, so the step never re-reads the momentum; torch's foreach kernels elsewhere
            (GPUs, bf16 tensors, or where the kernel cannot be built). ``True``: torch's fused Adam
            kernel. ``False``: torch's foreach (or per-tensor) kernels everywhere.
        method: A method composed with ROSE; the optimizer acts only for ChildTuning-F and -D (it
            masks the gradient before scoring and stepping; D's mask is set once by
            :meth:`set_childtuning_d_fisher`). ``MethodConfig()`` (none) when omitted.

    A LoRA adapter's tensors of one module are scored and masked together (one selection unit:
    :func:`rose_ds.selection.selection_units`); :attr:`last_mask` still names each tensor.

    Parameters with ``requires_grad=False`` (frozen embeddings, a LoRA model's base weights) may be
    passed: they are never eligible, scored, stepped or given state. A trainable tensor without a
    gradient at a step (an unused branch) is left out of that step's band and update, as
    ``torch.optim.AdamW`` leaves it. The step count ``t`` is the optimizer's, not a tensor's.

    Attributes:
        last_mask: ``{parameter name: c}`` of the eligible tensors at the last step (those that had
            a gradient).
        last_statistics: float64 ``(3, #eligible)`` tensor of the last tensor-granularity step's
            squared norms (robust gradient, task gradient, momentum ``m_{t-1}``), in
            :attr:`eligible_names` order; NaN where the mode did not need one. None before.

    Raises:
        TypeError: when parameters come without names.
        NoEligibleTensorError: when the eligibility rule selects no parameter (mode other than none).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rose: RoseConfig | None = None,
        foreach: bool = True,
        fused: bool | None = None,
        method: MethodConfig | None = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"RoseAdamW lr={lr!r} is invalid: expected a number >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"RoseAdamW eps={eps!r} is invalid: expected a number >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"RoseAdamW betas[{i}]={beta!r} is invalid: expected a number in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"RoseAdamW weight_decay={weight_decay!r} is invalid: expected a number >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rose = rose if rose is not None else RoseConfig()
        self.method = method if method is not None else MethodConfig()
        self.foreach = foreach
        self.fused = fused
        names: list[str] = []  # of the trainable tensors: a frozen one is never scored, stepped or given state
        for group in self.param_groups:
            if "param_names" not in group:
                raise TypeError(
                    "RoseAdamW needs parameter names to decide eligibility: pass model.named_parameters() "
                    "or param groups with (name, tensor) pairs or a 'param_names' list"
                )
            names.extend(n for p, n in zip(group["params"], group["param_names"]) if p.requires_grad)
        # every tensor's name: ChildTuning-F hashes it (ZeRO's fp32 master copies are added at binding)
        self._names: dict[Tensor, str] = {
            p: n for group in self.param_groups for p, n in zip(group["params"], group["param_names"])
        }
        chosen = set(eligible_names(names, self.rose))
        # Position of every eligible tensor in the score vector, by parameter.
        self._eligible: dict[Tensor, int] = {}
        self._eligible_names: list[str] = []
        for group in self.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                if name in chosen and p.requires_grad:
                    self._eligible[p] = len(self._eligible_names)
                    self._eligible_names.append(name)
        self._units = selection_units(self._eligible_names)  # a LoRA module's A and B: one unit
        self.last_mask: dict[str, float] = {}
        self.last_statistics: Tensor | None = None
        self.robust_capture = RobustCapture()
        self._provider: SegmentsProvider | None = None  # None: this optimizer's own tensors
        self._expect_provider = False
        # ||m_t||^2 of each momentum segment as the last update left it, by id of the momentum tensor:
        # the next step's second-order statistic without a pass over the momentum (_momentum_statistics)
        self._momentum_norms: dict[int, _MomentumNorms] = {}

    @property
    def eligible_names(self) -> list[str]:
        """Names of the tensors that take part in selection, in score-vector order."""
        return list(self._eligible_names)

    @property
    def provider(self) -> SegmentsProvider | None:
        """The segments provider attached with :meth:`attach` (None: the optimizer's own tensors)."""
        return self._provider

    def attach(self, provider: SegmentsProvider) -> None:
        """Steps, from now on, the segments ``provider`` supplies (``rose_ds.zero`` binds ZeRO's
        partitions this way) instead of the optimizer's own tensors."""
        self._provider = provider
        self._expect_provider = False

    def expect_provider(self) -> None:
        """Until :meth:`attach`, ``step()`` only creates the state: DeepSpeed's set-up calls it once
        with zero gradients before the engine exists to bind to."""
        self._expect_provider = True

    def use_master_copies(self, copies: Iterable[tuple[Tensor, str]]) -> None:
        """Steps master copies of the model's tensors (DeepSpeed's fp32 copies of bf16/fp16 weights at
        ZeRO stage 0): ``(copy, parameter name)`` pairs; eligibility and ChildTuning-F's hash follow
        the name, and the eligible tensors become the copies."""
        index = {n: i for i, n in enumerate(self._eligible_names)}
        eligible: dict[Tensor, int] = {}
        for copy, name in copies:
            self._names[copy] = name
            if name in index:
                eligible[copy] = index[name]
        self._eligible = eligible

    @property
    def kept_fraction(self) -> float:
        """Mean ``c`` over the eligible tensors at the last step (1.0 before the first)."""
        return sum(self.last_mask.values()) / len(self.last_mask) if self.last_mask else 1.0

    @torch.no_grad()
    def capture_robust_grads(self, loss_rob: Tensor | None = None) -> None:
        """Records the robust-loss gradient of the eligible tensors for first-order scoring.

        Without an argument, reads ``.grad`` right after ``loss_rob.backward(retain_graph=True)``;
        call ``zero_grad()`` afterwards. This form is for one micro-batch per step: ``.grad`` must
        hold the robust gradient alone, so a second call before ``step()`` is refused.

        With ``loss_rob``, takes its gradient with ``torch.autograd.grad`` (the graph is retained for
        the task backward) and adds it to the step's running sum, so any number of micro-batches
        accumulate while ``.grad`` keeps only task gradients.

        A no-op in modes that do not use it (``none``, ``second``).
        """
        if not needs_robust_gradient(self.rose):
            return
        params = self._by_index()
        captured = self.robust_capture
        if loss_rob is None:
            if not captured.empty:
                raise RuntimeError(
                    "capture_robust_grads() was called twice before step(): .grad then mixes task and robust "
                    "gradients; with gradient accumulation pass the loss: capture_robust_grads(loss_rob)"
                )
            grads = [p.grad for p in params]
            if self.rose.granularity == "element":  # element scores need the gradient itself
                self.robust_capture = RobustCapture(grads=[None if g is None else g.clone() for g in grads],
                                                    from_grad=True)  # fmt: skip
            else:
                self.robust_capture = RobustCapture(squares=_squared_norms(grads), from_grad=True)
            return
        if captured.from_grad or captured.squares is not None:
            raise RuntimeError("capture_robust_grads(): do not mix the .grad form and the loss form in one step")
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_rob, params, retain_graph=True, allow_unused=True)
        if captured.grads is None:
            self.robust_capture = RobustCapture(grads=list(grads))
            return
        for i, g in enumerate(grads):
            if g is not None:
                acc = captured.grads[i]
                captured.grads[i] = g if acc is None else acc.add_(g)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Scores the eligible tensors, derives ``c`` and applies the masked AdamW update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # State first, also for ZeRO's partitions: DeepSpeed links their fragments after each call.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # frozen tensors get none
                    self._init_state(p)
        if self._provider is None and self._expect_provider:
            return loss  # DeepSpeed's initialisation step (zero gradients): state only
        segments = self.dense_segments() if self._provider is None else self._provider.segments(self)
        if segments is None:  # the provider waits for the rest of the step's partitions
            return loss
        self._rose_step(segments)
        if self._provider is not None:
            self._provider.stepped(segments)
        return loss

    def _rose_step(self, segments: Segments) -> None:
        """The one ROSE step over dense tensors or ZeRO segments: ChildTuning's gradient mask, the
        statistics, the band coefficients and the masked update (spec sections 2-4)."""
        t = self.global_step() + 1
        shards = [s for unit in segments.units for s in unit if s.grad is not None]
        if self.method.masks_gradients:  # ChildTuning-F, before ROSE scores the gradient; each rank its own elements
            for s in shards:
                for start, numel, name, offset in s.names:
                    if numel > 0:
                        childtuning_f_(s.flat(s.grad, start, numel), tensor_key(name, self.method.seed, t), offset,
                                       self.method.childtuning_p)  # fmt: skip
        if self.method.fixed_mask:  # ChildTuning-D masks eligible segments only (all True until set)
            for s in shards:
                for start, numel, idx in s.segments:
                    if idx >= 0 and numel > 0:
                        s.view(s.grad, start, numel).mul_(s.view(s.state["child_mask"], start, numel))
        # Eligible tensors taking part. Sharded: all of them, so that every rank makes the same
        # collective calls whatever it holds; dense: those with a gradient this step.
        if segments.sharded:
            live = list(range(len(self._eligible_names)))
        else:
            live = sorted({idx for s in shards for _, _, idx in s.segments if idx >= 0})
        if needs_robust_gradient(self.rose) and masking_active(self.rose, t) and live and self.robust_capture.empty:
            raise RuntimeError(
                f"RoseAdamW(mode={self.rose.mode!r}) step {t}: no robust gradient was captured; "
                + segments.capture_hint
            )
        for unit in segments.units:
            for s in unit:
                s.state["step"].fill_(t)
        try:
            if self.rose.granularity == "element":
                self._element_update(segments, live, t)
            else:
                self._tensor_update(segments, live, t)
        finally:
            self.robust_capture = RobustCapture()

    def _tensor_update(self, segments: Segments, live: list[int], t: int) -> None:
        """Tensor granularity: one ``c`` per eligible tensor from its whole-tensor norms."""
        cfg, n = self.rose, len(self._eligible_names)
        coefficients = dict.fromkeys(live, 1.0)
        if masking_active(cfg, t) and live:
            robust, second = needs_robust_gradient(cfg), needs_second_order(cfg, t)
            stats = torch.zeros(3, n, dtype=torch.float64)
            if robust:
                captured = self.robust_capture
                if captured.grads is not None:
                    pairs = [(i, g) for i, g in enumerate(captured.grads) if g is not None]
                    stats[0] = index_sum_of_squares(pairs, n)
                else:
                    stats[0] = captured.squares
            if second:
                held = [(s, a, b, i) for unit in segments.units for s in unit if s.grad is not None
                        for a, b, i in s.segments if i >= 0]  # fmt: skip
                stats[1] = index_sum_of_squares([(i, s.view(s.grad, a, b)) for s, a, b, i in held], n)
                stats[2] = self._momentum_statistics(held, n, t)
            # The only communication selection adds: 3 x #eligible float64 values.
            stats = segments.reduce(stats)
            recorded = torch.full((3, n), float("nan"), dtype=torch.float64)  # NaN where the mode needs no norm
            rows = ([0] if robust else []) + ([1, 2] if second else [])
            for r in rows:
                recorded[r, live] = stats[r, live]
            self.last_statistics = recorded
            c = mask_coefficients(cfg, t, len(live), stats[0, live] if robust else None,
                                  stats[1, live] if second else None, stats[2, live] if second else None,
                                  units=[self._units[i] for i in live])  # fmt: skip
            coefficients = dict(zip(live, c.tolist()))
        self.last_mask = {self._eligible_names[i]: coefficients[i] for i in live}
        keep_norms = needs_second_order(cfg, t + 1)  # the next step's ||m_{t-1}||: taken by this update
        for unit in segments.units:
            pieces, eligible = [], []  # (shard, start, numel, c); whether the piece is an eligible segment
            for s in unit:
                if s.grad is None:
                    continue
                if keep_norms:  # one piece per segment: its momentum norm is kept
                    segs = [(a, b, i) for a, b, i in s.segments if b > 0]
                    pieces += [(s, a, b, coefficients[i] if i >= 0 else 1.0) for a, b, i in segs]
                    eligible += [i >= 0 for _, _, i in segs]
                else:  # contiguous segments of equal c merged into one view
                    pieces += [(s, a, b, c) for a, b, c in _runs(s.segments, coefficients)]
            norms = self._update(unit, pieces, t, eligible if keep_norms else False)
            if norms is not None:  # (None: no eligible segment in this unit)
                self._keep_momentum_norms(pieces, eligible, norms, t)

    def _element_update(self, segments: Segments, live: list[int], t: int) -> None:
        """Element granularity: a coefficient per element of every eligible tensor; the band of all
        ranks' scores comes from ``radix.sampled_quantiles`` (a sampled bracket and a few all-reduces of
        256-bin histograms), never gathered. On rose_ds's C++ path no score or mask is stored: the
        bands go to the update, which scores each element as it reads it."""
        cfg, n = self.rose, len(self._eligible_names)
        active = masking_active(cfg, t)
        by_index: dict[int, list[tuple[Shard, int, int]]] = {i: [] for i in live}
        for unit in segments.units:
            held = [s for s in unit if s.grad is not None]
            # non-eligible segments (and all of them when nothing is masked): plain AdamW, merged runs
            plain = [(s, [(a, b, -1) for a, b, i in s.segments if i < 0 or not active]) for s in held]
            runs = [(s, a, b, 1.0) for s, segs in plain for a, b, _ in _runs(segs, {})]
            if runs:
                self._update(unit, runs, t)
            if active:
                for s in held:
                    for a, b, i in s.segments:
                        if i >= 0 and b > 0:
                            by_index[i].append((s, a, b))
        if not active:
            self.last_mask = {self._eligible_names[i]: 1.0 for i in live}
            return
        # every piece of every live tensor here, in score-vector order
        pieces = [(i, s, a, b) for i in live for s, a, b in by_index[i]]
        robust = grads = momenta = None
        if needs_robust_gradient(cfg):
            captured, robust, offsets = self.robust_capture.grads, [], dict.fromkeys(live, 0)
            for i, s, a, b in pieces:
                g = captured[i]
                if g is None:
                    robust.append(torch.zeros(b, dtype=torch.float32, device=s.param.device))
                else:
                    robust.append(g if len(by_index[i]) == 1 else g.reshape(-1).narrow(0, offsets[i], b))
                offsets[i] += b
        if needs_second_order(cfg, t):
            grads = [s.view(s.grad, a, b) for _, s, a, b in pieces]
            momenta = [s.view(s.state["exp_avg"], a, b) for _, s, a, b in pieces]
        bands = element_bands(cfg, t, robust, grads, momenta, segments.reduce, [len(by_index[i]) for i in live])
        counts = torch.zeros(2, n, dtype=torch.float64)  # kept and held elements of each tensor
        kept = self._band_update(pieces, bands, robust, t) if bands is not None else None
        if kept is None:  # torch's path: the coefficients in memory
            coefficients = [1.0] * len(pieces) if bands is None else bands.coefficients(robust, grads, momenta)
            kept = []
            for (_, s, a, b), c in zip(pieces, coefficients):
                self._update([s], [(s, a, b, c)], t)
                kept.append(float(b) if isinstance(c, float) else float(c.sum(dtype=torch.float64)))
        for (i, _, _, b), k in zip(pieces, kept):
            counts[0, i] += k
            counts[1, i] += b
        counts = segments.reduce(counts)  # the kept fraction of each whole tensor, for last_mask
        self.last_mask = {self._eligible_names[i]: float(counts[0, i] / counts[1, i]) if counts[1, i] else 1.0
                          for i in live}  # fmt: skip

    def _band_update(self, pieces, bands: ElementBands, robust: list[Tensor] | None, t: int) -> list[float] | None:
        """The element update on rose_ds's C++ path, ``c`` of each element from ``bands``; returns each
        piece's sum of ``c``, or None where the kernel cannot take the tensors (torch's path then)."""
        views = [(s, s.view(s.param, a, b), s.view(s.grad, a, b), s.view(s.state["exp_avg"], a, b),
                  s.view(s.state["exp_avg_sq"], a, b)) for _, s, a, b in pieces]  # fmt: skip
        flat = [x for _, *tensors in views for x in tensors] + (robust or [])
        compiled = kernels.cpu_kernels() if self.fused is None and kernels.applies(*flat) else None
        if compiled is None:
            return None
        kept = [0.0] * len(pieces)
        by_group: dict[int, list[int]] = defaultdict(list)
        for k, (s, *_) in enumerate(views):
            by_group[id(s.group)].append(k)
        mode = {"first": 0, "second": 1, "ensemble": 2}[bands.mode]
        for ks in by_group.values():
            group = views[ks[0]][0].group
            beta1, beta2 = group["betas"]
            sums = compiled.band_adamw(
                *([views[k][j] for k in ks] for j in range(1, 5)), [robust[k] if robust else None for k in ks],
                [x for k in ks for x in bands.first[k]] if bands.first else [],
                [x for k in ks for x in bands.second[k]] if bands.second else [], mode, bands.coef, bands.gamma,
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], t,
            )  # fmt: skip
            for k, value in zip(ks, sums.tolist()):
                kept[k] = value
        return kept

    def _update(self, unit: list[Shard], pieces: list[tuple[Shard, int, int, float | Tensor]], t: int,
                momentum_norms: bool | list[bool] = False) -> Tensor | None:  # fmt: skip
        """One masked_adamw_ call over ``(shard, start, numel, c)`` views, with the unit's group's
        hyper-parameters (the shards of a unit share one param group); returns the new momenta's
        squared norms where ``momentum_norms`` asks for them."""
        if not pieces:
            return None
        group = unit[0].group
        beta1, beta2 = group["betas"]
        return masked_adamw_(
            [s.view(s.param, a, b) for s, a, b, _ in pieces], [s.view(s.grad, a, b) for s, a, b, _ in pieces],
            [s.view(s.state["exp_avg"], a, b) for s, a, b, _ in pieces],
            [s.view(s.state["exp_avg_sq"], a, b) for s, a, b, _ in pieces], [c for *_, c in pieces],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=t,
            foreach=self.foreach, fused=self.fused, momentum_norms=momentum_norms,
        )  # fmt: skip

    def _keep_momentum_norms(self, pieces, flags: list[bool], norms: Tensor, t: int) -> None:
        """Remembers the squared norms the update at step ``t`` returned for each momentum segment."""
        by_shard: dict[int, tuple[Shard, dict[tuple[int, int], float]]] = {}
        for (s, a, b, _), flag, norm in zip(pieces, flags, norms.tolist()):
            if flag:
                by_shard.setdefault(id(s.state["exp_avg"]), (s, {}))[1][(a, b)] = norm
        for key, (s, values) in by_shard.items():
            m = s.state["exp_avg"]
            self._momentum_norms[key] = _MomentumNorms(weakref.ref(m), m._version, t, tuple(s.segments), values)

    def _momentum_statistics(self, held: list[tuple[Shard, int, int, int]], n: int, t: int) -> Tensor:
        """``index_sum_of_squares`` of the momentum segments ``(shard, start, numel, index)``, bit for
        bit: each segment's norm as the previous update returned it where that still describes the
        momentum (written at step ``t - 1``, not touched since, same layout), else read again (the
        first step, after ``load_state_dict`` or a resume, a new partition layout, a skipped tensor)."""
        values: list[float | None] = []
        indices, missing = [], []
        valid: dict[int, dict[tuple[int, int], float] | None] = {}
        for s, a, b, i in held:
            if b == 0:
                continue
            m = s.state["exp_avg"]
            if id(m) not in valid:
                kept = self._momentum_norms.get(id(m))
                fresh = (kept is not None and kept.momentum() is m and kept.version == m._version
                         and kept.step == t - 1 and kept.segments == tuple(s.segments))  # fmt: skip
                valid[id(m)] = kept.values if fresh else None
            value = None if valid[id(m)] is None else valid[id(m)].get((a, b))
            if value is None:
                missing.append((len(values), s.view(m, a, b)))
            values.append(value)
            indices.append(i)
        if missing:
            for (k, _), norm in zip(missing, sum_of_squares([v for _, v in missing]).tolist()):
                values[k] = norm
        out = torch.zeros(n, dtype=torch.float64)
        if indices:
            out.index_add_(0, torch.tensor(indices, dtype=torch.long), torch.tensor(values, dtype=torch.float64))
        return out

    def dense_segments(self, stepping: bool = True) -> Segments:
        """This optimizer's own tensors as a segments view: each tensor is one whole segment.

        Args:
            stepping: The tensors with a gradient, one unit per param group (a step); False: every
                eligible tensor (to set state such as ChildTuning-D's mask).
        """
        units: list[list[Shard]] = []
        for group in self.param_groups:
            unit = []
            for p in group["params"]:
                if (p.grad is None) if stepping else (p not in self._eligible):
                    continue
                named = [(0, p.numel(), self._names[p], 0)] if self.method.masks_gradients else []
                unit.append(Shard(group, p, p.grad if stepping else None, self.state[p],
                                  [(0, p.numel(), self._eligible.get(p, -1))], named, whole=True))  # fmt: skip
            if unit:
                units.append(unit)
        return Segments(units)

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.method.fixed_mask:  # ChildTuning-D's mask lives in the state: checkpoints carry it
                state["child_mask"] = torch.ones_like(p, dtype=torch.bool)

    def set_childtuning_d_fisher(self, fisher: Sequence[Tensor] | Mapping[int, Tensor]) -> float:
        """ChildTuning-D: fixes the gradient mask from the Fisher information of the eligible tensors;
        returns the threshold.

        Args:
            fisher: One tensor per eligible tensor, in :attr:`eligible_names` order, shaped as the
                parameter (dense use: one process, or ZeRO-0 through :func:`rose_ds.childtuning_d`);
                or ``{eligible index: this rank's flat fragment}`` over a segments provider (ZeRO
                1-3), the threshold then taken over every rank's fragments.
        """
        if not self.method.fixed_mask:
            raise ValueError(f"set_childtuning_d_fisher: the method is {self.method.name!r}, not 'childtuning-d'")
        segments = self.dense_segments(stepping=False) if self._provider is None else self._provider.resident(self)
        if isinstance(fisher, Mapping):
            held = sorted(fisher)
        else:
            if len(fisher) != len(self._eligible_names):
                raise ValueError(f"set_childtuning_d_fisher: {len(fisher)} tensors for "
                                 f"{len(self._eligible_names)} eligible ones")  # fmt: skip
            held = list(range(len(fisher)))
        masks, threshold = childtuning_d_masks([fisher[i] for i in held], self.method.childtuning_p, segments.reduce)
        by_index = dict(zip(held, masks))
        for s in (s for unit in segments.units for s in unit):
            self._init_state(s.param)  # (fills s.state: the same dict)
            for start, numel, idx in s.segments:
                if idx in by_index and numel > 0:
                    target = s.view(s.state["child_mask"], start, numel)
                    target.copy_(by_index[idx].view_as(target))
        return threshold

    def global_step(self) -> int:
        """Optimizer steps taken so far: the largest ``step`` in the state. Every tensor stepped at
        step ``t`` holds ``t`` (a masked one too), a frozen tensor holds no state at all, and every
        checkpoint path restores these counts, so the count is the optimizer's whatever tensor
        comes first."""
        return max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)

    _global_step = global_step  # the former private name, kept for callers that used it

    def _by_index(self) -> list[Tensor]:
        """The eligible tensors in score-vector order."""
        return sorted(self._eligible, key=self._eligible.__getitem__)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``rose``: the configuration and the last mask."""
        sd = super().state_dict()
        sd["rose"] = {"config": self.rose.to_dict(), "last_mask": dict(self.last_mask)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores torch's optimizer state and the last mask (the configuration stays as constructed)."""
        state_dict = dict(state_dict)
        rose = state_dict.pop("rose", None)
        super().load_state_dict(state_dict)
        self._momentum_norms.clear()  # new momenta: their norms are read again at the next step
        if rose is not None:
            self.last_mask = dict(rose.get("last_mask", {}))


def _squared_norms(tensors: Sequence[Tensor | None]) -> Tensor:
    """float64 squared L2 norm of each tensor (on the CPU); a missing tensor (no gradient) counts as zero."""
    out = torch.zeros(len(tensors), dtype=torch.float64)
    present = [i for i, t in enumerate(tensors) if t is not None]
    if present:
        out[present] = sum_of_squares([tensors[i] for i in present])
    return out


# Elements per fp32 partial sum. One fp32 accumulation over a whole tensor loses digits as the
# tensor grows (BLAS dot: 2e-6 relative error at 1e6 elements, 3e-3 at 1e8, 8e-2 at 1e9); partial
# sums over short blocks, added in fp64, keep the error of one block at any size: measured 4e-10
# (fp32 data) and 6e-8 (fp32 data of bf16 precision, whose rounding is biased) from 1e6 to 1e9
# elements. On the CPU the blocks are summed by rose_ds's C++ kernel (16 fp32 lanes a block, in a
# fixed order, the same code as the fused update's momentum norm), or without it the rows of one
# batched BLAS product per tensor, 1.1-1.5x the time of a single dot (2^12-element rows: 6e-7; 2^9
# is where both errors are smallest); elsewhere one _foreach_norm launch over 2^18-element blocks.
CPU_NORM_BLOCK = 1 << 9
NORM_BLOCK = 1 << 18


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of each tensor as a float64 CPU vector, for any size, dtype and device.

    Each tensor is cut into short blocks whose squares are summed in fp32 (bf16/fp16 are widened
    exactly; fp64 stays fp64), and the blocks' sums are added in fp64, so the relative error stays
    below 1e-7 from a few elements to 1e9 and beyond (``tests/test_optim.py`` checks it at 2e8; a
    single fp32 accumulation is off by 3e-3 at 1e8 elements). On the CPU the blocks have
    :data:`CPU_NORM_BLOCK` elements: float32 tensors go through rose_ds's C++ kernel
    (:mod:`rose_ds.kernels`; one read at memory speed, the same bits as the momentum norm the fused
    update returns, whatever the number of threads), other dtypes or a machine without the kernel
    through one BLAS batched product per tensor, which costs what one ``dot`` over the tensor nearly
    costs (benchmarks/RESULTS.md); other devices use one ``_foreach_norm`` launch over the
    :data:`NORM_BLOCK`-element blocks of all tensors. A block sum beyond fp32's range (squares above
    3.4e38) is inf, which the selection freezes like any infinite score.
    """
    out = torch.zeros(len(tensors), dtype=torch.float64)
    if not tensors:
        return out
    on_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    compiled = kernels.cpu_kernels() if on_cpu else None
    if compiled is not None:  # the same blocks, fp32 lanes of a fixed order: the C++ update's norm, bit for bit
        return compiled.sum_of_squares([t.contiguous() for t in tensors])
    if all(t.device.type == "cpu" for t in tensors):
        for i, t in enumerate(tensors):
            out[i] = _cpu_sum_of_squares(t.contiguous().view(-1))
        return out
    blocks: list[Tensor] = []
    owner: list[int] = []
    for i, t in enumerate(tensors):
        pieces = t.reshape(-1).split(NORM_BLOCK)
        blocks.extend(pieces)
        owner.extend([i] * len(pieces))
    norms = torch._foreach_norm(blocks, 2, dtype=torch.float32)
    sums = torch.stack(norms).to(device="cpu", dtype=torch.float64).square()
    return out.index_add_(0, torch.tensor(owner, dtype=torch.long), sums)


def _cpu_sum_of_squares(flat: Tensor) -> Tensor:
    if flat.dtype not in (torch.float32, torch.float64):  # bf16/fp16: widened exactly, a block at a time
        scratch = torch.empty(min(flat.numel(), NORM_BLOCK), dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float64)
        for block in flat.split(NORM_BLOCK):
            total += _cpu_sum_of_squares(scratch[: block.numel()].copy_(block))
        return total
    rows = flat.numel() // CPU_NORM_BLOCK
    tail = flat[rows * CPU_NORM_BLOCK :]
    total = tail.dot(tail).to(torch.float64)
    if rows:
        body = flat[: rows * CPU_NORM_BLOCK].view(rows, 1, CPU_NORM_BLOCK)
        total = total + torch.bmm(body, body.transpose(1, 2)).to(torch.float64).sum()
    return total


def _runs(segments: list[tuple[int, int, int]], c: Mapping[int, float]) -> list[tuple[int, int, float]]:
    """Contiguous segments with equal ``c`` merged into one view each (fewer kernel launches);
    a non-eligible segment (index -1) has ``c = 1``."""
    runs: list[list] = []
    for start, numel, idx in segments:
        if numel == 0:
            continue
        value = c[idx] if idx >= 0 else 1.0
        if runs and runs[-1][0] + runs[-1][1] == start and runs[-1][2] == value:
            runs[-1][1] += numel
        else:
            runs.append([start, numel, value])
    return [tuple(r) for r in runs]


def index_sum_of_squares(pairs: list[tuple[int, Tensor]], n: int) -> Tensor:
    """float64 CPU vector of length ``n``: the sum of the squared L2 norms (:func:`sum_of_squares`) of
    the tensors listed under each index (the pieces of one tensor; an index without any counts 0)."""
    out = torch.zeros(n, dtype=torch.float64)
    pairs = [(i, t) for i, t in pairs if t.numel() > 0]
    if pairs:
        out.index_add_(0, torch.tensor([i for i, _ in pairs], dtype=torch.long), sum_of_squares([t for _, t in pairs]))
    return out
