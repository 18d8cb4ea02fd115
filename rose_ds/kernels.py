"""rose_ds's C++ CPU kernels (``rose_ds/csrc/cpu_kernels.cpp``), built at first use.

The optimizer step under ``offload_optimizer`` (and any RoseAdamW over float32 CPU tensors) runs
here: ROSE's masked AdamW in one pass over ``p, g, m, v`` that also returns each tensor's
``||m_t||^2`` (the next step's second-order statistic, so the step never re-reads the momentum),
blocked squared norms, and the element-granularity helpers. Built like DeepSpeed's own CPU ops,
with ``torch.utils.cpp_extension.load`` (``-O3 -march=native -fopenmp``) into torch's extensions
folder (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): the first use on a
machine compiles for about a minute, later processes load the cached library. The library's name
carries a hash of the source, the flags and the CPU's feature flags, so machines of different CPU
types sharing one home folder each build their own.

Where it cannot be built (no C++ compiler, a failed build), :func:`cpu_kernels` returns None after
one warning line and rose_ds uses torch's kernels (same formulas, slower). ``ROSE_DS_CPU_KERNELS=0``
in the environment skips the build and uses torch's kernels without a warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ENV = "ROSE_DS_CPU_KERNELS"
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
# -ffp-contract=off: a * b + c stays two roundings, as in torch, so the element scores equal
# torch's bit for bit and a loop's vector and scalar (tail) iterations round alike;
# -fno-math-errno and -fno-trapping-math let sqrt and the selects between computed values vectorise
# (neither changes a result: no errno or floating-point trap is ever read).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (what -march=native compiles for), or its architecture name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def extension_name() -> str:
    """The library's name in the extensions folder: one build per source, flags and CPU type."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), _cpu_fingerprint().encode()):
        digest.update(part)
    return f"rose_ds_cpu_kernels_{digest.hexdigest()[:12]}"


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call of the process; None where they cannot
    be built (one warning line, then torch's kernels) or ``ROSE_DS_CPU_KERNELS=0``."""
    if "module" in _loaded:
        return _loaded["module"]
    with _lock:  # ranks simulated by threads call this at once; torch's build lock covers processes
        if "module" not in _loaded:
            _loaded["module"] = _build()
    return _loaded["module"]


def _build() -> ModuleType | None:
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                    verbose=False)  # fmt: skip
    except Exception as err:  # no compiler, no ninja, a failed build: torch's kernels do the same work
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        warnings.warn(
            f"rose_ds: the C++ CPU optimizer kernels could not be built ({reason}); using torch's kernels "
            f"(same results, slower; {ENV}=0 skips the build)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def applies(*tensors: Tensor | None) -> bool:
    """Whether the kernels can take these tensors: contiguous float32 on the CPU (None: absent, fine)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)  # fmt: skip
