"""The model a recipe fine-tunes, judged before its weights are loaded."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoTokenizer

from rose_ds import methods, selection
from rose_ds.config import RoseConfig
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


def check_model(model_config, rose: RoseConfig, method: methods.MethodConfig, model_path: str, auto_class) -> None:
    """The eligibility rule and the method judged on the parameter names of a weightless skeleton.

    Args:
        model_config: The model's config.
        rose: The ROSE configuration (its eligibility rule).
        method: The composed method.
        model_path: The model's path or name (for the messages).
        auto_class: The objective's ``transformers`` Auto class.

    Raises:
        ModelError: no eligible tensor, a method the architecture cannot run, or no class of
            ``auto_class`` for the architecture.
    """
    try:
        with torch.device("meta"):
            skeleton = auto_class.from_config(model_config)
        selection.eligible_names([n for n, _ in skeleton.named_parameters()], rose)
    except selection.NoEligibleTensorError as err:
        raise ModelError(str(err)) from None
    except (ValueError, KeyError) as err:  # no class of auto_class for this architecture
        raise ModelError(f"--model_name_or_path {model_path!r}: {str(err).splitlines()[0][:200]}") from None
    if why := methods.unsupported(method, skeleton):
        raise ModelError(why)


__all__ = ["ModelError", "check_model", "load_tokenizer"]
