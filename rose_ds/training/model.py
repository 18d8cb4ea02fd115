"""The model a recipe fine-tunes: judged on a weightless skeleton before its weights are loaded, then
loaded with the memory features asked for (attention kernel, gradient checkpointing, LoRA adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
from transformers.pytorch_utils import Conv1D

from rose_ds import methods, selection
from rose_ds.config import RoseConfig
from rose_ds.dropout import set_dropout
from rose_ds.training import RecipeError
from rose_ds.training.data import embedded_model_path, sequence_limit


class ModelError(RecipeError):
    """A model that cannot be loaded or fine-tuned as asked (one line naming the flag and the fix)."""


def load_tokenizer(args):
    """The model's path, config and tokenizer (a pad token added for decoders); ``--max_seq_length``
    checked against the model's limit.

    Args:
        args: The recipe's arguments (``model_name_or_path``, ``max_seq_length``).

    Returns:
        ``(model_path, model_config, tokenizer)``.

    Raises:
        ModelError: a missing package, folder or model, the hub out of reach, or too long a sequence.
    """
    try:
        model_path = args.model_name_or_path or embedded_model_path()
    except FileNotFoundError as err:  # the embedded default's package is not installed
        raise ModelError(str(err)) from None
    try:
        model_config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ModelError(f"--model_name_or_path {model_path!r}: {str(err).splitlines()[0]}") from None
    limit = sequence_limit(model_config, tokenizer)
    if limit is not None and args.max_seq_length > limit:
        raise ModelError(f"--max_seq_length {args.max_seq_length} is above the model's limit of {limit} tokens; "
                         f"pass {limit} or less")  # fmt: skip
    if tokenizer.pad_token is None:  # decoder models (GPT-2, Llama) have none
        tokenizer.pad_token = tokenizer.eos_token
    return model_path, model_config, tokenizer


def check_model(args, model_config, rose: RoseConfig, method: methods.MethodConfig, model_path: str,
                objective) -> None:  # fmt: skip
    """Everything about the model judged on a weightless skeleton (its parameters on the meta device):
    the attention kernel, gradient checkpointing, the LoRA target modules, the eligibility rule (over
    the tensors that will train) and the method.

    Args:
        args: The recipe's arguments (``attn_implementation``, ``gradient_checkpointing``, the LoRA flags).
        model_config: The model's config.
        rose: The ROSE configuration (its eligibility rule).
        method: The composed method.
        model_path: The model's path or name (for the messages).
        objective: The objective (its ``auto_class`` and ``peft_task_type``).

    Raises:
        ModelError: naming the flag and the fix.
    """
    try:
        with torch.device("meta"):
            skeleton = objective.auto_class.from_config(model_config, **_attention(args))
    except (ImportError, ValueError, KeyError) as err:
        flag = f"--attn_implementation {args.attn_implementation}" if args.attn_implementation else \
            f"--model_name_or_path {model_path!r}"  # fmt: skip
        raise ModelError(f"{flag}: {str(err).splitlines()[0][:200]}") from None
    if args.gradient_checkpointing and not skeleton.supports_gradient_checkpointing:
        raise ModelError(f"--gradient_checkpointing: {type(skeleton).__name__} does not support gradient "
                         "checkpointing; drop the flag")  # fmt: skip
    skeleton = apply_lora(skeleton, args, objective.peft_task_type)
    try:
        selection.eligible_names([n for n, p in skeleton.named_parameters() if p.requires_grad], rose)
    except selection.NoEligibleTensorError as err:
        raise ModelError(str(err)) from None
    if why := methods.unsupported(method, skeleton):
        raise ModelError(why)


def load_model(args, objective, model_path: str, tokenizer, task, ds_config: dict[str, Any] | None = None):
    """The pre-trained model with ROSE's dropout (``--rose_dropout``, on the base model: LoRA's own
    dropout stays ``--lora_dropout``), the attention kernel, gradient checkpointing and LoRA adapters.

    Under ZeRO-3 (``ds_config``'s stage) the model is built already partitioned over the ranks
    (``deepspeed.zero.Init``, through Transformers' ``HfDeepSpeedConfig``, as the Trainer does) and its
    weights are loaded tensor by tensor: no rank ever holds the whole model, which a model of billions of
    parameters needs. Every rank calls it then.
    """
    zero3 = (ds_config or {}).get("zero_optimization", {}).get("stage") == 3
    # Transformers reads it through a weak reference: alive while the model is built, gone after, so
    # that later loads (the merged LoRA export on one rank) are plain ones
    hf_zero3 = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = objective.auto_class.from_pretrained(model_path, **objective.model_kwargs(task), **_attention(args))
    model.config.pad_token_id = tokenizer.pad_token_id
    try:
        set_dropout(model, args.rose_dropout)
    except ValueError as err:  # no dropout site at all
        raise ModelError(f"--rose_dropout {args.rose_dropout}: {err}") from None
    if args.gradient_checkpointing:
        # non-reentrant: the recomputation replays the forward's dropout masks (ROSE's two passes differ
        # by them) and needs no input that requires grad (a LoRA model's embeddings are frozen)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_lora(model, args, objective.peft_task_type)  # (PEFT reads the ZeRO-3 flag too)
    del hf_zero3
    return model


def merge_lora(adapter_dir: Path, dest: Path, auto_class, model_path: str, tokenizer,
               model_kwargs: dict[str, Any]) -> None:  # fmt: skip
    """Writes to ``dest`` the pre-trained model (``auto_class.from_pretrained(model_path, **model_kwargs)``)
    with the LoRA adapter saved in ``adapter_dir`` merged into its weights: a plain Hugging Face model
    that ``from_pretrained`` loads without peft. One process."""
    import peft

    base = auto_class.from_pretrained(model_path, **model_kwargs)
    base.config.pad_token_id = tokenizer.pad_token_id
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def _attention(args) -> dict[str, Any]:
    kernel = getattr(args, "attn_implementation", None)
    return {"attn_implementation": kernel} if kernel else {}


def apply_lora(model: torch.nn.Module, args, task_type: str) -> torch.nn.Module:
    """``model`` wrapped in PEFT LoRA adapters as ``args`` (:class:`~rose_ds.training.args.LoraArgs`) ask,
    for PEFT's ``task_type``; ``model`` itself without ``--lora_r``.

    Raises:
        ModelError: target modules that match nothing, or of a kind LoRA cannot adapt.
    """
    config = args.lora_config(task_type)
    if config is None:
        return model
    import peft

    if args.target_modules != "all-linear":  # PEFT drops names that match nothing while one matches
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in args.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, (torch.nn.Linear, Conv1D))})  # fmt: skip
            raise ModelError(f"--lora_target_modules {args.lora_target_modules}: {', '.join(missing)} matches "
                             f"no module of the model; its linear layers: {', '.join(linear)} "
                             f"(or pass all-linear)")  # fmt: skip
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # target modules that match nothing, or of a kind LoRA cannot adapt
        raise ModelError(f"--lora_target_modules {args.lora_target_modules}: {str(err).splitlines()[0][:300]}") \
            from None  # fmt: skip


__all__ = ["ModelError", "apply_lora", "check_model", "load_model", "load_tokenizer", "merge_lora"]
