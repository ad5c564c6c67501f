"""StageSplitPass: keep one pipeline stage's layers of a captured decoder, and hand the hidden state between
the stages' processes.

A decoder-only transformer's graph runs a prelude (token embedding, positions, masks), its layers one after
the other, each taking the hidden state from the one before, and a postlude (final norm, ``lm_head``). A node
belongs to layer ``i`` when its module stack (``nn_module_stack``, which dynamo and torch.export record)
passes through ``<...>.layers.i`` (``.h.i`` for GPT-2, ``.blocks.i``, ``.layer.i``). For the stage holding
layers ``[start, stop)`` of ``layers``, in the process of rank ``rank`` of ``ranks`` (one per stage, in order):

* the hidden state entering layer ``start`` (the one value of layer ``start - 1`` that layer ``start`` reads)
  comes from the previous stage: ``hetegen::stage_recv`` (not on the first stage);
* the hidden state leaving layer ``stop - 1`` goes to the next stage: ``hetegen::stage_send``, once per
  process it goes to (not on the last stage; a next stage of several tensor-parallel processes has several;
  a process that sends to none, ``dst = -1``, still computes it for its stage's collectives);
* the other layers' nodes (their KV-cache updates too) and, except on the last stage, the postlude are
  erased; the prelude stays (every stage needs its positions and masks; an unused embedding goes with dead
  code);
* the graph's outputs computed by the postlude (the logits) are the last stage's, given to every stage by
  ``hetegen::stage_broadcast``, so every process's ``generate`` picks the same next token.

Must not: touch anything but the graph (the collectives run when the graph does).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx.errors import UnsupportedModelError
from hetegen_fx.graph_utils import concrete, eliminate_dead_code, node_value
from hetegen_fx.ops import STAGE_BROADCAST, STAGE_RECV, STAGE_SEND

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_of(node: fx.Node) -> int | None:
    """The index of the decoder layer ``node`` belongs to, from its module stack (None: prelude/postlude)."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        m = _LAYER.search(str(path).replace("[", ".").replace("]", "").replace("'", ""))
        if m:
            return int(m.group(1))
    return None


