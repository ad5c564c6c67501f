"""The pass pipeline as a whole: its order, the debug hook, and that it never touches the caller's graph."""

from __future__ import annotations

import pytest
import torch

from hetegen_fx import meta
from hetegen_fx.capture import capture_fx
from hetegen_fx.config import Config
from hetegen_fx.errors import BudgetError
from hetegen_fx.passes import DevicePass, PartitionPass, PlacementPass, ProfilePass, SchedulePass
from hetegen_fx.pipeline import build_passes, transform
from hetegen_fx.store import WeightStore

ORDER = [ProfilePass, PlacementPass, PartitionPass, DevicePass, SchedulePass]


def test_pass_order(mlp, tmp_path):
    config = Config(device="cpu", profile="model")
    passes = build_passes(config, WeightStore(torch.device("cpu")))
    assert [type(p) for p in passes] == ORDER
    assert passes[0].measure is True
    plan = transform(capture_fx(mlp()), config, WeightStore(torch.device("cpu")))[1]
    path = plan.save(tmp_path / "p.json")
    given = build_passes(Config(device="cpu", plan=str(path)), WeightStore(torch.device("cpu")))
    assert given[0].measure is False and given[1].given == plan


def test_debug_hook_sees_every_pass(mlp, count):
    seen = []

    def hook(name, gm):
        seen.append((name, count(gm, "copy"), meta.PLAN in gm.meta))

    store = WeightStore(torch.device("cpu"))
    config = Config(
        device="cpu", profile="model", gpu_memory=13000, alpha=0.5, activation_reserve=0, prefetch=1
    )
    out, plan = transform(capture_fx(mlp()), config, store, debug_hook=hook, label="mlp")
    n_off = sum(not lp.resident for lp in plan.layers)
    assert n_off >= 1
    assert seen == [
        ("ProfilePass", 0, False),
        ("PlacementPass", 0, True),
        ("PartitionPass", n_off, True),
        ("DevicePass", n_off, True),
        ("SchedulePass", n_off, True),
    ]
    assert [(g.graph_module, g.plan, g.label) for g in store.graphs] == [(out, plan, "mlp")]


def test_a_failed_transform_leaves_graph_and_store_untouched(mlp):
    gm = capture_fx(mlp())
    code, nodes = gm.code, list(gm.graph.nodes)
    store = WeightStore(torch.device("cpu"))
    with pytest.raises(BudgetError):
        transform(gm, Config(device="cpu", profile="model", gpu_memory=10), store)
    assert gm.code == code and list(gm.graph.nodes) == nodes
    assert not any(meta.COST in n.meta for n in gm.graph.nodes)
    assert store.residency is None and store.graphs == []
