"""The billion-parameter proof: a >= 1.0B-parameter Llama-shaped decoder through the real program.

Builds a Llama-shaped causal LM from config (TinyLlama-1.1B's blocks: hidden 2048, grouped-query attention
with 4 key/value heads, MLP 5632; 20 of its 22 layers, 1.006B parameters, since 22 do not fit 24 GiB on 2
ranks: docs/scale.md; random weights, saved in bf16 with the embedded MiniLM's tokenizer) and runs
``launch/finetune.py`` on it, each run its own 2-process job at ZeRO-3 with ``--deepspeed
ds_configs/zero3_offload_lowmem.json`` (optimizer and parameters offloaded) in bf16, on the embedded
Rotten Tomatoes as instruction data:

1. ROSE-Ensemble (the first-order part active: two dropout passes, the robust backward, the task
   backward) for ``--steps`` optimizer steps, with a checkpoint at the last;
2. resumed from that checkpoint for one more step, then the consolidated model exported;
3. ROSE-Second and 4. vanilla (``--rose_mode none``), ``--steps`` steps each, for the step-time table.

Each rank of each run records, through hooks around the program's own objects: its peak resident memory,
the bytes it holds for parameters (bf16 partitions), fp32 master weights, Adam moments and gradients
against the ZeRO-3 formula, the bytes ROSE's selection all-reduces at each step, its mask at each step,
and the time of each step. The result (``--json``) says whether every rank made the same masks, whether
the resumed step matches, and the step-time ratios. Usage::

    python benchmarks/scale.py                                  # the 1.006B run (about 30 minutes on 2 cores)
    python benchmarks/scale.py --layers 2 --hidden 256 --json /tmp/small.json    # a small rehearsal
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("ensemble", "resume", "second", "vanilla")


def build_model(folder: Path, args) -> int:
    """Writes the Llama-shaped model (bf16 safetensors) and the tokenizer to ``folder``; returns its size."""
    import torch
    import transformers as tf

    from rose_ds.training.data import embedded_model_path

    tokenizer = tf.AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.eos_token = "[SEP]"
    config = tf.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, intermediate_size=args.mlp,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory of an fp32 build
    try:
        model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    size = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return size


# --------------------------------------------------------------- bf16 products on a CPU without bf16 units
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX); without them torch's bf16
    matmul falls back to scalar loops for some layouts (measured here: 0.2 GFLOPS for the backward's
    ``grad_output @ weight`` against 58 GFLOPS in fp32 on this AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def linear_in_fp32(orig, chunk_bytes: int = 64 * 2**20):
    """``F.linear`` whose bf16 CPU products are taken in fp32 and rounded back to bf16 (inputs, outputs,
    weights and gradients stay bf16: what the bf16 run holds and sends does not change; the arithmetic
    rounds less). The weight is upcast in row blocks of at most ``chunk_bytes`` (the LM head's fp32 copy
    would be 250 MB a rank where a model fills the memory). Other dtypes and devices go to ``orig``."""
    import torch

    def blocks(weight):
        rows = max(1, chunk_bytes // (4 * weight.shape[1]))
        return [(r, min(r + rows, weight.shape[0])) for r in range(0, weight.shape[0], rows)]

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            xf = x.float()
            out = torch.cat([(xf @ weight[a:b].float().t()).to(x.dtype) for a, b in blocks(weight)], dim=-1)
            return out if bias is None else out + bias

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            flat = grad.reshape(-1, grad.shape[-1])
            xf = x.reshape(-1, x.shape[-1]).float() if ctx.needs_input_grad[1] else None
            grad_x = torch.zeros(flat.shape[0], weight.shape[1]) if ctx.needs_input_grad[0] else None
            grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
            for a, b in blocks(weight):
                g = flat[:, a:b].float()
                if grad_x is not None:
                    grad_x += g @ weight[a:b].float()
                if grad_w is not None:
                    grad_w[a:b] = g.t() @ xf
            if grad_x is not None:
                grad_x = grad_x.to(x.dtype).reshape(x.shape)
            grad_b = flat.float().sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return grad_x, grad_w, grad_b

    def linear(x, weight, bias=None):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return Linear.apply(x, weight, bias)
        return orig(x, weight, bias)

    return linear


# ------------------------------------------------------------------------- one rank of one run (torchrun)
def worker(record: Path, argv: list[str]) -> None:
    """Runs launch/finetune.py's ``main(argv)`` on this rank with hooks that record what ROSE does."""
    import deepspeed.comm as dist

    import rose_ds
    import rose_ds.zero as zero

    sys.path.insert(0, str(ROOT / "launch"))
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    import finetune
    from worker import ByteCounter  # counts the bytes of every collective DeepSpeed issues

    steps: list[dict] = []
    sent = [0]
    captured = {}
    all_reduce, stepped, initialize = zero.ZeroBinding._all_reduce, zero.ZeroBinding.stepped, zero.initialize

    def counted_all_reduce(self, t):  # the one collective ROSE's selection adds
        sent[0] += t.numel() * t.element_size()
        return all_reduce(self, t)

    def recorded_stepped(self, segments):
        stepped(self, segments)
        opt = self.opt
        shards = [s for unit in segments.units for s in unit]  # this rank's fp32 partitions of the step
        steps.append({
            "time": time.perf_counter(),
            "mask": [opt.last_mask.get(n, 1.0) for n in opt.eligible_names],
            "selection_bytes": sent[0],
            "collective_bytes": sum(captured["counter"].bytes.values()),
            "param_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.engine.module.parameters()
                               if hasattr(p, "ds_tensor")),
            "master_bytes": sum(s.param.numel() * s.param.element_size() for s in shards),
            "grad_bytes": sum(s.grad.numel() * s.grad.element_size() for s in shards if s.grad is not None),
            # ZeRO-3's flat buffer the backward reduces into (bf16), besides the optimizer's fp32 gradients
            "grad_buffer_bytes": (lambda b: 0 if b is None else b.numel() * b.element_size())(
                getattr(self.zo, "grad_partitions_flat_buffer", None)),
            "optimizer_bytes": sum(v.numel() * v.element_size() for s in shards for v in s.state.values()
                                   if hasattr(v, "dim") and v.dim() > 0),
        })  # fmt: skip
        sent[0] = 0
        captured["counter"].bytes = {}

    def captured_initialize(*a, **k):
        captured["counter"] = ByteCounter()  # (the process group is up by now)
        if not cpu_has_bf16_matmul():  # after the model is built: zero.Init has set its own F.linear by then
            import torch

            torch.nn.functional.linear = linear_in_fp32(torch.nn.functional.linear)
        out = initialize(*a, **k)
        captured["counter"].bytes = {}
        captured["engine"] = out[0]
        return out

    zero.ZeroBinding._all_reduce, zero.ZeroBinding.stepped, zero.initialize = (
        counted_all_reduce, recorded_stepped, captured_initialize)  # fmt: skip
    started = time.perf_counter()
    finetune.main(argv)
    rank, world = dist.get_rank(), dist.get_world_size()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    engine = captured.pop("engine")
    opt = rose_ds.rose_optimizer(engine)
    result = {
        "rank": rank,
        "world_size": world,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_accelerator_bytes": None if accelerator.device_name() == "cpu" else accelerator.max_memory_allocated(),
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "eligible_tensors": len(opt.eligible_names),
        "started": started,
        "steps": steps,
    }
    del engine, opt
    record.with_name(f"{record.name}.rank{rank}").write_text(json.dumps(result))
    rose_ds.shutdown()


