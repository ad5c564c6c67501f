"""Codegen: turn the scheduled graph into an executable GraphModule with readable code."""

from __future__ import annotations

import torch.fx as fx

from . import ops  # noqa: F401  (registers the hetegen:: ops the generated code calls)


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes and attributes, check the graph and generate its Python code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
