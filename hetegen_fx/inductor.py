"""Inductor for the stretches of device work between two hand-offs (``Config.compile_stretches``).

Owns: :class:`StretchCompiler`, which compiles one stretch's body (a :class:`hetegen_fx.graphs.Stretch`)
for one input key with ``torch._inductor.compile_fx`` (the compiler behind ``torch.compile``), its
non-tensor arguments baked in as constants, and counts what that cost. Must not: change what a stretch
computes (a stretch inductor refuses runs as it was, with one warning), or compile inside a CUDA-graph
recording (a Stretch asks before it records).

A stretch is the norms, rotary embedding, attention, residual adds and cache updates of a layer between two
CPU jobs, or a whole step of resident layers: launched op by op it costs 10-40 µs of the launching thread
per op; compiled, its pointwise work fuses into a few kernels. Layers have the same stretches, so after the
first layer inductor's FX graph cache (on by default, ``TORCHINDUCTOR_CACHE_DIR``, kept across processes)
answers in about 0.1 s. A key (shapes, strides, dtypes, other arguments) is compiled at its second call
(:data:`COMPILE_AFTER`), so a prefill whose length comes once runs eagerly.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

#: a key is compiled at this call of it (decode steps repeat their keys; a prompt length often does not)
COMPILE_AFTER = 2
#: one compile at a time in the process (models on two devices have two device locks; inductor is not
#: documented as safe to call from two threads at once)
_COMPILING = threading.Lock()


@dataclass
class StretchCompiler:
    """Compiles the stretches of one model's graphs; its counts show in :func:`hetegen_fx.state`."""

    verbose: bool = False
    compiled: int = 0  # keys compiled
    failed: int = 0  # keys inductor refused (they run as they were)
    seconds: float = 0.0  # wall time spent compiling
    reasons: dict = field(default_factory=dict)  # why keys were refused: error type -> count
    _told: set = field(default_factory=set, repr=False)  # graphs whose first compile was announced

    def stats(self) -> dict:
        return {
            "compiled": self.compiled,
            "failed": self.failed,
            "compile_s": round(self.seconds, 3),
            "refused": dict(self.reasons),
        }

    def compile(self, body: fx.GraphModule, args: tuple, owner: str = "") -> Callable | None:
        """``body`` compiled for calls like ``args`` (same shapes, strides and dtypes; the same non-tensor
        values): a callable taking the same arguments and returning a tuple, or None if inductor refused it.
        ``owner`` names the graph the stretch belongs to, for the first-compile progress line."""
        if owner not in self._told:
            self._told.add(owner)
            print(
                f"[hetegen] compiling the device stretches of {owner or 'a graph'} with inductor "
                "(once per shape; cached on disk)",
                file=sys.stderr,
                flush=True,
            )
        gm, tensors = specialize(body, args)
        t0 = time.perf_counter()
        try:
            from torch._inductor.compile_fx import compile_fx

            with _COMPILING, torch.no_grad():
                fn = compile_fx(gm, [args[i] for i in tensors])
        except Exception as e:  # noqa: BLE001  (an op inductor cannot take: the stretch runs as it was)
            self.seconds += time.perf_counter() - t0
            self.failed += 1
            name = type(e).__name__
            if name not in self.reasons:
                first = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(
                    f"hetegen: inductor could not compile a stretch of device work; it runs op by op "
                    f"({name}: {first})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.reasons[name] = self.reasons.get(name, 0) + 1
            return None
        self.seconds += time.perf_counter() - t0
        self.compiled += 1
        if self.verbose:
            print(
                f"[hetegen] inductor: stretch of {len(gm.graph.nodes)} nodes compiled "
                f"({self.compiled} so far, {self.seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

        def run(*call_args):
            return tuple(fn(*[call_args[i] for i in tensors]))

        return run


def specialize(body: fx.GraphModule, args: tuple) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``body`` whose non-tensor inputs are the constants ``args`` holds for them (inductor takes
    only tensors), and the positions of the inputs it still takes."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise ValueError(f"a stretch of {len(placeholders)} inputs called with {len(args)}")
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    tensors = []
    for i, (node, value) in enumerate(zip(placeholders, args, strict=True)):
        if isinstance(value, torch.Tensor):
            env[node] = graph.node_copy(node)
            tensors.append(i)
        else:
            env[node] = value
    for node in body.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(body, graph, class_name="CompiledStretch"), tensors


__all__ = ["COMPILE_AFTER", "StretchCompiler", "specialize"]
