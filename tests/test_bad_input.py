"""The bad-input catalogue (docs/errors.md): every row is run through the real program and must end
with one error line that names what is wrong and how to fix it, exit status 2, no traceback, and the
output folder exactly as it was (absent stays absent, a previous run stays untouched)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "errors.md"
FAST = ["--adv_file", "none", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2"]


def _files(tmp: Path) -> dict[str, str]:
    """Small local data files, good and bad."""
    files = {
        "good.csv": "sentence,label\n" + "".join(f"text number {i},{i % 2}\n" for i in range(40)),
        "header_only.csv": "sentence,label\n",
        "negative.csv": "sentence,label\n" + "".join(f"text {i},{-1 if i % 5 == 0 else i % 2}\n" for i in range(40)),
        "broken.json": '{"sentence": "a", "label": 0}\n{"sentence": "b", "label"',
        "notes.txt": "just text\n",
        "not_json.json": "{ this is not json",
        "unknown_key.json": json.dumps({"zero_optimisation": {"stage": 2}}),
        "batch.json": json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}),
        "accumulation.json": json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}),
        "dtype.json": json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}),
        "optimizer.json": json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}),
        "offload_param_stage2.json": json.dumps(
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
        ),
        "nvme.json": json.dumps(
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}
        ),
        "stage4.json": json.dumps({"zero_optimization": {"stage": 4}}),
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "empty_folder").mkdir()
    # a model whose forward takes no inputs_embeds (a tiny byte-level Perceiver: its tokenizer needs no files)
    from transformers import PerceiverConfig, PerceiverTokenizer

    perceiver = PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                                num_self_attention_heads=1, num_cross_attention_heads=1,
                                architectures=["PerceiverForSequenceClassification"])  # fmt: skip
    perceiver.save_pretrained(tmp / "perceiver")
    PerceiverTokenizer().save_pretrained(tmp / "perceiver")
    return {name: str(tmp / name) for name in [*files, "empty_folder", "perceiver"]}


# id -> (arguments, expected text in the error line, environment changes, what the output folder holds)
def _cases(f: dict[str, str], other_checkpoint: str) -> dict[str, tuple[list[str], str, dict, str]]:
    local = ["--train_file", f["good.csv"], "--validation_file", f["good.csv"]]
    return {
        "rose-value": (["--rose_upper", "150"], "--rose_upper=150.0 is invalid", {}, "absent"),
        "rose-band": (["--rose_lower", "60", "--rose_upper", "40"], "--rose_lower=60.0 is invalid", {}, "absent"),
        "rose-mode": (["--rose_mode", "third"], "--rose_mode='third' is invalid", {}, "absent"),
        "rose-dropout": (["--rose_dropout", "1.5"], "--rose_dropout 1.5: must be in [0, 1)", {}, "absent"),
        "rose-first-without-dropout": (
            ["--rose_mode", "first", "--rose_dropout", "0"],
            "--rose_dropout 0 with --rose_mode first",
            {},
            "absent",
        ),
        "method-name": (["--method", "fgsm"], "--method='fgsm' is invalid", {}, "absent"),
        "method-value": (
            ["--method", "childtuning-f", "--childtuning_p", "0"],
            "--childtuning_p=0.0 is invalid",
            {},
            "absent",
        ),  # fmt: skip
        "method-r3f-model": (
            ["--method", "r3f", "--model_name_or_path", f["perceiver"]],
            "--method r3f perturbs input embeddings, but PerceiverForSequenceClassification takes no inputs_embeds",
            {},
            "absent",
        ),
        "rose-preset": (["--rose_preset", "sst2-huge-first"], "sst2-huge-first", {}, "absent"),
        "no-eligible-tensor": (["--rose_eligibility_regex", "no_such_param"], "selects no", {}, "absent"),
        "lora-target-modules": (
            ["--lora_r", "4", "--lora_target_modules", "no_such_module"],
            "--lora_target_modules no_such_module: no_such_module matches no module of the model; its linear layers:",
            {},
            "absent",
        ),
        "merge-lora-without-lora": (
            ["--merge_lora"],
            "--merge_lora needs adapters to merge: pass --lora_r",
            {},
            "absent",
        ),  # fmt: skip
        "gradient-checkpointing-unsupported": (
            ["--gradient_checkpointing", "--model_name_or_path", f["perceiver"]],
            "--gradient_checkpointing: PerceiverForSequenceClassification does not support gradient checkpointing",
            {},
            "absent",
        ),
        "attention-kernel-missing": (
            ["--attn_implementation", "flash_attention_2"],
            "--attn_implementation flash_attention_2: FlashAttention2 has been toggled on, but it cannot be used",
            {},
            "absent",
        ),
        "unknown-flag": (["--learning_rat", "1e-5"], "unrecognized arguments: --learning_rat", {}, "absent"),
        "bad-number": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0", {}, "absent"),
        "bf16-and-fp16": (["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive", {}, "absent"),
        "report-to": (["--report_to", "wandb"], "--report_to 'wandb'", {}, "absent"),
        "unknown-task": (["--task_name", "cola"], "--task_name 'cola' is unknown", {}, "absent"),
        "missing-train-file": (
            ["--train_file", "/nonexistent/train.csv", "--validation_file", f["good.csv"]],
            "--train_file '/nonexistent/train.csv': no such file",
            {},
            "absent",
        ),  # fmt: skip
        "no-validation-file": (["--train_file", f["good.csv"]], "--train_file needs --validation_file", {}, "absent"),
        "unsupported-extension": (
            ["--train_file", f["notes.txt"], "--validation_file", f["notes.txt"]],
            "unsupported extension 'txt'",
            {},
            "absent",
        ),  # fmt: skip
        "unreadable-file": (
            ["--train_file", f["broken.json"], "--validation_file", f["broken.json"]],
            "could not be read as .json",
            {},
            "absent",
        ),  # fmt: skip
        "label-column-missing": ([*local, "--label_column", "sentiment"], "no column 'sentiment'", {}, "absent"),
        "labels-out-of-range": (
            ["--train_file", f["negative.csv"], "--validation_file", f["good.csv"]],
            "label -1, out of range",
            {},
            "absent",
        ),  # fmt: skip
        "empty-split": (
            ["--train_file", f["header_only.csv"], "--validation_file", f["good.csv"]],
            "--train_file has no rows",
            {},
            "absent",
        ),  # fmt: skip
        "too-few-examples": (
            [*local, "--max_train_samples", "4", "--per_device_train_batch_size", "8"],
            "make no optimizer step",
            {},
            "absent",
        ),  # fmt: skip
        "sequence-too-long": (["--max_seq_length", "1024"], "above the model's limit of 512", {}, "absent"),
        "model-missing": (["--model_name_or_path", f["empty_folder"]], "--model_name_or_path", {}, "absent"),
        "deepspeed-missing": (["--deepspeed", "/nonexistent/ds.json"], "no such file", {}, "absent"),
        "deepspeed-not-json": (["--deepspeed", f["not_json.json"]], "not valid JSON", {}, "absent"),
        "deepspeed-unknown-key": (
            ["--deepspeed", f["unknown_key.json"]],
            "unknown key 'zero_optimisation': did you mean 'zero_optimization'?",
            {},
            "absent",
        ),  # fmt: skip
        "deepspeed-batch-conflict": (
            ["--deepspeed", f["batch.json"]],
            "train_micro_batch_size_per_gpu=4 but --per_device_train_batch_size gives 16",
            {},
            "absent",
        ),  # fmt: skip
        "deepspeed-accumulation-conflict": (
            ["--deepspeed", f["accumulation.json"]],
            "gradient_accumulation_steps=8 but --gradient_accumulation_steps gives 1",
            {},
            "absent",
        ),  # fmt: skip
        "deepspeed-dtype-conflict": (
            ["--deepspeed", f["dtype.json"]],
            "bf16.enabled=True but --bf16 gives False",
            {},
            "absent",
        ),  # fmt: skip
        "deepspeed-optimizer-section": (
            ["--deepspeed", f["optimizer.json"]],
            "remove the 'optimizer' section",
            {},
            "absent",
        ),  # fmt: skip
        "offload-param-below-stage-3": (
            ["--deepspeed", f["offload_param_stage2.json"]],
            "parameter offload needs stage 3",
            {},
            "absent",
        ),  # fmt: skip
        "offload-nvme": (["--deepspeed", f["nvme.json"]], "'nvme' is not supported by rose_ds", {}, "absent"),
        "zero-stage": (["--deepspeed", f["stage4.json"]], "zero_optimization.stage=4", {}, "absent"),
        "output-holds-a-run": ([], "is not empty; pass --overwrite_output_dir", {}, "previous run"),
        "output-is-a-file": ([], "is a file", {}, "file"),
        "resume-without-checkpoint": (
            ["--resume_from_checkpoint", f["empty_folder"]],
            "has no rose_ds_checkpoint.json",
            {},
            "absent",
        ),  # fmt: skip
        "resume-other-model": (["--resume_from_checkpoint", other_checkpoint], "holds another model", {}, "absent"),
        "launcher-variables": ([], "RANK is set but WORLD_SIZE", {"RANK": "0"}, "absent"),
    }


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.stat().st_size, path.stat().st_mtime_ns)
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _run_case(args, env_changes, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    env.update(env_changes)
    cmd = [sys.executable, str(ROOT / "launch" / "finetune.py"), "--output_dir", str(out), *FAST, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Runs every row (two at a time) and returns {id: (process, output before, output after, out)}."""
    tmp = tmp_path_factory.mktemp("bad")
    files = _files(tmp)
    # a real checkpoint of another model: one saved step of a 2-layer random BERT (hidden 32)
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rose_ds.training.data import embedded_model_path

    other = tmp / "other-model"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    first = _run_case(["--model_name_or_path", str(other), "--max_steps", "1", "--save_steps", "1"], {}, tmp / "other")
    assert first.returncode == 0, first.stderr[-3000:]
    cases = _cases(files, str(tmp / "other" / "global_step1"))
    outs = {}
    for name, (_, _, _, holds) in cases.items():
        out = tmp / "out" / name
        if holds == "previous run":
            shutil.copytree(tmp / "other", out)
        elif holds == "file":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("not a folder\n")
        outs[name] = out
    before = {name: _snapshot(out) for name, out in outs.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(lambda n: _run_case(cases[n][0], cases[n][2], outs[n]), cases)))
    return {name: (procs[name], before[name], _snapshot(outs[name]), cases[name][1]) for name in cases}


