"""ROSE's two losses from two dropout passes (spec section 2).

``L_task`` trains the model; ``L_rob`` only scores tensors (its gradient is never applied)::

    L_rob  = (sum over batch and classes of KL(P2 || P1) + KL(P1 || P2)) / 4
    L_task = 0.5 * CE(z1, y) + 0.5 * CE(z2, y)

For a regression head (one output) the task loss is the averaged MSE and ``L_rob`` is the MSE
between the two outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
    la = F.log_softmax(za.float(), dim=-1)
    lb = F.log_softmax(zb.float(), dim=-1)
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


__all__ = ["RoseLosses", "robust_loss", "rose_losses", "task_loss"]
