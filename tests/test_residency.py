"""Run-time residency: the KV cache reserved by use (size classes), weights demoted to make room as a cache
grows and promoted back when room frees, hetegen_fx.set_gpu_memory, a failed device allocation survived
by demoting, and the ledger's accounting against the Plan (hetegen_fx.ledger, hetegen_fx.residency)."""

from __future__ import annotations

import pytest
import torch

import hetegen_fx
from hetegen_fx import BudgetError, residency
from hetegen_fx.introspect import store_of
from hetegen_fx.ledger import Ledger, LedgerLayer
from hetegen_fx.residency import MIN_KV_CLASS, kv_class


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _long_llama(tiny_hf):
    model = tiny_hf("llama")
    model.config.max_position_embeddings = 4096  # rotary: any length; the model's limit for max_seq_len
    return model


def _per_token(model) -> int:
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4


def test_size_classes():
    assert [kv_class(t) for t in (1, 255, 256, 257, 1000, 1025)] == [256, 256, 256, 512, 1024, 2048]
    assert kv_class(300, limit=400) == 400 and kv_class(500, limit=400) == 512  # the limit holds, or not
    assert kv_class(10, limit=64) == 64 and MIN_KV_CLASS == 256


def test_ledger_chooses_by_priority_and_records_changes():
    layers = [LedgerLayer(f"l{i}", 1000, 512, priority=p) for i, p in enumerate([3.0, 1.0, 2.0, 1.0])]
    ledger = Ledger(budget=4100, reserves={"activations": 200}, kv_cache=300, layers=layers, prefetch=1)
    chosen = ledger.choose()
    assert chosen == {"l0": True, "l1": False, "l2": True, "l3": True}  # among equal g the later one stays
    assert ledger.total(chosen) == 200 + 300 + 3000 + 512 <= 4100  # the arena holds one 512-byte part
    ledger.residency = chosen
    roomier = ledger.choose(kv=2300)  # a larger cache: the least valuable go first
    assert roomier == {"l0": True, "l1": False, "l2": False, "l3": False}
    change = ledger.apply(roomier, "a longer cache", kv=2300)
    assert change.demoted == ("l2", "l3") and change.demoted_bytes == 2000 and not change.promoted
    assert ledger.history == [change] and ledger.total() <= 4100
    assert ledger.apply(roomier, "again") is None  # nothing moved
    with pytest.raises(BudgetError, match="minimum working set"):
        ledger.choose(kv=3700)


def test_the_ledger_accounts_for_what_the_plan_says(tiny_hf):
    model = tiny_hf("llama")
    compiled = hetegen_fx.compile(
        model, gpu_memory=int(_nbytes(model) * 0.6), device="cpu", max_seq_len=64, profile="model"
    )
    with torch.no_grad():
        compiled.generate(torch.tensor([[1, 5, 9, 42]]), max_new_tokens=2, do_sample=False)
    st = hetegen_fx.state(compiled)
    ledger = store_of(compiled).ledger
    plan = st.decode_plan
    assert {lp.name for lp in plan.layers if lp.resident} == {k for k, v in ledger.residency.items() if v}
    assert st.ledger["resident_weights"] == plan.resident_bytes  # no allocator rounding on the cpu device
    for key in ("kv_cache", "activations", "other_params"):
        assert st.ledger[key] == plan.reserved[key], key
    assert st.ledger["kv_cache"] == _per_token(model) * 64  # a static cache of the call's class (limit 64)
    assert sum(st.ledger.values()) == ledger.total() <= ledger.budget


@pytest.fixture
def checked_apply(monkeypatch):
    """Every residency change must leave the ledger within its budget."""
    seen = []
    apply = residency.apply

    def checked(store, *args, **kwargs):
        change = apply(store, *args, **kwargs)
        ledger = store.ledger
        assert ledger.budget is None or ledger.total() <= ledger.budget, (ledger.by_category(), ledger.budget)
        seen.append(change)
        return change

    monkeypatch.setattr(residency, "apply", checked)
    return seen


