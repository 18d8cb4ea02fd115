"""The causal-LM objective: instruction and chat data with prompt-masked labels, token-level ROSE
losses, validation loss and perplexity, and AdvGLUE by label-word likelihood.

Data come in one of three formats, found from the columns (first match wins):

- ``messages``: a list of ``{"role", "content"}`` turns, rendered with the tokenizer's own chat
  template; the loss covers the assistant turns (what the template renders for each of them);
- ``prompt`` and ``response``: the prompt's tokens (with the tokenizer's special tokens) then the
  response's and the end-of-sequence token; the loss covers the response and the end token;
- ``text``: every token, and the end token, is supervised.

``train_on_prompt`` supervises every token of the first two formats as well. Examples longer than
``max_length`` tokens are cut to their first ``max_length`` (an example whose supervised tokens are
all cut away trains on nothing, as in the Hugging Face recipes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM

from rose_ds import methods
from rose_ds.losses import IGNORE_INDEX, causal_lm_losses
from rose_ds.training import RecipeError, data

FORMATS = ("messages", "prompt/response", "text")


class CausalDataError(RecipeError):
    """Causal-LM data that cannot be trained on: no known columns, no chat template, a bad turn."""


def data_format(columns: Sequence[str], where: str) -> str:
    """Which of :data:`FORMATS` a split's columns hold.

    Raises:
        CausalDataError: none of them (``where`` names the file or dataset).
    """
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "response" in columns:
        return "prompt/response"
    if "text" in columns:
        return "text"
    raise CausalDataError(
        f"{where} has columns {', '.join(columns) or '(none)'}; a causal-LM dataset needs a 'messages' column "
        "(chat turns), 'prompt' and 'response' columns, or a 'text' column"
    )


def _end(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def encode_text(text: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Every token supervised, and the end token."""
    ids = (tokenizer(text)["input_ids"] + _end(tokenizer))[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode_prompt_response(prompt: str, response: str, tokenizer, max_length: int,
                           train_on_prompt: bool) -> dict[str, list[int]]:  # fmt: skip
    """The prompt's tokens (special tokens included), then the response's and the end token; the
    prompt's labels are -100 unless ``train_on_prompt``."""
    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + _end(tokenizer)
    labels = (head if train_on_prompt else [IGNORE_INDEX] * len(head)) + tail
    return {"input_ids": (head + tail)[:max_length], "labels": labels[:max_length]}


def encode_messages(messages: Sequence[Mapping[str, str]], tokenizer, max_length: int,
                    train_on_prompt: bool) -> dict[str, list[int]]:  # fmt: skip
    """A conversation rendered with the tokenizer's chat template; the characters the template
    renders for each assistant turn (from after the generation prompt to the end of the turn) are
    supervised, found by rendering the conversation up to each turn.

    Raises:
        CausalDataError: no chat template, no assistant turn, or a template that renders a turn
            differently once later turns follow (the assistant's tokens cannot then be told apart).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CausalDataError(
            "the tokenizer of this model has no chat template, needed for the 'messages' column; use a model "
            "whose tokenizer_config.json has one, or 'prompt'/'response' columns"
        )
    if not any(m.get("role") == "assistant" for m in messages):
        raise CausalDataError("a 'messages' example has no assistant turn to train on; drop it or add one")

    def render(turns, generation_prompt=False):
        return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start, stop = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (stop.startswith(start) and full.startswith(stop)):
            raise CausalDataError(
                "the chat template renders a turn differently once later turns follow, so the assistant's "
                "tokens cannot be found; use 'prompt'/'response' columns"
            )
        spans.append((len(start), len(stop)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [t if any(a <= begin < b for a, b in spans) else IGNORE_INDEX
                  for t, (begin, _) in zip(ids, encoded["offset_mapping"])]  # fmt: skip
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode(dataset: datasets.Dataset, tokenizer, max_length: int, train_on_prompt: bool,
           where: str) -> datasets.Dataset:  # fmt: skip
    """``input_ids`` and ``labels`` of every example (:func:`data_format` decides how)."""
    encoders = {
        "messages": lambda row: encode_messages(row["messages"], tokenizer, max_length, train_on_prompt),
        "prompt/response": lambda row: encode_prompt_response(row["prompt"], row["response"], tokenizer, max_length,
                                                              train_on_prompt),
        "text": lambda row: encode_text(row["text"], tokenizer, max_length),
    }  # fmt: skip
    return dataset.map(encoders[data_format(dataset.column_names, where)], remove_columns=dataset.column_names)


class CausalCollator:
    """Pads a batch of ``input_ids``/``labels`` on the right to its longest example: the pad token
    in the inputs, -100 in the labels, 0 in the attention mask."""

    def __init__(self, tokenizer) -> None:
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def validation_loss(model, dataset, collate: Callable, batch_size: int, device: str) -> dict[str, float]:
    """Mean cross-entropy over every supervised token of ``dataset`` (dropout off), and its
    perplexity. Every rank runs every batch (ZeRO-3's forward passes are collective)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                             generator=torch.Generator()):  # fmt: skip
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        losses = causal_lm_losses(model, batch, labels, two_passes=False)
        total += float(losses.task) * losses.tokens
        tokens += losses.tokens
    loss = total / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


# AdvGLUE by label-word likelihood (the protocol of AdvGLUE++ / DecodingTrust for instruction-tuned
# models): each item is rendered into its task's prompt, and the prediction is the label word (in
# label order) of highest summed log-likelihood as the continuation of the prompt.
LABEL_WORD_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Sentence: {sentence}\nQuestion: Is the sentiment of this sentence positive or negative?\nAnswer:",
             (" negative", " positive")),
    "qqp": ("Question 1: {question1}\nQuestion 2: {question2}\nQuestion: Do both questions ask the same thing? "
            "Answer yes or no.\nAnswer:", (" no", " yes")),
    "mnli": ("Premise: {premise}\nHypothesis: {hypothesis}\nQuestion: Does the premise entail the hypothesis? "
             "Answer yes, maybe or no.\nAnswer:", (" yes", " maybe", " no")),
    "qnli": ("Question: {question}\nSentence: {sentence}\nQuestion: Does the sentence answer the question? "
             "Answer yes or no.\nAnswer:", (" yes", " no")),
    "rte": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Does sentence 1 entail sentence 2? "
            "Answer yes or no.\nAnswer:", (" yes", " no")),
}  # fmt: skip


