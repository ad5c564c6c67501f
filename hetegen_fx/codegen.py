"""Codegen: turn the scheduled graph into an executable GraphModule with readable code.

Owns: the last rewrite of a scheduled graph (dead code out, Python code generated) and its direct form (custom
ops as plain calls, stretches handed to :mod:`hetegen_fx.graphs`). Must not: reorder or place anything.
"""

from __future__ import annotations

import torch.fx as fx

from . import ops
from .graph_utils import clone_graph_module, eliminate_dead_code
from .graphs import GraphPool, fuse_stretches


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes and attributes, check the graph and generate its Python code."""
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def direct(gm: fx.GraphModule, pool: GraphPool | None = None) -> fx.GraphModule:
    """The program of ``gm`` with its ``hetegen::`` ops called as plain functions (``ops.DIRECT``), and,
    given a graph ``pool``, its stretches of device work recorded and replayed as CUDA graphs
    (:func:`hetegen_fx.graphs.fuse_stretches`).

    A custom op costs ~20 µs of dispatch per call on the thread that launches GPU work, and a decode step
    of a 7B model makes a few hundred of them; the functions do the same work without the dispatcher.
    ``gm``, with the ops, stays the graph to inspect, export and trace. Weights are shared, not copied.
    """
    fast = clone_graph_module(gm)
    for node in fast.graph.nodes:
        if node.op == "call_function":
            for op, fn in ops.DIRECT.items():
                if ops.is_op(node.target, op):
                    node.target = fn
    fast.recompile()
    if pool is not None:
        fuse_stretches(fast, pool)
    return fast
