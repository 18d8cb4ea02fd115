"""Crash-safe DeepSpeed checkpoints for a training loop: atomic folders, a pointer written last, per-rank
random state, and a record of what was saved so that a resume can refuse a checkpoint of another model.

Layout in the output folder::

    global_step40/                 DeepSpeed's files, rng_state_<rank>.pt, trainer_state.json (the
                                   loop's position and logs), rose_ds_checkpoint.json (written last)
    global_step50/
      universal/                   DeepSpeed universal checkpoint, made once when resumed on another world size
    latest                         "global_step50": written after global_step50/ is complete

A save writes into ``.tmp-global_stepN/``; only when every rank has written its part does rank 0 add
``rose_ds_checkpoint.json`` (the completion record), flush the files, rename the folder to
``global_stepN`` (atomic on one file system), replace ``latest`` (atomic), and only then delete
checkpoints beyond ``keep``. A crash at any point leaves the previous checkpoint and pointer intact;
the partial ``.tmp-*`` folder is ignored and removed by the next save or resume. Checkpoints must sit on
a file system that every rank sees (as DeepSpeed's own ``latest`` assumes).

**Another world size.** ZeRO stages 1-3 partition the optimizer state by rank, so a checkpoint of N
ranks cannot be loaded by M directly. :func:`prepare_load` converts it once with DeepSpeed's universal
checkpoint tool (``deepspeed.checkpoint.ds_to_universal``, which re-keys every parameter's fp32 weight
and Adam moments by parameter name) and asks for ``checkpoint.load_universal``. RoseAdamW keeps exactly
Adam's state names (``step``, ``exp_avg``, ``exp_avg_sq``) and no other per-tensor state: its masks are
recomputed at every step from those moments and the gradients, so nothing of ROSE is lost.

**Trust.** DeepSpeed's checkpoint files are pickles and load only with full unpickling: resume only
from checkpoints you wrote or trust. The files rose_ds adds load without it (JSON; RNG states with
``torch.load(weights_only=True)``), and the exported model is safetensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from rose_ds import zero
from rose_ds.training import RecipeError

RECORD = "rose_ds_checkpoint.json"
LOOP_STATE = "trainer_state.json"
UNIVERSAL = "universal"
LATEST = "latest"
PREFIX = "global_step"
FORMAT = 1


class CheckpointError(RecipeError):
    """A checkpoint that cannot be resumed from (missing, partial, or of another model)."""


@dataclass
class TrainState:
    """The training loop's position and logs, saved in every checkpoint (``trainer_state.json``).

    Attributes:
        epoch: Epochs finished.
        batches_done: Micro-batches of the current epoch done (on this world size).
        window: Sum and count of the task losses since the last training record.
        nonfinite: Optimizer steps in a row whose loss was NaN/inf on some rank.
        last_saved: Folder name of the newest checkpoint written (or resumed from).
        good_checkpoint: The newest checkpoint whose weights gave a finite loss at the next step.
        log_history: Training and evaluation records.
        mask_history: Per optimizer step, the kept coefficient of every eligible tensor.
    """

    epoch: int = 0
    batches_done: int = 0
    window: list = field(default_factory=lambda: [0.0, 0])
    nonfinite: int = 0
    last_saved: str | None = None
    good_checkpoint: str | None = None
    log_history: list = field(default_factory=list)
    mask_history: list = field(default_factory=list)

    def add_loss(self, loss: float) -> None:
        """One micro-batch's task loss into the logging window."""
        self.window = [self.window[0] + loss, self.window[1] + 1]

    def take_window(self) -> float:
        """The mean task loss of the window, which starts afresh."""
        mean = self.window[0] / self.window[1]
        self.window = [0.0, 0]
        return mean

    def note_finite(self, finite_everywhere: bool, limit: int) -> bool:
        """Counts an optimizer step's loss; returns True when ``limit`` steps in a row were NaN/inf.

        A finite loss came from the weights of the newest checkpoint (or later ones): that checkpoint
        becomes the good one.
        """
        self.nonfinite = 0 if finite_everywhere else self.nonfinite + 1
        if not self.nonfinite:
            self.good_checkpoint = self.last_saved
        return self.nonfinite >= limit


def model_signature(module: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and a digest of every parameter's name and full shape (ZeRO-3 partitioned
    parameters report their full shape in ``ds_shape``)."""
    lines, count = [], 0
    for name, p in module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        count += int(torch.Size(shape).numel())
        lines.append(f"{name}:{list(shape)}")
    return {"parameters": count, "digest": hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]}


def rng_state() -> dict[str, Any]:
    """This rank's random generators: torch CPU, the accelerator's, Python's (dropout draws from them)."""
    return {
        "torch": torch.get_rng_state(),
        "accelerator": get_accelerator().get_rng_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])
    random.setstate(state["python"])


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def complete_checkpoints(out: Path) -> list[Path]:
    """``global_stepN`` folders with a completion record, oldest first."""
    found = [p for p in out.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if (p / RECORD).is_file()), key=step_of)