@torch.no_grad()
def label_word_accuracy(model, items: datasets.Dataset, task: str, tokenizer, batch_size: int,
                        device: str) -> float:  # fmt: skip
    """Accuracy on classification ``items`` (AdvGLUE's columns and ``label``) by label-word likelihood
    after :data:`LABEL_WORD_PROMPTS` ``[task]``. Every rank runs every batch."""
    template, words = LABEL_WORD_PROMPTS[task]
    model.eval()
    rows = []  # one a (item, label word): the prompt's tokens supervised nowhere, the word's everywhere
    for item in items:
        prompt = tokenizer(template.format(**item))["input_ids"]
        for word in words:
            tail = tokenizer(word, add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": prompt + tail, "labels": [IGNORE_INDEX] * len(prompt) + tail})
    collate = CausalCollator(tokenizer)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (picked * (target != IGNORE_INDEX)).sum(-1).tolist()
    preds = torch.tensor(scores).view(len(items), len(words)).argmax(-1)
    return int((preds == torch.tensor(items["label"])).sum()) / max(1, len(items))


def load_raw(args) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits of ``--train_file``/``--validation_file`` or ``--dataset_name``.

    Raises:
        CausalDataError: neither given, or a hub dataset without a validation split.
        DataError: a missing or unreadable file (:func:`~rose_ds.training.data.read_checked`).
        OSError: the hub out of reach.
    """
    if args.train_file:
        return data.read_checked(args, data.read_local)
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name)
        held_out = next((s for s in ("validation", "test") if s in raw), None)
        if "train" not in raw or held_out is None:
            raise CausalDataError(f"--dataset_name {args.dataset_name!r} has splits {', '.join(raw)}; it needs "
                                  "'train' and 'validation' (or 'test'); pass local files instead")  # fmt: skip
        return datasets.DatasetDict(train=raw["train"], validation=raw[held_out])
    if args.task_name == "rotten_tomatoes":
        return instruction_task(data.load_rotten_tomatoes(args.adv_file or _shared_advglue(), seed=args.seed), "sst2")
    raise CausalDataError("--objective causal_lm needs --train_file and --validation_file, or --dataset_name")


def _shared_advglue() -> str | None:
    return str(data.SHARED_ADVGLUE) if data.SHARED_ADVGLUE.is_file() else None


def instruction_task(raw: datasets.DatasetDict, task: str) -> datasets.DatasetDict:
    """A classification task as prompt/response pairs: the item in its :data:`LABEL_WORD_PROMPTS`
    prompt, the label word as the response (the embedded offline causal-LM data: Rotten Tomatoes)."""
    template, words = LABEL_WORD_PROMPTS[task]
    return raw.map(lambda row: {"prompt": template.format(**row), "response": words[row["label"]]},
                   remove_columns=raw["train"].column_names)  # fmt: skip


class CausalLM:
    """``--objective causal_lm``: next-token prediction on the supervised tokens, token-level ROSE."""

    name = "causal_lm"
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def check(self, args: Any, method: methods.MethodConfig) -> None:
        if args.model_name_or_path is None:
            raise CausalDataError("--objective causal_lm needs --model_name_or_path: a decoder (Llama, Qwen2, Mistral, "
                                  "GPT-2 and their kin) as a path or hub name")  # fmt: skip
        if not (args.train_file or args.dataset_name or args.task_name == "rotten_tomatoes"):
            raise CausalDataError("--objective causal_lm needs --train_file and --validation_file, or --dataset_name")

    def load_data(self, args: Any, tokenizer: Any) -> data.TaskData:
        raw = load_raw(args)
        train, validation = data.training_splits(raw, args.seed, args.max_train_samples, args.max_eval_samples)
        where = args.train_file or args.dataset_name or "the embedded Rotten Tomatoes"
        splits = []
        for split, dataset in (("training", train), ("validation", validation)):
            if len(dataset) == 0:
                raise CausalDataError(f"the {split} split is empty; pass data with examples")
            splits.append(encode(dataset, tokenizer, args.max_seq_length, args.train_on_prompt, f"{where!r}"))
        task = "sst2" if args.task_name == "rotten_tomatoes" else args.task_name
        adv = data.load_advglue(task, args.adv_file or _shared_advglue()) if task in LABEL_WORD_PROMPTS else None
        return data.TaskData(*splits, adv, None, task)

    def model_kwargs(self, task: data.TaskData) -> dict[str, Any]:
        return {}

    def collator(self, tokenizer: Any) -> CausalCollator:
        return CausalCollator(tokenizer)

    def loss_fn(self, method: methods.MethodConfig | None):
        """Token-level ROSE losses. With ``--method rdrop`` the task loss gains R-Drop's term per token:
        ``rdrop_alpha * (KL(P1||P2) + KL(P2||P1)) / 2`` averaged over the supervised tokens (the mean, as
        the cross-entropy is; the classification term is the authors' sum over the batch); with
        ``--method r3f`` R3F's: ``r3f_lambda * (KL(P||Pn) + KL(Pn||P))`` averaged over the supervised
        tokens, ``Pn`` a pass over noisy input embeddings (run in the same forward)."""
        if method is not None and method.name == "r3f":

            def r3f_losses(model, inputs, labels, two_passes: bool = True):
                losses = causal_lm_losses(model, inputs, labels, two_passes=two_passes,
                                          noise=lambda e: methods.r3f_noise(e, method))  # fmt: skip
                term = method.r3f_lambda * losses.noise / max(1, losses.tokens)
                return losses._replace(task=losses.task + term, noise=None)

            return r3f_losses
        if method is None or method.name != "rdrop":
            return causal_lm_losses  # ChildTuning-F/D mask gradients only: the losses are ROSE's

        def rdrop_losses(model, inputs, labels, two_passes: bool = True):
            losses = causal_lm_losses(model, inputs, labels, two_passes=True)  # R-Drop needs both passes
            term = method.rdrop_alpha * 2 * losses.robust / max(1, losses.tokens)  # robust: the KL sum / 4
            losses = losses._replace(task=losses.task + term)
            return losses if two_passes else losses._replace(robust=None)

        return rdrop_losses

    def evaluate(self, model: Any, task: data.TaskData, tokenizer: Any, batch_size: int,
                 device: str) -> dict[str, float]:  # fmt: skip
        metrics = validation_loss(model, task.validation, self.collator(tokenizer), batch_size, device)
        if task.adv is not None:
            metrics["adv_accuracy"] = label_word_accuracy(model, task.adv, task.task, tokenizer, batch_size, device)
        return metrics

    def summary(self, metrics: dict[str, float], task: data.TaskData) -> str:
        line = f"validation loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}"
        if "adv_accuracy" in metrics:
            line += f", AdvGLUE {task.task} accuracy by label words {metrics['adv_accuracy']:.4f}"
        return line


OBJECTIVE = CausalLM()

__all__ = [
    "OBJECTIVE",
    "CausalLM",
    "load_raw",
    "FORMATS",
    "LABEL_WORD_PROMPTS",
    "CausalCollator",
    "CausalDataError",
    "data_format",
    "encode",
    "encode_messages",
    "encode_prompt_response",
    "encode_text",
    "label_word_accuracy",
    "validation_loss",
]
