"""What a compiled model holds, read through one public call: :func:`hetegen_fx.state`.

Owns the link from a compiled model (a :class:`hetegen_fx.CompiledModule`, or the copy that
:func:`hetegen_fx.compile` returns for a Hugging Face model) to the :class:`Config` it was compiled with and
its :class:`~hetegen_fx.store.WeightStore`, kept in a weak table instead of attributes on the model, and
the read-out of that state: graphs, Plans, device memory by category, the CUDA-graph pool. It only reads:
nothing here changes a model, a store or the runtime. The CLI, the benchmark, ``explain`` and ``export``
reach compiled models through it, never through private attributes.

    st = hetegen_fx.state(compiled)
    print(st)                      # one line per graph, the memory ledger, CUDA graphs
    st.memory["kv_cache"]          # bytes reserved for the KV cache by the decode plan
    st.cuda_graphs                 # None, or the pool's counts (recorded, replays, pool_bytes, ...)
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .config import Config, format_bytes
from .errors import ConfigError
from .plan import Plan
from .store import CompiledGraph, WeightStore, find_store


@dataclass(frozen=True)
class _Handle:
    config: Config | None
    store: WeightStore


_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def attach(compiled: torch.nn.Module, config: Config | None, store: WeightStore) -> None:
    """Record that ``compiled`` was compiled with ``config`` into ``store`` (called by the API once per
    compiled model; the entry goes when the model does)."""
    with _LOCK:
        _HANDLES[compiled] = _Handle(config, store)


def _handle(compiled: torch.nn.Module) -> _Handle | None:
    with _LOCK:
        hit = _HANDLES.get(compiled)
    if hit is not None:
        return hit
    # compiled through torch.compile(backend="hetegen") / model.compile: the model's latest store
    store = find_store(list(compiled.parameters())) if isinstance(compiled, torch.nn.Module) else None
    return None if store is None else _Handle(None, store)


def config_of(compiled: torch.nn.Module) -> Config | None:
    """The Config ``compiled`` was made with by :func:`hetegen_fx.compile`; None for any other model
    (also one compiled through ``torch.compile(backend="hetegen")``, whose options live in dynamo)."""
    with _LOCK:
        hit = _HANDLES.get(compiled)
    return None if hit is None else hit.config


def store_of(compiled: torch.nn.Module) -> WeightStore:
    """The weight store behind ``compiled``; a clear error for a model hetegen_fx did not compile."""
    hit = _handle(compiled) if isinstance(compiled, torch.nn.Module) else None
    if hit is None:
        raise ConfigError(
            f"this {type(compiled).__name__} was not compiled by hetegen_fx (no weight store found for its "
            "parameters): compile it with hetegen_fx.compile(model, gpu_memory=...) or "
            "model.compile(backend='hetegen')"
        )
    return hit.store


@dataclass
class ModelState:
    """A snapshot of what one compiled model holds (see :func:`state`).

    ``graphs``: every graph compiled for the model so far (label, Plan, GraphModule), in compile order.
    ``memory``: the decode plan's device-memory ledger by category, in bytes: ``resident_weights`` and every
    reserve the placement made (``kv_cache``, ``activations``, ``other_params``, ``staging``,
    ``blas_workspace``, ``cuda_graphs``, as the plan has them); ``budget`` is the plan's ``gpu_memory``
    (None: unlimited). ``allocated``: what is held now, in bytes: ``weights`` (device copies of this model's
    weights; 0 on the emulated device "cpu", which keeps them in place) and ``staging`` (the device's staging
    arena, shared by every model on that device). ``cuda_graphs``: the CUDA-graph pool's counts, None when
    the model records no graphs. ``compiled_stretches``: the inductor stretch compiler's counts, None when
    ``compile_stretches`` is off.
    """

    device: torch.device
    config: Config | None
    graphs: list[CompiledGraph] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    allocated: dict[str, int] = field(default_factory=dict)
    cuda_graphs: dict | None = None
    #: the inductor stretch compiler's counts (keys compiled, refused, seconds), None when it is off
    compiled_stretches: dict | None = None
    #: the model's memory ledger now (bytes by category, :class:`hetegen_fx.ledger.Ledger`) and its budget;
    #: empty before the first graph is placed
    ledger: dict[str, int] = field(default_factory=dict)
    ledger_budget: int | None = None
    #: every residency change while the model ran (:class:`hetegen_fx.ledger.ResidencyChange`), oldest first
    changes: list = field(default_factory=list)

    @property
    def plans(self) -> list[Plan]:
        """The Plans of :attr:`graphs`, in compile order."""
        return [g.plan for g in self.graphs]

    @property
    def decode_plan(self) -> Plan | None:
        """The Plan of the graph with the fewest tokens (the decode step of a language model), or None."""
        return min(self.plans, key=lambda p: p.tokens) if self.graphs else None

    def table(self) -> str:
        if not self.graphs:
            return f"nothing compiled yet on {self.device}: run the model once"
        rows = [f"{len(self.graphs)} graph(s) on {self.device}:"]
        for g in self.graphs:
            p = g.plan
            off = sum(not lp.resident for lp in p.layers)
            rows.append(
                f"  {g.label or 'graph'}: {p.tokens} token(s), {off}/{len(p.layers)} Linears offloaded"
            )
        budget = "unlimited" if self.budget is None else format_bytes(self.budget)
        ledger = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory.items())
        rows.append(f"decode plan's memory (budget {budget}): {ledger}")
        rows.append("held now: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.allocated.items()))
        if self.ledger:
            budget = "unlimited" if self.ledger_budget is None else format_bytes(self.ledger_budget)
            rows.append(
                f"ledger now (budget {budget}): "
                + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.ledger.items())
                + f"; total {format_bytes(sum(self.ledger.values()))}"
            )
        if self.changes:
            rows.append(f"{len(self.changes)} residency change(s):")
            rows += [f"  {c}" for c in self.changes[-8:]]
        if self.cuda_graphs is not None:
            cg = self.cuda_graphs
            rows.append(
                f"CUDA graphs: {cg['recorded']} recorded, {cg['replays']} replays, {cg['keys']} stretch shapes, "
                f"pool {format_bytes(cg['pool_bytes'])}"
            )
        if self.compiled_stretches is not None:
            cs = self.compiled_stretches
            rows.append(
                f"inductor: {cs['compiled']} stretch shape(s) compiled in {cs['compile_s']:.1f} s, "
                f"{cs['failed']} refused"
            )
        return "\n".join(rows)

    __str__ = table


def state(compiled: torch.nn.Module) -> ModelState:
    """What ``compiled`` holds now: its graphs and Plans, the decode plan's memory by category, what is
    allocated, and the CUDA-graph pool's counts. ``compiled`` is a model returned by
    :func:`hetegen_fx.compile`, or one compiled with ``model.compile(backend="hetegen")`` (then ``config``
    is None). For a :class:`~hetegen_fx.CompiledModule`, only its own graph is listed."""
    hit = _handle(compiled) if isinstance(compiled, torch.nn.Module) else None
    store = store_of(compiled) if hit is None else hit.store
    graphs = list(store.graphs)
    own = getattr(compiled, "graph_module", None)
    if isinstance(own, torch.fx.GraphModule):  # a CompiledModule: its graph, not its model's other compiles
        graphs = [g for g in graphs if g.graph_module is own]
    st = ModelState(device=store.device, config=None if hit is None else hit.config, graphs=graphs)
    plan = st.decode_plan
    if plan is not None:
        st.memory = {"resident_weights": plan.resident_bytes, **plan.reserved}
        st.budget = plan.gpu_memory
    from .runtime import get_runtime

    st.allocated = {"weights": store.device_bytes(), "staging": get_runtime(store.device).staging_bytes()}
    pool = store.graph_pool
    st.cuda_graphs = None if pool is None else pool.stats()
    compiler = store.stretch_compiler
    st.compiled_stretches = None if compiler is None else compiler.stats()
    ledger = store.ledger
    if ledger is not None:
        st.ledger, st.ledger_budget, st.changes = ledger.by_category(), ledger.budget, list(ledger.history)
    return st
