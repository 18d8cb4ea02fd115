"""RoseAdamW on DeepSpeed: the only module that touches DeepSpeed internals.

What each ZeRO stage hands the client optimizer, and what this module does about it (see
``docs/zero.md`` for the full design note and the list of private attributes):

* Stage 0: the client sees whole tensors with already-averaged, clipped gradients (fp32), or fp32
  master copies of them (bf16/fp16 through ``FP16_UnfusedOptimizer``). Every rank holds the full
  reduced gradient, so every rank computes the same statistics with no communication; RoseAdamW
  steps its own tensors (fp32 master copies under bf16/fp16, re-keyed at binding).
* Stages 1-3: the client sees one flat fp32 partition per param group (stage 3: per sub-group)
  and is called once per partition. Each partition is cut into *segments*, the fragments of model
  tensors that this rank owns. Statistics are sums of squares over local segments, all-reduced over
  ZeRO's partition group in one call of ``3 x #eligible`` float64 values; every rank then derives
  the same mask. The update of all partitions is deferred to the last client call of the engine
  step (the mask needs every partition's clipped gradient), after which the fp32 -> model-dtype
  copy that DeepSpeed already made for the earlier partitions is redone.
* The step itself is RoseAdamW's (one step for every layout): :class:`ZeroBinding` is its segments
  provider and supplies only the segments, the all-reduce and the robust gradient.
* The robust-loss gradient is reduced by DeepSpeed itself: ``engine.backward(L_rob)`` runs before
  ``engine.backward(L_task)``, its reduced partition is read, and the stores DeepSpeed accumulates
  into are swapped (or, at stage 3, snapshotted) so the task gradient is never mixed with it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import weakref
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch

# Imported before any process group exists: its functions take ``group=group.WORLD`` as a default
# evaluated at import, and DeepSpeed imports it (through torch's distributed._shard) after the group is
# up, which would keep the group, and gloo's threads, alive until interpreter exit (see shutdown()).
import torch.distributed.nn.functional  # noqa: F401  isort: skip
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from rose_ds.config import RoseConfig
from rose_ds.dropout import check_passes_differ
from rose_ds.losses import RoseLosses, rose_losses
from rose_ds.methods import MethodConfig
from rose_ds.optim import RobustCapture, RoseAdamW, Segments, Shard, index_sum_of_squares
from rose_ds.selection import masking_active, needs_robust_gradient

# What a ZeRO step tells a user who forgot the robust gradient.
CAPTURE_HINT = "use rose_ds.train_step(engine, ...) or rose_ds.backward(engine, losses) before engine.step()"


class UnsupportedConfigError(ValueError):
    """A DeepSpeed configuration under which ROSE cannot select exactly (one line, with the fix)."""


# The DeepSpeed releases whose internals this module was read against and tested with (setup.cfg pins
# the same range): [first tested, first untested).
TESTED_DEEPSPEED = ("0.19.8", "0.20")
# DeepSpeed's shared-memory all-reduce op, used only by inference all-reduce, JIT-compiled on the CPU
# by init_distributed (2-4 minutes on a fresh machine) unless marked incompatible.
SHM_COMM_OP = "deepspeed_shm_comm"


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuses a DeepSpeed outside :data:`TESTED_DEEPSPEED` (the installed one by default): a change in
    its gradient stores would not fail loudly, it would select from the wrong numbers.

    Raises:
        UnsupportedConfigError: one line naming the installed version and the tested range.
    """
    from packaging.version import Version

    version = deepspeed.__version__ if version is None else version
    low, high = TESTED_DEEPSPEED
    if not Version(low) <= Version(Version(version).base_version) < Version(high):
        raise UnsupportedConfigError(
            f"deepspeed {version} is installed, but rose_ds relies on DeepSpeed internals tested with "
            f"deepspeed>={low},<{high}; install that range: pip install 'deepspeed>={low},<{high}'"
        )


