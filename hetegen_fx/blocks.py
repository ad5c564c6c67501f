"""MLP blocks: an MLP whose CPU share runs as one CPU job (``Config.block_jobs``).

A split Linear's output is gathered on the device before the next op reads it, so an offloaded MLP costs
two CPU jobs and two hand-offs: gate/up (their output rows), then down (its output rows), with the device's
``act(gate) * up`` between them while the CPU waits. Split by *intermediate features* instead, the MLP
needs no gather in the middle: the CPU computes gate/up rows ``[0, k)``, ``act(gate) * up`` on them, and
down's input columns ``[0, k)``, a partial sum of the whole output; the device does the same for
``[k, I)`` from copies of those rows and columns, and the two partial sums are added. One job, one
hand-off, and the CPU never waits for the device inside the MLP (tensor parallelism's column-then-row
split, between the CPU and the device).

Owns: recognising such a block in a captured graph (:func:`find_blocks`: column Linears that read one input,
an activation the CPU worker knows, and a row Linear that reads only their product), the activation codes
the worker and PartitionPass share, and the worker's activation (:func:`activate`). An activation written
as a formula of pointwise ops (GPT-2's ``gelu_new``: ``0.5 * x * (1 + tanh(...))``) is known by what it
computes: evaluated in float64 on a probe, it must match one of the worker's activations (:func:`_formula`);
the device's share still runs the graph's own nodes. Must not: decide
whether a block runs as one job (PlacementPass does, by the lane model) or emit nodes (PartitionPass).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import concrete, node_value
from .linear import LinearSite

#: activation codes in a CPU job's descriptor (0: a plain job of Linears)
SILU, GELU, GELU_TANH, RELU = 1, 2, 3, 4

_SILU = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
_GELU = (F.gelu, torch.ops.aten.gelu.default, torch.ops.aten.gelu)
_RELU = (F.relu, torch.relu, torch.ops.aten.relu.default, torch.ops.aten.relu)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul)
_aten = torch.ops.aten
#: the pointwise ops an activation written as a formula may use (functions, aten ops and tensor methods)
_POINTWISE = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid, torch.erf,
    torch.exp, F.sigmoid, F.tanh,
    _aten.mul.Tensor, _aten.mul.Scalar, _aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor,
    _aten.sub.Scalar, _aten.rsub.Scalar, _aten.div.Tensor, _aten.div.Scalar, _aten.neg.default,
    _aten.pow.Tensor_Scalar, _aten.tanh.default, _aten.sigmoid.default, _aten.erf.default, _aten.exp.default,
}  # fmt: skip
_POINTWISE_METHODS = {"mul", "add", "sub", "div", "neg", "pow", "tanh", "sigmoid", "erf", "exp"}
#: reshapes that a block may hold where they keep the features last (GPT-2's Conv1D flattens its input and
#: unflattens its output around ``addmm``)
_RESHAPE = (torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)
_RESHAPE_METHODS = {"view", "reshape"}
#: the most nodes a formula may have (gelu_new has 8)
FORMULA_NODES = 16
#: where a formula is compared with the worker's activations (float64; within 1e-6, far below fp32's and far
#: above the tanh GELU's distance from the exact one, 1e-4 to 1e-3 here)
_PROBE = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)


@dataclass(frozen=True)
class MLPBlock:
    """``row(act(columns[0](x)) * columns[1](x))`` (gated) or ``row(act(columns[0](x)))``: ``columns[0]`` is
    the Linear the activation reads (gate), whatever the graph's order; ``between`` are the activation (and
    product) nodes, in graph order."""

    columns: tuple[LinearSite, ...]
    row: LinearSite
    act: int
    between: tuple[fx.Node, ...]

    @property
    def head(self) -> str:
        """The block's name in the Plan (``LayerPlan.block``): the name of the Linear the activation reads."""
        return self.columns[0].name

    @property
    def sites(self) -> tuple[LinearSite, ...]:
        return (*self.columns, self.row)


#: each activation code → the function and keyword arguments that compute it (what an exported graph calls)
FUNCTIONS = {
    SILU: (F.silu, {}),
    GELU: (F.gelu, {}),
    GELU_TANH: (F.gelu, {"approximate": "tanh"}),
    RELU: (F.relu, {}),
}


def activate(y: torch.Tensor, act: int) -> torch.Tensor:
    """The activation of code ``act`` (the CPU worker's; TorchScript compiles it with the job server, and
    reads no module globals: the codes are written out)."""
    if act == 1:  # SILU
        return F.silu(y)
    if act == 2:  # GELU
        return F.gelu(y)
    if act == 3:  # GELU_TANH
        return F.gelu(y, approximate="tanh")
    return torch.relu(y)  # RELU