def test_a_growing_cache_demotes_weights_and_a_short_request_promotes_them_back(tiny_hf, checked_apply):
    model = _long_llama(tiny_hf)
    per_token = _per_token(model)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    kw = {"do_sample": False}
    long, short = {"max_new_tokens": 560, "min_new_tokens": 560}, {"max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        ref_long = model.generate(ids, **long, **kw)
        ref_short = model.generate(ids, **short, **kw)
    # a DynamicCache step holds two copies: 1024 tokens take 2 x 1024 x per_token; the budget holds every
    # weight beside a 256-token class, but about half of them beside the 1024-token one
    budget = _nbytes(model) // 2 + 2 * per_token * 1024
    compiled = hetegen_fx.compile(model, gpu_memory=budget, device="cpu", profile="model", kv_cache="dynamic")
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **long, **kw), ref_long)
    ledger = store_of(compiled).ledger
    demotions = [c for c in ledger.history if c.demoted]
    assert demotions, [str(c) for c in ledger.history]  # once the cache passed 512 tokens
    assert "KV cache of 513 tokens" in demotions[0].reason, demotions[0]
    assert ledger.kv_cache == 2 * per_token * 1024 and not all(ledger.residency.values())
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **short, **kw), ref_short)
    assert ledger.history[-1].promoted and ledger.kv_cache == 2 * per_token * 256
    assert all(c is None or c.reason for c in checked_apply)
    text = str(hetegen_fx.state(compiled))
    assert "residency change(s)" in text and "demoted" in text and "promoted" in text
    ex = hetegen_fx.explain(compiled)
    assert ex.changes == ledger.history and "=== residency changes ===" in str(ex)


def test_set_gpu_memory_promotes_and_demotes_between_calls(tiny_hf, checked_apply):
    model = tiny_hf("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    kw = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    nbytes = _nbytes(model)
    compiled = hetegen_fx.compile(model, gpu_memory=int(nbytes * 0.5), device="cpu", max_seq_len=64)
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **kw), ref)
    ledger = store_of(compiled).ledger
    before = sum(ledger.residency.values())
    up = hetegen_fx.set_gpu_memory(compiled, nbytes * 4)
    assert up.promoted and not up.demoted and all(ledger.residency.values())
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **kw), ref)
    assert all(lp.resident for lp in hetegen_fx.state(compiled).decode_plan.layers)  # compiled again
    down = hetegen_fx.set_gpu_memory(compiled, int(nbytes * 0.5))
    # back to the first budget: as many or fewer resident (the KV room may have grown meanwhile)
    assert down.demoted and sum(ledger.residency.values()) <= before and ledger.total() <= int(nbytes * 0.5)
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **kw), ref)
    after = sum(ledger.residency.values())
    with pytest.raises(BudgetError, match="minimum working set"):
        hetegen_fx.set_gpu_memory(compiled, "1KiB")
    assert sum(ledger.residency.values()) == after and ledger.budget == int(nbytes * 0.5)  # unchanged


def test_set_gpu_memory_on_a_compiled_module(checked_apply):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    compiled = hetegen_fx.compile(model, gpu_memory="40KiB", device="cpu", prefetch=1, profile="model")
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), model(x))
    assert any(not lp.resident for lp in compiled.plan.layers)
    hetegen_fx.set_gpu_memory(compiled, "1MiB")
    assert all(lp.resident for lp in compiled.plan.layers)
    torch.testing.assert_close(compiled(x), model(x))
    assert "copy_h2d" not in compiled.code


def test_a_failed_allocation_mid_generate_is_survived_with_the_same_tokens(tiny_hf, monkeypatch):
    model = tiny_hf("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    compiled = hetegen_fx.compile(model, gpu_memory=_nbytes(model) * 4, device="cpu", max_seq_len=64)
    with torch.no_grad():
        compiled.generate(ids, max_new_tokens=2, do_sample=False)  # compiled, everything resident
    ledger = store_of(compiled).ledger
    assert all(ledger.residency.values())
    calls = {"n": 0}
    run = residency.Runner.__call__

    def failing_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step: another process took the memory
            real = self._call

            def oom(*a):
                self._call = real
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (injected)")

            self._call = oom
        return run(self, *args)

    monkeypatch.setattr(residency.Runner, "__call__", failing_once)
    with pytest.warns(RuntimeWarning, match="a device allocation failed.*demoted"), torch.no_grad():
        out = compiled.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert (
        ledger.history
        and ledger.history[-1].demoted
        and ledger.history[-1].reason == "a device allocation failed"
    )
    # the budget is now what was left: a request for more says why it is low and how to raise it again
    with pytest.raises(
        BudgetError, match=r"lowered to what was left when a device allocation failed.*set_gpu"
    ):
        ledger.choose(kv=ledger.kv_cache + ledger.budget)


@pytest.mark.parametrize(
    ("arch", "share"), [("llama", 0.4), ("qwen2", 0.5), ("gpt2", 0.4), ("opt", 0.6), ("mistral", 0.6)]
)
def test_tiny_decoders_through_the_backend_with_only_a_budget(tiny_hf, arch, share):
    """Refused before unless max_seq_len was given (a 2048-token reserve); now the cache is reserved by use,
    and a small model whose cache is large beside its weights gets smaller size classes."""
    model = tiny_hf(arch)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    model.compile(backend="hetegen", options={"gpu_memory": int(_nbytes(model) * share), "device": "cpu"})
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref)
    st = hetegen_fx.state(model)
    assert any(not lp.resident for lp in st.decode_plan.layers)
    assert sum(st.ledger.values()) <= st.ledger_budget


