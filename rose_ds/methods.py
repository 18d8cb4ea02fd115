"""Robust fine-tuning methods that ROSE composes with: R-Drop, R3F and ChildTuning (pure functions).

Each is orthogonal to the ROSE mode (docs/algorithm.md, "Composing with other methods"):

* R-Drop (Liang et al., 2021) adds ``alpha * (KL(P1||P2) + KL(P2||P1)) / 2`` (summed over the batch,
  as the authors' code) between two dropout passes to the task loss. ROSE-First/Ensemble already
  run those two passes; R-Drop reuses them (no third forward).
* R3F (Aghajanyan et al., 2021) adds ``lambda * (KL(P||Pn) + KL(Pn||P))`` (mean over the batch)
  between the clean pass and a pass whose input embeddings carry uniform or normal noise of scale
  ``eps``. The noisy pass is stacked with the clean pass(es) in one forward.
* ChildTuning-F (Xu et al., 2021) multiplies every gradient element by ``Bernoulli(p) / p``, a fresh
  mask each optimizer step, before the optimizer (and ROSE's scoring) sees it. The mask of an element
  is a hash of (seed, step, tensor name, element index), so every ZeRO shard draws, for its own
  elements, exactly the mask a single process draws: no communication, no full-size generator state.
* ChildTuning-D (Xu et al., 2021) keeps, for the whole run, the eligible elements whose Fisher
  information (squared task-loss gradients summed over a first pass over the training data) is in
  the top ``p`` fraction, and zeroes the other gradient elements (no rescale). The threshold is the
  ``torch.quantile`` of all elements' Fisher values, taken over shards by :mod:`rose_ds.radix`.

These functions touch no DeepSpeed internals: the losses run through any model or engine, and the
gradient mask works on any view of a tensor's elements given where the view starts.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rose_ds import radix
from rose_ds.losses import RoseLosses, robust_loss, rose_losses, stack_batch, symmetric_kl_sum, task_loss

METHODS = ("none", "rdrop", "r3f", "childtuning-f", "childtuning-d")
NOISES = ("uniform", "normal")
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements hashed at a time (a 32 MiB int64 temporary)


class MethodConfigError(ValueError):
    """An invalid method configuration value (the message is one line naming the field)."""


@dataclass
class MethodConfig:
    """Which robust fine-tuning method runs beside ROSE, and its knobs.

    Attributes:
        name: ``"none"``, ``"rdrop"``, ``"r3f"``, ``"childtuning-f"`` or ``"childtuning-d"``.
        rdrop_alpha: R-Drop's KL weight (> 0). Published: 1.0 for GLUE-style classification
            (the authors searched 0.1-1.0 per task).
        r3f_lambda: R3F's KL weight (> 0). Published default: 1.0.
        r3f_eps: R3F's noise scale (> 0). Published default: 1e-5.
        r3f_noise: ``"uniform"`` (U(-eps, eps), the published default) or ``"normal"`` (N(0, eps^2)).
        childtuning_p: ChildTuning's kept fraction of gradient elements, in (0, 1] (F: per step, of
            all elements; D: once, of the eligible elements, by Fisher information). The authors
            searched p in {0.1, ..., 0.4}; 0.3 here.
        childtuning_fisher_batches: ChildTuning-D: batches of the Fisher pass; 0 (published): one
            pass over the whole training set.
        seed: Seed of ChildTuning-F's masks (the fine-tuning program passes its ``--seed``).
    """

    name: str = "none"
    rdrop_alpha: float = 1.0
    r3f_lambda: float = 1.0
    r3f_eps: float = 1e-5
    r3f_noise: str = "uniform"
    childtuning_p: float = 0.3
    childtuning_fisher_batches: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            _fail("name", self.name, f"one of {', '.join(METHODS)}")
        for field in ("rdrop_alpha", "r3f_lambda", "r3f_eps"):
            value = getattr(self, field)
            if not _is_real(value) or not value > 0:
                _fail(field, value, "a finite number > 0")
        if self.r3f_noise not in NOISES:
            _fail("r3f_noise", self.r3f_noise, f"one of {', '.join(NOISES)}")
        if not _is_real(self.childtuning_p) or not 0 < self.childtuning_p <= 1:
            _fail("childtuning_p", self.childtuning_p, "a fraction in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an integer")
        batches = self.childtuning_fisher_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            _fail("childtuning_fisher_batches", batches, "an integer >= 0 (0: the whole training set)")

    @property
    def masks_gradients(self) -> bool:
        """Whether the optimizer draws a gradient mask each step (ChildTuning-F)."""
        return self.name == "childtuning-f"

    @property
    def fixed_mask(self) -> bool:
        """Whether the optimizer keeps a fixed gradient mask from a Fisher pass (ChildTuning-D)."""
        return self.name == "childtuning-d"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable), for checkpoints and logs."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- losses
def rdrop_kl(z1: Tensor, z2: Tensor) -> Tensor:
    """R-Drop's term: ``(KL(P1||P2) + KL(P2||P1)) / 2`` summed over the batch (the authors' code); for a
    one-output regression head, the mean squared difference of the two outputs."""
    if z1.shape[-1] == 1:
        return F.mse_loss(z1.float(), z2.float())
    return symmetric_kl_sum(z1, z2) / 2


def r3f_kl(z: Tensor, z_noisy: Tensor) -> Tensor:
    """R3F's term: ``KL(P||Pn) + KL(Pn||P)`` averaged over the batch (fairseq's ``_get_symm_kl``); for a
    one-output regression head, the mean squared difference."""
    if z.shape[-1] == 1:
        return F.mse_loss(z.float(), z_noisy.float())
    return symmetric_kl_sum(z, z_noisy) / z.shape[0]


def r3f_noise(embeddings: Tensor, method: MethodConfig) -> Tensor:
    """R3F's noise for input embeddings: ``U(-eps, eps)`` or ``N(0, eps^2)`` (``r3f_noise``), drawn
    from the global random stream."""
    if method.r3f_noise == "uniform":
        return torch.empty_like(embeddings).uniform_(-method.r3f_eps, method.r3f_eps)
    return torch.empty_like(embeddings).normal_(0.0, method.r3f_eps)


def method_losses(
    model: Any, inputs: Mapping[str, Tensor], labels: Tensor, method: MethodConfig, *, robust: bool
) -> RoseLosses:
    """ROSE's losses with the method's term added to the task loss.

    Args:
        model: A model (or DeepSpeed engine) whose output has ``.logits``, in training mode.
        inputs: Model keyword inputs (no labels); R3F needs ``input_ids`` and a model with
            ``get_input_embeddings()`` that accepts ``inputs_embeds``.
        labels: Targets.
        method: The method.
        robust: Whether ROSE scores with the robust loss this step (ROSE-First/Ensemble): then two
            clean dropout passes run and ``robust`` is returned; otherwise it is ``None``.

    Returns:
        ``RoseLosses``: ``task`` is the mean task loss of the clean passes plus the method's term;
        ``robust`` ROSE's ``L_rob`` (or ``None``); ``logits1``/``logits2`` the clean passes.
    """
    clean = 2 if (robust or method.name == "rdrop") else 1
    if method.name != "r3f":
        losses = rose_losses(model, inputs, labels, two_passes=clean == 2)
        if method.name == "rdrop":
            losses = losses._replace(task=losses.task + method.rdrop_alpha * rdrop_kl(losses.logits1, losses.logits2))
        return losses if robust else losses._replace(robust=None)
    if "input_ids" not in inputs:
        raise ValueError("R3F perturbs input embeddings: the inputs need 'input_ids'")
    if clean == 2 and not getattr(model, "training", True):
        raise ValueError("method_losses: the model is in eval mode; call model.train() so the dropout passes differ")
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    n = labels.shape[0]
    embeddings = module.get_input_embeddings()(inputs["input_ids"])
    noise = r3f_noise(embeddings, method)
    stacked = {k: stack_batch(v, n, clean + 1) for k, v in inputs.items() if k != "input_ids"}
    stacked["inputs_embeds"] = torch.cat([embeddings] * clean + [embeddings + noise])
    z = model(**stacked).logits
    passes = [z[i * n : (i + 1) * n] for i in range(clean + 1)]
    task = sum(task_loss(p, labels) for p in passes[:clean]) / clean
    task = task + method.r3f_lambda * r3f_kl(passes[0], passes[-1])
    return RoseLosses(task, robust_loss(passes[0], passes[1]) if robust else None, passes[0],
                      passes[1] if clean == 2 else None)  # fmt: skip


def unsupported(method: MethodConfig, model: Any) -> str | None:
    """Why ``method`` cannot run on ``model`` (one line naming the fix), or ``None`` when it can. R3F
    feeds noisy input embeddings, so the model's ``forward`` must take ``inputs_embeds``."""
    if method.name == "r3f" and "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return (f"--method r3f perturbs input embeddings, but {type(model).__name__} takes no inputs_embeds; "
                "use another --method or model")  # fmt: skip
    return None