def activation_code(node: fx.Node, gm: fx.GraphModule | None = None) -> int:
    """The code of the activation ``node`` applies to its one input, or 0 (not one the worker knows, or not
    applied as a plain function of one tensor)."""
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs:
            return 0
        if type(mod) is torch.nn.SiLU:
            return SILU
        if type(mod) is torch.nn.ReLU:
            return RELU
        if type(mod) is torch.nn.GELU:
            return {"none": GELU, "tanh": GELU_TANH}.get(mod.approximate, 0)
        return 0
    if node.op != "call_function" or len(node.args) != 1:
        return 0
    kwargs = dict(node.kwargs)
    if kwargs.pop("inplace", False):
        return 0
    if node.target in _SILU and not kwargs:
        return SILU
    if node.target in _RELU and not kwargs:
        return RELU
    if node.target in _GELU and set(kwargs) <= {"approximate"}:
        return {"none": GELU, "tanh": GELU_TANH}.get(kwargs.get("approximate", "none"), 0)
    return 0


def find_blocks(gm: fx.GraphModule, sites: list[LinearSite]) -> list[MLPBlock]:
    """The MLP blocks of ``gm`` among ``sites`` (its Linears), in graph order: a row Linear whose input is
    ``act(a) * b`` or ``act(a)``, where ``a`` (and ``b``) are Linears of one input, with as many output
    features as the row Linear has input features, one dtype, and no other reader of anything in between. A
    Linear is in one block at most (in ``fc1 → act → fc2 → act → fc3`` the first block takes ``fc2``), and a
    weight used by several Linears (an MLP called twice) is in none."""
    by_node = {s.node: s for s in sites}
    uses = Counter(s.name for s in sites)
    taken: set[fx.Node] = set()
    order: dict[fx.Node, int] = {}  # graph positions, filled at the first block with reshapes
    blocks = []
    for row in sites:
        h = row.x
        if not isinstance(h, fx.Node) or not _only_read_by(h, row):
            continue
        flat = ()
        if keeps_features(h, row.in_features):  # the row reads the product reshaped (Conv1D's flattening)
            flat, h = (h,), h.args[0]
            if not isinstance(h, fx.Node) or set(h.users) != {flat[0]}:
                continue
        found = _gated(gm, h, by_node) or _plain(gm, h, by_node)
        if found is None:
            continue
        columns, act, between = found
        between = (*between, *flat)
        if not _reshapes_hold(gm, columns, row, between, order):
            continue
        dtype = row.weight.tensor.dtype
        if len({c.x for c in columns}) != 1 or any(
            c.out_features != row.in_features or c.weight.tensor.dtype != dtype for c in columns
        ):
            continue
        block = MLPBlock(tuple(columns), row, act, between)
        if any(s.node in taken or uses[s.name] > 1 for s in block.sites):
            continue
        taken.update(s.node for s in block.sites)
        blocks.append(block)
    return blocks


def _reshapes_hold(gm: fx.GraphModule, columns, row: LinearSite, between, order: dict) -> bool:
    """Whether a block's reshapes (:func:`keeps_features`) can run on a share of its features: the row Linear's
    input has the leading shape of the columns' input (the CPU job's output takes that shape), and every
    size given as a node is computed before the block's first Linear (the device's copies are emitted
    before the nodes that follow it). True for a block without reshapes. ``order``: the graph's node
    positions, filled here when empty."""
    reshapes = [n for n in between if not _pointwise(n) and not activation_code(n, gm)]
    if not reshapes:
        return True
    x, h = node_value(columns[0].x), node_value(row.x)
    if not isinstance(x, torch.Tensor) or not isinstance(h, torch.Tensor) or x.dim() != h.dim():
        return False
    if any(concrete(a) != concrete(b) for a, b in zip(x.shape[:-1], h.shape[:-1], strict=True)):
        return False
    if not order:
        order.update((n, i) for i, n in enumerate(gm.graph.nodes))
    first = min(order[c.node] for c in columns)
    return all(order[a] < first for n in reshapes for a in n.all_input_nodes[1:])


def _only_read_by(node: fx.Node, site: LinearSite) -> bool:
    return set(node.users) <= {site.node, *site.absorbed}


def _gated(gm, h: fx.Node, by_node: dict) -> tuple | None:
    if h.op != "call_function" or h.target not in _MUL or len(h.args) != 2 or h.kwargs:
        return None
    for act_node, up_node in (h.args, reversed(h.args)):
        if not isinstance(act_node, fx.Node) or not isinstance(up_node, fx.Node):
            continue
        found = _activation(gm, act_node, by_node)
        up = by_node.get(up_node)
        if found is None or up is None or found[0] is up:
            continue
        gate, code, region = found
        if set(act_node.users) == {h} and set(up.node.users) == {h}:
            return (gate, up), code, (*region, h)
    return None


def _plain(gm, h: fx.Node, by_node: dict) -> tuple | None:
    found = _activation(gm, h, by_node)
    if found is None:
        return None
    fc, code, region = found
    return (fc,), code, region


def keeps_features(node: fx.Node, features: int) -> bool:
    """Whether ``node`` reshapes its input to a shape whose last size is ``features`` (given as a number):
    where its input has them last too, only the leading sizes change."""
    if node.op == "call_method":
        if node.target not in _RESHAPE_METHODS:
            return False
    elif node.op != "call_function" or node.target not in _RESHAPE:
        return False
    if node.kwargs or len(node.args) < 2:
        return False
    shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return len(shape) > 0 and type(shape[-1]) is int and shape[-1] == features


def with_features(args: tuple, features: int) -> tuple:
    """A reshape's arguments (:func:`keeps_features`) with ``features`` as its last size: the same reshape of
    a share of the features (the device's part of a block)."""
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        return (args[0], type(args[1])([*args[1][:-1], features]))
    return (*args[:-1], features)


def _source(node, by_node: dict) -> tuple | None:
    """``(site, nodes)``: the Linear whose output ``node`` is, directly (``nodes`` empty) or through one
    reshape that keeps its features last and is its only reader (``nodes``: that reshape); else None."""
    if not isinstance(node, fx.Node):
        return None
    if node in by_node:
        return by_node[node], ()
    inner = node.args[0] if node.args else None
    site = by_node.get(inner) if isinstance(inner, fx.Node) else None
    if site is None or not keeps_features(node, site.out_features) or set(site.node.users) != {node}:
        return None
    return site, (node,)


def _activation(gm, out: fx.Node, by_node: dict) -> tuple | None:
    """``(site, code, nodes)`` when ``out`` is an activation the worker knows of the Linear ``site``'s output
    alone (or of it reshaped, :func:`_source`), read by nothing else: one node (:func:`activation_code`) or a
    formula (:func:`_formula`)."""
    code = activation_code(out, gm)
    if code:
        found = _source(out.args[0], by_node)
        if found is None:
            return None
        site, via = found
        if set((via[0] if via else site.node).users) != {out}:
            return None
        return site, code, (*via, out)
    return _formula(out, by_node)


#: the keyword arguments a formula's op may have (``out=`` would write into its input)
_POINTWISE_KWARGS = {"alpha", "rounding_mode"}


def _pointwise(node: fx.Node) -> bool:
    if not set(node.kwargs) <= _POINTWISE_KWARGS:
        return False
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    return node.op == "call_function" and node.target in _POINTWISE


def _formula(out: fx.Node, by_node: dict) -> tuple | None:
    """``(site, code, nodes)`` when ``out`` is the last node of pointwise ops (:data:`_POINTWISE`) whose only
    tensor is the Linear ``site``'s output, with no reader outside them (but ``out``'s), and they compute an
    activation of :data:`FUNCTIONS` (compared in float64 on :data:`_PROBE`); else None."""
    region: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in region or n in sources:
            continue
        if n in by_node:
            sources.add(n)
            continue
        found = _source(n, by_node)
        if found is not None and found[1]:  # the Linear's output reshaped: the region's first node
            region.add(n)
            sources.add(found[0].node)
            continue
        if not _pointwise(n) or len(region) >= FORMULA_NODES:
            return None
        region.add(n)
        stack.extend(n.all_input_nodes)
    if len(sources) != 1 or not region:
        return None
    (src,) = sources
    if any(not set(n.users) <= region for n in region - {out}) or not set(src.users) <= region:
        return None
    nodes = tuple(n for n in out.graph.nodes if n in region)  # graph order
    env: dict[fx.Node, object] = {src: _PROBE.clone()}
    try:
        for n in nodes:
            if not _pointwise(n):  # the reshape of the source (:func:`_source`): values unchanged
                env[n] = env[n.args[0]]
                continue
            args = fx.map_arg(n.args, env.__getitem__)
            kwargs = fx.map_arg(n.kwargs, env.__getitem__)
            fn = getattr(torch.Tensor, n.target) if n.op == "call_method" else n.target
            env[n] = fn(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return None
    y = env[out]
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape:
        return None
    for code, (fn, kwargs) in FUNCTIONS.items():
        if torch.allclose(y, fn(_PROBE, **kwargs), rtol=1e-6, atol=1e-9):
            return by_node[src], code, nodes
    return None
