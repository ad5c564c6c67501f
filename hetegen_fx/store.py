"""One weight store per model: residency decided once, device copies and host parts shared by every graph.

Owns: a model's device copies of weights, its host parts (pinned in place), its compiled graphs and residency,
and, for weights that stay in their checkpoint (:func:`hetegen_fx.checkpoint.source_of`), the rows read into
RAM on first use and the storage tier's reader (:meth:`WeightStore.reader`).
Must not: choose residency itself (PlacementPass writes it) or be reached by other modules' private reads.

Under ``generate`` dynamo hands the backend several graphs (prefill, decode, a dynamic-shape decode);
residency is a property of the model's parameters, not of a graph, so every graph of one model looks up
the same store by parameter identity and reuses its tensors: weights are placed and copied once.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .checkpoint import fill, read_whole, source_of
from .errors import UnsupportedModelError


@dataclass
class CompiledGraph:
    """One graph compiled for a model: the generated module and its Plan."""

    graph_module: torch.fx.GraphModule
    plan: object  # hetegen_fx.plan.Plan
    label: str


@dataclass
class WeightStore:
    device: torch.device
    #: layer name → True (resident on the device) / False (offloaded); decided by the first placement
    residency: dict[str, bool] | None = None
    #: bytes the first placement reserved for everything that is not a Linear weight
    reserved: dict[str, int] = field(default_factory=dict)
    #: the model's memory ledger (:class:`hetegen_fx.ledger.Ledger`), made by the first placement
    ledger: object = None
    #: Linear name → rows kept in RAM, the rest in storage (the storage tier), decided by the first placement
    host_rows: dict[str, int] | None = None
    #: bytes of the model's largest Linear weight that stays in its checkpoint (the storage tier's ring has
    #: slots of it, whichever graph is placed first); 0 when not known
    largest_deferred: int = 0
    #: bumped by every residency change (:func:`hetegen_fx.residency.apply`): graphs compiled under an older
    #: one are compiled again before their next call
    version: int = 0
    #: Linear name → its weight (and bias): what a residency change moves
    tensors_of: dict[str, tuple] = field(default_factory=dict, repr=False)
    #: the compiled graphs that follow this store's residency (:class:`hetegen_fx.residency.Runner`)
    runners: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    graphs: list[CompiledGraph] = field(default_factory=list)
    #: where the model's stretches record CUDA graphs (:func:`hetegen_fx.launch.pool_for`)
    graph_pool: object = None
    #: what compiles the model's stretches with inductor (:func:`hetegen_fx.launch.compiler_for`)
    stretch_compiler: object = None
    _device_copies: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _host_parts: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    #: (weight id, CPU side?) → (the input features' range, its copy): an MLP block's row Linear
    _columns: dict[tuple, tuple] = field(default_factory=dict, repr=False)
    _pinned: set[int] = field(default_factory=set, repr=False)
    #: a deferred weight's first byte → the end of the bytes locked from there (:meth:`pin`)
    _locked: dict[int, int] = field(default_factory=dict, repr=False)
    _reader: object = field(default=None, repr=False)  # the storage tier's StorageReader
    _reader_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reader_final: object = field(default=None, repr=False)  # the finalizer that closes the reader

    @property
    def emulated(self) -> bool:
        return self.device.type == "cpu"

    def device_bytes(self) -> int:
        """Bytes of weights this store keeps on the device."""
        if self.emulated:
            return 0
        return sum(t.numel() * t.element_size() for t in self._device_copies.values())

    def on_device(self, t: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The device copy of ``t`` (of its rows ``[start, stop)`` when given), made once."""
        k = (id(t), rows)
        out = self._device_copies.get(k)
        if out is None:
            if self.emulated:  # the "device" copy is the host tensor: its rows must be read
                fill(t, t.shape[0] if t.dim() else 0)
                whole = t.detach()
            else:  # a deferred weight is read past its own (untouched) memory, straight to the device
                whole = read_whole(t).detach()
            src = whole if rows is None else whole[rows[0] : rows[1]]
            out = src if self.emulated and src.device.type == "cpu" else src.to(self.device)
            self._device_copies[k] = out
        return out

    def drop_device_copies(self, tensors: list[torch.Tensor]) -> int:
        """Forget the device copies (whole, or of some rows) of ``tensors``, e.g. the weights of demoted
        Linears; their memory is freed once no compiled graph holds them. Returns the bytes forgotten."""
        ids = {id(t) for t in tensors}
        gone = [k for k in self._device_copies if k[0] in ids]
        freed = 0
        for k in gone:
            t = self._device_copies.pop(k)
            freed += 0 if self.emulated else t.numel() * t.element_size()
        return freed

    def host_part(self, w: torch.Tensor, layout: str, start: int, stop: int, pin: bool) -> torch.Tensor:
        """Output features ``[start, stop)`` of host weight ``w`` (rows for out_in, columns for in_out).

        Rows of an ``[out, in]`` weight are a view; columns of an ``[in, out]`` weight are made contiguous
        once (and cached), since a strided copy over PCIe is slow.
        """
        if w.device.type != "cpu":
            raise UnsupportedModelError(
                f"offloaded weights must live in host memory, found one on {w.device}; load the model on the CPU"
            )
        fill(w, stop if layout == "out_in" else w.shape[0])
        part = w.detach()[start:stop] if layout == "out_in" else w.detach()[:, start:stop]
        if not part.is_contiguous():
            key = (id(w), layout, start, stop)
            cached = self._host_parts.get(key)
            if cached is None:
                cached = self._host_parts[key] = part.contiguous()
            part = cached
        if pin and self.device.type == "cuda":  # page-locking is a CUDA notion (not cpu, meta, ...)
            self.pin(part)
        return part

    def cpu_rows(self, w: torch.Tensor, layout: str, stop: int) -> torch.Tensor:
        """The CPU part of host weight ``w``: output features ``[0, stop)`` as ``[stop, in]`` rows, as the
        CPU kernel (:mod:`hetegen_fx.kernels`) reads them best: a view for out_in; for in_out the columns'
        cached copy, made transposed (the same bytes a copy of the columns would take), or, for every
        column, a transposed view (no copy of the whole weight; the kernel then copies it per call)."""
        fill(w, stop if layout == "out_in" else w.shape[0])
        if layout == "out_in" or stop == w.shape[1]:
            part = self.host_part(w, layout, 0, stop, pin=False)
            return part if layout == "out_in" else part.t()
        key = (id(w), "rows", 0, stop)
        cached = self._host_parts.get(key)
        if cached is None:
            cached = self._host_parts[key] = w.detach()[:, :stop].t().contiguous()
        return cached

    def input_columns(self, w: torch.Tensor, layout: str, start: int, stop: int, pin: bool) -> torch.Tensor:
        """Input features ``[start, stop)`` of host weight ``w`` as an ``[out, stop - start]`` weight that
        ``F.linear`` takes (an MLP block's row Linear, :mod:`hetegen_fx.blocks`): a contiguous copy (in pinned
        memory with ``pin`` on CUDA). One copy is kept per weight for the CPU's columns (``start == 0``) and
        one for the device's; a new range replaces the old, which lives on only while a graph holds it."""
        fill(w, w.shape[0])
        key = (id(w), start == 0)
        cached = self._columns.get(key)
        if cached is not None and cached[0] == (start, stop):
            return cached[1]
        cols = w.detach()[:, start:stop] if layout == "out_in" else w.detach()[start:stop].t()
        if pin and self.device.type == "cuda":  # page-locked by torch's host allocator, freed with the copy
            part = torch.empty(cols.shape, dtype=cols.dtype, pin_memory=True).copy_(cols)
        else:
            part = cols.contiguous()
        self._columns[key] = ((start, stop), part)
        return part

    def pin(self, t: torch.Tensor) -> None:
        """Page-lock the storage behind ``t`` in place (no copy of the weights); of a deferred weight its bytes
        from the weight's start to ``t``'s end (rows kept in RAM: the rest of its memory stays untouched),
        beyond what is locked already: graphs whose parts start at other rows (a prefill's split and a
        decode step's) lock ranges that never overlap, as the driver requires."""
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if source_of(t) is not None:
            base, end = ptr, t.data_ptr() + t.numel() * t.element_size()
            done = self._locked.get(base, base)
            if end <= done:
                return
            ptr, nbytes = done, end - done
        elif ptr in self._pinned or t.is_pinned():
            return
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            warnings.warn(
                f"could not pin {nbytes} bytes in place (cudaHostRegister error {err}); "
                "copies of this weight will be slower",
                stacklevel=2,
            )
            return
        if source_of(t) is not None:
            self._locked[storage.data_ptr()] = ptr + nbytes
        self._pinned.add(ptr)
        weakref.finalize(storage, _unregister, ptr)

    def prepare_storage(
        self, first: torch.fx.GraphModule, slots: int | None, expected_rate: float = 0.0, slot_bytes: int = 0
    ) -> None:
        """Make the storage tier's reader (:class:`hetegen_fx.prefetch.StorageReader`) read what the model's
        graphs fetch (their ``fetch_rows``: Linear name and RAM rows, the rest in storage), in one cycle the
        size of one step: ``first``'s fetches (the graph just compiled) in its order, then those of the
        model's other live graphs (:attr:`graphs`) that it has none of, one graph after the other (the
        graphs a graph break cut a step into), skipping graphs that fetch the same parts (a prefill and a
        decode step; PartitionPass emits them in one order whatever the splits). A reader whose cycle is
        that already (from any item on) is kept; otherwise a new one is made, in the old ring's bytes, and
        without fetches none is kept. So a residency change that took parts away or added some leaves no
        part read for nothing. ``slot_bytes``: the least a ring slot holds
        (:class:`~hetegen_fx.prefetch.StorageReader`)."""
        from .prefetch import DEFAULT_SLOTS, Item, StorageReader

        with self._reader_lock:
            cycle: list[tuple[str, int]] = []
            live = {id(r.graph_module) for r in list(self.runners) if r.graph_module is not None}
            others = [  # the graphs still in use (a graph whose runner dynamo dropped fetches nothing)
                g.graph_module
                for g in self.graphs
                if g.graph_module is not first and (not live or id(g.graph_module) in live)
            ]
            for gm in [first, *others]:
                seq = fetches_of(gm)
                if seq and not _is_run(seq, cycle) and not set(seq) & set(cycle):
                    cycle += seq
            r = self._reader
            if r is not None and len(cycle) == len(r.order) and _is_run(cycle, r.order):
                return
            items, checkpoint = [], None  # checked before the old reader goes
            for name, ram_rows in cycle:
                tensor = self.tensors_of[name][0]
                src = source_of(tensor)
                if src is None:
                    raise UnsupportedModelError(
                        f"{name} has storage rows in its plan but its weight is not bound to a checkpoint: load "
                        "the model with hetegen_fx.load(path, cpu_memory=...)"
                    )
                checkpoint = src.checkpoint
                out = tensor.shape[0]
                items.append(
                    Item(src.name, (ram_rows, out), (out - ram_rows, *tensor.shape[1:]), tensor.dtype)
                )
            buffer = None
            if r is not None:
                self._reader_final.detach()
                r.close()
                self._reader = None
                # the new ring in the old one's bytes where they suffice: the CPU worker's tables keep the views
                # of storage rows its jobs read, and with them the ring they lie in
                buffer = r.buffer
                expected_rate = expected_rate or r.expected_rate
            if not cycle:
                return
            cuda = self.device.type == "cuda"
            self._reader = StorageReader(
                checkpoint,
                items,
                slots=slots or DEFAULT_SLOTS,
                pin=cuda,
                expected_rate=expected_rate,
                stale_event=_copy_event(self.device) if cuda else None,
                buffer=buffer,
                slot_bytes=slot_bytes,
            )
            self._reader.order = cycle
            for i, key in enumerate(cycle):
                self._reader.keys.setdefault(key, []).append(i)
            self._reader_final = weakref.finalize(
                self, self._reader.close
            )  # its thread and ring go with the model

    def storage_part(self, name: str, ram_rows: int, taking: bool = False):
        """``(reader, index)`` of Linear ``name``'s storage rows (those from ``ram_rows`` on): the item to take
        next (``taking``, a fetch) or the one taken last (:meth:`~hetegen_fx.prefetch.StorageReader.index`)."""
        r = self._reader
        i = None if r is None else r.index((name, ram_rows), taking)
        if i is None:
            raise RuntimeError(
                f"the storage reader has no part for {name} (rows from {ram_rows}): the model's storage reader "
                "was not prepared for this graph (hetegen_fx.launch.apply failed for a graph compiled after it, "
                "see the error it raised); compile the model again"
            )
        return r, i

    @property
    def storage_reader(self):
        """The storage tier's reader, or None (no storage tier, or no call yet)."""
        return self._reader


