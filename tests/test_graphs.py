"""CUDA graphs for stretches of device work (:mod:`hetegen_fx.graphs`), on the emulated device.

On "cpu" a recorded "graph" keeps its own input and output buffers and replays by running the stretch on its
inputs and copying the results into its outputs: what a CUDA graph's replay does to memory. So the logic
that makes replays correct (which inputs are copied in, copied back or read in place, which outputs are
cloned, when a key is recorded again) is checked here; tests/test_gpu.py records real CUDA graphs.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

from hetegen_fx import Config
from hetegen_fx.errors import ConfigError
from hetegen_fx.graphs import (
    COPY_BYTES,
    GRAPH_IO_BYTES,
    GraphPool,
    Stretch,
    find_stretches,
    fuse_stretches,
    kept_bytes,
    reserve,
)
from hetegen_fx.runtime import to_device, write_back


def _calls(gm: fx.GraphModule) -> int:
    return sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)


def _fused(fn, min_nodes: int = 4) -> tuple[fx.GraphModule, GraphPool]:
    gm = fx.symbolic_trace(fn)
    pool = GraphPool(torch.device("cpu"))
    fuse_stretches(gm, pool, min_nodes)
    return gm, pool


def _counter_fn(x, counter):
    a = x * 2
    b = a + 1
    counter.add_(1)
    c = b * counter
    return c.relu()


def test_one_stretch_replaces_its_calls():
    gm = fx.symbolic_trace(_counter_fn)
    assert [len(r) for r in find_stretches(gm)] == [5]
    fused, _ = _fused(_counter_fn)
    stretches = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert len(stretches) == 1 and isinstance(fused.get_submodule(stretches[0].target), Stretch)
    assert _calls(fused) == 2  # the stretch and the getitem of its one output


@torch.no_grad()  # a stretch records nothing while autograd records
def test_replays_match_eager_and_copy_changed_inputs_back():
    """Fresh inputs at every call; the counter the stretch changes in place is copied in and back out;
    an output handed out is a copy, which a later replay leaves alone."""
    gm, pool = _fused(_counter_fn)
    counter, ref_counter = torch.zeros(()), torch.zeros(())
    outs = []
    for _ in range(4):
        x = torch.randn(3, 5)
        out = gm(x, counter)
        torch.testing.assert_close(out, _counter_fn(x.clone(), ref_counter))
        assert torch.equal(counter, ref_counter)
        outs.append((out, out.clone()))
    assert pool.recorded == 1 and pool.replays == 3  # warm-up, then recorded and replayed, then replayed
    for out, copy in outs:
        assert torch.equal(out, copy), "a later replay changed an output already handed out"


torch.fx.wrap("to_device")  # traced as calls, as DevicePass writes them
torch.fx.wrap("write_back")


def _written_back_fn(x, host_counter):
    counter = to_device(host_counter, "cpu")
    a = x * 2
    b = a + 1
    changed = counter.add_(1)
    c = b * counter
    write_back(host_counter, counter, changed)
    return c.relu()


@torch.no_grad()
def test_a_counter_written_back_is_no_output_and_its_copies_replay():
    """An input the stretch changes in place and DevicePass writes back to the host (an HF StaticCache's
    length counter): the write-back runs after the stretch's call by graph order, not after an output
    aliasing the input, so the input is copied in and back out. On CUDA it is a new device copy at every
    generate; read in place, as an alias of an output is, each generate recorded every graph again until
    the pool was full (H100 host, 2026-12-07: 6 replays in about 190 decode steps)."""
    gm, pool = _fused(_written_back_fn)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    (wb,) = gm.graph.find_nodes(op="call_function", target=write_back)
    order = list(gm.graph.nodes)
    assert wb.args[2:] == () and order.index(wb) > order.index(call)  # after the call, by graph order
    assert sum(u.target is operator.getitem for u in call.users) == 1  # one output: the result
    counter, ref = torch.zeros(()), torch.zeros(())
    for _ in range(5):
        counter = counter.clone()  # another tensor at every call, as a copy to the device is
        x = torch.randn(3, 5)
        torch.testing.assert_close(gm(x, counter), _written_back_fn(x.clone(), ref))
        assert torch.equal(counter, ref)
    assert pool.recorded == 1 and pool.replays == 4 and not pool.moved


def test_under_inference_mode_an_input_changed_in_place_is_still_copied_in_and_back():
    """Inference tensors keep no version counter, so a stretch cannot see its input change by it; it used to
    read every input of such a call in place. An HF StaticCache's length counter is a new device tensor at
    every generate (and, in inference mode, at every step: no device twin is kept for it), so every call
    recorded the graph again until the key gave up ("pinned inputs kept moving"). The body's own in-place
    writes say which inputs to copy back; its buffers are plain tensors, so calls outside inference mode
    replay the same graph."""
    gm, pool = _fused(_written_back_fn)
    ref = torch.zeros(())
    for i in range(6):
        mode = torch.inference_mode() if i < 4 else torch.no_grad()  # the last two outside inference mode
        with mode:
            counter = ref.clone()  # another tensor at every call, as a copy to the device is
            x = torch.randn(3, 5)
            want = _written_back_fn(x.clone(), ref)
            torch.testing.assert_close(gm(x, counter), want)
            assert torch.equal(counter, ref), i
    assert (pool.recorded, pool.replays, pool.moved) == (1, 5, {})  # a recording replays once too


def _big_fn(x, big):
    y = big * 2
    y = y + x.sum()
    y = y.relu()
    return y - 1


@torch.no_grad()  # a stretch records nothing while autograd records
def test_a_large_input_is_read_in_place_and_recorded_again_when_it_moves():
    gm, pool = _fused(_big_fn)
    n = COPY_BYTES // 4 + 1  # just above the copy limit (float32)
    first = torch.randn(n)
    x = torch.randn(3)
    for _ in range(3):
        torch.testing.assert_close(gm(x, first), _big_fn(x, first))
    assert pool.recorded == 1
    moved = torch.randn(n)  # another tensor: the graph's address is stale
    torch.testing.assert_close(gm(x, moved), _big_fn(x, moved))
    assert sum(pool.moved.values()) == 1
    torch.testing.assert_close(gm(x, moved), _big_fn(x, moved))  # recorded again, and replayed
    assert pool.recorded == 2
    torch.testing.assert_close(gm(x, moved), _big_fn(x, moved))
    assert pool.recorded == 2 and pool.stats()["graphs_kept"] == 1


@torch.no_grad()
def test_a_graph_recorded_again_keeps_the_old_one_while_the_pool_lives():
    """The old graph is not replayed any more, but it is not freed either: on torch 2.11 freeing a CUDA
    graph frees the cuBLAS workspace that the pool's other graphs, captured on the same stream, still use."""
    import weakref

    gm, pool = _fused(_big_fn)
    n = COPY_BYTES // 4 + 1
    x, first, moved = torch.randn(3), torch.randn(n), torch.randn(n)
    for _ in range(2):
        gm(x, first)
    (stretch,) = pool.stretches
    (state,) = stretch._keys.values()
    old = weakref.ref(state.graph)
    for _ in range(3):  # moved: eager, then recorded again and replayed
        torch.testing.assert_close(gm(x, moved), _big_fn(x, moved))
    assert pool.recorded == 2 and state.graph is not old()
    assert old() is not None and old() in pool._retired


