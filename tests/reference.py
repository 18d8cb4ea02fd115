"""A dense, single-process ROSE reference written line by line from docs/algorithm.md.

Deliberately naive: one tensor at a time, float64 norms, ``torch.quantile`` for the band and the
update formulas exactly as printed in the specification. It shares no code with ``rose_ds``.
"""

from __future__ import annotations

import math

import torch


def reference_eligible(name: str) -> bool:
    """The original rule: 'layer' and 'weight' are substrings of the name."""
    return "layer" in name and "weight" in name


def reference_losses(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_task, L_rob): averaged CE of both passes; symmetric KL summed over the batch, divided by 4."""
    p1, p2 = torch.softmax(z1, -1), torch.softmax(z2, -1)
    lp1, lp2 = torch.log_softmax(z1, -1), torch.log_softmax(z2, -1)
    kl_2_1 = (p2 * (lp2 - lp1)).sum()
    kl_1_2 = (p1 * (lp1 - lp2)).sum()
    l_rob = (kl_2_1 + kl_1_2) / 4
    ce1 = -lp1.gather(1, labels[:, None]).mean()
    ce2 = -lp2.gather(1, labels[:, None]).mean()
    return 0.5 * ce1 + 0.5 * ce2, l_rob


def reference_token_losses(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM, from whole ``[batch, length, vocab]`` logits: position t predicts token t + 1, tokens
    labelled -100 are skipped; the classification formulas with a supervised token as the example."""
    y = labels[:, 1:]
    keep = y != -100
    return reference_losses(z1[:, :-1][keep].float(), z2[:, :-1][keep].float(), y[keep])


