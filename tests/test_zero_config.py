"""Configurations rose_ds refuses before DeepSpeed starts, and the pin on DeepSpeed internals."""

import re
from pathlib import Path

import pytest
from models import tiny_bert

import rose_ds
from rose_ds import RoseConfig


@pytest.mark.parametrize(
    "config, message",
    [
        ({"optimizer": {"type": "AdamW"}}, "defines an 'optimizer'"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "'nvme' is not supported"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "'nvme' is not supported"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin_gradients"),
        ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "hpZ"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, "MiCS"),
        ("/nonexistent/ds.json", "does not exist"),
    ],
)
def test_unsupported_configurations_fail_before_deepspeed_starts(config, message):
    with pytest.raises(rose_ds.UnsupportedConfigError, match=re.escape(message)) as err:
        rose_ds.initialize(tiny_bert(), config, rose=RoseConfig())
    assert "\n" not in str(err.value)


def test_invalid_json_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(rose_ds.UnsupportedConfigError, match="not valid JSON"):
        rose_ds.initialize(tiny_bert(), path)


def test_every_private_deepspeed_attribute_is_checked_at_bind_time():
    """rose_ds.zero reads DeepSpeed's private optimizer state as ``zo.<name>``/``self.zo.<name>``;
    each such name must be listed in a ``_require`` call, so a DeepSpeed that renamed it fails at
    rose_ds.initialize with the name, not later with an AttributeError or a silent wrong step."""
    source = (Path(rose_ds.__file__).parent / "zero.py").read_text()
    used = set(re.findall(r"\bzo\.(\w+)", source))
    required = set()
    for call in re.findall(r"_require\(\s*(?:self\.)?zo,(.*?)\)", source, re.S):
        required.update(re.findall(r'"(\w+)"', call))
    public = {"optimizer", "state", "param_groups"}
    assert used - required - public == set(), f"unchecked DeepSpeed internals: {sorted(used - required - public)}"


def test_known_deepspeed_keys_are_deepspeed_s_and_the_shipped_configs_pass():
    """Every key of the unknown-key check is a string the installed DeepSpeed reads; the shipped
    configs validate; a misspelt section is refused with the right spelling suggested."""
    import json

    import deepspeed

    from rose_ds.dsconfig import KNOWN_KEYS, ConfigConflictError, validate

    source = "\n".join(p.read_text(errors="replace") for p in Path(deepspeed.__file__).parent.rglob("*.py"))
    missing = sorted(k for k in KNOWN_KEYS if f'"{k}"' not in source and f"'{k}'" not in source)
    assert missing == []
    for config in sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json")):
        validate(json.loads(config.read_text()))
    with pytest.raises(ConfigConflictError, match="did you mean 'gradient_clipping'"):
        validate({"gradient_cliping": 1.0})
