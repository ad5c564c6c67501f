"""Small helpers shared by the passes: shapes from node.meta, attaching tensors, readable names."""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx


def node_value(node: Any) -> Any:
    """The example/fake value recorded on a node by dynamo, export or :func:`propagate_shapes`."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return None


def concrete(n: Any) -> int:
    """An int from an int or a SymInt (its hint)."""
    if isinstance(n, torch.SymInt):
        return int(n.node.hint) if n.node.hint is not None else 1
    return int(n)


def layer_label(name: str) -> str:
    """A Linear's weight name without the parts every layer shares: ``model.layers.0.mlp.up_proj.weight`` →
    ``layers.0.mlp.up_proj``."""
    return name.removesuffix(".weight").removeprefix("model.").removeprefix("transformer.")


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record shapes on every node by running ``gm`` on fake tensors made from ``example_inputs``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with torch.no_grad():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)


def safe_name(name: str) -> str:
    """A Python identifier made from a qualified parameter name."""
    s = re.sub(r"\W+", "_", name).strip("_")
    return s if s and not s[0].isdigit() else f"p_{s}"


def attach(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` on ``gm`` (shared, not copied) and return a ``get_attr`` node for it."""
    attr = safe_name(name)
    existing = getattr(gm, attr, None)
    if existing is None:
        gm.register_buffer(attr, tensor.detach(), persistent=False)
    elif existing is not tensor and (
        existing.data_ptr() != tensor.data_ptr()
        or existing.shape != tensor.shape
        or existing.device != tensor.device
    ):
        raise AssertionError(f"attribute {attr} already holds another tensor")
    return gm.graph.get_attr(attr)


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph and the *same* attributes (weights are not copied).

    Passes rewrite the clone, so a failure leaves the caller's module untouched.
    """
    import copy

    graph = fx.Graph()
    value, out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value, type_expr=out.type)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


#: Python's in-place operators: dynamo records ``x += y`` on a tensor as one of these, and it mutates ``x``
_INPLACE_OPERATORS = frozenset(
    {
        operator.setitem,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
    }
)


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` has an effect besides its result, so it must stay even when nothing reads that.

    fx's own check (``Node.is_impure``) knows ops with a mutable schema and registered side effects, but not
    in-place *methods* (``cache.index_copy_(...)``, ``count.add_(1)``, as dynamo and ``symbolic_trace``
    record them), in-place functions such as ``torch.Tensor.add_``, ``inplace=True``, ``out=`` or Python's
    in-place operators as dynamo records them: a dead-code pass trusting it drops an HF StaticCache's
    updates. (``symbolic_trace`` records ``x += 1`` as an ``add`` whose result is rebound: that change is
    lost at capture, before any pass sees it.)
    """
    return node.is_impure() or _writes_first(node) or _out(node) is not None


def _out(node: fx.Node) -> fx.Node | None:
    """The tensor a call writes through its ``out=`` keyword, if any."""
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    return out if isinstance(out, fx.Node) else None


def _writes_first(node: fx.Node) -> bool:
    """Whether ``node`` writes its first argument in place (ops with a schema: see :func:`schema_writes`)."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverloadPacket):  # fx's check looks at .default, which add_ lacks
        return node.target.__name__.endswith("_")
    if isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and (not name.startswith("_") or name.startswith("_foreach_"))


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """fx's dead-code elimination that keeps every node that :func:`mutates`."""
    return graph.eliminate_dead_code(is_impure_node=mutates)


#: methods and functions whose result may share memory with their first argument (a write through the result
#: writes the argument): views, and conversions that return the tensor itself when there is nothing to convert
#: (``cache.to(device)``, as HF's StaticCache does before ``add_``)
_VIEWS = frozenset(
    {
        "to",
        "type",
        "type_as",
        "cpu",
        "cuda",
        "float",
        "half",
        "bfloat16",
        "double",
        "int",
        "long",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "narrow",
        "select",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "expand",
        "expand_as",
        "t",
        "T",
        "mT",
        "as_strided",
        "unflatten",
        "flatten",
        "diagonal",
        "movedim",
        "swapaxes",
        "split",
        "chunk",
        "unbind",
        "contiguous",
        "detach",
        "getitem",
        "__getitem__",
        "real",
        "imag",
    }
)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with its first argument."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):  # aten (export): the schema says so
        returns = t._schema.returns
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    if t is getattr and len(node.args) > 1:  # x.T, x.mT, x.real as dynamo records them
        return node.args[1] in _VIEWS
    return _name(node) in _VIEWS


