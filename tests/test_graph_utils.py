"""graph_utils: which nodes change a tensor in place (so dead-code elimination keeps them and DevicePass
writes changed inputs back), whether a graph's attention shapes repeat, and runtime.write_back."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from hetegen_fx.graph_utils import attention_shapes_repeat, eliminate_dead_code, mutates, writers_of
from hetegen_fx.runtime import park, unpark, write_back


def _changes(a, b, c, d, e):
    a.add_(1)  # an in-place method
    torch.relu_(b)  # an in-place function
    F.relu(c, inplace=True)
    d.view(-1).narrow(0, 0, 1).zero_()  # through views
    e.add(1)  # not in place: dead
    return a.sum()


def _graph():
    gm = fx.symbolic_trace(_changes)
    by = {n.name: n for n in gm.graph.nodes}
    return gm, by


def test_in_place_nodes_mutate_and_survive_dead_code_elimination():
    gm, by = _graph()
    assert mutates(by["add_"]) and mutates(by["relu_"]) and mutates(by["relu"]) and mutates(by["zero_"])
    assert not mutates(by["add"]) and not mutates(by["view"])
    assert not by["add_"].is_impure()  # what fx's own elimination would have dropped
    eliminate_dead_code(gm.graph)
    names = {n.name for n in gm.graph.nodes}
    assert {"add_", "relu_", "relu", "zero_"} <= names and "add" not in names
    gm.recompile()
    args = [torch.ones(3) for _ in range(5)]
    args[1] = torch.tensor([-1.0, 2.0, -3.0])
    args[2] = torch.tensor([-1.0, 2.0, -3.0])
    gm(*args)
    assert args[0].tolist() == [2, 2, 2] and args[1].tolist() == [0, 2, 0]
    assert args[2].tolist() == [0, 2, 0] and args[3].tolist() == [0, 1, 1] and args[4].tolist() == [1, 1, 1]


def test_writers_of_an_input():
    gm, by = _graph()
    assert writers_of(by["a"]) == [by["add_"]]
    assert writers_of(by["b"]) == [by["relu_"]]
    assert writers_of(by["c"]) == [by["relu"]]
    assert writers_of(by["d"]) == [by["zero_"]]
    assert writers_of(by["e"]) == []


def test_python_in_place_operators_mutate():
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(operator.iadd, (x, 1))
    g.output(None)
    assert mutates(node) and writers_of(x) == [node]


def test_out_keywords_aten_views_attribute_views_and_aliasing_conversions():
    g = fx.Graph()
    x, c, o = g.placeholder("x"), g.placeholder("c"), g.placeholder("o")
    out_kw = g.call_function(torch.add, (x, 1), {"out": c})  # as dynamo records out=
    aten_view = g.call_function(torch.ops.aten.view.default, (x, [-1]))  # as export records a view
    aten_write = g.call_function(torch.ops.aten.add_.Tensor, (aten_view, 1))
    aten_out = g.call_function(torch.ops.aten.add.out, (x, x), {"out": o})
    t = g.call_function(getattr, (x, "T"))  # x.T under dynamo
    t_write = g.call_method("mul_", (t, 2))
    converted = g.call_method("to", (x, "cpu"))  # the tensor itself when there is nothing to convert
    conv_write = g.call_method("zero_", (converted,))
    packet = g.call_function(torch.ops.aten.add_, (x, 1))  # an overload packet with no .default
    g.output(None)
    assert mutates(out_kw) and mutates(packet) and not mutates(aten_view)
    assert writers_of(c) == [out_kw] and writers_of(o) == [aten_out]
    assert set(writers_of(x)) == {aten_write, t_write, conv_write, packet}
    eliminate_dead_code(g)
    assert {out_kw, aten_write, aten_out, t_write, conv_write, packet} <= set(g.nodes)


def test_write_back_leaves_a_parked_stand_in_alone():
    """The device tensor behind a stand-in is the one the graph changed: nothing to copy (and copying
    would page in the stand-in, the size of a whole KV cache)."""
    shadow = park(torch.zeros(3, device="meta"))
    write_back(shadow, unpark(shadow))  # a copy from "meta" would raise


def test_a_large_write_back_warns_once(monkeypatch):
    from hetegen_fx import runtime

    monkeypatch.setattr(runtime, "WRITE_BACK_WARN_BYTES", 16)
    monkeypatch.setattr(runtime, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"changes in place .* crosses to cpu and back at every call"):
        write_back(torch.zeros(8), torch.ones(8))  # 32 bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_back(torch.zeros(8), torch.ones(8))  # once per shape and dtype
        write_back(torch.zeros(2), torch.ones(2))  # 8 bytes: quiet


def test_write_back_copies_only_when_the_graph_worked_on_a_copy():
    host, moved = torch.zeros(3), torch.arange(3.0)
    write_back(host, moved, None)
    assert host.tolist() == [0, 1, 2]
    same = torch.zeros(2)
    write_back(same, same)
    assert same.tolist() == [0, 0]
    write_back(5, moved)  # not a tensor: nothing to do


def test_several_inputs_written_back_in_one_call_each_get_their_own_values():
    """DevicePass writes a graph's changed inputs back in one call, which gathers the small ones of one dtype
    into one copy (an HF StaticCache's 32 length counters were 32 device-to-host copies a step): each host
    tensor gets its own values, whatever its shape and strides, and the large or odd ones are copied alone."""
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
    moved_counters = [torch.tensor(7 * i + 3) for i in range(4)]
    grid = torch.zeros(4, 3).t()  # not contiguous
    moved_grid = torch.randn(3, 4)
    half = torch.zeros(5, dtype=torch.float16)
    moved_half = torch.randn(5).half()
    big = torch.zeros(2048)  # over the twin size: alone
    moved_big = torch.randn(2048)
    same = torch.zeros(2)
    hosts = (*counters, grid, 5, half, big, same)
    moved = (*moved_counters, moved_grid, 6, moved_half, moved_big, same)
    write_back(hosts, moved, None)
    assert [c.item() for c in counters] == [3, 10, 17, 24]
    assert torch.equal(grid, moved_grid) and not grid.is_contiguous()
    assert torch.equal(half, moved_half) and torch.equal(big, moved_big)
    assert same.tolist() == [0, 0]
    with pytest.raises(ValueError):  # a host tensor without its moved twin is a bug in the caller
        write_back(hosts, moved[:-1])


def test_a_small_input_written_back_keeps_a_device_twin_until_it_changes():
    """An HF StaticCache's length counter comes back to the host at every step; its next copy in is skipped
    while the host tensor is unchanged (its version counter), and handed over once per write-back."""
    import gc

    from hetegen_fx import runtime

    meta = torch.device("meta")
    host, moved = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64, device=meta)
    runtime.remember_twin(host, moved)
    assert runtime.to_device(host, "meta") is moved  # no copy
    assert runtime.take_twin(host, meta) is None  # handed over once: the graph may change it
    runtime.remember_twin(host, moved)
    host.zero_()  # changed on the host (HF's cache.reset()): copied afresh
    assert runtime.take_twin(host, meta) is None
    assert runtime.to_device(host, "meta") is not moved
    runtime.remember_twin(host, moved)
    assert runtime.take_twin(host, torch.device("cpu")) is None  # a twin on another device is no twin
    big = torch.zeros(runtime.TWIN_MAX_BYTES // 8 + 1, dtype=torch.int64)
    runtime.remember_twin(big, big.to(meta))
    assert runtime.take_twin(big, meta) is None  # too large to keep twice
    with torch.inference_mode():
        frozen = torch.zeros(())
        made_there = torch.zeros((), dtype=torch.int64, device=meta)
    runtime.remember_twin(frozen, moved)  # no version counter: never trusted
    assert runtime.take_twin(frozen, meta) is None
    runtime.remember_twin(host, made_there)  # a later call outside inference mode could not change it
    assert runtime.take_twin(host, meta) is None
    runtime.remember_twin(host, moved)
    host.data = torch.ones((), dtype=torch.int64)  # new storage, version counter untouched
    assert runtime.take_twin(host, meta) is None
    runtime.remember_twin(host, moved)
    key = id(host)
    del host
    gc.collect()
    assert key not in runtime._TWINS  # the entry goes with the host tensor


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_attention_shapes_repeat_in_dynamo_graphs_over_a_static_cache_not_over_a_grown_one(tiny_hf, cache):
    """The graphs dynamo captures of an HF decoder's generate: over a StaticCache every graph's attention has
    fixed shapes (keys span the cache's capacity); over a DynamicCache the graph dynamo makes once the length
    varies has a symbolic one, and a graph traced without dynamo's values is never taken to repeat."""
    model = tiny_hf("llama")
    graphs: list[fx.GraphModule] = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=keep)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        kw["cache_implementation"] = "static"
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.generate(ids, **kw)
    torch._dynamo.reset()
    decides = [attention_shapes_repeat(gm) for gm in graphs]
    assert len(graphs) >= 2, decides
    assert all(any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes) for gm in graphs)
    if cache == "static":
        assert all(decides), decides  # the prefill and the decode step
    else:
        assert decides[0] and not decides[-1], decides  # the prefill; the decode step of a symbolic length
    assert not attention_shapes_repeat(
        fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    )


