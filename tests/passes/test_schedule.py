"""SchedulePass: a topological order that issues copies early, within the staging slots, and overlaps them
with earlier layers' compute and with their own layer's CPU part."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hetegen_fx import meta
from hetegen_fx.capture import capture_fx
from hetegen_fx.config import Config
from hetegen_fx.ops import COPY, CPU_BEGIN, CPU_END, CPU_WAIT, RELEASE, WAIT, is_op
from hetegen_fx.passes import DevicePass, PartitionPass, PlacementPass, ProfilePass, SchedulePass
from hetegen_fx.passes.schedule import build_dag, is_topological
from hetegen_fx.plan import STAGING_ALIGN
from hetegen_fx.store import WeightStore


class Stack(nn.Module):
    """Four Linears in a chain, with non-Linear work between them."""

    def __init__(self, n: int = 4, width: int = 48) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)) * 2
        return x


def _partitioned(model, alpha=0.5, prefetch=2, **kw) -> tuple[fx.GraphModule, Config]:
    gm = capture_fx(model)
    config = Config(device="cpu", profile="model", alpha=alpha, prefetch=prefetch, gpu_memory=1, **kw)
    store = WeightStore(torch.device("cpu"))
    # gpu_memory=1 is below any working set: place everything offloaded by hand instead
    ProfilePass(config, [torch.randn(2, 48)])(gm)
    store.residency = {n.meta[meta.LINEAR].name: False for n in gm.graph.nodes if meta.LINEAR in n.meta}
    store.reserved = {}
    for p in (PlacementPass(config, store), PartitionPass(config, store), DevicePass(config, store)):
        p(gm)
    gm.graph.lint()
    return gm, config


def _layer_nodes(order: list[fx.Node], layer: str) -> dict[str, int]:
    """Positions of one layer's copy / CPU job (queued, collected) / wait / GPU linear / release in ``order``."""
    pos: dict[str, int] = {}
    for i, n in enumerate(order):
        if n.meta.get(meta.LAYER) != layer or n.op != "call_function":
            continue
        if is_op(n.target, COPY):
            pos["copy"] = i
        elif is_op(n.target, WAIT):
            pos["wait"] = i
        elif is_op(n.target, RELEASE):
            pos["release"] = i
        elif is_op(n.target, CPU_BEGIN):
            pos["cpu"] = i
        elif is_op(n.target, CPU_END):
            pos["end"] = i
        elif n.target is F.linear:
            pos[n.meta[meta.SIDE]] = i
    return pos


LAYERS = [f"layers.{i}.weight" for i in range(4)]


def test_order_is_topological_and_numerics_hold():
    model = Stack().eval()
    gm, _ = _partitioned(model)
    before = list(gm.graph.nodes)
    dag = build_dag(gm.graph)  # dependencies of the graph as PartitionPass/DevicePass left it
    res = SchedulePass()(gm)
    after = list(gm.graph.nodes)
    assert res.modified is True and after != before and set(after) == set(before)
    assert is_topological(after, dag)
    assert [n.meta[meta.ORDER] for n in after] == list(range(len(after)))
    gm.recompile()
    x = torch.randn(3, 48)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_is_topological_rejects_a_broken_order():
    gm, _ = _partitioned(Stack())
    dag = build_dag(gm.graph)
    order = list(gm.graph.nodes)
    copy = next(i for i, n in enumerate(order) if n.op == "call_function" and is_op(n.target, COPY))
    wait = next(i for i, n in enumerate(order) if n.op == "call_function" and is_op(n.target, WAIT))
    order[copy], order[wait] = order[wait], order[copy]
    assert not is_topological(order, dag)


