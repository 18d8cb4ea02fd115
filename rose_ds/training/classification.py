"""The sequence-classification objective (the paper's): GLUE-style tasks and local files
(:mod:`rose_ds.training.data`), class-logit ROSE losses with every ``--method``, clean and AdvGLUE
accuracy (:mod:`rose_ds.training.evaluation`)."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from rose_ds import methods
from rose_ds.training import data
from rose_ds.training.evaluation import evaluate_all


class Classification:
    """``--objective classification``: a classification head over the model, one label per example."""

    name = "classification"
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"  # LoRA: the new head trains in full beside the adapters

    def check(self, args: Any, method: methods.MethodConfig) -> None:
        """Every method runs on a classifier."""

    def load_data(self, args: Any, tokenizer: Any) -> data.TaskData:
        return data.load_task(args, tokenizer)

    def model_kwargs(self, task: data.TaskData) -> dict[str, Any]:
        return {"num_labels": task.num_labels}

    def collator(self, tokenizer: Any) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(tokenizer)

    def loss_fn(self, method: methods.MethodConfig):
        return methods.loss_fn(method)  # ROSE's losses, plus the --method term

    def evaluate(self, model: Any, task: data.TaskData, tokenizer: Any, batch_size: int,
                 device: str) -> dict[str, float]:  # fmt: skip
        return evaluate_all(model, task.validation, task.adv, self.collator(tokenizer), batch_size, device, task.task)

    def summary(self, metrics: dict[str, float], task: data.TaskData) -> str:
        line = f"clean validation accuracy {metrics['accuracy']:.4f}"
        if "adv_accuracy" in metrics:
            adv_task = task.task if task.task != "rotten_tomatoes" else "sst2"
            line += f", AdvGLUE {adv_task} accuracy {metrics['adv_accuracy']:.4f}"
        return line


OBJECTIVE = Classification()

__all__ = ["OBJECTIVE", "Classification"]