def set_single_process_port() -> None:
    """Sets ``MASTER_PORT`` to a free local port where it is unset, for a single process's rendezvous: two
    single-process runs on one machine must not both take DeepSpeed's default 29500."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def skip_shm_comm_build() -> bool:
    """Marks DeepSpeed's inference-only shared-memory op as not to be built (training never uses it);
    call before ``deepspeed.init_distributed`` on a CPU. Returns whether the op was found: a DeepSpeed
    that renamed it would build it (slowly, but nothing goes wrong)."""
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(ops, dict) or SHM_COMM_OP not in ops:
        return False
    ops[SHM_COMM_OP] = False
    return True


# Engines bound to a RoseAdamW, destroyed by shutdown(): ZeRO's gradient hooks live in autograd's C++
# nodes and hold the engine in a cycle the garbage collector cannot see, until ``engine.destroy()``.
_BOUND_ENGINES: weakref.WeakSet = weakref.WeakSet()


def shutdown() -> None:
    """Leaves the process group so that the process exits cleanly; every rank calls it after a run that
    went well, once the run's engines, models and Trainers are no longer referenced (for instance after
    the function that built them has returned). Not for an error, where other ranks may still be in a
    collective.

    A process that exits while its process group lives aborts now and then at interpreter shutdown
    (``terminate called without an active exception``): a gloo worker thread that drops the last
    reference to a tensor needs the GIL, which a finalizing interpreter no longer gives. The group lives
    as long as anything refers to it, and ``destroy_process_group()`` alone left it alive: on 2 ranks,
    4 ``pt_gloo_runloop`` threads were still up after it, and the abort came in 1 of 7 RoseTrainer runs
    at ZeRO-3 (and once in CI). Four things kept it: every ZeRO-3 parameter refers to it
    (``ds_process_group``) and DeepSpeed keeps ZeRO-3 models for the life of the process, a Trainer
    never destroys its engine (whose gradient hooks hold it in a cycle the collector cannot see), and
    torch's ``distributed.nn.functional`` holds it as a default argument (see the import above).
    :func:`_release_engines` and that import remove them; after this function no gloo thread is left
    (``tests/test_zero.py::test_shutdown_leaves_no_gloo_thread``, ``tests/test_hf.py``).
    """
    import gc

    _release_engines()  # (a helper's frame: no local of this one may keep an engine alive)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _release_engines() -> None:
    """Destroys the engines bound to a RoseAdamW (which removes ZeRO's gradient hooks: autograd's C++
    nodes hold them, and through them the engine, in a cycle the garbage collector cannot see), then
    drops the two references DeepSpeed 0.19 keeps to every ZeRO-3 model for the life of the process:
    the engine's root module in ``parameter_offload.FWD_MODULE_STACK`` (appended when the engine is
    built, never removed), and every submodule in the ``functools.lru_cache`` of
    ``PartitionedParameterCoordinator.__params_to_release`` (a cache on a method, shared by the class)."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    for engine in list(_BOUND_ENGINES):  # a Trainer never destroys its engine
        engine.destroy()
    _BOUND_ENGINES.clear()
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()  # between forward passes only root modules are left in it
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    release = vars(coordinator).get("_PartitionedParameterCoordinator__params_to_release") if coordinator else None
    for wrapped in (release, *(c.cell_contents for c in getattr(release, "__closure__", None) or ())):
        if hasattr(wrapped, "cache_clear"):  # under DeepSpeed's NVTX wrapper
            wrapped.cache_clear()


def map_checkpoint_loads(engine) -> None:
    """Makes ``engine.load_checkpoint`` map each checkpoint file instead of reading it into memory.

    DeepSpeed's torch checkpoint engine reads a file whole while the engine still holds its own
    states, so a resume needs the model states twice: 12 more bytes a parameter per rank under ZeRO-3
    with offload (6.6 GB a rank at 1.1B parameters on 2 ranks, past this machine's 24 GiB). Mapped
    (copy-on-write), the loaded tensors are file pages the kernel reads on demand and can drop; the
    values are the same bits. Other checkpoint engines (decoupled, fast writers) are left alone.

    Args:
        engine: A DeepSpeed engine, before ``load_checkpoint``.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ckpt = getattr(engine, "checkpoint_engine", None)
    if type(ckpt) is not TorchCheckpointEngine:
        return

    read = ckpt.load

    def load(path: str, map_location=None):
        if not zipfile.is_zipfile(path):  # the legacy format ("checkpoint": {"use_zipfile": false}) maps not
            return read(path, map_location=map_location)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    ckpt.load = load


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two named param groups as Hugging Face's Trainer makes them: decay on weights, none on biases
    and normalisation weights (any module whose class name contains ``Norm``)."""
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            no_decay.update(
                f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)
            )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [(n, p) for n, p in named if n not in no_decay and not n.endswith("bias")],
            "weight_decay": weight_decay,
        },
        {"params": [(n, p) for n, p in named if n in no_decay or n.endswith("bias")], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def initialize(
    model: nn.Module,
    config: str | Path | Mapping[str, Any],
    *,
    rose: RoseConfig | None = None,
    lr: float = 2e-5,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    param_groups: Iterable[dict[str, Any]] | None = None,
    fused: bool | None = None,
    method: MethodConfig | None = None,
    **deepspeed_kwargs: Any,
):
    """``deepspeed.initialize`` with RoseAdamW installed as the client optimizer.

    Sets ``zero_allow_untested_optimizer`` (and ``zero_force_ds_cpu_optimizer: false`` under
    optimizer offload), builds the optimizer from ``model.named_parameters()`` (weight decay on
    weights, none on biases and norms, unless ``param_groups`` is given) and binds it to the
    engine's ZeRO partitions.

    Args:
        model: The model (a ``torch.nn.Module``).
        config: DeepSpeed config: a JSON path or a dict. It must not define an ``optimizer``.
        rose: The ROSE configuration.
        lr, betas, eps, weight_decay: RoseAdamW hyper-parameters.
        param_groups: Optional named param groups (``(name, tensor)`` pairs) instead of the default two.
        fused: Which kernel steps (``RoseAdamW(fused=...)``): None (default), rose_ds's C++ kernel for
            float32 CPU partitions (``offload_optimizer``) and torch's foreach kernels elsewhere; True,
            torch's fused Adam kernel; False, torch's foreach kernels everywhere.
        method: A method composed with ROSE (``RoseAdamW(method=...)``; pass its losses to
            :func:`train_step` with ``loss_fn=rose_ds.methods.loss_fn(method)``).
        **deepspeed_kwargs: Passed to ``deepspeed.initialize`` (``lr_scheduler``, ``training_data``, ...).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as ``deepspeed.initialize``.

    Raises:
        UnsupportedConfigError: for a configuration ROSE cannot run exactly (one line with the fix).
    """
    ds_config = _load_config(config)
    prepare_config(ds_config)
    groups = list(param_groups) if param_groups is not None else decay_param_groups(model, weight_decay)
    optimizer = RoseAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rose=rose, fused=fused,
                          method=method)  # fmt: skip
    # FP16_UnfusedOptimizer (stage 0, bf16/fp16) calls step() once inside initialize with zero
    # gradients; until bound, step() only creates the state.
    optimizer.expect_provider()
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, **deepspeed_kwargs
    )
    ZeroBinding(engine, optimizer)
    return engine, ds_optimizer, loader, scheduler


