"""The HexGen scheduler (``hetegen_fx.cluster``): on small clusters it finds the optimum of its own cost model
(checked against every layout by brute force), for latency and for throughput; asymmetric layouts come out
where devices differ; a layout round-trips through JSON, prints and draws; bad input is a clear error."""

from __future__ import annotations

import itertools
import math

import pytest

from hetegen_fx.cluster import (
    Cluster,
    ClusterPlan,
    DeviceSpec,
    ModelShape,
    _partitions,
    _plan,
    homogeneous,
    schedule,
)
from hetegen_fx.errors import ConfigError

GiB = 1 << 30
SHAPE = ModelShape("toy", layers=6, hidden=1024, intermediate=2816, heads=8, kv_heads=4, vocab=32000)


def _cluster(specs, **kw) -> Cluster:
    kw.setdefault("reserve", 16 << 20)
    return Cluster(
        [
            DeviceSpec(n, int(m * GiB), bw, fl, host, off, int(hm * GiB))
            for n, m, bw, fl, host, off, hm in specs
        ],
        **kw,
    )


CLUSTERS = {
    "two kinds": [
        ("big", 0.2, 2e12, 300e12, "h0", 0, 0),
        ("mid", 0.12, 1e12, 150e12, "h0", 0, 0),
        ("small", 0.06, 0.9e12, 70e12, "h1", 0, 0),
    ],
    "offload": [
        ("gpu", 1.06, 2e12, 300e12, "h0", 20e9, 4),
        ("old", 1.03, 0.5e12, 30e12, "h0", 10e9, 4),
        ("tiny", 1.02, 0.3e12, 20e12, "h1", 5e9, 1),
        ("fast", 1.1, 3e12, 500e12, "h1", 0, 0),
    ],
}


def _brute_force(cluster: Cluster, shape: ModelShape, objective: str, context: int) -> float:
    names = [d.name for d in cluster.devices]
    best = math.inf
    for r in range(1, len(names) + 1):
        for used in itertools.combinations(names, r):
            for part in _partitions(list(used)):
                if any(shape.heads % len(g) or shape.kv_heads % len(g) for g in part):
                    continue
                for order in itertools.permutations(part):
                    k = len(order)
                    for cuts in itertools.combinations(range(1, shape.layers), k - 1):
                        counts = [b - a for a, b in zip((0, *cuts), (*cuts, shape.layers), strict=True)]
                        p = _plan(cluster, shape, [tuple(g) for g in order], counts, objective, context, [])
                        if any(s.seconds == math.inf for s in p.stages):
                            continue
                        best = min(best, p.latency_s if objective == "latency" else -p.throughput)
    return best


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("which", list(CLUSTERS))
def test_the_scheduler_finds_the_optimum_of_its_cost_model(which, objective):
    cluster = _cluster(CLUSTERS[which])
    plan = schedule(cluster, SHAPE, objective, context=256)
    got = plan.latency_s if objective == "latency" else -plan.throughput
    assert got == pytest.approx(_brute_force(cluster, SHAPE, objective, 256), rel=1e-9)
    assert sum(s.layers for s in plan.stages) == SHAPE.layers
    assert all(SHAPE.heads % s.tp == 0 for s in plan.stages)


def test_mismatched_devices_get_an_asymmetric_layout_faster_than_the_homogeneous_one():
    c = _cluster(
        [
            ("a100-0", 0.3, 2e12, 300e12, "h0", 0, 0),
            ("a100-1", 0.3, 2e12, 300e12, "h0", 0, 0),
            ("t4-0", 0.15, 0.3e12, 60e12, "h0", 0, 0),
            ("t4-1", 0.15, 0.3e12, 60e12, "h0", 0, 0),
        ]
    )
    plan = schedule(c, SHAPE, "latency", context=256)
    even = homogeneous(c, SHAPE, tp=2, context=256)
    assert plan.latency_s < even.latency_s
    layers = {tuple(s.devices): s.layers for s in plan.stages}
    assert len({s.layers for s in plan.stages}) > 1 or len(plan.stages) == 1, plan.table()
    if ("a100-0", "a100-1") in layers and len(plan.stages) > 1:
        assert layers[("a100-0", "a100-1")] > SHAPE.layers // 2  # the faster pair takes more layers


def test_offload_holds_what_memory_alone_cannot():
    c = _cluster([("g", 0.5, 1e12, 100e12, "h0", 20e9, 8)])
    shape = ModelShape("m", layers=4, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
    plan = schedule(c, shape, context=128)
    assert plan.stages[0].offloaded > 0 and "offloaded" in plan.table()
    no_room = _cluster([("g", 0.5, 1e12, 100e12, "h0", 0, 0)])
    with pytest.raises(ConfigError, match="no layout of m .* add devices or host memory"):
        schedule(no_room, shape, context=128)


def test_a_plan_round_trips_through_json_prints_and_draws(tmp_path):
    pytest.importorskip("matplotlib")
    plan = schedule(_cluster(CLUSTERS["two kinds"]), SHAPE, context=256)
    again = ClusterPlan.from_json(plan.to_json())
    assert again == plan and again.table() == plan.table()
    assert "ms/token at batch 1" in plan.table()
    plan.plot(tmp_path / "layout.png")
    assert (tmp_path / "layout.png").stat().st_size > 1000
    plan.save(tmp_path / "layout.json")
    assert ClusterPlan.from_json((tmp_path / "layout.json").read_text()) == plan
    # what a run of it takes: stages as compile_stage reads them, one process per device in rank order
    from hetegen_fx.distributed import check_layout, roles

    layout = plan.layout()
    assert check_layout(layout, SHAPE.layers) == layout
    procs = plan.processes()
    assert len(procs) == sum(tp for _, _, tp in layout)
    for rank, device in enumerate(procs):
        r = roles(layout, rank)
        assert device in plan.stages[r.stage].devices and (r.layers, r.tp) == (
            (plan.stages[r.stage].start, plan.stages[r.stage].stop),
            plan.stages[r.stage].tp,
        )


def test_bad_input_is_a_clear_error():
    c = _cluster(CLUSTERS["two kinds"])
    with pytest.raises(ConfigError, match="objective must be"):
        schedule(c, SHAPE, "speed")
    with pytest.raises(ConfigError, match="TP 3 must divide"):
        homogeneous(c, SHAPE, tp=3)
    with pytest.raises(ConfigError, match="unique"):
        _cluster([CLUSTERS["two kinds"][0]] * 2)
    with pytest.raises(ConfigError, match="not a cluster description"):
        Cluster.from_dict({"devices": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="not a hetegen_fx cluster plan"):
        ClusterPlan.from_json("{}")


def test_the_cluster_command_prints_the_layout_beside_the_homogeneous_one(tmp_path, capsys):
    import json

    from hetegen_fx.cli import main

    spec = _cluster(CLUSTERS["two kinds"]).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(spec))
    args = ["cluster", "--model", "llama-2-7b", "--devices", str(tmp_path / "c.json"), "--compare-tp", "1"]
    args += ["--context", "64", "--json", str(tmp_path / "plan.json")]
    assert main(args) != 0  # 13 GB of a 7B on 0.4 GiB of devices: no layout
    assert "no layout of llama-2-7b" in capsys.readouterr().err
    big = {**spec, "devices": [{**d, "memory": 40 << 30} for d in spec["devices"]]}
    (tmp_path / "c.json").write_text(json.dumps(big))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "homogeneous (TP 1" in out and "chosen:" in out
    assert ClusterPlan.from_json((tmp_path / "plan.json").read_text()).model == "llama-2-7b"