def read_record(path: Path) -> dict[str, Any]:
    """The completion record of a checkpoint folder; CheckpointError when there is none."""
    record = path / RECORD
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a folder")
    if not record.is_file():
        hint = "an interrupted save" if path.name.startswith(".tmp-") else "not a rose_ds checkpoint"
        raise CheckpointError(f"{str(path)!r} has no {RECORD} ({hint}); pass a complete global_stepN folder, or 'auto'")
    return json.loads(record.read_text())


def resolve(value: str | None, out: Path) -> Path | None:
    """The checkpoint to resume from: for ``"auto"``, the one ``latest`` names if it is complete, else
    the newest complete one, else None (a fresh start); otherwise the given folder, which must be
    complete. Raises CheckpointError."""
    if not value:
        return None
    if value != "auto":
        path = Path(value)
        read_record(path)
        return path
    latest = out / LATEST
    if latest.is_file():
        named = out / latest.read_text().strip()
        if (named / RECORD).is_file():
            return named
    complete = complete_checkpoints(out)
    return complete[-1] if complete else None


def check_resumable(record: dict[str, Any], signature: dict[str, Any], path: Path) -> None:
    """Raises CheckpointError when the checkpoint was written for another model."""
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: checkpoint format {record.get('format')}; this rose_ds reads {FORMAT}")
    saved = record["model"]
    if saved["digest"] != signature["digest"]:
        raise CheckpointError(
            f"{str(path)!r} holds another model ({saved['parameters']:,} parameters from {saved.get('path')!r}; "
            f"this one has {signature['parameters']:,}): pass the same --model_name_or_path, or another --output_dir"
        )


def save(engine, out: Path, loop_state: dict[str, Any], record: dict[str, Any], keep: int | None) -> Path:
    """Writes ``global_step<engine.global_steps>`` atomically; every rank calls it.

    Args:
        engine: The DeepSpeed engine.
        out: Output folder (shared by all ranks).
        loop_state: JSON-serialisable state of the training loop (position in the data, logs).
        record: Saved as the completion record, with ``format`` and ``global_step`` added.
        keep: Keep only the newest ``keep`` complete checkpoints (None: all). Older ones are deleted
            only after the new one and the pointer are in place.

    Returns:
        The checkpoint folder.
    """
    rank = dist.get_rank()
    tag = f"{PREFIX}{engine.global_steps}"
    tmp, final = out / f".tmp-{tag}", out / tag
    if rank == 0:
        remove_partial(out)
    dist.barrier()
    engine.save_checkpoint(str(out), tag=tmp.name, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_synced(tmp / LOOP_STATE, json.dumps(loop_state))
        _write_synced(tmp / RECORD, json.dumps({"format": FORMAT, "global_step": engine.global_steps, **record}))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # the same step saved again (after a resume at it): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_synced(out / f".{LATEST}.tmp", tag)
        os.replace(out / f".{LATEST}.tmp", out / LATEST)
        _fsync(out)
        if keep:
            for old in complete_checkpoints(out)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def prepare_load(path: Path, record: dict[str, Any], world_size: int, ds_config: dict[str, Any]) -> str:
    """Makes ``path`` loadable by ``world_size`` ranks; returns the tag :func:`load` reads.

    Same world size, or ZeRO stage 0 (whole optimizer state in every rank's file): the checkpoint as
    it is. Otherwise rank 0 converts it once into ``path/universal`` (atomic, kept for later resumes)
    and ``ds_config`` gets ``checkpoint.load_universal``: call before ``deepspeed.initialize``, on
    every rank, after the process group is up.
    """
    if record["world_size"] == world_size or record["zero_stage"] == 0:
        return "."
    target = path / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        tmp = path / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        # a separate process: the tool runs its own worker pool and prints its progress
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(
                f"converting {str(path)!r} from {record['world_size']} to {world_size} ranks failed: "
                f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}"
            )
        os.rename(tmp, target)
    dist.barrier()
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return UNIVERSAL


def load(engine, path: Path, tag: str) -> dict[str, Any]:
    """Loads a checkpoint prepared by :func:`prepare_load` into ``engine`` (weights, optimizer moments and
    steps, scheduler, loss scale) and this rank's random state; returns the loop state."""
    optimizer = engine.basic_optimizer  # the client optimizer (RoseAdamW), whose groups ZeRO shares
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    load_dir, load_tag = (path.parent, path.name) if tag == "." else (path, tag)
    zero.map_checkpoint_loads(engine)
    engine.load_checkpoint(str(load_dir), tag=load_tag)
    if tag != ".":
        # the universal loader gives every param group the first group's hyper-parameters (ZeRO-3: the
        # no-decay group would get weight decay); the learning rate comes from the restored scheduler
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update(saved)
    load_rng(path, dist.get_rank())
    return json.loads((path / LOOP_STATE).read_text())