# ------------------------------------------------------------------------- the runs and the report
def launch(name: str, argv: list[str], work: Path, nproc: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))  # fmt: skip
    # this checkout's rose_ds, whatever another install on the path holds
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # glibc returns freed blocks above 1 MiB to the system at once: its adaptive threshold otherwise keeps
    # up to 32 MiB blocks in the heap, which held ~1 GB more a rank at the peak (measured at 0.3B)
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.setdefault(key, str(2**20))
    env.setdefault("MALLOC_ARENA_MAX", "2")
    record = work / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           __file__, "--worker", str(record), "--", *argv]  # fmt: skip
    started = time.time()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"benchmarks/scale.py: error: run {name} failed (exit {proc.returncode}); see {work / name}.log")
    ranks = [json.loads(record.with_name(f"{record.name}.rank{r}").read_text()) for r in range(nproc)]
    peaks = ", ".join(f"{r['peak_rss_bytes'] / 2**30:.2f}" for r in ranks)
    print(f"{name}: {len(ranks[0]['steps'])} steps in {time.time() - started:.0f} s, peak RSS per rank {peaks} GiB",
          flush=True)  # fmt: skip
    return ranks


def summarise(runs: dict[str, list[dict]], size: int, args, ds_config: dict) -> dict:
    world = args.nproc
    ens = runs["ensemble"]
    last = ens[0]["steps"][-1]
    # ZeRO-3 with offload_optimizer: the fp32 gradients stay allocated between steps (without offload they
    # are made per sub-group at the step and freed), beside the bf16 buffer the backward reduces into
    formula = {"bf16 parameters": 2, "fp32 master weights": 4, "Adam moments": 8, "fp32 gradients": 4,
               "bf16 gradient buffer": 2}  # fmt: skip
    held = {"bf16 parameters": last["param_bytes"], "fp32 master weights": last["master_bytes"],
            "Adam moments": last["optimizer_bytes"], "fp32 gradients": last["grad_bytes"],
            "bf16 gradient buffer": last["grad_buffer_bytes"]}  # fmt: skip

    def step_time(ranks):
        times = [s["time"] for s in ranks[0]["steps"]]
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    times = {name: step_time(runs[name]) for name in ("vanilla", "second", "ensemble")}
    # bytes of every collective per step (the largest tensor argument of each), steps after the first
    traffic = {name: statistics.median(s["collective_bytes"] for s in runs[name][0]["steps"][1:])
               for name in ("vanilla", "second", "ensemble")}  # fmt: skip
    masks_equal = {name: all(r["steps"] and [s["mask"] for s in r["steps"]] == [s["mask"] for s in ranks[0]["steps"]]
                             for r in ranks) for name, ranks in runs.items()}  # fmt: skip
    selection = {n: sorted({s["selection_bytes"] for r in ranks for s in r["steps"]}) for n, ranks in runs.items()}
    return {
        "model": {"parameters": size, "hidden": args.hidden, "layers": args.layers, "mlp": args.mlp,
                  "heads": args.heads, "kv_heads": args.kv_heads},
        "world_size": world,
        "deepspeed": ds_config,
        "peak_rss_gib": {name: [r["peak_rss_bytes"] / 2**30 for r in ranks] for name, ranks in runs.items()},
        "peak_accelerator_gib": {name: [(r["peak_accelerator_bytes"] or 0) / 2**30 for r in ranks]
                                 for name, ranks in runs.items()},  # fmt: skip
        "held_per_rank_bytes": held,
        "held_per_rank_bytes_total": sum(held.values()),
        "zero3_formula_bytes": {k: b * size / world for k, b in formula.items()},
        "zero3_formula_total": sum(formula.values()) * size / world,
        "eligible_tensors": ens[0]["eligible_tensors"],
        "selection_bytes_per_step": selection,
        "selection_bytes_per_eligible_tensor": {n: [b / ens[0]["eligible_tensors"] for b in v if b]
                                                for n, v in selection.items()},
        "masks_identical_on_every_rank": masks_equal,
        "masks": {name: [s["mask"] for s in ranks[0]["steps"]] for name, ranks in runs.items()},
        "kept_fraction": {name: [sum(s["mask"]) / len(s["mask"]) for s in ranks[0]["steps"]]
                          for name, ranks in runs.items()},
        "collective_bytes_per_step": traffic,
        "collective_ratio_to_vanilla": {n: b / traffic["vanilla"] for n, b in traffic.items()},
        "step_time_s": times,
        "step_time_ratio_to_vanilla": {n: t / times["vanilla"] for n, t in times.items()},
    }  # fmt: skip


