"""The launcher: what a compiled graph runs as.

Owns: :func:`build`, the one ending of every compile (the pass pipeline on a captured graph, the Plan's
device needs applied by :func:`apply`, then the callable the :class:`~hetegen_fx.residency.Runner` calls),
and that callable (:func:`launcher`): the *direct*
program (the ``hetegen::`` custom ops called as plain functions, :func:`direct`), its stretches of device
work compiled by inductor (``compile_stretches``, :mod:`hetegen_fx.inductor`) and replayed as CUDA graphs of
the model's pool (``cuda_graphs``, :mod:`hetegen_fx.graphs`; :func:`pool_for`), one call at a time per device
(:attr:`hetegen_fx.runtime.DeviceRuntime.lock`), cuDNN attention off while it runs where its shapes vary
(``cudnn_attention``), the KV-cache buffers a prefill makes marked static for dynamo (one graph per size
class), a timeline recorded node
by node inside :func:`hetegen_fx.trace.record`, and the refusal of HF's host-side cache edits when the graph
parks state on the device. Must not: place, reorder or change what a graph computes; the transformed graph
(with its custom ops) stays the one to inspect, export and trace.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from . import ops, trace
from .decoding import refuse_cache_edits
from .graph_utils import allocated_cache_outputs, attention_shapes_repeat, clone_graph_module
from .graphs import GraphPool, fuse_stretches
from .host import default_threads
from .inductor import StretchCompiler
from .runtime import get_runtime, park


def build(gm: fx.GraphModule, config, store, inputs, label: str) -> tuple[fx.GraphModule, Any, Callable]:
    """Run the pass pipeline on ``gm`` (captured; ``inputs``: example inputs or None) under ``config`` and
    ``store``'s residency, and bind the result: ``(transformed graph, its Plan, the callable to run)``."""
    from .pipeline import transform

    out, plan = transform(gm, config, store, inputs, label=label)
    if config.verbose:
        print(plan.table(), file=sys.stderr)
    try:
        apply(plan, config, store, out)
        return out, plan, launcher(out, config, store, plan)
    except BaseException:  # e.g. the arena did not fit: the graph (and the device copies it holds) goes
        store.graphs[:] = [g for g in store.graphs if g.graph_module is not out]
        raise


