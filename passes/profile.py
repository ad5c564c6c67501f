"""ProfilePass: per-Linear CPU / host-to-device / GPU costs in ``node.meta`` for the shapes the graph runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import kernels, meta
from hetegen_fx.config import Config
from hetegen_fx.costs import (
    CopyLoad,
    CostCache,
    HardwareModel,
    LinearCost,
    default_model,
    measure_cost,
)
from hetegen_fx.errors import UnsupportedModelError
from hetegen_fx.graph_utils import concrete, node_value, propagate_shapes
from hetegen_fx.linear import LinearSite, find_linears


def linear_tokens(site: LinearSite) -> int:
    """Rows the Linear multiplies (batch × sequence) at the graph's example shape."""
    v = node_value(site.x)
    if v is None or not hasattr(v, "shape"):
        return 1
    n = 1
    for d in v.shape[:-1]:
        n *= concrete(d)
    return max(n, 1)


def _concrete_inputs(example_inputs: Sequence[Any] | None) -> bool:
    """True when shapes may be propagated from ``example_inputs``: never with dynamo's SymInts, since
    computing with them adds guards that would specialise the graph's dynamic sizes."""
    return example_inputs is not None and not any(isinstance(x, torch.SymInt) for x in example_inputs)


class ProfilePass(PassBase):
    """Analysis: writes :data:`meta.LINEAR`, :data:`meta.COST` and :data:`meta.DECODE_COST` on every Linear;
    the graph is unchanged.

    Costs are measured on this machine (``profile="measure"``, or ``"auto"`` on a CUDA device), each distinct
    (shape, dtype) once and cached on disk, or predicted from a :class:`HardwareModel` (``"model"``, or
    ``"auto"`` when the accelerator is emulated on the CPU). When compiling from a saved Plan nothing is
    measured (``measure=False``): the Plan already holds the costs.
    """

    def __init__(
        self,
        config: Config,
        example_inputs: Sequence[Any] | None = None,
        hardware: HardwareModel | None = None,
        progress: Callable[[str], None] | None = None,
        measure: bool = True,
    ) -> None:
        super().__init__()
        self.measure = measure
        self.config = config
        self.example_inputs = example_inputs
        self.hardware = hardware
        self.progress = progress

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = find_linears(gm)
        if any(node_value(s.x) is None for s in sites) and _concrete_inputs(self.example_inputs):
            propagate_shapes(gm, self.example_inputs)
        device = torch.device(self.config.device)
        measure = self.measure and (
            self.config.profile == "measure" or (self.config.profile == "auto" and device.type == "cuda")
        )
        model = self.hardware or default_model(device)
        gm.meta[meta.HARDWARE] = model
        threads, worker = None, None
        if device.type == "cuda":  # timed on the CPU worker, as it will run: every core but the launching one
            from hetegen_fx.host import default_threads
            from hetegen_fx.runtime import get_runtime

            threads = self.config.cpu_threads or default_threads()
            worker = get_runtime(device).host if measure else None
        if measure:  # the CPU parts' kernel, built now (once per machine) so the profile times it
            kernels.load(self.progress)
        cache = CostCache(self.config.cache_dir, device, threads) if measure else None
        seen: dict[str, LinearCost] = {}
        fresh: set[str] = set()  # keys measured in this pass
        load: CopyLoad | None = None  # one for the whole pass, dropped with it

        def measure(key: str) -> LinearCost:
            nonlocal load
            if load is None and device.type == "cuda":
                load = CopyLoad(device)
            out_features, in_features, tokens, dtype = CostCache.parse(key)
            return measure_cost(out_features, in_features, tokens, dtype, device, threads, load, worker)

        def cost_of(site: LinearSite, tokens: int, i: int) -> str:
            """The key of the Linear's cost at ``tokens``, which is in ``seen`` after the call."""
            w = site.weight.tensor
            key = CostCache.key(site.out_features, site.in_features, tokens, w.dtype)
            cost = seen.get(key)
            if cost is None and cache is not None:
                cost = cache.get(key)
                if cost is None:
                    if self.progress:
                        self.progress(f"profiling {key} ({i + 1}/{len(sites)} Linears)")
                    cost = measure(key)
                    cache.put(key, cost)
                    fresh.add(key)
            if cost is None:
                cost = model.cost(site.out_features, site.in_features, tokens, w.dtype)
            seen[key] = cost
            return key

        keys = []  # per site: its tokens, the key of its cost, the key of its one-token cost
        for i, site in enumerate(sites):
            w = site.weight.tensor
            if not w.is_floating_point():
                raise UnsupportedModelError(
                    f"Linear {site.name} has {w.dtype} weights; hetegen_fx splits floating-point Linears only "
                    "(dequantize the model first, e.g. load it with dtype=torch.float16)"
                )
            tokens = linear_tokens(site)
            keys.append((tokens, cost_of(site, tokens, i), cost_of(site, 1, i)))
        if cache is not None:
            # measured now in a slow spell of the host: measured again, once (a cached cost was checked when
            # it was measured, and a shape that is really slower must not be measured at every compile)
            for key in (k for k in slow_gemvs(seen) if k in fresh):
                if self.progress:
                    self.progress(f"profiling {key} again: its CPU rate is far below the other shapes'")
                again = measure(key)
                if again.t_cpu < seen[key].t_cpu:
                    seen[key] = again
                    cache.put(key, again)
            cache.save()
        for site, (tokens, key, decode_key) in zip(sites, keys, strict=True):
            site.node.meta[meta.LINEAR] = site
            site.node.meta[meta.COST] = seen[key]
            site.node.meta[meta.DECODE_COST] = seen[decode_key]
            site.node.meta[meta.TOKENS] = tokens
        if self.config.cpu_memory is not None:
            gm.meta[meta.STORAGE_COST] = self._storage_cost(sites)
        return PassResult(gm, False)

    def _storage_cost(self, sites: list[LinearSite]) -> dict[str, float] | None:
        """The read rate and latency of the storage the Linears' deferred weights stay in (None when none
        has a checkpoint source: the model was not loaded with ``hetegen_fx.load(..., cpu_memory=...)``)."""
        from hetegen_fx.checkpoint import source_of
        from hetegen_fx.prefetch import measure_reads

        sources = [src for s in sites if (src := source_of(s.weight.tensor)) is not None]
        if not sources:
            return None
        if self.progress:
            self.progress("measuring the storage's read rate")
        return measure_reads(sources[0].checkpoint, [src.name for src in sources])


