"""Run-time objects: per-device staging buffers, the copy stream and its events.

Owns: one :class:`DeviceRuntime` per device (the staging arena, the copy stream, the CPU worker) and the host
stand-ins of parked state. Must not: decide anything (placement, α, arena offsets come from the Plan).

Everything here is created lazily on first use; importing this module touches no GPU.
On a "cpu" device (emulation, for testing without an accelerator) copies are plain copies into the
same staging buffers and events are no-ops, so the data flow is exercised exactly as on a GPU.
"""

from __future__ import annotations

import math
import re
import threading
import time
import warnings
import weakref

import torch

from .host import HostWorker, current_stream

#: granularity, in bytes, at which the staging arena tracks which GPU part last read its memory
PAGE = 1 << 20


class DeviceRuntime:
    """The staging arena, copy stream and events of one accelerator device.

    GPU parts are copied into regions of one *staging arena* (PartitionPass lays them out one after the other,
    first in first out, see :func:`hetegen_fx.plan.staging_offsets`), so how many copies may be in flight is
    a matter of bytes, not of a count of equal buffers sized for the largest part. A copy into a region waits
    until every earlier GPU part that read any byte of it is done: the arena is tracked in pages of
    :data:`PAGE` bytes, each pointing at the "released" event of the last region that covered it. That
    assumes every release is recorded on one stream (the graphs of a device run on its current stream):
    a page's event re-recorded for a later region then only marks a later point of the same stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        #: held by every call of a compiled graph on this device, every compile for it, and every change to
        #: its arena or worker: the arena, the copy stream's events and the worker's job ring serve one call
        #: at a time, so calls from several threads (to one model or to several) run one after the other
        self.lock = threading.RLock()
        self._arena: torch.Tensor | None = None
        self._pages: list = []  # page → the "released" event of the last region that covered it (or None)
        self._copied: dict[int, torch.cuda.Event] = {}  # region offset → its copy has landed
        self._released: dict[int, torch.cuda.Event] = {}  # region offset → its GPU part is done
        self._copy_stream: torch.cuda.Stream | None = None
        self._needs: dict[int, dict[str, int]] = {}  # id(weight store) → graph label → staging bytes
        self._host: HostWorker | None = None
        #: when a list, every copy appends its (start, end): CUDA events on the copy stream, or host seconds
        self.copy_log: list | None = None

    @property
    def copy_stream(self) -> torch.cuda.Stream:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        return self._copy_stream

    @property
    def host(self) -> HostWorker:
        """The worker thread that runs this device's CPU parts (started on first use)."""
        if self._host is None:
            self._host = HostWorker(self.device)
        return self._host

    def free(self) -> None:
        """Give back the staging arena and the CPU parts' pinned buffers (e.g. between two models)."""
        with self.lock:
            self._free()

    def _free(self) -> None:
        if self._host is not None:
            self._host.free()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        self._arena = None
        self._pages = []
        self._copied.clear()
        self._released.clear()

    def staging_bytes(self) -> int:
        """Bytes held by the staging arena."""
        return 0 if self._arena is None else self._arena.numel()

    def arena_ptr(self) -> int | None:
        """The staging arena's address (None before it exists): recorded CUDA graphs read staged parts there."""
        return None if self._arena is None else self._arena.data_ptr()

    def reserve(self, nbytes: int, owner: object = None, graph: object = "") -> None:
        """Make sure the staging arena holds at least ``nbytes``. With an ``owner`` (a model's weight store)
        and its ``graph`` (the compiled graph module, forgotten when it goes, or a name), that graph's need
        is remembered, and an arena larger than every remembered need (after a promotion left the model fewer
        GPU parts to stage) is given back down to the largest."""
        with self.lock:
            if owner is not None:
                key = id(owner)
                if key not in self._needs:
                    self._needs[key] = {}
                    weakref.finalize(owner, self._needs.pop, key, None)
                needs = self._needs[key]
                which = graph if isinstance(graph, str) else id(graph)
                if which not in needs and not isinstance(graph, str):
                    weakref.finalize(graph, needs.pop, which, None)
                needs[which] = nbytes
                largest = max(n for needs in self._needs.values() for n in needs.values())
                if self._arena is not None and self._arena.numel() > largest:
                    self._release_arena()
                    nbytes = largest
            self._reserve(nbytes)

    def _release_arena(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)  # the arena may still be in use by either stream
        self._arena = None
        self._pages = []

    def _reserve(self, nbytes: int) -> None:
        if self._arena is not None and self._arena.numel() >= nbytes:
            return
        if self._arena is not None:
            if self.is_cuda:
                torch.cuda.synchronize(self.device)  # the old arena may still be in use by either stream
            self._arena = None  # free it first: old and new together would overshoot the budget
        self._arena = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._pages = [None] * -(-nbytes // PAGE)

    def buffer(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """The staging region at byte ``offset`` viewed with the shape and dtype of ``like``."""
        return self._region(offset, like.shape, like.dtype)

    def _region(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        self.reserve(offset + nbytes)
        return self._arena[offset : offset + nbytes].view(dtype).view(shape)

    def copy_h2d(self, src: torch.Tensor, offset: int, tail: torch.Tensor | None = None) -> torch.Tensor:
        """Start copying host tensor ``src`` (followed by ``tail``'s rows, if given) into the staging region at
        ``offset``; return that region."""
        if tail is not None:
            if tail.shape[1:] != src.shape[1:] or tail.dtype != src.dtype:
                raise ValueError(
                    f"a staged weight's rows come in two parts of other shapes or dtypes: {tuple(src.shape)} "
                    f"{src.dtype} and {tuple(tail.shape)} {tail.dtype}"
                )
            dst = self._region(offset, (src.shape[0] + tail.shape[0], *src.shape[1:]), src.dtype)
            pairs = [(dst[: src.shape[0]], src), (dst[src.shape[0] :], tail)]
        else:
            dst = self.buffer(offset, src)
            pairs = [(dst, src)]
        if not self.is_cuda:
            t0 = time.perf_counter()
            for d, s in pairs:
                d.copy_(s)
            if self.copy_log is not None:
                self.copy_log.append((t0, time.perf_counter()))
            return dst
        stream = self.copy_stream
        nbytes = dst.numel() * dst.element_size()
        seen = None
        for ev in self._pages[offset // PAGE : -(-(offset + nbytes) // PAGE)]:
            if ev is not None and ev is not seen:  # the region's bytes are no longer read by earlier parts
                stream.wait_event(ev)
                seen = ev
        if self.copy_log is not None:
            marks = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            marks[0].record(stream)
        if torch.cuda.current_device() == self.device.index:
            current = current_stream(self.device)
            torch.cuda.set_stream(stream)  # torch.cuda.stream(stream) without its lookups
            try:
                for d, s in pairs:
                    d.copy_(s, non_blocking=True)
            finally:
                torch.cuda.set_stream(current)
        else:  # set_stream would also switch the current device: the context manager switches it back
            with torch.cuda.stream(stream):
                for d, s in pairs:
                    d.copy_(s, non_blocking=True)
        if self.copy_log is not None:
            marks[1].record(stream)
            self.copy_log.append(marks)
        ev = self._copied.get(offset)
        if ev is None:
            ev = self._copied[offset] = torch.cuda.Event()
        ev.record(stream)
        return dst

    def copy_event(self):
        """An event recorded on the copy stream after every copy queued so far (None off CUDA, where copies
        are done when they return): what a storage slot copied from waits for before it is read into again."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.copy_stream)
        return ev

    def compute_event(self):
        """An event recorded on the current (compute) stream after the work queued on it so far (None off
        CUDA): what a storage slot a CPU job read waits for, recorded after the ``cpu_end`` where the stream
        waits for that job."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(current_stream(self.device))
        return ev

    def wait(self, offset: int) -> None:
        """Make the current stream wait until the copy into the region at ``offset`` has landed."""
        if self.is_cuda and offset in self._copied:
            current_stream(self.device).wait_event(self._copied[offset])

    def release(self, offset: int, nbytes: int) -> None:
        """Mark the ``nbytes`` at ``offset`` free once the work queued so far on the current stream is done."""
        if self.is_cuda:
            ev = self._released.get(offset)
            if ev is None:
                ev = self._released[offset] = torch.cuda.Event()
            ev.record(current_stream(self.device))
            # A page may still point at an event re-recorded since for another region: a copy into it then
            # waits for a later point of the same stream, issued before the copy (late, never wrong).
            first, last = offset // PAGE, -(-(offset + nbytes) // PAGE)
            self._pages[first:last] = [ev] * (last - first)


_RUNTIMES: dict[torch.device, DeviceRuntime] = {}
_LOCK = threading.Lock()


_DEVICES: dict[str | torch.device, torch.device] = {}


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` parsed once ("cuda" resolved to the current CUDA device): called per Linear per token."""
    dev = _DEVICES.get(device)
    if dev is None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # (no CUDA here: index 0, which nothing will run on)
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        _DEVICES[device] = dev
    return dev


def get_runtime(device: str | torch.device) -> DeviceRuntime:
    """The process-wide runtime of ``device`` (created on first use)."""
    dev = resolve_device(device)
    rt = _RUNTIMES.get(dev)
    if rt is not None:
        return rt
    with _LOCK:
        rt = _RUNTIMES.get(dev)
        if rt is None:
            rt = _RUNTIMES[dev] = DeviceRuntime(dev)
        return rt


#: id(host stand-in) → (weak reference to the stand-in, the device tensor it stands for)
_PARKED: dict[int, list] = {}


def _remember(table: dict, x: torch.Tensor, *values: object) -> list:
    """Enter host tensor ``x`` in ``table`` (keyed by its id, a weak reference first, then ``values``); the
    entry goes when ``x`` does, before its id can be reused. Returns the entry."""
    key = id(x)
    entry = table[key] = [weakref.ref(x), *values]
    weakref.finalize(x, table.pop, key, None)
    return entry


def _entry(table: dict, x: torch.Tensor) -> list | None:
    """``x``'s entry in a table filled by :func:`_remember` (not a dead tensor's that had the same id)."""
    hit = table.get(id(x))
    return hit if hit is not None and hit[0]() is x else None


def park(t: torch.Tensor, grows: bool = True) -> torch.Tensor:
    """Keep device tensor ``t`` on its device and hand back a host *stand-in* of the same shape and strides.

    State a model carries between calls (an HF KV cache) stays on the accelerator while the user's model,
    whose weights live on the host, keeps seeing host tensors, so dynamo can trace it. The stand-in's
    memory is never written (so never paged in); when it comes back as a graph input, :func:`to_device`
    swaps the device tensor in without a copy. Its values are garbage on the host: DevicePass does not park
    an output that is the caller's own input moved onto the device (an HF StaticCache's length counter,
    which HF reads on the host), and the compiled ``generate`` refuses decoding that edits the cache there.
    ``grows=False`` for state of a fixed size (a StaticCache's buffers): see :func:`stand_in`.
    """
    if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
        return t
    return stand_in(t, t.shape, t.stride(), grows=grows)


def stand_in(t: torch.Tensor, shape, stride=None, grows: bool = True) -> torch.Tensor:
    """A host tensor of ``shape`` (and ``stride``, default contiguous) whose memory is never written, standing
    for ``t`` (:func:`unpark` gives ``t`` back; :func:`to_device` swaps ``t`` in for it on ``t``'s device): a
    parked device tensor (same shape), or one process's share of a tensor-parallel KV cache standing in as the
    whole (:mod:`hetegen_fx.passes.shard`), so that the caller's model sees the shapes it was written for.

    State that ``grows`` (a cache grown by concatenation) has its sizes but the last marked dynamic for
    dynamo, so graphs reading it are traced once, not per length. A fixed-size one (``grows=False``, a
    StaticCache's buffers) is left unmarked: dynamo gives a weak dynamic mark precedence over
    ``torch._dynamo.mark_static``, so a marked StaticCache buffer was read with a symbolic length, and
    the decode graphs over it kept cuDNN's attention off (``cudnn_attention="auto"``; seen on an H100
    host, 2026-12-08, tree c34c970: a length of ``s40`` over a 64-slot cache)."""
    if stride is None:
        shadow = torch.empty(tuple(shape), dtype=t.dtype, device="cpu")
    else:
        shadow = torch.empty_strided(tuple(shape), tuple(stride), dtype=t.dtype, device="cpu")
    for dim in range(shadow.dim() - 1 if grows else 0):  # trace growing state once, not per length
        torch._dynamo.maybe_mark_dynamic(shadow, dim)
    _remember(_PARKED, shadow, t)
    return shadow


def unpark(x: torch.Tensor) -> torch.Tensor | None:
    """The device tensor behind host stand-in ``x``, or None if ``x`` is not one."""
    hit = _entry(_PARKED, x)
    return hit[1] if hit is not None else None


def to_device(x: torch.Tensor, device: str) -> torch.Tensor:
    """Move an activation; a no-op when it is already there. Host-to-device copies do not block the host,
    except from pageable memory; a small input the last call wrote back, unchanged since, is not copied
    again (:func:`write_back` keeps its device twin)."""
    if not isinstance(x, torch.Tensor):
        return x
    dev = resolve_device(device)
    if x.device == dev:
        return x
    if x.device.type == "cpu":
        parked = unpark(x)
        if parked is not None and parked.device == dev:
            return parked
        twin = take_twin(x, dev)
        if twin is not None:
            return twin
    return x.to(dev, non_blocking=x.device.type == "cpu" and x.is_pinned())


#: id(host tensor) → [weak reference to it, its device twin, the host tensor's (version counter, data pointer)
#: then]. Writes that bypass the version counter (through ``.data`` or ``.numpy()``) are not seen.
_TWINS: dict[int, list] = {}
#: a twin is read and marked taken as one step, and recorded as one
_TWIN_LOCK = threading.Lock()
#: host inputs up to this size that a graph changes in place keep a device twin between calls
TWIN_MAX_BYTES = 4096


def remember_twin(host: torch.Tensor, moved: torch.Tensor) -> None:
    """Record that device tensor ``moved`` now holds what small host tensor ``host`` holds (just written
    back), so the next :func:`to_device` of ``host`` can hand ``moved`` over instead of copying.

    An HF StaticCache's length counters (32 in a 7B) come back to the host at every decode step, and their
    copies in, from pageable memory, each waited for the link: behind the weights streaming on the copy
    stream, about 50 µs each on the H100 host."""
    if (
        host.numel() * host.element_size() > TWIN_MAX_BYTES
        or moved.device.type == "cpu"
        or type(moved) is not torch.Tensor  # traced (fake or functional tensors): nothing to keep
        or moved.is_inference()  # a later call outside inference mode could not change it in place
    ):
        return
    try:
        version = (host._version, host.data_ptr())
    except RuntimeError:  # an inference tensor keeps no version counter: always copied
        return
    with _TWIN_LOCK:
        hit = _entry(_TWINS, host)
        if hit is None:
            _remember(_TWINS, host, moved, version)
        else:
            hit[1], hit[2] = moved, version


def take_twin(x: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
    """The device twin of host tensor ``x`` on ``dev`` if ``x`` has not changed since it was recorded, else
    None. Handed over once: the graph may change it, and only a finished call's write-back records it
    again (a call that fails midway leaves the caller's tensor to be copied afresh)."""
    with _TWIN_LOCK:  # two threads calling graphs with one host tensor: only one of them gets the twin
        hit = _entry(_TWINS, x)
        if hit is None or hit[1] is None:
            return None
        twin, version = hit[1], hit[2]
        hit[1] = None  # taken
    try:
        same = (x._version, x.data_ptr()) == version
    except RuntimeError:
        return None
    return twin if same and twin.device == dev else None


def blas_workspace_bytes(capability: tuple[int, int] | None, config: str | None = None) -> int:
    """The cuBLAS workspace torch allocates (through its caching allocator, so it counts against the budget)
    for each stream that runs a GEMM, on a device of compute ``capability`` (None: not CUDA): ``config`` is
    ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs), else torch's default, 32 MiB on Hopper and
    Blackwell (capability 9.x to 12.x) and ``:4096:2:16:8`` (8.125 MiB) before them."""
    if capability is None:
        return 0
    pairs = re.findall(r":([0-9]+):([0-9]+)", config or "")
    if pairs:
        return sum(int(size) * int(count) for size, count in pairs) * 1024
    return 32 * 2**20 if capability[0] in (9, 10, 11, 12) else (4096 * 2 + 16 * 8) * 1024


def clear_blas_workspaces(device: torch.device) -> None:
    """Give back the cuBLAS workspaces torch keeps per stream in its caching allocator, and the cached blocks
    (once the device is idle); a stream that runs a GEMM again makes its own workspace again."""
    torch.cuda.synchronize(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def embed_on_host(indices: torch.Tensor, table: torch.Tensor, device: str) -> torch.Tensor:
    """Rows ``indices`` of the host embedding table ``table``, looked up on the CPU; only the rows cross to
    ``device`` (on CUDA from pinned memory, without blocking the host). Indices on the device, or behind a
    host stand-in (:func:`park`), are read back first: that copy waits for the device."""
    if indices.device.type == "cpu":
        parked = unpark(indices)
        indices = parked if parked is not None else indices
    rows = torch.nn.functional.embedding(indices.to("cpu"), table)
    dev = resolve_device(device)
    if dev.type == "cpu":
        return rows
    if dev.type == "cuda":
        return rows.pin_memory().to(dev, non_blocking=True)
    return rows.to(dev)


def write_back(host, moved, *writers: object) -> None:
    """Copy inputs that the graph changed in place on the accelerator back into the caller's tensors.

    ``host`` is the caller's tensor and ``moved`` what :func:`to_device` made of it, or both are sequences of
    them (DevicePass writes a graph's inputs back in one call); ``writers`` are the nodes that changed them
    (passed only so that they run first). Nothing to do where no copy was made: an input already on the
    device, or a parked stand-in whose device tensor was changed itself. Runs after the graph's CPU jobs (the
    copy blocks). Small inputs of one dtype on one device cross in one copy: an HF StaticCache's 32 length
    counters were 32 copies, each waiting for the device (33 device-to-host copies and 36 syncs a decode
    step on an H200 host, 2026-12-07, tree 62d3d1b).
    """
    if isinstance(host, torch.Tensor) or not isinstance(host, (tuple, list)):
        host, moved = (host,), (moved,)
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for h, m in zip(host, moved, strict=True):
        if not isinstance(h, torch.Tensor) or m is h or unpark(h) is m:
            continue
        nbytes = h.numel() * h.element_size()
        if nbytes > WRITE_BACK_WARN_BYTES and (tuple(h.shape), h.dtype) not in _WARNED:
            _WARNED.add((tuple(h.shape), h.dtype))
            warnings.warn(
                f"hetegen: an input the graph changes in place ({nbytes / 2**20:.0f} MiB, {list(h.shape)} "
                f"{h.dtype}, on {h.device}) crosses to {m.device} and back at every call; keep it on the "
                "accelerator to avoid the copies (e.g. create a StaticCache there)",
                RuntimeWarning,
                stacklevel=2,
            )
        small = nbytes <= TWIN_MAX_BYTES and m.dtype == h.dtype
        key = (m.device, m.dtype) if small else (len(groups),)  # large ones alone
        groups.setdefault(key, []).append((h, m))
    for pairs in groups.values():
        if len(pairs) == 1:
            h, m = pairs[0]
            h.copy_(m)
        else:  # one kernel gathers them on the device, one copy brings them over
            flat = torch.cat([m.reshape(-1) for _, m in pairs]).cpu()
            parts = flat.split([m.numel() for _, m in pairs])
            torch._foreach_copy_(
                [h for h, _ in pairs], [p.view(h.shape) for p, (h, _) in zip(parts, pairs, strict=True)]
            )
        for h, m in pairs:
            remember_twin(h, m)


#: inputs written back above this size warn (once per shape and dtype): they cross PCIe twice a call
WRITE_BACK_WARN_BYTES = 64 * 2**20
_WARNED: set = set()


torch.fx.node.has_side_effect(write_back)  # no result: dead-code elimination must keep it


torch.fx.wrap("park")


torch.fx.wrap("write_back")


torch.fx.wrap("to_device")
