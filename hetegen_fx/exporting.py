"""Export a compiled model: the transformed graph as ONNX or a ``torch.export`` archive, or its Plan.

``hetegen_fx.export(compiled, path)`` writes

* ``*.onnx`` (format ``"onnx"``): the transformed graph through the dynamo ONNX exporter. Every ONNX node
  carries its placement (``hetegen.side``, ``hetegen.layer``, ``hetegen.alpha`` in ``metadata_props``) and
  the model carries the Plan as JSON (``hetegen.plan``). The copy becomes an ``Identity``; waits, releases
  and activation moves, meaningless in a single-device ONNX graph, are left out.
* ``*.pt2`` (format ``"pt2"``): ``torch.export.save`` of the transformed graph, custom ops included;
  read it back with :func:`load_exported`.
* ``*.json`` (format ``"plan"``): the Plan (``Plan.save``).

Files are written through a temporary file in the target folder and renamed, so a failed export leaves
nothing behind. docs/export.md has the details.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import meta, ops
from .api import CompiledModule
from .blocks import FUNCTIONS
from .errors import ConfigError, HetegenError
from .graph_utils import clone_graph_module, eliminate_dead_code
from .plan import Plan
from .runtime import embed_on_host, park, to_device, write_back

FORMATS = ("onnx", "pt2", "plan")
_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".json": "plan"}
#: prefix of the keys hetegen_fx writes into ONNX ``metadata_props``
KEY = "hetegen."
#: ONNX models above this size keep their weights in a ``<name>.data`` file next to them (protobuf's 2 GiB limit)
_EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(HetegenError):
    """``torch.export`` or the ONNX exporter could not convert a compiled graph."""


def export(
    compiled: torch.nn.Module,
    path: str | os.PathLike,
    format: str | None = None,  # noqa: A002  (the natural name)
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict | None = None,
    dynamic: bool = True,
    optimize: bool = True,
    opset: int | None = None,
) -> Path:
    """Write the transformed graph of ``compiled`` (a :class:`CompiledModule`) to ``path``.

    ``format`` is ``"onnx"``, ``"pt2"`` or ``"plan"``; by default it follows the suffix (``.onnx``, ``.pt2``,
    ``.json``). ``example_inputs`` / ``example_kwargs`` are what the graph is traced with (``"onnx"`` and
    ``"pt2"``); by default they are made from the shapes recorded by the ``export`` frontend. With
    ``dynamic`` the sequence (dim 1 of every input of 2+ dims longer than 1) stays symbolic.
    ``optimize`` runs the ONNX optimizer; ``opset`` picks the ONNX opset (the exporter's default if None).
    Returns the path written. Raises :class:`ConfigError` for bad arguments and :class:`ExportError` when
    the graph cannot be converted; no file is left behind on failure.
    """
    cm = _compiled(compiled)
    p = Path(path)
    fmt = _format(p, format)
    _check_writable(p)
    if fmt == "plan":
        return _write(p, lambda tmp: Path(tmp).write_text(cm.plan.to_json()))
    args, kwargs = _example(cm, example_inputs, example_kwargs)
    if fmt == "pt2":
        ep = _torch_export(_prepared(cm, for_onnx=False), args, kwargs, dynamic)
        return _write(p, lambda tmp: torch.export.save(ep, tmp), suffix=".pt2")
    return _export_onnx(cm, p, args, kwargs, dynamic, optimize, opset)


def load_exported(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` written by :func:`export` (``.module()`` runs it); the custom ops are registered."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{str(p)!r} does not exist; write one with hetegen_fx.export(compiled, {str(p)!r})"
        )
    try:
        return torch.export.load(p)
    except Exception as e:
        raise ExportError(f"cannot load {str(p)!r} as a torch.export archive: {type(e).__name__}: {e}") from e


# -- arguments ----------------------------------------------------------------------------------------------


def _compiled(compiled: Any) -> CompiledModule:
    if isinstance(compiled, CompiledModule):
        return compiled
    from .introspect import config_of

    if isinstance(compiled, torch.nn.Module) and config_of(compiled) is not None:
        raise ConfigError(
            f"{type(compiled).__name__} was compiled through the 'dynamo' frontend (torch.compile): its graphs "
            "are made lazily, one per shape, and there is no single graph to export. Compile a module that "
            "returns tensors with frontend='export' instead, e.g. for a Hugging Face model a wrapper whose "
            "forward returns model(input_ids=ids, use_cache=False).logits: "
            "hetegen_fx.compile(wrapper, example_inputs=(ids,), frontend='export', ...). "
            "hetegen_fx.explain(compiled).plans has the Plans of the dynamo graphs."
        )
    raise ConfigError(
        f"hetegen_fx.export needs a model compiled by hetegen_fx (a CompiledModule), got "
        f"{type(compiled).__name__}: compile it first with "
        "hetegen_fx.compile(model, example_inputs=(...), frontend='export')"
    )


def _format(p: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = _SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"cannot tell the export format of {str(p)!r} from its suffix: name it *.onnx, *.pt2 or "
                f"*.json, or pass format= one of {', '.join(FORMATS)}"
            )
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def _check_writable(p: Path) -> None:
    if p.is_dir():
        raise ConfigError(f"cannot write {str(p)!r}: it is a folder; give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"cannot write {str(p)!r}: the file is read-only")


def _example(
    cm: CompiledModule, example_inputs: Sequence[Any] | None, example_kwargs: dict | None
) -> tuple[tuple, dict]:
    if example_inputs is not None or example_kwargs:
        return tuple(example_inputs or ()), dict(example_kwargs or {})
    values = []
    for ph in cm.graph_module.graph.find_nodes(op="placeholder"):
        if meta.PARAM in ph.meta:
            continue
        v = ph.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise ConfigError(
                f"input {ph.name!r} of the compiled graph has no recorded shape: pass example_inputs=(...)"
            )
        shape = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in v.shape]
        if any(s is None for s in shape):
            raise ConfigError(f"input {ph.name!r} has no concrete example shape: pass example_inputs=(...)")
        values.append(
            torch.zeros(shape, dtype=v.dtype)
            if not v.is_floating_point()
            else torch.randn(shape, dtype=v.dtype)
        )
    if not values:
        raise ConfigError("cannot make example inputs for this graph: pass example_inputs=(...)")
    return tuple(values), {}


def _dynamic_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    seq = torch.export.Dim("seq", min=1, max=1 << 16)

    def spec(a: Any) -> Any:
        return {1: seq} if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[1] > 1 else None

    if not kwargs:
        specs = tuple(spec(a) for a in args)
        return None if all(s is None for s in specs) else specs
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    specs = {name: spec(v) for name, v in bound.arguments.items()}
    return None if all(s is None for s in specs.values()) else specs


# -- the graph to export ------------------------------------------------------------------------------------


def _prepared(cm: CompiledModule, for_onnx: bool) -> fx.GraphModule:
    """A copy of the transformed graph (sharing its weights) ready for ``torch.export``.

    Every node carries ``meta["custom"]`` with its placement, which ``torch.export`` propagates to the nodes
    it traces from it (and the ONNX export reads back). For ONNX, the activation moves (``to_device``,
    ``park``) become identities, waits and releases are dropped, each CPU job becomes the Linears it runs
    (``linear`` per part, then ``cat``), and everything is retargeted to the host.
    """
    gm = clone_graph_module(cm.graph_module)
    graph = gm.graph
    if for_onnx:
        _inline_cpu_jobs(graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)  # export's own input checks; torch.export adds its own
            continue
        if node.op == "call_function" and node.target is embed_on_host:
            _plain_lookup(graph, node, for_onnx, cm.plan)
            continue
        if for_onnx and node.op == "call_function":
            if node.target in (to_device, park):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                continue
            if node.target is write_back:  # one device: the input itself was changed
                graph.erase_node(node)
                continue
            if any(ops.is_op(node.target, op) for op in (ops.WAIT, ops.RELEASE, ops.CPU_WAIT)):
                graph.erase_node(node)  # no outputs; functionalized they become HOPs the exporter rejects
                continue
        node.meta["custom"] = {**node.meta.get("custom", {}), **_placement(node, cm.plan)}
    if for_onnx:
        _to_host(gm)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return gm


def _plain_lookup(graph: fx.Graph, node: fx.Node, for_onnx: bool, plan: Plan) -> None:
    """A host lookup (:func:`embed_on_host`) as ``F.embedding`` (moved to the device, except for ONNX),
    which the exporters trace; its placement stays on the nodes that replace it."""
    idx, table, device = node.args
    with graph.inserting_before(node):
        rows = graph.call_function(F.embedding, (idx, table))
        out = rows if for_onnx else graph.call_function(to_device, (rows, device))
    custom = {**node.meta.get("custom", {}), **_placement(node, plan)}
    for n in {rows, out}:
        n.meta.update(node.meta)
        n.meta["custom"] = custom
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _inline_cpu_jobs(graph: fx.Graph) -> None:
    """Replace each ``cpu_end(cpu_begin(x, weights, biases))`` by ``cat([linear(x, w, b), ...], -1)`` (an MLP
    block's job, :mod:`hetegen_fx.blocks`: its Linears, activation and product): the same function, as ops an
    ONNX runtime has. The new nodes keep the job's placement metadata."""
    for end in [n for n in graph.nodes if n.op == "call_function" and ops.is_op(n.target, ops.CPU_END)]:
        begin = end.args[0]
        x, weights, biases = begin.args[0], begin.args[1], begin.args[2]
        act = begin.args[4] if len(begin.args) > 4 else begin.kwargs.get("act", 0)
        placement = {k: v for k, v in begin.meta.items() if k in (meta.SIDE, meta.LAYER)}

        def linear(h, i, w, b, name=begin.name, placement=placement):
            part = graph.call_function(F.linear, (h, w, b), name=f"{name}_{i}")
            part.meta.update(placement)
            if w.meta.get(meta.LAYER):
                part.meta[meta.LAYER] = w.meta[meta.LAYER]
            return part

        with graph.inserting_before(end):
            n = len(weights) - 1 if act else len(weights)
            parts = [linear(x, i, w, b) for i, (w, b) in enumerate(zip(weights[:n], biases[:n], strict=True))]
            if act:
                fn, kwargs = FUNCTIONS[act]
                h = graph.call_function(fn, (parts[0],), kwargs)
                h = h if n == 1 else graph.call_function(operator.mul, (h, parts[1]))
                parts = [linear(h, n, weights[n], biases[n])]
            out = parts[0] if len(parts) == 1 else graph.call_function(torch.cat, (parts, -1))
            out.meta.update(placement)
        end.replace_all_uses_with(out)
        graph.erase_node(end)
        if not begin.users:
            graph.erase_node(begin)


def _placement(node: fx.Node, plan: Plan) -> dict[str, str]:
    side = node.meta.get(meta.SIDE)
    if side is None and node.op in ("placeholder", "output"):
        side = "io"
    d = {KEY + "side": side or "gpu", KEY + "fx_node": node.name}
    layer = node.meta.get(meta.LAYER)
    lp = plan.layer(layer) if layer else None
    if lp is not None:
        d[KEY + "layer"] = lp.name
        d[KEY + "resident"] = str(lp.resident).lower()
        d[KEY + "alpha"] = "0" if lp.resident else repr(lp.share)
        d[KEY + "split"] = str(lp.split)
    if meta.SLOT in node.meta:
        d[KEY + "slot"] = str(node.meta[meta.SLOT])
    return d


def _host(x: Any) -> Any:
    if isinstance(x, torch.device) and x.type != "cpu":
        return torch.device("cpu")
    if isinstance(x, str) and x.split(":")[0] in ("cuda", "xpu", "mps", "hpu"):
        return "cpu"
    if isinstance(x, tuple | list):
        return type(x)(_host(v) for v in x)
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    return x


def _to_host(gm: fx.GraphModule) -> None:
    """Retarget a graph compiled for an accelerator to the host (an ONNX graph has no devices)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            t = getattr(mod, name)
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                setattr(mod, name, t.detach().to("cpu"))
        elif node.op == "call_function":
            node.args, node.kwargs = _host(node.args), _host(node.kwargs)


def _torch_export(
    gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic: bool
) -> torch.export.ExportedProgram:
    dyn = _dynamic_shapes(gm, args, kwargs) if dynamic else None
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:
        hint = " (try dynamic=False)" if dynamic else ""
        raise ExportError(
            f"torch.export cannot trace the compiled graph{hint}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e


# -- ONNX ---------------------------------------------------------------------------------------------------


def _onnx_copy_h2d(src, slot: int, device: str, tail=None):  # noqa: ANN001, ANN202  (onnxscript traces it)
    from onnxscript import opset18 as op

    return op.Identity(src) if tail is None else op.Concat(src, tail, axis=0)


def _translation_table() -> dict:
    return {ops.COPY: _onnx_copy_h2d}


def _export_onnx(
    cm: CompiledModule, p: Path, args: tuple, kwargs: dict, dynamic: bool, optimize: bool, opset: int | None
) -> Path:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise ConfigError("ONNX export needs onnxscript: pip install onnxscript") from e
    ep = _torch_export(_prepared(cm, for_onnx=True), args, kwargs, dynamic)
    extra = {} if opset is None else {"opset_version": opset}
    try:
        program = torch.onnx.export(
            ep,
            dynamo=True,
            custom_translation_table=_translation_table(),
            optimize=optimize,
            verbose=False,
            **extra,
        )
    except Exception as e:
        raise ExportError(
            f"the ONNX exporter cannot convert the compiled graph: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    annotate_onnx(program, cm)
    large = sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor)
    )
    if large < _EXTERNAL_DATA_BYTES:
        return _write(p, lambda tmp: program.save(tmp), suffix=".onnx")
    # weights in <name>.data next to the model: write both in a temporary folder, then move them
    try:
        tmpdir = tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.")
    except OSError as e:
        raise ConfigError(f"cannot write {str(p)!r}: {e}") from e
    try:
        program.save(os.path.join(tmpdir, p.name), external_data=True)
        for f in sorted(os.listdir(tmpdir), key=lambda f: f == p.name):  # the model last
            os.replace(os.path.join(tmpdir, f), p.parent / f)
    except OSError as e:
        raise ConfigError(f"cannot write {str(p)!r}: {e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return p


def annotate_onnx(program: Any, cm: CompiledModule) -> None:
    """Copy the placement of each FX node onto the ONNX nodes (and initializers) made from it, and the Plan
    onto the model (``metadata_props``)."""
    custom: dict[str, dict] = {}
    for node in program.exported_program.graph.nodes:
        c = node.meta.get("custom") or {}
        if any(k.startswith(KEY) for k in c):
            custom[node.name] = {k: str(v) for k, v in c.items() if k.startswith(KEY)}
    model = program.model
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in _all_nodes(graph):
            scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
            try:
                name = ast.literal_eval(scopes)[-1] if scopes else None
            except (ValueError, SyntaxError, IndexError):
                name = None
            if name in custom:
                node.metadata_props.update(custom[name])
    # weights: by their state-dict name, and through the optimizer's record of what a folded one came from
    ep = program.exported_program
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None and getattr(spec.arg, "name", None) in custom:
            custom.setdefault(spec.target, custom[spec.arg.name])
            custom.setdefault(spec.target.replace(".", "_"), custom[spec.arg.name])
    for value in model.graph.initializers.values():
        names = [value.metadata_props.get("pkg.torch.onnx.original_node_name", ""), value.name]
        try:
            names += ast.literal_eval(value.metadata_props.get("pkg.onnxscript.optimizer.folded_from", "[]"))
        except (ValueError, SyntaxError):
            pass
        hits = [custom[n] for n in names if n in custom]
        if hits:
            hit = next((h for h in hits if KEY + "layer" in h), hits[0])
            value.metadata_props.update(hit)  # onnx_ir keeps these on the value ...
            if value.const_value is not None:
                value.const_value.metadata_props.update(hit)  # ... and these in the TensorProto
    model.metadata_props.update(
        {
            KEY + "plan": cm.plan.to_json(),
            KEY + "device": cm.plan.device,
            KEY + "frontend": cm.frontend,
            KEY + "sides": json.dumps(
                {
                    "cpu": "the CPU part of a split Linear (host weights)",
                    "copy": "the host-to-device copy of a GPU part (an Identity here)",
                    "gpu": "the accelerator: resident Linears, GPU parts and everything else",
                    "host": "host work of the launching thread: an embedding lookup from host ids",
                    "io": "graph inputs and outputs",
                }
            ),
        }
    )


def _all_nodes(graph: Any):
    """The nodes of an onnx_ir graph or function, subgraphs (If / Loop / Scan bodies) included."""
    import onnx_ir as ir

    for node in graph:
        yield node
        for attr in node.attributes.values():
            sub = getattr(attr, "value", None)
            for g in sub if isinstance(sub, list | tuple) else [sub]:
                if isinstance(g, ir.Graph):
                    yield from _all_nodes(g)


# -- files --------------------------------------------------------------------------------------------------


def _write(p: Path, write: Any, suffix: str = ".tmp") -> Path:
    """Run ``write(tmp)`` on a temporary path in ``p``'s folder, then rename it to ``p``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=suffix)
    except OSError as e:
        raise ConfigError(f"cannot write {str(p)!r}: {e}") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ConfigError(f"cannot write {str(p)!r}: {e}") from e
        raise
    return p


__all__ = ["ExportError", "annotate_onnx", "export", "load_exported"]