def test_the_staging_arena_shrinks_when_no_graph_needs_it_so_large():
    """After a promotion a model stages fewer GPU parts: the arena goes down to the largest need that any
    live model's graph still has (a stale graph that needs more grows it again when it runs)."""
    import gc

    from hetegen_fx.runtime import DeviceRuntime

    class Owner:  # stands for a weight store
        pass

    rt = DeviceRuntime(torch.device("cpu"))
    a, b = Owner(), Owner()
    rt.reserve(1000, owner=a, graph="decode")
    rt.reserve(400, owner=b, graph="decode")
    assert rt.staging_bytes() == 1000
    rt.reserve(200, owner=a, graph="decode")  # a's graph was compiled again with fewer GPU parts
    assert rt.staging_bytes() == 400  # b's need
    del b
    gc.collect()
    rt.reserve(200, owner=a, graph="decode")
    assert rt.staging_bytes() == 200
    rt.buffer(900, torch.empty(25, dtype=torch.float32))  # a stale graph's region: grown again, not broken
    assert rt.staging_bytes() >= 1000


def test_a_model_compiled_from_a_saved_plan_has_a_ledger_too(tmp_path, checked_apply):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    first = hetegen_fx.compile(model, gpu_memory="40KiB", device="cpu", prefetch=1, profile="model")
    path = tmp_path / "plan.json"
    first.plan.save(path)
    again = hetegen_fx.compile(model, device="cpu", prefetch=1, plan=str(path))
    x = torch.randn(3, 64)
    torch.testing.assert_close(again(x), model(x))
    assert hetegen_fx.state(again).ledger  # the plan's ledger
    assert hetegen_fx.set_gpu_memory(again, "1MiB").promoted
    assert all(lp.resident for lp in again.plan.layers)
    torch.testing.assert_close(again(x), model(x))


def test_short_calls_after_a_long_one_settle_with_the_default_static_cache(tiny_hf):
    """After a longer call, dynamo compiles the static cache's prefill with a symbolic capacity: the
    capacity is read from that input at each call, so short calls after it promote once and then change
    nothing (they changed residency twice a call when the capacity was taken from the example)."""
    model = _long_llama(tiny_hf)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    compiled = hetegen_fx.compile(model, gpu_memory=_nbytes(model) * 3, device="cpu")
    ledger = None
    for n in (5, 300, 5, 20, 6):
        kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        with torch.no_grad():
            assert torch.equal(compiled.generate(ids, **kw), model.generate(ids, **kw))
        ledger = store_of(compiled).ledger
        if n == 20:
            settled = len(ledger.history)
    assert len(ledger.history) == settled  # the last short call changed nothing
    assert ledger.kv_cache == _per_token(model) * 256 * 2  # the 256-token class, 2 sequences


def test_generate_hands_its_static_cache_to_the_next_call_once_nothing_else_holds_it(tiny_hf):
    """With CUDA graphs, calls that name no cache get the previous call's static cache (reset) where nothing
    else holds it, so its device tensors stay put and the graphs recorded over them replay in every request; a cache the
    caller kept (``past_key_values``, to go on from it) is left alone, and another size class or batch gets
    its own. Every call gives eager's tokens."""
    model = tiny_hf("llama")
    compiled = hetegen_fx.compile(
        model, gpu_memory=_nbytes(model) * 3, device="cpu", max_seq_len=64, cuda_graphs=True
    )
    held = compiled.generate.hetegen_held_cache
    gen = torch.Generator().manual_seed(3)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    caches = []
    with torch.no_grad():
        for _ in range(5):  # new prompts of one shape
            ids = torch.randint(3, 128, (1, 7), generator=gen)
            assert torch.equal(compiled.generate(ids, **kw), model.generate(ids, **kw))
            caches.append(id(held.cache))
        assert held.reused >= 2 and len(set(caches[-2:])) == 1, (held.reused, caches)
        out = compiled.generate(ids, return_dict_in_generate=True, **kw)
        kept = out.past_key_values
        length, keys = int(kept.get_seq_length()), kept.layers[0].keys.clone()
        other = torch.randint(3, 128, (1, 7), generator=gen)
        assert torch.equal(compiled.generate(other, **kw), model.generate(other, **kw))
        assert held.cache is not kept and int(kept.get_seq_length()) == length
        assert torch.equal(kept.layers[0].keys, keys)  # the caller's cache was not reset or written
        pair = torch.randint(3, 128, (2, 7), generator=gen)  # another batch: a cache of its own
        assert torch.equal(compiled.generate(pair, **kw), model.generate(pair, **kw))
        assert held.key[1] == 2


