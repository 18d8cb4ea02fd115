"""RoseTrainer (rose_ds/hf.py) and its example launch/hf_trainer.py, through the real Trainer, accelerate
and DeepSpeed: on 2 processes it trains exactly as launch/finetune.py on the same data and seed (same
masks at every step, same weights), resumes bit for bit, runs without DeepSpeed on one process, and
refuses what it cannot run with one line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rose_ds.training.data import embedded_model_path

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# the same run for both programs (flags of the same name mean the same thing in both)
COMMON = ["--max_train_samples", "96", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
          "--learning_rate", "1e-4", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6", "--weight_decay", "0.01",
          "--seed", "7", "--rose_upper", "40", "--adv_file", "none", "--logging_steps", "1"]  # fmt: skip
TRAINER_ONLY = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(script: str, args: list[str], processes: int = 2, launcher: str = "deepspeed", check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    if processes == 1:
        cmd = [sys.executable, script]
    elif launcher == "deepspeed":
        cmd = [DEEPSPEED, "--num_gpus", str(processes), "--master_port", _free_port(), script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               _free_port(), script]  # fmt: skip
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved model as from_pretrained loads it (the Trainer's ZeRO-3 save names norms gamma/beta)."""
    return AutoModelForSequenceClassification.from_pretrained(folder).state_dict()


