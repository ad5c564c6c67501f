"""ShardPass: one process's share of a tensor-parallel pipeline stage (the TP half of HexGen's layouts).

The Megatron pairing, found in the captured graph rather than written per architecture. In each decoder layer
``[start, stop)`` (nodes belong to layer ``i`` by their module stack, as for
:class:`~hetegen_fx.passes.stages.StageSplitPass`), each *block* (the module one level below the layer: the
attention, the MLP) holds Linears of two kinds:

* **column-parallel**: those whose input comes from outside the block (q/k/v, gate/up, GPT-2's ``c_attn`` and
  ``c_fc``). This process keeps ``1 / tp`` of their output features (its heads, its share of the MLP width),
  weight rows and bias entries alike; an output split into parts right after the Linear (GPT-2's fused
  q/k/v) keeps its share of each part;
* **row-parallel**: the one Linear that reads the others' results (``o_proj``, ``down_proj``, ``c_proj``).
  This process keeps the matching ``1 / tp`` of its input features; the partial outputs are summed over the
  stage's processes (``hetegen::tp_all_reduce``) and the bias is added once (process 0's).

Between the two, every op runs on this process's share: the pass replays each op whose input is a share on
``meta`` tensors of the share's shape and checks that exactly one dimension shrank by ``tp`` (the heads or
features); a shape the graph holds as a constant (a ``view``'s head count, a ``split``'s size) is rewritten to
the share's. An op that mixes the shares (a reduction or contraction over the split dimension) or a share with
a whole tensor, or an op that works along the split dimension (a softmax, a sort, a split other than a
fused output's), is an error that names it.

The KV cache this process keeps holds only its heads. HF's cache object, which the caller's model reads,
gets a host stand-in of the whole shape instead (``hetegen::tp_whole``; its memory is never written); when it
comes back as a graph input, ``hetegen::tp_local`` swaps the share in. Lone Linears outside the paired blocks
(``lm_head``) and everything outside the stage's layers stay whole in every process.

The shares of a weight are made once per process (kept on the weight, so that the prefill and decode graphs
place the same tensors) and enter the graph as ``get_attr`` parameters named ``<weight>@tp<rank>of<tp>``.
Must not: run anything but shape arithmetic on ``meta`` tensors (the collectives run when the graph does).
"""

from __future__ import annotations

import math
import re

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.errors import UnsupportedModelError
from hetegen_fx.graph_utils import attach, concrete, node_value
from hetegen_fx.linear import LinearSite, ParamRef, find_linears, param_of
from hetegen_fx.ops import TP_ALL_REDUCE, TP_LOCAL, TP_WHOLE

from .stages import layer_of

_BLOCK = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.([A-Za-z_][A-Za-z0-9_]*)")
_VIEWS = {"view", "reshape", "_unsafe_view"}
_SPLITS = {"split", "chunk"}
#: ops that work along one dimension, given as ``dim``: wrong on a share when that is the shared one
_ALONG_ONE_DIM = {
    "split",
    "chunk",
    "narrow",
    "unbind",
    "softmax",
    "log_softmax",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "logcumsumexp",
    "normalize",
    "sort",
    "argsort",
    "topk",
    "flip",
    "roll",
}


