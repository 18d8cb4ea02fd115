"""Distributed benchmark worker: what a ROSE training step costs next to vanilla DeepSpeed AdamW.

Launched by benchmarks/run.py through torchrun (any DeepSpeed-compatible launcher works):

    torchrun --nproc_per_node 2 benchmarks/step_time.py time    OUT.json [--stages 0 2 3]
    torchrun --nproc_per_node 2 benchmarks/step_time.py memory  OUT.json --stage 2 --variant first
    torchrun --nproc_per_node N benchmarks/step_time.py traffic OUT.json

``time``: per ZeRO stage, one engine per variant on the same model, data and config, stepped in
interleaved rounds (one step of each variant per round, ranks synchronised around every step);
median of the timed rounds. Variants: ``vanilla`` (DeepSpeed's AdamW, torch implementation, from the
config's optimizer section), ``second``/``first``/``ensemble`` (RoseAdamW through rose_ds), and
``two-pass`` (ROSE-First's exact step, both dropout passes and both backwards, with the selection
switched off: no statistics, no all-reduce, no quantile, every tensor kept). With ``--offload_stages``
the same at those stages with ``offload_optimizer`` to the CPU, where vanilla steps with DeepSpeed's
``DeepSpeedCPUAdam`` and RoseAdamW with its default path (rose_ds's C++ kernel).
``memory``: peak resident memory of each rank for one variant (a process of its own: the peak is
per process). ``traffic``: bytes per optimizer step through DeepSpeed's communication backend for
vanilla, RoseAdamW with mode ``none`` and ROSE-Second; selection bytes = Second minus none (the same
optimizer with the selection on and off), for several model sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dist"))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402
from worker import ByteCounter  # noqa: E402  (tests/dist/worker.py: counts bytes per collective)

import rose_ds  # noqa: E402
import rose_ds.zero  # noqa: E402
from rose_ds import RoseConfig, methods  # noqa: E402
from rose_ds.losses import task_loss  # noqa: E402
from rose_ds.methods import MethodConfig  # noqa: E402

if get_accelerator().device_name() == "cpu":
    rose_ds.zero.skip_shm_comm_build()  # inference-only op: skip its JIT build (minutes)

LR, BETAS, EPS, WD = 2e-5, (0.9, 0.98), 1e-6, 0.01
VARIANTS = ("vanilla", "second", "first", "ensemble", "two-pass")
# a method alone (RoseAdamW with mode none) and with ROSE-Ensemble on top, at --method_stages
METHODS = ("rdrop", "r3f", "childtuning-f", "childtuning-d")
METHOD_VARIANTS = tuple(f"{m}{r}" for m in METHODS for r in ("", "+ensemble"))


def make_model(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=256, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def batch(step: int, size: int, seq: int, device: str):
    g = torch.Generator().manual_seed(10_000 + step * 97 + dist.get_rank())
    ids = torch.randint(0, 8192, (size, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}, torch.randint(
        0, 2, (size,), generator=g
    ).to(device)


def ds_config(
    stage: int, micro: int, dtype: str, vanilla: bool, fused: bool, hidden: int, offload: bool = False
) -> dict:
    # the bucket sizes ds_configs/*.json get from "auto" (hidden^2, as the Hugging Face integration):
    # what users of launch/finetune.py run, for vanilla and ROSE alike
    zero = {"stage": stage, "reduce_bucket_size": hidden * hidden}
    if offload:  # ds_configs/zero*_offload.json: the optimizer state and step on the CPU
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every tensor, as large models are
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if vanilla:
        params = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}
        if not offload:  # under offload DeepSpeed steps with its DeepSpeedCPUAdam, what its users get
            params["torch_adam"] = True
            params["fused" if fused else "foreach"] = True
        cfg["optimizer"] = {"type": "AdamW", "params": params}
    return cfg


def build(variant: str, stage: int, args, offload: bool = False) -> tuple:
    """An engine and its step function for one variant."""
    model = make_model(args.hidden, args.layers)
    cfg = ds_config(stage, args.batch, args.dtype, variant == "vanilla", args.fused, args.hidden, offload)
    if variant == "vanilla":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

        def step(inputs, labels):
            engine.backward(task_loss(engine(**inputs).logits, labels))
            engine.step()

        return engine, step
    method = MethodConfig()
    if variant in METHOD_VARIANTS:
        name, _, mode = variant.partition("+")
        method, mode = MethodConfig(name=name), mode or "none"
    else:
        mode = {"two-pass": "first", "second-element": "second"}.get(variant, variant)
    rose = RoseConfig(mode=mode, upper=70, granularity="element" if variant.endswith("element") else "tensor")
    # --fused: torch's fused kernel, as vanilla's; otherwise RoseAdamW's default path (rose_ds's C++
    # kernel for CPU partitions, torch's foreach kernels on an accelerator)
    engine, *_ = rose_ds.initialize(model, cfg, rose=rose, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                    fused=True if args.fused else None, method=method)  # fmt: skip
    if variant == "two-pass":
        _switch_selection_off(engine)
    if method.fixed_mask:  # ChildTuning-D: a Fisher pass of two batches first (not timed: it runs once)
        device = get_accelerator().current_device_name()
        rose_ds.childtuning_d(engine, [batch(1000 + i, args.batch, args.seq, device) for i in range(2)])
    loss = methods.loss_fn(method)
    return engine, lambda inputs, labels: rose_ds.train_step(engine, inputs, labels, loss_fn=loss)


def _switch_selection_off(engine) -> None:
    """Ablation: ROSE-First's step with the selection machinery removed (no statistics, no all-reduce,
    no quantile; c = 1 everywhere). Both dropout passes and both backwards still run."""
    opt = rose_ds.rose_optimizer(engine)
    binding = opt.provider
    names = opt.eligible_names
    zeros = rose_ds.optim.RobustCapture(squares=torch.zeros(len(names), dtype=torch.float64))
    binding._set_robust_statistics = lambda fragments: setattr(opt, "robust_capture", zeros)

    def no_selection(segments, live, t):  # every segment updated with c = 1, in the merged runs of a step
        opt.last_mask = {names[i]: 1.0 for i in live}
        for unit in segments.units:
            opt._update(unit, [(s, a, b, c) for s in unit if s.grad is not None
                               for a, b, c in rose_ds.optim._runs(s.segments, {})], t)  # fmt: skip

    opt._tensor_update = no_selection


def timed(step, inputs, labels) -> float:
    dist.barrier()
    start = time.perf_counter()
    step(inputs, labels)
    get_accelerator().synchronize()
    dist.barrier()
    return time.perf_counter() - start


def run_time(args) -> dict:
    device = get_accelerator().current_device_name()
    results = {}
    for stage, offload in [(s, False) for s in args.stages] + [(s, True) for s in args.offload_stages]:
        variants = VARIANTS + (METHOD_VARIANTS if stage in args.method_stages and not offload else ())
        built = {v: build(v, stage, args, offload) for v in variants}
        times = {v: [] for v in variants}
        for round_ in range(args.warmup + args.rounds):
            inputs, labels = batch(round_, args.batch, args.seq, device)
            order = variants if round_ % 2 == 0 else variants[::-1]  # no variant always first
            for v in order:
                t = timed(built[v][1], inputs, labels)
                if round_ >= args.warmup:
                    times[v].append(t)
        results[f"zero{stage}{'_offload' if offload else ''}"] = {v: statistics.median(ts) for v, ts in times.items()}
        for engine, _ in built.values():
            engine.destroy()
        del built
        gc.collect()
    return {"medians_s": results, "rounds": args.rounds, "warmup": args.warmup}


def run_memory(args) -> dict:
    device = get_accelerator().current_device_name()
    engine, step = build(args.variant, args.stage, args)
    gc.collect()
    before = _rss_now()
    for i in range(args.rounds):
        step(*batch(i, args.batch, args.seq, device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if get_accelerator().device_name() != "cpu":  # the accelerator's memory is what runs out there
        peak = get_accelerator().max_memory_allocated()
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return {"peak_rss_bytes": peak, "rss_after_build_bytes": before, "numel": numel,
            "activation_bytes": _activation_bytes(engine, *batch(0, args.batch, args.seq, device))}  # fmt: skip


def _activation_bytes(engine, inputs, labels) -> int:
    """Bytes autograd saves for backward in one forward pass (the activations a second pass adds):
    unique tensors, parameters excluded."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task_loss(engine(**inputs).logits, labels)
    del loss
    return sum(seen.values())


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_traffic(args) -> dict:
    device = get_accelerator().current_device_name()
    counter = ByteCounter()
    rows = []
    for hidden, layers in args.sizes:
        per_variant = {}
        for variant in ("vanilla", "none", "second", "second-element"):
            args.hidden, args.layers = hidden, layers
            engine, _ = build(variant, 2, args)
            steps = []
            for i in range(3):
                inputs, labels = batch(i, args.batch, args.seq, device)
                if variant == "vanilla":
                    engine.backward(task_loss(engine(**inputs).logits, labels))
                else:
                    rose_ds.backward(engine, rose_ds.rose_losses(engine, inputs, labels, two_passes=False))
                counter.bytes, counter.phase = {}, "step"
                engine.step()
                counter.phase = "other"
                steps.append(counter.bytes.get("step", 0))
            per_variant[variant] = steps[-1]
            numel = sum(p.numel() for p in engine.module.parameters())
            if variant == "second":
                eligible = len(rose_ds.rose_optimizer(engine).eligible_names)
            engine.destroy()
            gc.collect()
        rows.append({"hidden": hidden, "layers": layers, "params": numel, "eligible_tensors": eligible,
                     "step_bytes_vanilla": per_variant["vanilla"], "step_bytes_rose_none": per_variant["none"],
                     "step_bytes_second": per_variant["second"],
                     "selection_bytes": per_variant["second"] - per_variant["none"],
                     "element_selection_bytes": per_variant["second-element"] - per_variant["none"]})  # fmt: skip
    return {"world_size": dist.get_world_size(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["time", "memory", "traffic"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument(
        "--method_stages",
        type=int,
        nargs="*",
        default=[2],
        help="stages whose time run also steps R-Drop, R3F, ChildTuning-F, alone and with ROSE",
    )
    parser.add_argument("--offload_stages", type=int, nargs="*", default=[2, 3],
                        help="stages also timed with offload_optimizer (vanilla: DeepSpeedCPUAdam)")  # fmt: skip
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, default="first")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                        default=[(128, 4), (256, 4), (512, 4), (256, 8)],
                        help="HIDDENxLAYERS model sizes (traffic)")  # fmt: skip
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--fused", action="store_true", help="fused Adam kernels for both vanilla and ROSE")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.manual_seed(1234 + dist.get_rank())  # dropout differs per rank, as in data parallelism
    result = {"time": run_time, "memory": run_memory, "traffic": run_traffic}[args.what](args)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"},
                                        "world_size": dist.get_world_size(), "ranks": gathered}, indent=2,
                                       default=str))  # fmt: skip


if __name__ == "__main__":
    main()
    rose_ds.shutdown()  # exiting with the process group alive can abort a rank
