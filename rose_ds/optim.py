"""RoseAdamW: AdamW that freezes, at every step, the eligible tensors whose update looks unrobust.

The update rule is ``masked_adamw_`` (pure tensor arithmetic, no distributed code); the selection
comes from :mod:`rose_ds.selection`. The optimizer itself only gathers the per-tensor statistics,
asks for the mask and applies the update.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from rose_ds.config import RoseConfig
from rose_ds.methods import MethodConfig, childtuning_d_masks, childtuning_f_, tensor_key
from rose_ds.selection import (
    element_coefficients,
    eligible_names,
    mask_coefficients,
    masking_active,
    needs_robust_gradient,
    needs_second_order,
)


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    coefficients: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    foreach: bool = True,
    fused: bool = False,
) -> None:
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
        coefficients: ``c`` per tensor, in [0, 1].
        lr, beta1, beta2, eps, weight_decay: AdamW hyper-parameters of the group.
        step: The global step ``t`` (1-based) used for bias correction.
        foreach: Use torch's multi-tensor kernels; the per-tensor path gives bit-identical results.
        fused: Use torch's fused Adam kernel (one pass over p, g, m, v; much faster on CPU and GPU).
            Same formulas, different rounding: ``eps`` is passed as ``eps / sqrt(1 - beta2^t)``
            so that torch's ``sqrt(v) / sqrt(1 - beta2^t) + eps'`` equals ROSE's
            ``(sqrt(v) + eps) / sqrt(1 - beta2^t)``, the step is scaled by ``c`` through the
            learning rate, and the weight decay is applied afterwards as in the specification.
    """
    if fused:
        _fused_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, lr, beta1, beta2, eps, weight_decay,
                             step)  # fmt: skip
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


