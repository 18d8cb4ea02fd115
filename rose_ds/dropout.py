"""The dropout of ROSE's two passes, on any architecture, and the stop for passes that came out equal.

ROSE-First scores each tensor by the gradient of the symmetric KL between two dropout passes. A
model without active dropout (Llama, Qwen2 and Mistral configs ship with 0) makes the passes
identical: the KL is exactly 0, its gradient is zero and the selection would be arbitrary. Nothing
else would say so, hence :func:`check_passes_differ`.

Where dropout acts after :func:`set_dropout` (Hugging Face Transformers 5):

- BERT / RoBERTa: every ``torch.nn.Dropout``: after the embeddings, on the attention probabilities
  (the SDPA and eager kernels read ``self.dropout.p``), after the attention output and MLP
  projections, and before the classifier.
- GPT-2: every ``torch.nn.Dropout``: after the embeddings (``drop``), on the attention probabilities
  (``attn_dropout.p``, read by every attention kernel), after the attention projection
  (``resid_dropout``) and the MLP (``mlp.dropout``).
- Llama, Qwen2, Mistral (no ``nn.Dropout`` module at all): the attention probabilities only, through
  the float ``attention_dropout`` that each attention module copies from its config at construction
  and passes to its attention kernel in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_NO_DROPOUT_FIX = (
    "set a dropout: --rose_dropout 0.1 (launch/finetune.py), or rose_ds.set_dropout(model, 0.1) before "
    "rose_ds.initialize / RoseTrainer"
)


class IdenticalPassesError(ValueError):
    """ROSE's two dropout passes gave the same outputs (robust loss exactly 0)."""


@dataclass(frozen=True)
class DropoutSites:
    """What :func:`set_dropout` set: ``torch.nn.Dropout`` modules, and modules' ``attention_dropout``."""

    modules: int
    attention: int

    @property
    def total(self) -> int:
        """All the sites."""
        return self.modules + self.attention


def set_dropout(model: torch.nn.Module, p: float) -> DropoutSites:
    """Sets the probability of every dropout of ``model`` to ``p`` (in place; the config is left as
    it is, so an exported model keeps its own values).

    Two mechanisms cover the supported architectures (module docstring): the ``p`` of every
    ``torch.nn.Dropout`` module, and the float ``attention_dropout`` attribute of attention modules
    that keep their attention-probability dropout as a number (Llama and its kin).

    Args:
        model: A module (a Hugging Face model, or one wrapped by DeepSpeed or PEFT).
        p: The probability, ``0 <= p < 1``.

    Returns:
        How many sites were set.

    Raises:
        ValueError: ``p`` out of range, or ``p > 0`` and the model has no dropout site.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p}: must be in [0, 1)")
    modules = attention = 0
    for module, kind in _sites(model):
        if kind == "module":
            module.p = p
            modules += 1
        else:
            module.attention_dropout = p
            attention += 1
    sites = DropoutSites(modules, attention)
    if p > 0 and sites.total == 0:
        raise ValueError(
            f"{type(model).__name__} has no dropout module nor attention_dropout attribute to set; ROSE's two "
            "passes need a source of randomness (see rose_ds.dropout)"
        )
    return sites


# Robust loss per example (or supervised token) at or below which two passes count as identical.
# Identical passes give exactly 0 in bf16, and up to 1.4e-16 in fp32 (the second pass's rows are
# rounded apart by the matrix kernels); a dropout of 0.01 gives 4e-7 and more on tiny BERT, Llama,
# Qwen2 and GPT-2 models, larger models more.
IDENTICAL_PER_ROW = 1e-12


def _sites(model: torch.nn.Module):
    """``(module, kind)`` of every dropout site: ``"module"`` (an ``nn.Dropout``) or ``"attention"``."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            yield module, "module"
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # a config may hold an int 0
            yield module, "attention"


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a dropout site of ``model`` draws in its current mode (training, ``p > 0``)."""
    return any(m.training and (m.p if kind == "module" else m.attention_dropout) > 0 for m, kind in _sites(model))


def check_passes_differ(losses: Any, model: torch.nn.Module | None = None) -> bool:
    """Stops a step whose two passes were identical: a robust loss zero up to rounding, from a model
    without an active dropout site.

    Call where the robust gradient is about to be taken (ROSE-First and the ensemble) until it
    returns True once: :func:`rose_ds.backward` and :class:`~rose_ds.hf.RoseTrainer` do, on the
    first micro-batches of a process. With ``model``, a zero loss from a model whose dropout is
    active passes: a run whose weights blew up saturates both passes' softmax to the same one-hot
    distributions, whose KL is 0 although the passes differ (``launch/finetune.py``'s NaN stop is
    for that).

    Args:
        losses: :class:`~rose_ds.RoseLosses` or :class:`~rose_ds.TokenLosses`.
        model: The model (or DeepSpeed engine) that made them.

    Returns:
        True: the passes differ. False: nothing to judge by (no robust loss, or a causal-LM
        micro-batch without a supervised token, whose zero is real).

    Raises:
        IdenticalPassesError: one line naming the cause and the fix.
    """
    if losses.robust is None or getattr(losses, "tokens", None) == 0:
        return False
    rows = losses.tokens if hasattr(losses, "tokens") else losses.logits1.shape[0]
    if losses.robust.detach().abs().item() > IDENTICAL_PER_ROW * rows:
        return True
    if model is not None and has_active_dropout(model):
        return True
    raise IdenticalPassesError(
        "ROSE's two dropout passes were identical (robust loss 0), so the robust gradient is zero and "
        f"ROSE-First's selection meaningless: the model has no active dropout; {_NO_DROPOUT_FIX}"
    )


__all__ = [
    "IDENTICAL_PER_ROW",
    "DropoutSites",
    "IdenticalPassesError",
    "check_passes_differ",
    "has_active_dropout",
    "set_dropout",
]
