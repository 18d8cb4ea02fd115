"""The recipe components of rose_ds.training on their own: typed one-line errors, the flags that build
RoseConfig/MethodConfig, the loop state and the schedule on resume."""

import dataclasses

import pytest
import torch

from rose_ds.config import RoseConfig
from rose_ds.methods import MethodConfig
from rose_ds.training import RecipeError
from rose_ds.training.args import ArgumentError, FinetuneArgs, RoseArgs, parse_args
from rose_ds.training.checkpoint import CheckpointError, TrainState, set_peak_learning_rate
from rose_ds.training.data import DataError
from rose_ds.training.dsconfig import ConfigConflictError, read
from rose_ds.training.launcher import LauncherError, default_bf16, launcher_environment


def test_every_library_error_is_a_recipe_error():
    for error in (ArgumentError, CheckpointError, DataError, ConfigConflictError, LauncherError):
        assert issubclass(error, RecipeError)


def test_rose_args_cover_every_config_field():
    flags = {f.name for f in dataclasses.fields(RoseArgs)}
    assert {f"rose_{f.name}" for f in dataclasses.fields(RoseConfig)} <= flags
    assert {f.name for f in dataclasses.fields(MethodConfig)} - {"name", "seed"} <= flags
    args = parse_args(["--rose_mode", "second", "--rose_upper", "55", "--method", "rdrop", "--rdrop_alpha", "2",
                       "--seed", "3"])  # fmt: skip
    assert args.rose_config() == RoseConfig(mode="second", upper=55.0)
    assert args.method_config(args.seed) == MethodConfig(name="rdrop", rdrop_alpha=2.0, seed=3)


@pytest.mark.parametrize(
    "argv, start",
    [
        (["--rose_upper", "150"], "--rose_upper"),
        (["--method", "mixout"], "--method"),
        (["--childtuning_p", "0"], "--childtuning_p"),
        (["--learning_rat", "1e-5"], "unrecognized arguments: --learning_rat"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive"),
        (["--rose_preset", "sst2-huge-first"], "--rose_preset 'sst2-huge-first' is unknown"),
        (["--bf16", "maybe"], "argument --bf16: 'maybe' is not true or false"),
        (["--lora_r", "-2"], "--lora_r -2: must be 0 (no LoRA) or a positive rank"),
        (["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
        (["--lora_r", "8", "--lora_target_modules", " , "], "--lora_target_modules is empty"),
        (["--attn_implementation", "flash"], "--attn_implementation 'flash': use one of eager, sdpa"),
    ],
)
def test_bad_flags_raise_one_line_argument_errors(argv, start):
    with pytest.raises(ArgumentError) as err:
        parse_args(argv)
    assert str(err.value).startswith(start) and "\n" not in str(err.value)


def test_bf16_and_lora_flags_parse_as_documented():
    assert parse_args([]).bf16 is None  # decided by the program (default_bf16)
    assert parse_args(["--bf16"]).bf16 is True and parse_args(["--bf16", "false"]).bf16 is False
    args = parse_args(["--lora_r", "8", "--lora_target_modules", "q_proj, v_proj", "--merge_lora"])
    assert args.rose_config().eligibility == "lora" and parse_args([]).rose_config().eligibility == "original"
    assert parse_args(["--lora_r", "8", "--rose_eligibility", "llama"]).rose_config().eligibility == "llama"
    config = args.lora_config("CAUSAL_LM")
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 16.0, {"q_proj", "v_proj"})
    assert parse_args(["--lora_r", "4"]).lora_config("SEQ_CLS").target_modules == "all-linear"
    assert parse_args([]).lora_config("CAUSAL_LM") is None


@pytest.mark.parametrize(
    "objective, device, supported, expected",
    [("causal_lm", "cuda", True, True), ("causal_lm", "cuda", False, False), ("causal_lm", "cpu", True, False),
     ("classification", "cuda", True, False), ("causal_lm", "xpu", True, True)],
)  # fmt: skip
def test_bf16_is_the_default_for_decoders_on_accelerators_with_it(objective, device, supported, expected):
    assert default_bf16(objective, device, supported) is expected


def test_preset_sets_learning_rate_mode_and_band():
    args = FinetuneArgs(rose_preset="sst2-base-ensemble")
    assert (args.learning_rate, args.rose_mode, args.rose_upper) == (5e-5, "ensemble", 40.0)


def test_train_state_names_the_last_good_checkpoint():
    state = TrainState(last_saved="global_step10")
    assert not state.note_finite(True, limit=3) and state.good_checkpoint == "global_step10"
    state.last_saved = "global_step20"  # saved, then the loss went NaN: step 20's weights are suspect
    assert not state.note_finite(False, limit=3) and not state.note_finite(False, limit=3)
    assert state.note_finite(False, limit=3) and state.nonfinite == 3 and state.good_checkpoint == "global_step10"
    assert dataclasses.asdict(TrainState(**dataclasses.asdict(state))) == dataclasses.asdict(state)  # JSON round trip


def test_set_peak_learning_rate_keeps_the_position():
    total, warmup = 10, 2

    def schedule(step):
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for _ in range(4):
        opt.step()
        scheduler.step()
    set_peak_learning_rate(scheduler, 2e-4)
    assert scheduler.last_epoch == 4
    assert scheduler.get_last_lr() == [2e-4 * schedule(4)] * 2 == [g["lr"] for g in opt.param_groups]


def test_dsconfig_read_names_the_file(tmp_path):
    with pytest.raises(ConfigConflictError, match="no such file"):
        read(str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigConflictError, match="bad.json: not valid JSON"):
        read(str(tmp_path / "bad.json"))


def test_rank_without_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    for key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(LauncherError, match="RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT is not"):
        launcher_environment()
