"""Residency that changes while a model runs: the KV cache sized by use, weights demoted and promoted by g.

Owns: applying a decision of the model's :class:`~hetegen_fx.ledger.Ledger` (the store forgets the device
copies of demoted weights, its graphs are compiled again before their next call), :class:`Runner` (a
compiled graph that follows its model's residency, checks before each call that the KV cache the call
needs fits, and survives a failed device allocation by demoting and running the step again), and
:func:`set_gpu_memory`. Must not: change anything while a graph runs; a change happens between two calls,
under the device's lock.

The KV cache a call needs is read off its inputs (:class:`KVUse`, found by PlacementPass): the length of
the cache it is given, plus the tokens it appends, rounded up to a size class (:func:`kv_class`: powers of
two from 256 tokens, at most ``max_seq_len``) so that a growing cache changes residency a few times, not at
every step.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import format_bytes, parse_bytes
from .errors import ConfigError
from .ledger import ALLOCATION_FAILED, ResidencyChange

#: the smallest KV-cache size class, in tokens
MIN_KV_CLASS = 256


def kv_class(tokens: int, limit: int | None = None, floor: int = MIN_KV_CLASS) -> int:
    """The size class a cache of ``tokens`` is reserved at: the next power of two, at least ``floor``
    (:data:`MIN_KV_CLASS`, or the ledger's smaller one), and at most ``limit`` (``max_seq_len``) when that
    still holds ``tokens``."""
    size = floor
    while size < tokens:
        size *= 2
    return min(size, limit) if limit is not None and limit >= tokens else size


@dataclass(frozen=True)
class KVUse:
    """How a graph uses a KV cache, as PlacementPass read it: bytes one token of one sequence takes (all
    layers, keys and values); how many copies a step holds (2 for a cache extended by concatenation); the
    positions among the graph's inputs of the caches it is given (their dim -2 is the length); the tokens a
    call appends (0 for a cache written in place, whose length is its capacity), read at each call from the
    token ids at position ``ids`` when there is one; and the capacity of a cache the graph allocates itself."""

    per_token: int
    copies: int
    inputs: tuple[int, ...]
    appended: int
    ids: int | None = None
    fixed: int = 0
    fixed_input: int | None = (
        None  # where the capacity of a cache the graph allocates comes in, when it varies
    )

    def tokens(self, args: tuple) -> tuple[int, int]:
        """(tokens, sequences) the call with ``args`` needs room for."""
        caches = [args[i] for i in self.inputs if i < len(args) and isinstance(args[i], torch.Tensor)]
        ids = args[self.ids] if self.ids is not None and self.ids < len(args) else None
        ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        appended = self.appended if ids is None or not self.appended else int(ids.shape[1])
        length = max((int(c.shape[-2]) for c in caches), default=0)
        batch = max(
            [int(c.shape[0]) for c in caches] + ([int(ids.shape[0])] if ids is not None else []), default=1
        )
        fixed = self.fixed
        if self.fixed_input is not None and self.fixed_input < len(args):
            fixed = int(args[self.fixed_input])
        return max(length + appended, fixed), batch

    def cache_tensor(self, args: tuple) -> torch.Tensor | None:
        """The first cache tensor the call is given (it stands for its request's cache while it lives), if any."""
        return next(
            (args[i] for i in self.inputs if i < len(args) and isinstance(args[i], torch.Tensor)), None
        )

    def tokens_of_example(self, gm) -> tuple[int, int]:
        """(tokens, sequences) of the example the graph was captured with (its inputs' recorded values)."""
        from .graph_utils import concrete, node_value

        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        args = []
        for n in placeholders:
            v = node_value(n)
            if isinstance(v, torch.Tensor):
                v = torch.empty([concrete(d) for d in v.shape], dtype=v.dtype, device="meta")
            args.append(v)
        return self.tokens(tuple(args))

    def bytes(self, tokens: int, batch: int) -> int:
        return self.copies * self.per_token * tokens * batch


def apply(store, residency: dict[str, bool], reason: str, kv: int | None = None, budget: Any = False):
    """Make ``residency`` the model's (``store``'s ledger records it): the device copies of demoted weights are
    forgotten and every graph of the model is compiled again before its next call. Returns the
    :class:`ResidencyChange`, or None when no weight moved."""
    change = store.ledger.apply(residency, reason, kv, budget)
    if change is None:
        return None
    from . import trace

    trace.note(str(change), store)  # a recorded timeline of the model shows it before its next call
    store.residency = dict(store.ledger.residency)
    demoted = [t for name in change.demoted for t in store.tensors_of.get(name, ())]
    promoted = [t for name in change.promoted for t in store.tensors_of.get(name, ())]
    store.drop_device_copies(demoted + promoted)  # promoted: the copies of their GPU parts' bias rows
    store.graph_pool = None  # recorded CUDA graphs read the old weights: the next graphs record anew
    store.version += 1
    for runner in list(store.runners):  # now, not at their next call: a graph no longer called holds nothing
        runner.release()
    return change


def _announce(change: ResidencyChange | None, verbose: bool) -> None:
    if change is not None and verbose:
        print(f"[hetegen] residency: {change}", file=sys.stderr, flush=True)


class Runner:
    """A compiled graph that follows its model's residency. ``build(inputs)`` compiles it (the pass pipeline on
    the captured graph, under the store's current residency; ``inputs``: the example inputs at the first
    build, None after) and returns ``(graph_module, plan, callable)``. A later graph of a model whose ledger
    exists first makes room for its example's KV cache, so it is compiled once for it."""

    def __init__(self, build: Callable, store, config, kv: KVUse | None, example_inputs=None):
        from .runtime import get_runtime

        self._build = build
        self.store = store
        self.config = config
        self.kv = kv
        self.lock = get_runtime(config.device).lock
        self.graph_module = None
        self.plan = None
        self._call = None
        self._version = -1
        self.rebuilt = 0  # compiles after the first (residency changes)
        store.runners.add(self)
        with self.lock:
            if kv is not None and store.ledger is not None and example_inputs is not None:
                self._fit_kv(tuple(example_inputs))
            self._compile(example_inputs)

    def _compile(self, inputs=None) -> None:
        self.release()  # the old graph's weights go first
        version = self.store.version
        try:
            self.graph_module, self.plan, self._call = self._build(inputs)
        except torch.OutOfMemoryError as e:  # a promoted weight's copy did not fit: give some up, once
            failure = str(e)
        else:
            self._version = version
            return
        self._demote_after_failure(failure)
        version = self.store.version
        self.graph_module, self.plan, self._call = self._build(inputs)
        self._version = version

    def release(self) -> None:
        """Drop the compiled graph (its device weights, recorded CUDA graphs and entry in the store's list):
        after a residency change, so that no graph holds what the ledger no longer counts. It is compiled
        again at its next call."""
        old, self.graph_module, self._call, self._version = self.graph_module, None, None, -1
        if old is not None:
            self.store.graphs[:] = [g for g in self.store.graphs if g.graph_module is not old]

    def _recompile(self) -> None:
        """Compile again for the store's new residency (timed; a recorded timeline shows it)."""
        from . import trace

        t0 = time.perf_counter()
        self._compile()
        self.rebuilt += 1
        trace.note(
            f"graph compiled again for the new residency in {time.perf_counter() - t0:.2f} s", self.store
        )

    def current(self):
        """The graph module of the current residency (compiled again first if the residency changed)."""
        with self.lock:
            if self._version != self.store.version:
                self._recompile()
            return self.graph_module

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            if self.kv is not None and self.store.ledger is not None:
                self._fit_kv(args)
            if self._version != self.store.version:
                self._recompile()
            try:
                return self._call(*args)
            except torch.OutOfMemoryError as e:  # another process took device memory: give some up, once
                failure = str(e)
            # out of the except block: the failed attempt's frames (its activations, staged parts) are gone
            change = self._demote_after_failure(failure)
            self._recompile()
            warnings.warn(
                f"hetegen: a device allocation failed ({failure.splitlines()[0][:120]}); {change}; the step runs "
                "again",
                RuntimeWarning,
                stacklevel=2,
            )
            return self._call(*args)

    def _fit_kv(self, args: tuple) -> None:
        """Before a call: room for the KV cache it needs, at its size class (demoting weights); when a call
        that starts a request (a prefill) needs less than the ledger holds, the room is given back to weights
        (promotion). Decode steps never promote, so requests interleaved from several threads do not make
        residency swing at every step; the room is sized by the call at hand, one request's cache."""
        ledger = self.store.ledger
        tokens, batch = self.kv.tokens(args)
        size = kv_class(tokens, self.config.max_seq_len, ledger.kv_floor)
        need = self.kv.bytes(size, max(batch, self.config.batch_size))
        starts = self.kv.cache_tensor(args) is None or self.kv.appended > 1
        if need == ledger.kv_cache or (need < ledger.kv_cache and not starts):
            return
        residency = ledger.choose(kv=need)
        moves = residency != ledger.residency
        why = f"a KV cache of {tokens} tokens x {batch} ({format_bytes(need)} reserved)"
        _announce(
            apply(self.store, residency if moves else ledger.residency, why, kv=need), self.config.verbose
        )

    def _demote_after_failure(self, error: str) -> ResidencyChange:
        """Give up the least valuable resident weights (lowest g), at least as many bytes as the allocation
        that failed asked for (read off torch's message) and at least one Linear; the budget the ledger keeps
        to from now on is what is left (:func:`set_gpu_memory` raises it again)."""
        ledger = self.store.ledger
        if ledger is None or not any(ledger.residency.values()):
            raise torch.OutOfMemoryError(error)
        resident = sorted(
            (lp for lp in ledger.layers if ledger.residency.get(lp.name)), key=lambda lp: lp.priority
        )
        m = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]?i?B)", error)
        want = parse_bytes(m.group(1).replace(" ", "")) if m else 1
        residency, freed = dict(ledger.residency), 0
        for lp in resident:
            residency[lp.name] = False
            freed += lp.held
            if freed >= want:
                break
        budget = ledger.total(residency)
        if ledger.budget is not None:
            budget = min(budget, ledger.budget)
        change = apply(self.store, residency, ALLOCATION_FAILED, budget=budget)
        assert change is not None
        return change