def _two_stretch_fn(x, big):
    a = big * 2
    a = a + x.sum()
    a = a.relu()
    a = a - 1
    s = a.sum().item()  # a host read: ends the first stretch
    b = a * s
    b = b + 1
    b = b.relu()
    return b * 3


@torch.no_grad()
def test_a_recording_out_of_step_order_starts_a_new_memory_pool():
    """Graphs sharing a memory pool are safe only replayed in the order recorded: the first stretch,
    recorded again after the second (its large input moved), goes to a new pool, and the second, recorded
    again after it in the same step, joins that one."""
    gm, pool = _fused(_two_stretch_fn)
    n = COPY_BYTES // 4 + 1
    x, first, moved = torch.randn(3), torch.randn(n), torch.randn(n)
    for _ in range(2):
        gm(x, first)
    assert [s.order for s in pool.stretches] == [0, 1]
    assert pool.recorded == 2 and pool.pools == 1
    for _ in range(3):  # moved: the first stretch eager, then recorded again; the second's input moved too
        torch.testing.assert_close(gm(x, moved), _two_stretch_fn(x, moved))
    assert pool.recorded == 4 and pool.pools == 2 and pool.stats()["memory_pools"] == 2
    torch.testing.assert_close(gm(x, moved), _two_stretch_fn(x, moved))
    assert pool.recorded == 4 and pool.pools == 2


