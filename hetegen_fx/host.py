"""The CPU parts of split Linears, run on a worker thread so the thread that launches GPU work never waits.

Owns: the worker thread, its job ring and pinned buffers, and the hand-off words the device waits on. Must
not: make a CUDA call on the worker, or need the GIL while a job the device waits for is pending (below).

A group of Linears that read the same activation ``x`` (q/k/v, gate/up) is one *job*::

    cpu_begin:  [stream] x → pinned host buffer; write the job's number into the "ready" word;
                [thread] post the job's descriptor (number, weights, buffers, shape) to the worker
    worker:     wait for the "ready" word; y = [x W_1[:k_1]ᵀ + b_1[:k_1], ...] (one kernel call) into a pinned host
                buffer; write the job's number into the "done" word
    cpu_end:    [stream] wait until the "done" word reaches the job's number; y → device

Both words live in pinned host memory: the device writes and waits on them with the driver's stream memory
operations (``cuStreamWriteValue32`` / ``cuStreamWaitValue32``), the worker reads and writes them as plain
memory. So the launching thread runs ahead: it queues the GPU parts, the later layers and the copies while
the CPU computes, and CPU GEMV, PCIe copies and kernel launches all proceed at once.

The worker makes no CUDA call at all. A device stream waiting on the worker must never wait on a CUDA call
the worker makes: the driver may hold a context-wide lock while it waits for the device to drain (lazy
kernel loading on the launching thread does), and a worker blocked on that lock would never write the word
the device waits for (seen on an H200: a deadlock at the first GEMM of a new shape). For the same reason
the worker never frees pinned memory (freeing it records CUDA events): buffers live until :meth:`free`.

The GIL, for the same reason. The launching thread holds the GIL nearly all the time, *also while a CUDA
call blocks it*: a kernel launch blocks once the device's launch queue is full, which happens whenever the
thread runs far ahead of a device that waits for a long CPU job (a 512-token prefill with every Linear on
the CPU). A worker that needed the GIL to start the job the device waits for would then never get it: a
deadlock (seen on the H100 and H200 hosts, reproducibly, in that prefill). So the worker takes jobs without
the GIL. It runs :func:`_job_server`, compiled by TorchScript, whose interpreter runs without the GIL: the
server reads job descriptors from a ring the launching thread fills (:attr:`HostWorker._desc`, plain
integers written through ctypes), looks up the weights and buffers in tables it was entered with, and
spins on the ring and on the "ready" word. It leaves (and the worker needs the GIL again) only when it has
been idle for a while, when its tables must grow (a new group of weights, a larger buffer) or for a
:meth:`HostWorker.call`; before the launching thread posts a job, it makes sure (waiting with the GIL
released) that a server with the current tables runs. Measured before this design, with the job loop
scripted per batch of queued jobs, against the same loop in Python: 108.5 against 111.7 ms a 7B token
(60 jobs a token), 117.6 against 126-131 ms (100 jobs).

TorchScript is deprecated in favour of ``torch.compile``, which offers no GIL-free interpreter for such a
loop; where scripting fails (or with ``HETEGEN_SCRIPTED_JOBS=0``) the same function runs in Python, which
needs the GIL between its steps: correct, slower, and open to the deadlock above. While a timeline is
recorded (:attr:`HostWorker.log`) the server stamps each job with the CPU kernel's clock
(``hetegen_cpu::now``); without the kernel the worker times each job from Python, with the same exposure.

Where the driver offers no stream memory operations (or ``HETEGEN_STREAM_WAIT=0``), ``cpu_begin`` waits on
the launching thread (GIL released) until ``x`` is on the host, and ``cpu_end`` until the job is done:
correct, with less overlap, and the device never waits on the worker. On an emulated device (``"cpu"``)
the same server runs the jobs and ``cpu_end`` waits for them, so the job logic is exercised without an
accelerator.

A graph with CPU jobs ends with ``cpu_wait``, which waits for its jobs with the GIL released, before
anything blocks on the device with the GIL held (its outputs' copies to the host, the caller's next steps).

Buffer reuse is safe because every job's device-side steps are ordered on the one compute stream and the
worker runs jobs in order: a host buffer pair goes back to the pool only after ``cpu_end`` has queued the
copy out of it, and the next job that takes it writes ``x`` after that copy in stream order and ``y`` after
its own "x ready".
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import kernels
from .blocks import activate

#: CU_STREAM_WAIT_VALUE_GEQ: ``(int32)(*addr - value) >= 0``, so the job counter may wrap around
_WAIT_GEQ = 0
#: job descriptors in the ring; the launching thread waits (GIL released) when all are unread
_CAPACITY = 1024
#: a descriptor: job number, site (weights) index, x buffer index, y buffer index, rows, x's columns, activation
#: code of an MLP block's job (0: a plain job; :mod:`hetegen_fx.blocks`)
_FIELDS = 7
#: polls of an empty ring before the server leaves (tens of ms; the worker then sleeps in Python)
_IDLE_SPINS = 100_000
#: rows of job stamps kept while a timeline is recorded (:attr:`HostWorker.log`)
_STAMPS = 4096
#: counters shared with the server: [0] ring head (written by the launching thread), [1] ring tail (next
#: descriptor to run; written by the server), [2] generation of the tables a server runs with (0 while
#: none runs), [3] generation of the latest server entered (never cleared)
_HEAD, _TAIL, _SERVING, _ENTERED = 0, 1, 2, 3


class _StreamMemOps:
    """``cuStreamWaitValue32`` and ``cuStreamWriteValue32`` from the CUDA driver, loaded on first use
    (``None`` where unavailable or disabled with ``HETEGEN_STREAM_WAIT=0``)."""

    _ops: tuple | None = None
    _loaded = False

    @classmethod
    def get(cls) -> tuple | None:
        if not cls._loaded:
            cls._loaded = True
            if os.environ.get("HETEGEN_STREAM_WAIT", "1") == "0":
                return None
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError:
                return None
            fns = []
            for base in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
                fn = getattr(lib, base + "_v2", None) or getattr(lib, base, None)
                if fn is None:
                    return None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
                fn.restype = ctypes.c_int
                fns.append(fn)
            cls._ops = tuple(fns)
        return cls._ops


#: (device index, raw stream) → its torch Stream: the current stream is looked up a few hundred times a
#: decode step, and ``torch.cuda.current_stream(device)`` costs ~20 µs of the launching thread's time each
_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


#: ``cudaStream_t`` of a device index's current stream in one C call (absent from CPU-only torch builds)
_GET_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw(index: int) -> int:
    if _GET_RAW_STREAM is None:  # not in this torch build: the public, slower way
        return torch.cuda.current_stream(index).cuda_stream
    return _GET_RAW_STREAM(index)


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def raw_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` (``"cuda"`` alone: the current device) as a ``cudaStream_t``."""
    return _raw(_index(device))


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """``torch.cuda.current_stream(device)`` without its per-call cost."""
    index = _index(device)
    key = (index, _raw(index))
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.current_stream(index)
    return stream


