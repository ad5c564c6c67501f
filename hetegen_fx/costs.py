"""Per-Linear costs: measured on the machine, or predicted from a hardware model; cached on disk.

A cost is for the *whole* layer at one shape: ``t_cpu`` (the CPU computes it from RAM), ``t_copy`` (its
weights cross host→device) and ``t_gpu`` (the device computes it), plus ``t_cpu_fixed``, the part of
``t_cpu`` that does not shrink with the rows computed (thread wake-up, launch). The split ratio follows.

On a CUDA device the CPU is timed the way the split layer runs it: on the worker thread that runs the CPU
parts, with its thread count (:func:`hetegen_fx.host.default_threads`), while host→device copies stream on
another stream (they share the memory bus: the GEMV runs ~20-30 % slower than alone on the H200 host), at
all rows and at half of them (which gives the fixed part). Timed on the launching thread instead, once the
worker had run jobs, every decode-shaped GEMV of a 7B model read ~6 ms whatever its size: two teams of
intra-op threads shared the cores. The copy, in turn, is timed while that worker runs the layer's GEMVs, as
in the step, where copies always run beside the CPU parts: the bench's ceilings read 40-52 GB/s for copies
beside the GEMVs against 54-55 GB/s alone on the H100 hosts (on one machine the two timings of a layer's
copy agreed within 5 %).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import kernels
from .plan import atomic_write


@dataclass(frozen=True)
class LinearCost:
    t_cpu: float
    t_copy: float
    t_gpu: float
    source: str  # "measured" or "model"
    t_cpu_fixed: float = 0.0  # of t_cpu, what a CPU part costs however few rows it computes

    def alpha(self) -> float:
        """CPU share that balances ``F + α·(C − F) = (1−α)(M + G)`` (F: the CPU's fixed part):
        ``α = (M + G − F) / (C − F + M + G)``, in [0, 1]."""
        return job_alpha([self])


def job_alpha(costs: Sequence[LinearCost], overhead: float = 0.0) -> float:
    """One CPU share for the Linears of one CPU job (they read the same input, and the worker runs their CPU
    parts back to back): it balances the job's CPU lane, ``H + Σ F_i + α·Σ (C_i − F_i)``, against their
    device lane, ``(1 − α)·Σ (M_i + G_i)``, where H (``overhead``) is what the job costs the CPU lane beyond
    its GEMVs (the hand-offs both ways and the device work between two jobs, during which the CPU waits for
    its next input). So ``α = (ΣM + ΣG − H − ΣF) / (Σ(C − F) + ΣM + ΣG)``, in [0, 1]; 0 when no CPU part is
    worth its overhead."""
    return segment_alpha(costs, overhead)[0]


def segment_alpha(
    costs: Sequence[LinearCost], overhead: float = 0.0, streamed: float = 0.0
) -> tuple[float, float]:
    """The CPU share of one CPU job whose CPU part must also cover ``streamed`` seconds of other copies (the
    Linears streamed after it, whose copies run while the CPU computes), and the predicted time of that
    *segment*: ``α`` balances ``H + ΣF + α·Σ(C − F)`` against ``(1 − α)·Σ(M + G) + streamed``, clamped to
    [0, 1], and the time is the longer of the two lanes at that α. With ``streamed = 0`` this is
    :func:`job_alpha`."""
    c, f, m = _lanes(costs)
    total = c + m
    alpha = 0.0 if total <= 0 else min(1.0, max(0.0, (m + streamed - overhead - f) / total))
    return alpha, segment_time(costs, alpha, overhead, streamed)


def segment_time(
    costs: Sequence[LinearCost], alpha: float, overhead: float = 0.0, streamed: float = 0.0
) -> float:
    """The predicted time of a CPU job at CPU share ``alpha`` (see :func:`segment_alpha`): the longer of its
    CPU lane, ``H + ΣF + α·Σ(C − F)`` (nothing at α = 0: the job is streamed), and its device lane,
    ``(1 − α)·Σ(M + G) + streamed``."""
    c, f, m = _lanes(costs)
    cpu = overhead + f + alpha * c if alpha > 0 else 0.0
    return max(cpu, (1.0 - alpha) * m + streamed)


def _lanes(costs: Sequence[LinearCost]) -> tuple[float, float, float]:
    """``Σ(C − F)``, ``ΣF`` and ``Σ(M + G)`` of ``costs`` (F: each CPU time's fixed part, at most the whole)."""
    c = f = m = 0.0
    for cost in costs:
        fixed = min(cost.t_cpu_fixed, cost.t_cpu)
        c += cost.t_cpu - fixed
        f += fixed
        m += cost.t_copy + cost.t_gpu
    return c, f, m


@dataclass(frozen=True)
class HardwareModel:
    """Bandwidths (bytes/s), compute rates (flop/s) and per-call overheads (s) of one machine."""

    cpu_bw: float
    cpu_flops: float
    h2d_bw: float
    gpu_bw: float
    gpu_flops: float
    cpu_overhead: float = 20e-6
    gpu_overhead: float = 10e-6
    #: what one CPU job costs the CPU lane beyond its GEMVs (:func:`job_alpha`'s H); 0 on the emulated device,
    #: whose "device" is the same CPU
    job_overhead: float = 0.0
    #: what the CPU lane waits between two jobs of a decode step (the device's work from one job's "done" to the
    #: next one's "ready"): 0.25-0.29 ms a job on the H100 host (docs/benchmarks-history.md, 2026-11-23). Streaming a job into the
    #: segment of the job before it saves one such gap (PlacementPass._stream_jobs); 0 under emulation
    job_gap: float = 0.0

    def cost(self, out_features: int, in_features: int, tokens: int, dtype: torch.dtype) -> LinearCost:
        nbytes = out_features * in_features * _itemsize(dtype)
        flops = 2.0 * out_features * in_features * tokens
        act = tokens * (in_features + out_features) * _itemsize(dtype)
        return LinearCost(
            t_cpu=max((nbytes + act) / self.cpu_bw, flops / self.cpu_flops) + self.cpu_overhead,
            t_copy=nbytes / self.h2d_bw,
            t_gpu=max((nbytes + act) / self.gpu_bw, flops / self.gpu_flops) + self.gpu_overhead,
            source="model",
        )


#: the GPU test host (H100/H200, 16 Xeon cores, PCIe Gen5), measured 2026-11-21: ARCHITECTURE.md §2
CUDA_HOST = HardwareModel(
    cpu_bw=70e9,
    cpu_flops=0.8e12,
    h2d_bw=55e9,
    gpu_bw=3.0e12,
    gpu_flops=400e12,
    job_overhead=150e-6,
    job_gap=270e-6,
)
#: a small CPU-only machine running the "GPU side" on the CPU as well (emulation)
CPU_EMULATION = HardwareModel(cpu_bw=10e9, cpu_flops=50e9, h2d_bw=10e9, gpu_bw=10e9, gpu_flops=50e9)


def default_model(device: torch.device) -> HardwareModel:
    return CPU_EMULATION if device.type == "cpu" else CUDA_HOST


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CostCache:
    """Measured costs on disk, keyed by machine (host, CPU, threads, device, torch), shape and dtype."""

    #: bumped whenever what is measured changes, so older entries are measured again
    METHOD = 5

    def __init__(
        self, cache_dir: str | os.PathLike | None, device: torch.device, threads: int | None = None
    ) -> None:
        root = Path(cache_dir or os.environ.get("HETEGEN_CACHE_DIR") or Path.home() / ".cache" / "hetegen_fx")
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        threads = threads or torch.get_num_threads()
        machine = (
            f"{platform.node()}|{platform.processor() or platform.machine()}|{threads}t|{dev}|"
            f"torch{torch.__version__}|m{self.METHOD}|{'gemv' if kernels.load() else 'aten'}"
        )
        self.machine = machine
        self.path = root / "profiles.json"
        self._lock = threading.Lock()
        self._data: dict = {}
        if self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self._data = {}  # a corrupt cache is re-measured, not fatal

    @staticmethod
    def key(out_features: int, in_features: int, tokens: int, dtype: torch.dtype) -> str:
        return f"{out_features}x{in_features}x{tokens}:{str(dtype).removeprefix('torch.')}"

    @staticmethod
    def parse(key: str) -> tuple[int, int, int, torch.dtype]:
        """``(out_features, in_features, tokens, dtype)`` of a :meth:`key`."""
        shape, _, dtype = key.partition(":")
        out_features, in_features, tokens = (int(v) for v in shape.split("x"))
        return out_features, in_features, tokens, getattr(torch, dtype)

    def get(self, key: str) -> LinearCost | None:
        hit = self._data.get(self.machine, {}).get(key)
        return LinearCost(**hit) if hit else None

    def put(self, key: str, cost: LinearCost) -> None:
        with self._lock:
            self._data.setdefault(self.machine, {})[key] = asdict(cost)

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self._data, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time


#: bytes of weights cycled through when timing the CPU part: more than any last-level cache (the GPU host
#: has 300 MiB of L3), so a layer is timed streaming from DRAM as it will run, not from cache
ROTATION_BYTES = 768 * 2**20


def llc_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the largest CPU cache Linux reports for CPU 0 (the last-level cache), or None if unknown."""
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KkMmGg")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def streaming_bytes() -> int:
    """Bytes a working set needs so that cycling through it streams from DRAM on this machine: four times the
    last-level cache (1 GiB where unknown), at least 256 MiB.

    A cyclic working set only a little larger than the cache is still served partly from it: on one GPU
    host machine (300 MiB of L3) a CPU GEMV cycling through 344 MiB of weights read 118-130 GB/s alone
    against 109-121 GB/s through 2 GiB, and 140-153 GB/s against 93-103 GB/s beside host→device copies
    (docs/benchmarks-history.md, 2026-11-23, commit 7383492)."""
    llc = llc_bytes()
    return max(256 * 2**20, 4 * llc if llc else 2**30)


def _median_time(fns: list, sync, min_reps: int = 5, budget_s: float = 0.05) -> float:
    """Median seconds of one call, cycling through ``fns`` (each touching different memory)."""
    for f in fns[:3]:
        f()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        sync()
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (as the CPU worker will), then restore the caller's setting."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CopyLoad:
    """Host→device copies kept streaming on a side stream while the CPU is timed (CUDA only).

    The copies read a 64 MiB pinned host buffer chunk by chunk into one small device buffer: the host's
    memory bus sees the traffic of streaming weights, while the device holds only :data:`CHUNK` bytes
    (profiling runs inside a model's first call, within its ``gpu_memory`` budget).
    """

    CHUNK = 2 * 2**20

    def __init__(self, device: torch.device) -> None:
        self.host = torch.empty(64 * 2**20, dtype=torch.uint8).pin_memory()
        self.dev = torch.empty(self.CHUNK, dtype=torch.uint8, device=device)
        self.chunks = self.host.view(-1, self.CHUNK)
        self.stream = torch.cuda.Stream(device)

    def start(self, seconds: float) -> None:
        copies = max(16, int(seconds * 55e9 / self.CHUNK) + 16)  # ~55 GB/s: enough to outlast the timing
        with torch.cuda.stream(self.stream):
            for i in range(copies):
                self.dev.copy_(self.chunks[i % len(self.chunks)], non_blocking=True)

    def stop(self) -> None:
        self.stream.synchronize()


def _copy_time_under_load(wp: torch.Tensor, wd: torch.Tensor, busy, call=None) -> float:
    """Seconds of one host→device copy ``wp → wd`` while ``busy(seconds)`` loads the CPU, run by ``call``
    (the worker's :meth:`~hetegen_fx.host.HostWorker.call`; else on this thread). The copies are queued
    behind ~2 ms of device sleep (4M cycles), so the load has started when they do, and timed by events; the
    load lasts until they end unless they run below 20 GB/s or the sleep exceeds 15 ms."""
    nbytes = wp.numel() * wp.element_size()
    reps = max(4, min(64, -(-int(20e-3 * 50e9) // max(nbytes, 1))))  # ~20 ms of copies
    stream = torch.cuda.Stream(wd.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        wd.copy_(wp, non_blocking=True)  # warm
        torch.cuda._sleep(4_000_000)  # cycles: 2 ms at 2 GHz
        start.record()
        for _ in range(reps):
            wd.copy_(wp, non_blocking=True)
        end.record()
    seconds = 15e-3 + reps * nbytes / 20e9  # 15 ms: the sleep is 12 ms at an idle H100's 345 MHz
    if call is not None:
        call(lambda: busy(seconds))
    else:
        busy(seconds)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def measure_cost(
    out_features: int,
    in_features: int,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    threads: int | None = None,
    load: CopyLoad | None = None,
    worker=None,
    copy_under_load: bool = True,
) -> LinearCost:
    """Time the layer's three parts on this machine, on fresh random data streamed from DRAM.

    On CUDA the CPU is timed with ``threads`` threads while copies stream (``load``, made for this call if
    not given; see the module docstring), at all rows and at half of them: ``t_cpu_fixed = 2·t(half) − t(all)``,
    on ``worker`` (a :class:`hetegen_fx.host.HostWorker`, the one that will run the CPU parts) when given.
    Likewise the copy is timed while that CPU runs the layer's GEMVs (``copy_under_load``): the two share the
    host's memory bus (see the module docstring).
    """
    gen = torch.Generator().manual_seed(out_features * 31 + in_features)
    nbytes = out_features * in_features * _itemsize(dtype)
    copies = max(2, min(16, -(-ROTATION_BYTES // max(nbytes, 1))))
    ws = [
        torch.empty(out_features, in_features, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
        for _ in range(copies)
    ]
    x = torch.empty(tokens, in_features, dtype=dtype).uniform_(-1, 1, generator=gen)
    linear = kernels.cpu_linear()  # the kernel the CPU parts will run (CPU tensors only)
    half = max(1, out_features // 2)
    if device.type == "cuda" and load is None:
        load = CopyLoad(device)

    def time_cpu() -> tuple[float, float]:  # no CUDA call: it may run on the worker thread
        # at GEMV shapes each the lower of two windows, one after the other: a window can only be slowed by
        # something else on the machine, and one had read a 4096×4096 GEMV at 2.7 ms against 0.4 ms (H100)
        full, part = float("inf"), float("inf")
        with _threads(threads if load is not None else None), torch.no_grad():
            for _ in range(windows):
                full = min(full, _median_time([lambda w=w: linear(x, w) for w in ws], lambda: None))
                part = min(part, _median_time([lambda w=w: linear(x, w[:half]) for w in ws], lambda: None))
        return full, part

    # two windows at GEMV shapes (where α matters and the slow spells were seen), one for a compute-bound
    # GEMM, whose windows take 0.1-0.5 s each; the copy load outlasts the decode shapes' windows
    windows = 2 if tokens <= kernels.GEMV_ROWS else 1
    if load is not None:
        load.start(0.5 if windows == 2 else 0.15)
    try:
        t_cpu, t_half = worker.call(time_cpu) if worker is not None else time_cpu()
    finally:
        if load is not None:
            load.stop()
    fixed = min(t_cpu, max(0.0, 2 * t_half - t_cpu)) if half < out_features else 0.0
    if device.type == "cuda":
        sync = torch.cuda.synchronize
        wp = ws[0].pin_memory()
        wd = torch.empty_like(wp, device=device)
        xd = x.to(device)
        if copy_under_load:

            def busy(seconds: float) -> None:  # the CPU parts' GEMVs, as they run beside the copies
                with _threads(threads), torch.no_grad():
                    end, i = time.perf_counter() + seconds, 0
                    while time.perf_counter() < end:
                        linear(x, ws[i % len(ws)])
                        i += 1

            t_copy = _copy_time_under_load(wp, wd, busy, worker.call if worker is not None else None)
        else:
            t_copy = _median_time([lambda: wd.copy_(wp, non_blocking=True)], sync)
        t_gpu = _median_time([lambda: torch.nn.functional.linear(xd, wd)], sync)
        del wp, wd, xd
    else:
        buf = torch.empty_like(ws[0])
        t_copy = _median_time([lambda w=w: buf.copy_(w) for w in ws], lambda: None)
        t_gpu = t_cpu
    return LinearCost(t_cpu=t_cpu, t_copy=t_copy, t_gpu=t_gpu, source="measured", t_cpu_fixed=fixed)