def prepare_config(ds_config: dict[str, Any]) -> None:
    """Makes a DeepSpeed config dict take RoseAdamW as its client optimizer, in place.

    Refuses an ``optimizer`` section and the settings :func:`check_config` refuses; sets
    ``zero_allow_untested_optimizer`` and, under optimizer offload, ``zero_force_ds_cpu_optimizer:
    false`` (DeepSpeed would otherwise insist on its own CPU Adam).

    Raises:
        UnsupportedConfigError: one line naming the setting and the fix.
    """
    check_deepspeed_version()
    if "optimizer" in ds_config:
        raise UnsupportedConfigError(
            "the DeepSpeed config defines an 'optimizer'; remove it: rose_ds installs RoseAdamW as the optimizer"
        )
    check_config(ds_config)
    ds_config["zero_allow_untested_optimizer"] = True
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    if offload.get("device", "none") not in (None, "none"):
        ds_config["zero_force_ds_cpu_optimizer"] = False


def bind(engine) -> RoseAdamW:
    """Binds the RoseAdamW inside an engine that something else built (the Hugging Face Trainer,
    through accelerate) to the engine's ZeRO partitions; returns it. Does nothing the second time.

    Call ``expect_provider()`` on the optimizer before the engine is built (see :func:`initialize`)
    and make its config with :func:`prepare_config`.
    """
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, RoseAdamW):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not RoseAdamW")
    if not isinstance(opt.provider, ZeroBinding):
        ZeroBinding(engine, opt)
    return opt


def rose_optimizer(engine) -> RoseAdamW:
    """The RoseAdamW inside a DeepSpeed engine made by :func:`initialize`."""
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, RoseAdamW) or not isinstance(opt.provider, ZeroBinding):
        raise TypeError(
            "this engine has no bound RoseAdamW; create it with rose_ds.initialize(model, config, rose=...)"
        )
    return opt


def backward(
    engine,
    losses: RoseLosses,
    recompute: Callable[[], RoseLosses] | None = None,
    task_backward: Callable[[Tensor], Any] | None = None,
) -> RoseLosses:
    """The robust backward and its capture (when the coming step is masked by a first-order mode),
    then ``engine.backward(losses.task)``. Call once per micro-batch, then ``engine.step()``.
    ``task_backward`` replaces ``engine.backward`` for the task loss (the Trainer passes
    ``accelerator.backward``, which also steps the engine at the accumulation boundary).

    At ZeRO-3 the second backward cannot run through the first one's graph (its partitioned
    parameters are released after the robust backward), so the forward passes are run again with
    the same random state: pass ``recompute``, a function returning the same losses again
    (:func:`make_recompute`; :func:`train_step` does this for you). Returns the losses whose task
    loss was back-propagated.
    """
    binding = rose_optimizer(engine).provider
    task_backward = task_backward or engine.backward
    if losses.robust is None or not binding.wants_robust():
        task_backward(losses.task)
        return losses
    binding.passes_checked = binding.passes_checked or check_passes_differ(losses, engine.module)
    if binding.stage != 3:
        binding.robust_backward(losses.robust)
        task_backward(losses.task)
        return losses
    if recompute is None:
        raise RuntimeError(
            "at ZeRO-3 rose_ds.backward needs recompute=make_recompute(loss_fn, engine, inputs, labels) made "
            "before the forward pass; or use rose_ds.train_step(engine, inputs, labels)"
        )
    binding.robust_backward(losses.robust)
    losses = recompute()
    task_backward(losses.task)
    return losses