def apply(plan, config, store, gm: fx.GraphModule) -> None:
    """What the device runtime must hold before ``gm`` (compiled under ``plan``) first runs: a staging arena
    of the size its Plan laid out (grown now, at compile time: an arena that grew while the graph runs would
    be held twice, above the budget; remembered per model and graph, so that it shrinks again once no graph
    needs it this large), and the CPU worker's threads (on CUDA every core but the one that launches GPU
    work, or ``cpu_threads``)."""
    rt = get_runtime(config.device)
    with rt.lock:
        rt.reserve(plan.reserved.get("staging", 0), owner=store, graph=gm)
        if config.cpu_threads or rt.is_cuda:
            rt.host.threads = config.cpu_threads or default_threads()
    # the storage tier: the reader reads what the model's graphs fetch, in their order
    if gm.graph.find_nodes(op="call_function", target=ops.FETCH) or store.storage_reader is not None:
        st = plan.storage
        slot = max(st.get("ring_bytes", 0) // max(st.get("slots", 1), 1), store.largest_deferred)
        store.prepare_storage(gm, config.storage_slots, st.get("read_rate", 0.0), slot)


def launcher(gm: fx.GraphModule, config, store=None, plan=None) -> Callable:
    """``gm`` (a transformed graph) as the callable a compiled model runs (see the module). ``store`` and
    ``plan`` give the model's CUDA-graph pool and stretch compiler; without them stretches are neither
    recorded nor compiled."""
    device = config.device
    pool = pool_for(store, config, plan) if store is not None and plan is not None else None
    compiler = compiler_for(store, config) if store is not None else None
    label = getattr(plan, "label", "") or type(gm).__name__
    fast = direct(gm, pool, compiler, label)
    no_cudnn = torch.device(device).type == "cuda" and (
        config.cudnn_attention is False
        or (config.cudnn_attention == "auto" and not attention_shapes_repeat(gm))
    )
    lock = get_runtime(device).lock

    cache_outputs = allocated_cache_outputs(gm)

    reads_storage = bool(gm.graph.find_nodes(op="call_function", target=ops.FETCH))

    def run(*args: Any) -> Any:
        if reads_storage and store is not None and store.storage_reader is not None:
            store.storage_reader.settle()  # what a call that broke off left held
        if trace.recording():  # inside trace.record(): node by node, timed, no CUDA graphs
            out = trace.run_recorded(gm, device, args, store)
        else:
            out = fast(*args)
        for i in cache_outputs:  # a static cache made in this call: its size stays a constant of the graphs
            if isinstance(out[i], torch.Tensor):  # that read it, one per size class, never a symbolic one
                torch._dynamo.mark_static(out[i])
        return out

    def call(*args: Any) -> Any:
        with lock:
            if not no_cudnn or not torch.backends.cuda.cudnn_sdp_enabled():
                return run(*args)
            torch.backends.cuda.enable_cudnn_sdp(False)
            try:
                return run(*args)
            finally:
                torch.backends.cuda.enable_cudnn_sdp(True)

    call.graph_module = gm  # type: ignore[attr-defined]
    return guard_parked_state(call, gm)


def direct(
    gm: fx.GraphModule,
    pool: GraphPool | None = None,
    compiler: StretchCompiler | None = None,
    label: str = "",
) -> fx.GraphModule:
    """The program of ``gm`` with its ``hetegen::`` ops called as plain functions (``ops.DIRECT``), and, given
    a graph ``pool`` or a stretch ``compiler``, its stretches of device work recorded as CUDA graphs and/or
    compiled by inductor (:func:`hetegen_fx.graphs.fuse_stretches`).

    A custom op costs ~20 µs of dispatch per call on the thread that launches GPU work, and a decode step
    of a 7B model makes a few hundred of them; the functions do the same work without the dispatcher.
    ``gm``, with the ops, stays the graph to inspect, export and trace. Weights are shared, not copied.
    """
    fast = clone_graph_module(gm)
    for node in fast.graph.nodes:
        if node.op == "call_function":
            for op, fn in ops.DIRECT.items():
                if ops.is_op(node.target, op):
                    node.target = fn
    fast.recompile()
    if pool is not None or compiler is not None:
        fuse_stretches(fast, pool, compiler=compiler, owner=label)
    return fast


def pool_for(store, config, plan) -> GraphPool | None:
    """The graph pool of ``store`` (one model's graphs share it; made on first use) if ``config`` records
    graphs, with the budget ``plan`` reserved for it; else None (also when it reserved nothing)."""
    if not config.cuda_graphs:
        return None
    if store.graph_pool is None:
        limit = plan.reserved.get("cuda_graphs", 0)
        if limit <= 0:
            return None
        store.graph_pool = GraphPool(store.device, limit)
    return store.graph_pool


def compiler_for(store, config) -> StretchCompiler | None:
    """The stretch compiler of ``store``'s model (made on first use) if ``config`` compiles stretches."""
    if not config.compile_stretches:
        return None
    if store.stretch_compiler is None:
        store.stretch_compiler = StretchCompiler(verbose=config.verbose)
    return store.stretch_compiler


def guard_parked_state(run: Callable, gm: fx.GraphModule) -> Callable:
    """``run`` (the compiled ``gm``), refusing to run inside an HF decoding method that edits the KV cache on
    the host when ``gm`` parks outputs on the accelerator (:mod:`hetegen_fx.decoding`); ``run`` itself when
    it parks none (e.g. on an emulated device, or with ``output_device="input"``)."""
    if not any(gm.graph.find_nodes(op="call_function", target=park)):
        return run

    def guarded(*args: Any) -> Any:
        refuse_cache_edits(sys._getframe(1))
        return run(*args)

    guarded.graph_module = gm  # type: ignore[attr-defined]
    return guarded


__all__ = ["apply", "build", "compiler_for", "direct", "guard_parked_state", "launcher", "pool_for"]
