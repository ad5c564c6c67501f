"""CUDA graphs for the stretches of a partitioned graph that run on the device alone.

Owns: where a compiled graph is cut into stretches, their recording and replay, and each model's
:class:`GraphPool`. Must not: change what a graph computes or its order, or grow a pool past its budget.

A 7B decode step is some 3500 graph nodes, launched one by one from Python at 14-40 µs a node, and on the
H100 host the launching thread fell behind the device (docs/benchmarks-history.md, 2026-11-22, commit
bd15813). Most of those nodes are device work between two hand-offs (the norms, rotary embedding, cache update and attention of a layer
whose Linears are resident, the concatenations after a split). A *stretch* is a run of at least
:data:`MIN_NODES` such calls with nothing else between them; :func:`fuse_stretches` moves each one into a
:class:`Stretch` submodule, which records it once as a CUDA graph and then replays it with one launch.

Opt-in (``Config.cuda_graphs``). Measured on the H100 host (2026-11-22, commit 7605416): a fully resident 7B
decode step, one stretch, took 12.1 ms replayed against 26.4 ms launched op by op; a 7B step split at 6 GiB, half
of its calls replayed from 58 graphs, took as long as without them (the CPU jobs and copies set its pace).

What a replay needs, and how a Stretch provides it:

* **the same shapes**: a graph is recorded per *key* (the inputs' shapes, strides, dtypes and devices, and
  its other arguments). A key is first run eagerly (warm-up: lazy kernel loading, cuBLAS handles); it is
  recorded at its second call. Decode steps with a static KV cache repeat their keys; a growing cache (HF's
  DynamicCache) never does, and its stretches run eagerly;
* **the same input addresses**: an input is either *copied* into a buffer the graph owns at every replay
  (small activations; copied back out after the replay if the stretch changes it, found at warm-up by
  version counters), or read *in place*: inputs an output is a view of, inputs that share memory with
  another input, large ones (a KV cache, a staged weight part), expanded ones, and outputs of other
  recorded stretches (their memory is the graph pool's for good). An in-place input at another address at
  replay runs the stretch eagerly, and the key is recorded again at its next call (a graph keeps no
  reference to it, so a KV cache the caller dropped is freed). Keys with an input on the host (a graph
  would keep its value) or a tuple output run eagerly;
* **outputs that live until the next replay**: a replay writes the same output buffers; outputs that leave
  the graph (its results, state parked on the device) are cloned;
* **memory**: the stretches of a model record into one :class:`GraphPool`, in step order into one CUDA
  memory pool; a recording out of step order (a graph recorded again, a key first seen late) starts a
  new memory pool, since graphs sharing one are only safe replayed in the order they were recorded
  (:meth:`GraphPool.record`). Recording stops once the pools have grown by the ``graph_memory`` budget
  (PlacementPass reserves it), and a key whose copied inputs and outputs exceed :data:`GRAPH_IO_BYTES` (a
  prefill) is never recorded, nor one whose recording would keep more than the pool's budget (a recorded
  body keeps every value it makes, :func:`kept_bytes`): a whole resident step returns one token's logits
  at any prompt length, and a 7B's at a 512-token prompt, recorded, took 6 GB of a pool of 128 MiB on the
  H100 host (2026-12-07); nothing was recorded after it. A graph recorded again (its in-place inputs
  moved) keeps the old one until the pool goes (:meth:`GraphPool.retire` says why), so recording for a new
  KV cache at every generate call fills the budget after a few calls (with CUDA graphs, ``generate()`` of a
  compiled model hands its cache on to the next call, :class:`hetegen_fx.api._HeldCache`, unless the caller
  keeps it).

With ``Config.compile_stretches``, a stretch's key is compiled by inductor at its second call
(:mod:`hetegen_fx.inductor`), with or without CUDA graphs; a graph then records inductor's code, after it
ran once outside the recording.

A stretch that cannot be recorded (an op that synchronises with the host, say) runs eagerly from then on.
On the emulated device ("cpu") a "graph" keeps the same buffers and replays by running the stretch on its
own inputs and copying the results into its own outputs, so the logic above is exercised without a GPU.
"""

from __future__ import annotations

import functools
import gc
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import meta, ops
from .graph_utils import _is_view, _writes_first, concrete, node_value, writers_of
from .inductor import COMPILE_AFTER, StretchCompiler
from .runtime import clear_blas_workspaces, embed_on_host, park, to_device, write_back