def loss_fn(method: MethodConfig):
    """A ``loss_fn`` for :func:`rose_ds.train_step`: ``(model, inputs, labels, two_passes) -> RoseLosses``,
    where ``two_passes`` (set by ``train_step``) says whether ROSE needs the robust loss."""
    if method.name in ("none", "childtuning-f", "childtuning-d"):
        return rose_losses

    def losses(model, inputs, labels, two_passes: bool = True) -> RoseLosses:
        return method_losses(model, inputs, labels, method, robust=two_passes)

    return losses


# ----------------------------------------------------------------------------------- ChildTuning-F
def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2^32; products stay
    below 2^63, so no step overflows on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _M32], dtype=torch.int64))[0])


def tensor_key(name: str, seed: int, step: int) -> int:
    """The 32-bit key of one tensor's mask at one step: from its name (not its position), so the dense
    optimizer and every ZeRO layout agree."""
    return _mix32_int(zlib.crc32(name.encode()) ^ _mix32_int(seed ^ _mix32_int(step)))


def childtuning_f_keep(key: int, offset: int, numel: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean keep-mask of elements ``offset .. offset + numel - 1`` (in the tensor's flattened order) of
    the tensor whose :func:`tensor_key` is ``key``: each element kept with probability ``p``."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = _mix32((index & _M32) ^ key)
    h = _mix32(h ^ (index >> 32))  # tensors beyond 2^32 elements
    return h < math.floor(p * 2**32)


def childtuning_f_(grad: Tensor, key: int, offset: int, p: float) -> Tensor:
    """``grad *= Bernoulli(p) / p`` in place, for a flat (1-D) view of a tensor's elements starting at
    element ``offset``; hashed in chunks so the temporary stays small. Returns ``grad``."""
    if p >= 1.0:
        return grad
    scale = 1.0 / p
    for start in range(0, grad.numel(), _CHUNK):
        part = grad.narrow(0, start, min(_CHUNK, grad.numel() - start))
        keep = childtuning_f_keep(key, offset + start, part.numel(), p, part.device)
        part.mul_(keep.to(part.dtype) * scale)
    return grad


# ----------------------------------------------------------------------------------- ChildTuning-D
def childtuning_d_masks(
    fisher: Sequence[Tensor], p: float, all_reduce: radix.AllReduce = radix._identity
) -> tuple[list[Tensor], float]:
    """ChildTuning-D's masks: an element is kept when its Fisher information is at least the ``1 - p``
    quantile (``torch.quantile``'s linear rule) of all elements' values, over every shard when
    ``all_reduce`` sums over the ranks (each rank passes its own pieces). Returns (boolean masks shaped
    as the pieces, the threshold)."""
    if p >= 1.0:
        return [torch.ones_like(f, dtype=torch.bool) for f in fisher], 0.0
    pieces = [f.detach().to(torch.float32) for f in fisher]
    threshold = float(radix.quantiles(pieces, [1.0 - p], all_reduce, nonnegative=True)[0])
    return [f >= threshold for f in pieces], threshold


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise MethodConfigError(f"MethodConfig.{field}={value!r} is invalid: expected {allowed}")


__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodConfigError",
    "childtuning_d_masks",
    "childtuning_f_",
    "childtuning_f_keep",
    "loss_fn",
    "method_losses",
    "r3f_kl",
    "rdrop_kl",
    "tensor_key",
    "unsupported",
]
