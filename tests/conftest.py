"""Shared fixtures of the core test suite.

* every test starts with a fresh dynamo cache and fixed seeds;
* what stays alive across tests (the modules of torch, dynamo, transformers, networkx, matplotlib, ...) is
  frozen out of the garbage collector's reach, so that a full collection walks only what a test makes;
* ``tiny_hf(arch)`` builds tiny random Hugging Face models (configs from ``hetegen_fx.models.tiny_config``);
* ``mlp()``, ``dynamo_capture(...)`` and ``count(...)`` build and inspect small graphs;
* ``smollm2`` is the real default model, loaded once for the whole run;
* tests marked ``gpu`` are skipped without CUDA.
"""

from __future__ import annotations

import gc
import operator
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# global state


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: how many modules were loaded at the last :func:`_refreeze`
_frozen_with = 0


def _refreeze() -> None:
    """Collect everything (an object frozen before and unreachable since included), then freeze what is alive:
    later full collections skip it. A full collection walks every tracked object: over the ~400-600k that the
    imports of a compile bring (torch, dynamo, transformers, networkx, ...) it takes 0.2-0.4 s on this 2-core
    machine, and the bench calls ``gc.collect()`` before each variant, besides the automatic ones."""
    global _frozen_with
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _frozen_with = len(sys.modules)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The first freeze, after importing what nearly every test uses."""
    import torch._dynamo  # noqa: F401  (every test resets it)
    import transformers.generation.utils  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    _refreeze()


@pytest.fixture(scope="session")
def smollm2() -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the default model, SmolLM2-135M in fp32, loaded once for the run (15-20 s of GGUF
    dequantization on 2 cores). A test that compiles it leaves it as it found it (eager, no store)."""
    from hetegen_fx.models import load

    return load(None, dtype=torch.float32, progress=False)


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    """Each compile of an HF model adds dynamo cache entries: reset them, and fix the seeds. After a wave of
    first imports, :func:`_refreeze`."""
    torch._dynamo.reset()
    if len(sys.modules) > _frozen_with + 50:  # the last test's first imports (a first compile, a chart, ...)
        _refreeze()
    torch.manual_seed(0)
    random.seed(0)


# --------------------------------------------------------------------------------------------------------------
# tiny Hugging Face models


def build_tiny_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from hetegen_fx.models import tiny_config

    cfg = tiny_config(arch, vocab_size=128)  # the project's tiny configs, with HF's own initialisation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = (
        cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    )
    return model


@pytest.fixture
def tiny_hf() -> Callable[..., torch.nn.Module]:
    """``tiny_hf("llama")`` → a random LlamaForCausalLM (vocab 128, hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    return build_tiny_hf


# --------------------------------------------------------------------------------------------------------------
# small plain modules and graphs


class MLP(nn.Module):
    """Three Linears of different shapes (32→64→48→16), the last without bias."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64, bias=bias)
        self.b = nn.Linear(64, 48, bias=bias)
        self.c = nn.Linear(48, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture
def mlp() -> Callable[..., nn.Module]:
    """``mlp(bias=True)`` → an eval-mode :class:`MLP` with random weights (in 32, out 16)."""

    def make(bias: bool = True) -> nn.Module:
        return MLP(bias=bias).eval()

    return make


def dynamo_capture_impl(fn: Callable, *inputs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """The (first) graph dynamo hands a backend for ``fn(*inputs)``, with its parameters bound."""
    from hetegen_fx.capture import bind_placeholder_params

    seen: list[tuple[fx.GraphModule, list[Any]]] = []

    def record(gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        seen.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=record, fullgraph=True, dynamic=False)(*inputs)
    assert seen, "dynamo produced no graph"
    gm, example_inputs = seen[0]
    bind_placeholder_params(gm, example_inputs)
    return gm, example_inputs


@pytest.fixture
def dynamo_capture() -> Callable[..., tuple[fx.GraphModule, list[Any]]]:
    return dynamo_capture_impl


LINEAR_FNS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


def count_impl(gm: fx.GraphModule, what: Any) -> int:
    """Nodes of ``gm`` by kind: "linear" (any Linear call), "copy", "wait", "release", "cpu_begin",
    "cpu_end", "cat", "to_device", "matmul", "addmm", or a call target."""
    from hetegen_fx.ops import COPY, CPU_BEGIN, CPU_END, RELEASE, WAIT, is_op
    from hetegen_fx.runtime import to_device

    def match(n: fx.Node) -> bool:
        if what == "linear":
            if n.op == "call_module":
                return isinstance(gm.get_submodule(n.target), nn.Linear)
            return n.op == "call_function" and n.target in LINEAR_FNS
        if n.op != "call_function":
            return False
        if what == "copy":
            return is_op(n.target, COPY)
        if what == "wait":
            return is_op(n.target, WAIT)
        if what == "release":
            return is_op(n.target, RELEASE)
        if what == "cpu_begin":
            return is_op(n.target, CPU_BEGIN)
        if what == "cpu_end":
            return is_op(n.target, CPU_END)
        if what == "cat":
            return n.target in (torch.cat, torch.ops.aten.cat.default)
        if what == "to_device":
            return n.target is to_device
        if what == "matmul":
            return n.target in (torch.matmul, operator.matmul, torch.ops.aten.matmul.default)
        if what == "addmm":
            return n.target in (torch.addmm, torch.ops.aten.addmm.default)
        return n.target is what

    return sum(1 for n in gm.graph.nodes if match(n))


@pytest.fixture
def count():
    return count_impl