#: calls a stretch must hold to be recorded: a replay and its input copies cost about as much as 2-3 launches
MIN_NODES = 4
#: inputs up to this size are copied into the graph's own buffers at each replay; larger ones are read in place
COPY_BYTES = 1 << 20
#: a key whose copied inputs and outputs together exceed this is not recorded (prefill-sized activations)
GRAPH_IO_BYTES = 2 << 20
#: keys a stretch tracks; beyond them (shapes that never repeat) new keys just run eagerly
MAX_KEYS = 16
#: times one key may be recorded again after its in-place inputs moved ...
MAX_RECORDINGS = 8
#: ... unless its graph replayed this many times since (a new KV cache per generate call moves them each call)
STABLE_REPLAYS = 16

#: the caching allocator's segment for small blocks: a recording that needs memory grows its pool by this much
SEGMENT = 2 << 20
#: the graphs' memory pool by default: 1/16 of the GPU budget, at most this
DEFAULT_GRAPH_MEMORY = 128 << 20
#: a default pool smaller than this records nothing: the recording stream's cuBLAS workspace alone takes
#: 32 MiB on an H100
MIN_GRAPH_MEMORY = 48 << 20

#: methods that bring a device value to the host: a graph cannot hold them
_HOST_METHODS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"})
#: sides of PartitionPass nodes that are not device work (the CPU part, copies, stream synchronisation)
_NOT_DEVICE = frozenset({"cpu", "copy", "sync", "host"})


def enabled(config) -> bool:
    """Whether ``config`` (a :class:`hetegen_fx.Config`) records CUDA graphs (emulated ones on "cpu")."""
    return bool(config.cuda_graphs)