def _query_length(gm: fx.GraphModule) -> int | None:
    for node in gm.graph.nodes:
        if "scaled_dot_product" in str(node.target):
            return (
                int(node.args[0].meta["example_value"].shape[2])
                if "example_value" in node.args[0].meta
                else None
            )
    return None


def test_attention_shapes_repeat_in_the_transformed_graphs_of_a_compiled_decoder():
    """Through hetegen_fx.compile, where DevicePass moves the cache's tensors onto the device in front of the
    attention (a model with as many key/value heads as query heads reads them without a view): the prefill
    and decode graphs over the default static cache repeat their shapes; a second prompt length gives a
    prefill graph of a symbolic length, which does not; a request of the next size class gets a decode graph
    of its own size, not a symbolic one (the prefill marks the cache it makes static), with eager's tokens."""
    import hetegen_fx
    from hetegen_fx.graph_utils import allocated_cache_outputs
    from hetegen_fx.models import build_random

    model = build_random(
        "llama", seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256,
    )  # fmt: skip
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    c = hetegen_fx.compile(model, device="cpu", max_seq_len=1024, kv_cache="static")
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for length in (7, 7):
            c.generate(torch.randint(3, model.config.vocab_size, (1, length), generator=gen), **kw)
        graphs = hetegen_fx.explain(c).graph_modules
        assert len(graphs) >= 2 and all(attention_shapes_repeat(gm) for gm in graphs)
        moved = [n for gm in graphs for n in gm.graph.nodes if n.name.endswith("_dev")]
        assert moved, "the cache's tensors are moved onto the device in front of the attention"
        prefill, decode = graphs[0], graphs[1]
        assert _query_length(decode) == 1
        assert len(allocated_cache_outputs(prefill)) == 2 * model.config.num_hidden_layers  # keys and values
        assert allocated_cache_outputs(decode) == ()
        c.generate(torch.randint(3, model.config.vocab_size, (1, 11), generator=gen), **kw)
        later = hetegen_fx.explain(c).graph_modules[len(graphs) :]
        assert later and not all(attention_shapes_repeat(gm) for gm in later)  # a symbolic prompt length
        ids = torch.randint(3, model.config.vocab_size, (1, 300), generator=gen)  # class 512, not 256
        out = c.generate(ids, **kw)
        ref = model.generate(ids, **kw)
    steps = [gm for gm in hetegen_fx.explain(c).graph_modules if _query_length(gm) == 1]
    assert len(steps) == 2 and all(attention_shapes_repeat(gm) for gm in steps)
    assert out.tolist() == ref.tolist()


