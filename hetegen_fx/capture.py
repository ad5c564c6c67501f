"""Capture: turn a model into an FX GraphModule whose parameter nodes are bound (:data:`meta.PARAM`).

Three frontends produce graphs:

* ``fx``: ``torch.fx.symbolic_trace`` with only ``nn.Linear`` kept as a leaf (everything else is traced
  through, so parameters appear as ``get_attr`` nodes);
* ``export``: ``torch.export.export`` (``aten`` ops; parameters as ``get_attr`` after unlifting);
* ``dynamo``: the graph dynamo hands a ``torch.compile`` backend, parameters arriving as placeholders
  whose example inputs are the model's real ``Parameter`` objects (recognised by identity).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from . import meta
from .errors import CaptureError
from .linear import ParamRef


class _LinearLeafTracer(fx.Tracer):
    """Trace through every module except ``nn.Linear``."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, torch.nn.Linear)


def _resolve_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def bind_get_attr_params(gm: fx.GraphModule, names: dict[int, str] | None = None) -> int:
    """Write :data:`meta.PARAM` on every ``get_attr`` node that holds a tensor; returns how many."""
    n = 0
    for node in gm.graph.find_nodes(op="get_attr"):
        value = _resolve_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            name = (names or {}).get(id(value), node.target)
            node.meta[meta.PARAM] = ParamRef(name, value)
            n += 1
    return n


def dynamo_param_name(placeholder: str) -> str:
    """``L_self_modules_model_modules_layers_modules_0_..._parameters_weight_`` → ``model.layers.0....weight``;
    ``G_lin_parameters_weight_`` (a global ``lin`` used by a compiled function) → ``lin.weight``. A module
    reached as a wrapper's first argument (``L_args_0_modules_...``, seen with torch 2.13 and transformers 5.25
    when an HF model itself is compiled) is named like ``self``."""
    s = re.sub(r"^[LG]_", "", placeholder).rstrip("_")  # dynamo's local / global prefix
    s = re.sub(r"^(self|fn|mod|model|args_\d+)_(?=(?:modules|parameters|buffers)_)", "", s)
    parts = [p for p in re.split(r"(?:^|_)(?:modules|parameters|buffers)_", s) if p]
    return ".".join(parts) if parts else placeholder


def bind_placeholder_params(
    gm: fx.GraphModule, example_inputs: Sequence[Any], names: dict[int, str] | None = None
) -> int:
    """Bind the placeholders whose example input is an ``nn.Parameter``; returns how many."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    n = 0
    for node, value in zip(placeholders, example_inputs, strict=False):
        if isinstance(value, torch.nn.Parameter):
            name = (names or {}).get(id(value)) or dynamo_param_name(node.target)
            node.meta[meta.PARAM] = ParamRef(name, value)
            n += 1
    return n


def param_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter or buffer) → qualified name (first name wins for tied weights)."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    return names


def capture_fx(model: torch.nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with nn.Linear as the only leaf."""
    try:
        graph = _LinearLeafTracer().trace(model)
    except Exception as e:  # symbolic tracing fails in many ways; report which frontend and why
        raise CaptureError(
            f"frontend 'fx' (torch.fx.symbolic_trace) cannot trace {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Hetegen")
    bind_get_attr_params(gm, param_names(model))
    return gm


def capture_export(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic: bool = True
) -> fx.GraphModule:
    """``torch.export.export``. With ``dynamic``, the sequence of token ids (dim 1 of 2-D integer tensors) and of
    hidden states (dim 1 of 3-D+ tensors) is dynamic, and so is the batch of 2-D float inputs (``(batch,
    features)``, whose feature dimension stays fixed); a model whose code pins those sizes is captured again
    with the example's shapes, with a warning."""
    if not args and not kwargs:
        raise CaptureError("frontend 'export' needs example inputs: pass example_inputs=(...)")
    dyn = _dynamic_shapes(args, kwargs) if dynamic else None
    try:
        ep = _export(model, args, kwargs, dyn)
    except Exception as e:
        if dyn is None:
            raise _capture_error(model, e) from e
        try:  # the model's code fixes a size we made dynamic: its own shapes then
            ep = _export(model, args, kwargs, None)
        except Exception:
            raise _capture_error(model, e) from e
        warnings.warn(
            f"hetegen: {type(model).__name__} could not be exported with a dynamic batch or sequence "
            f"({type(e).__name__}); it is compiled for the example inputs' shapes only",
            RuntimeWarning,
            stacklevel=3,
        )
    gm = ep.module()
    bind_get_attr_params(gm, param_names(model))
    return gm


def _export(model: torch.nn.Module, args: tuple, kwargs: dict | None, dyn: Any) -> Any:
    with torch.no_grad():
        return torch.export.export(model, tuple(args), kwargs or {}, dynamic_shapes=dyn, strict=False)


def _capture_error(model: torch.nn.Module, e: BaseException) -> CaptureError:
    return CaptureError(
        f"frontend 'export' (torch.export) cannot capture {type(model).__name__}: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    )


def _dynamic_shapes(args: tuple, kwargs: dict | None) -> Any:
    """``dynamic_shapes`` for :func:`torch.export.export`: see :func:`capture_export` (None: all static)."""
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(a: Any) -> Any:
        if not isinstance(a, torch.Tensor) or a.dim() < 2:
            return None
        if a.dim() == 2 and a.is_floating_point():  # (batch, features)
            return {0: batch} if a.shape[0] > 1 else None
        return {1: seq} if a.shape[1] > 1 else None  # (batch, seq) ids, (batch, seq, hidden) states

    dyn = {"args": tuple(spec(a) for a in args), "kwargs": {k: spec(v) for k, v in (kwargs or {}).items()}}
    if all(s is None for s in dyn["args"]) and all(s is None for s in dyn["kwargs"].values()):
        return None
    if not kwargs:
        return dyn["args"]
    if not args:
        return dyn["kwargs"]
    return None  # mixing args and kwargs: keep static shapes rather than guess the nesting


def is_hf_model(model: Any) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` (without importing transformers if it is not loaded)."""
    import sys

    tr = sys.modules.get("transformers")
    return tr is not None and isinstance(model, tr.PreTrainedModel)
