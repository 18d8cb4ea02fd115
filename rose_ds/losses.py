"""ROSE's two losses from two dropout passes (spec section 2).

``L_task`` trains the model; ``L_rob`` only scores tensors (its gradient is never applied)::

    L_rob  = (sum over batch and classes of KL(P2 || P1) + KL(P1 || P2)) / 4
    L_task = 0.5 * CE(z1, y) + 0.5 * CE(z2, y)

For a regression head (one output) the task loss is the averaged MSE and ``L_rob`` is the MSE
between the two outputs.

For a causal LM the same two losses are taken per supervised token (:func:`token_losses`): ``L_task``
is the mean next-token cross-entropy of the two passes over the tokens whose label is not -100, and
``L_rob`` the symmetric KL between the two passes' next-token distributions summed over those tokens,
divided by 4 (a token plays the part of a classification example, the vocabulary that of the classes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Label of a position the loss skips (prompt and padding tokens), as in Hugging Face and PyTorch.
IGNORE_INDEX = -100


class RoseLosses(NamedTuple):
    """The task loss to train on, the robust loss to score with, and both passes' logits."""

    task: Tensor
    robust: Tensor | None
    logits1: Tensor
    logits2: Tensor | None


def robust_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric KL between two passes' class distributions, summed over the batch, divided by 4.

    For one output column (a regression head) it is the mean squared difference instead.
    """
    if z1.shape[-1] == 1:
        return F.mse_loss(z1.float(), z2.float())
    return symmetric_kl_sum(z1, z2) / 4


def symmetric_kl_sum(za: Tensor, zb: Tensor) -> Tensor:
    """``KL(Pb || Pa) + KL(Pa || Pb)`` of two logit tensors' class distributions, summed over the batch
    (in float32). ROSE's robust loss, R-Drop's and R3F's terms are multiples of it."""
    return _symmetric_kl_of_log_probs(F.log_softmax(za.float(), dim=-1), F.log_softmax(zb.float(), dim=-1))


def _symmetric_kl_of_log_probs(la: Tensor, lb: Tensor) -> Tensor:
    """``KL(Pb || Pa) + KL(Pa || Pb)`` summed over the rows, from the two log-probability tensors."""
    # kl_div(input=log P_a, target=log P_b, log_target) = sum P_b (log P_b - log P_a) = KL(P_b || P_a)
    return F.kl_div(la, lb, reduction="sum", log_target=True) + F.kl_div(lb, la, reduction="sum", log_target=True)