# ------------------------------------------------------------------------- the cost model (docs/scale.md)
# Llama shapes: TinyLlama-1.1B (this run's), Llama-3-8B, Llama-3-70B; eligible tensors: the 'llama' preset's 9
# weights of every block (q, k, v, o, gate, up, down and the two RMSNorms).
MODELS = {"1B": (1.094e9, 22), "8B": (8.03e9, 32), "70B": (70.6e9, 80)}
GPU_COUNTS = (8, 64, 512)


def cost_model(measured: dict, small: dict[int, dict]) -> str:
    """docs/scale.md's tables, from the constants measured by this benchmark (``measured``: the >= 1B run at
    ZeRO-3; ``small``: stage -> a small run's result at ZeRO 1 and 2, for their collective bytes)."""
    size, world = measured["model"]["parameters"], measured["world_size"]
    # bytes per parameter of each kind of state, summed over ranks (what each rank holds, measured)
    b = {k: v * world / size for k, v in measured["held_per_rank_bytes"].items()}
    weights, master, adam = b["bf16 parameters"], b["fp32 master weights"], b["Adam moments"]
    grad32, grad16 = b["fp32 gradients"], b["bf16 gradient buffer"]
    # collective bytes per step per parameter (bf16), vanilla and ROSE-First/Ensemble, by stage
    comm = {stage: {k: v / r["model"]["parameters"] for k, v in r["collective_bytes_per_step"].items()}
            for stage, r in {**small, 3: measured}.items()}  # fmt: skip
    selection = measured["selection_bytes_per_eligible_tensor"]["ensemble"][0]
    gib = 2**30
    lines = ["| model | GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload: host per GPU |", "|---" * 6 + "|"]
    for name, (p, _) in MODELS.items():
        for n in GPU_COUNTS:
            z1 = (weights + grad16) * p + (master + adam) * p / n  # bf16 weights and gradients whole
            z2 = weights * p + (grad16 + master + adam) * p / n
            z3 = (weights + grad16 + master + adam) * p / n
            host = (weights + grad16 + master + adam + grad32) * p / n
            lines.append(f"| {name} | {n} | {z1 / gib:.1f} | {z2 / gib:.1f} | {z3 / gib:.1f} | {host / gib:.1f} |")
    memory = "\n".join(lines)
    lines = ["| model | eligible tensors | selection all-reduce | ZeRO-1/2 vanilla | ZeRO-1/2 ROSE-First, Ensemble | "
             "ZeRO-3 vanilla | ZeRO-3 ROSE-First, Ensemble |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (p, layers) in MODELS.items():
        eligible = 9 * layers
        lines.append(f"| {name} | {eligible} | {selection * eligible / 1024:.1f} KiB | "
                     f"{comm[2]['vanilla'] * p / gib:.1f} GiB | {comm[2]['ensemble'] * p / gib:.1f} GiB | "
                     f"{comm[3]['vanilla'] * p / gib:.1f} GiB | {comm[3]['ensemble'] * p / gib:.1f} GiB |")  # fmt: skip
    traffic = "\n".join(lines)
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in b.items())
    return (f"Measured constants: bytes per parameter held at ZeRO-3 with offload, summed over ranks: {kinds} "
            f"(total {sum(b.values()):.2f}); {selection:.0f} bytes of selection all-reduce per eligible tensor "
            f"per step; collective bytes per parameter per step: "
            + "; ".join(f"ZeRO-{s} vanilla {c['vanilla']:.2f}, ROSE-Second {c['second']:.2f}, ROSE-Ensemble "
                        f"{c['ensemble']:.2f}" for s, c in sorted(comm.items()))
            + ".\n\nPer-GPU memory (GiB) of model states (vanilla; ROSE adds none at one micro-batch per step); "
            "without offload the fp32 gradient is made for one optimizer sub-group at a time at the step:"
            f"\n\n{memory}\n\n"
            "Per-GPU traffic per optimizer step (each collective's largest tensor, bf16; a ring all-gather or "
            "reduce-scatter sends (N-1)/N of it from each GPU, so these are per-GPU bytes at any N):"
            f"\n\n{traffic}\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run (the resume adds one)")
    parser.add_argument("--seq", type=int, default=64, help="--max_seq_length")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--deepspeed", default="ds_configs/zero3_offload_lowmem.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs (finished ones kept)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--into", type=Path, help="also add the result, as 'scale', to this JSON file (gpu.sh)")
    parser.add_argument("--cost_model", nargs="*", type=Path, metavar="SMALL_JSON",
                        help="print docs/scale.md's tables from --json and small runs' JSON at ZeRO 1, 2")  # fmt: skip
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if args.cost_model is not None:
        small = [json.loads(f.read_text()) for f in args.cost_model]
        small = {r["deepspeed"]["zero_optimization"]["stage"]: r for r in small}
        print(cost_model(json.loads(args.json.read_text()), small))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / "model"
    if not (folder / "config.json").is_file():
        started = time.time()
        size = build_model(folder, args)
        print(f"built and saved a {size / 1e9:.3f}B-parameter model in {time.time() - started:.0f} s", flush=True)
    size = _count(folder)
    common = ["--objective", "causal_lm", "--model_name_or_path", str(folder), "--deepspeed", args.deepspeed, "--bf16",
              "--max_train_samples", "64", "--max_eval_samples", "4", "--max_seq_length", str(args.seq),
              "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "4", "--adv_file", "none",
              "--logging_steps", "1", "--learning_rate", "1e-5", "--rose_upper", "70"]  # fmt: skip
    out = {name: args.work / name for name in ("ensemble", "second", "vanilla")}
    plans = {
        "ensemble": ["--rose_mode", "ensemble", "--max_steps", str(args.steps), "--save_steps", str(args.steps),
                     "--output_dir", str(out["ensemble"]), "--overwrite_output_dir"],
        "resume": ["--rose_mode", "ensemble", "--max_steps", str(args.steps + 1), "--output_dir", str(out["ensemble"]),
                   "--resume_from_checkpoint", str(out["ensemble"] / f"global_step{args.steps}")],
        "second": ["--rose_mode", "second", "--max_steps", str(args.steps), "--output_dir", str(out["second"]),
                   "--overwrite_output_dir"],
        "vanilla": ["--rose_mode", "none", "--max_steps", str(args.steps), "--output_dir", str(out["vanilla"]),
                    "--overwrite_output_dir"],
    }  # fmt: skip
    runs = {}
    for name in RUNS:
        record = args.work / f"{name}.json"
        if name in args.runs or not record.with_name(f"{record.name}.rank0").is_file():
            runs[name] = launch(name, [*common, *plans[name]], args.work, args.nproc)
            # disk: the checkpoint (14 bytes a parameter) once resumed from, the step-time runs' exports
            if name == "resume":
                saved = out["ensemble"] / f"global_step{args.steps}"
                sizes = {p.name: p.stat().st_size for p in saved.iterdir()}
                (args.work / "checkpoint_files.json").write_text(json.dumps(sizes, indent=1))
                shutil.rmtree(saved)
            if name in ("second", "vanilla"):
                for f in out[name].glob("model*.safetensors*"):
                    f.unlink()
        else:
            runs[name] = [json.loads(record.with_name(f"{record.name}.rank{r}").read_text()) for r in range(args.nproc)]
    ds_config = json.loads((out["ensemble"] / "run_config.json").read_text())["deepspeed"]
    result = summarise(runs, size, args, ds_config)
    # the resumed step is the 4th step of the same run: its mask follows the 3 saved ones
    trainer_state = json.loads((out["ensemble"] / "trainer_state.json").read_text())
    result["resumed_run_steps"] = trainer_state["global_step"]
    result["exported"] = {p.name: p.stat().st_size for p in sorted(out["ensemble"].glob("model*.safetensors*"))}
    checkpoint_files = args.work / "checkpoint_files.json"
    if checkpoint_files.is_file():
        result["checkpoint_files"] = json.loads(checkpoint_files.read_text())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.into:
        merged = json.loads(args.into.read_text()) if args.into.is_file() else {}
        args.into.write_text(json.dumps({**merged, "scale": result}, indent=2))
    print(json.dumps({k: result[k] for k in ("peak_rss_gib", "held_per_rank_bytes_total", "zero3_formula_total",
                                             "selection_bytes_per_step", "masks_identical_on_every_rank",
                                             "step_time_s", "step_time_ratio_to_vanilla")}, indent=1))  # fmt: skip


def _count(folder: Path) -> int:
    """Parameters of the saved model, from its safetensors headers (no weight is read)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


if __name__ == "__main__":
    main()
