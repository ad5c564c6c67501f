"""CPU kernels of hetegen_fx, built for the machine on first use.

``hetegen_cpu::linear(x, w, b)`` (``csrc/gemv.cpp``) computes a Linear with fp16 or bf16 weights at decode
shapes (up to four rows) at the speed of memory: torch's own CPU kernels for those dtypes are bound by
their conversions on the GPU host (60 and 29 GB/s of weights against 109 GB/s for fp32). Larger inputs, and
other dtypes, go to ``torch.nn.functional.linear`` inside the op.

It is compiled with the host's C++ compiler (``-O3 -march=native``, so for this CPU alone) by
``torch.utils.cpp_extension``, in tens of seconds, once for each :func:`build_key`: the build folder is named
after everything that changes the build (the source's content, the flags, the compiler, torch, Python and the
CPU), so two installs of the package on one machine each keep their own build instead of rebuilding it in
turn, and the same source installed in two places shares one. :func:`cpu_linear` then returns it. Where no
compiler is found, or with ``HETEGEN_CPU_KERNEL=0``, the CPU parts use ``torch.nn.functional.linear`` (a
warning says why).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
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
#: what the kernel is compiled and linked with (part of :func:`build_key`)
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
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


def _compiler() -> str:
    """The C++ compiler torch's loader runs (``$CXX``, else ``c++``) and the first line of its ``--version``."""
    try:
        from torch.utils.cpp_extension import get_cxx_compiler

        cxx = get_cxx_compiler()
    except Exception:  # noqa: BLE001  (what torch.utils.cpp_extension does on Linux and macOS)
        cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        version = out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):  # no compiler: the build fails and says so
        version = "not found"
    return f"{cxx}: {version}"


def build_key_parts(source: Path = _SOURCE) -> dict[str, str]:
    """What changes the build of ``source``, and so goes into its build folder's name (:func:`build_key`).

    torch's loader keeps one build per extension name and folder, and its ``ninja`` build compiles again when
    the build command changes: the source's path, torch's and Python's header folders, the flags. The build
    is therefore compiled from a copy of the source inside the build folder (:func:`_stage`), and the key holds
    the rest of the command (torch's folder, Python's headers) besides what the command does not show: the
    source's content, the compiler's version, torch's version and C++ ABI, and the CPU that ``-march=native``
    compiles for. The package's own install path is not part of it."""
    return {
        "source": hashlib.sha256(source.read_bytes()).hexdigest(),
        "cflags": " ".join(CFLAGS),
        "ldflags": " ".join(LDFLAGS),
        "compiler": _compiler(),
        "torch": (
            f"{torch.__version__} git {torch.version.git_version} cxx11abi "
            f"{int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', 0))} cuda {torch.version.cuda} hip {torch.version.hip}"
        ),
        "torch_dir": os.path.dirname(os.path.realpath(torch.__file__)),
        "python": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')} {sysconfig.get_path('include')}",
        "platform": f"{sys.platform} {platform.machine()}",
        "cpu": _cpu_tag(),
    }


def build_key(source: Path = _SOURCE) -> str:
    """A short hash of :func:`build_key_parts`: the build folder (and extension) is ``hetegen_cpu_gemv_<key>``."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(build_key_parts(source).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stage(source: Path, folder: Path) -> Path:
    """A copy of ``source`` in the build folder ``folder``, what its build compiles: one path for every install.

    Written once (to a temporary file, then linked into place, so another process never reads half of it), and
    left as it is while its content matches: ``ninja`` compares its time with the object file's."""
    data = source.read_bytes()
    dst = folder / source.name
    try:
        if dst.read_bytes() == data:
            return dst
    except FileNotFoundError:
        pass
    tmp = folder / f".{source.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    try:
        try:
            # only where still absent: a copy another process staged meanwhile keeps its time stamp
            os.link(tmp, dst)
            return dst
        except FileExistsError:
            if dst.read_bytes() == data:
                return dst
        except OSError:  # a file system without hard links
            pass
        os.replace(tmp, dst)
        return dst
    finally:
        tmp.unlink(missing_ok=True)


def load(progress=None) -> bool:
    """Build (once per :func:`build_key`) and load ``hetegen_cpu::linear``; whether it is available."""
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
        _compile(progress)
        return hasattr(torch.ops.hetegen_cpu, "linear")
    except Exception as e:  # noqa: BLE001  (no compiler, no headers, ...: the CPU parts use torch's kernel)
        warnings.warn(
            f"hetegen: could not build the CPU GEMV kernel ({type(e).__name__}: {str(e).strip()[:300]}); the CPU "
            "parts use torch.nn.functional.linear, slower for fp16/bf16 weights",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def _compile(progress=None, source: Path = _SOURCE) -> str:
    """Build (unless its folder holds it already) and load the kernel of ``source``; its extension name."""
    from torch.utils import cpp_extension

    name = f"hetegen_cpu_gemv_{build_key(source)}"
    clear_stale_lock(name, progress)
    try:
        staged = _stage(source, Path(cpp_extension._get_build_directory(name, verbose=False)))
    except Exception:  # noqa: BLE001  (a private helper of torch's: build from the package, as before)
        staged = source
    if progress:
        progress("building the CPU GEMV kernel for this machine (once)")
    cpp_extension.load(
        name=name,
        sources=[str(staged)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        is_python_module=False,
        verbose=False,
    )
    return name


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