def make_recompute(loss_fn: Callable[..., RoseLosses], engine, inputs, labels, two_passes: bool = True):
    """Captures the random state now; the returned function restores it and runs ``loss_fn`` again,
    so dropout draws the same masks and the losses are recomputed exactly. Call before the forward."""
    cpu_state = torch.get_rng_state()
    accelerator_state = get_accelerator().get_rng_state()

    def recompute() -> RoseLosses:
        torch.set_rng_state(cpu_state)
        get_accelerator().set_rng_state(accelerator_state)
        return loss_fn(engine, inputs, labels, two_passes=two_passes)

    return recompute


def train_step(
    engine,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    loss_fn: Callable[..., RoseLosses] = rose_losses,
) -> RoseLosses:
    """One micro-batch of ROSE training: the dropout passes, the robust backward and capture, the
    task backward and ``engine.step()`` (which steps the optimizer at accumulation boundaries).

    Args:
        engine: An engine from :func:`initialize`.
        inputs: Model keyword inputs (no labels).
        labels: Targets.
        loss_fn: ``(model, inputs, labels, two_passes=...) -> RoseLosses``; :func:`rose_losses` by default.
    """
    two_passes = needs_robust_gradient(rose_optimizer(engine).rose)
    recompute = make_recompute(loss_fn, engine, inputs, labels, two_passes)
    losses = backward(engine, loss_fn(engine, inputs, labels, two_passes=two_passes), recompute)
    engine.step()
    return losses


def childtuning_d(
    engine,
    batches: Iterable[tuple[Mapping[str, Tensor], Tensor]],
    loss_fn: Callable[..., Any] = rose_losses,
) -> float:
    """ChildTuning-D's Fisher pass: fixes the engine's gradient mask for the rest of the run.

    For each batch (this rank's rows of one global batch), the task loss is back-propagated with
    dropout off and reduced over the ranks as a training step reduces it; each rank sums the squares
    of its own fragment of that gradient (O(P/N) memory), and the eligible elements whose sum is at
    least the ``1 - p`` quantile over all ranks' elements are kept (``rose_ds.radix``: no gather).
    The mask lives in the optimizer state, so checkpoints carry it: call this once before training,
    not after a resume. The weights and the optimizer state are left untouched. Returns the threshold.

    Args:
        engine: An engine from :func:`initialize` with ``method=MethodConfig(name="childtuning-d")``.
        batches: ``(inputs, labels)`` pairs, the same number on every rank.
        loss_fn: ROSE's losses (``(model, inputs, labels, two_passes=...)``); the Fisher pass takes the
            task loss of one pass: :func:`rose_ds.rose_losses` (classification) by default,
            :func:`rose_ds.causal_lm_losses` for a causal LM.
    """
    opt = rose_optimizer(engine)
    if not opt.method.fixed_mask:
        raise ValueError(f"rose_ds.childtuning_d: the engine's method is {opt.method.name!r}, not 'childtuning-d'")
    binding = opt.provider
    was_training = engine.training
    engine.eval()  # dropout off: the Fisher information of the pre-trained weights, not of a random sub-network
    fisher: dict[int, Tensor] = {}
    try:
        for inputs, labels in batches:
            engine.set_gradient_accumulation_boundary(True)  # each batch is reduced on its own
            loss = loss_fn(engine, inputs, labels, two_passes=False).task
            for i, fragment in binding.gradient_fragments(loss).items():
                square = fragment.float().square()
                fisher[i] = square if i not in fisher else fisher[i].add_(square)
    finally:
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own counting
        engine.train(was_training)
    return opt.set_childtuning_d_fisher(fisher)


