"""PlacementPass: which weights stay resident on the device, and each offloaded Linear's CPU share α.

Residency is decided once per model (the WeightStore) by priority ``g = T_cpu / M_gpu``: the weights whose
CPU time per device byte is highest stay resident while the budget — minus the KV-cache, activation,
other-parameter and staging reserves — holds them. Every graph of the model then reuses that residency
and computes its own α from its own (shape-specific) costs. Four refinements of ``g``:

* ``T_cpu`` is taken at one token (:data:`meta.DECODE_COST`): generation time is decode time, and the
  residency must not depend on whether the prefill or the decode graph is compiled first.
* At one token a GEMV streams its weights from DRAM, so ``T_cpu / M`` is one rate per dtype; measured per
  shape it scattered by up to 30 % between runs on the H200 host (``gate_proj`` 1.5-2.1 ms, ``q_proj``
  0.65-0.72 ms), enough to flip the plan. The rate is pooled over the Linears of each dtype.
* ``T_cpu`` includes the Linear's share of the job overhead H (``Config.job_overhead``): each CPU job (the
  Linears that read one input) costs hand-offs between the device and the worker on top of its GEMVs. So among Linears of one
  dtype, the fewer bytes a CPU job spans, the higher the priority: a lone ``o_proj`` before ``q/k/v``,
  which share a job, before ``gate/up``. With ``block_jobs`` an MLP's Linears share one job (a block), so
  whole MLPs are offloaded first and run as blocks. Without this, two H200 machines that profiled the 7B model a few
  percent apart placed it with 60 and with 100 CPU jobs a token; the second spent 23 ms a token between
  jobs against 12 ms, and decoded 10-20 % slower.
* Among Linears of equal priority (one shape in every layer) the *later* ones stay resident and the
  earliest are offloaded. A decode step then starts with a CPU job right after the first norm, while the
  launching thread queues the resident work behind it; before, the worker waited while the first layers'
  resident blocks were launched and run. On the 7B at 6 GiB (H100 host, 2026-11-22, commit e9acd93,
  interleaved rounds): 0.977 of the step, faster in 7 of 10 rounds (an earlier try that day: 0.959, 6 of 8).

α is one per CPU job (:func:`hetegen_fx.costs.job_alpha`): the Linears that read one input share the job's
overhead H on the CPU lane (``Config.job_overhead``, by default the device's
:class:`~hetegen_fx.costs.HardwareModel`'s), and their common α balances ``H + their CPU parts`` against
their copies. Without H, the jobs of the 7B decode step ran longer than the plan's CPU parts by more than
the copies did, and a forced α below the profiled one decoded faster (H100 host, 2026-11-22, commit
5727e8c). A job whose α comes out below :data:`MIN_ALPHA` is streamed.

**Segments** (``Config.stream_jobs``, at decode shapes): every CPU job costs H, and the CPU lane waits for the
device between two jobs (the hardware model's ``job_gap``), while a streamed Linear costs the CPU lane
nothing. So, walking the offloaded jobs in graph order, a job is streamed (α = 0) into the *segment* of the
CPU job before it when the lane model predicts the segment, with the job's copies running beside the head's
CPU part, shorter than the two jobs balanced apart plus the gap; the head's α rises to cover the copies
(:func:`hetegen_fx.costs.segment_alpha`). In a Llama decode step the q/k/v job of a layer is streamed into
the segment of the gate/up job before it. On the 7B at 6 GiB (H100 host, interleaved rounds on three
machines) the step went from 46 CPU jobs to 34 and took 0.942, 0.973 and 0.961 of the per-job plan's time.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Collection, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.blocks import MLPBlock, find_blocks
from hetegen_fx.config import Config, format_bytes
from hetegen_fx.costs import LinearCost, default_model, job_alpha, segment_alpha, segment_time
from hetegen_fx.errors import ConfigError
from hetegen_fx.graph_utils import CACHE_ALLOCATORS, _is_view, _name, concrete, node_value, writers_of
from hetegen_fx.graphs import reserve as graph_reserve
from hetegen_fx.kernels import GEMV_ROWS
from hetegen_fx.ledger import Ledger, LedgerLayer
from hetegen_fx.linear import LinearSite, host_tables, param_of
from hetegen_fx.plan import STAGING_ALIGN, LayerPlan, Plan, staging_size
from hetegen_fx.residency import MIN_KV_CLASS, KVUse, kv_class
from hetegen_fx.runtime import blas_workspace_bytes
from hetegen_fx.store import WeightStore

#: headroom left free on the device when no budget is given (CUDA context, allocator fragmentation)
DEVICE_HEADROOM = 512 * 2**20


#: a profiled α below this is taken as 0 (the job is streamed): it saves at most that share of the job's
#: device lane, while the cost model is least reliable there (a 512-token GEMM of a few dozen rows runs far
#: slower than the linear fit of the whole-layer timings says). On the H100 host a prefill plan with mean α
#: 0.03 (13B) took 0.64 s against 0.34 s for streaming everything.
MIN_ALPHA = 0.05


def split_row(alpha: float, out_features: int) -> int:
    """Output features on the CPU for share α; multiples of 64 for large layers (vector-friendly)."""
    q = 64 if out_features >= 1024 else 1
    k = int(round(alpha * out_features / q)) * q
    return min(max(k, 0), out_features)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _through_views(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` views (itself if it is no view): a cache behind GQA's expand/reshape."""
    while node.op != "placeholder" and node.args and _is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def kv_cache_copies(gm: fx.GraphModule) -> int:
    """How many copies of the KV cache a step holds at once: 1 when every attention op reads its keys and
    values (through views, e.g. GQA's expand) from a buffer the graph writes in place, a graph input or one
    it allocates (HF's StaticCache, which its first step allocates: ``index_copy_`` into it); else 2, as for
    a cache extended by concatenation (HF's DynamicCache), where the cache a step was given stays alive
    until the step returns its successor. A prefill that starts a DynamicCache reads freshly computed keys:
    2 as well, since its decode steps concatenate. A graph input only read may be a concatenation made
    before a graph break: 2."""
    copies = 1
    for node in gm.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
            for kv in node.args[1:3]:
                kv = _through_views(kv) if isinstance(kv, fx.Node) else kv
                buffer = isinstance(kv, fx.Node) and (kv.op == "placeholder" or _name(kv) in CACHE_ALLOCATORS)
                if not buffer or not writers_of(kv):
                    copies = 2
    return copies