def _table_ids() -> list[str]:
    return re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(), re.M)


def test_the_docs_table_lists_every_row_and_nothing_else(catalogue):
    assert len(catalogue) >= 20
    assert _table_ids() == list(catalogue)


@pytest.mark.parametrize("row", _table_ids())
def test_row(catalogue, row):
    proc, before, after, expected = catalogue[row]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert proc.returncode == 2, (row, proc.returncode, proc.stderr[-2000:])
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert len(errors[0]) < 400
    assert after == before, "the output folder changed"
    assert "step=" not in proc.stdout  # stopped before training


def _error_line(proc):
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("finetune.py: error:")]
    return line


def test_a_loss_that_turns_nan_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    """fp32 cannot skip an update: the first NaN/inf loss stops the run. The good checkpoint is the newest
    whose weights gave a finite loss at the next step; resuming from it with a sane learning rate works.
    (A learning rate of 1000 with decoupled weight decay multiplies the weights by -9 per step.)"""
    out = tmp_path / "run"
    proc = _run_case(["--learning_rate", "1000", "--max_grad_norm", "0", "--save_steps", "1", "--max_steps", "12",
                      "--save_total_limit", "3", "--logging_steps", "1"], {}, out)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = _error_line(proc)
    step = int(re.search(r"NaN/inf at step (\d+) \(1 step\(s\) in a row\)", error).group(1))
    good = out / f"global_step{step - 2}"  # global_step{step - 1} holds the weights that gave NaN
    assert step >= 3 and f"last good checkpoint: {good};" in error
    assert not (out / "model.safetensors").exists()
    resumed = _run_case(["--learning_rate", "1e-4", "--max_grad_norm", "0", "--max_steps", str(step + 2),
                         "--logging_steps", "1", "--resume_from_checkpoint", str(good)], {}, out)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"finished {step + 2} steps" in resumed.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == step + 2 and all(math.isfinite(x) for x in losses)


