"""PartitionPass: rewrite each Linear according to its LayerPlan.

A resident Linear reads its weight from the device copy. An offloaded one with CPU rows ``[0, k)``
becomes::

    staged = hetegen.copy_h2d(w_gpu_host, slot, device)     # async copy of rows [k, out)
    y_cpu  = linear(to_device(x, "cpu"), w_cpu, b_cpu)        # CPU part from host memory, meanwhile
    hetegen.wait_copy(staged, slot)                           # the copy has landed
    y_gpu  = linear(x, staged, b_gpu)                         # GPU part
    hetegen.release_slot(staged, slot)                        # the staging buffer may be reused
    y      = cat([to_device(y_cpu, device), y_gpu], -1)

α = 0 leaves only the copy + GPU part, α = 1 only the CPU part (no copy, no concat).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.config import Config
from hetegen_fx.graph_utils import attach, layer_label, safe_name
from hetegen_fx.linear import LinearSite, match_linear
from hetegen_fx.ops import COPY, RELEASE, WAIT
from hetegen_fx.plan import LayerPlan
from hetegen_fx.runtime import get_runtime, to_device
from hetegen_fx.store import WeightStore

HOST = "cpu"


class PartitionPass(PassBase):
    """Rewrites every Linear that carries a LayerPlan (:data:`meta.PLACEMENT`)."""

    def __init__(self, config: Config, store: WeightStore) -> None:
        super().__init__()
        self.config = config
        self.store = store

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if meta.PLACEMENT in n.meta]
        slot = 0
        self._x_cpu: dict[fx.Node, fx.Node] = {}  # one device→host copy per input shared by several Linears
        for node in nodes:
            site = match_linear(node, gm)  # re-matched: its input may be a Linear rewritten just before
            lp: LayerPlan = node.meta[meta.PLACEMENT]
            assert site is not None and site.name == lp.name, f"{node} no longer computes Linear {lp.name}"
            with gm.graph.inserting_before(node):
                if lp.resident:
                    out = self._resident(gm, site)
                else:
                    lp.slot = slot if lp.split < lp.out_features else -1
                    out = self._split(gm, site, lp)
                    slot = (slot + 1) % self.config.prefetch if lp.slot >= 0 else slot
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            for dead in site.absorbed:
                if not dead.users:
                    gm.graph.erase_node(dead)
        self._size_staging(nodes)
        gm.graph.lint()
        return PassResult(gm, bool(nodes))

    def _size_staging(self, nodes: list[fx.Node]) -> None:
        """Grow the staging slots now, at compile time, to this graph's largest GPU part: a slot that grew
        while the graph runs would hold its old and new buffers at once, above the budget."""
        parts = [n.meta[meta.PLACEMENT].gpu_part_bytes for n in nodes if not n.meta[meta.PLACEMENT].resident]
        if parts and max(parts) > 0:
            rt = get_runtime(self.config.device)
            for slot in range(self.config.prefetch):
                rt.reserve(slot, max(parts))

    # -- emission helpers ---------------------------------------------------------------------------------

    def _new(self, gm: fx.GraphModule, target, args: tuple, name: str, side: str, layer: str, slot: int = -1):
        node = gm.graph.create_node("call_function", target, args, name=name)
        node.meta[meta.SIDE] = side
        node.meta[meta.LAYER] = layer
        if slot >= 0:
            node.meta[meta.SLOT] = slot
        return node

    def _attach(self, gm: fx.GraphModule, name: str, t: torch.Tensor, side: str, layer: str) -> fx.Node:
        node = attach(gm, name, t)
        node.meta[meta.SIDE] = side
        node.meta[meta.LAYER] = layer
        return node

    def _linear(self, gm, site: LinearSite, x, w, b, name: str, side: str) -> fx.Node:
        layer = site.name
        if site.layout == "out_in":
            args = (x, w) if b is None else (x, w, b)
            return self._new(gm, F.linear, args, name, side, layer)
        if site.form == "addmm" and b is not None:
            return self._new(gm, torch.addmm, (b, x, w), name, side, layer)
        y = self._new(gm, torch.matmul, (x, w), name if b is None else name + "_mm", side, layer)
        return y if b is None else self._new(gm, torch.add, (y, b), name, side, layer)

    def _resident(self, gm: fx.GraphModule, site: LinearSite) -> fx.Node:
        s, store, short = site.name, self.store, _short(site.name)
        w = self._attach(gm, f"{s}__dev", store.on_device(site.weight.tensor), "gpu", s)
        b = None
        if site.bias is not None:
            b = self._attach(gm, f"{site.bias.name}__dev", store.on_device(site.bias.tensor), "gpu", s)
        return self._linear(gm, site, site.x, w, b, short, "gpu")

    def _split(self, gm: fx.GraphModule, site: LinearSite, lp: LayerPlan) -> fx.Node:
        s, store, short, k, out = site.name, self.store, _short(site.name), lp.split, lp.out_features
        device = self.config.device
        w, bias = site.weight.tensor, site.bias.tensor if site.bias is not None else None
        staged = None
        if k < out:
            w_host = self._attach(
                gm, f"{s}__gpu_part_host", store.host_part(w, site.layout, k, out, pin=True), "copy", s
            )
            staged = self._new(gm, COPY, (w_host, lp.slot, device), f"{short}_copy", "copy", s, lp.slot)
        y_cpu = None
        if k > 0:
            w_cpu = self._attach(
                gm, f"{s}__cpu_part", store.host_part(w, site.layout, 0, k, pin=False), "cpu", s
            )
            b_cpu = None
            if bias is not None:
                b_cpu = self._attach(gm, f"{site.bias.name}__cpu_part", bias.detach()[:k], "cpu", s)
            x_cpu = self._x_cpu.get(site.x)
            if x_cpu is None:
                x_cpu = self._x_cpu[site.x] = self._new(
                    gm, to_device, (site.x, HOST), f"{short}_x_cpu", "move", s
                )
            y_cpu = self._linear(gm, site, x_cpu, w_cpu, b_cpu, f"{short}_cpu", "cpu")
            if k == out:
                return self._new(gm, to_device, (y_cpu, device), f"{short}_out", "move", s)
            y_cpu = self._new(gm, to_device, (y_cpu, device), f"{short}_cpu_out", "move", s)
        self._new(gm, WAIT, (staged, lp.slot), f"{short}_wait", "sync", s, lp.slot)
        b_gpu = None
        if bias is not None:
            b_gpu = self._attach(
                gm, f"{site.bias.name}__gpu_part", store.on_device(bias, rows=(k, out)), "gpu", s
            )
        y_gpu = self._linear(gm, site, site.x, staged, b_gpu, f"{short}_gpu", "gpu")
        self._new(gm, RELEASE, (staged, lp.slot), f"{short}_release", "sync", s, lp.slot)
        if y_cpu is None:
            return y_gpu
        return self._new(gm, torch.cat, ([y_cpu, y_gpu], -1), f"{short}_out", "gpu", s)


def _short(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` → ``layers_0_self_attn_q_proj``."""
    return safe_name(layer_label(name))
