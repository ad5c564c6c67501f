"""Pictures of a compilation: a Plan as a chart, one partitioned layer as a graph.

* :func:`predict_timeline` — a pure model of one step of a Plan on three lanes ("PCIe", "CPU", "GPU");
* :func:`plot_plan` — α per Linear and that predicted timeline, as a PNG or SVG (needs matplotlib);
* :func:`draw_layer` — the nodes of one partitioned Linear, colored by side (needs pydot and graphviz).

matplotlib and pydot are optional: they are imported when a picture is asked for, and a missing one is
a :class:`~hetegen_fx.errors.HetegenError` that says what to install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch.fx as fx

from . import meta
from .errors import HetegenError
from .graph_utils import layer_label
from .plan import Plan, staging_offsets

LANES = ("PCIe", "CPU", "GPU")
SIDE_COLORS = {
    "cpu": "#4C72B0",  # blue
    "gpu": "#55A868",  # green
    "copy": "#DD8452",  # orange
    "sync": "#C44E52",  # red
    "move": "#8172B3",  # purple
    "host": "#937860",  # brown
}
_LANE_COLORS = {"PCIe": SIDE_COLORS["copy"], "CPU": SIDE_COLORS["cpu"], "GPU": SIDE_COLORS["gpu"]}
_RESIDENT_COLOR = "#9E9E9E"


class Span(NamedTuple):
    """One bar of the predicted timeline, in seconds from the start of the step."""

    lane: str  # "PCIe" | "CPU" | "GPU"
    name: str  # the Linear's name (its weight's qualified name)
    start: float
    end: float


def _regions(plan: Plan, prefetch: int | None) -> dict[str, tuple[int, int]]:
    """Staging region ``(start, end)`` of every offloaded Linear that has a GPU part."""
    users = [lp for lp in plan.layers if not lp.resident and lp.split < lp.features]
    if prefetch is None and all(lp.slot >= 0 for lp in users):  # as PartitionPass laid them out
        return {lp.name: (lp.slot, lp.slot + lp.gpu_part_bytes) for lp in users}
    if prefetch is not None and prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")
    parts = [lp.gpu_part_bytes for lp in users]
    offsets = staging_offsets(parts, prefetch)
    return {lp.name: (o, o + n) for lp, o, n in zip(users, offsets, parts, strict=True)}


def predict_timeline(plan: Plan, prefetch: int | None = None) -> list[Span]:
    """Predicted schedule of one step of ``plan`` (e.g. one decode token), as ``Span(lane, name, start, end)``.

    Linears run in the plan's (graph) order. For an offloaded Linear with CPU share ``a = split / out``:

    * its copy, ``(1 - a) · t_copy``, goes on the "PCIe" lane: copies run back to back, each as early as
      possible, but a copy into a region of the staging arena cannot start before every earlier GPU part
      that read any of its bytes has ended (so the copies of ``prefetch`` consecutive GPU parts may be in
      flight ahead of the compute);
    * its CPU part, ``lp.t_cpu_part`` (fixed part + a · the rest), goes on the "CPU" lane, in graph order, once its input is ready;
    * its GPU part, ``(1 - a) · t_gpu``, goes on the "GPU" lane once both its copy and the previous GPU work
      have ended. The layer's output (the CPU part joined on the GPU) is ready when both parts have ended.

    A resident Linear takes ``t_gpu`` on the "GPU" lane. A layer's input is the previous layer's output
    (a conservative chain: q/k/v projections that could overlap are serialised), except inside an MLP block
    (``LayerPlan.block``): its Linears all start from the block's input, the CPU lane running their CPU parts
    and the GPU lane their GPU parts back to back with no join between them; the block's output is ready
    when both lanes have finished its last Linear.

    ``prefetch=None`` uses the regions PartitionPass wrote into the plan (``LayerPlan.slot``); a number lays
    the parts out again in an arena sized for that many, to ask "what if".
    """
    regions = _regions(plan, prefetch)
    spans: list[Span] = []
    pcie = cpu = gpu = 0.0  # when each lane is free
    ready = 0.0  # when the current layer's input is ready
    read: list[tuple[int, int, float]] = []  # (start, end, when its GPU part ended) of each region so far
    block_in: float | None = None  # the input of the MLP block being walked
    for lp in plan.layers:
        if lp.resident:
            start = max(gpu, ready)
            gpu = ready = start + lp.t_gpu
            spans.append(Span("GPU", lp.name, start, gpu))
            continue
        if lp.block and block_in is None:
            block_in = ready
        inside = lp.block and not lp.split_inputs  # a block's column Linear: nothing waits for its join
        if lp.block:
            ready = block_in
        a = lp.share
        cpu_end = ready
        if lp.split > 0:
            start = max(cpu, ready)
            cpu = cpu_end = start + lp.t_cpu_part
            spans.append(Span("CPU", lp.name, start, cpu_end))
        gpu_end = ready
        if lp.split < lp.features:
            a0, b0 = regions[lp.name]
            c0 = max([pcie] + [t for a1, b1, t in read if a1 < b0 and a0 < b1])
            pcie = c0 + (1 - a) * lp.t_copy
            spans.append(Span("PCIe", lp.name, c0, pcie))
            g0 = max(gpu, ready, pcie)
            gpu_end = g0 + (1 - a) * lp.t_gpu
            spans.append(Span("GPU", lp.name, g0, gpu_end))
            read.append((a0, b0, gpu_end))
        if inside:
            continue
        block_in = None
        ready = max(cpu_end, gpu_end)
        gpu = max(gpu, ready)  # the join (cat / move of the CPU result) happens on the GPU stream
    return spans


# --------------------------------------------------------------------------------------------------------------
# plot_plan


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise HetegenError("plotting a plan needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return layer_label(name).replace("layers.", "").replace("self_attn.", "").replace("mlp.", "")


def plot_plan(
    plan: Plan,
    path: str | os.PathLike,
    prefetch: int | None = None,
    title: str | None = None,
    changes: list | None = None,
) -> Path:
    """Draw ``plan`` to ``path`` (format by extension: .png or .svg): α per Linear, and the predicted
    timeline of one step (:func:`predict_timeline`). ``title`` is the picture's first line, e.g.
    ``"SmolLM2-135M, 400 MiB budget: the decode step (1 token)"``; None: the plan's label. ``changes``: the
    model's residency changes while it ran (:class:`hetegen_fx.ledger.ResidencyChange`, oldest first): each
    Linear's last move is marked (▲ promoted, ▼ demoted) and the last change is named. Returns the path."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise HetegenError(f"cannot write {str(p)!r}: plot_plan writes .png or .svg files")
    if not p.parent.is_dir():
        raise HetegenError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    plt = _pyplot()
    from matplotlib.patches import Patch

    n = len(plan.layers)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, min(24.0, 0.28 * n + 4)), 8.5))
    budget = "unlimited" if plan.gpu_memory is None else _fmt_bytes(plan.gpu_memory)
    n_off = sum(not lp.resident for lp in plan.layers)
    label = plan.label if title is None else title
    label = label if len(label) <= 90 else label[:89] + "…"
    fig.suptitle(
        (f"{label}\n" if label else "")
        + f"{n} Linears at {plan.tokens} token(s) on {plan.device}, budget {budget}: "
        f"{n - n_off} resident, {n_off} offloaded (costs: {plan.source})"
        + (f"\n{len(changes)} residency change(s) while it ran; the last: {changes[-1]}" if changes else ""),
        fontsize=10,
    )

    # panel 1: α per Linear
    xs = list(range(n))
    alphas = [lp.share for lp in plan.layers]
    res = [i for i, lp in enumerate(plan.layers) if lp.resident]
    off = [i for i, lp in enumerate(plan.layers) if not lp.resident]
    for i in res:  # resident: the whole layer on the GPU, no α
        ax1.axvspan(i - 0.45, i + 0.45, color=_RESIDENT_COLOR, alpha=0.25, hatch="//", linewidth=0)
        ax1.text(i, 0.02, "R", ha="center", va="bottom", fontsize=7, color="#424242")
    ax1.bar(off, [alphas[i] for i in off], color=SIDE_COLORS["cpu"], width=0.8)
    moved: dict[str, bool] = {}  # Linear → promoted (True) or demoted (False) by its last move
    for ch in changes or ():
        moved.update(dict.fromkeys(ch.promoted, True))
        moved.update(dict.fromkeys(ch.demoted, False))
    for i, lp in enumerate(plan.layers):
        if lp.name in moved:
            up = moved[lp.name]
            ax1.text(
                i,
                1.0,
                "▲" if up else "▼",
                ha="center",
                va="bottom",
                fontsize=8,
                color="#2E7D32" if up else "#C62828",
            )
    ax1.set_ylim(0, 1.05)
    ax1.set_xlim(-0.6, max(n, 1) - 0.4)
    ax1.set_ylabel("α (CPU share)")
    ax1.set_title("CPU share of each Linear's output features", fontsize=10)
    step = max(1, n // 60)
    ax1.set_xticks(xs[::step])
    ax1.set_xticklabels([_short(plan.layers[i].name) for i in xs[::step]], rotation=90, fontsize=7)
    ax1.legend(
        handles=[
            Patch(color=SIDE_COLORS["cpu"], label="offloaded: α"),
            Patch(facecolor=_RESIDENT_COLOR, alpha=0.25, hatch="//", label="resident (R): all on the GPU"),
            *(
                [
                    Patch(color="#2E7D32", label="▲ promoted while it ran"),
                    Patch(color="#C62828", label="▼ demoted while it ran"),
                ]
                if moved
                else []
            ),
        ],
        loc="upper right",
        fontsize=8,
    )

    # panel 2: predicted timeline of one step
    spans = predict_timeline(plan, prefetch)
    rows = {lane: i for i, lane in enumerate(reversed(LANES))}
    resident = {lp.name for lp in plan.layers if lp.resident}
    for sp in spans:
        color = _RESIDENT_COLOR if sp.name in resident else _LANE_COLORS[sp.lane]
        ax2.broken_barh(
            [(sp.start * 1e3, (sp.end - sp.start) * 1e3)],
            (rows[sp.lane] - 0.35, 0.7),
            facecolors=color,
            edgecolors="white",
            linewidth=0.4,
        )
    total = max((sp.end for sp in spans), default=0.0)
    ax2.set_yticks(list(rows.values()))
    ax2.set_yticklabels(list(rows.keys()))
    ax2.set_xlabel("ms")
    ax2.set_xlim(0, max(total * 1e3 * 1.02, 1e-6))
    depth = "plan's staging" if prefetch is None else f"prefetch {prefetch}"
    ax2.set_title(
        f"predicted timeline of one step ({depth}): {total * 1e3:.3f} ms "
        f"(sum of per-layer predictions {plan.predicted_seconds * 1e3:.3f} ms)",
        fontsize=10,
    )
    ax2.legend(
        handles=[
            Patch(color=_LANE_COLORS["PCIe"], label="copy (GPU part's weights)"),
            Patch(color=_LANE_COLORS["CPU"], label="CPU part"),
            Patch(color=_LANE_COLORS["GPU"], label="GPU part"),
            Patch(color=_RESIDENT_COLOR, label="resident Linear"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        ncol=4,
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(p, format=fmt, dpi=110)
    plt.close(fig)
    return p


def _fmt_bytes(n: int) -> str:
    from .config import format_bytes

    return format_bytes(n)


# --------------------------------------------------------------------------------------------------------------
# draw_layer


def _pydot():
    try:
        import pydot
    except ImportError as e:
        raise HetegenError(
            "drawing a layer needs pydot and graphviz: pip install pydot, and apt-get install graphviz "
            "(or brew install graphviz) for the `dot` program"
        ) from e
    return pydot


def layer_names(gm: fx.GraphModule) -> list[str]:
    """The Linears a partitioned graph has nodes for (:data:`meta.LAYER`), in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        if meta.LAYER in n.meta:
            seen.setdefault(n.meta[meta.LAYER], None)
    return list(seen)


def _resolve_layer(gm: fx.GraphModule, layer: str) -> str:
    names = layer_names(gm)
    if layer in names:
        return layer
    hits = [n for n in names if n == f"{layer}.weight" or n.removesuffix(".weight").endswith(layer)]
    if len(hits) == 1:
        return hits[0]
    some = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    if not names:
        raise HetegenError("this graph has no partitioned Linears (was it compiled by hetegen_fx?)")
    why = f"matches {len(hits)} Linears" if hits else "is not a Linear of this graph"
    raise HetegenError(f"layer {layer!r} {why}; its Linears are: {some}")


def layer_dot(gm: fx.GraphModule, layer: str):
    """A ``pydot.Dot`` of the nodes of Linear ``layer`` plus their direct inputs and users."""
    pydot = _pydot()
    layer = _resolve_layer(gm, layer)
    inside = [n for n in gm.graph.nodes if n.meta.get(meta.LAYER) == layer]
    members = set(inside)
    around = {i for n in inside for i in n.all_input_nodes if i not in members}
    around |= {u for n in inside for u in n.users if u not in members}
    g = pydot.Dot(graph_type="digraph", rankdir="TB", label=f"{layer}", labelloc="t", fontsize="12")
    g.set_node_defaults(fontname="Helvetica", fontsize="10", shape="box", style="rounded,filled")
    ids = {}
    for i, n in enumerate(n for n in gm.graph.nodes if n in members or n in around):
        ids[n] = f"n{i}"
        side = n.meta.get(meta.SIDE) if n in members else None
        if n.op == "call_function":
            label = f"{n.name}\\n{getattr(n.target, '__name__', str(n.target))}"
        elif n.op in ("call_module", "call_method"):
            label = f"{n.name}\\n{n.op}: {n.target}"
        else:
            label = f"{n.name}\\n({n.op})"
        label = label.replace('"', "'")
        if n.meta.get(meta.SLOT) is not None:
            label += f"\\nslot {n.meta[meta.SLOT]}"
        if side is None:
            g.add_node(pydot.Node(ids[n], label=f'"{label}"', fillcolor="white", style="dashed,rounded"))
        else:
            label += f"\\n[{side}]"
            color = SIDE_COLORS.get(side, "#DDDDDD")
            g.add_node(pydot.Node(ids[n], label=f'"{label}"', fillcolor=color, fontcolor="white"))
    for n in ids:
        for i in n.all_input_nodes:
            if i in ids and (n in members or i in members):
                g.add_edge(pydot.Edge(ids[i], ids[n]))
    return g


def draw_layer(graph_module: fx.GraphModule, layer_name: str, path: str | os.PathLike) -> Path:
    """Draw the partitioned nodes of one Linear (``meta.LAYER == layer_name``, or a unique suffix of it such
    as ``layers.0.mlp.down_proj``) with their direct inputs and users, colored by side: cpu blue, gpu green,
    copy orange, sync red, move purple; the surrounding nodes dashed.

    The format follows the extension: ``.dot`` writes the Graphviz source (needs pydot only); ``.png``,
    ``.svg``, ``.pdf`` run Graphviz's ``dot`` program. Returns the path.
    """
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("dot", "png", "svg", "pdf"):
        raise HetegenError(f"cannot write {str(p)!r}: draw_layer writes .png, .svg, .pdf or .dot files")
    g = layer_dot(graph_module, layer_name)
    if fmt == "dot":
        p.write_text(g.to_string())
        return p
    if shutil.which("dot") is None:
        raise HetegenError(
            f"writing {p.name} needs Graphviz's `dot` program: apt-get install graphviz (or brew install "
            "graphviz), or ask for a .dot file instead"
        )
    p.write_bytes(g.create(format=fmt))
    return p