def _large_out_fn(x):
    y = x.repeat(1, 1024)
    y = y * 2
    y = y + 1
    return y.relu()


@torch.no_grad()  # a stretch records nothing while autograd records
def test_keys_with_large_inputs_and_outputs_are_not_recorded():
    gm, pool = _fused(_large_out_fn)
    x = torch.randn(1, GRAPH_IO_BYTES // 4096 + 1)  # 1024 times that, as float32, is over the limit
    for _ in range(3):
        torch.testing.assert_close(gm(x), _large_out_fn(x))
    assert pool.recorded == 0
    assert pool.stats()["eager_keys"] == {"inputs and outputs too large": 1}


def _wide_inside_fn(x):
    y = x.repeat(1, 1024)  # large inside ...
    y = y * 2
    y = y.relu()
    return y.sum(-1, keepdim=True)  # ... small out, as a whole resident step at a long prompt


def _shaped(fn, example: torch.Tensor, limit: int | None = None) -> tuple[fx.GraphModule, GraphPool]:
    """``fn`` traced with its values recorded at ``example``'s shape (as dynamo records them), fused."""
    from hetegen_fx.graph_utils import propagate_shapes

    gm = fx.symbolic_trace(fn)
    propagate_shapes(gm, [example])
    pool = GraphPool(torch.device("cpu"), limit)
    fuse_stretches(gm, pool, 3)
    return gm, pool


@torch.no_grad()
def test_a_body_that_would_keep_more_than_the_pool_is_not_recorded():
    """Recorded from the body, a graph keeps every value the body makes (so that no later recording reuses
    their memory). A whole resident step returns one token's logits whatever the prompt's length, so its
    inputs and outputs do not tell a prefill; what it would keep does (a 7B's, recorded at a 512-token prompt,
    took 6 GB of a 128 MiB pool on the H100 host, 2026-12-07). The same function captured at a decode's
    shape is recorded."""
    wide = torch.randn(4, 256)  # 4 MiB after the repeat: three such values and a sum
    gm, pool = _shaped(_wide_inside_fn, wide, limit=8 << 20)
    (stretch,) = pool.stretches
    assert kept_bytes(stretch.body) == kept_bytes(stretch.body, (wide,)) == 3 * (4 << 20) + 4 * 4
    assert kept_bytes(stretch.body, (torch.randn(4, 8),)) == 3 * (4 * 8 * 1024 * 4) + 4 * 4  # per key
    for _ in range(3):
        torch.testing.assert_close(gm(wide), _wide_inside_fn(wide))
    assert pool.recorded == 0 and pool.stats()["eager_keys"] == {"the values it keeps exceed the pool": 1}
    narrow = torch.randn(4, 8)
    gm, pool = _shaped(_wide_inside_fn, narrow, limit=8 << 20)
    for _ in range(3):
        torch.testing.assert_close(gm(narrow), _wide_inside_fn(narrow))
    assert pool.recorded == 1 and pool.replays == 2
    # captured at the decode's shape, called at the prefill's (a graph with dynamic shapes)
    for _ in range(3):
        torch.testing.assert_close(gm(wide), _wide_inside_fn(wide))
    assert pool.recorded == 1 and pool.stats()["eager_keys"] == {"the values it keeps exceed the pool": 1}


def _view_written_fn(x, state):
    v = state.view(-1)
    v = v.mul(1)  # a new tensor: state is only read
    w = state.view(-1)  # a view of the input, changed after the stretch
    z = v + x
    return z.relu(), w


def _outer(x, state):
    z, w = _view_written_fn(x, state)
    w.add_(z.sum().item())  # the host read ends the stretch: the add_ runs after it, on its output w
    return z, w


@torch.no_grad()  # a stretch records nothing while autograd records
def test_an_input_whose_view_is_changed_later_is_read_in_place():
    traced = fx.symbolic_trace(_outer)
    pool = GraphPool(torch.device("cpu"))
    fuse_stretches(traced, pool, min_nodes=4)
    state, ref_state = torch.zeros(6), torch.zeros(6)
    for _ in range(4):
        x = torch.randn(6)
        (z, w), (ref_z, _) = traced(x, state), _outer(x, ref_state)
        torch.testing.assert_close(z, ref_z)
        assert torch.equal(state, ref_state), "the add_ through the returned view must reach the input"
        assert w.data_ptr() == state.data_ptr(), "an output that is a view of an input must stay one"
    assert pool.recorded == 1


def _input_written_after(x, y):
    v = x.view(-1)
    a = y * 2
    b = a + 1
    return v, b.relu()


def _outer_input(x, y):
    v, c = _input_written_after(x, y)
    x.add_(c.sum().item())  # changes the input after the stretch; v, a view of it, must see that
    return v * 1


@torch.no_grad()  # a stretch records nothing while autograd records
def test_an_input_an_output_views_is_read_in_place():
    traced = fx.symbolic_trace(_outer_input)
    pool = GraphPool(torch.device("cpu"))
    fuse_stretches(traced, pool, min_nodes=3)
    for _ in range(4):
        y = torch.randn(3)
        torch.testing.assert_close(traced(torch.zeros(3), y), _outer_input(torch.zeros(3), y))
    assert pool.recorded >= 1


def _shared_fn(cache, row):
    a = row.add_(1)
    s = cache * 2
    t = s + 1
    return t.relu() + a.sum()


@torch.no_grad()  # a stretch records nothing while autograd records
def test_inputs_that_share_memory_are_read_in_place():
    """``row`` is a view of ``cache``: the stretch changes the row and then reads the cache."""
    gm, pool = _fused(_shared_fn)
    for _ in range(4):
        cache = torch.randn(4, 3)
        ref = cache.clone()
        torch.testing.assert_close(gm(cache, cache[0]), _shared_fn(ref, ref[0]))
        assert torch.equal(cache, ref)
    assert pool.recorded >= 1


def _int_and_expanded_fn(x, m):
    a = x * 2
    b = a + m
    c = b.relu()
    return c, c.size(0)


@torch.no_grad()  # a stretch records nothing while autograd records
def test_int_outputs_and_expanded_inputs():
    gm, pool = _fused(_int_and_expanded_fn)
    m = torch.randn(1, 3).expand(2, 3)  # cannot be copied with its strides: read in place
    for _ in range(4):
        x = torch.randn(2, 3)
        out = gm(x, m)
        ref = _int_and_expanded_fn(x, m)
        torch.testing.assert_close(out[0], ref[0])
        assert out[1] == 2
    assert pool.recorded == 1


def _tuple_fn(x):
    a = x * 2
    b = a + 1
    c = b.relu()
    return c.chunk(2)


@torch.no_grad()  # a stretch records nothing while autograd records
def test_a_tuple_output_runs_eagerly():
    gm, pool = _fused(_tuple_fn)
    for _ in range(3):
        x = torch.randn(4, 2)
        for got, ref in zip(gm(x), _tuple_fn(x), strict=True):
            torch.testing.assert_close(got, ref)
    assert pool.recorded == 0 and pool.stats()["eager_keys"] == {"an output is a tuple": 1}


@torch.no_grad()  # a stretch records nothing while autograd records
def test_a_pinned_input_is_not_kept_alive():
    import gc
    import weakref

    gm, _ = _fused(_big_fn)
    big = torch.randn(COPY_BYTES // 4 + 1)
    for _ in range(3):
        gm(torch.randn(3), big)
    ref = weakref.ref(big)
    del big
    gc.collect()
    assert ref() is None, "a recorded graph keeps the caller's large input alive"


def _host_read_fn(x):
    a = x * 2
    b = a + 1
    s = b.sum().item()
    c = b * s
    d = c + 1
    e = d.relu()
    return e * 3


def test_host_reads_split_stretches():
    gm = fx.symbolic_trace(_host_read_fn)
    runs = find_stretches(gm, min_nodes=2)
    assert [[n.target for n in r] for r in runs] == [
        [operator.mul, operator.add, "sum"],
        [operator.mul, operator.add, "relu", operator.mul],
    ]


def test_grad_mode_runs_eagerly():
    gm, pool = _fused(_counter_fn)
    x = torch.randn(3, 5, requires_grad=True)
    with torch.enable_grad():
        for _ in range(3):
            gm(x, torch.zeros(())).sum().backward()
    assert pool.recorded == 0 and x.grad is not None


def test_options_and_reserve():
    with pytest.raises(ConfigError, match="cuda_graphs"):
        Config(cuda_graphs="yes")
    on = Config(cuda_graphs=True)
    assert reserve(Config(), 6 << 30) == 0  # off by default
    assert reserve(on, 6 << 30) == 128 << 20
    assert reserve(on, None) == 128 << 20
    assert reserve(on, 512 << 20) == 0  # 1/16 is below what a recording stream needs: no graphs
    assert reserve(Config(cuda_graphs=True, graph_memory="8MiB"), 512 << 20) == 8 << 20


@torch.no_grad()  # a stretch records nothing while autograd records
def test_static_cache_decode_replays_match_eager(tiny_hf, monkeypatch):
    """A tiny HF Llama with a static cache, split, its stretches recorded and replayed (emulated): the
    tokens of three generates stay eager's, the decode graph has far fewer calls left on the launching
    thread, and the Plan reserves the pool's memory. Its KV cache (1.6 KiB a layer) is read in place, as a
    real model's is: each generate makes a new one, and the stretches that read it are recorded again."""
    import hetegen_fx.graphs

    monkeypatch.setattr(hetegen_fx.graphs, "COPY_BYTES", 1024)
    model = tiny_hf("llama")
    ids = torch.randint(3, 128, (1, 7))
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    ref = model.generate(ids, **kw)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = hetegen_fx.compile(
        model,
        gpu_memory=int(nbytes * 0.6) + (1 << 20),
        device="cpu",
        max_seq_len=64,
        profile="model",
        cuda_graphs=True,
        graph_memory="1MiB",
    )
    for _ in range(3):
        assert torch.equal(c.generate(ids, **kw), ref)
    stats = hetegen_fx.state(c).cuda_graphs
    assert stats["recorded"] > 0 and stats["replays"] > 2 * stats["recorded"] and stats["failed"] == 0
    assert any("keys" in name for name in stats["pinned_inputs_moved"]), stats
    plans = hetegen_fx.explain(c).plans
    assert all(p.reserved["cuda_graphs"] == 1 << 20 for p in plans)
    assert any(0 < lp.split < lp.out_features for lp in plans[-1].layers)
    from hetegen_fx.launch import direct

    decode = hetegen_fx.state(c).graphs[-1].graph_module
    fused = direct(decode, GraphPool(torch.device("cpu")))
    assert _calls(fused) < _calls(decode) / 2
