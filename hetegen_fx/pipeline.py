"""The pass pipeline, in one readable list: (stage split) → profile → place → partition → device → schedule →
codegen."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager

from . import meta
from .codegen import finalize
from .config import Config
from .errors import HetegenError
from .graph_utils import clone_graph_module
from .plan import Plan, load_plan
from .store import CompiledGraph, WeightStore


def build_passes(
    config: Config,
    store: WeightStore,
    example_inputs: Sequence[Any] | None = None,
    label: str = "",
    progress: Callable[[str], None] | None = None,
) -> list:
    """The ordered pass list for one graph."""
    from hetegen_fx.passes import DevicePass, PartitionPass, PlacementPass, ProfilePass, SchedulePass

    given = load_plan(config.plan) if config.plan is not None else None
    stage = []
    if config.pipeline_stage is not None:  # this process's layers of a pipeline (hetegen_fx.distributed)
        from hetegen_fx.distributed import stage_roles
        from hetegen_fx.passes.shard import ShardPass
        from hetegen_fx.passes.stages import StageSplitPass

        r = stage_roles(config.pipeline_stage)
        stage = [
            StageSplitPass(*r.layers, r.stage, r.stages, config.device, r.recv_from, r.send_to, r.logits_from)
        ]
        if r.tp > 1:
            stage.append(ShardPass(*r.layers, r.tp_rank, r.tp, r.group))
    return [
        *stage,
        ProfilePass(config, example_inputs, progress=progress, measure=given is None),
        PlacementPass(config, store, plan=given, label=label),
        PartitionPass(config, store),
        DevicePass(config, store),
        SchedulePass(),
    ]


def transform(
    gm: fx.GraphModule,
    config: Config,
    store: WeightStore,
    example_inputs: Sequence[Any] | None = None,
    label: str = "",
    debug_hook: Callable[[str, fx.GraphModule], None] | None = None,
) -> tuple[fx.GraphModule, Plan]:
    """Run the pipeline on a copy of ``gm`` (the caller's module is never modified); return it and its Plan.

    ``debug_hook(pass_name, gm)`` is called after each pass, e.g. to dump or draw the graph.
    """
    work = clone_graph_module(gm)
    _report_unrecognised(work, label)
    progress = (
        (lambda msg: print(f"[hetegen] {msg}", file=sys.stderr, flush=True)) if config.verbose else None
    )
    passes = build_passes(config, store, example_inputs, label, progress)
    if debug_hook is not None:
        passes = [_hooked(p, debug_hook) for p in passes]
    pm = PassManager(passes, run_checks_after_each_pass=True)
    pm.add_checks(lambda m: m.graph.lint())
    from .runtime import get_runtime

    # profiling times jobs on the device's worker and partitioning sizes its arena: not beside another call
    with get_runtime(config.device).lock:
        try:
            result = pm(work)
        except Exception as e:  # PassManager wraps pass errors; surface ours unchanged
            cause = e.__cause__
            if isinstance(cause, HetegenError):
                raise cause.with_traceback(cause.__traceback__) from None
            raise
    out = finalize(result.graph_module)
    plan = out.meta[meta.PLAN]
    adopt(out, store)  # now that every pass succeeded: a failed compile leaves the store as it was
    store.graphs.append(CompiledGraph(out, plan, label))
    return out, plan


def adopt(gm: fx.GraphModule, store: WeightStore) -> None:
    """Give ``store`` what PlacementPass decided for its model in ``gm``'s meta: the model's first ledger, its
    reserves and residency (``meta.LEDGER``; a model that has one keeps it), the rows kept in RAM under a
    storage tier (``meta.HOST_ROWS``, likewise), and the tensors of each Linear (``meta.TENSORS``)."""
    first = gm.meta.pop(meta.LEDGER, None)
    if first is not None and store.ledger is None:
        store.ledger, store.reserved = first
        store.residency = dict(store.ledger.residency)
    rows = gm.meta.pop(meta.HOST_ROWS, None)
    if rows is not None and store.host_rows is None:
        store.host_rows = dict(rows)
    for name, tensors in gm.meta.pop(meta.TENSORS, {}).items():
        store.tensors_of.setdefault(name, tensors)


def _report_unrecognised(gm: fx.GraphModule, label: str) -> None:
    """Warn about Linear-like calls that are not split (quantized or custom Linears): never skip them silently."""
    from .linear import unrecognised_linears

    found = unrecognised_linears(gm)
    if not found:
        return
    shown = ", ".join(f"{path} ({cls})" for path, cls in list(found.items())[:6])
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    warnings.warn(
        f"hetegen: {len(found)} Linear-like call(s) in {label or 'the graph'} are not Linears hetegen_fx can "
        f"split (quantized, or with a weight that is no floating-point parameter): {shown}{more}. They run as "
        "written, with the rest of the graph on the device: not offloaded, not split, their weights not counted "
        "in the budget. Dequantize such layers (e.g. load the model with dtype=torch.float16) to have them placed",
        RuntimeWarning,
        stacklevel=3,
    )


def _hooked(p, hook):
    def run(gm):
        res = p(gm)
        hook(type(p).__name__, res.graph_module)
        return res

    run.__name__ = type(p).__name__
    return run
