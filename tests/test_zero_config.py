"""Configurations rose_ds refuses before DeepSpeed starts, and the pin on DeepSpeed internals."""

import re
from pathlib import Path

import pytest
from models import tiny_bert

import rose_ds
import rose_ds.zero
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
    # DeepSpeed's private attributes on parameters, their fragments and gradient buffers
    private = {"_hp_mapping", "hp_fragment_address", "lp_fragment_address", "ds_tensor", "ds_numel", "grad_accum",
               "flat_partition"}  # fmt: skip
    checked = {n for call in re.findall(r"_require\((.*?)\)", source, re.S) for n in re.findall(r'"(\w+)"', call)}
    used = {n for n in re.findall(r"\.(\w+)\b", source) if n in private}
    assert used and used - checked == set(), f"unchecked DeepSpeed internals: {sorted(used - checked)}"


@pytest.mark.parametrize("version", ["0.18.9", "0.19.7", "0.20.0", "1.0.0"])
def test_deepspeed_outside_the_tested_range_stops_at_start(version):
    with pytest.raises(rose_ds.UnsupportedConfigError) as err:
        rose_ds.zero.check_deepspeed_version(version)
    message = str(err.value)
    assert "\n" not in message and version in message and "deepspeed>=0.19.8,<0.20" in message


def test_the_installed_deepspeed_is_in_the_tested_range_and_setup_cfg_pins_it():
    import deepspeed

    rose_ds.zero.check_deepspeed_version()  # what prepare_config and the binding call
    for version in ("0.19.8", "0.19.9", "0.19.8+cpu", deepspeed.__version__):
        rose_ds.zero.check_deepspeed_version(version)
    setup = (Path(rose_ds.__file__).parents[1] / "setup.cfg").read_text()
    low, high = rose_ds.zero.TESTED_DEEPSPEED
    assert f"deepspeed>={low},<{high}" in setup


def test_the_shm_op_switch_finds_the_op_it_switches_off():
    import deepspeed

    assert rose_ds.zero.skip_shm_comm_build() is True
    assert deepspeed.ops.__compatible_ops__[rose_ds.zero.SHM_COMM_OP] is False


def test_known_deepspeed_keys_are_deepspeed_s_and_the_shipped_configs_pass():
    """Every key of the unknown-key check is a string the installed DeepSpeed reads; the shipped
    configs validate; a misspelt section is refused with the right spelling suggested."""
    import json

    import deepspeed

    from rose_ds.training.dsconfig import KNOWN_KEYS, ConfigConflictError, validate

    source = "\n".join(p.read_text(errors="replace") for p in Path(deepspeed.__file__).parent.rglob("*.py"))
    missing = sorted(k for k in KNOWN_KEYS if f'"{k}"' not in source and f"'{k}'" not in source)
    assert missing == []
    for config in sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json")):
        validate(json.loads(config.read_text()))
    with pytest.raises(ConfigConflictError, match="did you mean 'gradient_clipping'"):
        validate({"gradient_cliping": 1.0})


def test_checkpoint_loads_are_mapped_not_read(tmp_path):
    """A resume maps DeepSpeed's files (the engine holds its own states meanwhile): the loaded tensors'
    storage is the file, with the saved values; other checkpoint engines are left alone."""
    import types

    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    saved = {"exp_avg": torch.randn(1000), "step": 3}
    path, legacy = tmp_path / "optim_states.pt", tmp_path / "legacy.pt"
    torch.save(saved, path)  # DeepSpeed's engine writes zip files unless its config says otherwise
    torch.save(saved, legacy, _use_new_zipfile_serialization=False)
    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    rose_ds.zero.map_checkpoint_loads(engine)
    loaded = engine.checkpoint_engine.load(str(path), map_location=torch.device("cpu"))
    assert torch.equal(loaded["exp_avg"], saved["exp_avg"]) and loaded["step"] == 3
    assert mapped_file(loaded["exp_avg"]) == str(path)
    plain = TorchCheckpointEngine().load(str(path), map_location=torch.device("cpu"))
    assert mapped_file(plain["exp_avg"]) is None  # what DeepSpeed does: read into memory
    old = engine.checkpoint_engine.load(str(legacy), map_location=torch.device("cpu"))  # cannot be mapped: read
    assert torch.equal(old["exp_avg"], saved["exp_avg"]) and mapped_file(old["exp_avg"]) is None
    other = types.SimpleNamespace(checkpoint_engine=object())
    rose_ds.zero.map_checkpoint_loads(other)
    assert not hasattr(other.checkpoint_engine, "load")


def mapped_file(t) -> str | None:
    """The file whose mapping holds ``t``'s data (Linux), or None for anonymous memory."""
    address = t.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *name = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return name[0] if name and name[0].startswith("/") else None
    return None
