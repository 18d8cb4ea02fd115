"""Peak memory of ROSE's causal-LM losses: chunked (``rose_ds.token_losses``) versus the whole-logits
formula, side by side, at a 151,936-token vocabulary (Qwen2's).

Each variant runs in a fresh process: a forward and backward of the task loss plus the robust loss
from two passes' final hidden states ``[2 * batch, length, hidden]`` through a tied output
embedding, in fp32 on the CPU. The peak is the process's peak resident memory (``ru_maxrss``) minus
what it held once the inputs were made, so it counts what the losses themselves allocate (large
blocks come straight from ``mmap``, so freed memory leaves the resident set at once). The
whole-logits variant is ``tests/reference.py``'s formula: both passes' fp32 logits over every token
(and their log-probabilities and gradients) at once. Usage::

    python benchmarks/token_losses_memory.py [--batch 4] [--length 512] [--chunk 1024] [--json out.json]
    python benchmarks/token_losses_memory.py --batch 16 --variants chunked    # 12k tokens a pass
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(variant: str, batch: int, length: int, hidden: int, vocab: int, chunk: int) -> dict:
    """One variant in this process: returns the losses and the peak memory above the inputs."""
    from reference import reference_token_losses

    from rose_ds import token_losses

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(2 * batch, length, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 4] = -100  # a prompt
    before = _peak_mib()
    if variant == "chunked":
        losses = token_losses(h, head, labels, chunk_tokens=chunk)
        task, robust = losses.task, losses.robust
    else:
        z = head(h)
        task, robust = reference_token_losses(z[:batch], z[batch:], labels)
    (task + robust).backward()
    return {"variant": variant, "task": task.item(), "robust": robust.item(), "peak_mib": _peak_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per pass")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (small: the head's weight stays small)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=1024, help="token_losses' chunk_tokens")
    parser.add_argument("--variants", nargs="+", default=["whole-logits", "chunked"],
                        help="whole-logits needs about 19 [chunk, vocabulary] tensors per 4096 tokens")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a variant, in a child process
    args = parser.parse_args()
    shape = (args.batch, args.length, args.hidden, args.vocab, args.chunk)
    if args.one:
        print(json.dumps(run_one(args.one, *shape)))
        return
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--length", str(args.length),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk)]  # fmt: skip
        # large blocks straight from mmap, so that a freed tensor leaves the resident set at once and
        # the peak counts live memory, not what malloc keeps for reuse
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(proc.stdout.splitlines()[-1]))
    tokens = 2 * args.batch * args.length
    tensor_mib = args.chunk * args.vocab * 4 / 2**20
    print(f"token losses: 2 passes x {args.batch} x {args.length} tokens, vocabulary {args.vocab}, chunk {args.chunk}")
    print(f"  one fp32 [chunk, vocabulary] tensor: {tensor_mib:.0f} MiB; fp32 logits of every token of both passes: "
          f"{tokens * args.vocab * 4 / 2**20:.0f} MiB")  # fmt: skip
    for r in rows:
        print(f"  {r['variant']:>12}: peak {r['peak_mib']:8.0f} MiB ({r['peak_mib'] / tensor_mib:.1f} chunk tensors)"
              f"  task {r['task']:.6f} robust {r['robust']:.6f}")  # fmt: skip
    peaks = {r["variant"]: r["peak_mib"] for r in rows}
    if len(peaks) == 2:
        print(f"  ratio chunked / whole-logits: {peaks['chunked'] / peaks['whole-logits']:.3f}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "one")}
        args.json.write_text(json.dumps({"args": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