def masked_adamw_elements_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    c: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """:func:`masked_adamw_` for one tensor whose ``c`` varies per element (element granularity).

    ``c`` is boolean (kept / frozen: no float mask is made) or float (the ensemble's mix). The formulas
    are those of the tensor path, element by element; a frozen element keeps its weight and momentum
    exactly while ``v`` moves toward ``m^2``.
    """
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
        foreach: Use torch's multi-tensor kernels (default True).
        fused: Use torch's fused Adam kernel for the update (see :func:`masked_adamw_`); fastest.
        method: A method composed with ROSE; the optimizer acts only for ChildTuning-F and -D (it
            masks the gradient before scoring and stepping; D's mask is set once by
            :meth:`set_childtuning_d_fisher`). ``MethodConfig()`` (none) when omitted.

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
        fused: bool = False,
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
        self.last_mask: dict[str, float] = {}
        self.last_statistics: Tensor | None = None
        self._robust_sq: Tensor | None = None  # from capture_robust_grads() without a loss
        self._robust_grads: list[Tensor | None] | None = None  # from capture_robust_grads(loss)

    @property
    def eligible_names(self) -> list[str]:
        """Names of the tensors that take part in selection, in score-vector order."""
        return list(self._eligible_names)

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
        if loss_rob is None:
            if self._robust_sq is not None or self._robust_grads is not None:
                raise RuntimeError(
                    "capture_robust_grads() was called twice before step(): .grad then mixes task and robust "
                    "gradients; with gradient accumulation pass the loss: capture_robust_grads(loss_rob)"
                )
            grads = [p.grad for p in params]
            if self.rose.granularity == "element":  # element scores need the gradient itself
                self._robust_grads = [None if g is None else g.clone() for g in grads]
                self._robust_sq = torch.zeros(0)  # marks the .grad form as used for this step
            else:
                self._robust_sq = _squared_norms(grads)
            return
        if self._robust_sq is not None:
            raise RuntimeError("capture_robust_grads(): do not mix the .grad form and the loss form in one step")
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_rob, params, retain_graph=True, allow_unused=True)
        if self._robust_grads is None:
            self._robust_grads = list(grads)
        else:
            for i, g in enumerate(grads):
                if g is None:
                    continue
                acc = self._robust_grads[i]
                self._robust_grads[i] = g if acc is None else acc.add_(g)

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
        binding = getattr(self, "_binding", None)
        if getattr(self, "_await_binding", False):
            return loss  # DeepSpeed's initialisation step (zero gradients): state only
        if binding is not None and binding.flat:
            binding.client_step()  # ZeRO 1-3: flat partitions, see rose_ds.zero
            return loss

        t = self._global_step() + 1
        if self.method.masks_gradients:  # ChildTuning-F, before ROSE scores the gradient
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        key = tensor_key(self._names[p], self.method.seed, t)
                        childtuning_f_(p.grad.view(-1), key, 0, self.method.childtuning_p)
        if self.method.fixed_mask:  # ChildTuning-D masks eligible tensors only (all True until set)
            for p in self._eligible:
                if p.grad is not None:
                    p.grad.mul_(self.state[p]["child_mask"])

        if self.rose.granularity == "element":
            self._element_step(t)
            return loss
        coefficients = self._select(t)  # {eligible index: c} of the tensors with a gradient
        self.last_mask = {self._eligible_names[i]: c for i, c in sorted(coefficients.items())}

        for group in self.param_groups:
            entries = [(p, self.state[p]) for p in group["params"] if p.grad is not None]
            for _, state in entries:
                state["step"].fill_(t)
            if not entries:
                continue
            self._apply(
                group,
                [p for p, _ in entries],
                [p.grad for p, _ in entries],
                [s["exp_avg"] for _, s in entries],
                [s["exp_avg_sq"] for _, s in entries],
                [coefficients[self._eligible[p]] if p in self._eligible else 1.0 for p, _ in entries],
                t,
            )
        self._robust_sq = None
        self._robust_grads = None
        return loss

    def _element_step(self, t: int) -> None:
        """Element granularity: a coefficient per element of every eligible tensor."""
        params = [p for p in self._by_index() if p.grad is not None]  # score-vector order
        robust = None
        if needs_robust_gradient(self.rose) and masking_active(self.rose, t):
            captured = self._robust_grads
            if captured is None:
                raise RuntimeError(
                    f"RoseAdamW(mode={self.rose.mode!r}) step {t}: no robust gradient was captured; call "
                    "opt.capture_robust_grads() after loss_rob.backward(retain_graph=True), before step()"
                )
            robust = [captured[self._eligible[p]] for p in params]
            robust = [torch.zeros_like(p) if g is None else g for p, g in zip(params, robust)]
        grads = momenta = None
        if needs_second_order(self.rose, t):
            grads = [p.grad for p in params]
            momenta = [self.state[p]["exp_avg"] for p in params]
        masks = element_coefficients(self.rose, t, robust, grads, momenta)
        by_param = {} if masks is None else dict(zip(params, masks))
        names = [self._eligible_names[self._eligible[p]] for p in params]
        if masks is None:
            self.last_mask = dict.fromkeys(names, 1.0)
        else:  # per tensor: the mean coefficient of its elements
            self.last_mask = {n: float(c.sum(dtype=torch.float64) / c.numel()) for n, c in zip(names, masks)}
        for group in self.param_groups:
            entries = [(p, self.state[p]) for p in group["params"] if p.grad is not None]
            for _, state in entries:
                state["step"].fill_(t)
            whole = [(p, s) for p, s in entries if p not in by_param]
            if whole:
                self._apply(group, [p for p, _ in whole], [p.grad for p, _ in whole], [s["exp_avg"] for _, s in whole],
                            [s["exp_avg_sq"] for _, s in whole], [1.0] * len(whole), t)  # fmt: skip
            beta1, beta2 = group["betas"]
            for p, s in entries:
                if p in by_param:
                    masked_adamw_elements_(p, p.grad, s["exp_avg"], s["exp_avg_sq"], by_param[p], lr=group["lr"],
                                           beta1=beta1, beta2=beta2, eps=group["eps"],
                                           weight_decay=group["weight_decay"], step=t)  # fmt: skip
        self._robust_sq = None
        self._robust_grads = None

    def _apply(self, group, params, grads, exp_avgs, exp_avg_sqs, coefficients, step: int) -> None:
        """masked_adamw_ with the group's hyper-parameters (tensors may be views of flat partitions)."""
        beta1, beta2 = group["betas"]
        masked_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, coefficients, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], step=step, foreach=self.foreach, fused=self.fused,
        )  # fmt: skip

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.method.fixed_mask:  # ChildTuning-D's mask lives in the state: checkpoints carry it
                state["child_mask"] = torch.ones_like(p, dtype=torch.bool)

    def set_childtuning_d_fisher(self, fisher: Sequence[Tensor]) -> float:
        """ChildTuning-D: fixes the gradient mask from the Fisher information of the eligible tensors
        (one tensor each, in :attr:`eligible_names` order, shaped as the parameter); returns the
        threshold. Dense use (one process, or ZeRO-0 through :func:`rose_ds.childtuning_d`)."""
        if not self.method.fixed_mask:
            raise ValueError(f"set_childtuning_d_fisher: the method is {self.method.name!r}, not 'childtuning-d'")
        params = self._by_index()
        masks, threshold = childtuning_d_masks(fisher, self.method.childtuning_p)
        for p, mask in zip(params, masks, strict=True):
            self._init_state(p)
            self.state[p]["child_mask"].copy_(mask.view_as(p))
        return threshold

    def _global_step(self) -> int:
        """Optimizer steps taken so far: the largest ``step`` in the state. Every tensor stepped at
        step ``t`` holds ``t`` (a masked one too), a frozen tensor holds no state at all, and every
        checkpoint path restores these counts, so the count is the optimizer's whatever tensor
        comes first."""
        return max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)

    def _by_index(self) -> list[Tensor]:
        """The eligible tensors in score-vector order."""
        return sorted(self._eligible, key=self._eligible.__getitem__)

    def _select(self, t: int) -> dict[int, float]:
        """``{eligible index: c}`` for the eligible tensors that have a gradient this step."""
        cfg = self.rose
        eligible = self._by_index()
        live = [i for i, p in enumerate(eligible) if p.grad is not None]
        params = [eligible[i] for i in live]
        if not masking_active(cfg, t) or not live:
            return dict.fromkeys(live, 1.0)
        stats = torch.full((3, len(self._eligible_names)), float("nan"), dtype=torch.float64)
        robust_sq = grad_sq = momentum_sq = None
        if needs_robust_gradient(cfg):
            if self._robust_grads is not None:
                robust_sq = _squared_norms([self._robust_grads[i] for i in live])
            elif self._robust_sq is not None:
                robust_sq = self._robust_sq[live]
            else:
                raise RuntimeError(
                    f"RoseAdamW(mode={cfg.mode!r}) step {t}: no robust gradient was captured; call "
                    "opt.capture_robust_grads() after loss_rob.backward(retain_graph=True), before step()"
                )
            stats[0, live] = robust_sq
        if needs_second_order(cfg, t):
            grad_sq = _squared_norms([p.grad for p in params])
            momentum_sq = _squared_norms([self.state[p]["exp_avg"] for p in params])
            stats[1, live], stats[2, live] = grad_sq, momentum_sq
        self.last_statistics = stats
        c = mask_coefficients(cfg, t, len(live), robust_sq, grad_sq, momentum_sq)
        return dict(zip(live, c.tolist()))

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
# elements. On the CPU the blocks are the rows of one batched BLAS product per tensor, 1.1-1.5x the
# time of a single dot (2^12-element rows: 6e-7; 2^9 is where both errors are smallest); elsewhere
# one _foreach_norm launch over 2^18-element blocks.
CPU_NORM_BLOCK = 1 << 9
NORM_BLOCK = 1 << 18


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of each tensor as a float64 CPU vector, for any size, dtype and device.

    Each tensor is cut into short blocks whose squares are summed in fp32 (bf16/fp16 are widened
    exactly; fp64 stays fp64), and the blocks' sums are added in fp64, so the relative error stays
    below 1e-7 from a few elements to 1e9 and beyond (``tests/test_optim.py`` checks it at 2e8; a
    single fp32 accumulation is off by 3e-3 at 1e8 elements). On the CPU the blocks are the
    :data:`CPU_NORM_BLOCK`-element rows of one BLAS batched product per tensor, which costs what one
    ``dot`` over the tensor nearly costs (benchmarks/RESULTS.md); other devices use one ``_foreach_norm``
    launch over the :data:`NORM_BLOCK`-element blocks of all tensors. A block sum beyond fp32's range
    (squares above 3.4e38) is inf, which the selection freezes like any infinite score.
    """
    out = torch.zeros(len(tensors), dtype=torch.float64)
    if not tensors:
        return out
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