@pytest.mark.parametrize(
    "config, accumulation, steps, mode, method",
    [
        ("zero0", 1, 8, "ensemble", "none"),
        ("zero2", 2, 4, "first", "none"),
        ("zero3", 1, 4, "ensemble", "none"),
        ("zero0", 1, 4, "ensemble", "r3f"),
        ("zero2", 1, 4, "first", "rdrop"),
        ("zero1", 1, 4, "second", "childtuning-f"),
        ("zero3", 2, 4, "ensemble", "childtuning-d"),
    ],
)
def test_trainer_trains_exactly_as_finetune(tmp_path, config, accumulation, steps, mode, method):
    """8 steps at ZeRO-0 cross an epoch (96 examples = 6 steps of 2 x 8); accumulation 2 at ZeRO-2 checks
    that the robust backward sees accelerate's accumulation boundary. With ``--method`` the composed method
    runs in both programs too (ChildTuning-D: its Fisher pass over 3 batches, then 2 micro-batches a step)."""
    args = ["--deepspeed", f"ds_configs/{config}.json", "--max_steps", str(steps), "--gradient_accumulation_steps",
            str(accumulation), "--rose_mode", mode, "--method", method, "--childtuning_fisher_batches", "3",
            "--r3f_eps", "0.05", *COMMON]  # fmt: skip
    run("launch/finetune.py", [*args, "--output_dir", str(tmp_path / "finetune")])
    run("tests/dist/hf_same_order.py", [*args, "--output_dir", str(tmp_path / "trainer"), *TRAINER_ONLY])
    expected = json.loads((tmp_path / "finetune" / "trainer_state.json").read_text())
    got = json.loads((tmp_path / "trainer" / "rose_masks.json").read_text())
    assert got["method"]["name"] == method and got["method"]["seed"] == 7
    assert got["eligible_tensors"] == expected["eligible_tensors"]
    assert len(got["mask_history"]) == steps
    assert got["mask_history"] == expected["mask_history"]  # every step's mask value of every tensor
    # ROSE really froze tensors at every step (ROSE-Second has no momentum at step 1: it keeps all then)
    assert all(sum(m) < len(m) for m in got["mask_history"][1 if mode == "second" else 0 :])
    a, b = weights(tmp_path / "finetune"), weights(tmp_path / "trainer")
    common = sorted(set(a) & set(b))
    assert len(common) >= 100 and set(a) == set(b)
    difference = max((a[k] - b[k]).abs().max().item() for k in common)
    assert difference <= 1e-6, difference  # measured: 0.0 (bit for bit)
    # and training moved the pre-trained weights: the two runs are not equal by doing nothing
    pretrained = load_file(Path(embedded_model_path()) / "model.safetensors")
    moved = [k for k in common if k.removeprefix("bert.") in pretrained and
             not torch.equal(pretrained[k.removeprefix("bert.")], b[k])]  # fmt: skip
    assert len(moved) > 40
    # rose_ds.shutdown() ended the process group's threads (one alive at interpreter exit can abort a rank)
    for rank in range(2):
        threads = json.loads((tmp_path / "trainer" / f"threads{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], threads


def test_trainer_resumes_bit_for_bit(tmp_path):
    args = ["--deepspeed", "ds_configs/zero2.json", "--max_steps", "4", "--rose_mode", "ensemble", *COMMON,
            *TRAINER_ONLY]  # fmt: skip
    run("launch/hf_trainer.py", [*args, "--output_dir", str(tmp_path / "whole"), "--save_steps", "2"])
    run("launch/hf_trainer.py", [*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                                 str(tmp_path / "whole" / "checkpoint-2")])  # fmt: skip
    whole = json.loads((tmp_path / "whole" / "rose_masks.json").read_text())["mask_history"]
    resumed = json.loads((tmp_path / "resumed" / "rose_masks.json").read_text())["mask_history"]
    assert len(whole) == 4 and resumed == whole[2:]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_without_deepspeed(tmp_path):
    """With ChildTuning-D (weight decay off): only elements of its Fisher mask may move, at most p = 0.3 of
    the eligible tensors' elements, where ROSE alone moves every element of a kept tensor."""
    out = tmp_path / "plain"
    proc = run("launch/hf_trainer.py", ["--output_dir", str(out), "--max_steps", "3", "--use_cpu", "true",
                                        "--rose_mode", "second", *COMMON, *TRAINER_ONLY, "--weight_decay", "0",
                                        "--method", "childtuning-d", "--childtuning_fisher_batches", "2"],
               processes=1)  # fmt: skip
    assert "kept_fraction" in proc.stdout + proc.stderr
    assert "ChildTuning-D: Fisher information over 2 batches" in proc.stdout
    masks = json.loads((out / "rose_masks.json").read_text())
    assert len(masks["mask_history"]) == 3 and masks["rose"]["mode"] == "second"
    assert masks["method"]["name"] == "childtuning-d"
    assert sum(masks["mask_history"][-1]) < len(masks["eligible_tensors"])
    evals = json.loads((out / "eval_results.json").read_text())
    assert 0 <= evals["eval_validation_accuracy"] <= 1
    trained = load_file(out / "model.safetensors")
    pretrained = load_file(Path(embedded_model_path()) / "model.safetensors")
    eligible = [n for n in masks["eligible_tensors"] if n.removeprefix("bert.") in pretrained]
    assert len(eligible) == len(masks["eligible_tensors"])
    moved = sum(int((trained[n] != pretrained[n.removeprefix("bert.")]).sum()) for n in eligible)
    total = sum(trained[n].numel() for n in eligible)
    assert 0 < moved <= 0.3 * total + 100, (moved, total)  # (+100: elements tied at the threshold)


def test_what_it_cannot_run_is_one_line(tmp_path):
    with_optimizer = tmp_path / "opt.json"
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    with_optimizer.write_text(json.dumps({**config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    cases = [
        (["--deepspeed", str(with_optimizer)], 1, "deepspeed", "defines an 'optimizer'; remove it"),
        (["--rose_mode", "fifth", "--use_cpu", "true"], 1, "deepspeed", "--rose_mode='fifth' is invalid"),
        (["--method", "childtuning-f", "--childtuning_p", "2"], 1, "deepspeed", "--childtuning_p=2.0 is invalid"),
        (["--use_cpu", "true"], 2, "torchrun", "on 2 processes needs DeepSpeed"),
    ]
    for extra, processes, launcher, message in cases:
        out = tmp_path / "out"
        proc = run("launch/hf_trainer.py", ["--output_dir", str(out), "--max_steps", "1", *COMMON, *TRAINER_ONLY,
                                            *extra], processes=processes, launcher=launcher, check=False)  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if "hf_trainer.py: error:" in line]
        assert proc.returncode != 0 and errors and message in errors[0], proc.stderr[-2000:]
        # no traceback from the program (torchrun prints its own ChildFailedError summary when a rank exits 1)
        assert 'hf_trainer.py", line' not in proc.stderr and "rose_ds/" not in proc.stderr
        assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_frozen_parameters_leave_the_step_count_and_selection_alone(tmp_path):
    """RoseTrainer on a model with frozen parameters (FROZEN: the first one and two eligible tensors):
    they are not selected among and never move, and the step count moves, so ROSE-Second starts masking
    after its two warm-up steps (with a step count stuck at 1 it never would)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datasets import Dataset
    from models import FROZEN, frozen_bert, random_batch
    from transformers import TrainingArguments

    from rose_ds import RoseConfig
    from rose_ds.hf import RoseTrainer

    inputs, labels = random_batch(0, batch_size=48)
    data = Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "labels": labels.tolist()})
    model = frozen_bert(dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in FROZEN}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8, learning_rate=2e-3,
                             use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                             dataloader_pin_memory=False, seed=7)  # fmt: skip
    trainer = RoseTrainer(model=model, args=args, train_dataset=data,
                          rose=RoseConfig(mode="second", upper=70, warmup_steps=2))  # fmt: skip
    trainer.train()
    assert len(trainer.eligible_names) == 14 and not set(FROZEN) & set(trainer.eligible_names)
    history = trainer.mask_history
    assert len(history) == 5 and set(history[0]) == set(history[1]) == {1.0}
    assert all(0.0 in masks for masks in history[2:])
    for name, p in model.named_parameters():
        if name in FROZEN:
            assert torch.equal(p, before[name]) and p not in trainer.rose_optimizer.state