def _reached(word: ctypes.c_uint32, seq: int) -> bool:
    """``word ≥ seq`` for 32-bit counters that may wrap around (as the driver's GEQ compares)."""
    return ((word.value - seq) & 0xFFFFFFFF) < 0x80000000


def _torch_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


def _kernel_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.hetegen_cpu.linear(x, w, b)


#: the Linear the job server runs: :func:`_kernel_linear` once :mod:`hetegen_fx.kernels` has built it (set by
#: :func:`_scripted_server` before it scripts the server, which binds the global then)
_cpu_linear = _torch_linear


def _each_linear(
    x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], out: torch.Tensor
) -> None:
    """A job's Linears one by one (:data:`_cpu_linear`), each output copied into its columns of ``out``."""
    off = 0
    for i in range(len(ws)):
        n = ws[i].size(0)
        out.narrow(1, off, n).copy_(_cpu_linear(x, ws[i], bs[i]))
        off += n


def _kernel_linears(
    x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], out: torch.Tensor
) -> None:
    torch.ops.hetegen_cpu.linears(x, ws, bs, out)


#: how the job server runs a job's Linears when it runs them together: :func:`_kernel_linears` (one OpenMP
#: team for all of them, written in place) where the kernel is built, else :func:`_each_linear`
_cpu_linears = _each_linear


def _no_clock() -> int:
    return 0


def _kernel_clock() -> int:
    return torch.ops.hetegen_cpu.now()


#: the clock the job server stamps jobs with (monotonic nanoseconds): :func:`_kernel_clock` where the kernel
#: is built (bound as :data:`_cpu_linear` is); without it the worker times jobs from Python instead
_now = _no_clock