def _fp16_supported() -> bool:
    """Whether the accelerator DeepSpeed selects here does fp16 (a CPU does where oneDNN has fp16 kernels:
    x86 with AVX512-FP16 or AMX-FP16)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.skipif(not _fp16_supported(), reason="this machine's accelerator (CPU: AVX512-FP16 or AMX-FP16) has "
                    "no fp16 support")  # fmt: skip
def test_fp16_overflow_steps_are_skipped_and_counted_then_stop(tmp_path):
    """fp16 (DeepSpeed's loss scaler; it runs on a CPU with fp16 support too): overflowing steps are skipped and
    counted in metrics.jsonl; --max_nonfinite_steps of them in a row stop the run."""
    out = tmp_path / "run"
    proc = _run_case(["--fp16", "--learning_rate", "1e30", "--max_grad_norm", "0", "--max_nonfinite_steps", "3",
                      "--logging_steps", "1", "--max_steps", "10"], {}, out)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN/inf at step 4 (3 step(s) in a row); last good checkpoint: none" in _error_line(proc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]


@pytest.mark.skipif(_fp16_supported(), reason="this machine's accelerator has fp16 support: nothing to refuse")
def test_fp16_on_an_accelerator_without_it_is_refused_before_anything_is_written(tmp_path):
    """An accelerator without fp16 (most CPUs) gets one line pointing to --bf16, not a DeepSpeed traceback."""
    out = tmp_path / "run"
    proc = _run_case(["--fp16"], {}, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--fp16: the cpu accelerator has no fp16 support; use --bf16 or no flag" in _error_line(proc)
    assert not out.exists()
