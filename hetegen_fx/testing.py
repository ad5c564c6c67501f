"""A kit for testing FX passes: op counts before and after, ``modified``, and numerics on fresh inputs.

A pass you write is tested in five lines::

    import torch
    from torch import nn
    from hetegen_fx.testing import check_pass

    report = check_pass(MyPass(), nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),),
                        before={"linear": 1}, after={"linear": 0, "matmul": 1})

:func:`check_pass` captures a plain module with ``torch.fx`` (nn.Linear kept as a leaf, as hetegen_fx's
fx frontend does), runs the pass on a *copy* of the graph, checks the op counts you name and that the
pass reported ``modified`` when the counts changed, and compares the result with the original on fresh
random inputs shaped like ``example_inputs``. Any mismatch is an ``AssertionError`` with a readable diff.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_flatten, tree_map

from .capture import capture_fx
from .graph_utils import clone_graph_module

__all__ = ["PassReport", "check_pass", "count_ops", "fresh_inputs", "op_name"]

_OPERATORS = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.neg: "neg",
}


def op_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """A readable name for what ``node`` computes, or None for placeholders, get_attr and output.

    * a Linear in any form of call (``nn.Linear`` module, ``F.linear``, ``aten.linear``) → ``"linear"``;
    * an ``aten`` op → its name without overload (``aten.cat.default`` → ``"cat"``), another namespace's
      op → ``"namespace.name"`` (``"hetegen.copy_h2d"``, ``"hetegen.cpu_begin"``, ``"hetegen.cpu_end"``, ...);
    * a Python function → its ``__name__`` (``torch.cat`` → ``"cat"``, ``torch.matmul`` → ``"matmul"``,
      ``operator.add`` → ``"add"``, hetegen's ``to_device`` → ``"to_device"``);
    * a method call → the method (``"view"``); another module call → its class name (``"ReLU"``).
    """
    if node.op == "call_module":
        mod = gm.get_submodule(node.target) if gm is not None else None
        if isinstance(mod, torch.nn.Linear):
            return "linear"
        return type(mod).__name__ if mod is not None else str(node.target)
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
        ns, name = packet._qualified_op_name.split("::", 1)
        return name if ns == "aten" else f"{ns}.{name}"
    if t in _OPERATORS:
        return _OPERATORS[t]
    name = getattr(t, "__name__", None) or str(t)
    return name.removeprefix("_")


def count_ops(gm: fx.GraphModule) -> Counter:
    """``Counter`` of :func:`op_name` over the nodes of ``gm`` (placeholders, get_attr and output left out)."""
    names = (op_name(n, gm) for n in gm.graph.nodes)
    return Counter(n for n in names if n is not None)


def _fresh(x: Any, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point() or x.is_complex():
        return torch.randn(x.shape, dtype=x.dtype, generator=gen).to(x.device)
    if x.dtype == torch.bool:
        return torch.randint(0, 2, x.shape, generator=gen).bool().to(x.device)
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
    if lo == hi:  # one value seen (a position, a single token): nothing to vary safely
        return x.clone()
    return torch.randint(lo, hi + 1, x.shape, generator=gen, dtype=x.dtype).to(x.device)


def fresh_inputs(example_inputs: Sequence[Any], seed: int = 0) -> tuple:
    """New random inputs shaped like ``example_inputs`` (nested tuples / lists / dicts allowed): floats from
    ``randn``, integers from ``randint`` over the range the example spans (an integer tensor holding one
    value is kept, since any other value may be out of range), bools at random; other values are kept."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(tree_map(lambda x: _fresh(x, gen), tuple(example_inputs)))


@dataclass
class PassReport:
    """What :func:`check_pass` saw. ``graph_module`` is the transformed copy."""

    graph_module: fx.GraphModule
    modified: bool | None  # as the pass reported it (None: the pass returned no PassResult)
    before: Counter
    after: Counter
    runs: int
    max_abs_error: float = 0.0
    checked_inputs: list[tuple] = field(default_factory=list, repr=False)

    @property
    def changed(self) -> dict[str, tuple[int, int]]:
        """Ops whose count changed: name → (before, after)."""
        keys = sorted(set(self.before) | set(self.after))
        return {k: (self.before[k], self.after[k]) for k in keys if self.before[k] != self.after[k]}

    def __str__(self) -> str:
        diff = ", ".join(f"{k} {a}→{b}" for k, (a, b) in self.changed.items()) or "no op count changed"
        return (
            f"PassReport(modified={self.modified}; {diff}; {self.runs} numeric run(s), "
            f"max abs error {self.max_abs_error:.3g})"
        )


def _diff_table(title: str, expected: Mapping[str, int], actual: Counter) -> str | None:
    bad = {k: (v, actual[k]) for k, v in expected.items() if actual[k] != v}
    if not bad:
        return None
    width = max(len(k) for k in [*bad, "op"])
    rows = [f"{title}: op counts differ", f"  {'op':<{width}}  expected  actual"]
    rows += [f"  {k:<{width}}  {e:>8}  {a:>6}" for k, (e, a) in bad.items()]
    rows.append(f"  all counts: {dict(sorted(actual.items()))}")
    return "\n".join(rows)


def _run_pass(pass_: Any, gm: fx.GraphModule) -> tuple[fx.GraphModule, bool | None]:
    passes = list(pass_) if isinstance(pass_, (list, tuple)) else [pass_]
    modified: bool | None = False
    for p in passes:
        res = p(gm)
        if isinstance(res, PassResult):
            gm, modified = res.graph_module, (modified or res.modified) if modified is not None else None
        else:
            gm, modified = (res if isinstance(res, fx.GraphModule) else gm), None
    return gm, modified


def check_pass(
    pass_: Callable[[fx.GraphModule], Any] | Sequence[Callable[[fx.GraphModule], Any]],
    module_or_gm: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    before: Mapping[str, int] | None = None,
    after: Mapping[str, int] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    runs: int = 2,
) -> PassReport:
    """Run ``pass_`` on a copy of a graph and check it; raise ``AssertionError`` with a readable diff.

    ``pass_`` is a ``torch.fx.passes.infra`` pass (returns a ``PassResult``), any callable that rewrites a
    GraphModule in place or returns one, or a list of them run in order (e.g. the passes a pass needs
    before it). ``module_or_gm`` is a plain ``nn.Module`` (captured with
    :func:`hetegen_fx.capture.capture_fx`) or a ``GraphModule``; the original is never modified and is the
    reference for numerics.

    1. ``before`` / ``after``: op counts (keys as :func:`op_name` writes them: ``"linear"``, ``"cat"``,
       ``"matmul"``, ``"hetegen.copy_h2d"`` …) that must hold before and after the pass. Keys you do not
       name are not checked; ``0`` asserts an op is absent.
    2. If any op count changed, the pass must have reported ``modified=True``; if it reported
       ``modified=False``, the generated code must be unchanged.
    3. ``runs`` times, on fresh random inputs shaped like ``example_inputs`` (:func:`fresh_inputs`; never
       the example itself, never zeros), the transformed graph must match the original within
       ``atol`` / ``rtol``.

    Returns a :class:`PassReport` (the transformed copy, the counts, the largest error seen).

    >>> import torch
    >>> from torch import nn
    >>> from hetegen_fx.testing import check_pass
    >>> def relu_to_clamp(gm):
    ...     for n in gm.graph.nodes:
    ...         if n.op == "call_function" and n.target is torch.relu:
    ...             n.target, n.kwargs = torch.clamp, {"min": 0.0}
    ...     gm.recompile()
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x)
    >>> check_pass(relu_to_clamp, M(), (torch.randn(3),), before={"relu": 1}, after={"relu": 0, "clamp": 1}).runs
    2
    """
    if isinstance(module_or_gm, fx.GraphModule):
        gm, reference = module_or_gm, module_or_gm
    elif isinstance(module_or_gm, torch.nn.Module):
        gm, reference = capture_fx(module_or_gm), module_or_gm
    else:
        raise TypeError(f"check_pass needs an nn.Module or a GraphModule, got {type(module_or_gm).__name__}")
    counts_before = count_ops(gm)
    if before is not None and (msg := _diff_table("before the pass", before, counts_before)):
        raise AssertionError(msg)

    work = clone_graph_module(gm)
    code_before = work.code
    out, modified = _run_pass(pass_, work)
    out.graph.lint()
    out.recompile()
    counts_after = count_ops(out)
    report = PassReport(out, modified, counts_before, counts_after, runs)
    if after is not None and (msg := _diff_table("after the pass", after, counts_after)):
        raise AssertionError(f"{msg}\n  changed: {report.changed or 'nothing'}")
    if modified is False and report.changed:
        raise AssertionError(f"the pass changed op counts {report.changed} but returned modified=False")
    if modified is False and out.code != code_before:
        raise AssertionError("the pass changed the generated code but returned modified=False")

    for r in range(runs):
        inputs = fresh_inputs(example_inputs, seed=1234 + r)
        with torch.no_grad():
            expected = reference(*inputs)
            actual = out(*inputs)
        exp_leaves, exp_spec = tree_flatten(expected)
        act_leaves, act_spec = tree_flatten(actual)
        if exp_spec != act_spec:
            raise AssertionError(f"run {r}: output structure differs: expected {exp_spec}, got {act_spec}")
        for i, (e, a) in enumerate(zip(exp_leaves, act_leaves, strict=True)):
            try:
                torch.testing.assert_close(a, e, atol=atol, rtol=rtol)
            except AssertionError as err:
                shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
                raise AssertionError(
                    f"run {r} (fresh inputs {shapes}): output {i} of the transformed graph differs from the "
                    f"original:\n{err}"
                ) from None
            if isinstance(e, torch.Tensor) and e.numel():
                err_ = (a.detach().to(e.device).double() - e.detach().double()).abs().max().item()
                report.max_abs_error = max(report.max_abs_error, err_)
        report.checked_inputs.append(inputs)
    return report