def _run_linears(
    x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], out: torch.Tensor, together: bool
) -> None:
    """A job's Linears into the columns of ``out``: together (:data:`_cpu_linears`) or one by one."""
    if together:
        _cpu_linears(x, ws, bs, out)
    else:
        _each_linear(x, ws, bs, out)


@torch.jit.ignore
def _pause() -> None:
    """Give the GIL away for a moment (only the Python run of :func:`_job_server` calls this)."""
    time.sleep(0)


_pause.__annotations__ = {"return": None}  # a real None, not the string ``from __future__`` makes of it


def _job_server(
    desc: torch.Tensor,
    counters: torch.Tensor,
    words: torch.Tensor,
    stamps: torch.Tensor,
    sites_w: list[list[torch.Tensor]],
    sites_b: list[list[torch.Tensor | None]],
    xbufs: list[torch.Tensor],
    ybufs: list[torch.Tensor],
    generation: int,
    wait_ready: bool,
    idle_spins: int,
    max_jobs: int,
    python: bool,
    stamp: bool,
    together: bool,
) -> int:
    """Run the jobs posted to the ring ``desc`` in order, from ``counters[TAIL]`` on (see the module
    docstring; ``counters`` as :data:`_HEAD` and following say). For each job: if ``wait_ready``, spin until
    ``words[0] ≥`` its number (wrap-safe); write each Linear's output into its columns of the job's y
    buffer; set ``words[1]`` to its number. A descriptor with a negative number ``-g`` is a stop: the
    server leaves if ``g`` is above its ``generation`` (newer tables exist) and skips it otherwise.
    Returns 0 after ``idle_spins`` polls of an empty ring, 1 at a stop, 2 after ``max_jobs`` jobs (0: no
    limit). Scripted by :func:`_scripted_server`, it runs without the GIL; ``python`` pauses in its
    polls so that the same function can run in Python. With ``stamp``, job ``seq`` writes ``[seq, start,
    end]`` (:data:`_now` nanoseconds, from "ready" seen to its output written) into row ``seq % len(stamps)``
    of ``stamps`` before its "done". With ``together`` a job's Linears run in one call (:data:`_cpu_linears`),
    else one call each (:func:`_each_linear`)."""
    cap = desc.size(0)
    tail = int(counters[1].item())
    counters[3].fill_(generation)
    counters[2].fill_(generation)
    ran = 0
    spins = 0
    while True:
        if int(counters[0].item()) == tail:
            spins += 1
            if python:
                _pause()
            if spins < idle_spins:
                continue
            counters[2].fill_(0)  # leaving; then look once more: a job posted meanwhile keeps us here
            if int(counters[0].item()) == tail:
                return 0
            counters[2].fill_(generation)
        spins = 0
        d = desc[tail % cap]
        seq = int(d[0].item())
        if seq < 0:
            tail += 1
            counters[1].fill_(tail)
            if -seq > generation:
                counters[2].fill_(0)
                return 1
            continue
        if wait_ready:
            while ((int(words[0].item()) - seq) & 0xFFFFFFFF) >= 0x80000000:
                if python:
                    _pause()
        start = _now() if stamp else 0
        ws = sites_w[int(d[1].item())]
        bs = sites_b[int(d[1].item())]
        rows = int(d[4].item())
        cols = int(d[5].item())
        act = int(d[6].item())
        x = xbufs[int(d[2].item())].narrow(0, 0, rows * cols).view(rows, cols)
        if act == 0:
            features = 0
            for w in ws:
                features += w.size(0)
            out = ybufs[int(d[3].item())].narrow(0, 0, rows * features).view(rows, features)
            _run_linears(x, ws, bs, out, together)
        else:  # an MLP block: its column Linears, the activation (and product), the row Linear's columns
            n = len(ws) - 1
            width = 0
            for i in range(n):
                width += ws[i].size(0)
            mid = torch.empty([rows, width], dtype=x.dtype)
            _run_linears(x, ws[:n], bs[:n], mid, together)
            first = ws[0].size(0)
            h = activate(mid.narrow(1, 0, first), act)
            if n == 2:
                h = h * mid.narrow(1, first, width - first)
            features = ws[n].size(0)
            out = ybufs[int(d[3].item())].narrow(0, 0, rows * features).view(rows, features)
            _run_linears(h.contiguous(), ws[n:], bs[n:], out, together)
        if stamp:
            row = stamps[seq % stamps.size(0)]
            row[1].fill_(start)
            row[2].fill_(_now())
            row[0].fill_(seq)  # last: a row whose number matches is whole
        words[1].fill_(seq - 0x100000000 if seq >= 0x80000000 else seq)  # int32 storage of the uint32
        tail += 1
        counters[1].fill_(tail)
        ran += 1
        if ran == max_jobs:
            return 2
    return 3  # not reached (TorchScript wants a return after the loop)


