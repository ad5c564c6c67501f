"""Small helpers shared by the passes: shapes from node.meta, attaching tensors, readable names."""

from __future__ import annotations

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