def fetches_of(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """The storage parts ``gm`` fetches, in its order: (Linear name, RAM rows) of each ``fetch_rows``."""
    from .ops import FETCH

    return [(n.args[1], n.args[2]) for n in gm.graph.find_nodes(op="call_function", target=FETCH)]


def _is_run(seq: list, cycle: list) -> bool:
    """Whether ``seq`` is ``cycle``'s items one after the other from some item on, round the end too."""
    n = len(cycle)
    if not seq or len(seq) > n:
        return False
    ring = cycle + cycle[: len(seq) - 1]
    return any(ring[s : s + len(seq)] == seq for s in range(n) if cycle[s] == seq[0])


def _copy_event(device: torch.device):
    """A function making an event on ``device``'s copy stream after every copy queued so far."""

    def make():
        from .runtime import get_runtime

        return get_runtime(device).copy_event()

    return make


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the driver may be gone already
        pass


_TOKENS: dict[int, weakref.ref] = {}


def token_of(store: WeightStore) -> int:
    """An int that names ``store`` in a graph's ops (:func:`by_token`)."""
    key = id(store)
    with _LOCK:
        if key not in _TOKENS or _TOKENS[key]() is not store:
            _TOKENS[key] = weakref.ref(store)
            weakref.finalize(store, _TOKENS.pop, key, None)
    return key


def by_token(token: int) -> WeightStore:
    """The store :func:`token_of` named."""
    ref = _TOKENS.get(token)
    store = ref() if ref is not None else None
    if store is None:
        raise RuntimeError("the model this graph was compiled for is gone (its weight store was freed)")
    return store


_STORES: dict[int, tuple[weakref.ref, WeightStore]] = {}
_LOCK = threading.Lock()


def _registered(p: torch.Tensor) -> WeightStore | None:
    """The store registered for parameter ``p`` (not for a dead tensor that had the same id); hold _LOCK."""
    hit = _STORES.get(id(p))
    return hit[1] if hit is not None and hit[0]() is p else None


def store_for(params: list[torch.Tensor], device: torch.device, fresh: bool = False) -> WeightStore:
    """The store that already holds any of ``params`` on ``device`` (unless ``fresh``), else a new one.

    Either way the store is registered for all of ``params``: a new compile of a model starts afresh,
    and every graph dynamo later hands over for it finds that store.
    """
    with _LOCK:
        store = None
        if not fresh:
            store = next((s for s in map(_registered, params) if s is not None and s.device == device), None)
        if store is None:
            store = WeightStore(device=device)
        for p in params:
            _STORES[id(p)] = (weakref.ref(p), store)
        return store


def forget(params: list[torch.Tensor]) -> None:
    """Drop the registration of ``params`` (:func:`store_for`), so that their store, once nothing else
    holds it, frees its device memory (a benchmark's next variant of the same model starts from nothing)."""
    with _LOCK:
        for p in params:
            if _registered(p) is not None:
                del _STORES[id(p)]


def find_store(params: list[torch.Tensor]) -> WeightStore | None:
    """The store holding any of ``params``, if one exists."""
    with _LOCK:
        return next((s for s in map(_registered, params) if s is not None), None)
