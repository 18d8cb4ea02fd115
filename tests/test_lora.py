"""LoRA under ROSE: an adapted module's A and B form one selection unit (rose_ds.selection.selection_units),
checked against the dense reference written from the specification (tests/reference.py, the unit scored
as the concatenation of its tensors); why per-tensor selection cannot train adapters; and the recipe
end to end: adapter and merged exports, bit-for-bit resume, gradient checkpointing, RoseTrainer.
(ZeRO 0-3 parity of LoRA and gradient checkpointing: tests/test_zero.py.)"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from models import assert_adapters_trained, random_lm_batch, save_tiny_causal_lm, tiny_decoder
from reference import ReferenceRose, reference_token_losses
from safetensors.torch import load_file

from rose_ds import RoseAdamW, RoseConfig, causal_lm_losses
from rose_ds.losses import stack_batch
from rose_ds.selection import selection_units
from rose_ds.training.args import LoraArgs

ROOT = Path(__file__).resolve().parents[1]
LR, BETAS, EPS, WD = 5e-3, (0.9, 0.98), 1e-6, 0.01
STEPS = 6


def lora_llama(seed: int = 0):
    """A tiny Llama with rank-4 LoRA on every linear layer (dropout in attention and on the adapters)."""
    base = tiny_decoder("llama", dropout=0.1, seed=seed)
    model = peft.get_peft_model(base, LoraArgs(lora_r=4, lora_alpha=8.0, lora_dropout=0.1).lora_config("CAUSAL_LM"))
    model.train()
    return model


def module_of(name: str) -> str:
    """The adapted module of a LoRA tensor (written out here: the reference's unit)."""
    return name.split(".lora_")[0]


def reference_for(model, mode, per_tensor=False):
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return ReferenceRose(model, [(trainable, LR, WD)], mode=mode, upper=40, betas=BETAS, eps=EPS,
                         eligible=lambda n: ".lora_" in n, unit_of=None if per_tensor else module_of)  # fmt: skip


def reference_step(model, ref, step):
    inputs, labels = random_lm_batch(step, batch_size=8)
    torch.manual_seed(700 + step)  # the same dropout masks as the RoseAdamW run
    z = model(**{k: stack_batch(v, 8, 2) for k, v in inputs.items()}).logits
    task, robust = reference_token_losses(*z.chunk(2), labels)
    robust.backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    task.backward()
    ref.step(grads)
    model.zero_grad(set_to_none=True)


def test_units_pair_each_modules_adapters():
    names = ["m.layers.0.q_proj.lora_A.default.weight", "m.layers.0.q_proj.lora_B.default.weight",
             "m.layers.0.v_proj.lora_A.default.weight", "m.layers.1.q_proj.lora_A.default.weight",
             "m.layers.1.q_proj.lora_B.default.weight", "m.norm.weight", "m.layers.0.v_proj.lora_B.default.weight",
             "m.embed.lora_embedding_A.default", "m.embed.lora_embedding_B.default"]  # fmt: skip
    assert selection_units(names) == [0, 0, 1, 2, 2, 3, 1, 4, 4]
    assert selection_units(["a.weight", "b.weight"]) == [0, 1]


@pytest.mark.parametrize("mode", ["none", "first", "second", "ensemble"])
def test_rose_adamw_on_a_lora_model_matches_the_reference(mode):
    """Token-level ROSE on a LoRA Llama, 6 steps of fresh random batches: RoseAdamW (its optimizer handed
    every parameter, the frozen base too) makes the reference's masks (one per adapted module) and
    weights; A and B of a module share every mask value; and the adapters train."""
    model = lora_llama()
    ref_model = copy.deepcopy(model)
    opt = RoseAdamW(model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                    rose=RoseConfig(mode=mode, upper=40, eligibility="lora"))  # fmt: skip
    ref = reference_for(ref_model, mode)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(STEPS):
        inputs, labels = random_lm_batch(step, batch_size=8)
        torch.manual_seed(700 + step)
        losses = causal_lm_losses(model, inputs, labels)  # two passes in every mode, as the reference
        opt.capture_robust_grads(losses.robust)  # (a no-op where the mode needs no robust gradient)
        losses.task.backward()
        opt.step()
        opt.zero_grad()
        reference_step(ref_model, ref, step)
        if mode == "none":
            assert set(opt.last_mask.values()) <= {1.0}
        else:
            assert opt.last_mask == ref.last_mask, f"step {step + 1}: masks differ"
        assert all(v == opt.last_mask[n.replace("lora_A", "lora_B")] for n, v in opt.last_mask.items() if "lora_A" in n)
    if mode != "none":
        assert any(v < 1 for v in opt.last_mask.values())
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    assert_adapters_trained({n: p.detach() for n, p in model.named_parameters() if n in initial}, initial)


@pytest.mark.parametrize("mode", ["first", "second"])
def test_per_tensor_selection_would_never_train_the_adapters(mode):
    """Why a unit: scored per tensor (the reference without units), ROSE-First keeps every lora_A (its
    gradient is exactly zero while B is) and freezes every lora_B, which stays zero; ROSE-Second freezes
    every lora_A for good (its momentum is zero after step 1, its score infinite: it never moves again)."""
    model = lora_llama()
    ref = reference_for(model, mode, per_tensor=True)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(STEPS):
        reference_step(model, ref, step)
    named = dict(model.named_parameters())
    if mode == "first":
        assert all(named[n].abs().max() == 0 for n in initial if "lora_B" in n)
    else:  # (only step 1's weight decay moved it)
        assert all(ref.m[n].abs().max() == 0 for n in initial if "lora_A" in n)


def _finetune(args, out, nproc=2, script="launch/finetune.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(ROOT / script), "--output_dir", str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}"} for i in range(48)]
    for name, part in (("train.jsonl", rows[:40]), ("dev.jsonl", rows[40:])):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    model = save_tiny_causal_lm(tmp / "llama", "llama")
    return ["--objective", "causal_lm", "--model_name_or_path", str(model), "--train_file", str(tmp / "train.jsonl"),
            "--validation_file", str(tmp / "dev.jsonl"), "--adv_file", "none", "--per_device_train_batch_size", "4",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--rose_mode", "ensemble", "--rose_upper", "40"]  # fmt: skip


def test_a_lora_run_exports_its_adapter_and_the_merged_model(causal, tmp_path):
    """ZeRO-3 on 2 processes, with gradient checkpointing and eager attention: the adapter loads with PEFT
    onto the pre-trained model; the merged export loads with from_pretrained alone, its weights are
    W + (alpha / r) B A computed here from the adapter file, and it predicts as the adapted model."""
    out = tmp_path / "run"
    proc = _finetune([*causal, "--deepspeed", "ds_configs/zero3.json", "--max_steps", "4", "--merge_lora",
                      "--gradient_checkpointing", "--attn_implementation", "eager"], out)  # fmt: skip
    assert "finished 4 steps" in proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and not (out / "model.safetensors").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(".lora_" in n for n in state["eligible_tensors"]) and len(state["eligible_tensors"]) == 28
    adapter = load_file(out / "adapter_model.safetensors")
    assert sum(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k) >= 7  # the adapters trained
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(causal[3])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base_w, merged_w = base.state_dict(), merged.state_dict()
    for key, a in adapter.items():
        if "lora_A" not in key:
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        assert torch.allclose(merged_w[weight], base_w[weight] + (8 / 4) * b @ a, atol=1e-6), weight
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal[3]), str(out)).eval()
    ids = torch.randint(5, 100, (2, 9))
    assert torch.allclose(adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)


