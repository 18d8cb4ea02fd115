"""ROSE for Hugging Face Trainer users: :class:`RoseTrainer`, a ``transformers.Trainer`` subclass.

It overrides what ROSE changes and nothing else: the optimizer (RoseAdamW with the Trainer's
hyper-parameters) and the training step (two dropout passes, the robust backward that scores
tensors, the task backward), plus an optional composed method (``method=MethodConfig(...)``:
R-Drop, R3F, ChildTuning-F/D, as ``--method`` of ``launch/finetune.py``). Data, scheduling,
evaluation, logging, checkpoints and every ``TrainingArguments`` flag stay the Trainer's own.
With ``--deepspeed`` it runs at ZeRO 0-3 through the same glue as ``launch/finetune.py``
(:mod:`rose_ds.zero`); without it, on one process.

    trainer = RoseTrainer(model_init=..., args=TrainingArguments(..., deepspeed="ds_configs/zero2.json"),
                          train_dataset=..., rose=RoseConfig(mode="ensemble", upper=40))
    trainer.train()

``launch/hf_trainer.py`` is a complete example (README: "ROSE in the Hugging Face Trainer").
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from deepspeed.accelerator import get_accelerator
from torch import Tensor
from transformers import Trainer, TrainerCallback

from rose_ds import methods as rose_methods
from rose_ds import zero
from rose_ds.config import RoseConfig
from rose_ds.dropout import check_passes_differ
from rose_ds.methods import MethodConfig
from rose_ds.optim import RoseAdamW
from rose_ds.selection import needs_robust_gradient

MASKS_FILE = "rose_masks.json"


class RoseTrainer(Trainer):
    """``transformers.Trainer`` that fine-tunes with ROSE.

    Takes every ``Trainer`` argument plus ``rose`` and ``method``. The optimizer is :class:`~rose_ds.RoseAdamW`
    built from ``learning_rate``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and
    ``weight_decay`` (decay on weights, none on biases and norms, as the Trainer groups them); the
    learning-rate schedule is the Trainer's. Under DeepSpeed the config must not define an
    ``optimizer`` (a ``scheduler`` is fine), and ROSE's exactness rules of :func:`rose_ds.initialize`
    apply. Without DeepSpeed only one process is supported: under DDP the robust gradient would not
    be reduced across ranks, so ranks could select differently.

    A ``method`` composes as in :func:`rose_ds.initialize`: R-Drop and R3F add their term to the task
    loss, ChildTuning-F/D mask the gradient in the optimizer. ChildTuning-D's Fisher pass runs over
    the Trainer's training dataloader (its first ``childtuning_fisher_batches`` batches, all when 0)
    before the first step; a resumed run takes the mask from the checkpoint's optimizer state, so
    resume on as many processes as saved it (DeepSpeed's own rule for Trainer checkpoints).

    Logs gain ``kept_fraction`` (mean mask value of the eligible tensors at the last step);
    :attr:`mask_history` holds every step's mask values (in :attr:`eligible_names` order) and is
    written to ``output_dir/rose_masks.json`` when training ends.

    Args:
        *args: ``Trainer`` positional arguments.
        rose: The ROSE configuration; ``RoseConfig()`` when omitted.
        method: The composed method; ``MethodConfig()`` (none) when omitted. Its ``seed`` (ChildTuning-F's
            masks) is taken as given: pass the run's seed.
        loss_fn: ``(model, inputs, labels, two_passes=...) -> losses``: ROSE's two losses. Default: the
            classification losses with ``method``'s term (:func:`rose_ds.methods.loss_fn`); for a causal
            LM :func:`rose_ds.causal_lm_losses` (the objective's ``loss_fn`` in ``rose_ds.training``),
            with ``labels`` the input ids with -100 where the loss skips a token.
        **kwargs: ``Trainer`` keyword arguments. ``optimizers`` must not carry an optimizer.

    Raises:
        rose_ds.UnsupportedConfigError: a DeepSpeed config ROSE cannot run exactly, several
            processes without DeepSpeed, or a method the model cannot run (one line, with the fix).
    """

    def __init__(
        self,
        *args: Any,
        rose: RoseConfig | None = None,
        method: MethodConfig | None = None,
        loss_fn: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.rose = rose if rose is not None else RoseConfig()
        self.method = method if method is not None else MethodConfig()
        self._loss_fn = loss_fn if loss_fn is not None else rose_methods.loss_fn(self.method)
        self._fisher_pending = self.method.fixed_mask
        self._passes_checked = False  # robust micro-batches are checked until two passes are seen to differ
        self.mask_history: list[list[float]] = []
        optimizers = kwargs.get("optimizers") or (None, None)
        if optimizers[0] is not None:
            raise zero.UnsupportedConfigError(
                "RoseTrainer builds RoseAdamW itself; pass no optimizer in optimizers=(optimizer, scheduler)"
            )
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            zero.prepare_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        elif self.args.world_size > 1:
            raise zero.UnsupportedConfigError(
                f"RoseTrainer on {self.args.world_size} processes needs DeepSpeed (ROSE needs the robust gradient "
                "reduced across ranks); pass --deepspeed ds_configs/zero0.json or another config"
            )
        if why := rose_methods.unsupported(self.method, self.model):
            raise zero.UnsupportedConfigError(why)
        self.add_callback(_MaskRecorder(self))

    @property
    def rose_optimizer(self) -> RoseAdamW | None:
        """The RoseAdamW (unwrapped from accelerate and DeepSpeed), once training has built it."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, RoseAdamW):
            opt = getattr(opt, "optimizer", None)  # AcceleratedOptimizer -> DeepSpeed's -> the client's
        return opt

    @property
    def eligible_names(self) -> list[str]:
        """Names of the tensors ROSE selects among, in :attr:`mask_history` order."""
        opt = self.rose_optimizer
        return [] if opt is None else opt.eligible_names

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """RoseAdamW over the model's trainable parameters, with the Trainer's hyper-parameters."""
        if self.optimizer is None:
            args = self.args
            groups = zero.decay_param_groups(self.model if model is None else model, args.weight_decay)
            betas = (args.adam_beta1, args.adam_beta2)
            self.optimizer = RoseAdamW(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                                       weight_decay=args.weight_decay, rose=self.rose, method=self.method)  # fmt: skip
            # bound to the engine's partitions at the first training step (zero.bind); until then
            # DeepSpeed's set-up calls of step() only create the state
            if self.is_deepspeed_enabled:
                self.optimizer.expect_provider()
        return self.optimizer

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch: ROSE's dropout passes, the robust backward (when the coming step scores
        with it) and the task backward; the Trainer steps at the accumulation boundary."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        two_passes = needs_robust_gradient(self.rose)
        accumulation = self.current_gradient_accumulation_steps
        if self.is_deepspeed_enabled:  # model is the DeepSpeed engine
            zero.bind(model)
        if self._fisher_pending:
            self._fisher_pending = False
            if self.state.global_step == 0:  # a resumed run has the mask in its optimizer state
                self._childtuning_d_fisher(model)
        if self.is_deepspeed_enabled:
            # accelerate sets DeepSpeed's accumulation boundary in its backward, which comes second;
            # the robust backward comes first and must see the same boundary
            model.set_gradient_accumulation_boundary(self.accelerator.sync_gradients)
            recompute = zero.make_recompute(self._loss_fn, model, inputs, labels, two_passes)
            with self.compute_loss_context_manager():
                losses = self._loss_fn(model, inputs, labels, two_passes=two_passes)
            # accelerator.backward: engine.backward (which divides by the accumulation) and, at the
            # boundary, engine.step(), which runs RoseAdamW
            losses = zero.backward(model, losses, recompute, task_backward=self.accelerator.backward)
        else:
            with self.compute_loss_context_manager():
                losses = self._loss_fn(model, inputs, labels, two_passes=two_passes)
            if losses.robust is not None and needs_robust_gradient(self.rose):
                self._passes_checked = self._passes_checked or check_passes_differ(losses, model)
                self.rose_optimizer.capture_robust_grads(losses.robust)  # sums over the micro-batches
            self.accelerator.backward(losses.task / accumulation)  # the Trainer leaves accelerate's at 1
        return losses.task.detach() / accumulation

    def _childtuning_d_fisher(self, model: torch.nn.Module) -> float:
        """ChildTuning-D's Fisher pass over the training dataloader (this process's batches in the first
        epoch's order), as ``launch/finetune.py`` runs it; fixes the optimizer's gradient mask."""
        loader = self.get_train_dataloader()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)
        seen = 0

        def batches():  # one at a time: the training set need not fit in device memory
            nonlocal seen
            for batch in itertools.islice(loader, self.method.childtuning_fisher_batches or None):
                batch = self._prepare_inputs(batch)
                seen += 1
                yield batch, batch.pop("labels")

        if self.is_deepspeed_enabled:
            threshold = zero.childtuning_d(model, batches(), self._loss_fn)
        else:
            threshold = _dense_fisher_masks(model, self.rose_optimizer, batches(), self._loss_fn)
        if self.is_world_process_zero():
            print(f"ChildTuning-D: Fisher information over {seen} batches; kept where >= {threshold:.3e}")
        return threshold

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with ``kept_fraction`` beside each training loss."""
        opt = self.rose_optimizer
        if "loss" in logs and opt is not None:
            logs = {**logs, "kept_fraction": opt.kept_fraction}
        super().log(logs, *args, **kwargs)


@torch.enable_grad()
def _dense_fisher_masks(
    model: torch.nn.Module,
    opt: RoseAdamW,
    batches: Iterable[tuple[dict[str, Tensor], Tensor]],
    loss_fn: Callable[..., Any],
) -> float:
    """One process: sums each batch's squared task-loss gradient of the eligible tensors (dropout off)
    and hands the sums to :meth:`RoseAdamW.set_childtuning_d_fisher`; leaves no gradient behind."""
    named = dict(model.named_parameters())
    params = [named[n] for n in opt.eligible_names]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()  # the Fisher information of the pre-trained weights, not of a random sub-network
    try:
        for inputs, labels in batches:
            loss = loss_fn(model, inputs, labels, two_passes=False).task
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.add_(g.float().square())
    finally:
        model.train(was_training)
    return opt.set_childtuning_d_fisher(fisher)


def join_cpu_processes() -> bool:
    """Starts DeepSpeed's process group over gloo where accelerate would not: on a machine without a
    GPU. Call before ``TrainingArguments`` are built, then build them with
    ``accelerator_config={"use_configured_state": True}``; returns whether it did (only on CPU).

    accelerate 1.x starts DeepSpeed only when it finds a GPU; on a CPU machine it counts one process
    and never joins the others, so the Trainer cannot run DeepSpeed there (tests, CI, laptops).
    """
    if get_accelerator().device_name() != "cpu":
        return False
    # the plain-python single process: the variables the deepspeed launcher would set
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    zero.set_single_process_port()
    # as launch/finetune.py: skip the JIT build (minutes) of a shared-memory op only inference uses
    zero.skip_shm_comm_build()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState, as TrainingArguments sets it
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return True


class _MaskRecorder(TrainerCallback):
    """Records the masks after every optimizer step; rank 0 writes them when training ends."""

    def __init__(self, trainer: RoseTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.trainer.rose_optimizer
        if opt is not None:
            self.trainer.mask_history.append([opt.last_mask.get(n, 1.0) for n in opt.eligible_names])

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            record = {"rose": self.trainer.rose.to_dict(), "method": self.trainer.method.to_dict(),
                      "eligible_tensors": self.trainer.eligible_names,
                      "mask_history": self.trainer.mask_history}  # fmt: skip
            (out / MASKS_FILE).write_text(json.dumps(record))


__all__ = ["MASKS_FILE", "RoseTrainer", "join_cpu_processes"]
