"""Stretches of device work compiled by inductor (``compile_stretches``), on the emulated device: where a graph
is cut, which nodes go to inductor, when a key is compiled, a refusal, and tokens against eager."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx

import hetegen_fx
from hetegen_fx import ops
from hetegen_fx.graphs import Stretch, capturable, find_stretches
from hetegen_fx.inductor import COMPILE_AFTER, StretchCompiler, specialize
from hetegen_fx.launch import direct


class _Block(torch.nn.Module):
    """A norm-like stretch with a non-tensor argument (the eps) and an in-place cache update."""

    def forward(self, x, cache, pos, eps):
        v = x.pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(v + eps)
        cache.index_copy_(1, pos, y.unsqueeze(1))
        return (torch.nn.functional.silu(y) + 1, cache.sum(1))


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, generator=g)
    cache = torch.randn(2, 8, 16, generator=g)
    return x, cache, torch.tensor([seed % 8]), 1e-5


def test_specialize_bakes_non_tensor_inputs_and_keeps_tensors():
    gm = fx.symbolic_trace(_Block())
    args = _inputs(1)
    spec, tensors = specialize(gm, args)
    assert tensors == [0, 1, 2]
    assert [n.name for n in spec.graph.nodes if n.op == "placeholder"] == ["x", "cache", "pos"]
    c1, c2 = args[1].clone(), args[1].clone()
    ref = gm(args[0], c1, args[2], args[3])
    out = spec(args[0], c2, args[2])
    torch.testing.assert_close(out, ref)
    assert torch.equal(c1, c2)
    with pytest.raises(ValueError, match="called with 3"):
        specialize(gm, args[:3])


def test_a_stretch_key_is_compiled_at_its_second_call_and_matches_eager():
    """Call 1 of a key runs the body; call COMPILE_AFTER compiles it; later calls run inductor's code, whose
    results (and in-place cache update) match the body's on fresh inputs every time."""
    gm = fx.symbolic_trace(_Block())
    compiler = StretchCompiler()
    stretch = Stretch(gm, (True, True), None, compiler=compiler, owner="a test block")
    assert COMPILE_AFTER == 2
    with torch.no_grad():
        for call in range(1, 5):
            x, cache, pos, eps = _inputs(call)
            ref_cache = cache.clone()
            ref = gm(x, ref_cache, pos, eps)
            out = stretch(x, cache, pos, eps)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(cache, ref_cache)
            assert compiler.compiled == (0 if call < COMPILE_AFTER else 1)
        stretch(torch.randn(3, 16), torch.randn(3, 8, 16), torch.tensor([1]), 1e-5)  # a new key: not yet
        assert compiler.compiled == 1
        stretch(*_inputs(9)[:3], 1e-6)  # another eps is another key
        assert compiler.compiled == 1 and len(stretch._keys) == 3
    assert compiler.stats()["failed"] == 0 and compiler.stats()["compile_s"] > 0


def test_a_stretch_inductor_refuses_runs_as_it_was_with_one_warning(monkeypatch):
    import torch._inductor.compile_fx as cfx

    def refuse(*a, **k):
        raise NotImplementedError("no lowering for this op")

    monkeypatch.setattr(cfx, "compile_fx", refuse)
    gm = fx.symbolic_trace(_Block())
    compiler = StretchCompiler()
    stretches = [Stretch(gm, (True, True), None, compiler=compiler) for _ in range(2)]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in stretches:
            for call in range(3):
                x, cache, pos, eps = _inputs(call)
                ref_cache = cache.clone()
                torch.testing.assert_close(s(x, cache, pos, eps), gm(x, ref_cache, pos, eps))
    refused = [w for w in caught if "inductor could not compile" in str(w.message)]
    assert len(refused) == 1 and "NotImplementedError: no lowering" in str(refused[0].message)
    assert compiler.failed == 2 and compiler.compiled == 0  # one per stretch, each tried once
    assert compiler.reasons == {"NotImplementedError": 2}
    with torch.no_grad():  # another key of a refused stretch is not tried again
        x, cache, pos, _ = _inputs(7)
        for _ in range(3):
            stretches[0](x, cache, pos, 1e-6)
    assert compiler.failed == 2


def test_compiled_stretches_give_eager_tokens_and_only_device_work_goes_to_inductor(tiny_hf):
    """A tiny Llama split between the CPU and the (emulated) device, its stretches compiled by inductor and
    recorded as (emulated) graphs: greedy tokens equal eager's over two generates; the direct program's stretch
    calls are exactly the graph's runs of capturable nodes; no hand-off, copy or CPU part is in a stretch."""
    model = tiny_hf("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    c = hetegen_fx.compile(
        model,
        gpu_memory=int(size * 0.4) + (560 << 10),  # the reserves (KV cache, activations, graphs) and 40%
        device="cpu",
        compile_stretches=True,
        cuda_graphs=True,
        graph_memory="256KiB",
    )
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(c.generate(ids, **kw), ref)
    st = hetegen_fx.state(c)
    assert st.compiled_stretches["compiled"] > 0 and st.compiled_stretches["failed"] == 0
    assert st.cuda_graphs["replays"] > 0 and st.cuda_graphs["failed"] == 0
    decode = st.graphs[-1]
    assert any(not lp.resident for lp in decode.plan.layers)  # split: the stretches sit between hand-offs
    gm = decode.graph_module
    runs = find_stretches(gm)
    fast = direct(gm, None, StretchCompiler())
    stretch_calls = [n for n in fast.graph.nodes if n.op == "call_module" and n.target.startswith("stretch_")]
    assert len(stretch_calls) == len(runs) > 1
    for call, run in zip(stretch_calls, runs, strict=True):
        body = fast.get_submodule(call.target).body
        inner = [n for n in body.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        assert len(inner) == len(run)
        assert all(capturable(n, gm) for n in run)
    handoffs = set(ops.DIRECT.values())  # the CPU parts, copies and waits, as the launcher calls them
    assert any(n.target in handoffs for n in fast.graph.nodes)
    for call in stretch_calls:
        assert not any(n.target in handoffs for n in fast.get_submodule(call.target).body.graph.nodes)


def test_the_resident_step_profile_runs_on_the_emulated_device(tmp_path):
    """scripts/profile_resident_step.py as its docstring's dry run (a tiny Llama on the CPU, whose timings mean
    nothing): each variant decodes the eager variant's tokens, the compiled one through inductor's stretches,
    and the report is written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_resident_step.py"
    spec = importlib.util.spec_from_file_location("profile_resident_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--device", "cpu", "--preset", "tiny-llama", "--prompt-len", "16", "--out", str(tmp_path)]
    assert script.main([*args, "--variants", "eager,compiled_graphs_no_cudnn"]) == 0
    res = json.loads((tmp_path / "profile_resident_step.json").read_text())
    eager, compiled = res["eager"], res["compiled_graphs_no_cudnn"]
    assert len(eager["tokens"]) == script.NEW_TOKENS and compiled["tokens"] == eager["tokens"]
    assert compiled["compiled_stretches"]["compiled"] > 0 and eager["compiled_stretches"] is None
    assert compiled["median_step_ms"] > 0