def test_attention_inputs_given_by_name_are_checked_too():
    """SDPA called with query=, key=, value=: a symbolic length there counts as much as by position."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v))
    q = torch.randn(1, 2, 3, 8)
    with (mode := FakeTensorMode(shape_env=ShapeEnv())):
        grown = torch.empty(1, 2, mode.shape_env.create_unbacked_symint(), 8)
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), (q, grown, q), strict=True):
        node.meta["example_value"] = value
    assert not attention_shapes_repeat(gm)
    gm.graph.find_nodes(op="placeholder")[1].meta["example_value"] = q
    assert attention_shapes_repeat(gm)


@pytest.mark.parametrize("grows", [True, False])
def test_a_parked_static_cache_buffer_keeps_its_size_for_dynamo(grows):
    """State parked on the accelerator comes back as a host stand-in. A grown cache's stand-in is marked
    dynamic, so its graphs are traced once, not per length; a StaticCache buffer's (``grows=False``) is not,
    so the launcher's ``mark_static`` holds (a weak dynamic mark beats it) and the decode graphs read a fixed
    length, which keeps cuDNN's attention on (an H100 host, 2026-12-08, tree c34c970: ``s40`` slots, cuDNN
    off, where eager ran it every step). A "meta" tensor stands for the device's."""
    seen = []

    def backend(gm, example_inputs):
        values = [ph.meta["example_value"] for ph in gm.graph.find_nodes(op="placeholder")]
        seen.append([v.shape for v in values if isinstance(v, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    shadow = park(torch.zeros(1, 2, 8, 4, device="meta"), grows=grows)
    torch._dynamo.mark_static(shadow)  # what the launcher does to the buffers a prefill allocates
    torch.compile(lambda k: k * 2, backend=backend, fullgraph=True)(shadow)
    assert len(seen) == 1
    assert any(isinstance(d, torch.SymInt) for d in seen[0][0]) is grows
    assert unpark(shadow).device.type == "meta"
