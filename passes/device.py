"""DevicePass: everything that is not a Linear's CPU part runs on the accelerator.

* parameters and buffers still read by the graph (embeddings, norms, rotary tables, biases of resident
  Linears already handled) are read from their device copies in the WeightStore, except the embedding
  tables the Plan keeps on the host (``Plan.host_tables``): their lookups run on the CPU
  (:func:`~hetegen_fx.runtime.embed_on_host`), from the caller's host indices;
* tensor inputs are moved to the device on entry (a no-op for those already there, e.g. a KV cache);
* device constants baked in at capture (``arange(..., device='cpu')``) are retargeted to the device;
* inputs the graph changes in place are copied back at the end, into the caller's tensors;
* outputs go back to the device the inputs came from (``output_device="input"``), or, with "auto", those
  computed from the last Linear do while the others (model state) are parked on the device; an output
  that is one of the caller's inputs (moved onto the device, nothing else) is returned as that input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.config import Config
from hetegen_fx.graph_utils import allocated_cache_buffer, attach, node_value, writers_of
from hetegen_fx.linear import match_embedding, param_of, reshapes
from hetegen_fx.runtime import embed_on_host, park, resolve_device, to_device, write_back
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
        plan = gm.meta.get(meta.PLAN)
        host = set(plan.host_tables) if plan is not None else set()
        lookups: list[fx.Node] = []
        # parameters read by anything other than the nodes PartitionPass emitted
        for node in list(graph.nodes):
            ref = param_of(node)
            if ref is None or not node.users:
                continue
            if ref.name in host:  # an embedding table kept on the host: its lookups run there
                for user in list(node.users):
                    if (m := match_embedding(user)) is not None and m[1] is node:
                        lookups.append(self._lookup_on_host(graph, user))
                        modified = True
                if all(u.target is embed_on_host for u in node.users):
                    continue
            with graph.inserting_before(_first_user(node)):
                dev = attach(gm, f"{ref.name}__dev", self.store.on_device(ref.tensor))
            dev.meta[meta.SIDE] = "gpu"
            node.replace_all_uses_with(dev)
            if node.op == "get_attr":
                graph.erase_node(node)
            modified = True
        # inputs onto the device
        changed: list[tuple[fx.Node, fx.Node]] = []  # inputs moved to the device, which the graph may change
        resolved = resolve_device(self.config.device)  # "cuda" as the index its tensors carry
        host_devices = []
        unknown: list[
            fx.Node
        ] = []  # inputs without a recorded value (fx graphs traced without example inputs)
        for ph in placeholders:
            if param_of(ph) is not None or not ph.users:
                continue
            v = node_value(ph)
            if v is not None and not isinstance(v, torch.Tensor):
                continue
            if isinstance(v, torch.Tensor):
                host_devices.append(v.device)
            else:
                unknown.append(ph)
            with graph.inserting_after(_last_placeholder(graph)):
                moved = graph.create_node(
                    "call_function", to_device, (ph, self.config.device), name=f"{ph.name}_dev"
                )
            moved.meta[meta.SIDE] = "move"
            ph.replace_all_uses_with(moved, delete_user_cb=lambda u, m=moved: u is not m)
            modified = True
            if v is None or v.device != resolved:
                changed.append((ph, moved))
        # host lookups take the caller's host indices, not the copy moved onto the device
        for node in lookups:
            dropped = self._host_indices(graph, node)
            changed = [(ph, moved) for ph, moved in changed if moved not in dropped]
        # device constants captured on the host
        if self.device != HOST:
            for node in graph.nodes:
                if node.op in ("call_function", "call_method") and node.meta.get(meta.SIDE) not in (
                    "cpu",
                    "move",
                    "host",
                ):
                    new_args = _retarget(node.args, self.device)
                    new_kwargs = _retarget(node.kwargs, self.device)
                    if new_args != node.args or new_kwargs != node.kwargs:
                        node.args, node.kwargs = new_args, new_kwargs
                        modified = True
        # inputs changed in place (an HF StaticCache's length counter): the caller's tensors get the new values
        # (all in one call, which gathers the small ones into one copy)
        written = [(ph, moved, writers_of(moved)) for ph, moved in changed]
        written = [w for w in written if w[2]]
        if written:
            writers = dict.fromkeys(n for _, _, ws in written for n in ws)
            with graph.inserting_before(graph.output_node()):
                node = graph.create_node(
                    "call_function",
                    write_back,
                    (tuple(w[0] for w in written), tuple(w[1] for w in written), *writers),
                    name="inputs_written_back",
                )
            node.meta[meta.SIDE] = "move"
        # outputs back to the inputs' device, or parked on the accelerator
        back: torch.device | fx.Node | None = next((d for d in host_devices if d != self.device), None)
        if back is None and not host_devices and unknown and self.config.output_device != "accelerator":
            # no shapes recorded: follow the device of the first input at run time
            with graph.inserting_after(_last_placeholder(graph)):
                back = graph.create_node("call_function", input_device, (unknown[0], str(self.device)))
            back.meta[meta.SIDE] = "move"
        if back is None and self.device != HOST:
            back = HOST  # the model's weights live on the host: that is where its callers expect results
        if self.config.output_device != "accelerator" and back is not None:
            returned = _from_last_linear(graph) if self.config.output_device == "auto" else None
            out = graph.output_node()
            with graph.inserting_before(out):
                out.args = (fx.node.map_arg(out.args[0], lambda n: self._back(graph, n, back, returned)),)
            modified = True
        graph.lint()
        return PassResult(gm, modified)

    def _lookup_on_host(self, graph: fx.Graph, node: fx.Node) -> fx.Node:
        """Replace embedding lookup ``node`` by :func:`embed_on_host` (the same rows, on the device)."""
        idx, table = match_embedding(node)
        with graph.inserting_before(node):
            new = graph.create_node(
                "call_function", embed_on_host, (idx, table, self.config.device), name=f"{node.name}_on_host"
            )
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "tensor_meta")})
        new.meta[meta.SIDE] = "host"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return new

    def _host_indices(self, graph: fx.Graph, lookup: fx.Node) -> set[fx.Node]:
        """Make host lookup ``lookup`` read its indices from the caller's input (reshaped on the host as the
        graph reshapes it on the device) instead of the copy moved onto the device; erase what no longer has
        users, and return it."""
        ops, moved = [], lookup.args[0]
        while isinstance(moved, fx.Node) and moved.target is not to_device and reshapes(moved):
            ops.insert(0, moved)
            moved = moved.args[0]
        if (
            not isinstance(moved, fx.Node)
            or moved.target is not to_device
            or moved.args[0].op != "placeholder"
        ):
            return set()  # not an input moved onto the device: nothing to do
        chain, ph = [moved, *ops], moved.args[0]
        env = {moved: ph}
        with graph.inserting_before(lookup):
            for op in ops:
                env[op] = graph.node_copy(op, lambda n: env.get(n, n))
                env[op].meta[meta.SIDE] = "host"  # never retargeted, never in a CUDA graph
        lookup.args = (env[chain[-1]], *lookup.args[1:])
        dropped = set()
        for n in reversed(chain):
            if not n.users:
                graph.erase_node(n)
                dropped.add(n)
        return dropped

    def _back(
        self, graph: fx.Graph, n: fx.Node, device: torch.device | fx.Node, returned: set[fx.Node] | None
    ) -> fx.Node:
        v = node_value(n)
        if v is not None and not isinstance(v, torch.Tensor):
            return n
        src = self._caller_input(n)
        if src is not None:  # the caller's own tensor, as eager returns it (write_back keeps it current)
            return src
        if returned is not None and n not in returned:
            # a StaticCache's buffers keep their size: parked without dynamo's marks of growing state
            kwargs = {} if not allocated_cache_buffer(n) else {"grows": False}
            node = graph.create_node("call_function", park, (n,), kwargs, name=f"{n.name}_parked")
        else:
            dev = device if isinstance(device, fx.Node) else str(device)
            node = graph.create_node("call_function", to_device, (n, dev), name=f"{n.name}_out")
        node.meta[meta.SIDE] = "move"
        return node

    def _caller_input(self, n: fx.Node) -> fx.Node | None:
        """The input whose tensor output ``n`` is, or None: ``n`` is that input moved onto the device, then
        passed through ``.to`` calls that change nothing (e.g. an HF StaticCache's length counter, which its
        lazy initialisation moves to the device it is already on and the model then keeps).

        Such an output goes back as the caller's own tensor, which eager would have returned. Parked instead,
        it would come back as a host stand-in whose bytes are never written, and a caller that reads it on
        the host (HF's attention mask reads the counter) would read garbage."""
        while self._is_no_op_to(n):
            n = n.args[0]
            if not isinstance(n, fx.Node):
                return None
        if n.op == "call_function" and n.target is to_device:
            src = n.args[0]
            if isinstance(src, fx.Node) and src.op == "placeholder":
                return src
        return None

    def _is_no_op_to(self, n: fx.Node) -> bool:
        """Whether ``n`` is a ``Tensor.to`` call (method or function) that returns its input itself here: what
        it names is this pass's device or the input's own dtype (known from the recorded value of the input
        behind the moves), and it asks for no copy. Positional flags follow ``to``'s signatures:
        ``non_blocking``, then ``copy``."""
        if not (
            (n.op == "call_method" and n.target == "to")
            or (n.op == "call_function" and n.target is torch.Tensor.to)
        ):
            return False
        if set(n.kwargs) - {"device", "dtype", "non_blocking", "copy"} or n.kwargs.get("copy", False):
            return False
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            return False
        root = src
        while isinstance(root, fx.Node) and root.op == "call_function" and root.target is to_device:
            root = root.args[0]  # a move has no recorded value: the input behind it has
        value = node_value(root)
        flags = 0
        for a in [*n.args[1:], *(n.kwargs[k] for k in ("device", "dtype") if k in n.kwargs)]:
            if isinstance(a, bool):
                flags += 1
                if flags > 1 and a:  # the second flag is ``copy``
                    return False
            elif isinstance(a, torch.dtype):
                if not isinstance(value, torch.Tensor) or value.dtype != a:
                    return False
            elif isinstance(a, (str, torch.device)):
                try:
                    d = torch.device(a)
                except RuntimeError:  # not a device name
                    return False
                if d.type != self.device.type or resolve_device(d) != resolve_device(self.config.device):
                    return False
            else:
                return False
        return True


def input_device(x: Any, default: str) -> torch.device:
    """The device of input ``x`` (``default`` if it is not a tensor): where outputs go back to."""
    return x.device if isinstance(x, torch.Tensor) else torch.device(default)


def _from_last_linear(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from the graph's last Linear (e.g. the logits of an LM); all nodes if it has none. The
    Linear's last node that something reads: not the bookkeeping PartitionPass emits after it (a staging slot
    released, a storage slot given back), which nothing reads. (Taking a streamed ``lm_head``'s slot release
    for it parked the logits: the caller got a host stand-in never written.)"""
    last = None
    for n in graph.nodes:
        if meta.LAYER in n.meta and n.op == "call_function" and n.users:
            last = n
    if last is None:
        return set(graph.nodes)
    seen, todo = {last}, [last]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


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
