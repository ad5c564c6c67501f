"""ProfilePass: an analysis that writes LINEAR / COST / TOKENS on every Linear and leaves the graph alone."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from hetegen_fx import meta
from hetegen_fx.capture import capture_fx
from hetegen_fx.config import Config
from hetegen_fx.costs import CPU_EMULATION, CUDA_HOST, HardwareModel, LinearCost
from hetegen_fx.errors import UnsupportedModelError
from hetegen_fx.passes import ProfilePass

SHAPES = {"a.weight": (64, 32), "b.weight": (48, 64), "c.weight": (16, 48)}  # (out, in) of the MLP fixture


def _linear_nodes(gm):
    return [n for n in gm.graph.nodes if meta.LINEAR in n.meta]


def test_analysis_only_writes_meta(mlp, count):
    gm = capture_fx(mlp())
    code, n_nodes = gm.code, len(gm.graph.nodes)
    assert count(gm, "linear") == 3 and not _linear_nodes(gm)

    res = ProfilePass(Config(device="cpu", profile="model"))(gm)

    assert res.modified is False
    assert res.graph_module.code == code and len(gm.graph.nodes) == n_nodes
    nodes = _linear_nodes(gm)
    assert [n.meta[meta.LINEAR].name for n in nodes] == list(SHAPES)
    for n in nodes:
        site = n.meta[meta.LINEAR]
        assert (site.out_features, site.in_features) == SHAPES[site.name]
        cost = n.meta[meta.COST]
        assert isinstance(cost, LinearCost) and cost.source == "model"
        assert min(cost.t_cpu, cost.t_copy, cost.t_gpu) > 0
        assert n.meta[meta.TOKENS] == 1  # no shapes and no example inputs: one row


def test_tokens_from_example_inputs_fx(mlp):
    gm = capture_fx(mlp())
    ProfilePass(Config(device="cpu", profile="model"), [torch.randn(3, 5, 32)])(gm)
    assert [n.meta[meta.TOKENS] for n in _linear_nodes(gm)] == [15, 15, 15]


def test_tokens_and_bound_names_from_dynamo_graph(mlp, dynamo_capture, count):
    model = mlp()
    gm, example_inputs = dynamo_capture(model, torch.randn(2, 7, 32))
    assert count(gm, "linear") == 3
    res = ProfilePass(Config(device="cpu", profile="model"), example_inputs)(gm)
    assert res.modified is False
    nodes = _linear_nodes(gm)
    assert [n.meta[meta.LINEAR].name for n in nodes] == list(SHAPES)
    assert all(n.meta[meta.TOKENS] == 14 for n in nodes)
    # the sites hold the model's own parameters (identity), never copies
    assert nodes[0].meta[meta.LINEAR].weight.tensor is model.a.weight
    assert nodes[0].meta[meta.LINEAR].bias.tensor is model.a.bias


def test_hardware_model_is_used(mlp):
    hw = HardwareModel(cpu_bw=1e9, cpu_flops=1e10, h2d_bw=2e9, gpu_bw=5e10, gpu_flops=1e12, cpu_overhead=0)
    gm = capture_fx(mlp())
    ProfilePass(Config(device="cpu", profile="model"), [torch.randn(4, 32)], hardware=hw)(gm)
    for n in _linear_nodes(gm):
        out, inp = SHAPES[n.meta[meta.LINEAR].name]
        assert n.meta[meta.COST] == hw.cost(out, inp, 4, torch.float32)
        assert n.meta[meta.COST] != CPU_EMULATION.cost(out, inp, 4, torch.float32)


def test_alpha_balances_cpu_against_copy_plus_gpu():
    cost = LinearCost(t_cpu=3.0, t_copy=1.0, t_gpu=2.0, source="model")
    a = cost.alpha()
    assert a == pytest.approx(0.5)  # (M + G) / (C + M + G) = 3 / 6
    assert a * cost.t_cpu == pytest.approx((1 - a) * (cost.t_copy + cost.t_gpu))
    assert LinearCost(1.0, 3.0, 0.0, "model").alpha() == pytest.approx(0.75)
    # degenerate inputs are clamped into [0, 1]
    assert LinearCost(0.0, 0.0, 0.0, "model").alpha() == 0.0
    assert LinearCost(-1.0, 1.0, 1.0, "model").alpha() == 1.0
    assert LinearCost(2.0, -1.0, -0.5, "model").alpha() == 0.0


def test_decode_is_split_more_towards_cpu_than_prefill():
    """Bandwidth-bound decode: α ≈ B_cpu / (B_cpu + B_pcie); compute-bound prefill: α small."""
    decode = CUDA_HOST.cost(4096, 4096, 1, torch.float16).alpha()
    prefill = CUDA_HOST.cost(4096, 4096, 512, torch.float16).alpha()
    assert decode == pytest.approx(70 / (70 + 55), abs=0.03)
    assert prefill < 0.1 < decode


def test_integer_weights_are_rejected():
    class IntLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randint(-5, 5, (8, 4), dtype=torch.int32), requires_grad=False)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w)

    gm = capture_fx(IntLinear())
    with pytest.raises(UnsupportedModelError, match="int32"):
        ProfilePass(Config(device="cpu", profile="model"))(gm)


def _count_measurements(monkeypatch) -> list[tuple]:
    """The (out, in, tokens, dtype) of every measure_cost call ProfilePass makes from now on."""
    import hetegen_fx.passes.profile as profile_mod

    calls: list[tuple] = []
    real = profile_mod.measure_cost

    def counting(*args):
        calls.append(args[:4])
        return real(*args)

    monkeypatch.setattr(profile_mod, "measure_cost", counting)
    return calls


def test_measure_writes_cache_and_reuses_it(mlp, tmp_path, monkeypatch):
    import hetegen_fx.passes.profile as profile_mod

    calls = _count_measurements(monkeypatch)
    counting = profile_mod.measure_cost
    cfg = Config(device="cpu", profile="measure", cache_dir=str(tmp_path))
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8)).eval()
    x = [torch.randn(2, 32)]

    gm = capture_fx(model)
    ProfilePass(cfg, x)(gm)
    # two distinct (shape, dtype) keys, at the graph's 2 tokens and at 1 (the decode costs residency uses):
    # the two 32x32 Linears are measured once
    assert sorted(calls) == [(8, 32, t, torch.float32) for t in (1, 2)] + [
        (32, 32, t, torch.float32) for t in (1, 2)
    ]
    costs = [n.meta[meta.COST] for n in _linear_nodes(gm)]
    assert all(c.source == "measured" and c.t_cpu > 0 and c.t_copy > 0 for c in costs)
    assert costs[0] == costs[1]
    cache_file = tmp_path / "profiles.json"
    data = json.loads(cache_file.read_text())
    (entries,) = data.values()  # one machine
    assert set(entries) == {"32x32x2:float32", "8x32x2:float32", "32x32x1:float32", "8x32x1:float32"}
    decode = [n.meta[meta.DECODE_COST] for n in _linear_nodes(gm)]
    assert decode[0] == _cached_cost(data, "32x32x1:float32") and decode[2] == _cached_cost(
        data, "8x32x1:float32"
    )

    # a second compilation finds everything in the cache and measures nothing
    def boom(*args):
        raise AssertionError("measured although the cache holds the cost")

    monkeypatch.setattr(profile_mod, "measure_cost", boom)
    gm2 = capture_fx(model)
    ProfilePass(cfg, x)(gm2)
    assert [n.meta[meta.COST] for n in _linear_nodes(gm2)] == costs

    # a new shape is measured and added to the same file
    monkeypatch.setattr(profile_mod, "measure_cost", counting)
    calls.clear()
    ProfilePass(cfg, [torch.randn(5, 32)])(capture_fx(model))
    assert len(calls) == 2  # the one-token costs are cached already
    assert len(next(iter(json.loads(cache_file.read_text()).values()))) == 6


def _cached_cost(data: dict, key: str) -> LinearCost:
    (entries,) = data.values()
    return LinearCost(**entries[key])


def test_measure_false_uses_the_model_even_when_profile_is_measure(mlp, tmp_path, monkeypatch):
    import hetegen_fx.passes.profile as profile_mod

    monkeypatch.setattr(profile_mod, "measure_cost", lambda *a: pytest.fail("measured"))
    gm = capture_fx(mlp())
    cfg = Config(device="cpu", profile="measure", cache_dir=str(tmp_path))
    ProfilePass(cfg, measure=False)(gm)
    assert all(n.meta[meta.COST].source == "model" for n in _linear_nodes(gm))
    assert not (tmp_path / "profiles.json").exists()


def test_alpha_balances_the_cpu_fixed_part():
    """With a fixed CPU cost F: F + α(C − F) = (1 − α)(M + G)."""
    from hetegen_fx.costs import LinearCost

    plain = LinearCost(t_cpu=1.0, t_copy=0.8, t_gpu=0.2, source="measured")
    assert plain.alpha() == pytest.approx(0.5)
    fixed = LinearCost(t_cpu=1.0, t_copy=0.8, t_gpu=0.2, source="measured", t_cpu_fixed=0.1)
    a = fixed.alpha()
    assert a < 0.5
    assert 0.1 + a * (1.0 - 0.1) == pytest.approx((1 - a) * (0.8 + 0.2))
    # a CPU part that costs more than the whole GPU path, however small: no CPU share
    assert LinearCost(1.0, 0.01, 0.01, "measured", t_cpu_fixed=0.05).alpha() == 0.0


def test_job_alpha_balances_the_job_with_its_overhead():
    """Linears of one job: H + ΣF + α·Σ(C − F) = (1 − α)·Σ(M + G); without H and alone, LinearCost.alpha()."""
    from hetegen_fx.costs import LinearCost, job_alpha

    q = LinearCost(t_cpu=1.0, t_copy=0.8, t_gpu=0.2, source="measured", t_cpu_fixed=0.1)
    gate = LinearCost(t_cpu=3.0, t_copy=2.0, t_gpu=0.1, source="measured", t_cpu_fixed=0.2)
    assert job_alpha([q]) == pytest.approx(q.alpha())
    for h in (0.0, 0.3):
        a = job_alpha([q, gate], h)
        assert h + 0.3 + a * (0.9 + 2.8) == pytest.approx((1 - a) * (1.0 + 2.1))
    assert job_alpha([q, gate], 0.3) < job_alpha([q, gate], 0.0) < 1
    # an overhead larger than the whole device lane: no CPU part is worth a job
    assert job_alpha([q, gate], 5.0) == 0.0
    assert job_alpha([]) == 0.0


def test_segment_alpha_covers_the_copies_streamed_after_the_job():
    """A job whose CPU part must also cover ``streamed`` seconds of later copies: α balances
    H + ΣF + α·Σ(C − F) against (1 − α)·Σ(M + G) + streamed, the time is the longer lane, and at
    ``streamed = 0`` it is job_alpha. Past α = 1 the copies set the time."""
    from hetegen_fx.costs import LinearCost, job_alpha, segment_alpha

    gate = LinearCost(t_cpu=1.4, t_copy=3.0, t_gpu=0.1, source="measured", t_cpu_fixed=0.1)
    a0, t0 = segment_alpha([gate], 0.2)
    assert a0 == pytest.approx(job_alpha([gate], 0.2))
    assert t0 == pytest.approx(0.2 + 0.1 + a0 * 1.3) == pytest.approx((1 - a0) * 3.1)
    a1, t1 = segment_alpha([gate], 0.2, streamed=1.0)
    assert a0 < a1 < 1 and t0 < t1
    assert 0.2 + 0.1 + a1 * 1.3 == pytest.approx((1 - a1) * 3.1 + 1.0) == pytest.approx(t1)
    assert segment_alpha([gate], 0.2, streamed=5.0) == (1.0, 5.0)
    # no CPU part at all: the device lane alone, without the job's overhead
    assert segment_alpha([gate], 10.0, streamed=1.0) == (0.0, pytest.approx(4.1))


def test_measured_cpu_fixed_part_is_within_the_cpu_time():
    from hetegen_fx.costs import measure_cost

    cost = measure_cost(256, 128, 1, torch.float32, torch.device("cpu"))
    assert cost.source == "measured" and cost.t_cpu > 0
    assert 0 <= cost.t_cpu_fixed <= cost.t_cpu


def test_cpu_time_is_measured_on_the_given_worker_thread():
    """On CUDA the profiler times the CPU on the worker that runs the CPU parts (its threads)."""
    from hetegen_fx.costs import measure_cost
    from hetegen_fx.host import HostWorker

    worker = HostWorker(torch.device("cpu"))
    threads = []
    real = worker.call
    worker.call = lambda fn: real(lambda: (threads.append(threading.current_thread()), fn())[1])
    cost = measure_cost(256, 128, 1, torch.float32, torch.device("cpu"), worker=worker)
    assert threads == [worker._thread] and cost.t_cpu > 0


def _gemv(out_features: int, in_features: int, seconds: float, source: str = "measured") -> LinearCost:
    return LinearCost(t_cpu=seconds, t_copy=seconds, t_gpu=seconds / 20, source=source)


def test_slow_gemvs_are_the_large_shapes_far_below_their_dtypes_median_rate():
    from hetegen_fx.passes.profile import slow_gemvs

    # rates: 32 MiB / 0.4 ms, 86 MiB / 1.0 ms, 86 MiB / 3.0 ms (a third of the others), 86 MiB / 1.2 ms
    costs = {
        "4096x4096x1:float16": _gemv(4096, 4096, 0.4e-3),
        "11008x4096x1:float16": _gemv(11008, 4096, 1.0e-3),
        "4096x11008x1:float16": _gemv(4096, 11008, 3.0e-3),
        "4096x11008x2:float16": _gemv(4096, 11008, 1.2e-3),
        "4096x4096x512:float16": _gemv(4096, 4096, 20e-3),  # a prefill: compute-bound, not compared
        "64x64x1:float16": _gemv(64, 64, 1e-3),  # small: fixed costs, not compared
        "4096x4096x1:float32": _gemv(4096, 4096, 5e-3),  # its dtype has one shape: nothing to compare with
    }
    assert slow_gemvs(costs) == ["4096x11008x1:float16"]
    # predicted costs are never measured again, and two shapes give no median to trust
    assert slow_gemvs({k: _gemv(0, 0, v.t_cpu, "model") for k, v in costs.items()}) == []
    assert slow_gemvs({k: costs[k] for k in ("4096x4096x1:float16", "4096x11008x1:float16")}) == []


def test_a_cost_measured_in_a_slow_spell_is_measured_again(tmp_path, monkeypatch):
    """A GEMV cost just measured far slower than the other shapes' is measured again, once, and the faster
    reading is kept, in the graph and in the cache; a cached one is left alone (it was checked when it was
    measured, and a shape that is really slower must not be measured at every compile)."""
    import hetegen_fx.passes.profile as profile_mod
    from hetegen_fx.costs import CostCache

    calls: list[tuple] = []
    real = profile_mod.measure_cost

    def first_in_a_slow_spell(*args):
        calls.append(args[:4])
        return _gemv(0, 0, 60.0) if len(calls) == 1 else real(*args)

    monkeypatch.setattr(profile_mod, "measure_cost", first_in_a_slow_spell)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 4096), nn.Linear(4096, 2048)).half().eval()
    cfg = Config(device="cpu", profile="measure", cache_dir=str(tmp_path))
    x = [torch.randn(1, 2048).half()]
    cache = CostCache(str(tmp_path), torch.device("cpu"))
    for key, t in {"2048x2048x1:float16": 1e-3, "4096x2048x1:float16": 2e-3}.items():
        cache.put(key, _gemv(0, 0, t))
    cache.save()
    gm = capture_fx(model)
    ProfilePass(cfg, x)(gm)
    assert calls == [(2048, 4096, 1, torch.float16)] * 2
    cost = [n.meta[meta.COST] for n in _linear_nodes(gm)][2]
    assert cost.t_cpu < 60.0 and cost.source == "measured"
    assert CostCache(str(tmp_path), torch.device("cpu")).get("2048x4096x1:float16") == cost

    cache = CostCache(str(tmp_path), torch.device("cpu"))
    cache.put("2048x4096x1:float16", _gemv(0, 0, 60.0))  # slow, but cached
    cache.save()
    calls.clear()
    gm = capture_fx(model)
    ProfilePass(cfg, x)(gm)
    assert calls == []
    assert [n.meta[meta.COST] for n in _linear_nodes(gm)][2].t_cpu == 60.0