def writers_of(node: fx.Node) -> list[fx.Node]:
    """The nodes that change ``node``'s tensor in place, directly or through a view of it."""
    aliases, todo, writers = {node}, [node], []
    while todo:
        for user in todo.pop().users:
            if user.op not in ("call_method", "call_function") or user in writers:
                continue
            first = user.args[0] if user.args else None
            if (
                (_writes_first(user) and first in aliases)
                or _out(user) in aliases
                or set(schema_writes(user)) & aliases
            ):
                writers.append(user)
            elif first in aliases and user not in aliases and _is_view(user):
                aliases.add(user)
                todo.append(user)
    return writers


#: ``scaled_dot_product_attention``'s tensor arguments, by position and name
_ATTENTION_INPUTS = ("query", "key", "value")
#: graph functions that hand on their first argument's tensor on another device (DevicePass's moves), so
#: its shape is the argument's
_MOVES = frozenset({"to_device", "park", "unpark"})


def _through_moves(arg: Any) -> Any:
    """What ``arg`` is behind the device moves DevicePass puts around a graph's inputs and outputs (itself if
    it is none)."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and _name(arg) in _MOVES and arg.args:
        arg = arg.args[0]
    return arg


def _captured_value(arg: Any) -> Any:
    """Dynamo's example value of ``arg``, looked up through the device moves DevicePass puts in front of a
    graph's inputs (they carry none of their own)."""
    if isinstance(arg, fx.Node) and "example_value" not in arg.meta:
        arg = _through_moves(arg)
    return arg.meta.get("example_value") if isinstance(arg, fx.Node) else None


def attention_shapes_repeat(gm: fx.GraphModule) -> bool:
    """Whether every call of ``gm`` gives its attention ops (``scaled_dot_product_attention`` and aten's
    variants of it) the shapes they were captured with: each query, keys and values (given by position or
    by name) carries dynamo's example value, directly or through a device move, and none of its sizes is
    symbolic. Dynamo guards a graph's shapes, so a call of other shapes runs another graph. So a decode step
    over a static cache (one graph per size class, :func:`allocated_cache_outputs`) and a prefill of one
    length are; a step over a cache grown by concatenation and a prefill once dynamo has seen a second
    prompt length (it makes that length symbolic) are not, nor is any graph traced without dynamo's values.
    A backend that plans per shape (cuDNN's attention) plans once per such graph. True for a graph without
    attention."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or "scaled_dot_product" not in str(node.target):
            continue
        for i, name in enumerate(_ATTENTION_INPUTS):
            arg = node.args[i] if i < len(node.args) else node.kwargs.get(name)
            value = _captured_value(arg)
            if not isinstance(value, torch.Tensor) or any(isinstance(d, torch.SymInt) for d in value.shape):
                return False
    return True


#: how a graph allocates a KV-cache buffer itself (HF's StaticCache, initialised lazily at its first update)
CACHE_ALLOCATORS = frozenset({"zeros", "empty", "full"})


def allocated_cache_buffer(node: Any) -> bool:
    """Whether ``node`` (looked up through DevicePass's moves) is a KV-cache buffer its graph allocates itself
    and writes in place: HF's StaticCache made in its first step (``zeros`` filled by ``index_copy_``). Its
    size is fixed for the cache's life, unlike a cache grown by concatenation."""
    node = _through_moves(node)
    value = node_value(node) if isinstance(node, fx.Node) else None
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and _name(node) in CACHE_ALLOCATORS
        and isinstance(value, torch.Tensor)
        and value.dim() == 4
        and bool(writers_of(node))
    )


def allocated_cache_outputs(gm: fx.GraphModule) -> tuple[int, ...]:
    """Positions of ``gm``'s outputs that are KV-cache buffers the graph allocates itself
    (:func:`allocated_cache_buffer`), handed back (directly or through DevicePass's moves) for the cache
    object to keep."""
    out = next(iter(gm.graph.find_nodes(op="output")), None)
    values = out.args[0] if out is not None and out.args else None
    if not isinstance(values, (tuple, list)):
        return ()
    return tuple(i for i, node in enumerate(values) if allocated_cache_buffer(node))


def schema_writes(node: fx.Node) -> list[fx.Node]:
    """The arguments an op overload declares it writes (``Tensor(a!)``), given by position or by name."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(t._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            out.append(value)
    return out
