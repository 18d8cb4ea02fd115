"""The published per-task learning rate and ``upper`` of ROSE (RoBERTa runs, spec section 4)."""

from __future__ import annotations

# (variant, model size) -> task -> (learning rate, upper)
PUBLISHED: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("first", "base"): {"qnli": (2e-5, 70), "qqp": (2e-5, 70), "rte": (4e-5, 80), "sst2": (2e-5, 60)},
    ("first", "large"): {"qnli": (3e-5, 50), "qqp": (2e-5, 70), "rte": (1e-5, 80), "sst2": (4e-5, 70)},
    ("second", "base"): {"qnli": (1e-5, 40), "qqp": (1e-4, 60), "rte": (4e-5, 60), "sst2": (1e-4, 30)},
    ("second", "large"): {"qnli": (1e-5, 50), "qqp": (1e-5, 60), "rte": (2e-5, 50), "sst2": (1e-5, 50)},
    ("ensemble", "base"): {"qnli": (1e-5, 90), "qqp": (5e-5, 75), "rte": (4e-5, 80), "sst2": (5e-5, 40)},
    ("ensemble", "large"): {"qnli": (1e-5, 30), "qqp": (1e-5, 80), "rte": (1e-5, 85), "sst2": (1e-5, 70)},
}


def preset(name: str) -> tuple[float, str, float]:
    """``"{task}-{base|large}-{first|second|ensemble}"`` -> ``(learning_rate, mode, upper)``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    parts = name.split("-")
    if len(parts) == 3:
        task, size, mode = parts
        table = PUBLISHED.get((mode, size), {})
        if task in table:
            lr, upper = table[task]
            return lr, mode, float(upper)
    tasks = sorted({t for table in PUBLISHED.values() for t in table})
    raise ValueError(
        f"--rose_preset {name!r} is unknown; use TASK-SIZE-MODE with TASK one of {', '.join(tasks)}, SIZE base or "
        "large, MODE first, second or ensemble (e.g. sst2-base-ensemble)"
    )