def block_of(node: fx.Node) -> str | None:
    """``"<layer>.<block>"`` of a node inside a decoder layer's child module (``"3.self_attn"``), else None."""
    for value in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        path = value[0] if isinstance(value, tuple) else str(value)
        m = _BLOCK.search(str(path).replace("[", ".").replace("]", "").replace("'", ""))
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _direct_linear(node: fx.Node, block: str) -> bool:
    """Whether ``block`` (``"<layer>.<child>"``) is a Linear module itself (its node's innermost module)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return False
    path, cls = stack[-1] if isinstance(stack[-1], tuple) else (str(stack[-1]), None)
    name = getattr(cls, "__name__", str(cls))
    flat = str(path).replace("[", ".").replace("]", "").replace("'", "")
    return flat.endswith("." + block.split(".", 1)[1]) and ("Linear" in name or "Conv1D" in name)


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEWS) or (
        node.op == "call_function" and node.target in (torch.reshape, torch.Tensor.view)
    )


def _is_split(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _SPLITS) or (
        node.op == "call_function" and node.target in (torch.split, torch.chunk)
    )


class ShardPass(PassBase):
    """Rewrites a stage's graph to process ``tp_rank``'s share of TP ``tp`` over global ranks ``group`` (see
    the module)."""

    def __init__(self, start: int, stop: int, tp_rank: int, tp: int, group: tuple[int, ...]) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp or len(group) != tp:
            raise UnsupportedModelError(f"TP rank {tp_rank} of {tp} over ranks {list(group)}: inconsistent")
        self.start, self.stop, self.rank, self.tp, self.group = start, stop, tp_rank, tp, tuple(group)

    # -- the pairing --------------------------------------------------------------------------------------

    def _pairs(self, gm: fx.GraphModule) -> tuple[list[LinearSite], list[LinearSite]]:
        """(column-parallel, row-parallel) Linears of the stage's layers."""
        sites = [s for s in find_linears(gm) if layer_of(s.node) is not None]
        # child modules of a layer that hold Linears (not Linears themselves): the blocks
        self._blocks = {
            b for s in sites if (b := block_of(s.node)) is not None and not _direct_linear(s.node, b)
        }
        blocks: dict[str, list[LinearSite]] = {}
        for site in sites:
            layer = layer_of(site.node)
            if not self.start <= layer < self.stop:
                continue
            blocks.setdefault(self._block(site.node), []).append(site)
        cols, rows = [], []
        for block, sites in blocks.items():
            nodes = {s.node: s for s in sites}
            reads_one = [s for s in sites if self._reads_linear(s, nodes, block)]
            first = [s for s in sites if s not in reads_one]
            if len(reads_one) != 1 or not first:
                raise UnsupportedModelError(
                    f"tensor parallelism: block {block} has Linears {[s.name for s in sites]}; it splits blocks "
                    "whose Linears read the block's input (column-parallel) and feed one Linear that reads "
                    "their results (row-parallel), as attention and MLP blocks do"
                )
            cols += first
            rows += reads_one
        if not rows:
            raise UnsupportedModelError(
                f"tensor parallelism: no Linears found in layers [{self.start}, {self.stop}) of this graph"
            )
        return cols, rows

    def _block(self, node: fx.Node) -> str | None:
        """The block of ``node``: :func:`block_of` where that child module holds Linears, else ``"<layer>.*"``
        (the layer's own nodes, its norms and activations, and Linears that are themselves children of the
        layer: OPT's ``fc1`` and ``fc2`` form one block so)."""
        layer = layer_of(node)
        if layer is None:
            return None
        block = block_of(node)
        return block if block in self._blocks else f"{layer}.*"

    def _reads_linear(self, site: LinearSite, linears: dict, block: str) -> bool:
        """Whether ``site``'s input depends, inside ``block``, on another Linear of it."""
        seen, todo = set(), [site.x]
        while todo:
            n = todo.pop()
            if not isinstance(n, fx.Node) or n in seen or self._block(n) != block:
                continue
            seen.add(n)
            if n in linears and n is not site.node:
                return True
            todo.extend(n.all_input_nodes)
        return False

    # -- the weights --------------------------------------------------------------------------------------

    def _parts(self, site: LinearSite) -> tuple[list[int], fx.Node | None]:
        """The sizes of the parts a column Linear's output is split into right after it (through views that
        keep the features last), and the split node; ``[out_features]`` and None when it is not split."""
        out, n = site.out_features, site.node
        while len(n.users) == 1:
            (u,) = n.users
            v = node_value(u)
            same = isinstance(v, torch.Tensor) and concrete(v.shape[-1]) == out
            # views that keep the features last, and elementwise ops of this value alone (a clamp, a scale)
            tensors = [i for i in u.all_input_nodes if isinstance(node_value(i), torch.Tensor)]
            pointwise = same and tensors == [n] and tuple(v.shape) == tuple(node_value(n).shape)
            if same and (_is_view(u) or pointwise) and not _is_split(u):
                n = u
                continue
            if _is_split(u):
                v_in = node_value(n)
                dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
                if isinstance(dim, int) and dim in (-1, v_in.dim() - 1):
                    size = u.args[1] if len(u.args) > 1 else u.kwargs.get("split_size_or_sections")
                    if u.target in ("chunk", torch.chunk) and isinstance(size, int) and out % size == 0:
                        return [out // size] * size, u
                    if isinstance(size, int) and out % size == 0:
                        return [size] * (out // size), u
                    if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
                        return list(size), u
            break
        return [out], None

    def _kept(self, t: torch.Tensor, key: tuple, make) -> torch.Tensor:
        """``make()``, made once per weight ``t`` and ``key`` (kept on ``t``: every graph of the model places
        the same tensor)."""
        cache = getattr(t, "_hetegen_tp_shares", None)
        if cache is None:
            cache = {}
            t._hetegen_tp_shares = cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _share(self, t: torch.Tensor, dim: int, parts: list[int], name: str) -> torch.Tensor:
        """This process's share of ``t`` along ``dim``: of each part, its ``1 / tp``."""
        return self._kept(t, (dim, tuple(parts), self.rank, self.tp), lambda: self._cut(t, dim, parts, name))

    def _cut(self, t: torch.Tensor, dim: int, parts: list[int], name: str) -> torch.Tensor:
        pieces, offset = [], 0
        for size in parts:
            if size % self.tp:
                raise UnsupportedModelError(
                    f"tensor parallelism: TP {self.tp} does not divide {name}'s {size} features along dim {dim}; "
                    "choose a TP degree that divides the heads and the MLP width"
                )
            share = size // self.tp
            pieces.append(t.detach().narrow(dim, offset + self.rank * share, share))
            offset += size
        return torch.cat(pieces, dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()

    def _param(self, gm: fx.GraphModule, node: fx.Node, ref: ParamRef, t: torch.Tensor) -> fx.Node:
        name = f"{ref.name}@tp{self.rank}of{self.tp}"
        with gm.graph.inserting_before(node):
            new = attach(gm, name, t)
        new.meta[meta.PARAM] = ParamRef(name, t)
        old = node_value(node)
        new.meta["example_value"] = old.new_empty(t.shape) if isinstance(old, torch.Tensor) else t
        return new

    def _swap(self, gm: fx.GraphModule, site: LinearSite, old: ParamRef, t: torch.Tensor) -> None:
        """Make the site's nodes read ``t`` where they read parameter ``old``."""
        for n in (site.node, *site.absorbed):
            for arg in n.all_input_nodes:
                if param_of(arg) is old or (param_of(arg) is not None and param_of(arg).tensor is old.tensor):
                    n.replace_input_with(arg, self._param(gm, n, old, t))

    # -- the pass -----------------------------------------------------------------------------------------

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        self._splits: set[fx.Node] = set()  # the splits of fused outputs, cut part by part
        cols, rows = self._pairs(gm)
        shape: dict[fx.Node, object] = {}  # node → its share's shape (a list of them for a split's parts)
        dims: dict[fx.Node, object] = {}  # node → the dimension its share splits (a list for parts)
        for site in cols:
            parts, split = self._parts(site)
            wdim = 0 if site.layout == "out_in" else 1
            self._swap(gm, site, site.weight, self._share(site.weight.tensor, wdim, parts, site.name))
            if site.bias is not None:
                self._swap(gm, site, site.bias, self._share(site.bias.tensor, 0, parts, site.name))
            v = node_value(site.node)
            local = [concrete(d) for d in v.shape]
            local[-1] //= self.tp
            shape[site.node], dims[site.node] = tuple(local), v.dim() - 1
            if split is not None:  # its sizes become the share's
                self._splits.add(split)
                sizes = [s // self.tp for s in parts]
                size = sizes if isinstance(split.args[1], (list, tuple)) else sizes[0]
                if split.target in ("chunk", torch.chunk):
                    size = len(parts)
                split.args = (split.args[0], size, *split.args[2:])
        for site in rows:
            wdim = 1 if site.layout == "out_in" else 0
            self._swap(
                gm, site, site.weight, self._share(site.weight.tensor, wdim, [site.in_features], site.name)
            )
            if site.bias is not None:  # added once: process 0's
                b = site.bias.tensor
                kept = self._kept(b, ("bias", self.rank, self.tp), lambda b=b: self._once(b))
                self._swap(gm, site, site.bias, kept)
            with graph.inserting_after(site.node):
                total = graph.create_node(
                    "call_function",
                    TP_ALL_REDUCE,
                    (site.node, list(self.group)),
                    name=f"{site.node.name}_summed",
                )
            total.meta.update(
                {k: site.node.meta[k] for k in ("example_value", "nn_module_stack") if k in site.node.meta}
            )
            for u in list(site.node.users):
                if u is not total:
                    u.replace_input_with(site.node, total)
        self._propagate(gm, shape, dims, {n for s in rows for n in (s.node, *s.absorbed)})
        self._outputs(gm, shape, dims)
        for n in shape:
            v = node_value(n)
            if isinstance(v, torch.Tensor):
                n.meta["example_value"] = v.new_empty(self._symbolic(v, dims[n]))
            elif isinstance(v, (list, tuple)):
                n.meta["example_value"] = type(v)(
                    e.new_empty(self._symbolic(e, d)) if isinstance(e, torch.Tensor) and d is not None else e
                    for e, d in zip(v, dims[n], strict=True)
                )
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _symbolic(self, v: torch.Tensor, dim: int) -> list:
        out = list(v.shape)
        out[dim] = out[dim] // self.tp
        return out

    def _once(self, b: torch.Tensor) -> torch.Tensor:
        """A row-parallel Linear's bias in this process: the bias on process 0, zeros on the others."""
        return b.detach().clone() if self.rank == 0 else torch.zeros_like(b.detach())

    # -- shapes -------------------------------------------------------------------------------------------

    def _propagate(self, gm: fx.GraphModule, shape: dict, dims: dict, rows: set) -> None:
        """Every op downstream of a share runs on shares (see the module); constants rewritten where needed."""
        for node in list(gm.graph.nodes):
            if node in shape or node.op in ("placeholder", "get_attr", "output"):
                continue
            if not any(i in shape for i in node.all_input_nodes):
                continue
            if node in rows:  # a row-parallel Linear (or a node of it): its result is a partial sum
                for x in node.all_input_nodes:
                    if x in shape and isinstance(dims[x], int) and dims[x] != node_value(x).dim() - 1:
                        raise UnsupportedModelError(
                            f"tensor parallelism: row-parallel Linear {node.name} reads a share split along dim "
                            f"{dims[x]}, not its input features"
                        )
                continue
            if node.op not in ("call_function", "call_method"):
                raise UnsupportedModelError(f"tensor parallelism: {node.format_node()} reads a share")
            self._along_the_share(node, shape, dims)
            self._fit(gm, node, shape, dims)

    def _along_the_share(self, node: fx.Node, shape: dict, dims: dict) -> None:
        """Ops that work along one dimension (a split, a softmax, a cumulative sum, a sort) must not work along
        the shared one: on a share they keep its shape and give another answer. A fused output's split, cut
        part by part with the weights, is the exception."""
        if node in self._splits:
            return
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name not in _ALONG_ONE_DIM:
            return
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or x not in shape or not isinstance(dims.get(x), int):
            return
        default = 0 if name in ("split", "chunk", "narrow", "unbind") else -1
        if name in ("split", "chunk", "narrow"):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else default)
        else:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else default)
        ndim = node_value(x).dim()
        if isinstance(dim, int) and dim % ndim == dims[x]:
            raise UnsupportedModelError(
                f"tensor parallelism: {node.format_node()} (in layer {layer_of(node)}) works along the split "
                f"heads or features (dim {dim}), which a share holds only part of: this model cannot be split "
                "this way"
            )

    def _fit(self, gm: fx.GraphModule, node: fx.Node, shape: dict, dims: dict) -> None:
        """Run ``node`` on shares; rewrite a constant or take a cache input as a share if it must."""
        if _is_view(node):
            self._fix_view(node, shape, dims)
        first = self._try(node, shape, dims)
        if first is True:
            return
        # a KV cache handed back by an earlier call: the host stand-in of a share
        sharded = next(i for i in node.all_input_nodes if i in shape)
        for i in node.all_input_nodes:
            v = node_value(i)
            if (
                i.op == "placeholder"
                and param_of(i) is None
                and i not in shape
                and isinstance(v, torch.Tensor)
                and isinstance(dims.get(sharded), int)
                and v.dim() == node_value(sharded).dim()
                and concrete(v.shape[dims[sharded]]) % self.tp == 0
            ):
                d = dims[sharded]
                local = [concrete(x) for x in v.shape]
                local[d] //= self.tp
                shape[i], dims[i] = tuple(local), d
                if self._try(node, shape, dims) is True:
                    self._take_share(gm, i, shape, dims)
                    return
                del shape[i], dims[i]
        # a constant that holds the whole size
        for path, value in self._ints(node):
            if value % self.tp or value < self.tp:
                continue
            self._set(node, path, value // self.tp)
            if self._try(node, shape, dims) is True:
                return
            self._set(node, path, value)
        raise UnsupportedModelError(
            f"tensor parallelism: {node.format_node()} (in layer {layer_of(node)}) cannot run on this process's "
            f"share of its input ({first}); a reduction or contraction over the split heads or features, or a "
            "share meeting a whole tensor, needs the whole: this model cannot be split this way"
        )

    def _take_share(self, gm: fx.GraphModule, ph: fx.Node, shape: dict, dims: dict) -> None:
        """Placeholder ``ph`` (a cache stand-in) becomes ``tp_local(ph)`` for every reader."""
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            local = gm.graph.create_node(
                "call_function", TP_LOCAL, (ph, dims[ph], self.tp), name=f"{ph.name}_share"
            )
        local.meta["example_value"] = node_value(ph)  # replaced by the share's below
        for u in list(ph.users):
            if u is not local:
                u.replace_input_with(ph, local)
        shape[local], dims[local] = shape.pop(ph), dims.pop(ph)

    def _fix_view(self, node: fx.Node, shape: dict, dims: dict) -> None:
        """A view's size at the dimension that holds the share (found by the products of the sizes before it)
        becomes the share's when it is a constant."""
        x = node.args[0]
        if x not in shape or not isinstance(dims[x], int):
            return
        full_in = [concrete(d) for d in node_value(x).shape]
        out = node_value(node)
        if not isinstance(out, torch.Tensor):
            return
        full_out = [concrete(d) for d in out.shape]
        before = math.prod(full_in[: dims[x]])
        k = next(
            (
                k
                for k in range(len(full_out))
                if math.prod(full_out[:k]) == before and full_out[k] % self.tp == 0 and full_out[k] > 1
            ),
            None,
        )
        if k is None:
            return
        sizes = (
            node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        )
        if k < len(sizes) and isinstance(sizes[k], int) and sizes[k] == full_out[k]:
            new = list(sizes)
            new[k] = sizes[k] // self.tp
            if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
                node.args = (x, type(node.args[1])(new))
            else:
                node.args = (x, *new)

    @staticmethod
    def _ints(node: fx.Node) -> list[tuple[tuple, int]]:
        """(path, value) of every literal int among the node's positional arguments (one level of nesting)."""
        out = []
        for i, a in enumerate(node.args):
            if isinstance(a, int) and not isinstance(a, bool):
                out.append(((i,), a))
            elif isinstance(a, (list, tuple)):
                out += [
                    ((i, j), b) for j, b in enumerate(a) if isinstance(b, int) and not isinstance(b, bool)
                ]
        return out

    @staticmethod
    def _set(node: fx.Node, path: tuple, value: int) -> None:
        args = list(node.args)
        if len(path) == 1:
            args[path[0]] = value
        else:
            inner = list(args[path[0]])
            inner[path[1]] = value
            args[path[0]] = type(args[path[0]])(inner)
        node.args = tuple(args)

    def _try(self, node: fx.Node, shape: dict, dims: dict):
        """Run ``node`` on ``meta`` shares; True (and its share recorded) when exactly the split dimension
        shrank by ``tp`` in its tensor results, else what went wrong."""

        def fake(a: fx.Node):
            v = node_value(a)
            s = shape.get(a)
            if isinstance(v, torch.Tensor):
                return torch.empty(s or [concrete(d) for d in v.shape], dtype=v.dtype, device="meta")
            if isinstance(v, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in v):
                return type(v)(
                    torch.empty(ss or [concrete(d) for d in e.shape], dtype=e.dtype, device="meta")
                    if isinstance(e, torch.Tensor)
                    else e
                    for e, ss in zip(v, s or [None] * len(v), strict=True)
                )
            if isinstance(s, tuple) and len(s) == 2 and s[0] == "value":
                return s[1]
            if isinstance(v, torch.SymInt):
                return concrete(v)
            if isinstance(v, (list, tuple, torch.Size)):
                return type(v)(concrete(e) if isinstance(e, torch.SymInt) else e for e in v)
            return v

        args = fx.node.map_arg(node.args, fake)
        kwargs = fx.node.map_arg(node.kwargs, fake)
        try:
            if node.op == "call_method":
                got = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                got = node.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure means: not on shares as it stands
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        full = node_value(node)
        if isinstance(full, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return "not a tensor"
            d = self._shrunk(full, got)
            if not isinstance(d, int):
                return d
            shape[node], dims[node] = tuple(got.shape), d
            return True
        if isinstance(full, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in full):
            if not isinstance(got, (list, tuple)) or len(got) != len(full):
                return f"{len(got) if isinstance(got, (list, tuple)) else 1} results, not {len(full)}"
            ds = [
                self._shrunk(f, g) if isinstance(f, torch.Tensor) else None
                for f, g in zip(full, got, strict=True)
            ]
            if any(isinstance(d, str) for d in ds) or all(d is None for d in ds):
                return next((d for d in ds if isinstance(d, str)), "no result is a share")
            shape[node] = [tuple(g.shape) if isinstance(g, torch.Tensor) else None for g in got]
            dims[node] = ds
            return True
        want = fake_value(full)
        if got != want:  # a size read off a share (the heads): later ops that take it get the share's
            shape[node], dims[node] = ("value", got), None
        return True

    def _shrunk(self, full: torch.Tensor, got: torch.Tensor):
        """The one dimension of ``got`` that is ``full``'s divided by ``tp``, else what differs."""
        a, b = [concrete(d) for d in full.shape], list(got.shape)
        if len(a) != len(b):
            return f"shape {tuple(b)} where the whole has {tuple(a)}"
        diff = [d for d in range(len(a)) if a[d] != b[d]]
        if len(diff) == 1 and b[diff[0]] * self.tp == a[diff[0]]:
            return diff[0]
        if not diff:
            return f"a whole result {tuple(b)} from a share (the split dimension was reduced)"
        return f"shape {tuple(b)} where the share of {tuple(a)} was expected"

    def _outputs(self, gm: fx.GraphModule, shape: dict, dims: dict) -> None:
        """Shares among the graph's outputs (the KV cache) leave as host stand-ins of the whole."""
        out = gm.graph.output_node()
        flat, spec = torch.utils._pytree.tree_flatten(out.args)
        new = []
        for a in flat:
            if isinstance(a, fx.Node) and a in shape and dims[a] is not None:
                if not isinstance(dims[a], int):
                    raise UnsupportedModelError(f"tensor parallelism: output {a.name} is a list of shares")
                with gm.graph.inserting_before(out):
                    whole = gm.graph.create_node(
                        "call_function", TP_WHOLE, (a, dims[a], self.tp), name=f"{a.name}_whole"
                    )
                whole.meta["example_value"] = node_value(a)
                new.append(whole)
            else:
                new.append(a)
        out.args = torch.utils._pytree.tree_unflatten(new, spec)


def fake_value(v):
    """A result of the whole graph as the share's replay gives it: SymInts as their hints."""
    if isinstance(v, torch.SymInt):
        return concrete(v)
    if isinstance(v, (list, tuple, torch.Size)):
        return type(v)(fake_value(e) for e in v)
    return v
