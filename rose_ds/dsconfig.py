"""DeepSpeed JSON with ``"auto"`` values filled from the command line, as Hugging Face's integration does.

A key set to ``"auto"`` takes the command-line value; a concrete value that disagrees with the
command line is an error naming both and the fix. Pure dict manipulation, no DeepSpeed import.
"""

from __future__ import annotations

import copy
from typing import Any


class ConfigConflictError(ValueError):
    """The DeepSpeed JSON and the command line disagree (one line naming the keys and the fix)."""


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
