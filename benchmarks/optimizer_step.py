"""Optimizer step alone: RoseAdamW's masked update over a ZeRO-style flat shard versus torch AdamW.

One flat fp32 shard of Llama-style tensors (two blocks at hidden 2048: q, k, v, o, gate, up, down
and the two RMSNorm weights; >= 100M elements) is stepped by

* torch.optim.AdamW on the flat tensor (foreach, and fused where torch has it for the device),
* the second-order floor: torch's fused AdamW plus a ``dot`` over the gradient and one over the
  momentum, the two extra reads that a per-tensor ``||g_t||`` and ``||m_{t-1}||`` cannot avoid,
* the second-order statistics alone: the squared norms of every tensor's gradient and momentum as
  rose_ds takes them (fp32 over blocks of 2^18 elements, fp64 across blocks) and as one fp32 ``dot``
  per tensor would (faster, but 3e-3 off at 1e8 elements),
* element granularity (second-order, one global band over all the shard's elements through
  ``rose_ds.radix``): the selection alone, and selection plus the element-masked update,
* RoseAdamW's ZeRO path, foreach and fused: the masked update over segment views, with every tensor
  kept (c = 1), every tensor frozen (c = 0), and the published 65 % of eligible tensors kept; for
  ROSE-Second/Ensemble ("second-order") preceded by the per-segment grad and momentum squared norms
  the score needs, for ROSE-First ("first-order") without them (its statistics are the robust
  gradient's norms, taken after the robust backward, outside the optimizer step).

Variants run interleaved, one step each per round; the table reports the median of the timed rounds
and the ratio to the best torch AdamW. Targets (issue 6): ratio <= 1.10 with all kept, < 1.0 with
30 % frozen. Usage::

    python benchmarks/optimizer_step.py [--hidden 2048] [--layers 2] [--rounds 20] [--json out.json] [--device gpu]
    python benchmarks/optimizer_step.py --profile "RoseAdamW fused second-order all kept"
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rose_ds.optim import _runs, index_sum_of_squares, masked_adamw_  # noqa: E402
from rose_ds.selection import element_band_masks, element_second_order_scores  # noqa: E402

LR, BETAS, EPS, WD, STEP = 1e-4, (0.9, 0.98), 1e-6, 0.01, 10


def llama_segments(hidden: int, layers: int) -> list[tuple[int, int, int]]:
    """(start, numel, eligible index) of each tensor in the flat shard, Llama block order."""
    inter = int(hidden * 2.75)
    shapes = [hidden * hidden] * 4 + [hidden * inter] * 3 + [hidden] * 2
    segments, start = [], 0
    for _ in range(layers):
        for numel in shapes:
            segments.append((start, numel, len(segments)))
            start += numel
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (after 3 warm-up rounds)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: DeepSpeed's accelerator device")
    parser.add_argument("--profile", default=None, metavar="VARIANT",
                        help="instead of timing: torch profiler operator table, 3 steps of VARIANT")  # fmt: skip
    args = parser.parse_args()

    segments = llama_segments(args.hidden, args.layers)
    numel = sum(n for _, n, _ in segments)
    n_elig = len(segments)
    device, sync = "cpu", lambda: None
    if args.device == "gpu":
        from deepspeed.accelerator import get_accelerator

        device, sync = get_accelerator().current_device_name(), get_accelerator().synchronize
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(numel, generator=g) * 1e-3).to(device)

    def flat_state():
        return tuple(t.to(device) for t in (torch.randn(numel, generator=g), torch.randn(numel, generator=g) * 1e-3,
                                            torch.rand(numel, generator=g)))  # fmt: skip

    torch_variants, floor_variant = {}, {}
    for name, kw in (("torch AdamW foreach", dict(foreach=True)), ("torch AdamW fused", dict(fused=True))):
        p = torch.nn.Parameter(torch.randn(numel, generator=g).to(device))
        try:
            opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
            p.grad = grad
            opt.step()
        except (RuntimeError, TypeError):  # fused unsupported for this device or build
            continue
        torch_variants[name] = opt.step
        if kw.get("fused"):
            # the least a second-order step can do: a fused AdamW plus one read of the gradient and
            # one of the momentum for their norms (9 passes over the shard instead of 7)
            def floor(opt=opt, p=p):
                torch.dot(p.grad, p.grad)
                torch.dot(opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])
                opt.step()

            floor_variant = {"floor: torch AdamW fused + grad and momentum norms": floor}

    # one (param, m, v) for every RoseAdamW variant: timing does not depend on the values, and 12 private
    # copies of a 103M-element shard (15 GB) would push the machine into memory pressure
    shared = flat_state()

    def rose_step(kept_fraction: float, fused: bool, statistics: bool = True):
        param, m, v = shared
        order = torch.randperm(n_elig, generator=g).tolist()
        kept = set(order[: round(kept_fraction * n_elig)])
        c = [1.0 if i in kept else 0.0 for i in range(n_elig)]

        def step():
            # statistics of the second-order score, then the masked update over segment views
            if statistics:
                index_sum_of_squares([(i, grad.narrow(0, s, n)) for s, n, i in segments], n_elig)
                index_sum_of_squares([(i, m.narrow(0, s, n)) for s, n, i in segments], n_elig)
            runs = _runs(segments, c)
            views = [(s, n) for s, n, _ in runs]
            masked_adamw_(
                [param.narrow(0, s, n) for s, n in views], [grad.narrow(0, s, n) for s, n in views],
                [m.narrow(0, s, n) for s, n in views], [v.narrow(0, s, n) for s, n in views],
                [cv for _, _, cv in runs], lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, step=STEP,
                fused=fused,
            )  # fmt: skip

        return step

    def element_step(update: bool):
        """Element granularity, second-order, one global band over the shard's eligible elements."""
        param, m, v = shared

        def step():
            scores = [element_second_order_scores(grad.narrow(0, s, n), m.narrow(0, s, n)) for s, n, _ in segments]
            masks = element_band_masks(scores, 0.0, 65.0)
            if update:
                for (s, n, _), c in zip(segments, masks):
                    masked_adamw_([param.narrow(0, s, n)], [grad.narrow(0, s, n)], [m.narrow(0, s, n)],
                                  [v.narrow(0, s, n)], [c], lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                  weight_decay=WD, step=STEP)  # fmt: skip

        return step

    def norms_only(blocked: bool):
        """The second-order score's statistics alone: squared norms of every segment of g and m."""
        _, m, _ = shared

        def step():
            if blocked:  # rose_ds: fp32 over blocks of 2^18 elements, fp64 across blocks (~1e-8 relative)
                index_sum_of_squares([(i, grad.narrow(0, s, n)) for s, n, i in segments], n_elig)
                index_sum_of_squares([(i, m.narrow(0, s, n)) for s, n, i in segments], n_elig)
            else:  # one fp32 dot per segment (3e-3 relative error at 1e8 elements)
                for x in (grad, m):
                    torch.stack([torch.dot(x.narrow(0, s, n), x.narrow(0, s, n)) for s, n, _ in segments])

        return step

    variants = dict(torch_variants, **floor_variant)
    variants["norms only: g and m, blocked fp64 sums (rose_ds)"] = norms_only(blocked=True)
    variants["norms only: g and m, one fp32 dot per tensor"] = norms_only(blocked=False)
    variants["RoseAdamW element second-order selection only"] = element_step(update=False)
    variants["RoseAdamW element second-order step"] = element_step(update=True)
    for fused in (False, True):
        kind = "fused" if fused else "foreach"
        # second-order modes (second, ensemble) take grad and momentum norms inside the step; ROSE-First
        # takes its robust-gradient norms after the robust backward, so its step is the update alone
        for stats, label in ((True, "second-order"), (False, "first-order")):
            for kept, name in ((1.0, "all kept"), (0.65, "65% kept"), (0.0, "all frozen")):
                variants[f"RoseAdamW {kind} {label} {name}"] = rose_step(kept, fused, statistics=stats)
    if args.profile:
        step = variants[args.profile]
        step()
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return

    times = {name: [] for name in variants}
    for round_ in range(args.rounds + 3):
        for name, step in variants.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline_name = min(torch_variants, key=medians.get)
    baseline = medians[baseline_name]
    targets = {}
    for name in variants:
        if name.endswith("all kept") and name.startswith("RoseAdamW"):
            targets[name] = ("<=", 1.10)
        elif name.endswith("65% kept"):
            targets[name] = ("<", 1.0)

    machine = platform.processor() or platform.machine()
    print(f"flat shard: {numel / 1e6:.1f}M fp32 elements in {n_elig} tensors (hidden {args.hidden}, {args.layers} "
          f"blocks); torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}")  # fmt: skip
    print(f"{'variant':52s} {'median s':>9s} {'ratio':>7s}  target")
    rows = []
    for name, median in medians.items():
        ratio = median / baseline
        verdict = ""
        if name in targets:
            op, bound = targets[name]
            ok = ratio <= bound if op == "<=" else ratio < bound
            verdict = f"{op} {bound:.2f} {'PASS' if ok else 'FAIL'}"
        print(f"{name:52s} {median:9.4f} {ratio:7.3f}  {verdict}")
        rows.append({"variant": name, "median_s": median, "ratio_to_" + baseline_name.replace(" ", "_"): ratio,
                     "target": verdict})  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"numel": numel, "tensors": n_elig, "baseline": baseline_name,
                                               "rounds": args.rounds, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
