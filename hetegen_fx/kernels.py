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
import time
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
#: rows of ``x`` (tokens) up to which ``hetegen_cpu::linear`` runs its GEMV (``kMaxRows`` in the source): up to
#: this a CPU part streams its weights from DRAM; beyond it, it is a compute-bound GEMM
GEMV_ROWS = 4
_LOCK = threading.Lock()
_STATE: list[bool] = []  # [whether hetegen_cpu::linear is loaded]: tried once per process
#: a build lock older than this (seconds) was left by a build that did not finish (a build takes tens of seconds)
STALE_LOCK_S = 600.0


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

        name = f"hetegen_cpu_gemv_{_cpu_tag()}"
        clear_stale_lock(name, progress)
        if progress:
            progress("building the CPU GEMV kernel for this machine (once)")
        build(
            name=name,
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


def clear_stale_lock(name: str, progress=None, poll_s: float = 0.5) -> bool:
    """Remove the build lock of extension ``name`` if a build that did not finish left it; whether it did.

    ``torch.utils.cpp_extension`` builds under a lock file in the build folder and waits, without end and
    silently, while one exists. A build that was interrupted (Ctrl-C, a killed process) leaves its lock
    behind, and every later process would then hang in its first CPU job. A lock younger than
    :data:`STALE_LOCK_S` may belong to a build under way in another process: it is waited for (with a
    message), and removed once it has grown older than that."""
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    except Exception:  # noqa: BLE001  (a private helper of torch's; without it torch waits as it always did)
        return False
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > STALE_LOCK_S:
            try:
                lock.unlink()
            except FileNotFoundError:  # another process removed it first
                return False
            warnings.warn(
                f"hetegen: removed {lock}, left {age / 60:.0f} min ago by a build of the CPU kernel that did not "
                "finish (an interrupted process); building it again",
                RuntimeWarning,
                stacklevel=3,
            )
            return True
        if not told and progress:
            progress(f"waiting for another process to finish building the CPU kernel (its lock: {lock})")
            told = True
        time.sleep(poll_s)


def cpu_linear():
    """The Linear the CPU parts run: ``hetegen_cpu::linear`` where it was built, else torch's."""
    return torch.ops.hetegen_cpu.linear if load() else torch.nn.functional.linear
