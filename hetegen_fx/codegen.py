"""Codegen: turn the scheduled graph into an executable GraphModule with readable code.

Owns: the last rewrite of a scheduled graph (dead code out, Python code generated). Must not: reorder or
place anything. What the graph then runs as is :mod:`hetegen_fx.launch`'s.
"""

from __future__ import annotations

import torch.fx as fx

from .graph_utils import eliminate_dead_code


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes and attributes, check the graph and generate its Python code."""
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
