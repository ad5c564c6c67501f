"""The storage tier's reader: rows of Linears kept in storage, read ahead of use into a bounded ring of host
slots (pinned on CUDA) while the model runs.

Owns: the ring (``slots`` buffers, each as large as the largest item), the coordinator thread that reads
items one after the other in the order the graphs use them, cycling over them step after step, the pool of
reader threads each item's read is cut across (so that several reads are outstanding on the device, as an
NVMe drive needs to reach its bandwidth), and the consumer's side: :meth:`StorageReader.wait` (item ``i`` of
the current pass is in its slot) and :meth:`StorageReader.release` (its slot may be overwritten once the
device work that reads it, a CUDA event, has completed).
Must not: decide which rows live in storage (PlacementPass does), or make a CUDA call other than waiting
on the release events (the device never waits on this reader: the launching thread does, in ``wait``).

Item ``i`` always lives in slot ``i % slots``, so :meth:`view` gives the same tensor for the same rows at
every step, and the CPU worker's tables (:mod:`hetegen_fx.host`, which know weights by their tensor) see the
same tensors at every step when the CPU computes some of the rows read (PartitionPass). The coordinator
reads item ``i`` once the slot's previous occupant was released and its event has completed; the consumer
waits until the item of the current pass is there. So reads run up to ``slots`` items ahead of the compute,
across the end of a step into the next one's first layers. A consumer that asks for another item than the
next in the cycle (a graph that uses the Linears in another order) makes the reader start over from that
item: what was read ahead is dropped, the slots the consumer holds are kept. A slot another item still
holds when an item needs it is an error (one step holds more parts than the ring has slots), never a wait
or an overwrite. What a call that broke off left held is given back before the next (:meth:`settle`).
"""

from __future__ import annotations

import atexit
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import ConfigError

#: ring slots when none are given: a q/k/v job holds three at once, and the rest read ahead
DEFAULT_SLOTS = 6
#: each read is cut into pieces of about this size, read by the pool's threads at once
CHUNK_BYTES = 8 << 20
#: reader threads per item
DEFAULT_THREADS = 4
#: seconds the consumer waits for an item while the reader brings nothing in before it gives up with an error
STALL_S = 600.0


@dataclass(frozen=True)
class Item:
    """What one storage read brings in: rows ``[start, stop)`` of checkpoint tensor ``name``."""

    name: str
    rows: tuple[int, int]
    shape: tuple[int, ...]  # of the rows read
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Slot:
    occupant: tuple[int, int] | None = None  # (pass, item) whose rows it holds
    filled: bool = False
    released: bool = True
    taken: bool = False  # by the consumer (wait), until it releases the slot
    event: object = None  # a torch.cuda.Event the device records after its last read of the slot


@dataclass(frozen=True)
class ReaderStats:
    """Reads done, their bytes, the passes begun, and the seconds the consumer waited for an item."""

    reads: int
    bytes: int
    passes: int
    waited_s: float
    restarts: int