def resume(engine, path: Path, tag: str, record: dict[str, Any], *, learning_rate: float, batch_size: int,
           accumulation: int) -> TrainState:  # fmt: skip
    """Loads a checkpoint into ``engine`` (see :func:`load`) and returns the loop's state, ready to go on.

    The schedule keeps its position but takes ``learning_rate`` as its peak (the restored scheduler
    would keep the old one, and a run stopped for NaN is resumed with a lower one). On another world
    size the position in the epoch is kept in examples: the sampler deals the same permutation to
    the new ranks, so the epoch goes on from (about) where it stopped.

    Args:
        engine: The DeepSpeed engine (its ``lr_scheduler`` a ``LambdaLR``).
        path: The checkpoint folder; ``tag`` and ``record`` from :func:`prepare_load` / :func:`read_record`.
        learning_rate: This run's peak learning rate.
        batch_size: Micro-batch per rank.
        accumulation: Micro-batches per optimizer step.
    """
    state = TrainState(**load(engine, path, tag))
    state.last_saved = path.name  # judged good by the first finite loss after it
    set_peak_learning_rate(engine.lr_scheduler, learning_rate)
    world = dist.get_world_size()
    if record["world_size"] != world:
        examples_done = state.batches_done * batch_size * record["world_size"]
        state.batches_done = examples_done // (batch_size * world * accumulation) * accumulation
    return state


def set_peak_learning_rate(scheduler, learning_rate: float) -> None:
    """Gives a restored ``LambdaLR`` another peak at the same position: every group's learning rate
    becomes ``learning_rate * lambda(last_epoch)``, through the scheduler's public ``step``."""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    with warnings.catch_warnings():  # "step() before optimizer.step()": no update is taken here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.last_epoch -= 1
        scheduler.step()


def clear_run(out: Path) -> None:
    """Removes an old run's checkpoints, pointer and metrics from ``out`` (a fresh run over it, with
    ``--overwrite_output_dir``): a later ``--resume auto`` must not continue the old run."""
    for old in [*out.glob(f"{PREFIX}*"), *out.glob(f".tmp-{PREFIX}*")]:
        shutil.rmtree(old, ignore_errors=True)
    for name in (LATEST, "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)


# Largest safetensors file of an exported model (Hugging Face's sharding convention above it).
EXPORT_SHARD_BYTES = 2 * 2**30


def export_model(engine, model, tokenizer, out: Path, shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
    """Writes the consolidated fp32 weights as a Hugging Face model and the tokenizer to ``out``; every
    rank calls it (ZeRO-3 gathers), rank 0 writes. A PEFT (LoRA) model writes its adapter
    (``adapter_config.json``, ``adapter_model.safetensors``): only its trainable tensors are gathered.

    A whole model is gathered and written one safetensors shard at a time (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` above ``shard_bytes``),
    so rank 0 holds one shard beside its partition, never the whole model: what a model of billions of
    parameters needs. ``from_pretrained`` loads either layout.
    """
    if hasattr(model, "peft_config"):
        state = {name: _gathered_fp32(engine, p) for name, p in engine.module.named_parameters() if p.requires_grad}
        if dist.get_rank() == 0:
            model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        dist.barrier()
        return
    from safetensors.torch import save_file

    tensors = [*engine.module.named_parameters(), *engine.module.named_buffers()]
    persistent = set(model.state_dict().keys())  # (non-persistent buffers are not saved)
    tensors = [(name, t) for name, t in tensors if name in persistent]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        numel = int(torch.Size(getattr(t, "ds_shape", t.shape)).numel())
        nbytes = numel * (4 if t.is_floating_point() else t.element_size())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]  # fmt: skip
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        state = {}
        for name, t in shard:
            if isinstance(t, torch.nn.Parameter):
                state[name] = _gathered_fp32(engine, t)
            else:  # a buffer: whole on every rank
                state[name] = t.detach().cpu().clone()
        if dist.get_rank() == 0:
            save_file(state, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, file))
            total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    if dist.get_rank() == 0:
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = "float32"
        config.save_pretrained(str(out))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    dist.barrier()


def _gathered_fp32(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter on every rank: its fp32 master copy where the optimizer has
    one (ZeRO 1-3), the module's tensor otherwise (stage 0, frozen tensors; ZeRO-3 gathers it)."""
    if engine.zero_optimization_stage() == 0 or not p.requires_grad:
        with deepspeed.zero.GatheredParameters([p], enabled=engine.zero_optimization_stage() == 3):
            return p.detach().float().cpu().clone()
    return deepspeed.utils.safe_get_full_fp32_param(p).detach().float().cpu()


def load_rng(path: Path, rank: int) -> None:
    """Restores this rank's random state saved with the checkpoint (plain tensors and numbers: no
    arbitrary objects are unpickled)."""
    file = path / f"rng_state_{rank}.pt"
    if file.is_file():
        set_rng_state(torch.load(file, weights_only=True))


def remove_partial(out: Path) -> None:
    """Deletes folders of interrupted saves (``.tmp-*``)."""
    for partial in out.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CheckpointError",
    "check_resumable",
    "complete_checkpoints",
    "load",
    "load_rng",
    "model_signature",
    "prepare_load",
    "read_record",
    "remove_partial",
    "resolve",
    "save",
]