def set_gpu_memory(compiled: torch.nn.Module, gpu_memory: int | str | None) -> ResidencyChange | None:
    """Change the budget of a compiled model while it runs: weights are promoted (a larger budget) or demoted
    (a smaller one) by g, between calls; the graphs are compiled again at their next call. ``None``: all of
    the device's free memory (less the headroom). Returns the change, or None when no weight moved. A budget
    below the minimum working set raises :class:`~hetegen_fx.BudgetError` and changes nothing."""
    from .introspect import store_of
    from .runtime import get_runtime

    store = store_of(compiled)
    if store.ledger is None:
        raise ConfigError("nothing compiled yet: run the model once before changing its budget")
    budget = parse_bytes(gpu_memory, "gpu_memory")
    with get_runtime(store.device).lock:
        if budget is None and store.device.type == "cuda":
            from hetegen_fx.passes.placement import DEVICE_HEADROOM

            free, _ = torch.cuda.mem_get_info(store.device)
            budget = max(0, free - DEVICE_HEADROOM + store.ledger.total())  # what the model holds is its own
        residency = store.ledger.choose(budget=budget)  # raises BudgetError below the minimum
        was = store.ledger.budget
        what = "unlimited" if budget is None else format_bytes(budget)
        old = "unlimited" if was is None else format_bytes(was)
        change = apply(store, residency, f"gpu_memory set from {old} to {what}", budget=budget)
    return change


__all__ = ["KVUse", "Runner", "apply", "kv_class", "set_gpu_memory"]