def test_a_lora_run_resumes_bit_for_bit(causal, tmp_path):
    """ZeRO-2 on 2 processes: 4 steps straight, against 2 steps, a checkpoint, and 2 more in a new run
    resumed from it: the same masks at steps 3-4 and the same adapter to the bit."""
    args = [*causal, "--deepspeed", "ds_configs/zero2.json", "--max_steps", "4"]
    _finetune([*args, "--save_steps", "2"], tmp_path / "whole")
    _finetune([*args, "--resume_from_checkpoint", str(tmp_path / "whole" / "global_step2")], tmp_path / "resumed")
    whole = json.loads((tmp_path / "whole" / "trainer_state.json").read_text())["mask_history"]
    resumed = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["mask_history"]
    assert resumed[-2:] == whole[-2:] and any(v < 1 for m in whole for v in m)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rose_trainer_trains_a_lora_classifier_exactly_as_finetune(tmp_path):
    """The embedded MiniLM with LoRA (and its new head trained in full) through RoseTrainer and through
    finetune.py, ZeRO-2 on 2 processes, the same batches: the same masks at every step, the same adapter."""
    common = [
        "--deepspeed",
        "ds_configs/zero2.json",
        "--max_steps",
        "4",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--rose_upper",
        "40",
        "--adv_file",
        "none",
        "--logging_steps",
        "1",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "query,value",
        "--adam_beta2",
        "0.98",
        "--adam_epsilon",
        "1e-6",
        "--weight_decay",
        "0.01",
    ]  # fmt: skip (the Trainer's defaults differ)
    _finetune(common, tmp_path / "finetune")
    _finetune([*common, "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"],
              tmp_path / "trainer", script="tests/dist/hf_same_order.py")  # fmt: skip
    want = json.loads((tmp_path / "finetune" / "trainer_state.json").read_text())
    got = json.loads((tmp_path / "trainer" / "rose_masks.json").read_text())
    assert got["eligible_tensors"] == want["eligible_tensors"] and len(want["eligible_tensors"]) == 24
    assert got["mask_history"] == want["mask_history"] and any(v < 1 for m in want["mask_history"] for v in m)
    a = load_file(tmp_path / "finetune" / "adapter_model.safetensors")
    b = load_file(tmp_path / "trainer" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EXPORT_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import deepspeed
import rose_ds, rose_ds.zero
from rose_ds.training.checkpoint import export_model
from transformers import AutoTokenizer
sys.path.insert(0, sys.argv[3])
from models import tiny_decoder
rose_ds.zero.skip_shm_comm_build()
model = tiny_decoder("llama", dropout=0.0)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": int(sys.argv[2]),
          "stage3_param_persistence_threshold": 0}}
engine, *_ = rose_ds.initialize(model, config, rose=rose_ds.RoseConfig(mode="none"), lr=1e-3)
out = Path(sys.argv[1])
out.mkdir()
export_model(engine, model, AutoTokenizer.from_pretrained(sys.argv[4]), out, shard_bytes=2500)
full = {n: deepspeed.utils.safe_get_full_fp32_param(p).float() if int(sys.argv[2]) else p.detach().float()
        for n, p in engine.module.named_parameters()}
torch.save(full, out.parent / "expected.pt")
del engine, model
rose_ds.shutdown()
"""


@pytest.mark.parametrize("stage", [0, 3])
def test_a_large_model_is_exported_one_shard_at_a_time(tmp_path, stage):
    """The whole-model export gathers and writes one safetensors shard at a time (here 2.5 kB shards of a
    tiny Llama, at ZeRO-0 and ZeRO-3 where every tensor is partitioned): the files and index of the Hugging
    Face sharded layout, which from_pretrained loads to exactly the engine's fp32 weights."""
    from transformers import AutoModelForCausalLM

    from rose_ds.training.data import embedded_model_path

    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(stage), str(ROOT / "tests"),
                           embedded_model_path()], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert not (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(loaded[n], t) for n, t in expected.items())
