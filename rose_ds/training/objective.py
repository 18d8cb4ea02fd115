"""The seam between the training loop and what it trains for: one module per objective
(``classification``, ``causal_lm``), each an :class:`Objective`.

An objective owns what differs between sequence classification and causal language modelling: the
model class, the data and its collation, ROSE's two losses, evaluation and its metrics, and the
line that sums a run up. The loop in ``launch/finetune.py`` and the Trainer example only call these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from rose_ds.methods import MethodConfig
from rose_ds.training import RecipeError


class Objective(Protocol):
    """What a recipe needs of an objective."""

    name: str
    #: The ``transformers`` Auto class that loads the model (and builds the weightless skeleton).
    auto_class: Any
    #: PEFT's task type of the LoRA model (``--lora_r``).
    peft_task_type: str

    def check(self, args: Any, method: MethodConfig) -> None:
        """Refuses flags the objective cannot honour (a :class:`RecipeError`), before anything loads."""

    def load_data(self, args: Any, tokenizer: Any) -> Any:
        """The tokenized splits (a :class:`~rose_ds.training.data.TaskData`)."""

    def model_kwargs(self, task: Any) -> dict[str, Any]:
        """Keyword arguments of ``auto_class.from_pretrained`` that depend on the data."""

    def collator(self, tokenizer: Any) -> Callable:
        """Pads a list of encoded examples into a batch with ``labels``."""

    def loss_fn(self, method: MethodConfig) -> Callable:
        """``(model, inputs, labels, two_passes=...) -> losses`` for :func:`rose_ds.train_step`."""

    def evaluate(self, model: Any, task: Any, tokenizer: Any, batch_size: int, device: str) -> dict[str, float]:
        """The metrics of ``eval_results.json`` (without the ``eval_`` prefix); every rank calls it."""

    def summary(self, metrics: dict[str, float], task: Any) -> str:
        """The closing line's account of the metrics."""


class ObjectiveError(RecipeError):
    """An unknown objective, or flags it cannot run with."""


def get(name: str) -> Objective:
    """The objective called ``name`` (``--objective``).

    Raises:
        ObjectiveError: an unknown name.
    """
    from rose_ds.training import causal_lm, classification

    objectives = {"classification": classification.OBJECTIVE, "causal_lm": causal_lm.OBJECTIVE}
    if name not in objectives:
        raise ObjectiveError(f"--objective {name!r} is unknown; use one of {', '.join(objectives)}")
    return objectives[name]


__all__ = ["Objective", "ObjectiveError", "get"]
