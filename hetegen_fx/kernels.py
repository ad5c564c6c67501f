"""CPU kernels of hetegen_fx, built for the machine on first use.

``hetegen_cpu::linear(x, w, b)`` (``csrc/gemv.cpp``) computes a Linear with fp16 or bf16 weights at decode
shapes (up to four rows) at the speed of memory: torch's own CPU kernels for those dtypes are bound by
their conversions on the GPU host (60 and 29 GB/s of weights against 109 GB/s for fp32). Larger inputs, and
other dtypes, go to ``torch.nn.functional.linear`` inside the op.

It is compiled with the host's C++ compiler (``-O3 -march=native``, so for this CPU alone: the build folder
is named after the CPU) by ``torch.utils.cpp_extension``, once per machine and torch version, in tens of
seconds; :func:`cpu_linear` then returns it. Where no compiler is found, or with ``HETEGEN_CPU_KERNEL=0``,
the CPU parts use ``torch.nn.functional.linear`` (a warning says why).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
#: rows of ``x`` (tokens) up to which ``hetegen_cpu::linear`` runs its GEMV (``kMaxRows`` in the source): up to
#: this a CPU part streams its weights from DRAM; beyond it, it is a compute-bound GEMM
GEMV_ROWS = 4
_LOCK = threading.Lock()
_STATE: list[bool] = []  # [whether hetegen_cpu::linear is loaded]: tried once per process


def _cpu_tag() -> str:
    """A short name for this CPU's model and instruction sets (what ``-march=native`` compiled for)."""
    text = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load(progress=None) -> bool:
    """Build (once per machine) and load ``hetegen_cpu::linear``; whether it is available."""
    with _LOCK:
        if not _STATE:
            _STATE.append(_build(progress))
        return _STATE[0]


def _build(progress) -> bool:
    if os.environ.get("HETEGEN_CPU_KERNEL", "1") == "0":
        return False
    if hasattr(torch.ops.hetegen_cpu, "linear"):  # loaded by another copy of this module
        return True
    try:
        from torch.utils.cpp_extension import load as build

        if progress:
            progress("building the CPU GEMV kernel for this machine (once)")
        build(
            name=f"hetegen_cpu_gemv_{_cpu_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return hasattr(torch.ops.hetegen_cpu, "linear")
    except Exception as e:  # noqa: BLE001  (no compiler, no headers, ...: the CPU parts use torch's kernel)
        warnings.warn(
            f"hetegen: could not build the CPU GEMV kernel ({type(e).__name__}: {str(e).strip()[:300]}); the CPU "
            "parts use torch.nn.functional.linear, slower for fp16/bf16 weights",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def cpu_linear():
    """The Linear the CPU parts run: ``hetegen_cpu::linear`` where it was built, else torch's."""
    return torch.ops.hetegen_cpu.linear if load() else torch.nn.functional.linear