def allocated_bytes(nbytes: int, device_type: str = "cuda") -> int:
    """What torch's CUDA caching allocator holds (and ``max_memory_allocated`` counts) for one tensor of
    ``nbytes`` made on its own: sizes round up to 512 bytes, and a tensor of 10 MiB or more gets a segment
    rounded up to 2 MiB, which is split only if more than 1 MiB is left over. So a 135 MiB weight (a 13B
    MLP Linear) holds 136 MiB: 40 MiB over the 40 that a 10 GiB plan keeps resident. Elsewhere: ``nbytes``."""
    if device_type != "cuda" or nbytes <= 0:
        return nbytes
    rounded = -(-nbytes // 512) * 512
    if nbytes < 10 << 20:
        return rounded
    segment = -(-nbytes // (2 << 20)) * (2 << 20)
    return segment if segment - rounded <= 1 << 20 else rounded


def _is_4d(value) -> bool:
    """Whether ``value`` is a tensor of attention's [batch, heads, tokens, head_dim] rank."""
    return isinstance(value, torch.Tensor) and value.dim() == 4


#: what keys read through views may be stored in: a buffer the graph allocates, or a concatenation
_STORED = CACHE_ALLOCATORS | {"cat"}


def _returned(node: fx.Node) -> bool:
    """Whether the graph returns ``node`` itself (a cache's first keys, kept by the caller)."""
    return any(u.op == "output" for u in node.users)


def kv_cache_bytes_per_token(gm: fx.GraphModule) -> int:
    """Bytes one token adds to the KV cache, read off the attention ops of the graph (0 if none). Keys read
    through views of a cache (a graph input, a buffer the graph allocates, a concatenation) count the
    cache's heads: grouped-query attention expands a cache of fewer heads to the query's. Keys computed in
    the graph and neither stored nor returned (an encoder's, or a decoder's called with ``use_cache=False``)
    hold no cache: they count nothing."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
            k = node.args[1] if len(node.args) > 1 else None
            if not isinstance(k, fx.Node):
                continue
            base = _through_views(k)
            is_cache = base.op == "placeholder" or _name(base) in _STORED
            if not is_cache and not _returned(base):
                continue  # attention over this step's keys only: nothing outlives the step
            stored = node_value(base) if is_cache else None
            value = stored if _is_4d(stored) else node_value(k)
            if _is_4d(value):
                heads, head_dim = concrete(value.shape[1]), concrete(value.shape[3])
                total += 2 * heads * head_dim * value.element_size()
    return total


def _tensors(sites: list[LinearSite]) -> dict[str, tuple]:
    """Linear name → the tensors it is made of (what a residency change moves), for ``meta.TENSORS``."""
    return {s.name: (s.weight.tensor,) + ((s.bias.tensor,) if s.bias else ()) for s in sites}


def kv_use(gm: fx.GraphModule) -> KVUse | None:
    """How the graph uses a KV cache (:class:`hetegen_fx.residency.KVUse`), or None when it holds none: which
    of its inputs are caches (given whole, written in place, or extended by concatenation), the tokens a call
    appends (read at each call from the token ids, dim 1 of the 2-D integer input, where there is one), and
    the capacity of a cache the graph allocates itself."""
    per_token = kv_cache_bytes_per_token(gm)
    if not per_token:
        return None
    copies = kv_cache_copies(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    index = {n: i for i, n in enumerate(placeholders)}
    inputs: set[int] = set()
    fixed, step, fixed_input = 0, 0, None
    for node in gm.graph.nodes:
        if node.op != "call_function" or "scaled_dot_product_attention" not in str(node.target):
            continue
        q, k = node.args[0], node.args[1] if len(node.args) > 1 else None
        if isinstance(q, fx.Node) and _is_4d(node_value(q)):
            step = max(step, concrete(node_value(q).shape[2]))
        if not isinstance(k, fx.Node):
            continue
        base = _through_views(k)
        parts = base.args[0] if _name(base) == "cat" and base.args else [base]
        for part in parts if isinstance(parts, (list, tuple)) else [parts]:
            part = _through_views(part) if isinstance(part, fx.Node) else part
            if isinstance(part, fx.Node) and part.op == "placeholder" and part in index:
                inputs.add(index[part])
        if _name(base) in CACHE_ALLOCATORS and _is_4d(node_value(base)):
            length = node_value(base).shape[2]
            symbol = str(length) if isinstance(length, torch.SymInt) else None
            given = next(  # a capacity dynamo made an input (the cache's size varies from call to call)
                (i for i, n in enumerate(placeholders) if symbol and str(node_value(n)) == symbol), None
            )
            if given is not None:
                fixed_input = given
            else:
                fixed = max(fixed, concrete(length))
    ids = next(
        (
            i
            for i, n in enumerate(placeholders)
            if isinstance(v := node_value(n), torch.Tensor)
            and v.dim() == 2
            and not v.is_floating_point()
            and param_of(n) is None
        ),
        None,
    )
    appended = 0 if copies == 1 and (inputs or fixed) else step
    return KVUse(per_token, copies, tuple(sorted(inputs)), appended, ids, fixed, fixed_input)


def activation_bytes(gm: fx.GraphModule) -> int:
    """Room for activations: four times the largest intermediate tensor of the graph."""
    largest = 0
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            v = node_value(node)
            if isinstance(v, torch.Tensor):
                # sizes through their hints: comparing symbolic sizes would specialise dynamic graphs
                numel = math.prod(concrete(d) for d in v.shape)
                largest = max(largest, numel * v.element_size())
    return 4 * largest


def other_param_bytes(gm: fx.GraphModule, sites: list[LinearSite], host: Collection[str] = ()) -> int:
    """Bytes of parameters used by anything but a Linear (embeddings, norms, buffers) on the device.

    A Linear's weight and bias are counted in its own bytes; they count here too only when something else
    also reads them (e.g. an embedding tied to ``lm_head``). Tables in ``host`` (names of the embedding
    tables looked up on the host) are not counted.
    """
    linear_params = {id(s.weight.tensor) for s in sites} | {
        id(s.bias.tensor) for s in sites if s.bias is not None
    }
    linear_nodes = {s.node for s in sites} | {n for s in sites for n in s.absorbed}
    seen: set[int] = set()
    total = 0
    for node in gm.graph.nodes:
        ref = param_of(node)
        if ref is None or id(ref.tensor) in seen or not node.users or ref.name in host:
            continue
        if id(ref.tensor) in linear_params and all(u in linear_nodes for u in node.users):
            continue
        seen.add(id(ref.tensor))
        total += _nbytes(ref.tensor)
    return total


class PlacementPass(PassBase):
    """Analysis: writes the Plan to ``gm.meta[meta.PLAN]`` and each Linear's LayerPlan to ``node.meta``."""

    def __init__(self, config: Config, store: WeightStore, plan: Plan | None = None, label: str = "") -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.given = plan
        self.label = label
        self._hardware = None  # the graph's hardware model (meta.HARDWARE), read at each call
        self._tensors: dict[str, tuple] = {}  # Linear name → its tensors, of the graph being placed

    def call(self, gm: fx.GraphModule) -> PassResult:
        self._hardware = gm.meta.get(meta.HARDWARE)
        nodes = [n for n in gm.graph.nodes if meta.LINEAR in n.meta]
        sites: list[LinearSite] = [n.meta[meta.LINEAR] for n in nodes]
        plan = self._from_given(gm, sites) if self.given is not None else self._place(gm, sites)
        plan.label = self.label
        for node, lp in zip(nodes, plan.layers, strict=True):
            node.meta[meta.PLACEMENT] = lp
        gm.meta[meta.PLAN] = plan
        return PassResult(gm, False)

    def _budget(self) -> int | None:
        if self.config.gpu_memory is not None:
            return self.config.gpu_memory
        device = torch.device(self.config.device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(0, free - DEVICE_HEADROOM + self.store.device_bytes())
        return None

    def _place(self, gm: fx.GraphModule, sites: list[LinearSite]) -> Plan:
        cfg = self.config
        layers = []
        alphas = self._alphas(sites, {s.name: s.node.meta[meta.COST] for s in sites})
        for s in sites:
            cost = s.node.meta[meta.COST]
            alpha = alphas[s.name]
            layers.append(
                LayerPlan(
                    name=s.name,
                    out_features=s.out_features,
                    in_features=s.in_features,
                    tokens=s.node.meta.get(meta.TOKENS, 1),
                    dtype=str(s.weight.tensor.dtype).removeprefix("torch."),
                    bytes=s.weight_bytes,
                    resident=True,
                    alpha=alpha,
                    split=split_row(alpha, s.out_features),
                    t_cpu=cost.t_cpu,
                    t_cpu_fixed=cost.t_cpu_fixed,
                    t_copy=cost.t_copy,
                    t_gpu=cost.t_gpu,
                )
            )
        budget = self._budget()
        store = self.store
        # the tables looked up on the host: all (True), none (False), or with "auto" the first graph's choice
        # (the ledger's), host unless the whole model fits with them on the device (below)
        on_host = cfg.host_embeddings is True or (
            cfg.host_embeddings == "auto" and (store.ledger is None or store.ledger.host_tables)
        )
        tables = sorted(host_tables(gm.graph)) if on_host else []
        other = other_param_bytes(gm, sites, tables)
        use = kv_use(gm)
        gm.meta[meta.KV_USE] = use
        tokens, batch = use.tokens_of_example(gm) if use is not None else (0, 1)
        batch = max(batch, cfg.batch_size)  # batch_size: a floor

        def kv_at(floor: int) -> int:
            """The cache this graph's example holds, at its size class (max_seq_len: the limit)."""
            return use.bytes(kv_class(tokens, cfg.max_seq_len, floor), batch) if use is not None else 0

        kv = kv_at(store.ledger.kv_floor if store.ledger is not None else MIN_KV_CLASS)
        gm.meta[meta.TENSORS] = self._tensors = _tensors(sites)
        blocks = self._blocks(gm, sites)
        # the model's residency and reserves: the store's, or, for its first graph, a new ledger's (which the
        # pipeline gives to the store once the whole pipeline succeeded)
        ledger, residency, model_reserved = store.ledger, store.residency, store.reserved
        if residency is None:
            reserved = {
                "kv_cache": kv,
                "activations": cfg.activation_reserve
                if cfg.activation_reserve is not None
                else activation_bytes(gm),
                "other_params": other,
            }
            blas = self._blas_workspace()
            if blas:
                reserved["blas_workspace"] = blas
            graphs = graph_reserve(cfg, budget)
            if graphs:
                reserved["cuda_graphs"] = graphs
            ledger = self._ledger(layers, reserved, budget, self._priority(sites, blocks))
            # a budget too small for the first size class (a small model's cache is large beside its
            # weights): smaller classes, down to 16 tokens, before giving up
            while budget is not None and ledger.kv_floor > 16 and ledger.minimum() > budget:
                ledger.kv_floor //= 2
                ledger.kv_cache = reserved["kv_cache"] = kv_at(ledger.kv_floor)
            if tables and cfg.host_embeddings == "auto":
                # the largest cache this model may hold: a request growing to it later demotes no weight
                longest = max(tokens, cfg.max_seq_len or 0)
                largest = use.bytes(kv_class(longest, cfg.max_seq_len, ledger.kv_floor), batch) if use else 0
                other = self._tables_on_device(gm, sites, ledger, reserved, other, tables, max(kv, largest))
                tables = tables if ledger.host_tables else []
            ledger.residency = ledger.choose()
            residency, model_reserved = dict(ledger.residency), reserved
            gm.meta[meta.LEDGER] = (ledger, reserved)
        for lp in layers:
            lp.resident = residency.get(lp.name, False)
            if lp.resident:
                lp.alpha, lp.split = 0.0, 0
        reserved = dict(model_reserved)
        # a later graph may read on the device what the first looked up on the host (a graph break); its KV
        # cache is what the ledger leaves room for now (the runner makes room before each call)
        reserved["other_params"] = max(reserved.get("other_params", 0), other)
        reserved["kv_cache"] = ledger.kv_cache if ledger is not None else max(reserved.get("kv_cache", 0), kv)
        if ledger is not None:
            budget = ledger.budget
        self._form_blocks(blocks, sites, layers, reserved, budget)
        storage = self._storage_tier(gm, sites, layers)
        if cfg.alpha is None and cfg.stream_jobs:
            self._stream_jobs(sites, layers, reserved, budget)
        reserved["staging"] = self._staging(layers)
        self._check_later_graph(layers, reserved, budget)
        src = {s.node.meta[meta.COST].source for s in sites}
        return Plan(
            device=cfg.device,
            gpu_memory=budget,
            tokens=max((lp.tokens for lp in layers), default=0),
            layers=layers,
            reserved=reserved,
            source="/".join(sorted(src)) or "none",
            host_tables=tables,
            storage=storage,
        )

    def _tables_on_device(
        self,
        gm: fx.GraphModule,
        sites: list[LinearSite],
        ledger,
        reserved: dict[str, int],
        other: int,
        tables: list[str],
        kv: int,
    ) -> int:
        """``host_embeddings="auto"`` for a model's first graph: its embedding ``tables`` go to the device where
        the budget holds every Linear resident with them there beside a KV cache of ``kv`` bytes (the largest
        the model may hold), so that no weight makes room for them, now or when a request grows its cache (a
        step then makes no host lookup and no copy of its rows); else they stay on the host, their bytes left
        to weights. Tables tied to a Linear (``lm_head``) stay on the host with the others: on the device the
        lookup would read that Linear's resident copy, counted once, but the copy would stay there uncounted
        once the Linear is demoted. Records the choice in ``ledger`` (``host_tables``, the other-parameter
        reserve) for the model's later graphs, and returns the other-parameter bytes it reserves. Decided
        once: a budget lowered later (:func:`hetegen_fx.set_gpu_memory`) or a failed allocation demotes
        weights and leaves the tables."""
        if {s.weight.name for s in sites} & set(tables):
            return other
        with_tables = other_param_bytes(gm, sites)
        everything = {lp.name: True for lp in ledger.layers}
        if ledger.budget is None or ledger.total(everything, kv) + with_tables - other <= ledger.budget:
            ledger.host_tables = False
            ledger.reserves["other_params"] = reserved["other_params"] = with_tables
            return with_tables
        return other

    def _storage_tier(self, gm: fx.GraphModule, sites: list[LinearSite], layers: list[LayerPlan]) -> dict:
        """With ``cpu_memory``: the rows of each offloaded Linear kept in RAM (the model's first graph
        decides, :func:`hetegen_fx.tiers.host_rows`; later graphs keep that), the rest in storage, read at
        every step. A Linear's split stays where the lane model put it: the CPU computes rows ``[0, split)``,
        from RAM and, beyond its RAM rows, from the ring; the device the rest, copied from RAM and the ring
        (the reader runs ahead: where it keeps up, a read is hidden on either side, and where it does not, the
        step waits for reads whatever the split; the Plan's step time counts them as a lane of their own,
        :attr:`~hetegen_fx.plan.Plan.storage_seconds`). A CPU job that reads ring rows holds a ring slot for
        each of its storage parts until it is done, so a job with more storage parts than ``storage_slots``
        computes only RAM rows on the CPU (:func:`_ring_fits`). Returns the Plan's ``storage`` figures ({}
        without a storage tier)."""
        from hetegen_fx import tiers
        from hetegen_fx.checkpoint import source_of
        from hetegen_fx.prefetch import DEFAULT_SLOTS

        cfg = self.config
        if cfg.cpu_memory is None:
            return {}
        deferred = {s.name for s in sites if s.layout == "out_in" and source_of(s.weight.tensor) is not None}
        if not deferred:
            raise ConfigError(
                "cpu_memory applies to a model whose Linear weights stay in their checkpoint until placed: "
                "load it with hetegen_fx.load(path, cpu_memory=...) (or `hetegen generate --model PATH "
                "--cpu-memory ...`); a model already in host memory needs no cpu_memory"
            )
        cost = gm.meta.get(meta.STORAGE_COST) or {}
        seen: set[int] = set()
        other = 0  # host bytes of every weight that is not a deferred Linear's: in RAM whatever the choice
        for node in gm.graph.nodes:
            ref = param_of(node)
            if ref is None or id(ref.tensor) in seen:
                continue
            seen.add(id(ref.tensor))
            if ref.name not in deferred and source_of(ref.tensor) is None:
                other += _nbytes(ref.tensor)
        slots = cfg.storage_slots or DEFAULT_SLOTS
        # every deferred Linear: one resident now may be demoted while the model runs, into the storage tier
        # the model's largest, where this graph lacks it (a graph break)
        largest = max([lp.bytes for lp in layers if lp.name in deferred] + [self.store.largest_deferred])
        decided = self.store.host_rows
        if decided is None:
            least = tiers.check_minimum(cfg.cpu_memory, other, slots, largest)
            decided = tiers.host_rows(
                layers,
                deferred,
                cfg.cpu_memory - least,
                cfg.storage_policy,
                cost.get("read_rate", 0.0),
                cost.get("read_latency", 0.0),
            )
            gm.meta[meta.HOST_ROWS] = decided
        ram = 0
        for lp in layers:
            if lp.resident or lp.name not in deferred:
                continue
            kept = min(decided.get(lp.name, 0), lp.out_features)  # decided resident, demoted since: storage
            lp.storage_rows = lp.out_features - kept
            ram += lp.bytes * kept // max(lp.out_features, 1)
        _ring_fits(sites, layers, slots)
        if not any(lp.storage_rows for lp in layers):
            return {}
        return {
            "cpu_memory": cfg.cpu_memory,
            "ram_bytes": ram,
            "other_bytes": other,
            # slots for the largest deferred Linear (what check_minimum counts): a Linear demoted while the
            # model runs goes to storage whole, and its reader's ring then fits the same bytes
            "ring_bytes": slots * largest,
            "slots": slots,
            "policy": cfg.storage_policy,
            **cost,
        }

    def _held(self, nbytes: int) -> int:
        """Device bytes a resident weight of ``nbytes`` holds (:func:`allocated_bytes`)."""
        return allocated_bytes(nbytes, torch.device(self.config.device).type)

    def _blas_workspace(self) -> int:
        """cuBLAS's workspace for the stream the device parts run on (allocated at the first GEMM there,
        e.g. the profile's, and counted by torch's allocator like any tensor)."""
        device = torch.device(self.config.device)
        if device.type != "cuda":
            return 0
        return blas_workspace_bytes(
            torch.cuda.get_device_capability(device), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        )

    @property
    def job_overhead(self) -> float:
        """H: ``Config.job_overhead``, else that of the hardware model ProfilePass used (``meta.HARDWARE``),
        else the device kind's."""
        given = self.config.job_overhead
        if given is not None:
            return float(given)
        return (self._hardware or default_model(torch.device(self.config.device))).job_overhead

    @property
    def job_gap(self) -> float:
        """What one job fewer saves the CPU lane beyond H: the hardware model's ``job_gap`` (as for
        :attr:`job_overhead`), less H where H already counts part of it."""
        hardware = self._hardware or default_model(torch.device(self.config.device))
        return max(0.0, hardware.job_gap - self.job_overhead)

    def _alphas(self, sites: list[LinearSite], costs: dict[str, LinearCost]) -> dict[str, float]:
        """α of each Linear: the forced one, else its CPU job's, from ``costs``. A job is every Linear that
        reads one input, resident or not: α does not depend on the residency, which is chosen with it (the
        staging arena's size depends on α). So the Linears left in a job that lost members to residency keep
        the whole job's α: H weighs less on them than it would on a job of their own."""
        if self.config.alpha is not None:
            return {s.name: float(self.config.alpha) for s in sites}
        jobs: dict[fx.Node, list[LinearSite]] = {}
        for s in sites:
            jobs.setdefault(s.x, []).append(s)
        alphas = {}
        for members in jobs.values():
            alpha = job_alpha([costs[m.name] for m in members], self.job_overhead)
            alphas.update((m.name, alpha if alpha >= MIN_ALPHA else 0.0) for m in members)
        return alphas

    def _blocks(self, gm: fx.GraphModule, sites: list[LinearSite]) -> list[MLPBlock]:
        """The graph's MLP blocks where ``block_jobs`` may run them as one job (not beside a storage tier,
        whose rows are split by output rows): :func:`~hetegen_fx.blocks.find_blocks`, else none."""
        cfg = self.config
        return find_blocks(gm, sites) if cfg.block_jobs and cfg.cpu_memory is None else []

    def _form_blocks(
        self,
        blocks: list[MLPBlock],
        sites: list[LinearSite],
        layers: list[LayerPlan],
        reserved: dict[str, int],
        budget: int | None,
    ) -> None:
        """MLP blocks (``Config.block_jobs``, :mod:`hetegen_fx.blocks`), at GEMV shapes (a decode step): an MLP
        whose Linears are all offloaded runs as one CPU job, at the α that balances the three Linears
        together, where the lane model predicts it no slower than its two jobs apart (one job's overhead H
        and one wait for the device fewer, since the CPU no longer waits for the device's gate/up share);
        with ``alpha`` forced, every such MLP. Its column Linears must be the only offloaded readers of their
        input, and the staging arena must stay within the budget's room. Not with the storage tier (its rows
        are split by output rows), and not in a prefill, where the CPU parts are GEMMs the cost model is least
        sure of (and a split of its own would keep down's columns on the host a second time)."""
        cfg = self.config
        if not blocks or max((lp.tokens for lp in layers), default=0) > GEMV_ROWS:
            return
        limit = self._staging_limit(layers, reserved, budget)
        by_name = {lp.name: lp for lp in layers}
        costs = {s.name: s.node.meta[meta.COST] for s in sites}
        readers = Counter(s.x for s in sites if not by_name[s.name].resident)
        overhead, gap = self.job_overhead, self.job_gap
        for block in blocks:
            members = [by_name[s.name] for s in block.sites]
            if any(lp.resident for lp in members) or readers[block.columns[0].x] != len(block.columns):
                continue
            if cfg.alpha is not None:
                alpha = float(cfg.alpha)
            else:
                alpha, t_block = segment_alpha([costs[lp.name] for lp in members], overhead)
                apart = [members[:-1], members[-1:]]
                t_apart = sum(
                    segment_time([costs[lp.name] for lp in job], job[0].alpha, overhead) for job in apart
                ) + gap * max(0, sum(any(lp.split > 0 for lp in job) for job in apart) - 1)
                if t_block > t_apart * (1 + 1e-9):
                    continue
            if alpha < MIN_ALPHA:
                continue
            before = _saved(members)
            for lp in members:
                lp.block, lp.split_inputs, lp.alpha = block.head, lp is members[-1], alpha
                lp.split = split_row(alpha, lp.features)
            if self._staging(layers) > limit:  # a larger GPU part than the arena has room for: two jobs
                _restore(members, before)

    def _check_given_blocks(
        self, gm: fx.GraphModule, sites: list[LinearSite], layers: list[LayerPlan]
    ) -> None:
        """A saved plan's MLP blocks run as one job only where this graph has the block (a graph break may cut
        one, an MLP called twice has none), with one split over its Linears, the row Linear's by its input
        features, all of them offloaded (residency may have changed since), and no storage tier beside;
        any other is run as two jobs at its α."""
        found = {}
        if self.config.cpu_memory is None:
            found = {b.head: [s.name for s in b.sites] for b in find_blocks(gm, sites)}
        groups: dict[str, list[LayerPlan]] = {}
        for lp in layers:
            if lp.block:
                groups.setdefault(lp.block, []).append(lp)
        for head, members in groups.items():
            names = found.get(head)
            ok = (
                names is not None
                and sorted(lp.name for lp in members) == sorted(names)
                and not any(lp.resident for lp in members)
                and len({lp.split for lp in members}) == 1
                and [lp.name for lp in members if lp.split_inputs] == names[-1:]
            )
            if not ok:
                for lp in members:
                    lp.block, lp.split_inputs = "", False
                    lp.split = 0 if lp.resident else split_row(lp.alpha, lp.out_features)

    def _staging_limit(self, layers: list[LayerPlan], reserved: dict[str, int], budget: int | None) -> float:
        """The most bytes the staging arena may grow to: the budget's room beside the other reserves and the
        resident weights, or the arena as it is when that is already more."""
        room = math.inf
        if budget is not None:
            resident = sum(self._held(lp.bytes) for lp in layers if lp.resident)
            room = budget - sum(v for k, v in reserved.items() if k != "staging") - resident
        return max(room, self._staging(layers))

    def _stream_jobs(
        self, sites: list[LinearSite], layers: list[LayerPlan], reserved: dict[str, int], budget: int | None
    ) -> None:
        """Segments (see the module docstring): at GEMV shapes, walk the offloaded CPU jobs in graph order
        and stream a job (α = 0) into the *segment* of the CPU job before it (its head) when the lane model
        predicts the segment shorter than the two jobs apart, plus :attr:`job_gap` when the job had a CPU
        part: its copies then run while the head's CPU part does, and the head's α
        (:func:`~hetegen_fx.costs.segment_alpha`) rises to cover them. A merge is undone when the segment's GPU
        parts would not be in the staging arena at once (:meth:`_in_flight`), so its copies could not all
        overlap the head, or when the arena would grow beyond the budget's room. Only a job with a CPU part
        heads a segment, and heads that take no job keep their α."""
        if max((lp.tokens for lp in layers), default=0) > GEMV_ROWS:
            return  # a prefill: the CPU parts are compute-bound GEMMs, where the cost model is least sure
        by_name = {lp.name: lp for lp in layers}
        costs = {s.name: s.node.meta[meta.COST] for s in sites}
        jobs: dict[fx.Node | str, list[LayerPlan]] = {}  # an MLP block is one job (_form_blocks)
        for s in sites:
            lp = by_name[s.name]
            if not lp.resident:
                jobs.setdefault(lp.block or s.x, []).append(lp)
        overhead, gap = self.job_overhead, self.job_gap

        def device_lane(job: list[LayerPlan]) -> float:
            return sum(costs[lp.name].t_copy + costs[lp.name].t_gpu for lp in job)

        def has_cpu_part(job: list[LayerPlan]) -> bool:
            return any(lp.split > 0 for lp in job)

        def planned(job: list[LayerPlan]) -> float:
            """The job's time at the α the plan gave it (the whole job's, resident members included)."""
            alpha = next((lp.alpha for lp in job if lp.split > 0), 0.0)
            return segment_time([costs[lp.name] for lp in job], alpha, overhead)

        def share(job: list[LayerPlan], alpha: float, segment: str = "") -> None:
            for lp in job:
                if alpha == 0.0:  # streamed: a block's Linears are streamed whole, each by its output rows
                    lp.block, lp.split_inputs = "", False
                lp.alpha, lp.split, lp.segment = alpha, split_row(alpha, lp.features), segment

        limit = self._staging_limit(layers, reserved, budget)
        head: list[LayerPlan] = []  # the current segment: its head, then the jobs streamed into it
        streamed, t_segment = 0.0, 0.0  # seconds of copies streamed after the head; the segment's time
        for job in jobs.values():
            if any(lp.storage_rows for lp in job):  # its copies wait for storage reads: not streamed, no head
                head = []
                continue
            if head:
                alpha, t_merged = segment_alpha(
                    [costs[lp.name] for lp in head[0]], overhead, streamed + device_lane(job)
                )
                saved = gap if has_cpu_part(job) else 0.0
                if alpha >= MIN_ALPHA and t_merged < t_segment + planned(job) + saved:
                    before = _saved(head[0] + job)
                    share(head[0], alpha)
                    share(job, 0.0, head[0][0].name)
                    parts = [lp for j in head for lp in j] + job
                    if self._staging(layers) <= limit and self._in_flight(parts, layers):
                        head.append(job)
                        streamed, t_segment = streamed + device_lane(job), t_merged
                        continue
                    _restore(head[0] + job, before)
            head = [job] if has_cpu_part(job) else []
            streamed, t_segment = 0.0, planned(job)

    def _in_flight(self, parts: list[LayerPlan], layers: list[LayerPlan]) -> bool:
        """Whether the GPU parts of ``parts`` (consecutive in the copy order) can be in the staging arena at
        once, so that all their copies may run during the head's CPU part: with ``prefetch=k``, at most k of
        them (k consecutive parts are); with the default two halves, if their bytes fit the arena."""
        sizes = [-(-lp.gpu_part_bytes // STAGING_ALIGN) * STAGING_ALIGN for lp in parts if lp.gpu_part_bytes]
        if self.config.prefetch is not None:
            return len(sizes) <= self.config.prefetch
        return sum(sizes) <= self._staging(layers)

    def _priority(self, sites: list[LinearSite], blocks: Sequence[MLPBlock] = ()) -> dict[str, float]:
        """g of every Linear: its dtype's pooled CPU time per byte at one token, plus its share of its job's
        overhead per byte (see the module docstring). The Linears of an MLP block (``blocks``, with
        ``block_jobs``: :meth:`_blocks`) share one job (:meth:`_form_blocks`): a down projection is then not a
        job of its own, and the whole MLP is offloaded before a lone Linear elsewhere is."""
        job = {s.node: s.x for s in sites}  # Linears that read the same input share one CPU job
        for block in blocks:  # may still run as two jobs: _form_blocks decides
            job.update((s.node, block.head) for s in block.sites)
        sharing = Counter(job.values())
        decode = {s.name: s.node.meta.get(meta.DECODE_COST) or s.node.meta[meta.COST] for s in sites}
        alphas = self._alphas(sites, decode)
        pooled: dict[torch.dtype, list[float]] = {}  # dtype → [Σ T_cpu, Σ bytes]
        for s in sites:
            acc = pooled.setdefault(s.weight.tensor.dtype, [0.0, 0])
            acc[0] += decode[s.name].t_cpu
            acc[1] += s.weight_bytes
        g = {}
        for s in sites:
            t, nbytes = pooled[s.weight.tensor.dtype]
            overhead = (
                self.job_overhead / sharing[job[s.node]]
                if split_row(alphas[s.name], s.out_features) > 0
                else 0.0
            )
            g[s.name] = t / max(nbytes, 1) + overhead / max(s.weight_bytes, 1)
        return g

    def _staging(self, layers: list[LayerPlan]) -> int:
        """The staging arena for ``prefetch`` consecutive GPU parts, in graph order (PartitionPass lays the
        parts out in the order it emits them, a CPU job's Linears together: the same order in practice)."""
        return staging_size([lp.gpu_part_bytes for lp in layers], self.config.prefetch)

    def _check_later_graph(
        self, layers: list[LayerPlan], reserved: dict[str, int], budget: int | None
    ) -> None:
        """Residency is chosen with the model's first graph and its staging arena. A later graph whose GPU
        parts are larger (a prefill placed after the decode graph, its α floored to 0) needs a larger arena,
        which the runtime grows beyond the budget: say so, and what to change. (A warning, not an error: the
        graph is compiled in the middle of the caller's generate, and the overshoot is one arena's growth.)"""
        if budget is None:
            return
        resident = sum(self._held(lp.bytes) for lp in layers if lp.resident)
        total = sum(reserved.values()) + resident
        if total > budget:
            warnings.warn(
                f"hetegen: the graph {self.label + ' ' if self.label else ''}"
                f"({max((lp.tokens for lp in layers), default=0)} tokens) needs a "
                f"staging arena of {format_bytes(reserved['staging'])} for its GPU parts, "
                f"{format_bytes(reserved.get('other_params', 0))} of other parameters and "
                f"{format_bytes(reserved.get('kv_cache', 0))} of KV cache; with the weights the "
                f"model's first graph made resident ({format_bytes(resident)}) and the reserves, that is "
                f"{format_bytes(total)}, over gpu_memory {format_bytes(budget)}. Raise gpu_memory by "
                f"{format_bytes(total - budget)}, set prefetch=1 (an arena of one GPU part), run the "
                "longest input first (HF's generate does: its prefill is compiled before the decode step), "
                "or keep to the KV cache of the first call (kv_cache='dynamic' at compile time if later "
                "calls pass a DynamicCache)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _ledger(
        self,
        layers: list[LayerPlan],
        reserved: dict[str, int],
        budget: int | None,
        priority: dict[str, float],
    ) -> Ledger:
        """The model's memory ledger: the reserves, the KV cache, and each Linear's bytes resident, its GPU
        part offloaded (at its α) and its priority g."""
        from hetegen_fx.checkpoint import source_of

        # under a storage tier a Linear offloaded may stage every row (those in storage go to the device)
        whole = (
            {n for n, ts in self._tensors.items() if source_of(ts[0]) is not None}
            if self.config.cpu_memory
            else set()
        )
        entries = [
            LedgerLayer(
                lp.name,
                self._held(lp.bytes),
                lp.bytes if lp.name in whole else lp.offloaded_gpu_bytes,
                priority[lp.name],
            )
            for lp in layers
        ]
        reserves = {k: v for k, v in reserved.items() if k != "kv_cache"}
        return Ledger(budget, reserves, reserved.get("kv_cache", 0), entries, self.config.prefetch)

    def _from_given(self, gm: fx.GraphModule, sites: list[LinearSite]) -> Plan:
        given = self.given
        by_name = {lp.name: lp for lp in given.layers}
        missing = [s.name for s in sites if s.name not in by_name]
        if missing:
            raise ConfigError(
                f"the plan has no entry for Linear(s) {missing[:5]}{' …' if len(missing) > 5 else ''}; "
                "it was made for another model — compile without plan= to make a new one"
            )
        layers = []
        for s in sites:
            lp = LayerPlan(**{**by_name[s.name].__dict__})
            if (lp.out_features, lp.in_features) != (s.out_features, s.in_features):
                raise ConfigError(
                    f"plan entry {s.name} is {lp.out_features}x{lp.in_features} but the model's Linear is "
                    f"{s.out_features}x{s.in_features}; the plan was made for another model"
                )
            dtype = str(s.weight.tensor.dtype).removeprefix("torch.")
            if lp.dtype != dtype:
                raise ConfigError(
                    f"plan entry {s.name} was made for {lp.dtype} weights but the model's are {dtype}: load the "
                    f"model with dtype=torch.{lp.dtype}, or compile without plan= to make a new plan"
                )
            layers.append(lp)
        budget = self.config.gpu_memory
        needs = sum(lp.bytes for lp in layers if lp.resident) + sum(given.reserved.values())
        if budget is not None and given.gpu_memory != budget and needs > budget:
            raise ConfigError(
                f"the plan was made for gpu_memory {format_bytes(given.gpu_memory) if given.gpu_memory else 'unlimited'} "
                f"and needs {format_bytes(needs)} (resident weights and reserves), over the gpu_memory "
                f"{format_bytes(budget)} given now: leave gpu_memory out to use the plan's, or compile without "
                "plan= to place the model under the new budget"
            )
        if self.store.residency is not None:  # the model's residency now (it may have changed since the plan)
            for lp in layers:
                resident = self.store.residency.get(lp.name, lp.resident)
                if resident and not lp.resident:
                    lp.alpha, lp.split = 0.0, 0
                lp.resident = resident
        self._check_given_blocks(gm, sites, layers)
        reserved = dict(given.reserved)
        tables = [t for t in given.host_tables if t in host_tables(gm.graph)]
        if tables and not self.config.host_embeddings:  # asked to keep them on the device: reserve them there
            tables = []
            reserved["other_params"] = max(reserved.get("other_params", 0), other_param_bytes(gm, sites))
            self._check_later_graph(layers, reserved, given.gpu_memory)
        if self.store.residency is None:
            model_reserved = {k: v for k, v in reserved.items() if k != "staging"}
            # the ledger of a given plan: g from its costs, so that set_gpu_memory and a growing cache work too
            priority = {lp.name: lp.t_cpu / max(lp.bytes, 1) for lp in layers}
            ledger = self._ledger(
                layers, model_reserved, budget if budget is not None else given.gpu_memory, priority
            )
            ledger.residency = {lp.name: lp.resident for lp in layers}
            gm.meta[meta.LEDGER] = (ledger, model_reserved)
        gm.meta[meta.TENSORS] = self._tensors = _tensors(sites)
        # with cpu_memory, the storage tier as for a placed model (the plan's splits kept, within the ring)
        storage = self._storage_tier(gm, sites, layers)
        if storage:
            reserved["staging"] = self._staging(layers)
        return Plan(
            device=self.config.device,
            gpu_memory=given.gpu_memory if budget is None else budget,  # a given budget the plan fits
            tokens=given.tokens,
            layers=layers,
            reserved=reserved,
            source="plan",
            host_tables=tables,
            storage=storage,
        )


def _ring_fits(sites: list[LinearSite], layers: list[LayerPlan], slots: int) -> None:
    """A CPU job (the offloaded Linears that read one input) whose CPU part reads ring rows takes all of its
    storage parts before it is queued and holds their slots until it is done: where it has more storage
    parts than the ring has ``slots``, its Linears' CPU parts keep to their RAM rows."""
    by_name = {lp.name: lp for lp in layers}
    jobs: dict[fx.Node, list[LayerPlan]] = {}
    for s in sites:
        lp = by_name[s.name]
        if not lp.resident:
            jobs.setdefault(s.x, []).append(lp)
    for job in jobs.values():
        ring = [lp for lp in job if lp.storage_rows]  # all fetched before the job (PartitionPass)
        if len(ring) > slots and any(lp.split > lp.out_features - lp.storage_rows for lp in ring):
            for lp in ring:
                lp.split = min(lp.split, lp.out_features - lp.storage_rows)
                lp.alpha = lp.split / lp.out_features


#: what PlacementPass._form_blocks and _stream_jobs change of a Linear's plan, and put back where the change
#: does not fit the staging arena
_SPLIT_FIELDS = ("alpha", "split", "segment", "block", "split_inputs")


def _saved(layers: list[LayerPlan]) -> list[tuple]:
    return [tuple(getattr(lp, f) for f in _SPLIT_FIELDS) for lp in layers]


def _restore(layers: list[LayerPlan], saved: list[tuple]) -> None:
    for lp, values in zip(layers, saved, strict=True):
        for f, v in zip(_SPLIT_FIELDS, values, strict=True):
            setattr(lp, f, v)
