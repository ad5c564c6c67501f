"""DevicePass: everything that is not a Linear's CPU part runs on the accelerator.

* parameters and buffers still read by the graph (embeddings, norms, rotary tables, biases of resident
  Linears already handled) are read from their device copies in the WeightStore;
* tensor inputs are moved to the device on entry (a no-op for those already there, e.g. a KV cache);
* device constants baked in at capture (``arange(..., device='cpu')``) are retargeted to the device;
* with ``output_device="input"`` outputs go back to the device the inputs came from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.config import Config
from hetegen_fx.graph_utils import attach, node_value
from hetegen_fx.linear import param_of
from hetegen_fx.runtime import to_device
from hetegen_fx.store import WeightStore

HOST = torch.device("cpu")


class DevicePass(PassBase):
    def __init__(self, config: Config, store: WeightStore) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.device = torch.device(config.device)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        placeholders = list(graph.find_nodes(op="placeholder"))
        # parameters read by anything other than the nodes PartitionPass emitted
        for node in list(graph.nodes):
            ref = param_of(node)
            if ref is None or not node.users:
                continue
            with graph.inserting_before(_first_user(node)):
                dev = attach(gm, f"{ref.name}__dev", self.store.on_device(ref.tensor))
            dev.meta[meta.SIDE] = "gpu"
            node.replace_all_uses_with(dev)
            if node.op == "get_attr":
                graph.erase_node(node)
            modified = True
        # inputs onto the device
        host_devices = []
        for ph in placeholders:
            if param_of(ph) is not None or not ph.users:
                continue
            v = node_value(ph)
            if v is not None and not isinstance(v, torch.Tensor):
                continue
            if isinstance(v, torch.Tensor):
                host_devices.append(v.device)
            with graph.inserting_after(_last_placeholder(graph)):
                moved = graph.create_node(
                    "call_function", to_device, (ph, self.config.device), name=f"{ph.name}_dev"
                )
            moved.meta[meta.SIDE] = "move"
            ph.replace_all_uses_with(moved, delete_user_cb=lambda u, m=moved: u is not m)
            modified = True
        # device constants captured on the host
        if self.device != HOST:
            for node in graph.nodes:
                if node.op in ("call_function", "call_method") and node.meta.get(meta.SIDE) not in (
                    "cpu",
                    "move",
                ):
                    new_args = _retarget(node.args, self.device)
                    new_kwargs = _retarget(node.kwargs, self.device)
                    if new_args != node.args or new_kwargs != node.kwargs:
                        node.args, node.kwargs = new_args, new_kwargs
                        modified = True
        # outputs back to the inputs' device
        if self.config.output_device == "input":
            back = next((d for d in host_devices if d != self.device), None)
            out = graph.output_node()
            if back is not None:
                with graph.inserting_before(out):
                    out.args = (fx.node.map_arg(out.args[0], lambda n: self._back(graph, n, back)),)
                modified = True
        graph.lint()
        return PassResult(gm, modified)

    def _back(self, graph: fx.Graph, n: fx.Node, device: torch.device) -> fx.Node:
        v = node_value(n)
        if v is not None and not isinstance(v, torch.Tensor):
            return n
        node = graph.create_node("call_function", to_device, (n, str(device)), name=f"{n.name}_out")
        node.meta[meta.SIDE] = "move"
        return node


def _first_user(node: fx.Node) -> fx.Node:
    for n in node.graph.nodes:
        if n in node.users:
            return n
    raise AssertionError("node has no user")


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return list(graph.find_nodes(op="placeholder"))[-1]


def _retarget(a: Any, device: torch.device) -> Any:
    if isinstance(a, torch.device) and a.type == "cpu":
        return device
    if isinstance(a, tuple):
        return tuple(_retarget(x, device) for x in a)
    if isinstance(a, list):
        return [_retarget(x, device) for x in a]
    if isinstance(a, dict):
        return {k: device if k == "device" and v == "cpu" else _retarget(v, device) for k, v in a.items()}
    return a
