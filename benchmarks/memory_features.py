"""Peak memory per rank of ROSE-Ensemble with and without gradient checkpointing, and with LoRA against
full fine-tuning, on the same model: side by side in one run, as ratios.

Each variant runs as its own 2-process DeepSpeed job (a process's peak resident memory is a high-water
mark, so variants cannot share one): a Llama-shaped causal LM from config, token-level ROSE-Ensemble
(two dropout passes, the robust backward, the task backward) through ``rose_ds.train_step``, for
``--steps`` optimizer steps at ZeRO ``--stage``, fp32 on the CPU. A rank's figure is its peak resident
memory (``ru_maxrss``; on an accelerator, ``max_memory_allocated``) minus what it held before the model
was built (Python, torch, DeepSpeed), so it counts the model, its gradients and optimizer state and the
step's activations. Usage::

    python benchmarks/memory_features.py [--hidden 512] [--layers 8] [--seq 256] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (gradient checkpointing, LoRA rank)
    "full": (False, 0),
    "full + checkpointing": (True, 0),
    "lora": (False, 16),
    "lora + checkpointing": (True, 16),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    """One variant on this rank (started by torchrun): writes ``{rank: {...}}`` to ``args.out``."""
    import deepspeed
    import deepspeed.comm as dist
    import torch
    import transformers as tf
    from deepspeed.accelerator import get_accelerator

    import rose_ds
    import rose_ds.zero
    from rose_ds.training.args import LoraArgs
    from rose_ds.training.model import apply_lora

    if get_accelerator().device_name() == "cpu":
        rose_ds.zero.skip_shm_comm_build()
    deepspeed.init_distributed()
    rank, device = dist.get_rank(), get_accelerator().current_device_name()
    before = _rss_mib()
    checkpointing, rank_r = VARIANTS[args.variant]
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                            num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                            attention_dropout=0.1)  # fmt: skip
    model = tf.LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LoraArgs(lora_r=rank_r, lora_alpha=2.0 * max(rank_r, 1)), "CAUSAL_LM")
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
    }
    rose = rose_ds.RoseConfig(mode="ensemble", upper=70, eligibility="lora" if rank_r else "llama")
    engine, *_ = rose_ds.initialize(model, ds_config, rose=rose, lr=1e-4)
    engine.train()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().reset_peak_memory_stats()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(2, args.vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # a prompt
        rose_ds.train_step(engine, {"input_ids": ids.to(device)}, labels.to(device), loss_fn=rose_ds.causal_lm_losses)
    if get_accelerator().device_name() == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # Linux: KiB
    else:
        peak = get_accelerator().max_memory_allocated() / 2**20
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    record = {"peak_mib": peak, "trainable": trainable, "parameters": total,
              "eligible": len(rose_ds.rose_optimizer(engine).eligible_names)}  # fmt: skip
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if rank == 0:
        args.out.write_text(json.dumps(gathered))
    del engine, model
    rose_ds.shutdown()


def launch(variant: str, args, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(port), __file__, "--worker", "--variant", variant, "--out", str(out), *_shape(args)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: {proc.stderr[-3000:]}")
    return json.loads(out.read_text())


SHAPE = ("hidden", "layers", "vocab", "seq", "batch", "steps", "stage")


def _shape(args) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in SHAPE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory_features.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    scratch = args.json.with_suffix(".part")
    ranks = {}
    for variant in VARIANTS:
        ranks[variant] = launch(variant, args, scratch)
        peaks = ", ".join(f"{r['peak_mib']:.0f}" for r in ranks[variant])
        first = ranks[variant][0]
        print(f"{variant:>22}: peak per rank {peaks} MiB ({first['trainable']:,} trainable of "
              f"{first['parameters']:,})", flush=True)  # fmt: skip
    scratch.unlink(missing_ok=True)
    peak = {v: max(r["peak_mib"] for r in rs) for v, rs in ranks.items()}
    ratios = {
        "checkpointing / none (full fine-tuning)": peak["full + checkpointing"] / peak["full"],
        "checkpointing / none (LoRA)": peak["lora + checkpointing"] / peak["lora"],
        "LoRA / full fine-tuning": peak["lora"] / peak["full"],
        "LoRA + checkpointing / full fine-tuning": peak["lora + checkpointing"] / peak["full"],
    }
    for name, value in ratios.items():
        print(f"{name:>42}: {value:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"shape": {k: getattr(args, k) for k in SHAPE},
                                     "nproc": args.nproc, "ranks": ranks, "peak_mib": peak, "ratios": ratios},
                                    indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