def _symmetric_kl_sum(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    pa, pb = torch.softmax(za, -1), torch.softmax(zb, -1)
    la, lb = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
    return (pa * (la - lb)).sum() + (pb * (lb - la)).sum()


def reference_rdrop(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """R-Drop: (KL(P1||P2) + KL(P2||P1)) / 2, summed over the batch."""
    return _symmetric_kl_sum(z1, z2) / 2


def reference_r3f(z: torch.Tensor, z_noisy: torch.Tensor) -> torch.Tensor:
    """R3F: KL(P||Pn) + KL(Pn||P), averaged over the batch."""
    return _symmetric_kl_sum(z, z_noisy) / z.shape[0]


class ReferenceRose:
    """ROSE's masked AdamW over named parameters in groups ``[(names, lr, weight_decay)]``."""

    def __init__(
        self,
        model,
        groups,
        *,
        mode,
        upper,
        lower=0.0,
        gamma=0.5,
        coef=0.1,
        warmup=0,
        betas=(0.9, 0.98),
        eps=1e-6,
        eligible=reference_eligible,
        granularity="tensor",
        scope="global",
        unit_of=None,
    ):
        self.params = dict(model.named_parameters())
        self.groups = groups
        self.mode, self.upper, self.lower, self.gamma, self.coef, self.warmup = mode, upper, lower, gamma, coef, warmup
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.eligible = [n for names, _, _ in groups for n in names if eligible(n)]
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.t = 0
        self.last_mask: dict[str, float] = {}
        self.granularity, self.scope = granularity, scope
        # tensor granularity: tensors of one unit (a LoRA module's A and B) are scored as one tensor, the
        # concatenation of their elements, and share the unit's mask value
        self.unit_of = unit_of or (lambda name: name)

    def _unit_band(self, score) -> dict[str, float]:
        """``score(norm of the unit's concatenated tensors ...)`` per unit; the band over the units; each
        tensor gets its unit's mask value."""
        units: dict[str, list[str]] = {}
        for n in self.eligible:
            units.setdefault(self.unit_of(n), []).append(n)
        scores = {u: score(members) for u, members in units.items()}
        vec = torch.tensor(list(scores.values()), dtype=torch.float64)
        lo, hi = torch.quantile(vec, torch.tensor([self.lower / 100, self.upper / 100], dtype=torch.float64))
        kept = {u: 1.0 if (lo <= s <= hi and math.isfinite(s)) else 0.0 for u, s in scores.items()}
        return {n: kept[self.unit_of(n)] for n in self.eligible}

    def _norm(self, tensors: dict[str, torch.Tensor], members: list[str]) -> float:
        return torch.cat([tensors[n].double().reshape(-1) for n in members]).norm().item()

    def _element_band(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element granularity: the torch.quantile band of the float32 scores in scope, as 0/1 floats."""
        qs = torch.tensor([self.lower / 100, self.upper / 100])
        if self.scope == "global":
            lo, hi = torch.quantile(torch.cat([scores[n].reshape(-1) for n in self.eligible]), qs)
            bands = {n: (lo, hi) for n in self.eligible}
        else:
            bands = {n: tuple(torch.quantile(scores[n].reshape(-1), qs)) for n in self.eligible}
        return {n: ((scores[n] >= bands[n][0]) & (scores[n] <= bands[n][1]) & scores[n].isfinite()).float()
                for n in self.eligible}  # fmt: skip

    def _element_coefficients(self, robust_grads, t):
        ones = {n: torch.ones_like(self.params[n]) for n in self.eligible}
        m1 = m2 = ones
        if self.mode in ("first", "ensemble"):
            m1 = self._element_band({n: robust_grads[n].float().abs() for n in self.eligible})
        if self.mode in ("second", "ensemble") and t > 1:
            r2 = {}
            for n in self.eligible:
                g, m = self.params[n].grad.float(), self.m[n].float()
                r2[n] = torch.where(m == 0, torch.inf, (self.coef * g / m - 1).abs())
            m2 = self._element_band(r2)
        if self.mode == "first":
            return m1
        if self.mode == "second":
            return m2
        return {n: (1 - self.gamma) * m2[n] + self.gamma * m1[n] for n in self.eligible}

    @torch.no_grad()
    def step(self, robust_grads: dict[str, torch.Tensor] | None) -> None:
        self.t += 1
        t = self.t
        ones = {n: 1.0 for n in self.eligible}
        if self.granularity == "element" and not (self.mode == "none" or t <= self.warmup):
            c = self._element_coefficients(robust_grads, t)
            self.last_mask = {n: float(c[n].sum(dtype=torch.float64) / c[n].numel()) for n in self.eligible}
        elif self.mode == "none" or t <= self.warmup:
            c = ones
        else:
            m1 = m2 = ones
            if self.mode in ("first", "ensemble"):
                m1 = self._unit_band(lambda members: self._norm(robust_grads, members))
            if self.mode in ("second", "ensemble") and t > 1:
                grads = {n: self.params[n].grad for n in self.eligible}

                def r2(members):
                    g, m = self._norm(grads, members), self._norm(self.m, members)
                    return math.inf if m == 0 else abs(self.coef * g / m - 1)

                m2 = self._unit_band(r2)
            if self.mode == "first":
                c = m1
            elif self.mode == "second":
                c = m2
            else:
                c = {n: (1 - self.gamma) * m2[n] + self.gamma * m1[n] for n in self.eligible}
        if not isinstance(next(iter(c.values()), 1.0), torch.Tensor):
            self.last_mask = dict(c)

        b1, b2 = self.beta1, self.beta2
        for names, lr, wd in self.groups:
            for n in names:
                p = self.params[n]
                if p.grad is None:
                    continue
                cn = c.get(n, 1.0)
                g = p.grad
                g_ = cn * g + (1 - cn) * self.m[n]
                self.m[n] = b1 * self.m[n] + (1 - b1) * g_
                self.v[n] = b2 * self.v[n] + (1 - b2) * g_ * g_
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.sub_(step_size * (cn * self.m[n]) / (self.v[n].sqrt() + self.eps))
                p.sub_(lr * wd * cn * p)
