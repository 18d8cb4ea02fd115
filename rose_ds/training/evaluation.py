"""Clean and AdvGLUE evaluation of a classifier, the same in ``finetune.py``, ``evaluate.py`` and
``robustness.py``."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict(model, dataset, collate, batch_size: int, device: str) -> tuple[list[int], list[int]]:
    """Predictions and labels over the whole dataset (``model``: a module or a DeepSpeed engine).

    Every rank runs every batch: under ZeRO-3 the forward passes are collective, so ranks must run the
    same number of them.
    """
    model.eval()
    preds, labels = [], []
    # its own generator: iterating a loader draws a seed from the global RNG, which dropout uses, so an
    # evaluation would otherwise change the training that follows it
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                             generator=torch.Generator()):  # fmt: skip
        batch = {k: v.to(device) for k, v in batch.items()}
        labels += batch.pop("labels").tolist()
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds, labels


def metrics_of(preds: list[int], labels: list[int], prefix: str, with_f1: bool) -> dict[str, float]:
    """Accuracy (and binary F1 of class 1), keys prefixed with ``prefix``.

    Computed here: ``evaluate.load`` fetches metric code from the hub, which an offline run cannot.
    """
    correct = sum(p == y for p, y in zip(preds, labels))
    out = {f"{prefix}accuracy": correct / max(1, len(labels))}
    if with_f1:
        tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
        fp = sum(p == 1 and y != 1 for p, y in zip(preds, labels))
        fn = sum(p != 1 and y == 1 for p, y in zip(preds, labels))
        out[f"{prefix}f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    return out


def evaluate_all(model, validation, adv, collate, batch_size: int, device: str, task: str | None) -> dict[str, float]:
    """Validation metrics, and ``adv_``-prefixed AdvGLUE ones when ``adv`` is given (F1 too for QQP)."""
    f1 = task == "qqp"
    metrics = metrics_of(*predict(model, validation, collate, batch_size, device), "", f1)
    if adv is not None:
        metrics.update(metrics_of(*predict(model, adv, collate, batch_size, device), "adv_", f1))
    return metrics


__all__ = ["evaluate_all", "metrics_of", "predict"]