def test_a_handed_on_cache_is_zeroed_on_the_device_not_through_its_host_stand_ins(tiny_hf):
    """A parked layer (its keys and values on the device behind host stand-ins whose memory is never written)
    is reset where its values are; the stand-ins stay untouched and in place, the length counter is zeroed."""
    from transformers import StaticCache

    from hetegen_fx.api import reset_cache
    from hetegen_fx.runtime import stand_in, unpark

    model = tiny_hf("llama")
    cache = StaticCache(config=model.config, max_cache_len=16)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 3, 16)
    layer.lazy_initialization(k, k)
    layer.update(k, k)
    device_keys, device_values = layer.keys, layer.values  # stand for the device's tensors
    layer.keys, layer.values = (
        stand_in(device_keys, device_keys.shape),
        stand_in(device_values, device_values.shape),
    )
    shadows = (layer.keys, layer.values)
    versions = [t._version for t in shadows]
    assert int(cache.get_seq_length()) == 3
    reset_cache(cache)
    assert layer.keys is shadows[0] and layer.values is shadows[1]
    assert [t._version for t in shadows] == versions
    assert unpark(layer.keys) is device_keys and not device_keys.any() and not device_values.any()
    assert int(cache.get_seq_length()) == 0


def test_a_promotion_shows_in_the_timeline_and_the_plan_picture(tiny_hf, tmp_path):
    """set_gpu_memory between two recorded generates: the first recorded call after it carries the change
    and the graph's compile for it (as text, as instant events of its Chrome trace and in its picture), the
    other graph's first call its own compile, later calls nothing; the plan picture marks the Linears it
    promoted."""
    pytest.importorskip("matplotlib")
    import json

    from hetegen_fx import trace

    model = tiny_hf("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    # each call's outputs kept, its cache with them: every call a cache of its own (none handed on), so the
    # same graphs run before and after the change
    kw = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    kept = []
    compiled = hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.5), device="cpu", max_seq_len=64)
    other = hetegen_fx.compile(tiny_hf("llama"), gpu_memory=int(_nbytes(model) * 0.5), device="cpu")
    with torch.no_grad(), trace.record() as timelines:
        kept.append(compiled.generate(ids, **kw))
        kept.append(other.generate(ids, **kw))
        assert timelines and not any(t.changes for t in timelines)
        change = hetegen_fx.set_gpu_memory(compiled, _nbytes(model) * 4)
        first = len(timelines)
        other.generate(ids, **kw)  # another model's calls do not carry this model's change
        assert len(timelines) > first and not any(t.changes for t in timelines[first:])
        first = len(timelines)
        kept.append(compiled.generate(ids, **kw))
    after = timelines[first:]
    assert change.promoted and after[0].changes[0] == str(change)
    assert "compiled again for the new residency" in after[0].changes[1]
    notes = [c for t in after for c in t.changes]
    assert notes.count(str(change)) == 1  # once; each graph's own compile before its first call
    assert all("compiled again" in c for t in after[1:] for c in t.changes) and not after[-1].changes
    chrome = json.loads(after[0].save(tmp_path / "t.json").read_text())
    marks = [e for e in chrome["traceEvents"] if e.get("cat") == "residency"]
    assert [m["name"] for m in marks] == after[0].changes and chrome["otherData"]["changes_before"]
    assert after[0].plot(tmp_path / "t.png").stat().st_size > 0
    ex = hetegen_fx.explain(compiled)
    assert ex.changes[-1] is store_of(compiled).ledger.history[-1]
    assert ex.plot(tmp_path / "plan.png").stat().st_size > 0
    with (
        trace.record() as outside
    ):  # a change with no call recorded after it is not carried to a later record
        hetegen_fx.set_gpu_memory(compiled, int(_nbytes(model) * 0.5))
    with torch.no_grad(), trace.record() as later:
        kept.append(compiled.generate(ids, **kw))
    assert not outside and not any("gpu_memory set" in c for t in later for c in t.changes)


def test_a_build_that_fails_after_the_pipeline_leaves_no_graph_behind(tiny_hf, monkeypatch):
    """The launcher's part of a build (the staging arena) runs out of device memory once: the runner demotes and
    builds again, the tokens are eager's, and the store lists only graphs a runner holds (the failed build's
    graph, with its device copies, is gone)."""
    from hetegen_fx import launch

    model = tiny_hf("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(8))
    kw = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    real, calls = launch.apply, {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 KiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "apply", failing_once)
    compiled = hetegen_fx.compile(model, gpu_memory=_nbytes(model) * 4, device="cpu", max_seq_len=64)
    with torch.no_grad():
        assert torch.equal(compiled.generate(ids, **kw), ref)
    store = store_of(compiled)
    held = {id(r.graph_module) for r in store.runners if r.graph_module is not None}
    assert calls["n"] > 1 and {id(g.graph_module) for g in store.graphs} <= held
    assert store.ledger.history[0].demoted and "allocation failed" in store.ledger.history[0].reason
