"""Measured timelines (hetegen_fx.trace): what ran on which lane, as a Chrome trace, for fx and dynamo graphs."""

from __future__ import annotations

import json

import pytest
import torch

import hetegen_fx
from hetegen_fx import trace
from hetegen_fx.config import Config
from hetegen_fx.launch import launcher
from hetegen_fx.models import tiny


def _split_mlp():
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(3, 64)
    c = hetegen_fx.compile(
        m, (x,), device="cpu", gpu_memory=70_000, alpha=0.5, profile="model", prefetch=1, activation_reserve=0
    )
    assert all(not lp.resident and 0 < lp.split < lp.out_features for lp in c.plan.layers)
    return m, c, x


def test_record_gives_one_timeline_per_call_with_every_lane(tmp_path):
    m, c, x = _split_mlp()
    with trace.record() as timelines:
        out = c(x)
        c(torch.randn(5, 64))
    torch.testing.assert_close(out, m(x))
    assert len(timelines) == 2
    t = timelines[0]
    lanes = {e.lane for e in t.events}
    assert {"PCIe", "CPU", "GPU", "host"} <= lanes
    assert all(0 <= e.start <= e.end <= t.duration for e in t.events)
    # each split Linear has exactly one copy, and its CPU part starts after the copy was issued
    copies = [e for e in t.events if e.lane == "PCIe"]
    assert len(copies) == 2 and all(e.name.endswith("_copy") for e in copies)
    cpu_parts = [e for e in t.events if e.lane == "CPU" and e.name.endswith("_cpu")]
    assert len(cpu_parts) == 2
    assert t.busy("CPU") > 0 and t.overlap("CPU", "CPU") == t.busy("CPU")
    path = t.save(tmp_path / "step.json")
    data = json.loads(path.read_text())
    names = {e["name"] for e in data["traceEvents"] if e["ph"] == "X"}
    assert {e.name for e in copies} <= names
    assert t.plot(tmp_path / "step.png").stat().st_size > 0


def test_outside_record_nothing_is_recorded_and_results_are_unchanged():
    m, c, x = _split_mlp()
    with trace.record() as timelines:
        pass
    torch.testing.assert_close(c(x), m(x))
    assert timelines == []


def test_overlap_of_lanes():
    t = trace.Timeline(
        [
            trace.Event("PCIe", "a", 0.0, 2.0),
            trace.Event("CPU", "b", 1.0, 3.0),
            trace.Event("CPU", "c", 1.5, 2.5),
        ]
    )
    assert t.overlap("PCIe", "CPU") == 1.0
    assert t.busy("CPU") == 2.0
    assert t.duration == 3.0


def test_hf_generate_records_prefill_and_decode_steps():
    model = tiny("llama")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    c = hetegen_fx.compile(model, gpu_memory=int(total * 0.8), device="cpu", max_seq_len=64)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    ref = model.generate(ids, max_new_tokens=3, do_sample=False)
    with trace.record() as timelines:
        out = c.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert len(timelines) == 3  # prefill + two decode steps
    assert any(e.lane == "PCIe" for e in timelines[-1].events)


_SEEN: list[bool] = []


@torch.fx.wrap
def _cudnn_flag(x: torch.Tensor) -> torch.Tensor:
    _SEEN.append(torch.backends.cuda.cudnn_sdp_enabled())
    return x


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(_cudnn_flag(q), k, v)


def _with_example_values(gm: torch.fx.GraphModule, values) -> torch.fx.GraphModule:
    """``gm`` with dynamo's example values on its inputs, as a graph dynamo captured carries them."""
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), values, strict=True):
        node.meta["example_value"] = value
    for node in gm.graph.find_nodes(op="call_function", target=_cudnn_flag):  # returns its input
        node.meta["example_value"] = node.args[0].meta["example_value"]
    return gm


def test_graphs_run_on_cuda_without_cudnn_attention_where_shapes_vary_and_restore_the_setting():
    """cuDNN's attention builds a plan per new shape (tens of ms per decode token with a growing cache): a
    graph runs with it off on CUDA unless its attention shapes are dynamo's and fixed (then it plans once)
    or it is asked for, and leaves the caller's setting as it was. (The graph's ops run on the CPU here;
    only the setting is checked.)"""
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    traced = torch.fx.symbolic_trace(_Attention())  # no shapes known
    fixed = _with_example_values(torch.fx.symbolic_trace(_Attention()), (q, k, v))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with (mode := FakeTensorMode(shape_env=ShapeEnv())):  # keys of a symbolic length, as dynamo records them
        grown = torch.empty(1, 2, mode.shape_env.create_unbacked_symint(), 8)
    symbolic = _with_example_values(torch.fx.symbolic_trace(_Attention()), (q, grown, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for gm, user, cudnn_attention, device, during in [
            (traced, True, "auto", "cuda", False),  # shapes unknown: switched off while the graph runs
            (symbolic, True, "auto", "cuda", False),  # a symbolic length: off
            (fixed, True, "auto", "cuda", True),  # fixed shapes: left on
            (fixed, True, False, "cuda", False),  # asked off
            (traced, True, True, "cuda", True),  # asked for
            (traced, True, "auto", "cpu", True),  # not a CUDA graph: left alone
            (traced, False, "auto", "cuda", False),  # already off: stays off
            (fixed, False, "auto", "cuda", False),  # nor switched on
        ]:
            torch.backends.cuda.enable_cudnn_sdp(user)
            _SEEN.clear()
            out = launcher(gm, Config(device=device, cudnn_attention=cudnn_attention))(q, k, v)
            torch.testing.assert_close(out, ref)
            assert _SEEN == [during]
            assert torch.backends.cuda.cudnn_sdp_enabled() is user  # restored
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_a_failing_graph_call_restores_the_attention_setting():
    gm = torch.fx.symbolic_trace(_Attention())
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        bad = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 7), torch.randn(1, 2, 3, 8)  # head dims differ
        with pytest.raises(RuntimeError):
            launcher(gm, Config(device="cuda"))(*bad)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