def task_loss(z: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy for class logits, mean squared error for a one-output regression head."""
    if z.shape[-1] == 1:
        return F.mse_loss(z.float().squeeze(-1), labels.float())
    return F.cross_entropy(z.float(), labels)


def rose_losses(model: Any, inputs: Mapping[str, Tensor], labels: Tensor, *, two_passes: bool = True) -> RoseLosses:
    """Runs one or two dropout passes of the model and returns ROSE's losses.

    Args:
        model: Any callable whose output has ``.logits`` (a Hugging Face model, or a DeepSpeed
            engine wrapping one); it must be in training mode so the two passes differ.
        inputs: Keyword inputs of the model (without ``labels``).
        labels: Class indices, or float targets for a one-output regression head.
        two_passes: ``False`` for modes that need no robust loss (``none``, ``second``): one
            pass, ``robust`` is ``None``, ``task`` is the plain loss. ``True``: the two dropout
            passes run as one forward over the batch stacked twice (tensor inputs whose first
            dimension is the batch size are stacked, others passed as they are); ``logits1`` is
            the first half of its output, ``logits2`` the second.

    Raises:
        ValueError: when the model is in eval mode with ``two_passes`` (dropout would be off, the
            passes identical and the robust gradient zero).
    """
    if not two_passes:
        z1 = model(**inputs).logits
        return RoseLosses(task_loss(z1, labels), None, z1, None)
    if not getattr(model, "training", True):
        raise ValueError("rose_losses: the model is in eval mode; call model.train() so the two dropout passes differ")
    # One forward over the batch stacked twice, not two forward calls: the backward of two calls
    # holds one pass's whole weight gradient in autograd's input buffers until the other pass
    # reaches each weight (one full-model fp32 gradient of extra peak memory, measured in
    # benchmarks/RESULTS.md), and at ZeRO-3 each call would gather every parameter again.
    n = labels.shape[0]
    z = model(**{k: stack_batch(v, n, 2) for k, v in inputs.items()}).logits
    z1, z2 = z[:n], z[n:]
    task = 0.5 * task_loss(z1, labels) + 0.5 * task_loss(z2, labels)
    return RoseLosses(task, robust_loss(z1, z2), z1, z2)


def stack_batch(value: Any, batch: int, times: int) -> Any:
    """The batch repeated ``times`` times along dim 0 (several passes in one forward); inputs without a
    leading batch dimension pass as they are."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value] * times)
    return value


class TokenLosses(NamedTuple):
    """A causal LM's task and robust losses over its supervised tokens.

    Attributes:
        task: Mean next-token cross-entropy over the supervised tokens (of the two passes, averaged).
        robust: ``sum over supervised tokens of KL(P2 || P1) + KL(P1 || P2)``, divided by 4; None for
            one pass.
        tokens: How many tokens were supervised.
        noise: With a noisy pass (R3F): ``sum over supervised tokens of KL(P1 || Pn) + KL(Pn || P1)``
            between the first clean pass and the noisy one; None otherwise.
    """

    task: Tensor
    robust: Tensor | None
    tokens: int
    noise: Tensor | None = None


def supervised_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where a causal LM is scored: the flat indices into ``[batch, length - 1]`` positions whose next
    token is supervised (label not -100), and those next tokens."""
    targets = labels[:, 1:].reshape(-1)
    where = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return where, targets[where]


def token_losses(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    *,
    two_passes: bool = True,
    chunk_tokens: int = 1024,
    noisy: bool = False,
) -> TokenLosses:
    """ROSE's two losses of a causal LM from its final hidden states, a chunk of tokens at a time.

    The logits of the supervised tokens are made by ``head`` ``chunk_tokens`` tokens at a time, in
    float32, and are recomputed in the backward pass (activation checkpointing per chunk): whatever
    the batch and sequence length, the losses hold a few fp32 ``[chunk_tokens, vocabulary]`` tensors
    at once (each pass's logits and log-probabilities, in the backward their gradients), instead of
    each pass's fp32 logits over every token of the batch.

    Args:
        hidden: ``[passes * batch, length, hidden]``: the model's last hidden states, the second pass's
            batch stacked after the first's (as :func:`rose_losses` runs the two passes).
        head: Maps hidden states to vocabulary logits (the model's output embedding).
        labels: ``[batch, length]`` token ids, ``-100`` where the loss skips a token (prompt, padding);
            position ``t`` predicts token ``t + 1``, as in Hugging Face's causal LMs.
        two_passes: False: ``hidden`` is one clean pass, ``robust`` is None.
        chunk_tokens: Tokens per chunk.
        noisy: ``hidden`` ends with one more pass, of noisy inputs (R3F): it is left out of the task
            loss, and ``noise`` is its symmetric KL to the first clean pass.

    Returns:
        The losses; a batch without a supervised token gives zero losses that still depend on the
        graph (so that every rank's backward runs the same collectives).

    Raises:
        ValueError: when the shapes of ``hidden`` and ``labels`` do not match, or ``chunk_tokens < 1``.
    """
    clean = 2 if two_passes else 1
    passes = clean + int(noisy)
    batch, length = labels.shape
    if hidden.dim() != 3 or hidden.shape[:2] != (passes * batch, length):
        raise ValueError(
            f"token_losses: hidden states of shape {tuple(hidden.shape)} do not hold {passes} pass(es) of "
            f"labels of shape {tuple(labels.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"token_losses: chunk_tokens must be >= 1, got {chunk_tokens}")
    where, targets = supervised_positions(labels)
    n = int(where.numel())
    if n == 0:  # zero, but through the graph: the backward still reaches every parameter
        zero = hidden.sum() * 0.0
        return TokenLosses(zero, zero if two_passes else None, 0, zero if noisy else None)
    # a view, indexed per chunk: gathering the supervised rows at once would copy the hidden states
    passes_view = hidden.unflatten(0, (passes, batch))
    sums = None
    for start in range(0, n, chunk_tokens):
        idx = where[start : start + chunk_tokens]
        h = passes_view[:, idx // (length - 1), idx % (length - 1)]
        y = targets[start : start + chunk_tokens]
        chunk = checkpoint(_chunk_losses, h, y, head, clean, noisy, use_reentrant=False)
        sums = chunk if sums is None else [None if a is None else a + b for a, b in zip(sums, chunk)]
    ce_sum, kl_sum, noise_sum = sums
    return TokenLosses(ce_sum / (clean * n), kl_sum / 4 if two_passes else None, n, noise_sum)


def causal_lm_losses(
    model: Any,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    two_passes: bool = True,
    chunk_tokens: int = 1024,
    noise: Callable[[Tensor], Tensor] | None = None,
) -> TokenLosses:
    """Runs one or two dropout passes of a causal LM and returns ROSE's token losses (:func:`token_losses`).

    The passes run as one forward over the batch stacked twice (as in :func:`rose_losses`), with the
    model's output embedding set aside so that the forward returns the last hidden states instead of
    the whole batch's logits; the output embedding then makes the logits a chunk of tokens at a time.

    Args:
        model: A Hugging Face causal LM whose forward applies its output embedding
            (``get_output_embeddings()``) last, to the last hidden states (Llama, Qwen2, Mistral,
            GPT-2 and their kin), or a DeepSpeed engine wrapping one; in training mode with two passes.
        inputs: Keyword inputs of the model (without ``labels``).
        labels: ``[batch, length]``: the input ids with ``-100`` where the loss skips a token.
        two_passes: As in :func:`rose_losses`.
        chunk_tokens: Tokens whose logits are made at once.
        noise: R3F: maps the input embeddings to a noise tensor; one more pass, of the embeddings plus
            the noise, runs in the same forward, and ``noise`` of the result is its KL term.

    Raises:
        ValueError: as :func:`rose_losses` for a model in eval mode, or when the model has no output
            embedding.
    """
    if two_passes and not getattr(model, "training", True):
        raise ValueError(
            "causal_lm_losses: the model is in eval mode; call model.train() so the two dropout passes differ"
        )
    n, clean = labels.shape[0], 2 if two_passes else 1
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if noise is not None:
        embeddings = module.get_input_embeddings()(inputs["input_ids"])
        stacked = {k: stack_batch(v, n, clean + 1) for k, v in inputs.items() if k != "input_ids"}
        stacked["inputs_embeds"] = torch.cat([embeddings] * clean + [embeddings + noise(embeddings)])
        inputs = stacked
    elif two_passes:
        inputs = {k: stack_batch(v, n, 2) for k, v in inputs.items()}
    with _hidden_states_out(module) as head:
        hidden = model(**inputs, use_cache=False).logits
    return token_losses(hidden, _projection(head, hidden), labels, two_passes=two_passes, chunk_tokens=chunk_tokens,
                        noisy=noise is not None)  # fmt: skip


def _projection(head: torch.nn.Module, hidden: Tensor) -> Callable[[Tensor], Tensor]:
    """The output embedding as the chunks apply it: the module itself when a parameter of it trains. A
    frozen one (a LoRA model's, partial fine-tuning) becomes a linear map of detached copies of its
    weight and bias, taken while its own forward runs on no token: a partitioned head (ZeRO-3) is whole
    only then, and no backward hook makes frozen weights whole again for the chunks' recomputation in
    the backward, which then needs nothing of the module."""
    if any(p.requires_grad for p in head.parameters()) or not isinstance(head, torch.nn.Linear):
        return head
    copies: dict[str, Tensor | None] = {}

    def take(module: torch.nn.Linear, _args) -> None:
        copies["weight"] = module.weight.detach().clone()
        copies["bias"] = None if module.bias is None else module.bias.detach().clone()

    handle = head.register_forward_pre_hook(take)  # after the hooks that make it whole
    try:
        with torch.no_grad():
            head(hidden[:0])
    finally:
        handle.remove()
    return functools.partial(F.linear, weight=copies["weight"], bias=copies["bias"])


@contextmanager
def _hidden_states_out(model: Any) -> Iterator[torch.nn.Module]:
    """Within the block the model's output embedding is the identity; yields the real one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"causal_lm_losses: {type(model).__name__} has no output embedding (get_output_embeddings())")
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def _chunk_losses(
    h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor], clean: int, noisy: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Of one chunk of tokens: the cross-entropy summed over the clean passes, the two clean passes'
    summed symmetric KL, and the first clean pass's to the noisy one (the last, when ``noisy``)."""
    logp = [F.log_softmax(head(h[p]).float(), dim=-1) for p in range(h.shape[0])]
    ce = sum(F.nll_loss(lp, y, reduction="sum") for lp in logp[:clean])
    kl = _symmetric_kl_of_log_probs(logp[0], logp[1]) if clean == 2 else None
    return ce, kl, _symmetric_kl_of_log_probs(logp[0], logp[-1]) if noisy else None


__all__ = [
    "IGNORE_INDEX",
    "RoseLosses",
    "TokenLosses",
    "causal_lm_losses",
    "robust_loss",
    "rose_losses",
    "supervised_positions",
    "task_loss",
    "token_losses",
]
