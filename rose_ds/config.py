"""Typed, validated configuration for ROSE selection.

Every field is checked in ``__post_init__``; an invalid value raises :class:`RoseConfigError` whose
message is one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

MODES = ("none", "first", "second", "ensemble")
GRANULARITIES = ("tensor", "element")
SCOPES = ("global", "tensor")

# Eligibility presets. "original" is the authors' substring rule; the others are regular expressions
# (``re.search`` on the parameter name) for the families whose names the original rule misses or
# over-matches. Each selects the weights (not biases) of every transformer block, LayerNorm/RMSNorm
# weights included, and never embeddings or the classification head, as the original does on BERT.
ELIGIBILITY_PRESETS: dict[str, str | None] = {
    # "layer" in name and "weight" in name (case-sensitive), exactly as in the released code.
    "original": None,
    # BERT, RoBERTa, DeBERTa(-v2), ELECTRA, MiniLM: encoder.layer.N.*.weight
    "bert": r"(^|\.)encoder\.layer\.\d+\..*weight$",
    # GPT-2 / GPT-Neo / GPT-J style: transformer.h.N.*.weight
    "gpt2": r"(^|\.)h\.\d+\..*weight$",
    # Llama, Qwen, Mistral, Gemma style: model.layers.N.*.weight
    "llama": r"(^|\.)layers\.\d+\..*weight$",
    # PEFT LoRA adapters of any architecture: every lora_A / lora_B (and DoRA's magnitude); an adapted
    # module's tensors form one selection unit (rose_ds.selection.selection_units)
    "lora": r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.",
}
ELIGIBILITY_ALIASES = {
    "roberta": "bert",
    "deberta": "bert",
    "electra": "bert",
    "gpt-2": "gpt2",
    "gpt_neo": "gpt2",
    "qwen": "llama",
    "qwen2": "llama",
    "mistral": "llama",
}


class RoseConfigError(ValueError):
    """An invalid ROSE configuration value (the message is one line naming the field)."""


@dataclass
class RoseConfig:
    """What ROSE selects and how.

    Attributes:
        mode: ``"none"`` (plain AdamW: the baseline), ``"first"`` (robust-loss gradient norms),
            ``"second"`` (task gradient against momentum) or ``"ensemble"`` (a gamma-weighted mix of
            both masks).
        upper: Upper percentile of the kept score band, in percent (0-100). A tensor is kept when
            ``quantile(lower) <= score <= quantile(upper)``; the published runs keep the lowest-risk
            ``upper`` percent.
        lower: Lower percentile of the kept band, in percent; must be below ``upper``. Published: 0.
        gamma: Weight of the first-order mask in the ensemble, ``c = (1 - gamma) * M2 + gamma * M1``
            (0-1). Published: 0.5.
        second_order_coef: The constant ``k`` in the second-order score ``|k * ||g|| / ||m|| - 1|``
            (hard-coded 0.1 in the original; equals ``1 - beta1`` for ``beta1 = 0.9``). Must be > 0.
        warmup_steps: Number of first optimizer steps without masking (every tensor is updated).
            The original skips masking during the learning-rate warm-up; published runs use 0.
        eligibility: Which parameters take part in selection: a preset name (``"original"``: the
            authors' rule, ``"layer"`` and ``"weight"`` both substrings of the name; ``"bert"``
            (also ``roberta``, ``deberta``, ``electra``), ``"gpt2"``, ``"llama"`` (also ``qwen``,
            ``mistral``), ``"lora"`` (the adapter tensors of a PEFT LoRA model)). Ignored when
            ``eligibility_regex`` is set. Whatever the rule, a LoRA adapter's tensors of one module
            (``lora_A`` and ``lora_B``) share one score and one mask value (see
            :func:`rose_ds.selection.selection_units`).
        eligibility_regex: A regular expression matched with ``re.search`` against each parameter
            name; overrides ``eligibility``.
        granularity: ``"tensor"`` (the paper: one score and one mask value per eligible tensor) or
            ``"element"`` (one score per element of every eligible tensor: first-order
            ``|g_rob|``, second-order ``|k * g / m - 1|``; the band is taken over the elements).
        scope: Element granularity only: ``"global"`` (one band over all eligible elements of the
            model) or ``"tensor"`` (a band per tensor over its own elements).
    """

    mode: str = "ensemble"
    upper: float = 70.0
    lower: float = 0.0
    gamma: float = 0.5
    second_order_coef: float = 0.1
    warmup_steps: int = 0
    eligibility: str = "original"
    eligibility_regex: str | None = None
    granularity: str = "tensor"
    scope: str = "global"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            _fail("mode", self.mode, f"one of {', '.join(MODES)}")
        for name in ("upper", "lower"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 100.0:
                _fail(name, value, "a percentage in [0, 100]")
        if not self.lower < self.upper:
            _fail("lower", self.lower, f"a value below upper={self.upper}")
        if not _is_real(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            _fail("gamma", self.gamma, "a number in [0, 1]")
        if not _is_real(self.second_order_coef) or not self.second_order_coef > 0:
            _fail("second_order_coef", self.second_order_coef, "a finite number > 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "an integer >= 0")
        key = ELIGIBILITY_ALIASES.get(self.eligibility, self.eligibility)
        if key not in ELIGIBILITY_PRESETS:
            names = sorted(set(ELIGIBILITY_PRESETS) | set(ELIGIBILITY_ALIASES))
            _fail("eligibility", self.eligibility, f"a preset name ({', '.join(names)})")
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, f"one of {', '.join(GRANULARITIES)}")
        if self.scope not in SCOPES:
            _fail("scope", self.scope, f"one of {', '.join(SCOPES)}")
        if self.scope == "tensor" and self.granularity == "tensor":
            _fail("scope", self.scope, "'global' with granularity='tensor' (a band per tensor needs 'element')")
        if self.eligibility_regex is not None:
            try:
                re.compile(self.eligibility_regex)
            except (re.error, TypeError) as err:
                _fail("eligibility_regex", self.eligibility_regex, f"a valid regular expression ({err})")

    @property
    def eligibility_rule(self) -> str:
        """A readable name of the rule in force, used in messages and logs."""
        if self.eligibility_regex is not None:
            return f"regex {self.eligibility_regex!r}"
        key = ELIGIBILITY_ALIASES.get(self.eligibility, self.eligibility)
        pattern = ELIGIBILITY_PRESETS[key]
        if pattern is None:
            return "preset 'original' ('layer' and 'weight' in the name)"
        return f"preset {self.eligibility!r} (regex {pattern!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable), for checkpoints and logs."""
        return asdict(self)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise RoseConfigError(f"RoseConfig.{field}={value!r} is invalid: expected {allowed}")
