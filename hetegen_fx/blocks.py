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
the worker and PartitionPass share, and the worker's activation (:func:`activate`). Must not: decide
whether a block runs as one job (PlacementPass does, by the lane model) or emit nodes (PartitionPass).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .linear import LinearSite

#: activation codes in a CPU job's descriptor (0: a plain job of Linears)
SILU, GELU, GELU_TANH, RELU = 1, 2, 3, 4

_SILU = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
_GELU = (F.gelu, torch.ops.aten.gelu.default, torch.ops.aten.gelu)
_RELU = (F.relu, torch.relu, torch.ops.aten.relu.default, torch.ops.aten.relu)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul)


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
    blocks = []
    for row in sites:
        h = row.x
        if not isinstance(h, fx.Node) or not _only_read_by(h, row):
            continue
        found = _gated(gm, h, by_node) or _plain(gm, h, by_node)
        if found is None:
            continue
        columns, act, between = found
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


def _only_read_by(node: fx.Node, site: LinearSite) -> bool:
    return set(node.users) <= {site.node, *site.absorbed}


def _gated(gm, h: fx.Node, by_node: dict) -> tuple | None:
    if h.op != "call_function" or h.target not in _MUL or len(h.args) != 2 or h.kwargs:
        return None
    for act_node, up_node in (h.args, reversed(h.args)):
        if not isinstance(act_node, fx.Node) or not isinstance(up_node, fx.Node):
            continue
        code = activation_code(act_node, gm)
        gate = by_node.get(act_node.args[0]) if code else None
        up = by_node.get(up_node)
        if gate is None or up is None or gate is up:
            continue
        if set(act_node.users) == {h} and set(gate.node.users) == {act_node} and set(up.node.users) == {h}:
            return (gate, up), code, (act_node, h)
    return None


def _plain(gm, h: fx.Node, by_node: dict) -> tuple | None:
    code = activation_code(h, gm)
    fc = by_node.get(h.args[0]) if code else None
    if fc is None or set(fc.node.users) != {h}:
        return None
    return (fc,), code, (h,)
