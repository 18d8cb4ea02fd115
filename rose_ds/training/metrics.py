"""One metric logger for a run (``metrics.jsonl``, TensorBoard, the console line, the progress bar),
and the run's plot; in the manner of torchtune's ``training/metric_logging.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from rose_ds.training import RecipeError

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Where a run's training and evaluation records go; only rank 0 writes or prints.

    Training records are appended to ``metrics.jsonl`` and, with ``report_to="tensorboard"``, to
    TensorBoard (``out/runs``); on a terminal a tqdm bar shows them, elsewhere one line per record.
    Every record is also appended to ``history`` (the run's ``log_history``, which checkpoints keep).

    Args:
        out: The run's output folder.
        history: The run's log history (appended to on every rank).
        is_main: Whether this is rank 0.
        report_to: ``"none"`` or ``"tensorboard"``.
        total_steps: Optimizer steps of the run (the bar's length).
        step: The step the run starts at (a resumed run's; TensorBoard drops later events).

    Raises:
        RecipeError: ``report_to="tensorboard"`` without the tensorboard package.
    """

    def __init__(self, out: Path, history: list[dict], *, is_main: bool, report_to: str, total_steps: int,
                 step: int) -> None:  # fmt: skip
        self.out, self.history, self.is_main = out, history, is_main
        self.interactive = is_main and sys.stdout.isatty()
        self.writer = None
        if is_main and report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or rose_ds[tensorboard])") from None  # fmt: skip
            # purge_step: events a killed run logged after the checkpoint it is resumed from are dropped
            self.writer = SummaryWriter(str(out / "runs"), purge_step=step or None)
        self.bar = tqdm(total=total_steps, initial=step, disable=not self.interactive, desc="train")

    def log_train(self, record: dict) -> None:
        """A training record (``step`` and scalars; None values are skipped by TensorBoard)."""
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if not self.interactive:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['learning_rate']:.2e}",
            kept=f"{record['kept_fraction']:.2f}",
            ex_s=f"{record['examples_per_second']:.1f}",
        )

    def advance(self) -> None:
        """One optimizer step done (the progress bar)."""
        self.bar.update(1)

    def log_eval(self, metrics: dict[str, float], step: int) -> None:
        """An evaluation at ``step``: kept in the history as ``eval_*`` keys, printed, sent to TensorBoard."""
        self.history.append({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if self.is_main:
            print("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f" (step {step})")
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        """Closes the bar and TensorBoard's file."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def rewrite_metrics(out: Path, history: list[dict]) -> None:
    """Replaces ``metrics.jsonl`` (atomically) by the training records of ``history``: on resume, the
    records a dead run wrote after its checkpoint go."""
    records = "".join(json.dumps(r) + "\n" for r in history if "loss" in r)
    (out / f"{METRICS_FILE}.tmp").write_text(records)
    os.replace(out / f"{METRICS_FILE}.tmp", out / METRICS_FILE)


def scalar(value) -> float | None:
    """A tensor or number as a float; None (JSON null) stays None (ZeRO-0 fp32 keeps no grad norm)."""
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def plot_run(history: list[dict], mask_history: list[list[float]], eligible: list[str], path: Path) -> None:
    """Training curves and a heat-map of the kept coefficient of every eligible tensor per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    train = [r for r in history if "loss" in r]
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    points = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]  # a causal LM's
    if points:
        ax.plot(*zip(*points), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ax2 = ax.twinx()
    for key, style in (("eval_accuracy", "o-"), ("eval_adv_accuracy", "s--")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax2.plot(*zip(*points), style, color="tab:green" if key == "eval_accuracy" else "tab:red",
                     label=key.replace("eval_", ""))  # fmt: skip
    ax2.set_ylabel("accuracy")
    if ax2.lines:
        ax2.legend(loc="upper right")
    ax.set_title("training")
    masks = torch.tensor(mask_history or [[1.0] * len(eligible)]).T
    im = axes[1].imshow(masks, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    short = [n.replace("encoder.layer.", "L").replace("attention.", "att.").replace(".weight", "") for n in eligible]
    axes[1].set_yticks(range(len(eligible)), short, fontsize=5)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("ROSE coefficient c per eligible tensor (0 frozen, 1 updated)")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["METRICS_FILE", "MetricLogger", "plot_run", "rewrite_metrics", "scalar"]
