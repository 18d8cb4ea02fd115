"""DeepSpeed JSON with ``"auto"`` values filled from the command line, as Hugging Face's integration does.

A key set to ``"auto"`` takes the command-line value; a concrete value that disagrees with the
command line is an error naming both and the fix. Pure dict manipulation, no DeepSpeed import.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from rose_ds.training import RecipeError


class ConfigConflictError(RecipeError):
    """The DeepSpeed JSON and the command line disagree, or the JSON cannot work (one line naming the
    keys and the fix)."""


# DeepSpeed's top-level config keys (https://www.deepspeed.ai/docs/config-json/; each is checked to occur
# in the installed DeepSpeed by tests/test_zero_config.py). DeepSpeed ignores any other top-level key
# without a word, so a misspelt section ("zero_optimisation") would silently train without it.
KNOWN_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "compression_training", "csv_monitor", "curriculum_learning",
    "data_efficiency", "data_types", "dataloader_drop_last", "disable_allgather", "dump_state", "eigenvalue",
    "elasticity", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_clipping",
    "gradient_predivide_factor", "hybrid_engine", "memory_breakdown", "nebula", "optimizer", "pipeline",
    "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients", "steps_per_print",
    "tensorboard", "tensor_parallel", "timers", "torch_autocast", "train_batch_size",
    "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown",
    "wandb", "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "zero_optimization",
})  # fmt: skip


def read(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path``, validated (:func:`validate`).

    Raises:
        ConfigConflictError: a missing file, invalid JSON or a config that cannot work; the message
            starts with the path.
    """
    if not Path(path).is_file():
        raise ConfigConflictError(f"{path!r}: no such file")
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigConflictError(f"{path}: not valid JSON ({err})") from None
    try:
        validate(config)
    except ConfigConflictError as err:
        raise ConfigConflictError(f"{path}: {err}") from None
    return config


def validate(config: Any) -> None:
    """Refuses, before any expensive work, a DeepSpeed config that cannot run with rose_ds.

    Checks: a JSON object; only known top-level keys (with the nearest known one suggested); no
    ``optimizer`` or ``scheduler`` section (rose_ds brings both); a ZeRO stage of 0-3; offload only
    where that stage can (parameters: stage 3; optimizer: stages 1-3), to ``cpu``/``none``/``nvme``
    and with ``nvme_path`` for nvme; not bf16 and fp16 at once.

    Raises:
        ConfigConflictError: naming the key and the fix.
    """
    if not isinstance(config, dict):
        raise ConfigConflictError(f"the top level must be a JSON object, not {type(config).__name__}")
    for key in config:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it (see deepspeed.ai/docs/config-json)"
            raise ConfigConflictError(f"unknown key {key!r}: {hint}")
    if "optimizer" in config:
        raise ConfigConflictError(
            "remove the 'optimizer' section: rose_ds supplies RoseAdamW; set its hyper-parameters with "
            "--learning_rate, --adam_beta1/2, --adam_epsilon, --weight_decay"
        )
    if "scheduler" in config:
        raise ConfigConflictError("remove the 'scheduler' section; the learning rate follows --warmup_steps "
                                  "then decays linearly to 0 over the run")  # fmt: skip
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigConflictError('zero_optimization must be an object such as {"stage": 2}')
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigConflictError(f"zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    for key, lowest in (("offload_optimizer", 1), ("offload_param", 3)):
        section = zero.get(key) or {}
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device not in ("none", "cpu", "nvme", None):
            raise ConfigConflictError(f"zero_optimization.{key}.device={device!r}: use 'cpu', 'nvme' or 'none'")
        if device in ("cpu", "nvme") and stage < lowest:
            what = "parameter offload needs stage 3" if lowest == 3 else "optimizer offload needs stage 1, 2 or 3"
            raise ConfigConflictError(
                f"zero_optimization.{key} with stage {stage}: {what}; raise the stage or remove it"
            )
        if device == "nvme" and not section.get("nvme_path"):
            raise ConfigConflictError(f"zero_optimization.{key}.device='nvme' needs nvme_path (a local NVMe folder)")
    if (config.get("bf16") or {}).get("enabled") is True and (config.get("fp16") or {}).get("enabled") is True:
        raise ConfigConflictError('bf16.enabled and fp16.enabled are both true; enable one (or set both to "auto")')


def fill_auto(
    config: dict[str, Any],
    *,
    world_size: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    bf16: bool,
    fp16: bool,
    hidden_size: int | None,
) -> dict[str, Any]:
    """Returns a copy of ``config`` with every ``"auto"`` filled and every mismatch refused.

    Args:
        config: The DeepSpeed config as read from JSON.
        world_size: Number of data-parallel processes.
        micro_batch_size: ``--per_device_train_batch_size``.
        gradient_accumulation_steps: ``--gradient_accumulation_steps``.
        max_grad_norm: ``--max_grad_norm`` (DeepSpeed ``gradient_clipping``).
        bf16, fp16: ``--bf16`` / ``--fp16``.
        hidden_size: The model's hidden size, for the ZeRO bucket sizes (as the HF integration).

    Raises:
        ConfigConflictError: on a concrete value that differs from the command line.
    """
    cfg = copy.deepcopy(config)
    conflicts: list[str] = []

    def fill(section: dict[str, Any], key: str, value: Any, flag: str | None, path: str) -> None:
        if key not in section:
            return
        if section[key] == "auto":
            section[key] = value
        elif flag is not None and section[key] != value:
            conflicts.append(f"{path}={section[key]!r} but {flag} gives {value!r}")

    fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "--per_device_train_batch_size",
         "train_micro_batch_size_per_gpu")  # fmt: skip
    fill(cfg, "gradient_accumulation_steps", gradient_accumulation_steps, "--gradient_accumulation_steps",
         "gradient_accumulation_steps")  # fmt: skip
    fill(cfg, "train_batch_size", world_size * micro_batch_size * gradient_accumulation_steps,
         "world size x --per_device_train_batch_size x --gradient_accumulation_steps", "train_batch_size")  # fmt: skip
    fill(cfg, "gradient_clipping", max_grad_norm, "--max_grad_norm", "gradient_clipping")
    for name, enabled in (("bf16", bf16), ("fp16", fp16)):
        if name in cfg:
            fill(cfg[name], "enabled", enabled, f"--{name}", f"{name}.enabled")
    zero = cfg.get("zero_optimization", {})
    if hidden_size is not None:
        fill(zero, "reduce_bucket_size", hidden_size * hidden_size, None, "")
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), None, "")
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size, None, "")
    if conflicts:
        raise ConfigConflictError(
            "DeepSpeed config disagrees with the command line: " + "; ".join(conflicts)
            + ". Set those keys to \"auto\" or pass matching arguments"
        )  # fmt: skip
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        cfg.setdefault(key, micro_batch_size if key.startswith("train_micro") else gradient_accumulation_steps)
    leftover = _find_auto(cfg)
    if leftover:
        raise ConfigConflictError(
            f'DeepSpeed config has "auto" at {", ".join(leftover)}, which rose_ds cannot fill; give concrete values'
        )
    return cfg


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []
