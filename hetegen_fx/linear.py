"""Recognising Linears in an FX graph, whatever frontend produced it.

Forms recognised (the weight must be bound to a model parameter, see :data:`meta.PARAM`):

* ``call_module`` of an ``nn.Linear``;
* ``F.linear`` / ``torch._C._nn.linear`` (fx, dynamo) and ``aten.linear`` (export): ``x Wᵀ + b``, W ``[out, in]``;
* ``addmm(b, x, W)`` and ``matmul(x, W)`` (+ ``add(·, b)``) with W ``[in, out]`` (GPT-2's Conv1D);
* ``x @ W.T``, ``matmul(x, W.t())``, ``x @ W.transpose(0, 1)`` (+ ``add(·, b)``) with W ``[out, in]``: custom
  Linear classes of some architectures write their Linear this way (the transpose goes with the rewrite).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import meta


@dataclass(frozen=True)
class ParamRef:
    """A model parameter (or buffer) that a graph node stands for."""

    name: str
    tensor: torch.Tensor


@dataclass
class LinearSite:
    """One Linear found in a graph. ``node`` is the node whose value is the Linear's output."""

    node: fx.Node
    x: fx.Node
    weight: ParamRef
    bias: ParamRef | None
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)
    form: str  # "linear" | "addmm" | "matmul" | "matmul_t" (x @ W.T)
    absorbed: tuple[fx.Node, ...] = ()  # nodes that disappear with the rewrite (matmul under a fused add)

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def out_features(self) -> int:
        w = self.weight.tensor
        return w.shape[0] if self.layout == "out_in" else w.shape[1]

    @property
    def in_features(self) -> int:
        w = self.weight.tensor
        return w.shape[1] if self.layout == "out_in" else w.shape[0]

    @property
    def weight_bytes(self) -> int:
        b = self.weight.tensor.numel() * self.weight.tensor.element_size()
        if self.bias is not None:
            b += self.bias.tensor.numel() * self.bias.tensor.element_size()
        return b


LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear, torch.ops.aten.linear.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm, torch.ops.aten.addmm.default)
MATMUL_TARGETS = (
    torch.matmul,
    operator.matmul,
    torch.ops.aten.matmul,
    torch.ops.aten.matmul.default,
    torch.mm,
    torch.ops.aten.mm,
    torch.ops.aten.mm.default,
)
ADD_TARGETS = (operator.add, torch.add, torch.ops.aten.add, torch.ops.aten.add.Tensor)


_TRANSPOSE_FUNCTIONS = (torch.t, torch.ops.aten.t, torch.ops.aten.t.default, torch.ops.aten.numpy_T.default)
_SWAP_FUNCTIONS = (torch.transpose, torch.ops.aten.transpose.int, torch.swapaxes, torch.swapdims)


def _swaps_two_dims(dims: tuple) -> bool:
    """Whether ``dims`` (a transpose's) names both dimensions of a 2-D tensor."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


def _reverses_two_dims(dims: tuple) -> bool:
    """Whether ``dims`` (a permute's, given as ``(1, 0)`` or ``([1, 0],)``) swaps the two dimensions of a 2-D
    tensor."""
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return _swaps_two_dims(dims) and dims[0] % 2 == 1


def _transposed_weight(node: object) -> ParamRef | None:
    """The 2-D parameter ``W`` when ``node`` is its transpose (``W.T``, ``W.mT``, ``W.t()``, ``torch.t(W)``,
    ``W.transpose(0, 1)``, ``W.permute(1, 0)``, and their aten forms), else None."""
    if not isinstance(node, fx.Node) or not node.args or node.kwargs:
        return None
    src, rest = node.args[0], tuple(node.args[1:])
    target = node.target
    if node.op == "call_method":
        ok = (
            (target == "t" and not rest)
            or (target in ("transpose", "swapaxes", "swapdims") and _swaps_two_dims(rest))
            or (target == "permute" and _reverses_two_dims(rest))
        )
    elif node.op == "call_function":
        ok = (
            (target in _TRANSPOSE_FUNCTIONS and not rest)
            or (target is getattr and rest in (("T",), ("mT",)))
            or (target in _SWAP_FUNCTIONS and _swaps_two_dims(rest))
            or (target in (torch.permute, torch.ops.aten.permute.default) and _reverses_two_dims(rest))
        )
    else:
        ok = False
    ref = param_of(src) if ok else None
    return ref if _is_weight(ref) else None


def param_of(node: object) -> ParamRef | None:
    """The parameter a node stands for, if capture bound one to it."""
    return node.meta.get(meta.PARAM) if isinstance(node, fx.Node) else None


def _is_weight(ref: ParamRef | None) -> bool:
    return ref is not None and ref.tensor.dim() == 2


def _bias_ref(node: object) -> ParamRef | None:
    ref = param_of(node)
    return ref if ref is not None and ref.tensor.dim() == 1 else None


def match_linear(node: fx.Node, gm: fx.GraphModule | None = None) -> LinearSite | None:
    """Return the LinearSite computed by ``node``, or None when ``node`` is not a Linear."""
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, torch.nn.Linear) and not node.kwargs:
            w = ParamRef(f"{node.target}.weight", mod.weight)
            b = ParamRef(f"{node.target}.bias", mod.bias) if mod.bias is not None else None
            return LinearSite(node, node.args[0], w, b, "out_in", "module")
        return None
    if node.op != "call_function":
        return None
    t = node.target
    args = list(node.args)
    if t in LINEAR_TARGETS:
        x = args[0] if args else node.kwargs.get("input")
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        wref = param_of(w)
        if not _is_weight(wref):
            return None
        bref = _bias_ref(b) if b is not None else None
        if b is not None and bref is None:
            return None
        return LinearSite(node, x, wref, bref, "out_in", "linear")
    if t in ADDMM_TARGETS and len(args) == 3 and not node.kwargs:
        bref, wref = _bias_ref(args[0]), param_of(args[2])
        if bref is None or not _is_weight(wref):
            return None
        return LinearSite(node, args[1], wref, bref, "in_out", "addmm")
    if t in ADD_TARGETS and len(args) == 2 and not node.kwargs:
        for mm, b in ((args[0], args[1]), (args[1], args[0])):
            if isinstance(mm, fx.Node) and len(mm.users) == 1:
                inner = match_linear(mm, gm)
                bref = _bias_ref(b)
                if inner is not None and inner.form in ("matmul", "matmul_t") and bref is not None:
                    if bref.tensor.shape[0] == inner.out_features:
                        absorbed = (mm, *inner.absorbed)
                        return LinearSite(
                            node, inner.x, inner.weight, bref, inner.layout, inner.form, absorbed
                        )
        return None
    if t in MATMUL_TARGETS and len(args) == 2 and not node.kwargs:
        if param_of(args[0]) is not None:
            return None
        wref = param_of(args[1])
        if _is_weight(wref):
            return LinearSite(node, args[0], wref, None, "in_out", "matmul")
        wref = _transposed_weight(args[1])
        if wref is None:
            return None
        # the transpose goes with the rewrite when this matmul is its only reader
        absorbed = (args[1],) if len(args[1].users) == 1 else ()
        return LinearSite(node, args[0], wref, None, "out_in", "matmul_t", absorbed)
    return None


def find_linears(gm: fx.GraphModule) -> list[LinearSite]:
    """Every Linear of ``gm`` in graph order (a matmul absorbed into a fused add is reported once)."""
    sites: list[LinearSite] = []
    absorbed: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node in absorbed:
            continue
        site = match_linear(node, gm)
        if site is not None:
            sites.append(site)
            absorbed.update(site.absorbed)
    return sites[::-1]


def unrecognised_linears(gm: fx.GraphModule) -> dict[str, str]:
    """Linear-like calls this module does not recognise as a Linear it can split: an op whose name says linear
    (a quantized Linear's ``quantized.linear_dynamic``, a custom kernel's, ``F.linear`` by a weight that is no
    floating-point model parameter) or a call of a module whose class says Linear. Module path (else the node's
    name) → the class name of the module it sits in (else the op)."""
    found = {n for s in find_linears(gm) for n in (s.node, *s.absorbed)}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node in found:
            continue
        if node.op == "call_module":
            cls = type(gm.get_submodule(node.target))
            if "linear" in cls.__name__.lower():
                out.setdefault(str(node.target), f"{cls.__module__}.{cls.__qualname__}")
        elif node.op == "call_function" and "linear" in str(node.target).lower():
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            path, cls = stack[-1] if stack else (node.name, None)
            name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else None
            out.setdefault(str(path), name or str(cls or node.target))
    return out


def match_embedding(node: object) -> tuple[fx.Node, fx.Node] | None:
    """``(indices, table)`` of an embedding lookup whose table is a captured 2-D parameter, else None:
    ``F.embedding(indices, table)`` (fx, dynamo) or ``aten.embedding(table, indices)`` (export), without
    ``max_norm`` (which rewrites the table)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is F.embedding:
        idx = node.args[0] if node.args else node.kwargs.get("input")
        table = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        if max_norm is not None:
            return None
    elif node.target is torch.ops.aten.embedding.default:
        table, idx = node.args[0], node.args[1]
    else:
        return None
    if not isinstance(idx, fx.Node) or not _is_weight(param_of(table)):
        return None
    return idx, table


def host_tables(graph: fx.Graph) -> dict[str, fx.Node]:
    """Embedding tables a graph reads only through lookups of graph inputs (token ids, not positions computed
    on the device), or as the weight of a Linear too (a tied ``lm_head``, whose own placement covers its
    bytes): name → its first parameter node. Their lookups can run on the host, from the caller's indices.
    A table anything else reads (a transposed view, a weight-norm) is left out."""
    tables: dict[str, fx.Node] = {}
    other: set[str] = set()  # read by something else through some node
    for node in graph.nodes:
        ref = param_of(node)
        if ref is None or not node.users:
            continue
        if ref.tensor.device.type != "cpu":  # a table the caller put on a device stays there
            other.add(ref.name)
            continue
        lookups = [
            u
            for u in node.users
            if (m := match_embedding(u)) is not None and m[1] is node and input_chain(m[0]) is not None
        ]
        linears = [u for u in node.users if _weight_of(u) == ref.name]
        if lookups and len(lookups) + len(linears) == len(node.users):
            tables.setdefault(ref.name, node)
        else:
            other.add(ref.name)
    return {name: node for name, node in tables.items() if name not in other}


_SHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous"})
_SHAPE_FUNCTIONS = (
    torch.reshape,
    torch.flatten,
    torch.unsqueeze,
    torch.squeeze,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
)


def input_chain(node: fx.Node) -> list[fx.Node] | None:
    """``[placeholder, op, ..., node]`` when ``node`` is a graph input or a reshaping of one (GPT-2 views its
    ``input_ids`` before the lookup), else None."""
    chain = [node]
    while node.op != "placeholder":
        if not reshapes(node):
            return None
        node = node.args[0]
        chain.append(node)
    return chain[::-1]


def reshapes(node: fx.Node) -> bool:
    """Whether ``node`` only reshapes its first argument, a node (a view, reshape, flatten, (un)squeeze)."""
    shape_op = (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
        node.op == "call_function" and node.target in _SHAPE_FUNCTIONS
    )
    return shape_op and bool(node.args) and isinstance(node.args[0], fx.Node)


def _weight_of(node: fx.Node) -> str | None:
    """The weight's name of the Linear ``node`` computes, as ProfilePass recorded it (None if not one)."""
    site = node.meta.get(meta.LINEAR)
    return site.weight.name if site is not None else None