def reserve(config, budget: int | None) -> int:
    """Bytes PlacementPass keeps free for the graphs' memory pool under ``config`` and ``budget``."""
    if not enabled(config):
        return 0
    if config.graph_memory is not None:
        return config.graph_memory
    want = DEFAULT_GRAPH_MEMORY if budget is None else min(DEFAULT_GRAPH_MEMORY, budget // 16)
    return want if want >= MIN_GRAPH_MEMORY else 0


@functools.cache
def _runtime_calls() -> frozenset:
    calls = {to_device, write_back, park, embed_on_host, *ops.DIRECT, *ops.DIRECT.values()}
    calls |= {op.overloadpacket for op in ops.DIRECT}
    return frozenset(calls)


def capturable(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is device work a CUDA graph can hold (not a hand-off, copy, sync or host read)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.meta.get(meta.SIDE) in _NOT_DEVICE or node.target in _runtime_calls():
        return False
    if node.op == "call_method":
        return node.target not in _HOST_METHODS
    if node.op == "call_module":  # a module without state (fx keeps activations as modules)
        mod = gm.get_submodule(node.target)
        return next(mod.parameters(), None) is None and next(mod.buffers(), None) is None
    return node.target is not torch.ops.aten._local_scalar_dense.default


def find_stretches(gm: fx.GraphModule, min_nodes: int = MIN_NODES) -> list[list[fx.Node]]:
    """The runs of at least ``min_nodes`` capturable calls with no other call between them, in order
    (``get_attr`` nodes between them belong to no run and break none)."""
    runs: list[list[fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if capturable(node, gm):
            runs[-1].append(node)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) >= min_nodes]


def _escapes(node: fx.Node, members: set[fx.Node]) -> bool:
    """Whether ``node``'s value, or a view of it, leaves the graph (an output, or state parked on the device):
    a replay would overwrite it while the caller still holds it."""
    todo, seen = [node], {node}
    while todo:
        for user in todo.pop().users:
            if user.op == "output" or user.target is park:
                return True
            if user in seen or user in members:
                continue
            if user.target in (operator.getitem, to_device) or _is_view(user):
                seen.add(user)
                todo.append(user)
    return False


def fuse_stretches(
    gm: fx.GraphModule,
    pool: GraphPool | None,
    min_nodes: int = MIN_NODES,
    compiler: StretchCompiler | None = None,
    owner: str = "",
) -> list[fx.Node]:
    """Replace each stretch of ``gm`` by a call of a :class:`Stretch` submodule (in place); return those calls.

    ``pool`` is where they record their graphs, ``compiler`` what compiles them (:mod:`hetegen_fx.inductor`;
    ``owner`` names ``gm`` in its progress line); with neither they run eagerly, which only regroups the code.
    """
    stretches = find_stretches(gm, min_nodes)
    in_any = {n for run in stretches for n in run}
    calls = []
    for i, run in enumerate(stretches):
        members = set(run)
        body, inputs, outputs = _extract(run, members)
        ordering = [u for n in run for u in n.users if u.target is write_back and u not in members]
        escaping = tuple(_escapes(o, in_any) for o in outputs)
        name = f"stretch_{i}"
        keep = _keep_all(body)
        stretch = Stretch(
            fx.GraphModule(gm, body, class_name="StretchBody"),
            escaping,
            pool,
            fx.GraphModule(gm, keep, class_name="StretchRecording"),
            compiler,
            owner,
        )
        gm.add_submodule(name, stretch)
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(name, tuple(inputs))
            call.meta[meta.SIDE] = "gpu"
            with gm.graph.inserting_after(call):
                for k, o in enumerate(reversed(outputs)):  # inserted after `call`, so built last to first
                    item = gm.graph.call_function(operator.getitem, (call, len(outputs) - 1 - k))
                    item.meta.update(o.meta)
                    o.replace_all_uses_with(item)
            for wb in dict.fromkeys(ordering):  # after a writer inside, so after the call: in graph order
                wb.args = (*wb.args[:2], *(a for a in wb.args[2:] if a not in members))
        for node in reversed(run):
            gm.graph.erase_node(node)
        calls.append(call)
    gm.graph.lint()
    gm.recompile()
    return calls


def _extract(run: list[fx.Node], members: set[fx.Node]) -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """A graph of the nodes of ``run``, with their inputs from elsewhere as placeholders (attributes they
    read as its own ``get_attr``) and what is read elsewhere as its outputs; and those inputs and outputs."""
    inputs: list[fx.Node] = []
    for node in run:
        for a in node.all_input_nodes:
            if a not in members and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    outputs = [n for n in run if any(u not in members and not _orders_only(u, n) for u in n.users)]
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: body.placeholder(a.name) for a in inputs}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr: the body reads the same attribute
            env[a] = body.get_attr(a.target)
        return env[a]

    for node in run:
        env[node] = body.node_copy(node, arg)
    body.output(tuple(env[o] for o in outputs))
    return body, inputs, outputs


def kept_bytes(body: fx.GraphModule, args: tuple | None = None) -> int:
    """What a graph recorded from ``body``'s :func:`_keep_all` form holds: the bytes of every value its calls
    make (views and in-place results excluded). Given ``args`` (a key's arguments), the body is run on fake
    tensors of their shapes, without memory; else, or where that fails, the shapes recorded when the graph
    was captured are read (a lower bound: a call without a recorded value counts only if it is a Linear). A
    whole resident 7B step keeps gigabytes at a 512-token prompt (every layer's activations), about 10 MiB
    at one token."""
    if args is not None:
        try:
            return _kept_at(body, args)
        except Exception:  # noqa: BLE001  (an op without a fake kernel: the recorded shapes instead)
            pass
    total = 0
    for node in body.graph.nodes:
        if _new_value(node):
            values = node_value(node)
            if values is None and node.target is torch.nn.functional.linear:
                values = _linear_value(body, node)
            total += _nbytes(values)
    return total


def _new_value(node: fx.Node) -> bool:
    """Whether ``node`` is a call whose result is memory of its own (not a view, an item or an in-place write)."""
    return (
        node.op in ("call_function", "call_method", "call_module")
        and node.target is not operator.getitem
        and not _is_view(node)
        and not _writes_first(node)
    )


def _nbytes(values) -> int:
    return sum(
        v.element_size() * functools.reduce(operator.mul, map(concrete, v.shape), 1)
        for v in (values if isinstance(values, (tuple, list)) else (values,))
        if isinstance(v, torch.Tensor)
    )


def _kept_at(body: fx.GraphModule, args: tuple) -> int:
    """:func:`kept_bytes` of ``body`` called with ``args``, counted while it runs on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    total = 0

    class Count(fx.Interpreter):
        def run_node(self, n: fx.Node):
            nonlocal total
            out = super().run_node(n)
            if _new_value(n):
                total += _nbytes(out)
            return out

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, torch.no_grad():
        Count(body).run(*fake)
    return total


def _linear_value(body: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """A meta tensor of the shape a ``linear`` call (PartitionPass writes them without values) returns."""
    x = node_value(node.args[0] if node.args else node.kwargs.get("input"))
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        w = getattr(body, w.target, None)
    else:
        w = node_value(w)
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return None
    return torch.empty((*map(concrete, x.shape[:-1]), w.shape[0]), dtype=x.dtype, device="meta")


def _orders_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` takes ``node`` only to run after it: a :func:`write_back` that copies an input back to
    the host after ``node`` changed it in place. Nothing moves a stretched graph's nodes any more, and the
    write-back comes after the stretch's call, so ``node`` is dropped from its arguments rather than made an
    output. As an output it would alias that input, which a recording then reads in place; the input is a
    new device copy whenever the host's tensor changed (an HF StaticCache's length counter, reset by each
    generate), so every generate recorded the graph again. (Nor does the write-back take the call itself:
    that would keep all of the stretch's outputs alive until the end of the graph, a layer's activations
    at a prefill.)"""
    if user.target is not write_back:
        return False
    written = [a for arg in user.args[:2] for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
    return node not in written and node not in user.kwargs.values()


def _keep_all(body: fx.Graph) -> fx.Graph:
    """``body`` returning, after its outputs, every value it computes. Recorded from this, a graph frees none
    of its values while it is recorded, so no later recording in the shared pool places its tensors where
    this graph keeps them. (That alone did not make an out-of-order recording safe: the temporaries inside
    a kernel call are freed all the same; :meth:`GraphPool.record` starts a new memory pool for those.)"""
    keep = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in body.nodes:
        if node.op == "output":
            values = [env[n] for n in body.nodes if n.op in ("call_function", "call_method", "call_module")]
            keep.output((fx.map_arg(node.args[0], env.__getitem__), tuple(values)))
        else:
            env[node] = keep.node_copy(node, env.__getitem__)
    return keep


@dataclass
class GraphPool:
    """Where the stretches of one model record their graphs: one memory pool on ``device`` and a budget of
    ``limit`` bytes for its growth (``None``: unlimited). Created at compile time; nothing on the device is
    touched before the first recording."""

    device: torch.device
    limit: int | None = None
    #: bytes the pool grew by while recording (CUDA: reserved memory before against after)
    used: int = 0
    recorded: int = 0
    replays: int = 0
    failed: int = 0
    full: bool = False
    _handle: object = None
    _stream: object = None
    _static: set[int] = field(default_factory=set)  # data pointers of recorded graphs' outputs
    _largest: int = 0  # the most one recording grew the pool by
    #: memory pools recorded into so far (see :meth:`record`: a recording out of call order starts one)
    pools: int = 0
    _last_order: int = -1  # the call order (:attr:`Stretch.order`) of the latest recording in the pool
    stretches: list = field(default_factory=list, repr=False)  # every Stretch recording here
    _retired: list = field(default_factory=list, repr=False)  # graphs dropped, kept while the pool lives
    #: input name → times a recorded graph found that pinned input at another address
    moved: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.full = self.limit is not None and self.limit <= 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def stats(self) -> dict:
        """Counts so far: graphs recorded and replayed, the pool's growth, and what became of the stretches'
        keys (see :meth:`Stretch.report`)."""
        reports = [s.report() for s in self.stretches]
        eager: dict[str, int] = {}
        for r in reports:
            for why, n in r["eager"].items():
                eager[why] = eager.get(why, 0) + n
        return {
            "stretches": len(reports),
            "calls_in_stretches": sum(r["calls"] for r in reports),
            "keys": sum(r["keys"] for r in reports),
            "recorded": self.recorded,
            "graphs_kept": sum(r["recorded"] for r in reports),
            "replays": self.replays,
            "failed": self.failed,
            "eager_keys": eager,
            "pool_bytes": self.used,
            "full": self.full,
            "memory_pools": self.pools,
            "pinned_inputs_moved": dict(sorted(self.moved.items(), key=lambda kv: -kv[1])[:8]),
        }

    def record(self, body: fx.GraphModule, own: list, live: tuple, order: int) -> _Graph:
        """Record ``body`` as a graph on the graph's own inputs ``own``, where ``None`` stands for the input
        read in place from ``live``, the call's arguments (its outputs are computed by its first replay).

        ``order`` is the stretch's place in the step (:attr:`Stretch.order`). Graphs that share a memory
        pool are only safe replayed in the order they were recorded: a later recording may put its outputs
        where an earlier graph keeps the temporaries of its kernels (softmax, attention, a GEMM's), and if
        it runs first in the step that graph's replay overwrites them. A recording whose order is not past
        the latest one's (a graph recorded again because its KV cache moved, a key first seen late) so
        starts a new memory pool; the old graphs keep theirs."""
        if self.pools and order <= self._last_order:
            self.pools += 1
            if self.is_cuda:
                self._handle = torch.cuda.graph_pool_handle()
        if not self.is_cuda:
            self.pools, self._last_order = max(self.pools, 1), order
            return _EmulatedGraph(body, own)
        args = [a if o is None else o for a, o in zip(live, own, strict=True)]
        if self._handle is None:
            self._start()
            if self.full:
                raise _NoRoom
            self.pools = 1
        self._last_order = order
        current = torch.cuda.current_stream(self.device)
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(current)  # the inputs' values are queued on the current stream
        collect = gc.isenabled()
        gc.disable()  # a collection inside the capture could run finalizers that make CUDA calls a capture
        try:  # forbids (unpinning a dead model's weights); torch.cuda.graph collects first, too slow per stretch
            with torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._handle, capture_error_mode="thread_local")
                try:
                    out, kept = body(*args)
                finally:
                    graph.capture_end()
        finally:
            if collect:
                gc.enable()
            current.wait_stream(self._stream)
            grown = max(0, torch.cuda.memory_reserved(self.device) - before)
            self.used += grown
            self._largest = max(self._largest, grown)
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        kept = [
            t for t in kept if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        ]
        return _Graph(graph.replay, tuple(out), (graph, kept))  # views of inputs are not kept: they keep
        # the inputs (a KV cache the caller dropped) alive

    def retire(self, graph: _Graph) -> None:
        """Stop replaying ``graph``, but keep it (and its memory) while the pool lives. Two reasons:

        * a pool whose last graph is freed is gone, and recording into its handle again fails an assertion
          in the caching allocator (seen when the only graph, a whole resident decode step, was recorded
          again for a new KV cache);
        * torch (since pytorch/pytorch#175276) frees the cuBLAS workspace of the stream a CUDA graph was
          captured on when that graph is destroyed, although every other graph captured there still uses it
          (pytorch/pytorch#193402, open): all of a pool's graphs are captured on one stream, so freeing a
          retired graph would leave the others' GEMMs writing into memory given out again. (The static-cache
          graph test's intermittent wrong tokens, first blamed on this, came from the shared memory pool's
          order: see :meth:`record`; docs/benchmarks-history.md, 2026-11-22, commit 63e61b2.)

        What the kept graphs hold counts against the pool's budget (:attr:`used` only grows), so recording
        stops once they fill it."""
        self._retired.append(graph)

    def room(self, nbytes: int) -> bool:
        """Whether one more recording, holding ``nbytes`` of outputs and copied inputs, fits the budget (a
        guess: the most a recording grew the pool by so far, or those bytes in whole 2 MiB segments)."""
        if self.limit is not None and not self.full:
            guess = max(self._largest, -(-nbytes // SEGMENT) * SEGMENT) if self.is_cuda else 0
            self.full = self.used + guess > self.limit
        return not self.full

    def _start(self) -> None:
        """Make the pool and the stream graphs are recorded on. cuBLAS gives each stream a workspace of its own
        (32 MiB on an H100): it is made now, by one GEMM outside any recording, and counts as the pool's."""
        self._handle = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            a = torch.ones(8, 8, device=self.device, dtype=torch.float16)
            (a @ a).sum()
            del a
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self.used += max(0, torch.cuda.memory_reserved(self.device) - before)
        if self.limit is not None and self.used > self.limit:
            self.full = True
            clear_blas_workspaces(self.device)  # give the workspace back

    def note_outputs(self, outs: tuple) -> None:
        self._static.update(o.data_ptr() for o in outs if isinstance(o, torch.Tensor))

    def is_static(self, t: torch.Tensor) -> bool:
        return t.data_ptr() in self._static


@dataclass
class _Graph:
    """A recorded stretch: ``replay()`` writes ``outputs`` (the same tensors every time)."""

    replay: object
    outputs: tuple
    keep: object = None  # the torch.cuda.CUDAGraph whose replay this is, and the tensors it writes
    live: tuple | None = None  # during a replay: the call's arguments (an emulated graph's pinned inputs)
    pinned: set = field(default_factory=set)  # storages of the inputs it reads in place
    clone: tuple | None = None  # per output: hand out a copy (set at the first replay)


class _EmulatedGraph(_Graph):
    """A recorded stretch on the emulated device: its own output buffers, filled at each replay by running
    the stretch on its own input buffers and the pinned inputs (what a CUDA graph's replay does, without
    one). An output that is a view of an input stays one, as in a CUDA graph (of the current pinned input,
    which is at the recorded address)."""

    def __init__(self, body: fx.GraphModule, args: list) -> None:
        super().__init__(self._replay, ())
        self.body, self.args = body, list(args)
        self._first = True

    def _replay(self) -> None:
        args = [a if own is None else own for own, a in zip(self.args, self.live, strict=True)]
        new = self.body(*args)[0]
        if self._first:  # a CUDA graph's outputs exist from its recording; these from the first replay
            self._first = False
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self._views = [
                isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in inputs for o in new
            ]
            with torch.inference_mode(False):  # a CUDA graph writes its outputs in and out of inference mode
                self.outputs = tuple(
                    o.clone() if isinstance(o, torch.Tensor) and not view else o
                    for o, view in zip(new, self._views, strict=True)
                )
            return
        for mine, o, view in zip(self.outputs, new, self._views, strict=True):
            if isinstance(mine, torch.Tensor) and not view:
                mine.copy_(o)
        if any(self._views):
            self.outputs = tuple(
                o if view else mine for mine, o, view in zip(self.outputs, new, self._views, strict=True)
            )


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded tensor): a copy of it cannot keep its strides."""
    need = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1):
        if stride < need:
            return True
        need = stride * size
    return False


class _NoRoom(Exception):
    """The pool's budget does not hold the recording stream's own needs."""


#: how a recorded graph gets an input: copied into its own buffer at each replay; copied in and, since the
#: stretch changes it, back out after the replay; or read in place (its address must not change)
COPY, COPY_BACK, PIN = 0, 1, 2


class _Key:
    """One key's state: seen once (warm), recorded, or eager for good (``eager`` says why)."""

    __slots__ = (
        "warm",
        "modes",
        "out_bytes",
        "graph",
        "copied",
        "back",
        "copied_own",
        "back_own",
        "pinned",
        "recordings",
        "replays",
        "eager",
        "seen",
        "program",
        "program_ran",
        "kept",
    )

    def __init__(self) -> None:
        self.warm = False  # run eagerly once with the current inputs' addresses: record at the next call
        self.kept: int | None = None  # what a recording of the body would keep (kept_bytes), once asked
        self.modes: list[int | None] = []  # per input: COPY, COPY_BACK, PIN, or None (not a tensor)
        self.out_bytes = 0
        self.graph: _Graph | None = None
        self.copied: list[int] = []  # indices of inputs copied in (COPY and COPY_BACK)
        self.back: list[int] = []  # indices of inputs copied back out (COPY_BACK)
        self.copied_own: list = []  # the graph's buffers of the inputs copied in, and of those copied back
        self.back_own: list = []
        self.pinned: list[tuple[int, int]] = []  # (index, data pointer) of inputs read in place
        self.recordings = 0  # since the graph last replayed STABLE_REPLAYS times in a row
        self.replays = 0  # since the last recording
        self.eager = ""
        self.seen = 0  # calls of this key
        self.program = (
            None  # what runs it: the body, or inductor's code for it (from its COMPILE_AFTER-th call)
        )
        self.program_ran = False  # inductor's code ran once outside a recording (its lazy set-up is done)


class Stretch(torch.nn.Module):
    """A stretch of device work, recorded as a CUDA graph per input key and replayed (see the module
    docstring). ``escaping[i]``: output ``i`` leaves the graph, so a replay hands back a copy of it;
    ``recording`` is ``body`` returning every value it computes as well (see :func:`_keep_all`). With a
    ``compiler``, a key is run by inductor's code for it from its :data:`~hetegen_fx.inductor.COMPILE_AFTER`-th
    call, and that code is what a graph records (after it ran once outside the recording)."""

    def __init__(
        self,
        body: fx.GraphModule,
        escaping: tuple[bool, ...],
        pool: GraphPool | None,
        recording: fx.GraphModule | None = None,
        compiler: StretchCompiler | None = None,
        owner: str = "",
    ) -> None:
        super().__init__()
        self.body = body
        self.recording = recording
        self.escaping = escaping
        self.pool = pool
        self.compiler = compiler
        self.owner = owner
        self.refused = False  # inductor refused one of its keys: the others run op by op too
        self.calls = sum(
            1 for n in body.graph.nodes if n.op in ("call_function", "call_method", "call_module")
        )
        placeholders = list(body.graph.find_nodes(op="placeholder"))
        self.inputs = [n.name for n in placeholders]
        #: inputs the body changes in place (directly or through a view), by its own ops: what is copied back
        #: where the inputs keep no version counter (inference tensors)
        self.mutated = frozenset(i for i, n in enumerate(placeholders) if writers_of(n))
        self._keys: dict[tuple, _Key] = {}
        #: its place in the step: stretches are made in graph order, and each runs once a step
        self.order = -1
        if pool is not None:
            self.order = len(pool.stretches)
            pool.stretches.append(self)

    def report(self) -> dict:
        """What became of this stretch's keys: recorded, eager (and why), or seen once."""
        states = list(self._keys.values())
        eager: dict[str, int] = {}
        for k in states:
            if k.eager:
                eager[k.eager] = eager.get(k.eager, 0) + 1
        return {
            "calls": self.calls,
            "keys": len(states),
            "recorded": sum(k.graph is not None for k in states),
            "recordings": sum(k.recordings for k in states),
            "eager": eager,
        }

    def _program(self, state: _Key, args: tuple):
        """What runs a call of ``state``'s key: inductor's code for it once the key came
        :data:`~hetegen_fx.inductor.COMPILE_AFTER` times (compiled now, if not yet), else the body."""
        if self.compiler is None or state.seen < COMPILE_AFTER:
            return self.body
        if state.program is None:
            if self.refused:  # inductor refused another key of this stretch: its ops will not change
                state.program = self.body
            else:
                state.program = self.compiler.compile(self.body, args, self.owner) or self.body
                self.refused = state.program is self.body
        return state.program

    def forward(self, *args):
        pool = self.pool
        if (pool is None and self.compiler is None) or torch.is_grad_enabled():
            return self.body(*args)
        key = tuple(
            (a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args
        )
        try:
            state = self._keys.get(key)
        except TypeError:  # an argument that cannot be a key (a list): never recorded or compiled
            self.pool = self.compiler = None
            return self.body(*args)
        if state is None:
            if len(self._keys) >= MAX_KEYS:
                return self.body(*args)
            state = self._keys[key] = _Key()
        state.seen += 1
        if pool is None:
            return self._program(state, args)(*args)
        graph = state.graph
        if graph is not None:
            for i, ptr in state.pinned:
                if args[i].data_ptr() != ptr:  # an in-place input moved: eager now, recorded again next time
                    pool.retire(graph)
                    state.graph, state.warm = None, False
                    moved = pool.moved
                    name = self.inputs[i]
                    moved[name] = moved.get(name, 0) + 1
                    return self._warm(state, args)
            if state.copied:  # one multi-tensor kernel each way, not a copy per input (32 counters of a 7B)
                torch._foreach_copy_(state.copied_own, [args[i] for i in state.copied])
            out = self._replay(graph, args)
            if state.back:
                torch._foreach_copy_([args[i] for i in state.back], state.back_own)
            state.replays += 1
            if state.replays == STABLE_REPLAYS:  # the pinned inputs stayed put: moves may start over
                state.recordings = 0
            return out
        if pool.full or state.eager:
            return self._program(state, args)(*args)
        if not state.warm:
            return self._warm(state, args)
        program = self._program(state, args)
        if program is not self.body and not state.program_ran:  # inductor's code runs once before a recording
            state.program_ran = True
            return program(*args)
        return self._record(state, args, program)

    def _warm(self, state: _Key, args: tuple) -> tuple:
        """Run eagerly, noting how a recording would get each input (:data:`COPY`, :data:`COPY_BACK`,
        :data:`PIN`), or that it never can (``state.eager``). Read in place: an input an output is a view of
        (the caller may change either later), inputs that share memory with another input, large ones,
        ones that are not dense (an expanded tensor), and other graphs' outputs (their address is fixed).
        Copied back out: inputs the stretch changes."""
        state.warm = True
        tensors = [a if isinstance(a, torch.Tensor) else None for a in args]
        try:
            versions = [None if t is None else t._version for t in tensors]
        except RuntimeError:  # inference tensors keep no version: the body's own writes say what changes
            versions = None
        out = self._program(state, args)(*args)
        if any(isinstance(o, (tuple, list)) for o in out):
            state.eager = "an output is a tuple"
            return out
        if self.pool.is_cuda and any(t is not None and t.device.type != "cuda" for t in tensors):
            state.eager = "an input is on the host"  # a graph would keep the value it had when recorded
            return out
        storage = [None if t is None else t.untyped_storage().data_ptr() for t in tensors]
        shared = {p for p in storage if p is not None and storage.count(p) > 1}
        viewed = {o.untyped_storage().data_ptr() for o in out if isinstance(o, torch.Tensor)}
        state.out_bytes = sum(  # what the graph would hold: its outputs that are not views of inputs
            o.numel() * o.element_size()
            for o in out
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in storage
        )
        modes: list[int | None] = []
        for i, t in enumerate(tensors):
            if t is None:
                modes.append(None)
            elif (
                storage[i] in viewed
                or storage[i] in shared
                or t.numel() * t.element_size() > COPY_BYTES
                or _overlapping(t)
                or self.pool.is_static(t)
            ):
                modes.append(PIN)
            else:
                changed = i in self.mutated if versions is None else t._version != versions[i]
                modes.append(COPY_BACK if changed else COPY)
        state.modes = modes
        return out

    def _record(self, state: _Key, args: tuple, program) -> tuple:
        pool = self.pool
        copied = [i for i, m in enumerate(state.modes) if m in (COPY, COPY_BACK)]
        copied_bytes = sum(args[i].numel() * args[i].element_size() for i in copied)
        if state.out_bytes + copied_bytes > GRAPH_IO_BYTES:
            state.eager = "inputs and outputs too large"
            return program(*args)
        if state.recordings >= MAX_RECORDINGS:
            state.eager = "pinned inputs kept moving"
            return program(*args)
        kept = 0  # inductor's code keeps its outputs and its kernels' temporaries
        if program is self.body and self.recording is not None:  # the body keeps every value it makes
            if state.kept is None:
                state.kept = kept_bytes(self.body, args)
            kept = state.kept
        if pool.limit is not None and kept > pool.limit:
            state.eager = "the values it keeps exceed the pool"
            return program(*args)
        if not pool.room(state.out_bytes + copied_bytes + kept):
            return program(*args)
        own: list = [None if m == PIN else a for a, m in zip(args, state.modes, strict=True)]
        for i in copied:
            a = args[i]
            with torch.inference_mode(False):  # a plain tensor: written in and out of inference mode alike
                own[i] = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
            own[i].copy_(a)
        pool.used += copied_bytes if pool.is_cuda else 0
        state.recordings += 1
        try:
            if program is self.body:
                recorded = self.recording or self.body
            else:  # inductor's code: its temporaries are its own, and the graphs of a memory pool replay in
                # the order they were recorded (GraphPool.record), so none writes where another keeps a value

                def recorded(*a):
                    return program(*a), ()

            graph = pool.record(recorded, own, args, self.order)
        except _NoRoom:
            return program(*args)
        except Exception as e:  # noqa: BLE001  (an op a graph cannot hold: this stretch stays eager)
            state.eager = f"not recordable: {type(e).__name__}"
            pool.failed += 1
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(
                f"hetegen: a stretch of device work could not be recorded as a CUDA graph and runs eagerly "
                f"({type(e).__name__}: {first})",
                RuntimeWarning,
                stacklevel=2,
            )
            return program(*args)
        graph.pinned = {args[i].untyped_storage().data_ptr() for i, m in enumerate(state.modes) if m == PIN}
        state.graph, state.copied = graph, copied
        state.back = [i for i, m in enumerate(state.modes) if m == COPY_BACK]
        state.copied_own = [own[i] for i in copied]
        state.back_own = [own[i] for i in state.back]
        state.pinned = [(i, args[i].data_ptr()) for i, m in enumerate(state.modes) if m == PIN]
        state.replays = 0
        pool.recorded += 1
        out = self._replay(graph, args)
        if state.back:
            torch._foreach_copy_([args[i] for i in state.back], state.back_own)
        pool.note_outputs(graph.outputs)
        return out

    def _replay(self, graph: _Graph, args: tuple) -> tuple:
        graph.live = args  # what an emulated graph runs on for its pinned inputs
        graph.replay()
        graph.live = None
        self.pool.replays += 1
        if graph.clone is None:  # which outputs to copy: escaping ones that are not views of pinned inputs
            graph.clone = tuple(
                esc and isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in graph.pinned
                for o, esc in zip(graph.outputs, self.escaping, strict=True)
            )
        if not any(graph.clone):
            return graph.outputs
        return tuple(o.clone() if c else o for o, c in zip(graph.outputs, graph.clone, strict=True))
