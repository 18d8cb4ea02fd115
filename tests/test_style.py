"""DeepSpeed's own rule: device and process-group code goes through get_accelerator() and
deepspeed.comm, so the same code runs on CPU (gloo) and GPUs. The ROSE math imports neither."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "rose_ds").rglob("*.py")) + sorted((ROOT / "launch").rglob("*.py"))
PURE = ["config.py", "selection.py", "optim.py", "losses.py", "methods.py"]
# The one line allowed, and why: importing this module before any process group exists binds its functions'
# default group to None instead of the live WORLD group, which otherwise outlives destroy_process_group()
# (rose_ds.shutdown); it is an import for its side effect, no device or process-group call.
ALLOWED = {("rose_ds/zero.py", "import torch.distributed.nn.functional  # noqa: F401  isort: skip")}


def test_no_direct_cuda_or_torch_distributed():
    bad = re.compile(r"torch\.cuda|\.cuda\(|torch\.distributed|import torch\.distributed")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in SOURCES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line) and (str(p.relative_to(ROOT)), line.strip()) not in ALLOWED
    ]
    assert not offenders, f"use get_accelerator() / deepspeed.comm instead: {offenders}"


def test_rose_math_has_no_distributed_or_deepspeed_imports():
    bad = re.compile(r"^\s*(import|from)\s+(deepspeed|torch\.distributed)")
    for name in PURE:
        text = (ROOT / "rose_ds" / name).read_text()
        assert not any(bad.match(line) for line in text.splitlines()), name