def test_copies_before_their_layers_cpu_work():
    gm, _ = _partitioned(Stack(), alpha=0.5)
    SchedulePass()(gm)
    order = list(gm.graph.nodes)
    for layer in LAYERS:
        p = _layer_nodes(order, layer)
        assert set(p) == {"copy", "cpu", "wait", "gpu", "release", "end"}
        # the CPU job is queued before the GPU part, and collected (the stream waits for it) after it
        assert p["copy"] < p["cpu"] < p["wait"] < p["gpu"] < p["release"] < p["end"]


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_copies_wait_for_their_region_and_are_hoisted(prefetch):
    gm, _ = _partitioned(Stack(), alpha=0.5, prefetch=prefetch)
    SchedulePass()(gm)
    order = list(gm.graph.nodes)
    pos = [_layer_nodes(order, layer) for layer in LAYERS]
    copies = [n for n in order if n.op == "call_function" and is_op(n.target, COPY)]
    assert len({n.meta[meta.SLOT_BYTES] for n in copies}) == 1
    part = -(-copies[0].meta[meta.SLOT_BYTES] // STAGING_ALIGN) * STAGING_ALIGN  # regions start aligned
    # equal parts: the arena holds `prefetch` of them (and one more, the slack a wrap may waste, from two on),
    # and the regions rotate like equal buffers
    room = prefetch if prefetch == 1 else prefetch + 1
    assert [n.meta[meta.SLOT] for n in copies] == [(i % room) * part for i in range(4)]
    for i in range(4):
        if i >= room:
            # the region is reused: its previous user (layer i - room) must have released it
            assert pos[i - room]["release"] < pos[i]["copy"]
        for j in range(max(0, i - prefetch + 1), i):
            # within the arena, the copy is issued ahead of earlier layers' compute
            assert pos[i]["copy"] < pos[j]["cpu"], (i, j)
    if prefetch == 1:
        # room for one part: each copy comes right after the previous release, before that layer's next work
        for i in range(1, 4):
            assert pos[i - 1]["release"] < pos[i]["copy"] < pos[i]["cpu"]
    # the first `prefetch` copies are issued before any Linear work at all
    first_work = min(p["cpu"] for p in pos)
    assert all(pos[i]["copy"] < first_work for i in range(min(prefetch, 4)))


def test_stream_only_copies_are_hoisted_too():
    gm, _ = _partitioned(Stack(), alpha=0.0, prefetch=2)  # room for three parts
    SchedulePass()(gm)
    order = list(gm.graph.nodes)
    pos = [_layer_nodes(order, layer) for layer in LAYERS]
    assert all("cpu" not in p for p in pos)
    assert pos[2]["copy"] < pos[0]["gpu"]  # layers 1 and 2's copies overlap layer 0's compute
    assert pos[0]["release"] < pos[3]["copy"] < pos[1]["gpu"]


def test_schedule_is_stable():
    gm, _ = _partitioned(Stack())
    assert SchedulePass()(gm).modified is True
    order = list(gm.graph.nodes)
    assert SchedulePass()(gm).modified is False
    assert list(gm.graph.nodes) == order


def test_nothing_to_move_when_all_resident():
    gm = capture_fx(Stack())
    config = Config(device="cpu", profile="model")  # no budget on cpu: everything resident
    store = WeightStore(torch.device("cpu"))
    for p in (
        ProfilePass(config),
        PlacementPass(config, store),
        PartitionPass(config, store),
        DevicePass(config, store),
    ):
        p(gm)
    assert not any(n.meta.get(meta.SIDE) == "copy" for n in gm.graph.nodes)
    order = list(gm.graph.nodes)
    res = SchedulePass()(gm)
    assert res.modified is False and list(gm.graph.nodes) == order


class Uneven(nn.Module):
    """Linears of different widths: their GPU parts differ in size."""

    def __init__(self) -> None:
        super().__init__()
        widths = [48, 96, 24, 192, 24, 48]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_a_copy_waits_for_every_region_it_overwrites():
    model = Uneven()
    gm, _ = _partitioned(model, alpha=0.5, prefetch=1)
    before = [n for n in gm.graph.nodes if n.op == "call_function" and meta.SLOT in n.meta]
    SchedulePass()(gm)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    overlapped = []
    for k, copy in enumerate(before):
        if not is_op(copy.target, COPY):
            continue
        a, b = copy.meta[meta.SLOT], copy.meta[meta.SLOT] + copy.meta[meta.SLOT_BYTES]
        earlier = [
            r
            for r in before[:k]
            if is_op(r.target, RELEASE)
            and r.meta[meta.SLOT] < b
            and a < r.meta[meta.SLOT] + r.meta[meta.SLOT_BYTES]
        ]
        assert all(pos[r] < pos[copy] for r in earlier), copy
        overlapped.append(len(earlier))
    assert max(overlapped) >= 2  # a large part overwrote two smaller ones: it waited for both
    gm.recompile()
    x = torch.randn(3, 48)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_cpu_only_layers_take_no_slot():
    gm, _ = _partitioned(Stack(), alpha=1.0)
    assert SchedulePass()(gm).graph_module is gm
    assert not any(n.meta.get(meta.SLOT) is not None for n in gm.graph.nodes)


def test_the_wait_for_cpu_jobs_stays_between_the_jobs_and_the_outputs():
    gm, _ = _partitioned(Stack(), alpha=0.5)
    SchedulePass()(gm)
    order = list(gm.graph.nodes)
    (wait,) = [i for i, n in enumerate(order) if n.op == "call_function" and is_op(n.target, CPU_WAIT)]
    ends = [i for i, n in enumerate(order) if n.op == "call_function" and is_op(n.target, CPU_END)]
    assert len(ends) == 4 and max(ends) < wait
    assert wait == len(order) - 2  # right before the output (on "cpu" the outputs need no move back)