_SCRIPTED: list = []  # [the scripted job server, or None]: tried once
_SCRIPT_LOCK = threading.Lock()


def _scripted_server():
    """:func:`_job_server` compiled by TorchScript (GIL-free), or None (unavailable, or
    ``HETEGEN_SCRIPTED_JOBS=0``): the worker then runs the same function in Python. Either way its Linears
    are :mod:`hetegen_fx.kernels`' where that builds (the first call may take tens of seconds)."""
    global _cpu_linear, _cpu_linears, _now
    with _SCRIPT_LOCK:
        if not _SCRIPTED:
            if kernels.load():
                _cpu_linear = _kernel_linear
                _cpu_linears = _kernel_linears
                _now = _kernel_clock
            fn = None
            if os.environ.get("HETEGEN_SCRIPTED_JOBS", "1") != "0":
                try:
                    with warnings.catch_warnings():  # deprecated in torch 2.11+; see the module docstring
                        warnings.simplefilter("ignore")
                        fn = torch.jit.script(_job_server)
                except Exception as e:  # noqa: BLE001  (any failure means: run the server in Python)
                    warnings.warn(
                        f"hetegen: TorchScript is unavailable ({type(e).__name__}: {e}); CPU parts run in "
                        "Python, which needs the GIL between jobs",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _SCRIPTED.append(fn)
        return _SCRIPTED[0]


@dataclass
class _Buffers:
    """A host buffer pair for one job (pinned on CUDA), flat, of the job's dtype: its input ``x`` and its
    output ``y``."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class _Pending:
    """A job posted and not yet collected by :meth:`HostWorker.end`."""

    buffers: int  # index into HostWorker._buffers
    out: torch.Tensor  # y, ``[rows, features]``, a view of the buffer


@dataclass
class _Call:
    """A function to run on the worker thread (:meth:`HostWorker.call`)."""

    fn: object
    result: object = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


_SERVE = object()  # queue item: enter the job server with the current tables


class HostWorker:
    """Runs the CPU parts of one device's graphs, in order, on a daemon thread."""

    def __init__(self, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.threads = threads
        self._together = os.environ.get("HETEGEN_FUSED_JOBS", "1") != "0"  # see :attr:`together`
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._failed: dict[int, BaseException] = {}  # jobs that failed before they were collected
        self._error: BaseException | None = None  # of a job that failed after it was collected
        self._lock = threading.Lock()  # _pending membership and the errors, between the two threads
        self._fence = threading.Lock()  # a full memory barrier between a store and a load (see _post)
        # tables the server looks jobs up in; they only grow (until free()), each growth is a generation
        self._sites: dict[tuple[int, ...], int] = {}
        self._site_w: list[list[torch.Tensor]] = []
        self._site_b: list[list[torch.Tensor | None]] = []
        self._buffers: list[_Buffers] = []  # every pair ever made: freed only by free(), never by the worker
        self._pool: list[int] = []  # free pairs
        self._generation = 1
        self._head = 0
        self._desc = torch.zeros(_CAPACITY, _FIELDS, dtype=torch.int64)
        self._desc_mem = (ctypes.c_int64 * (_CAPACITY * _FIELDS)).from_address(self._desc.data_ptr())
        self._counters = torch.zeros(4, dtype=torch.int64)
        self._counter_mem = (ctypes.c_int64 * 4).from_address(self._counters.data_ptr())
        self._words: torch.Tensor | None = None  # [ready, done] (pinned on CUDA)
        self._ready_word: ctypes.c_uint32 | None = None
        self._done_word: ctypes.c_uint32 | None = None
        self._memops: tuple | None = None
        self._log: list | None = None
        #: [job number, start, end] of each job run while a log is kept, in row ``number % _STAMPS``
        self._stamps = torch.zeros(_STAMPS, 3, dtype=torch.int64)
        self._stamp_mem = (ctypes.c_int64 * (_STAMPS * 3)).from_address(self._stamps.data_ptr())
        self._stamped = 0  # the last job number whose stamps are in the log

    @property
    def together(self) -> bool:
        """Whether a job's Linears (q/k/v, gate/up) run in one kernel call, one OpenMP team
        (``HETEGEN_FUSED_JOBS=0``: one call each). On the H100 host the 7B step's CPU jobs, replayed with copies
        streaming, took 62.3 ms together against 70.4 ms one call each (docs/benchmarks-history.md,
        2026-11-22, commit 0dd8fd4)."""
        return self._together

    @together.setter
    def together(self, value: bool) -> None:
        if value != self._together:
            self._together = value
            self._generation += 1  # the server reads it when entered: the next job enters it again

    @property
    def log(self) -> list | None:
        """When a list, it holds (job number, start, end) in ``time.perf_counter`` seconds for each job run
        since: "ready" seen to the output written. The job server stamps the jobs itself where the CPU kernel
        (and its clock) is built; without it the worker runs the jobs from Python to time them (see the
        module docstring). Read it after :meth:`drain`; it keeps the last :data:`_STAMPS` jobs at most."""
        if self._log is not None:
            self._collect_stamps()
        return self._log

    @log.setter
    def log(self, value: list | None) -> None:
        if self._log is not None:
            self._collect_stamps()  # the jobs run so far belong to the list being replaced
        self._log = value
        self._stamped = self._seq
        self._generation += 1  # the server must be re-entered in (or out of) the recording mode

    def _collect_stamps(self) -> None:
        """Move the stamps of the jobs run since the last look into the log, in order."""
        mem = self._stamp_mem
        first = max(self._stamped + 1, self._seq - _STAMPS + 1)
        for seq in range(first, self._seq + 1):
            row = (seq % _STAMPS) * 3
            if mem[row] != seq:
                # timed from Python (it appended itself) or failed (marked done without stamps): past it;
                # not run yet: stop here
                if self._done_word is not None and _reached(self._done_word, seq):
                    self._stamped = seq
                    continue
                break
            self._log.append((seq, mem[row + 1] * 1e-9, mem[row + 2] * 1e-9))
            self._stamped = seq

    # -- the launching thread ------------------------------------------------------------------------------

    @property
    def stream_wait(self) -> bool:
        """True when the compute stream waits for jobs on the device (the launching thread never blocks)."""
        self._start()
        return self._memops is not None

    def begin(
        self, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], act: int = 0
    ) -> int:
        """Queue ``cat([linear(x, w, b) for w, b in zip(weights, biases)], -1)``; return the job's number. With
        an activation code ``act`` (:mod:`hetegen_fx.blocks`), an MLP block's share: the last weight's Linear
        of ``act(y_1) * y_2`` (or ``act(y_1)``), the outputs of the Linears before it."""
        self._start()
        self._raise_pending()
        if x.dtype != weights[0].dtype:
            raise TypeError(
                f"hetegen: a CPU part got a {x.dtype} input for {weights[0].dtype} weights; the activations "
                "and the offloaded weights must have one dtype"
            )
        site = self._site(weights, biases)
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        features = weights[-1].shape[0] if act else sum(w.shape[0] for w in weights)
        b = self._take(x.dtype, rows * cols, rows * features)
        bufs = self._buffers[b]
        xh = bufs.x[: rows * cols].view(x.shape)
        out = bufs.y[: rows * features].view(rows, features)
        self._seq += 1
        seq = self._seq
        if self.is_cuda:
            xh.copy_(x, non_blocking=True)
            if self._memops is not None:
                rc = self._memops[1](
                    ctypes.c_void_p(raw_stream(self.device)), self._ready_addr, seq & 0xFFFFFFFF, 0
                )
                if rc != 0:
                    raise RuntimeError(f"hetegen: cuStreamWriteValue32 failed (CUDA error {rc})")
            else:  # no device-side wait: x must be on the host before the job is posted
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
                ready.synchronize()
        else:
            xh.copy_(x)
        with self._lock:
            self._pending[seq] = _Pending(b, out)
        self._post(seq, site, b, b, rows, cols, act)
        return seq

    def end(self, seq: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The result of job ``seq``, shaped ``shape``: on CUDA a device tensor queued behind the job."""
        job = self._pending.get(seq)
        if job is None:
            raise RuntimeError(f"hetegen: CPU job {seq} was never started or was already collected")
        self._drop_orphans(seq)
        if self.is_cuda and self._memops is not None:
            rc = self._memops[0](
                ctypes.c_void_p(raw_stream(self.device)), self._done_addr, seq & 0xFFFFFFFF, _WAIT_GEQ
            )
            if rc != 0:
                raise RuntimeError(f"hetegen: cuStreamWaitValue32 failed (CUDA error {rc})")
        else:
            self._wait_done(seq)
        with self._lock:  # collected: a later failure of this job is reported at the next call
            del self._pending[seq]
        self._collect(seq)
        if self.is_cuda:
            y = torch.empty(shape, dtype=dtype, device=self.device)
            y.view(job.out.shape).copy_(job.out, non_blocking=True)
        else:
            y = job.out.reshape(shape).clone()
        self._pool.append(job.buffers)  # safe to reuse: see the module docstring
        return y

    def is_done(self, seq: int) -> bool:
        """Whether job ``seq`` has run (the worker runs jobs in order)."""
        self._start()
        return _reached(self._done_word, seq)

    def call(self, fn):
        """Run ``fn()`` on the worker thread, after the jobs posted so far, and return its result (or raise
        its error). The profiler times CPU parts this way: on the thread and intra-op threads that will run
        them (a second team of OpenMP threads on the launching thread would share the cores with this one's,
        still spinning after its last job, and the timings come out several times too slow). ``fn`` must
        make no CUDA call (see the module docstring)."""
        self._start()
        self._generation += 1
        self._post_stop()  # the server leaves (after the jobs before it) and the worker takes the call
        item = _Call(fn)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def wait_all(self) -> None:
        """Block until every job posted so far has run, without holding the GIL: afterwards the launching
        thread may block on the device with the GIL held (a blocking device→host copy, ``.item()``)."""
        if self._thread is not None:
            self._wait_done(self._seq)
        self._raise_pending()

    def drain(self) -> None:
        """:meth:`wait_all`, then forget the jobs never collected (a graph call that failed midway)."""
        self.wait_all()
        with self._lock:
            self._pool.extend(job.buffers for job in self._pending.values())
            self._pending.clear()
            self._failed.clear()

    def free(self) -> None:
        """Drop the pinned buffers and the weight tables (after the device and the worker are idle)."""
        self.drain()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        if self._thread is not None:
            self.call(lambda: None)  # the server has left and the worker dropped its copies of the tables
        self._pool.clear()
        self._buffers.clear()
        self._sites.clear()
        self._site_w.clear()
        self._site_b.clear()

    # -- internals -----------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._words = torch.zeros(2, dtype=torch.int32, pin_memory=self.is_cuda)
        base = self._words.data_ptr()  # pinned memory: the same address on the device (UVA)
        self._ready_addr, self._done_addr = base, base + 4
        self._done_word = ctypes.c_uint32.from_address(self._done_addr)
        if self.is_cuda:
            self._memops = _StreamMemOps.get()
            if self._memops is not None:
                self._ready_word = ctypes.c_uint32.from_address(self._ready_addr)
        self._thread = threading.Thread(target=self._run, name=f"hetegen-cpu-{self.device}", daemon=True)
        self._thread.start()
        _WORKERS.add(self)

    def _site(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> int:
        """The index of this group of weights in the server's tables (a new one: a new generation)."""
        key = tuple(map(id, weights)) + tuple(map(id, biases))
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = len(self._site_w)
            self._site_w.append(list(weights))  # also keeps the tensors alive, so their ids stay unique
            self._site_b.append(list(biases))
            self._generation += 1
        return site

    def _take(self, dtype: torch.dtype, x_numel: int, y_numel: int) -> int:
        """A free buffer pair of ``dtype`` that holds ``x_numel`` and ``y_numel`` elements (a new one: a new
        generation)."""
        for i, b in enumerate(self._pool):
            bufs = self._buffers[b]
            if bufs.x.dtype == dtype and bufs.x.numel() >= x_numel and bufs.y.numel() >= y_numel:
                return self._pool.pop(i)
        pin = self.is_cuda
        self._buffers.append(
            _Buffers(
                torch.empty(_round_up(x_numel), dtype=dtype, pin_memory=pin),
                torch.empty(_round_up(y_numel), dtype=dtype, pin_memory=pin),
            )
        )
        self._generation += 1
        return len(self._buffers) - 1

    def _post(self, *fields: int) -> None:
        """Append a job's descriptor to the ring, with a server running the current tables to read it."""
        mem = self._counter_mem
        if mem[_ENTERED] != self._generation or mem[_SERVING] != self._generation:
            self._serve_now()
        self._append(fields)
        # a full barrier: the store of the head before the load below (the server does the mirror)
        with self._fence:
            pass
        seq = fields[0]
        if mem[_SERVING] != self._generation:  # the server left just as the job came
            self._queue.put(_SERVE)
            self._wait_for(lambda: mem[_SERVING] == self._generation or _reached(self._done_word, seq))

    def _post_stop(self, wait: bool = True) -> None:
        """A stop for every server with tables older than the current generation (see _job_server)."""
        self._append((-self._generation,), wait)

    def _append(self, fields: tuple[int, ...], wait: bool = True) -> None:
        """Write a descriptor at the ring's head (waiting, if ``wait``, while the ring is full), then move
        the head past it."""
        mem = self._counter_mem
        if wait:
            self._wait_for(lambda: self._head - mem[_TAIL] < _CAPACITY)
        base = (self._head % _CAPACITY) * _FIELDS
        for i, v in enumerate(fields):
            self._desc_mem[base + i] = v
        self._head += 1
        # after the fields: x86 and the C11 model keep stores to plain memory in order
        mem[_HEAD] = self._head

    def _serve_now(self) -> None:
        """Have a server with the current tables run (it reads the ring from where the last one left)."""
        gen = self._generation
        self._post_stop()
        self._queue.put(_SERVE)
        self._wait_for(lambda: self._counter_mem[_ENTERED] >= gen)

    def _wait_for(self, ready) -> None:
        """Wait with the GIL released (a few yields, then short sleeps) until ``ready()``."""
        spins = 0
        while not ready():
            spins += 1
            time.sleep(0 if spins < 100 else 2e-5)
            if spins % 50_000 == 0 and not self._thread.is_alive():
                raise RuntimeError("hetegen: the CPU worker thread died")

    def _wait_done(self, seq: int) -> None:
        self._wait_for(lambda: _reached(self._done_word, seq))

    def _drop_orphans(self, seq: int) -> None:
        """Forget jobs before ``seq`` left uncollected by a graph call that failed midway, once they ran."""
        with self._lock:
            old = [s for s in self._pending if s < seq and _reached(self._done_word, s)]
            for s in old:
                self._pool.append(self._pending.pop(s).buffers)
                self._failed.pop(s, None)

    def _collect(self, seq: int) -> None:
        """Raise the error of job ``seq`` if it has already failed (or an earlier collected job's)."""
        with self._lock:
            err = self._failed.pop(seq, None)
        if err is not None:
            raise RuntimeError(f"hetegen: a Linear's CPU part failed on the worker thread: {err}") from err
        self._raise_pending()

    def _raise_pending(self) -> None:
        """A job that failed after ``end`` handed its (unfinished) result on: its graph call already
        returned, so the error surfaces at the next CPU job of this device."""
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise RuntimeError(
                f"hetegen: a Linear's CPU part failed on the worker thread (in an earlier call, whose result "
                f"is wrong): {err}"
            ) from err

    # -- the worker thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        # TorchScript's optimising executor re-profiles and re-specialises the server for every new mix of
        # shapes (tens of ms each, for many calls); plain interpretation runs as fast from the first call.
        # The flag is this thread's own.
        with torch.jit.optimized_execution(False):
            self._serve()

    def _serve(self) -> None:
        applied = None
        server = _scripted_server()
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Call):
                try:
                    item.result = item.fn()
                except BaseException as e:  # noqa: BLE001  (re-raised on the calling thread)
                    item.error = e
                item.done.set()
                continue
            if self.threads and self.threads != applied:
                torch.set_num_threads(self.threads)
                applied = self.threads
            self._serve_jobs(server)

    def _serve_jobs(self, server) -> None:
        """Run the job server with the current tables until it leaves (a failed job is recorded, marked done
        and skipped, and the server goes on)."""
        gen = self._generation
        tables = (
            self._site_w.copy(),
            self._site_b.copy(),
            [b.x for b in self._buffers],
            [b.y for b in self._buffers],
        )
        args = (
            self._desc,
            self._counters,
            self._words,
            self._stamps,
            *tables,
            gen,
            self._ready_word is not None,
        )
        log = self._log
        stamp = log is not None and _now is _kernel_clock  # the server times the jobs itself
        while True:
            try:
                with torch.no_grad():
                    if log is not None and not stamp:
                        reason = self._run_timed(args, log)
                    elif server is not None:
                        reason = server(*args, _IDLE_SPINS, 0, False, stamp, self.together)
                    else:  # ~60 µs a poll
                        reason = _job_server(*args, _IDLE_SPINS // 50, 0, True, stamp, self.together)
            except BaseException as e:  # noqa: BLE001  (reported on the launching thread)
                self._fail_current(e)
                continue
            if reason != 2:
                return

    def _run_timed(self, args, log: list) -> int:
        """:func:`_job_server` from Python, one job at a time, each timed into ``log`` (the wait for
        "ready" is not part of its time); returns as the server does."""
        mem = self._counter_mem
        gen = args[8]
        mem[_ENTERED] = mem[_SERVING] = gen
        spins = 0
        while True:
            tail = mem[_TAIL]
            if mem[_HEAD] == tail:
                spins += 1
                if spins < _IDLE_SPINS // 50:
                    time.sleep(0 if spins < 100 else 2e-5)
                    continue
                mem[_SERVING] = 0
                with self._fence:
                    pass
                if mem[_HEAD] == tail:
                    return 0
                mem[_SERVING] = gen
            spins = 0
            seq = self._desc_mem[(tail % _CAPACITY) * _FIELDS]
            if seq < 0:  # a stop
                mem[_TAIL] = tail + 1
                if -seq > gen:
                    mem[_SERVING] = 0
                    return 1
                continue
            if self._ready_word is not None:
                while not _reached(self._ready_word, seq):
                    time.sleep(0)
            t0 = time.perf_counter()
            _job_server(*args, 1, 1, True, False, self.together)
            log.append((seq, t0, time.perf_counter()))

    def _fail_current(self, err: BaseException) -> None:
        """The job at the ring's tail failed: record its error, mark it done (the device must not wait
        forever) and step past it."""
        mem = self._counter_mem
        tail = mem[_TAIL]
        seq = self._desc_mem[(tail % _CAPACITY) * _FIELDS]
        with self._lock:
            if seq in self._pending:
                self._failed[seq] = err
            elif self._error is None:  # already collected: its graph call has returned
                self._error = err
        self._done_word.value = seq & 0xFFFFFFFF
        mem[_TAIL] = tail + 1


_WORKERS: weakref.WeakSet[HostWorker] = weakref.WeakSet()


@atexit.register
def _leave_servers() -> None:
    """At exit, bring each worker back from its job server to its queue: a thread that comes back from a
    GIL-free call while the interpreter finalizes is killed inside C++ code, which aborts the process."""
    for worker in list(_WORKERS):
        if worker._thread is None or not worker._thread.is_alive():
            continue
        if worker._head - worker._counter_mem[_TAIL] < _CAPACITY:  # never overwrite an unread descriptor
            worker._generation += 1
            worker._post_stop(wait=False)
        # runs once the server has left, on the worker, which then waits in its queue
        back = _Call(lambda: None)
        worker._queue.put(back)
        deadline = time.monotonic() + 10
        while not back.done.is_set() and time.monotonic() < deadline:
            try:
                back.done.wait(0.05)
            except KeyboardInterrupt:  # Ctrl-C again at exit: the worker must still leave its server first
                continue


def _round_up(n: int) -> int:
    """Buffer sizes rounded up to a power of two (at least 4096 elements), so a few sizes serve every shape."""
    return max(4096, 1 << max(0, (n - 1).bit_length()))


def default_threads() -> int:
    """Threads for the CPU parts next to a GPU: three quarters of the cores (at least two left free).

    The cores left free run the thread that launches GPU work and the driver's threads. Measured on the
    16-core H100 host (7B decode, 6 GiB, one process per setting): with 15 worker threads the launching
    thread took 106-141 ms a token (its kernels shared cores with spinning intra-op threads) and a token
    162-185 ms; with 12, 49 ms and 123 ms; with 8, 70 ms and 148 ms (CPU GEMV too slow)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - max(2, cores // 4))