def _load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise UnsupportedConfigError(f"DeepSpeed config {str(path)!r} does not exist; pass a JSON file path or a dict")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from None


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuses DeepSpeed settings that rose_ds cannot map to tensors (UnsupportedConfigError)."""
    zero = cfg.get("zero_optimization", {}) or {}
    for key in ("offload_optimizer", "offload_param"):
        if ((zero.get(key) or {}).get("device") or "none") == "nvme":
            raise UnsupportedConfigError(
                f"zero_optimization.{key}.device='nvme' is not supported by rose_ds (optimizer state is swapped "
                "out of reach of the selection); use 'cpu' or 'none'"
            )
    if zero.get("round_robin_gradients"):
        raise UnsupportedConfigError(
            "zero_optimization.round_robin_gradients=true reorders the flat partitions that rose_ds maps to "
            "tensors; set it to false"
        )
    if (zero.get("zero_hpz_partition_size") or 1) > 1 or zero.get("mics_shard_size", -1) > 0:
        raise UnsupportedConfigError(
            "ZeRO++ hpZ and MiCS partition groups are not supported by rose_ds; remove zero_hpz_partition_size / "
            "mics_shard_size"
        )


class ZeroBinding:
    """Connects a RoseAdamW to the partitions of one DeepSpeed engine (see the module docstring): the
    optimizer's segments provider (:class:`rose_ds.optim.SegmentsProvider`). It supplies this rank's
    segments, the all-reduce over the partition group and the robust gradient; the step is RoseAdamW's."""

    def __init__(self, engine, opt: RoseAdamW) -> None:
        from deepspeed.runtime.pipe.engine import PipelineEngine

        check_deepspeed_version()
        if isinstance(engine, PipelineEngine):
            raise UnsupportedConfigError(
                "pipeline-parallel engines are not supported by rose_ds; use ZeRO data parallel"
            )
        self.engine = engine
        _BOUND_ENGINES.add(engine)  # destroyed by shutdown()
        self.opt = opt
        # whether this process has seen two passes differ (rose_ds.dropout.check_passes_differ)
        self.passes_checked = False
        self.zo = engine.optimizer
        self.stage = engine.zero_optimization_stage()
        self.loss_scaled = bool(engine.fp16_enabled())
        names = {p: n for n, p in engine.module.named_parameters()}
        self._names = names
        index = {n: i for i, n in enumerate(opt.eligible_names)}
        self._index_of = {p: index[n] for p, n in names.items() if n in index}
        self._model_params = [p for p in engine.module.parameters() if p.requires_grad]
        self._robust_store: dict[Any, Any] = {}  # accumulated robust gradient between micro-batches
        self._micro = 0  # micro-batches seen in the current accumulation window
        self._stash: list[Shard] = []  # this engine step's partitions so far
        self.offload = False
        # stages 1/2: groups whose reduced gradient DeepSpeed accumulates in a compact fp32 partition
        # held in averaged_gradients[i] (bf16/fp16 with data_types.grad_accum_dtype 'fp32')
        self._compact: dict[int, bool] = {}
        self._grad_accum_attr = False  # stage 1 accumulates in param.grad_accum, not param.grad
        _require(engine, "basic_optimizer", "is_gradient_accumulation_boundary")
        if self.stage == 0:
            self._bind_stage0()
        elif self.stage in (1, 2):
            self._bind_stage12()
        else:
            self._bind_stage3()
        opt.attach(self)

    # ------------------------------------------------------------------ binding
    def _bind_stage0(self) -> None:
        self.group = None  # full reduced gradients on every rank: nothing to all-reduce
        if self.zo is self.opt:
            return
        if not hasattr(self.zo, "fp32_groups") or not hasattr(self.zo, "fp16_groups"):
            raise UnsupportedConfigError(
                f"ZeRO stage 0 with {type(self.zo).__name__} is not supported by rose_ds; use fp32, or bf16/fp16 "
                "with zero_optimization.stage >= 1"
            )
        _require(self.zo, "fp16_groups", "fp32_groups")
        # The client steps fp32 master copies, not the model's tensors: key eligibility by the copies.
        self.opt.use_master_copies(
            (hp, self._names[lp])
            for lp_group, hp_group in zip(self.zo.fp16_groups, self.zo.fp32_groups, strict=True)
            for lp, hp in zip(lp_group, hp_group, strict=True)
        )

    def _bind_stage12(self) -> None:
        zo = self.zo
        if type(zo).__name__ != "DeepSpeedZeroOptimizer":
            raise UnsupportedConfigError(
                f"{type(zo).__name__} is not supported by rose_ds; for bf16 at stage 1 set "
                "data_types.grad_accum_dtype to 'bf16' or use stage 2"
            )
        _require(
            zo, "bit16_groups", "single_partition_of_fp32_groups", "params_in_partition", "averaged_gradients",
            "all_grad_tensors", "parallel_partitioned_bit16_groups", "real_dp_process_group", "dp_process_group",
            "cpu_offload", "loss_scale", "use_grad_accum_attribute", "_use_compact_grad_partition_buffer",
        )  # fmt: skip
        self.offload = bool(zo.cpu_offload)
        if self.offload:
            _require(zo, "accumulated_grads_in_cpu")
        self._grad_accum_attr = bool(zo.use_grad_accum_attribute)
        if self._grad_accum_attr:
            for p in self._model_params:
                _require(p, "grad_accum")
        self._compact = {i: bool(zo._use_compact_grad_partition_buffer(i)) for i in range(len(zo.bit16_groups))}
        self.group = zo.dp_process_group
        self._flats: list[Tensor] = list(zo.single_partition_of_fp32_groups)
        self._segments: dict[int, list[tuple[int, int, int]]] = {}
        # (start in the partition, numel, parameter name, start in the parameter): ChildTuning-F's hash
        self._named_segments: dict[int, list[tuple[int, int, str, int]]] = {}
        for i, lps in enumerate(zo.bit16_groups):
            if _ranks(zo.real_dp_process_group[i]) != _ranks(zo.dp_process_group):
                raise UnsupportedConfigError("expert-parallel (MoE) param groups are not supported by rose_ds")
            segments, named = [], []
            for lp in lps:
                _require(lp, "_hp_mapping")
                frag = lp._hp_mapping  # tensor_fragment: where lp's elements sit in this rank's partition
                if frag is None:
                    continue
                _require(frag, "hp_fragment_address", "lp_fragment_address")
                _require(frag.hp_fragment_address, "start", "numel")
                _require(frag.lp_fragment_address, "start")
                start, numel = frag.hp_fragment_address.start, frag.hp_fragment_address.numel
                segments.append((start, numel, self._index_of.get(lp, -1)))
                named.append((start, numel, self._names[lp], frag.lp_fragment_address.start))
            self._segments[id(self._flats[i])] = sorted(segments)
            self._named_segments[id(self._flats[i])] = named

    def _bind_stage3(self) -> None:
        zo = self.zo
        _require(
            zo, "fp16_groups", "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer", "micro_step_id",
            "sub_group_process_groups", "dp_process_group", "offload_optimizer",
            "_reassign_or_swap_out_partitioned_parameters",
        )  # fmt: skip
        self.offload = bool(zo.offload_optimizer)
        self.group = zo.dp_process_group
        rank = dist.get_rank(group=self.group)
        self._flats = list(zo.fp32_partitioned_groups_flat)
        self._segments = {}
        self._named_segments = {}
        self._buffer_segments: list[tuple[int, int, int]] = []  # in grad_partitions_flat_buffer
        base = 0
        for sg, params in enumerate(zo.fp16_groups):
            if _ranks(zo.sub_group_process_groups[sg]) != _ranks(zo.dp_process_group):
                raise UnsupportedConfigError(
                    "ZeRO-3 partition groups other than the data-parallel group are not supported"
                )
            segments, named, offset = [], [], 0
            for p in params:
                _require(p, "ds_tensor", "ds_numel")
                _require(p.ds_tensor, "ds_numel")
                per_rank = p.ds_tensor.ds_numel  # each rank holds ceil(numel / world) elements, tail-padded
                valid = max(0, min(per_rank, p.ds_numel - rank * per_rank))
                segments.append((offset, valid, self._index_of.get(p, -1)))
                named.append((offset, valid, self._names[p], rank * per_rank))
                self._buffer_segments.append((base + offset, valid, self._index_of.get(p, -1)))
                offset += per_rank
            self._segments[id(self._flats[sg])] = segments
            self._named_segments[id(self._flats[sg])] = named
            base += offset

    # ------------------------------------------------------------------ robust gradient
    def wants_robust(self) -> bool:
        """Whether the coming optimizer step scores tensors with a robust gradient."""
        return needs_robust_gradient(self.opt.rose) and masking_active(self.opt.rose, self.opt.global_step() + 1)

    def robust_backward(self, loss_rob: Tensor) -> None:
        """``engine.backward(loss_rob)`` with the task gradient accumulated so far kept out of it.

        At the accumulation boundary the reduced robust gradient (of the whole accumulated batch)
        is turned into this rank's partial sums of squares; before it, it is kept in a store that
        DeepSpeed accumulates into exactly as it does for the task gradient.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.stage == 3:
            self._stage3_robust_backward(loss_rob, boundary)
            return
        task = self._swap_stores(self._robust_store)
        if self._micro == 0 and "offload" in task:
            # A new window starts from zero. DeepSpeed's CPU accumulators still hold the previous
            # step's gradient, which the task backward (the second in this micro step, so an
            # accumulating one) would otherwise add.
            task["offload"] = {}
        self._micro = 0 if boundary else self._micro + 1
        self.engine.backward(loss_rob, retain_graph=True)
        if boundary:
            self._set_robust_statistics(self._reduced_robust_fragments())
            if self.stage in (1, 2) and not self.offload:
                # The task backward must build its own reduced partition, not add into this one (a
                # compact partition is a store of its own: swapped back below).
                for i in range(len(self.zo.bit16_groups)):
                    if not self._compact[i]:
                        self.zo.averaged_gradients[i] = None
        robust = self._swap_stores(task)
        self._robust_store = {} if boundary else robust

    def gradient_fragments(self, loss: Tensor) -> dict[int, Tensor]:
        """This rank's fragment of the reduced gradient of ``loss`` for each eligible tensor (flat, fp32,
        unscaled), through the robust-gradient path; call at an accumulation boundary, outside a
        training step. Nothing is stepped and no gradient is left behind."""
        opt = self.opt
        saved = (opt.rose, opt.robust_capture, self._robust_store, self._micro)
        opt.rose = dataclasses.replace(opt.rose, granularity="element")  # keep the fragments themselves
        opt.robust_capture, self._robust_store, self._micro = RobustCapture(), {}, 0
        try:
            self.robust_backward(loss)
            return {i: g.reshape(-1) for i, g in enumerate(opt.robust_capture.grads or []) if g is not None}
        finally:
            opt.rose, opt.robust_capture, self._robust_store, self._micro = saved

    def _swap_stores(self, store: dict[Any, Any]) -> dict[Any, Any]:
        """Puts ``store`` where DeepSpeed accumulates gradients and returns what was there.

        Stages 0 and 1 keep un-reduced gradients in ``p.grad`` until the boundary (stage 1 with a
        separate accumulation dtype: in ``p.grad_accum``); stage 2 keeps reduced partitions in
        ``all_grad_tensors``, or, with fp32 accumulation of bf16/fp16 gradients, in a compact fp32
        partition held in ``averaged_gradients``; offload keeps ``accumulated_grads_in_cpu``. Only
        references move: nothing is copied.
        """
        previous: dict[Any, Any] = {}
        if self.stage in (0, 1):
            for p in self._model_params:
                previous[p] = p.grad
                p.grad = store.get(p)
                if self._grad_accum_attr:
                    previous["accum", p] = p.grad_accum
                    p.grad_accum = store.get(("accum", p))
        if self.stage in (1, 2) and self.offload:
            previous["offload"] = self.zo.accumulated_grads_in_cpu
            self.zo.accumulated_grads_in_cpu = store.get("offload", {})
        for i, compact in self._compact.items():  # stages 1 and 2 only
            if compact:  # (under offload too: the boundary copies it to the CPU)
                previous["compact", i] = self.zo.averaged_gradients.get(i)
                self.zo.averaged_gradients[i] = store.get(("compact", i))
            elif self.stage == 2 and not self.offload:
                previous[i] = self.zo.all_grad_tensors.get(i)
                self.zo.all_grad_tensors[i] = store.get(i)
        return previous

    def _stage3_robust_backward(self, loss_rob: Tensor, boundary: bool) -> None:
        """Stage 3 reduces every backward into one flat buffer (copy at micro step 0, add after): the
        task part is snapshotted, the difference is the robust gradient, and the task part is put
        back. The graph is not retained: the task loss is recomputed (see :func:`backward`), and
        that forward advances ``micro_step_id``, so the task backward adds to what is put back."""
        buffer = self.zo.grad_partitions_flat_buffer  # all local gradient partitions, flat order
        snapshot = None
        if self.zo.micro_step_id > 0:
            # Taken out rather than subtracted afterwards: in bf16, (task + robust) - task cancels a
            # small robust gradient against a large accumulated task one. From zero, DeepSpeed's add
            # leaves this micro-batch's robust gradient alone, rounded as any gradient is.
            snapshot = buffer.clone()
            buffer.zero_()
        self.engine.backward(loss_rob)
        if boundary and not self._robust_store:
            robust = buffer  # one micro-batch: read in place before the buffer is reset below
        else:  # the robust sum over micro-batches is kept in fp32, whatever DeepSpeed accumulates in
            robust = self._robust_store.get("grads")
            robust = buffer.to(torch.float32, copy=True) if robust is None else robust.add_(buffer)
        if boundary:
            self._set_robust_statistics(
                [(idx, robust.narrow(0, start, numel)) for start, numel, idx in self._buffer_segments if idx >= 0]
            )
            self._robust_store = {}
        else:
            self._robust_store = {"grads": robust}
        if snapshot is None:
            buffer.zero_()
        else:
            buffer.copy_(snapshot)

    def _reduced_robust_fragments(self) -> list[tuple[int, Tensor]]:
        """(eligible index, this rank's fragment of the reduced robust gradient), stages 0-2."""
        if self.stage == 0:
            return [(i, p.grad) for p, i in self._index_of.items() if p.grad is not None]
        if not self.offload:
            fragments = []
            for i, flat in enumerate(self._flats):
                grads = self.zo.averaged_gradients[i]
                if self._compact[i]:  # one flat fp32 partition laid out as the fp32 master partition
                    _require(grads, "flat_partition")
                    part = grads.flat_partition
                    fragments += [(idx, part.narrow(0, a, n)) for a, n, idx in self._segments[id(flat)] if idx >= 0]
                    continue
                # one view per parameter of the partition, with zero-padding views between them (marked)
                # and, on the last rank, one unmarked trailing padding tensor
                params = self.zo.params_in_partition[i]
                views = [g for g in grads if not getattr(g, "_zero_padding", False)]
                for lp, g in zip(params, views):
                    if g.numel() != lp._hp_mapping.hp_fragment_address.numel:
                        raise RuntimeError(
                            f"rose_ds: DeepSpeed's reduced gradient of {self._names[lp]} has {g.numel()} elements "
                            f"where its partition holds {lp._hp_mapping.hp_fragment_address.numel}: the gradient "
                            f"layout of deepspeed {deepspeed.__version__} is not the one rose_ds was tested with"
                        )
                    if lp in self._index_of:
                        fragments.append((self._index_of[lp], g))
            return fragments
        # offload: the boundary copies the reduced partition into the flat .grad buffer
        return [
            (idx, flat.grad.narrow(0, start, numel))
            for flat in self._flats
            for start, numel, idx in self._segments[id(flat)]
            if idx >= 0
        ]

    def _set_robust_statistics(self, fragments: list[tuple[int, Tensor]]) -> None:
        n = len(self.opt.eligible_names)
        if self.opt.rose.granularity == "element":  # element scores need the gradient itself (O(P/N))
            scale = float(self.zo.loss_scale) if self.loss_scaled else 1.0  # a power of two: exact
            kept = {i: f.detach().to(torch.float32).div(scale) for i, f in fragments}
            if self.stage > 0:  # flat, like the partition segments they are scored with (stage 0: shaped)
                kept = {i: f.reshape(-1) for i, f in kept.items()}
            self.opt.robust_capture = RobustCapture(grads=[kept.get(i) for i in range(n)])
            return
        sq = index_sum_of_squares(fragments, n)  # stages 1-3: this rank's partial sums
        if self.loss_scaled:  # fp16: gradients are still multiplied by the loss scale here
            sq /= float(self.zo.loss_scale) ** 2
        self.opt.robust_capture = RobustCapture(squares=sq)

    # ------------------------------------------------------------------ segments (the provider)
    def segments(self, opt: RoseAdamW) -> Segments | None:
        """Called from RoseAdamW.step() for each partition; hands the step every partition at the
        last one of the engine step (the mask needs every partition's clipped gradient)."""
        if self.stage == 0:  # whole tensors (or their fp32 master copies) with full reduced gradients
            return dataclasses.replace(opt.dense_segments(), capture_hint=CAPTURE_HINT)
        for group in opt.param_groups:
            for flat in group["params"]:  # (its state exists already: DeepSpeed links it right after this call)
                self._stash.append(self._shard(opt, group, flat, flat.grad))
        if len(self._stash) < len(self._flats):
            return None
        stash, self._stash = self._stash, []
        return Segments([[s] for s in stash], self._all_reduce, sharded=True, capture_hint=CAPTURE_HINT)

    def resident(self, opt: RoseAdamW) -> Segments:
        """Every partition this rank holds."""
        if self.stage == 0:
            return opt.dense_segments(stepping=False)
        shards = [self._shard(opt, {}, flat, None) for flat in self._flats]
        return Segments([shards], self._all_reduce, sharded=True, capture_hint=CAPTURE_HINT)

    def stepped(self, segments: Segments) -> None:
        """DeepSpeed already copied the earlier partitions to the model dtype (before they were updated)."""
        if self.stage > 0:
            for unit in segments.units[:-1]:
                self._recopy_to_model(unit[0].param)

    def _shard(self, opt: RoseAdamW, group: dict[str, Any], flat: Tensor, grad: Tensor | None) -> Shard:
        named = self._named_segments[id(flat)] if opt.method.masks_gradients else []
        return Shard(group, flat, grad, opt.state[flat], self._segments[id(flat)], named)

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Sum over the data-parallel group, on the accelerator (NCCL needs device tensors)."""
        on_device = t.to(get_accelerator().current_device_name())
        dist.all_reduce(on_device, group=self.group)
        return on_device.cpu()

    def _recopy_to_model(self, flat: Tensor) -> None:
        zo = self.zo
        i = next(k for k, f in enumerate(self._flats) if f is flat)
        if self.stage in (1, 2):
            rank = dist.get_rank(group=zo.real_dp_process_group[i])
            zo.parallel_partitioned_bit16_groups[i][rank].data.copy_(flat.data)
        else:
            zo._reassign_or_swap_out_partitioned_parameters(i)


def _require(obj: Any, *names: str) -> None:
    """Fails at bind time, naming the attribute, when DeepSpeed no longer has what rose_ds relies on."""
    for name in names:
        if not hasattr(obj, name):
            low, high = TESTED_DEEPSPEED
            raise UnsupportedConfigError(
                f"rose_ds relies on {type(obj).__name__}.{name} (deepspeed>={low},<{high}), which deepspeed "
                f"{deepspeed.__version__} lacks; install deepspeed>={low},<{high}"
            )


def _ranks(group) -> list[int]:
    # (deepspeed.comm.get_all_ranks_from_group loops forever on torch 2.13: it waits for an exception)
    return [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group=group))]