def _sizes(graph: fx.Graph, v: torch.Tensor) -> tuple:
    """The sizes of ``v`` for a stand-in made in ``graph``: ints, and for a size that grows from call to call
    (a KV cache's length) nodes that compute it from the graph's inputs, so the stand-in grows with it and
    dynamo need not recompile the graph for every length. A size the inputs do not give is taken as it is."""
    symbols: dict = {}  # a symbol of the inputs' shapes → (placeholder, dim)
    for ph in graph.find_nodes(op="placeholder"):
        pv = node_value(ph)
        if isinstance(pv, torch.Tensor):
            for d, size in enumerate(pv.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    symbols.setdefault(size.node.expr, (ph, d, size))

    def build(expr):
        if expr.is_Integer:
            return int(expr), int(expr)
        if expr.is_Symbol:
            ph, d, size = symbols[expr]
            n = graph.call_function(torch.ops.aten.sym_size.int, (ph, d))
            n.meta["example_value"] = size
            return n, size
        if expr.is_Add or expr.is_Mul:
            op = operator.add if expr.is_Add else operator.mul
            node, value = build(expr.args[0])
            for arg in expr.args[1:]:
                other, other_value = build(arg)
                node = graph.call_function(op, (node, other))
                value = op(value, other_value)
                node.meta["example_value"] = value
            return node, value
        raise KeyError(expr)

    out = []
    for size in v.shape:
        if isinstance(size, torch.SymInt):
            try:
                size = build(size.node.expr)[0]
            except KeyError:
                size = concrete(size)
        out.append(int(size) if not isinstance(size, fx.Node) else size)
    return tuple(out)


class StageSplitPass(PassBase):
    """Rewrites the graph to the stage of layers ``[start, stop)`` (see the module)."""

    def __init__(
        self,
        start: int,
        stop: int,
        rank: int,
        ranks: int,
        device: str,
        recv_from: int | None = None,
        send_to: tuple[int, ...] | None = None,
        logits_from: int | None = None,
    ) -> None:
        """Stage ``rank`` of ``ranks`` (one process per stage unless told: ``recv_from`` the process the hidden
        state comes from, ``send_to`` those it goes to, ``logits_from`` the one that broadcasts the logits)."""
        super().__init__()
        self.start, self.stop, self.rank, self.ranks, self.device = start, stop, rank, ranks, device
        self.recv_from = recv_from if recv_from is not None or rank == 0 else rank - 1
        self.send_to = tuple(send_to) if send_to is not None else ((rank + 1,) if rank + 1 < ranks else ())
        self.logits_from = logits_from if logits_from is not None else ranks - 1

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        nodes = list(graph.nodes)
        # inputs (a layer's weights among them) stay: the graph's signature is the caller's
        layer = {n: None if n.op in ("placeholder", "output") else layer_of(n) for n in nodes}
        seen = sorted({i for i in layer.values() if i is not None})
        if not seen:
            raise UnsupportedModelError(
                "pipeline stages need the decoder layers in the graph's module stack (nn_module_stack); this "
                "graph has none: capture the model with dynamo (hetegen_fx.compile of a Hugging Face model)"
            )
        total = seen[-1] + 1
        if not 0 <= self.start < self.stop <= total:
            raise UnsupportedModelError(
                f"stage layers [{self.start}, {self.stop}) are outside the model's {total} layers"
            )
        first_layer = next(i for i, n in enumerate(nodes) if layer[n] is not None)
        last_layer = max(i for i, n in enumerate(nodes) if layer[n] is not None)
        post = {n for i, n in enumerate(nodes) if i > last_layer and layer[n] is None and n.op != "output"}
        last_stage = self.rank == self.ranks - 1
        if self.start > 0:
            h_in = self._boundary(nodes, layer, self.start - 1, lambda u: layer[u] == self.start)
            v = node_value(h_in)
            with graph.inserting_before(nodes[first_layer]):
                recv = graph.create_node(
                    "call_function",
                    STAGE_RECV,
                    ([int(d) for d in v.shape], v.dtype, self.recv_from, self.device),
                    name="hidden_from_previous_stage",
                )
            recv.meta["example_value"] = v
            for u in list(h_in.users):
                if layer[u] is not None and layer[u] >= self.start or u in post:
                    u.replace_input_with(h_in, recv)
        if not last_stage:
            h_out = self._boundary(
                nodes,
                layer,
                self.stop - 1,
                lambda u: (layer[u] is not None and layer[u] >= self.stop) or u in post,
            )
            # a process of a tensor-parallel stage that sends to nobody (the next stage has fewer processes)
            # still computes the stage's last layer, whose collectives the others wait for: dst -1 sends nothing
            for dst in reversed(self.send_to or (-1,)):
                with graph.inserting_after(h_out):
                    send = graph.create_node(
                        "call_function",
                        STAGE_SEND,
                        (h_out, dst),
                        name=f"to_rank_{dst}" if dst >= 0 else "kept_for_the_collectives",
                    )
                send.meta["example_value"] = None
        # the nodes of other layers that set state up from the inputs alone (an HF StaticCache's buffers, made
        # by the prefill graph, and its counters) stay: the caller's cache object gets every layer's
        dropped = {n for n in nodes if layer[n] is not None and not self.start <= layer[n] < self.stop}
        for n in nodes:
            if n in dropped and all(
                i not in dropped and i not in post and (layer[i] is None or i.op == "placeholder")
                for i in n.all_input_nodes
            ):
                dropped.discard(n)
        if not last_stage:
            dropped |= post
        out = graph.output_node()
        # outputs the postlude computes: the last stage's, broadcast; others of other layers: a stand-in
        flat, spec = torch.utils._pytree.tree_flatten(out.args)
        new_flat = []
        for a in flat:
            if isinstance(a, fx.Node) and a in dropped and a not in post:
                v = node_value(a)
                with graph.inserting_before(out):
                    stand_in = graph.create_node(
                        "call_function", torch.empty, (_sizes(graph, v),), {"dtype": v.dtype}
                    )
                stand_in.meta["example_value"] = v
                new_flat.append(stand_in)
            elif isinstance(a, fx.Node) and a in post:
                v = node_value(a)
                with graph.inserting_before(out):
                    src = a
                    if not last_stage:
                        src = graph.create_node(
                            "call_function", torch.empty, (_sizes(graph, v),), {"dtype": v.dtype}
                        )
                        src.meta["example_value"] = v
                    b = graph.create_node(
                        "call_function",
                        STAGE_BROADCAST,
                        (src, self.logits_from),
                        name=f"{a.name}_of_last_stage",
                    )
                b.meta["example_value"] = v
                new_flat.append(b)
            else:
                new_flat.append(a)
        out.args = torch.utils._pytree.tree_unflatten(new_flat, spec)
        for n in reversed(nodes):
            if n in dropped:
                for u in list(n.users):
                    if u not in dropped:
                        raise UnsupportedModelError(
                            f"{u.name} (layer {layer.get(u)}) reads {n.name} of layer {layer[n]}, outside the "
                            f"stage [{self.start}, {self.stop}): the layers do not hand over one hidden state"
                        )
                graph.erase_node(n)
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    @staticmethod
    def _boundary(nodes, layer, i: int, reads) -> fx.Node:
        """The one value of layer ``i`` (or the prelude for ``i = -1``) that ``reads`` nodes use."""
        found = [n for n in nodes if layer[n] == (i if i >= 0 else None) and any(reads(u) for u in n.users)]
        found = [
            n for n in found if isinstance(node_value(n), torch.Tensor) and node_value(n).is_floating_point()
        ]
        if len(found) != 1:
            raise UnsupportedModelError(
                f"layer {i} hands {len(found)} values to the next ({[n.name for n in found]}); pipeline stages need "
                "exactly one (the hidden state)"
            )
        return found[0]