#: a GEMV-shaped cost whose CPU rate (bytes per second) is below the median of its dtype's by this factor is
#: measured again: at one token every large shape streams its weights from DRAM at about one rate, and a
#: profile of the 7B model on the H100 host had read one shape at a third of the others' (2.7 ms for 86 MiB,
#: against 0.8-1.0 ms in other profiles)
SLOW_FACTOR = 1.6
#: weights below this are not compared: their GEMVs are dominated by fixed costs, not by the rate
SLOW_MIN_BYTES = 8 * 2**20


def slow_gemvs(costs: dict[str, LinearCost]) -> list[str]:
    """Keys of measured ``costs`` at GEMV shapes (at most :data:`kernels.GEMV_ROWS` tokens, at least :data:`SLOW_MIN_BYTES` of
    weights) whose CPU rate is below their dtype's median rate by :data:`SLOW_FACTOR`, among at least three
    such shapes of that dtype."""
    rates: dict[torch.dtype, dict[str, float]] = {}
    for key, cost in costs.items():
        out_features, in_features, tokens, dtype = CostCache.parse(key)
        nbytes = out_features * in_features * dtype.itemsize
        if (
            tokens <= kernels.GEMV_ROWS
            and nbytes >= SLOW_MIN_BYTES
            and cost.source == "measured"
            and cost.t_cpu > 0
        ):
            rates.setdefault(dtype, {})[key] = nbytes / cost.t_cpu
    slow = []
    for by_key in rates.values():
        if len(by_key) >= 3:
            median = statistics.median(by_key.values())
            slow += [k for k, r in by_key.items() if r * SLOW_FACTOR < median]
    return slow
