"""PartitionPass: rewrite each Linear according to its LayerPlan.

A resident Linear reads its weight from the device copy. An offloaded one with CPU rows ``[0, k)``
becomes::

    staged = hetegen.copy_h2d(w_gpu_host, slot, device)     # async copy of rows [k, out) into the
                                                              # staging arena, at byte offset ``slot``
    hetegen.wait_copy(staged, slot)                           # the copy has landed
    y_gpu  = linear(x, staged, b_gpu)                         # GPU part
    hetegen.release_slot(staged, slot)                        # the region may be overwritten
    y      = cat([y_cpu, y_gpu], -1)

and the CPU parts of all the split Linears that read the same ``x`` (q/k/v, gate/up) form one job on the
worker thread (:mod:`hetegen_fx.host`), queued before their GPU parts and collected after them::

    ticket = hetegen.cpu_begin(x, [w_q[:k_q], w_k[:k_k], ...], [b_q[:k_q], ...], device)
    y_cpus = hetegen.cpu_end(ticket, x, k_q + k_k + ..., device)     # [..., k_q + k_k + ...] on the device
    y_cpu  = narrow(y_cpus, -1, offset, k)                            # each Linear's columns

α = 0 leaves only the copy + GPU part, α = 1 only the CPU part (no copy, no concat). A graph with CPU
jobs ends with ``hetegen.cpu_wait(device)``: its jobs have all run before its outputs are handed back.

An MLP block (``LayerPlan.block``, :mod:`hetegen_fx.blocks`) is one CPU job split by intermediate features
``[0, k)`` (gate/up's output rows, down's input columns), its device share computed from copies of the rest::

    ticket = hetegen.cpu_begin(x, [w_gate[:k], w_up[:k], w_down[:, :k]], [...], device, act)
    y_gate, y_up = <copy, wait, linear, release> of rows [k, I) each
    h_gpu  = act(y_gate) * y_up                                       # the graph's own nodes, copied
    y_dev  = linear(h_gpu, <copy, wait> of w_down[:, k:], b_down)     # a partial sum; then release
    y      = hetegen.cpu_end(ticket, x, out, device) + y_dev         # the CPU's partial sum

A Linear with rows in storage (the storage tier, ``LayerPlan.storage_rows``) keeps rows ``[0, r)`` in RAM
and reads rows ``[r, out)`` into a slot of the storage reader's ring at every step; its split ``k`` falls
anywhere, as the lane model put it. With ``k <= r`` the CPU computes RAM rows as above, and the device's
rows come from RAM and the ring in one copy::

    w_sto  = hetegen.fetch_rows(store, name, r, out - r, in, dtype)   # waits until the rows are read
    staged = hetegen.copy_h2d(w_ram[k:r], slot, device, w_sto)        # rows [k, r) then [r, out)
    hetegen.fetched(staged, store, name, r)                          # the ring slot may be read into again
    ...                                                               # wait, GPU part, release as above

With ``k > r`` the CPU computes ring rows too: the rows are fetched before the job is queued, the job reads
``w_ram[:r]`` and the ring's first ``k - r`` rows, the device the rest, and the slot is given back after the
job's ``cpu_end`` (where the compute stream waits for the job)::

    w_cpu  = hetegen.fetch_rows(store, name, r, k - r, in, dtype)     # the ring's rows [0, k - r)
    ticket = hetegen.cpu_begin(x, [w_ram[:r], w_cpu, ...], ...)
    w_dev  = hetegen.ring_rows(ticket, store, name, r, k - r, out - k, in, dtype)   # the ring's rows [k - r, ...)
    staged = hetegen.copy_h2d(w_dev, slot, device)
    ...
    y      = cat([narrow(hetegen.cpu_end(...), ...), y_gpu], -1)
    hetegen.fetched(y, store, name, r, True)                         # once the job and the copy are done

Where Linears of one input have storage rows, all its offloaded Linears are emitted together at the first,
whatever their splits, so every graph of the model fetches the storage parts in one order (the reader's).
Once one Linear of a job reads ring rows, every storage part of the job is fetched before the job is
queued, so the job holds as many ring slots as it has storage parts; PlacementPass keeps that within
``storage_slots``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.blocks import find_blocks, keeps_features, with_features
from hetegen_fx.config import Config
from hetegen_fx.errors import ConfigError
from hetegen_fx.graph_utils import attach, layer_label, safe_name
from hetegen_fx.linear import LinearSite, match_linear
from hetegen_fx.ops import COPY, CPU_BEGIN, CPU_END, CPU_WAIT, FETCH, FETCHED, RELEASE, RING_ROWS, WAIT
from hetegen_fx.plan import LayerPlan, staging_offsets, staging_size
from hetegen_fx.store import WeightStore, token_of


class PartitionPass(PassBase):
    """Rewrites every Linear that carries a LayerPlan (:data:`meta.PLACEMENT`)."""

    def __init__(self, config: Config, store: WeightStore) -> None:
        super().__init__()
        self.config = config
        self.store = store

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if meta.PLACEMENT in n.meta]
        groups = self._cpu_groups(gm, nodes)
        self._offsets = self._lay_out_staging(gm, nodes, groups)
        done: dict[fx.Node, fx.Node] = {}  # Linears of a group already emitted with its first member
        finished: set[fx.Node] = set()  # the Linears of MLP blocks emitted (and erased) with their first
        for node in nodes:
            if node in finished:
                continue
            site = match_linear(node, gm)  # re-matched: its input may be a Linear rewritten just before
            lp: LayerPlan = node.meta[meta.PLACEMENT]
            assert site is not None and site.name == lp.name, f"{node} no longer computes Linear {lp.name}"
            if lp.block and not lp.resident and node in groups:
                with gm.graph.inserting_before(node):
                    finished.update(self._block_job(gm, groups[node]))
                continue
            if node in done:
                out = done.pop(node)
            else:
                with gm.graph.inserting_before(node):
                    if lp.resident:
                        out = self._resident(gm, site)
                    elif node in groups:
                        done.update(self._split_group(gm, groups[node]))
                        out = done.pop(node)
                    else:
                        out = self._split(gm, site, lp)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            for dead in site.absorbed:
                if not dead.users:
                    gm.graph.erase_node(dead)
        if any(lp.split > 0 for n in nodes if not (lp := n.meta[meta.PLACEMENT]).resident):
            with gm.graph.inserting_before(gm.graph.output_node()):  # before anything blocks on the device
                barrier = gm.graph.create_node(
                    "call_function", CPU_WAIT, (self.config.device,), name="cpu_jobs_done"
                )
                barrier.meta[meta.SIDE] = "sync"  # no LAYER: it belongs to no Linear
        gm.graph.lint()
        return PassResult(gm, bool(nodes))

    def _cpu_groups(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
        """Linear node → the Linears emitted with it, in graph order: the split Linears (CPU part > 0) of its
        CPU job, those that read the same input or the Linears of one MLP block. Where Linears of one input
        have storage rows, every offloaded Linear of that input, CPU part or not, is emitted with them at the
        first: so every graph of the model fetches storage parts in the same order whatever its splits (the
        storage reader reads them in one order)."""
        by_input: dict[fx.Node | str, list[fx.Node]] = {}
        for node in nodes:
            lp: LayerPlan = node.meta[meta.PLACEMENT]
            if not lp.resident:
                by_input.setdefault(lp.block or match_linear(node, gm).x, []).append(node)
        groups = {}
        for members in by_input.values():
            if not any(m.meta[meta.PLACEMENT].storage_rows for m in members):
                members = [m for m in members if m.meta[meta.PLACEMENT].split > 0]
            groups.update((n, members) for n in members)
        return groups

    def _lay_out_staging(
        self, gm: fx.GraphModule, nodes: list[fx.Node], groups: dict[fx.Node, list[fx.Node]]
    ) -> dict[fx.Node, int]:
        """Each Linear node's region in the staging arena, in the order the copies are emitted (a CPU job's
        Linears together, at the first of them; per node, as one weight may be used twice), and the arena's
        size as laid out in the Plan (the launcher grows the arena to it before the graph's first call:
        :func:`hetegen_fx.launch.apply`)."""
        order, seen = [], set()
        for node in nodes:
            for member in groups.get(node, [node]):
                if member not in seen:
                    seen.add(member)
                    order.append(member)
        parts = [member.meta[meta.PLACEMENT].gpu_part_bytes for member in order]
        size = staging_size(parts, self.config.prefetch)
        plan = gm.meta.get(meta.PLAN)
        if plan is not None:
            plan.reserved["staging"] = size  # as laid out (PlacementPass estimated it in graph order)
        return dict(zip(order, staging_offsets(parts, self.config.prefetch), strict=True))

    # -- emission helpers ---------------------------------------------------------------------------------

    def _new(self, gm: fx.GraphModule, target, args: tuple, name: str, side: str, layer: str, region=None):
        node = gm.graph.create_node("call_function", target, args, name=name)
        node.meta[meta.SIDE] = side
        node.meta[meta.LAYER] = layer
        if region is not None:
            node.meta[meta.SLOT], node.meta[meta.SLOT_BYTES] = region
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

    def _split_group(self, gm: fx.GraphModule, members: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        """Emit the Linears of one CPU job together: the job is queued first, then every GPU part, then the
        job's result is collected (where the stream waits for the CPU) and each Linear's output assembled."""
        sites = [match_linear(m, gm) for m in members]
        plans: list[LayerPlan] = [m.meta[meta.PLACEMENT] for m in members]
        x, device = sites[0].x, self.config.device
        fetches: dict[str, fx.Node] = {}  # the job's storage parts, fetched before it when it reads the ring
        if any(reads_ring(lp) for lp in plans):
            for site, lp in zip(sites, plans, strict=True):
                if lp.storage_rows:
                    rows = lp.split - ram_rows(lp) if reads_ring(lp) else lp.storage_rows
                    fetches[site.name] = self._fetch(gm, site, lp, rows)
        weights, biases = [], []
        for site, lp in zip(sites, plans, strict=True):
            for w, b in self._cpu_parts(gm, site, lp, fetches.get(site.name)) if lp.split else ():
                weights.append(w)
                biases.append(b)
        label = _short(sites[0].name) + (f"_and_{len(sites) - 1}" if len(sites) > 1 else "")
        first = plans[0].name
        ticket = None  # none of the Linears has a CPU part: only their storage parts keep them together
        if weights:
            ticket = self._new(gm, CPU_BEGIN, (x, weights, biases, device), f"{label}_cpu", "cpu", first)
        y_gpus = [
            self._gpu_part(gm, site, lp, fetches.get(site.name), ticket)
            for site, lp in zip(sites, plans, strict=True)
        ]
        features = sum(lp.split for lp in plans)
        y_cpus = None
        if ticket is not None:
            y_cpus = self._new(gm, CPU_END, (ticket, x, features, device), f"{label}_cpu_out", "move", first)
        outs, offset = {}, 0
        for member, site, lp, y_gpu in zip(members, sites, plans, y_gpus, strict=True):
            y_cpu = y_cpus if lp.split else None
            if y_cpu is not None and sum(p.split > 0 for p in plans) > 1:
                y_cpu = self._new(
                    gm,
                    torch.narrow,
                    (y_cpus, -1, offset, lp.split),
                    f"{_short(site.name)}_cpu_cols",
                    "move",
                    site.name,
                )
            offset += lp.split
            outs[member] = self._join(gm, site, y_cpu, y_gpu)
            if reads_ring(lp):  # the job and the copy are done with the slot once the stream is past both
                token, r = token_of(self.store), ram_rows(lp)
                args = (outs[member], token, site.name, r, True)
                self._new(gm, FETCHED, args, f"{_short(site.name)}_fetched", "sync", site.name)
        return outs

    def _cpu_parts(
        self, gm: fx.GraphModule, site: LinearSite, lp: LayerPlan, fetched: fx.Node | None
    ) -> list[tuple[fx.Node, fx.Node | None]]:
        """The CPU part of Linear ``site`` as ``(weight, bias)`` pieces of one job, in row order: its RAM rows
        (of ``[0, split)``), then, where the CPU computes ring rows too, the ``fetched`` ring rows."""
        if not reads_ring(lp):
            return [self._cpu_rows(gm, site, lp.split)]
        r, parts = ram_rows(lp), []
        if r:
            parts.append(self._cpu_rows(gm, site, r))
        b = None
        if site.bias is not None:
            bias = site.bias.tensor.detach()[r : lp.split]
            b = self._attach(gm, f"{site.bias.name}__cpu_ring_part", bias, "cpu", site.name)
        parts.append((fetched, b))
        return parts

    def _cpu_rows(self, gm: fx.GraphModule, site: LinearSite, k: int) -> tuple[fx.Node, fx.Node | None]:
        """The CPU part of Linear ``site``: its output rows ``[0, k)`` as ``[k, in]`` (as F.linear takes them)
        and its bias's, attached to ``gm``."""
        s = site.name
        w = self._attach(
            gm, f"{s}__cpu_part", self.store.cpu_rows(site.weight.tensor, site.layout, k), "cpu", s
        )
        b = None
        if site.bias is not None:
            b = self._attach(gm, f"{site.bias.name}__cpu_part", site.bias.tensor.detach()[:k], "cpu", s)
        return w, b

    def _fetch(self, gm: fx.GraphModule, site: LinearSite, lp: LayerPlan, rows: int) -> fx.Node:
        """``fetch_rows`` of Linear ``site``'s storage part: its first ``rows`` rows (the launching thread waits
        until the reader has brought them in)."""
        args = (
            token_of(self.store),
            site.name,
            ram_rows(lp),
            rows,
            site.in_features,
            site.weight.tensor.dtype,
        )
        return self._new(gm, FETCH, args, f"{_short(site.name)}_fetch", "host", site.name)

    def _block_job(self, gm: fx.GraphModule, members: list[fx.Node]) -> list[fx.Node]:
        """Emit an MLP block as one CPU job and its device share (see the module docstring), route the row
        Linear's readers to the sum, and erase the block's old nodes; returns its Linear nodes."""
        sites = [match_linear(m, gm) for m in members]
        block = next((b for b in find_blocks(gm, sites) if {s.node for s in b.sites} == set(members)), None)
        head = members[0].meta[meta.PLACEMENT].block
        if block is None:
            raise ConfigError(
                f"the plan runs the MLP of {head} as one CPU job (block), but this graph has no such block of "
                f"{[m.meta[meta.PLACEMENT].name for m in members]}; compile without plan= to place it anew"
            )
        row, device, store = block.row, self.config.device, self.store
        row_lp: LayerPlan = row.node.meta[meta.PLACEMENT]
        k, whole = row_lp.split, row_lp.split == row_lp.in_features
        weights, biases = map(
            list, zip(*(self._cpu_rows(gm, site, k) for site in block.columns), strict=True)
        )
        cols = store.input_columns(row.weight.tensor, row.layout, 0, k, pin=False)
        weights.append(self._attach(gm, f"{row.name}__cpu_cols", cols, "cpu", row.name))
        b_row = None  # the bias once: with the device's partial sum, where there is one
        if whole and row.bias is not None:
            b_row = self._attach(gm, f"{row.bias.name}__cpu_part", row.bias.tensor.detach(), "cpu", row.name)
        biases.append(b_row)
        label = _short(block.head) + "_block"
        ticket = self._new(
            gm,
            CPU_BEGIN,
            (block.columns[0].x, weights, biases, device, block.act),
            f"{label}_cpu",
            "cpu",
            block.head,
        )
        y_dev = None
        if not whole:
            env = {
                site.node: self._gpu_part(gm, site, site.node.meta[meta.PLACEMENT]) for site in block.columns
            }
            for n in block.between:  # the graph's own activation (and product), on the device's share
                env[n] = copy = gm.graph.node_copy(n, lambda a: env.get(a, a))
                copy.meta[meta.SIDE], copy.meta[meta.LAYER] = "gpu", row.name
                if keeps_features(n, row.in_features):  # a reshape (Conv1D's): of the share's features
                    copy.args = with_features(copy.args, row.in_features - k)
            y_dev = self._gpu_columns(gm, row, row_lp, env[block.between[-1]])
        y_cpu = self._new(
            gm,
            CPU_END,
            (ticket, block.columns[0].x, row.out_features, device),
            f"{label}_cpu_out",
            "move",
            block.head,
        )
        out = (
            y_cpu
            if y_dev is None
            else self._new(gm, torch.add, (y_cpu, y_dev), f"{_short(row.name)}_out", "gpu", row.name)
        )
        row.node.replace_all_uses_with(out)
        for dead in (row.node, *row.absorbed, *reversed(block.between)):
            if not dead.users:
                gm.graph.erase_node(dead)
        for site in block.columns:
            for dead in (site.node, *site.absorbed):
                if not dead.users:
                    gm.graph.erase_node(dead)
        return members

    def _gpu_columns(self, gm: fx.GraphModule, row: LinearSite, lp: LayerPlan, h: fx.Node) -> fx.Node:
        """An MLP block's row Linear on the device: copy → wait → ``linear(h, w[:, split:], b)`` → release."""
        s, short = row.name, _short(row.name)
        part = self.store.input_columns(row.weight.tensor, row.layout, lp.split, lp.in_features, pin=True)
        staged, region = self._staged(gm, row, lp, self._attach(gm, f"{s}__gpu_cols_host", part, "copy", s))
        b = None
        if row.bias is not None:
            b = self._attach(gm, f"{row.bias.name}__dev", self.store.on_device(row.bias.tensor), "gpu", s)
        y = self._new(gm, F.linear, (h, staged) if b is None else (h, staged, b), f"{short}_gpu", "gpu", s)
        self._new(gm, RELEASE, (staged, lp.slot), f"{short}_release", "sync", s, region)
        return y

    def _split(self, gm: fx.GraphModule, site: LinearSite, lp: LayerPlan) -> fx.Node:
        """A Linear without a CPU part (α = 0): the copy and the GPU part."""
        return self._gpu_part(gm, site, lp)

    def _join(self, gm: fx.GraphModule, site: LinearSite, y_cpu: fx.Node | None, y_gpu: fx.Node | None):
        if y_gpu is None or y_cpu is None:
            return y_gpu if y_cpu is None else y_cpu
        return self._new(gm, torch.cat, ([y_cpu, y_gpu], -1), f"{_short(site.name)}_out", "gpu", site.name)

    def _gpu_part(
        self,
        gm: fx.GraphModule,
        site: LinearSite,
        lp: LayerPlan,
        fetch: fx.Node | None = None,
        ticket: fx.Node | None = None,
    ) -> fx.Node | None:
        """copy → wait → GPU part → release for output features ``[split, out)``; None when there are none.
        ``fetch``: the Linear's storage part, fetched already (before its CPU job, whose ``ticket`` this is)."""
        s, short, k, out = site.name, _short(site.name), lp.split, lp.out_features
        if k == out:
            lp.slot = -1
            return None
        fetched, tail = None, None
        if lp.storage_rows:  # the storage tier: rows [r, out) read into the reader's ring at every step
            r = ram_rows(lp)
            if fetch is None:
                fetch = self._fetch(gm, site, lp, lp.storage_rows)
            if reads_ring(lp):  # the CPU took the ring's first rows; its slot is given back after the job
                args = (
                    ticket,
                    token_of(self.store),
                    s,
                    r,
                    k - r,
                    out - k,
                    site.in_features,
                    site.weight.tensor.dtype,
                )
                w_host = self._new(gm, RING_ROWS, args, f"{short}_ring_rows", "host", s)
            else:
                w_host = fetch
                if k < r:  # RAM rows [k, r) first, then the ring's
                    w_host, tail = self._host_part(gm, site, k, r), fetch
                fetched = (token_of(self.store), s, r)  # the slot may be read into once the copy has landed
        else:
            w_host = self._host_part(gm, site, k, out)
        staged, region = self._staged(gm, site, lp, w_host, fetched, tail)
        b_gpu = None
        if site.bias is not None:
            b_gpu = self._attach(
                gm,
                f"{site.bias.name}__gpu_part",
                self.store.on_device(site.bias.tensor, rows=(k, out)),
                "gpu",
                s,
            )
        y_gpu = self._linear(gm, site, site.x, staged, b_gpu, f"{short}_gpu", "gpu")
        self._new(gm, RELEASE, (staged, lp.slot), f"{short}_release", "sync", s, region)
        return y_gpu

    def _host_part(self, gm: fx.GraphModule, site: LinearSite, start: int, stop: int) -> fx.Node:
        """Output features ``[start, stop)`` of the host weight, pinned for the copy, attached to ``gm``."""
        part = self.store.host_part(site.weight.tensor, site.layout, start, stop, pin=True)
        return self._attach(gm, f"{site.name}__gpu_part_host", part, "copy", site.name)

    def _staged(
        self,
        gm: fx.GraphModule,
        site: LinearSite,
        lp: LayerPlan,
        w_host: fx.Node,
        fetched: tuple | None = None,
        tail: fx.Node | None = None,
    ) -> tuple[fx.Node, tuple[int, int]]:
        """copy → (fetched) → wait of a GPU part's host weight ``w_host`` (and ``tail``'s rows after it) into
        the Linear's staging region (set on ``lp.slot``); the staged weight and the region. ``fetched``: the
        storage reader's ``(token, name, ram_rows)``, whose ring slot is given back once the copy has landed."""
        s, short = site.name, _short(site.name)
        lp.slot = self._offsets[site.node]
        region = (lp.slot, lp.gpu_part_bytes)
        args = (w_host, lp.slot, self.config.device) + ((tail,) if tail is not None else ())
        staged = self._new(gm, COPY, args, f"{short}_copy", "copy", s, region)
        if fetched is not None:
            self._new(gm, FETCHED, (staged, *fetched), f"{short}_fetched", "copy", s)
        self._new(gm, WAIT, (staged, lp.slot), f"{short}_wait", "sync", s, region)
        return staged, region


def ram_rows(lp: LayerPlan) -> int:
    """Rows of ``lp``'s Linear kept in RAM (``[0, r)``; the rest in storage)."""
    return lp.out_features - lp.storage_rows


def reads_ring(lp: LayerPlan) -> bool:
    """Whether ``lp``'s CPU part computes rows read from storage (its split beyond its RAM rows)."""
    return bool(lp.storage_rows) and not lp.resident and not lp.split_inputs and lp.split > ram_rows(lp)


def _short(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` → ``layers_0_self_attn_q_proj``."""
    return safe_name(layer_label(name))