class StorageReader:
    """Reads ``items`` from ``checkpoint`` (a :class:`hetegen_fx.checkpoint.Checkpoint`) into a ring of
    ``slots`` buffers, ahead of their use. ``pin``: page-lock the ring (for copies to a CUDA device).
    ``expected_rate``: the read rate (bytes/s) the plan assumed; a pass read at less than half of it is
    warned about once, with the rate measured. ``stale_event``: makes an event that completes once every
    copy queued so far has (on CUDA, one on the copy stream): what a slot that its consumer never released (a
    forward that broke off) waits for before it is read into again. ``buffer``: host bytes to lay the ring
    in (a uint8 tensor of at least :attr:`ring_bytes`, e.g. the ring of the reader this one replaces, whose
    views the CPU worker's tables may still hold); a new one when None or too small. ``slot_bytes``: the
    least bytes a slot holds (e.g. the largest part the model may ever read, so that a reader replacing this
    one after a residency change fits the same ring)."""

    def __init__(
        self,
        checkpoint,
        items: list[Item],
        slots: int = DEFAULT_SLOTS,
        pin: bool = False,
        threads: int = DEFAULT_THREADS,
        expected_rate: float = 0.0,
        stale_event=None,
        buffer: torch.Tensor | None = None,
        slot_bytes: int = 0,
    ) -> None:
        if not items:
            raise ConfigError("a storage reader needs at least one item to read")
        if slots < 1 or threads < 1:
            raise ConfigError(f"slots and threads must be at least 1, got {slots} and {threads}")
        self.checkpoint = checkpoint
        self.items = list(items)
        self.slots = slots
        self.slot_bytes = -(-max(slot_bytes, *(it.nbytes for it in self.items)) // 512) * 512
        # one plain buffer, page-locked in place when ``pin``: torch's pinned allocator would round each slot up
        # to a power of two (a 86 MiB slot would take 128 MiB of the budget)
        if buffer is None or buffer.dtype != torch.uint8 or buffer.numel() < slots * self.slot_bytes:
            buffer = torch.empty(slots * self.slot_bytes, dtype=torch.uint8)
        self._buffer = buffer
        self._pinned = pin and _register(self._buffer)
        self._ring = [self._buffer[k * self.slot_bytes : (k + 1) * self.slot_bytes] for k in range(slots)]
        self._stale_event = stale_event
        self._views = [self._view_of(i) for i in range(len(self.items))]
        self._parts: dict[tuple[int, int, int], torch.Tensor] = {}  # (item, start, stop) → its rows' view
        self._taken: dict[int, tuple[int, int]] = {}  # item → the (pass, item) the consumer took last
        #: a part's key (the store's: Linear name, RAM rows) → its items, in cycle order
        self.keys: dict[object, list[int]] = {}
        self._slot = [_Slot() for _ in range(slots)]
        self._cond = threading.Condition()
        self._consumer = (0, 0)  # the (pass, item) the consumer takes next
        self._reader = (0, 0)  # the (pass, item) the coordinator reads next
        self._generation = 0  # bumped by a restart: a read begun before it is discarded
        self._error: BaseException | None = None
        self._closed = False
        self._reads = self._bytes = self._restarts = 0
        self._waited = 0.0
        self.expected_rate = expected_rate
        self._pass_bytes, self._pass_seconds, self._warned = 0, 0.0, False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hetegen-read") if threads > 1 else None
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    @property
    def ring_bytes(self) -> int:
        """Host bytes of the ring."""
        return self.slots * self.slot_bytes

    @property
    def buffer(self) -> torch.Tensor:
        """The host bytes the ring lies in (what a reader replacing this one may lay its ring in)."""
        return self._buffer

    def view(self, i: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (default: all) of item ``i`` as they lie in its slot: the same tensor at every
        call with the same arguments."""
        whole = self._views[i]
        stop = whole.shape[0] if stop is None else stop
        if (start, stop) == (0, whole.shape[0]):
            return whole
        if not 0 <= start <= stop <= whole.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) of a storage part of {whole.shape[0]} rows")
        key = (i, start, stop)
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = whole[start:stop]
        return part

    def _view_of(self, i: int) -> torch.Tensor:
        it = self.items[i]
        return self._ring[i % self.slots][: it.nbytes].view(it.dtype).view(it.shape)

    # -- the consumer's side -------------------------------------------------------------------------------

    def wait(self, i: int, rows: int | None = None) -> torch.Tensor:
        """Block (the GIL released) until item ``i`` of the current pass is in its slot; returns its view (of
        its first ``rows`` rows, if given). An item other than the next in the cycle restarts the reader from
        it. The slot is held until :meth:`release`. A slot that another item taken and not released yet
        still holds is an error, not a wait (it would never be released: the consumer holds it for work
        queued after this wait), as is a reader that brings nothing in for :data:`STALL_S` seconds."""
        self._start()
        t0 = time.perf_counter()
        with self._cond:
            if self._consumer[1] != i:
                self._restart(i)
            want = self._consumer
            slot = self._slot[i % self.slots]
            progress, since = self._reads, t0  # the reads done so far, and when the last one ended
            while not (slot.occupant == want and slot.filled):
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise RuntimeError("the storage reader was closed")
                if slot.taken and not slot.released:
                    raise RuntimeError(
                        f"hetegen: the storage ring's slot {i % self.slots} still holds part {slot.occupant[1]} "
                        f"({self.items[slot.occupant[1]].name}) when part {i} ({self.items[i].name}) needs it: "
                        "one step holds more storage parts at once than the ring has slots. Raise storage_slots"
                    )
                if self._reads != progress:
                    progress, since = self._reads, time.perf_counter()
                if time.perf_counter() - since > STALL_S:
                    raise RuntimeError(
                        f"hetegen: the storage reader brought nothing in for {STALL_S:.0f} s (part {i}, "
                        f"{self.items[i].name}); is the drive still there?"
                    )
                self._cond.wait(timeout=1.0)
            slot.taken = True
            self._taken[i] = want
            self._consumer = self._next(want)
        self._waited += time.perf_counter() - t0
        return self.view(i, 0, rows)

    def held(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of item ``i``, which :meth:`wait` returned and whose slot is not released yet
        (a Linear's rows the CPU and the device share); an error if it is not held."""
        with self._cond:
            slot = self._slot[i % self.slots]
            if not slot.taken or slot.released or slot.occupant != self._taken.get(i):
                raise RuntimeError(
                    f"storage part {i} ({self.items[i].name}) is not held: fetch_rows must take it before its "
                    "rows are shared out"
                )
        return self.view(i, start, stop)

    def index(self, key, taking: bool) -> int | None:
        """The item of ``key`` (:attr:`keys`: a part's name and RAM rows; a graph that uses a Linear twice reads
        it twice a step, as two items): when ``taking``, the next in the cycle if it is one of them, else the
        first; otherwise the one taken last."""
        with self._cond:
            found = self.keys.get(key)
            if not found:
                return None
            if taking:
                return self._consumer[1] if self._consumer[1] in found else found[0]
            taken = [i for i in found if i in self._taken]
            return max(taken, key=self._taken.__getitem__) if taken else found[0]

    def release(self, i: int, event=None) -> None:
        """Item ``i``'s slot may be read into again once ``event`` (None: now; or a tuple of events) has
        completed."""
        with self._cond:
            self._release(self._slot[i % self.slots], event)

    def settle(self) -> int:
        """Give back every slot still held, once the copies queued so far have landed: what a graph call that
        broke off (an exception) left held. Called before each graph call of the model (no part is held from
        one call to the next). Returns how many were held."""
        with self._cond:
            held = [slot for slot in self._slot if slot.taken and not slot.released]
            for slot in held:
                self._release(slot, self._stale())
            return len(held)

    def _release(self, slot: _Slot, event) -> None:
        """Hold ``_cond``."""
        slot.released, slot.taken, slot.event = True, False, event
        self._cond.notify_all()

    def _stale(self):
        return self._stale_event() if self._stale_event is not None else None

    def stats(self) -> ReaderStats:
        with self._cond:
            return ReaderStats(self._reads, self._bytes, self._consumer[0], self._waited, self._restarts)

    def close(self) -> None:
        """Stop the coordinator and the pool (a read in flight finishes first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._pinned:  # no copy may still read the ring when it is unlocked and freed
            for slot in self._slot:
                _synchronize(slot.event)
            if any(not slot.released for slot in self._slot) and self._stale_event is not None:
                self._stale_event().synchronize()
            _unregister(self._buffer)
            self._pinned = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter shutdown
            pass

    # -- the coordinator -----------------------------------------------------------------------------------

    def _next(self, at: tuple[int, int]) -> tuple[int, int]:
        p, i = at
        return (p, i + 1) if i + 1 < len(self.items) else (p + 1, 0)

    def _restart(self, i: int) -> None:
        """Hold ``_cond``. The consumer asks for item ``i`` out of turn: read from it on, in a new pass when
        it is not ahead of where the consumer was. What was read ahead is dropped; a slot the consumer took
        and holds stays as it is (work queued after its wait may still read it)."""
        p, j = self._consumer
        start = (p, i) if i > j else (p + 1, i)
        self._consumer = self._reader = start
        self._generation += 1
        self._restarts += 1
        for slot in self._slot:
            if not (slot.taken and not slot.released):
                slot.occupant, slot.filled, slot.released = None, False, True
        self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="hetegen-storage", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        if self._closed:
                            return
                        at, gen = self._reader, self._generation
                        slot = self._slot[at[1] % self.slots]
                        if slot.released:
                            break
                        self._cond.wait()
                    event, slot.event = slot.event, None
                    slot.occupant, slot.filled = at, False
                # the device (and the CPU worker) have finished reading the slot's last content
                _synchronize(event)
                item = self.items[at[1]]
                t0 = time.perf_counter()
                self._read(item, self._views[at[1]])
                self._note_rate(item.nbytes, time.perf_counter() - t0, at[1] == len(self.items) - 1)
                with self._cond:
                    if gen == self._generation:  # not restarted meanwhile
                        slot.filled = True
                        slot.released = False  # held until its consumer releases it
                        self._reader = self._next(at)
                        self._reads += 1
                        self._bytes += item.nbytes
                    self._cond.notify_all()
        except BaseException as e:  # a read failed: the consumer raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _note_rate(self, nbytes: int, seconds: float, last: bool) -> None:
        """At the end of a pass: warn once when it was read at less than half the rate the plan assumed."""
        self._pass_bytes += nbytes
        self._pass_seconds += seconds
        if not last:
            return
        rate = self._pass_bytes / max(self._pass_seconds, 1e-9)
        enough = self._pass_bytes >= 64 << 20  # a pass of a few small reads says little about the rate
        if enough and self.expected_rate and rate < self.expected_rate / 2 and not self._warned:
            self._warned = True
            warnings.warn(
                f"hetegen: the storage tier reads at {rate / 2**20:.0f} MiB/s, less than half the "
                f"{self.expected_rate / 2**20:.0f} MiB/s measured when the model was placed (another process "
                "reading the same drive, a throttled drive?); steps take longer than the plan says. Raise "
                "cpu_memory to keep more rows in RAM, or compile again to place with the rate of now",
                RuntimeWarning,
                stacklevel=1,
            )
        self._pass_bytes, self._pass_seconds = 0, 0.0

    def _read(self, item: Item, out: torch.Tensor) -> None:
        """Rows ``item.rows`` of the checkpoint tensor into ``out``, cut across the pool's threads."""
        start, stop = item.rows
        rows = stop - start
        row_bytes = max(item.nbytes // max(rows, 1), 1)
        per = max(1, CHUNK_BYTES // row_bytes)
        if self._pool is None or rows <= per:
            self.checkpoint.read(item.name, out=out, rows=item.rows)
            return
        pieces = [(a, min(a + per, rows)) for a in range(0, rows, per)]
        futures = [
            self._pool.submit(self.checkpoint.read, item.name, out[a:b], (start + a, start + b))
            for a, b in pieces
        ]
        for f in futures:
            f.result()


def _synchronize(event) -> None:
    """Wait for ``event``: None (nothing to wait for), an event, or a tuple of events."""
    for ev in event if isinstance(event, tuple) else (event,):
        if ev is not None:
            ev.synchronize()


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock ``buffer`` in place (for asynchronous copies to a CUDA device); False where that failed."""
    if not torch.cuda.is_available() or buffer.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(getattr(err, "value", err)) != 0:
        warnings.warn(
            f"hetegen: could not page-lock the storage ring ({buffer.numel()} bytes, cudaHostRegister error "
            f"{err}): copies from it will be slower",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _unregister(buffer: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    except Exception:  # interpreter shutdown: the driver may be gone already
        pass


#: readers not closed yet: closed at exit, so that no reader thread is inside torch while the process ends
#: (a daemon thread there made the C++ runtime abort at exit, now and then)
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for reader in list(_LIVE):
        try:
            reader.close()
        except Exception:
            pass


#: bytes :func:`measure_reads` reads to time the rate, at most
PROBE_BYTES = 64 << 20
#: small reads it times for the latency
PROBE_READS = 8


def measure_reads(checkpoint, names: list[str]) -> dict[str, float]:
    """The storage's read rate (bytes/s, reading up to :data:`PROBE_BYTES` of the tensors ``names`` the way
    the reader does, cut across its threads) and the latency of one small read (s, the median of
    :data:`PROBE_READS` reads of one row at spread offsets), the pages dropped from the cache after each
    read (:class:`~hetegen_fx.checkpoint.Checkpoint` does): what placement prices storage rows at."""
    entries = [checkpoint.entry(n) for n in names if checkpoint.entry(n).shape]
    if not entries:
        return {"read_rate": 0.0, "read_latency": 0.0}
    big = max(entries, key=lambda e: e.nbytes)
    rows = max(1, min(big.shape[0], PROBE_BYTES // max(big.row_bytes, 1)))
    item = Item(big.name, (0, rows), (rows, *big.shape[1:]), big.dtype)
    out = torch.empty(item.shape, dtype=item.dtype)
    reader = StorageReader(checkpoint, [item], slots=1, threads=DEFAULT_THREADS)
    try:
        t0 = time.perf_counter()
        reader._read(item, out)
        rate = item.nbytes / max(time.perf_counter() - t0, 1e-9)
    finally:
        reader.close()
    times = []
    one = torch.empty((1, *big.shape[1:]), dtype=big.dtype)
    for k in range(PROBE_READS):
        e = entries[k % len(entries)]
        row = (k * 7919) % e.shape[0]
        buf = one if e.shape[1:] == big.shape[1:] and e.dtype == big.dtype else None
        t0 = time.perf_counter()
        checkpoint.read(e.name, out=buf, rows=(row, row + 1))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"read_rate": rate, "read_latency": times[len(times) // 2]}
