"""RoseConfig validation and eligibility rules on real Hugging Face architectures' parameter names."""

import pytest
import torch
import transformers

from rose_ds import NoEligibleTensorError, RoseAdamW, RoseConfig, RoseConfigError
from rose_ds.selection import eligible_names


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(mode="third"), "mode", "one of none, first, second, ensemble"),
        (dict(upper=101), "upper", "[0, 100]"),
        (dict(upper=-1), "upper", "[0, 100]"),
        (dict(upper=float("nan")), "upper", "[0, 100]"),
        (dict(lower=-0.5), "lower", "[0, 100]"),
        (dict(lower=70, upper=70), "lower", "below upper=70"),
        (dict(lower=80, upper=60), "lower", "below upper=60"),
        (dict(gamma=1.5), "gamma", "[0, 1]"),
        (dict(gamma="0.5"), "gamma", "[0, 1]"),
        (dict(second_order_coef=0), "second_order_coef", "> 0"),
        (dict(second_order_coef=float("inf")), "second_order_coef", "> 0"),
        (dict(warmup_steps=-1), "warmup_steps", "integer >= 0"),
        (dict(warmup_steps=1.5), "warmup_steps", "integer >= 0"),
        (dict(eligibility="t5"), "eligibility", "preset name"),
        (dict(eligibility_regex="(unclosed"), "eligibility_regex", "valid regular expression"),
    ],
)
def test_invalid_values_fail_with_one_line(kwargs, field, allowed):
    with pytest.raises(RoseConfigError) as err:
        RoseConfig(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert f"RoseConfig.{field}=" in message and allowed in message
    value = kwargs[field] if field in kwargs else None
    if value is not None and field != "lower":
        assert repr(value) in message


def test_defaults_are_valid_and_serialisable():
    cfg = RoseConfig()
    assert cfg.to_dict() == dict(
        mode="ensemble",
        upper=70.0,
        lower=0.0,
        gamma=0.5,
        second_order_coef=0.1,
        warmup_steps=0,
        eligibility="original",
        eligibility_regex=None,
        granularity="tensor",
        scope="global",
    )


def _names(config_cls, model_cls, **kw):
    cfg = config_cls(**kw)
    return [n for n, _ in model_cls(cfg).named_parameters()]


SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)


@pytest.fixture(scope="module")
def arch_names():
    t = transformers
    return {
        "bert": _names(t.BertConfig, t.BertForSequenceClassification, num_hidden_layers=2, **SMALL),
        "roberta": _names(t.RobertaConfig, t.RobertaForSequenceClassification, num_hidden_layers=2, **SMALL),
        "deberta": _names(t.DebertaV2Config, t.DebertaV2ForSequenceClassification, num_hidden_layers=2, **SMALL),
        "gpt2": _names(t.GPT2Config, t.GPT2ForSequenceClassification, n_layer=2, n_embd=16, n_head=2, vocab_size=50),
        "llama": _names(
            t.LlamaConfig, t.LlamaForSequenceClassification, num_hidden_layers=2, num_key_value_heads=2, **SMALL
        ),
        "qwen": _names(
            t.Qwen2Config, t.Qwen2ForSequenceClassification, num_hidden_layers=2, num_key_value_heads=2, **SMALL
        ),
        "mistral": _names(
            t.MistralConfig, t.MistralForSequenceClassification, num_hidden_layers=2, num_key_value_heads=2, **SMALL
        ),
    }


# 2 layers each: tensors per layer that the family's rule must select.
EXPECTED_PER_LAYER = {"bert": 8, "roberta": 8, "deberta": 8, "gpt2": 6, "llama": 9, "qwen": 9, "mistral": 9}


@pytest.mark.parametrize("arch", list(EXPECTED_PER_LAYER))
def test_family_presets_select_block_weights_only(arch_names, arch):
    names = arch_names[arch]
    chosen = eligible_names(names, RoseConfig(eligibility=arch))
    assert len(chosen) == 2 * EXPECTED_PER_LAYER[arch]
    assert all(n.endswith("weight") for n in chosen)
    assert not any("embed" in n or "wte" in n or "wpe" in n or "classifier" in n or "score" in n for n in chosen)


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_original_rule_equals_the_encoder_preset(arch_names, arch):
    names = arch_names[arch]
    assert eligible_names(names, RoseConfig()) == eligible_names(names, RoseConfig(eligibility="bert"))


def test_original_rule_on_gpt2_is_refused_with_the_rule_and_example_names(arch_names):
    names = arch_names["gpt2"]
    with pytest.raises(NoEligibleTensorError) as err:
        eligible_names(names, RoseConfig(mode="first"))
    message = str(err.value)
    assert "\n" not in message and "'layer' and 'weight'" in message
    assert all(repr(n) in message for n in names[:3])
    # mode none needs no eligible tensor
    assert eligible_names(names, RoseConfig(mode="none")) == []


def test_regex_overrides_the_preset(arch_names):
    names = arch_names["gpt2"]
    chosen = eligible_names(names, RoseConfig(eligibility_regex=r"\.mlp\..*weight$"))
    assert chosen == [n for n in names if ".mlp." in n and n.endswith("weight")] and len(chosen) == 4
    with pytest.raises(NoEligibleTensorError, match="regex 'nomatch'"):
        eligible_names(names, RoseConfig(eligibility_regex="nomatch"))


def test_optimizer_refuses_a_rule_that_selects_nothing():
    t = transformers
    model = t.GPT2ForSequenceClassification(t.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(NoEligibleTensorError, match="selects no parameter"):
        RoseAdamW(model.named_parameters(), rose=RoseConfig(mode="ensemble"))
    assert len(RoseAdamW(model.named_parameters(), rose=RoseConfig(eligibility="gpt2")).eligible_names) == 6


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_what_the_readme_says_of_decoder_eligibility(family):
    """README: on Llama, Qwen2 and Mistral the original rule selects exactly the llama preset's tensors
    (every block weight, norms included; no embedding, final norm or head); GPT-2 needs its preset."""
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64)  # fmt: skip
    config = {
        "llama": lambda: transformers.LlamaConfig(**small),
        "qwen2": lambda: transformers.Qwen2Config(**small),
        "mistral": lambda: transformers.MistralConfig(**small),
        "gpt2": lambda: transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64),
    }[family]()
    for auto in (transformers.AutoModelForSequenceClassification, transformers.AutoModelForCausalLM):
        with torch.device("meta"):
            names = [n for n, _ in auto.from_config(config).named_parameters()]
        preset = eligible_names(names, RoseConfig(eligibility="gpt2" if family == "gpt2" else "llama"))
        assert len(preset) == (12 if family == "gpt2" else 18)
        if family == "gpt2":
            with pytest.raises(NoEligibleTensorError):
                eligible_names(names, RoseConfig(eligibility="original"))
        else:
            assert eligible_names(names, RoseConfig(eligibility="original")) == preset
