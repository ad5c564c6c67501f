"""The CPU parts of split Linears, run on a worker thread so the thread that launches GPU work never waits.

A group of Linears that read the same activation ``x`` (q/k/v, gate/up) is one *job*::

    cpu_begin:  [stream] x → pinned host buffer; write the job's number into the "ready" word
    worker:     wait for the "ready" word; y = cat(linear(x, W_i[:k_i], b_i[:k_i])) into a pinned host
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

Where the driver offers no stream memory operations (or ``HETEGEN_STREAM_WAIT=0``), a CUDA event marks
"x ready" and ``cpu_end`` blocks the launching thread until the job is done: correct, with less overlap,
and the device never waits on the worker. On an emulated device (``"cpu"``) the same worker runs the jobs
and ``cpu_end`` waits for them, so the job logic is exercised without an accelerator.

The GIL. The launching thread holds it nearly all the time (it runs the graph's Python), and CPython
hands it to a waiting thread only when the holder blocks or after the *switch interval* (5 ms by default):
a worker that needs the GIL between two steps of a job can wait that long, and a worker that polls in
Python takes it from the launcher at every poll. So the jobs run as a *TorchScript* function
(:func:`_job_loop`), which the interpreter runs without the GIL: waiting for "ready" (a spin on the word),
the Linears, and writing "done" are one GIL-free call, and the worker takes every job already queued into
that call. (Measured on the H200 host, 7B decode, same process and plan, scripted against Python: 108.5
against 111.7 ms a token with 60 jobs a token, 117.6 against 126-131 ms with 100. Lowering the switch
interval did not help the scripted loop and slowed the launching thread.)
TorchScript is deprecated in favour of ``torch.compile``, which offers no GIL-free interpreter for such a
loop; where scripting fails (or with ``HETEGEN_SCRIPTED_JOBS=0``, and while a timeline is recorded, which
times each job) the same steps run in Python.

A thread that blocks on the device while holding the GIL (many blocking device→host copies do) would still
wait for a device that waits for a worker that needs the GIL to start its next call. So a graph with CPU
jobs ends with ``cpu_wait``, which waits for its jobs with the GIL released, before anything blocks on the
device (its outputs' copies to the host, the caller's next steps).

Buffer reuse is safe because every job's device-side steps are ordered on the one compute stream and the
worker runs jobs in order: a host buffer pair goes back to the pool only after ``cpu_end`` has queued the
copy out of it, and the next job that takes it writes ``x`` after that copy in stream order and ``y`` after
its own "x ready".
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

#: CU_STREAM_WAIT_VALUE_GEQ: ``(int32)(*addr - value) >= 0``, so the job counter may wrap around
_WAIT_GEQ = 0
#: most jobs the worker hands to one call of the job loop
_MAX_BATCH = 64


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


def _reached(word: ctypes.c_uint32, seq: int) -> bool:
    """``word ≥ seq`` for 32-bit counters that may wrap around (as the driver's GEQ compares)."""
    return ((word.value - seq) & 0xFFFFFFFF) < 0x80000000


def _job_loop(
    xs: list[torch.Tensor],
    weights: list[list[torch.Tensor]],
    biases: list[list[torch.Tensor | None]],
    outs: list[torch.Tensor],
    seqs: list[int],
    words: torch.Tensor,
    wait_ready: bool,
) -> None:
    """Run jobs in order. For job ``j``: if ``wait_ready``, spin until ``words[0] ≥ seqs[j]`` (wrap-safe);
    write each Linear's output into its columns of ``outs[j]`` (``[rows, features]``); set ``words[1]``
    to ``seqs[j]``. Scripted by :func:`_scripted_loop`, it runs without the GIL."""
    for j in range(len(xs)):
        seq = seqs[j] & 0xFFFFFFFF
        if wait_ready:
            while ((int(words[0].item()) - seq) & 0xFFFFFFFF) >= 0x80000000:
                pass
        x = xs[j]
        x = x.reshape(-1, x.size(-1))
        out = outs[j]
        ws = weights[j]
        bs = biases[j]
        off = 0
        for i in range(len(ws)):
            n = ws[i].size(0)
            out.narrow(1, off, n).copy_(torch.nn.functional.linear(x, ws[i], bs[i]))
            off += n
        words[1].fill_(seq - 0x100000000 if seq >= 0x80000000 else seq)  # int32 storage of the uint32


_SCRIPTED: list = []  # [the scripted job loop, or None]: tried once
_SCRIPT_LOCK = threading.Lock()


def _scripted_loop():
    """:func:`_job_loop` compiled by TorchScript (GIL-free), or None (unavailable, or
    ``HETEGEN_SCRIPTED_JOBS=0``): the worker then runs the same loop in Python."""
    with _SCRIPT_LOCK:
        if not _SCRIPTED:
            fn = None
            if os.environ.get("HETEGEN_SCRIPTED_JOBS", "1") != "0":
                try:
                    with warnings.catch_warnings():  # deprecated in torch 2.11+; see the module docstring
                        warnings.simplefilter("ignore")
                        fn = torch.jit.script(_job_loop)
                except Exception as e:  # noqa: BLE001  (any failure means: run the loop in Python)
                    warnings.warn(
                        f"hetegen: TorchScript is unavailable ({type(e).__name__}: {e}); CPU parts run in "
                        "Python, with more waiting for the GIL",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _SCRIPTED.append(fn)
        return _SCRIPTED[0]


@dataclass
class _Buffers:
    """A pinned host buffer pair for one job: its input ``x`` and its output ``y``."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Job:
    seq: int
    x: torch.Tensor  # on the host: a view of pinned memory (CUDA) or the activation itself (emulation)
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    ready: torch.cuda.Event | None = None  # "x has landed in host memory" (CUDA)
    out: torch.Tensor | None = None  # where y goes, ``[rows, features]`` (CUDA: pinned)
    buffers: _Buffers | None = None
    error: BaseException | None = None
    collected: bool = False  # ``end`` has handed the result on (on CUDA possibly before the job ran)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Call:
    """A function to run on the worker thread (:meth:`HostWorker.call`)."""

    fn: object
    result: object = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


_NOTHING = object()  # "no item in hand" for the worker's queue loop


class HostWorker:
    """Runs the CPU parts of one device's graphs, in order, on a daemon thread."""

    def __init__(self, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.threads = threads
        self._queue: queue.SimpleQueue[Job | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._last: Job | None = None
        self._pending: dict[int, Job] = {}
        self._pool: list[_Buffers] = []  # free buffer pairs
        self._buffers: list[_Buffers] = []  # every pair ever made: freed only by free(), never by the worker
        self._events: deque[torch.cuda.Event] = deque()
        self._error: BaseException | None = None  # of a job that failed after it was collected
        self._lock = threading.Lock()
        self._words: torch.Tensor | None = None  # [ready, done] (pinned on CUDA)
        self._ready_word: ctypes.c_uint32 | None = None
        self._done_word: ctypes.c_uint32 | None = None
        self._memops: tuple | None = None
        #: when a list, the worker appends (job number, start, end) in ``time.perf_counter`` seconds
        self.log: list | None = None

    # -- the launching thread ------------------------------------------------------------------------------

    @property
    def stream_wait(self) -> bool:
        """True when the compute stream waits for jobs on the device (the launching thread never blocks)."""
        self._start()
        return self._memops is not None

    def begin(self, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> int:
        """Queue ``cat([linear(x, w, b) for w, b in zip(weights, biases)], -1)``; return the job's number."""
        self._start()
        self._raise_pending()
        self._seq += 1
        job = Job(self._seq, x, list(weights), list(biases))
        rows, features = x.numel() // x.shape[-1], sum(w.shape[0] for w in weights)
        if self.is_cuda:
            x = x.contiguous()
            bufs = self._take(x.numel() * x.element_size(), rows * features * x.element_size())
            job.buffers = bufs
            job.x = bufs.x[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
            job.out = bufs.y[: rows * features * x.element_size()].view(x.dtype).view(rows, features)
            stream = torch.cuda.current_stream(self.device)
            job.x.copy_(x, non_blocking=True)
            if self._memops is not None:
                rc = self._memops[1](
                    ctypes.c_void_p(stream.cuda_stream), self._ready_addr, job.seq & 0xFFFFFFFF, 0
                )
                if rc != 0:
                    raise RuntimeError(f"hetegen: cuStreamWriteValue32 failed (CUDA error {rc})")
            else:
                job.ready = self._events.popleft() if self._events else torch.cuda.Event()
                job.ready.record(stream)
        else:
            if x.device.type != "cpu":
                job.x = x.to("cpu")
            job.out = torch.empty(rows, features, dtype=x.dtype)
        self._pending[job.seq] = job
        self._last = job
        self._queue.put(job)
        return job.seq

    def end(self, seq: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The result of job ``seq`` on the device, shaped ``shape``: on CUDA, queued behind the job."""
        job = self._pending.pop(seq, None)
        if job is None:
            raise RuntimeError(f"hetegen: CPU job {seq} was never started or was already collected")
        for old in [s for s in self._pending if s < seq]:  # orphans of a graph call that failed midway
            if self._pending[old].done.is_set():
                del self._pending[old]
        if not self.is_cuda:
            job.done.wait()
            self._collect(job)
            return job.out.reshape(shape)
        stream = torch.cuda.current_stream(self.device)
        if self._memops is not None:
            rc = self._memops[0](
                ctypes.c_void_p(stream.cuda_stream), self._done_addr, seq & 0xFFFFFFFF, _WAIT_GEQ
            )
            if rc != 0:
                raise RuntimeError(f"hetegen: cuStreamWaitValue32 failed (CUDA error {rc})")
        else:
            job.done.wait()
        self._collect(job)
        y = torch.empty(shape, dtype=dtype, device=self.device)
        y.view(job.out.shape).copy_(job.out, non_blocking=True)
        self._pool.append(job.buffers)  # safe to reuse: see the module docstring
        return y

    def call(self, fn):
        """Run ``fn()`` on the worker thread, after the jobs queued so far, and return its result (or raise
        its error). The profiler times CPU parts this way: on the thread and intra-op threads that will run
        them (a second team of OpenMP threads on the launching thread would share the cores with this one's,
        still spinning after its last job, and the timings come out several times too slow). ``fn`` must
        make no CUDA call (see the module docstring)."""
        self._start()
        item = _Call(fn)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def wait_all(self) -> None:
        """Block until every job queued so far has run (the worker runs them in order), without holding
        the GIL: afterwards the launching thread may block on the device with the GIL held (a blocking
        device→host copy, ``.item()``), which would otherwise starve the worker the device is waiting for."""
        last = self._last
        if last is not None:
            last.done.wait()
        self._raise_pending()

    def drain(self) -> None:
        """:meth:`wait_all`, then forget the jobs never collected (a graph call that failed midway)."""
        self.wait_all()
        self._pending.clear()

    def free(self) -> None:
        """Drop the pinned buffers (after the device and the worker are idle)."""
        self.drain()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        self._pool.clear()
        self._buffers.clear()

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

    def _take(self, x_bytes: int, y_bytes: int) -> _Buffers:
        for i, b in enumerate(self._pool):
            if b.x.numel() >= x_bytes and b.y.numel() >= y_bytes:
                return self._pool.pop(i)
        bufs = _Buffers(
            torch.empty(_round_up(x_bytes), dtype=torch.uint8, pin_memory=True),
            torch.empty(_round_up(y_bytes), dtype=torch.uint8, pin_memory=True),
        )
        self._buffers.append(bufs)
        return bufs

    def _collect(self, job: Job) -> None:
        """Mark ``job`` collected; raise its error if it has already failed (or an earlier job's)."""
        with self._lock:
            job.collected = True
            err = job.error
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

    def _run(self) -> None:
        # TorchScript's optimising executor re-profiles and re-specialises the loop for every new mix of
        # shapes (tens of ms each, for many calls); plain interpretation runs as fast from the first call.
        # The flag is this thread's own.
        with torch.jit.optimized_execution(False):
            self._serve()

    def _serve(self) -> None:
        applied = None
        loop = _scripted_loop()
        while True:
            item = self._queue.get()
            jobs: list[Job] = []  # every job queued behind the first: one call of the job loop
            while isinstance(item, Job):
                jobs.append(item)
                item = _NOTHING
                if len(jobs) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        pass
            if self.threads and self.threads != applied:
                torch.set_num_threads(self.threads)
                applied = self.threads
            if jobs and loop is not None and self.log is None and all(job.ready is None for job in jobs):
                self._run_scripted(loop, jobs)
            else:
                for job in jobs:
                    self._run_one(job)
            jobs = None  # drop the views of pinned memory here, not while blocked in the next get()
            if item is None:
                return
            if isinstance(item, _Call):
                try:
                    item.result = item.fn()
                except BaseException as e:  # noqa: BLE001  (re-raised on the calling thread)
                    item.error = e
                item.done.set()

    def _run_scripted(self, loop, jobs: list[Job]) -> None:
        """All of ``jobs`` in one GIL-free call; after a failure, the jobs not done run one by one (the
        failing one fails again there and its error is recorded)."""
        try:
            with torch.no_grad():
                loop(
                    [job.x for job in jobs],
                    [job.weights for job in jobs],
                    [job.biases for job in jobs],
                    [job.out for job in jobs],
                    [job.seq for job in jobs],
                    self._words,
                    self._ready_word is not None,
                )
        except BaseException:  # noqa: BLE001  (recorded per job by _run_one below)
            for job in jobs:
                if _reached(self._done_word, job.seq):
                    job.done.set()
                else:
                    self._run_one(job)
            return
        for job in jobs:
            job.done.set()

    def _run_one(self, job: Job) -> None:
        """One job with the GIL held between its steps; timed into :attr:`log` when that is a list."""
        try:
            if job.ready is not None:
                job.ready.synchronize()
                self._events.append(job.ready)
            elif self._ready_word is not None:
                self._wait_ready(job.seq)
            t0 = time.perf_counter()
            with torch.no_grad():
                _job_loop([job.x], [job.weights], [job.biases], [job.out], [job.seq], self._words, False)
            if self.log is not None:
                self.log.append((job.seq, t0, time.perf_counter()))
        except BaseException as e:  # reported on the launching thread; the device must not wait forever
            with self._lock:
                job.error = e
                if job.collected and self._error is None:
                    self._error = e
        finally:
            self._done_word.value = job.seq & 0xFFFFFFFF
            job.done.set()

    def _wait_ready(self, seq: int) -> None:
        """Poll the "ready" word the device writes (no CUDA call, see the module docstring): a few
        GIL-yielding spins first (the device is usually close), then short sleeps."""
        word = self._ready_word
        spins = 0
        while not _reached(word, seq):
            spins += 1
            time.sleep(0 if spins < 200 else 2e-5)


def _round_up(n: int) -> int:
    """Buffer sizes rounded up to a power of two (at least 4 KiB), so a few sizes serve every shape."""
    return max(4096, 1 << max(0, (n - 1).bit_length()))


def default_threads() -> int:
    """Threads for the CPU parts next to a GPU: every core but one, which launches the GPU work."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)
