"""PartitionPass: each Linear rewritten by its LayerPlan (resident / CPU part ∥ copy + GPU part), and the
Linear forms of hetegen_fx.linear that it rewrites (nn.Linear, F.linear, aten.linear, addmm, matmul + add)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hetegen_fx import meta
from hetegen_fx.capture import capture_export, capture_fx
from hetegen_fx.config import Config
from hetegen_fx.linear import find_linears
from hetegen_fx.ops import CPU_BEGIN, CPU_END, CPU_WAIT
from hetegen_fx.passes import PartitionPass, PlacementPass, ProfilePass
from hetegen_fx.passes.placement import split_row
from hetegen_fx.pipeline import transform
from hetegen_fx.plan import LayerPlan, Plan, staging_offsets, staging_size
from hetegen_fx.store import WeightStore

CPU = torch.device("cpu")


def _plan(gm: fx.GraphModule, choice: dict[str, float | None]) -> Plan:
    """A Plan for the Linears of ``gm``: ``None`` = resident, else offloaded with CPU share α."""
    layers = []
    for site in find_linears(gm):
        alpha = choice[site.name] if site.name in choice else choice["*"]
        resident = alpha is None
        layers.append(
            LayerPlan(
                name=site.name,
                out_features=site.out_features,
                in_features=site.in_features,
                tokens=1,
                dtype="float32",
                bytes=site.weight_bytes,
                resident=resident,
                alpha=0.0 if resident else alpha,
                split=0 if resident else split_row(alpha, site.out_features),
            )
        )
    return Plan(device="cpu", gpu_memory=None, tokens=1, layers=layers)


def _partition(gm: fx.GraphModule, plan: Plan, prefetch: int = 2):
    config = Config(device="cpu", profile="model", prefetch=prefetch)
    store = WeightStore(CPU)
    ProfilePass(config, measure=False)(gm)
    PlacementPass(config, store, plan=plan)(gm)
    res = PartitionPass(config, store)(gm)
    gm.graph.lint()
    gm.recompile()
    return res, gm.meta[meta.PLAN]


def _sides(gm: fx.GraphModule, side: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get(meta.SIDE) == side]


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        # α: (GPU linear calls, copies, waits, releases, cats, CPU jobs)
        (0.0, (3, 3, 3, 3, 0, 0)),
        (0.5, (3, 3, 3, 3, 3, 3)),
        (1.0, (0, 0, 0, 0, 0, 3)),
    ],
)
def test_op_counts_follow_the_plan(mlp, count, alpha, expected):
    model = mlp()
    gm = capture_fx(model)
    kinds = ("linear", "copy", "wait", "release", "cat", "cpu_begin")
    before = [count(gm, k) for k in kinds]
    assert before == [3, 0, 0, 0, 0, 0]
    res, plan = _partition(gm, _plan(gm, {"*": alpha}))
    assert res.modified is True
    assert tuple(count(gm, k) for k in kinds) == expected
    assert count(gm, "cpu_end") == count(gm, "cpu_begin")  # every CPU job queued is collected ...
    waits = [n for n in gm.graph.nodes if n.target is CPU_WAIT]  # ... and waited for before the output
    assert len(waits) == (1 if alpha > 0 else 0)
    assert all(n.next.op == "output" for n in waits)
    for job in [n for n in gm.graph.nodes if n.target is CPU_BEGIN]:  # one Linear each: a, b, c read
        assert job.meta[meta.SIDE] == "cpu" and len(job.args[1]) == 1  # different inputs
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # the nn.Linear calls are gone
    x = torch.randn(5, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_mixed_plan(mlp, count):
    model = mlp()
    gm = capture_fx(model)
    res, plan = _partition(gm, _plan(gm, {"a.weight": None, "b.weight": 0.25, "c.weight": 1.0}))
    assert res.modified
    assert (count(gm, "copy"), count(gm, "wait"), count(gm, "release"), count(gm, "cat")) == (1, 1, 1, 1)
    assert count(gm, "linear") == 1 + 1  # a on the device, b's GPU part
    assert count(gm, "cpu_begin") == 2  # b's CPU part and c (all on the CPU): different inputs
    assert [lp.slot for lp in plan.layers] == [-1, 0, -1]  # only a Linear with a GPU part takes a slot
    b = plan.layer("b.weight")
    assert b.split == 12
    # the CPU part of b reads rows [0, 12) from host memory; the copy carries rows [12, 48)
    (copy,) = [n for n in gm.graph.nodes if n.meta.get(meta.SIDE) == "copy" and n.op == "call_function"]
    src = getattr(gm, copy.args[0].target)
    assert torch.equal(src, model.b.weight.detach()[12:])
    assert src.data_ptr() == model.b.weight.data_ptr() + 12 * 64 * 4  # a view, not a copy
    # the resident Linear reads the device copy of its weight
    resident = [n for n in _sides(gm, "gpu") if n.op == "get_attr" and n.meta.get(meta.LAYER) == "a.weight"]
    assert {n.target for n in resident} == {"a_weight__dev", "a_bias__dev"}
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefetch", [1, 2, 3, None])
def test_staging_regions_are_laid_out_first_in_first_out(mlp, prefetch):
    gm = capture_fx(mlp())
    _, plan = _partition(
        gm, _plan(gm, {"a.weight": 0.5, "b.weight": 0.25, "c.weight": 0.5}), prefetch=prefetch
    )
    parts = [lp.gpu_part_bytes for lp in plan.layers]
    assert len(set(parts)) > 1  # parts of different sizes: the arena packs them, it holds no equal buffers
    size = staging_size(parts, prefetch)
    assert plan.reserved["staging"] == size  # the launcher grows the arena to it (launch.apply)
    assert [lp.slot for lp in plan.layers] == staging_offsets(parts, prefetch)
    regions = [(lp.slot, lp.slot + lp.gpu_part_bytes) for lp in plan.layers]
    assert all(b <= size for _, b in regions)
    depth = 2 if prefetch is None else prefetch  # None: twice the largest part, so at least two
    for i in range(len(regions)):  # the regions of `depth` consecutive parts never overlap
        for j in range(i + 1, min(i + depth, len(regions))):
            (a0, b0), (a1, b1) = regions[i], regions[j]
            assert b0 <= a1 or b1 <= a0, (i, j, regions)
    for op in ("copy", "sync"):
        for n in _sides(gm, op):
            if n.op == "call_function" and n.target is not CPU_WAIT:  # the graph's final wait has no region
                lp = plan.layer(n.meta[meta.LAYER])
                assert (n.meta[meta.SLOT], n.meta[meta.SLOT_BYTES]) == (lp.slot, lp.gpu_part_bytes)


def test_staging_layouts():
    # prefetch=2: the largest two consecutive parts (the window wraps: last, then first) + the largest part
    assert staging_size([1000, 300, 300, 1000], 2) == 2048 + 1024
    assert staging_offsets([256, 512, 256, 256], 2) == [0, 256, 768, 1024]
    # None: two halves of the largest part, taking turns; a part of 0 bytes is an empty region
    assert staging_size([256, 512], None) == 1024
    assert staging_offsets([256, 0, 512, 256, 256], None) == [0, 256, 512, 0, 256]
    assert staging_size([], 3) == 0 and staging_size([0, 0], None) == 0


@pytest.mark.parametrize("prefetch", [1, 2, 3, 5, None])
def test_consecutive_parts_never_share_bytes(prefetch):
    rng = random.Random(prefetch or 0)
    for _ in range(200):
        parts = [rng.choice([0, 1, 255, 256, 300, 512, 768, 1000, 4096]) for _ in range(rng.randint(1, 12))]
        size = staging_size(parts, prefetch)
        offsets = staging_offsets(parts, prefetch)
        regions = [(o, o + n) for o, n in zip(offsets, parts, strict=True) if n > 0]
        assert all(0 <= a and b <= size for a, b in regions), (parts, offsets, size)
        depth = 2 if prefetch is None else prefetch
        for i in range(len(regions)):
            for j in range(i + 1, min(i + depth, len(regions))):
                (a0, b0), (a1, b1) = regions[i], regions[j]
                assert b0 <= a1 or b1 <= a0, (parts, prefetch, offsets)


def test_no_linear_no_change(count):
    gm = capture_fx(nn.Sequential(nn.ReLU(), nn.Tanh()))
    code = gm.code
    res, plan = _partition(gm, Plan("cpu", None, 1, []))
    assert res.modified is False and gm.code == code and plan.layers == []


# ---------------------------------------------------------------------------------------------------------------
# Linear forms


class FLinear(nn.Module):
    """F.linear on parameters ([out, in] weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(40, 32) / 6)
        self.b1 = nn.Parameter(torch.randn(40))
        self.w2 = nn.Parameter(torch.randn(16, 40) / 6)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


class GPT2MLP(nn.Module):
    """GPT-2's Conv1D: addmm(bias, x.view(-1, in), W[in, out])."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = Conv1D(48, 32), Conv1D(16, 48)
        for m in (self.fc, self.proj):
            nn.init.normal_(m.weight, std=0.2)
            nn.init.normal_(m.bias)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


class MatmulAdd(nn.Module):
    """``x @ W[in, out] + b`` (matmul + add, absorbed into one Linear) and a bias-free ``x @ W``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 40) / 6)
        self.b1 = nn.Parameter(torch.randn(40))
        self.w2 = nn.Parameter(torch.randn(40, 16) / 6)

    def forward(self, x):
        return torch.relu(x @ self.w1 + self.b1) @ self.w2


def _capture(kind: str, model: nn.Module, x: torch.Tensor, dynamo_capture) -> tuple[fx.GraphModule, list]:
    if kind == "fx":
        return capture_fx(model), [x]
    if kind == "export":
        return capture_export(model, (x,)), [x]
    return dynamo_capture(model, x)


FORMS = [
    # (module, frontend, forms found, (out features) of the Linears)
    ("mlp", "fx", ["module", "module", "module"], [64, 48, 16]),
    ("mlp", "export", ["linear", "linear", "linear"], [64, 48, 16]),
    ("mlp", "dynamo", ["linear", "linear", "linear"], [64, 48, 16]),
    ("flinear", "fx", ["linear", "linear"], [40, 16]),
    ("flinear", "export", ["linear", "linear"], [40, 16]),
    ("gpt2", "fx", ["addmm", "addmm"], [48, 16]),
    ("gpt2", "dynamo", ["addmm", "addmm"], [48, 16]),
    ("matmul", "fx", ["matmul", "matmul"], [40, 16]),
    ("matmul", "dynamo", ["matmul", "matmul"], [40, 16]),
]


def _model(name: str, mlp) -> nn.Module:
    return {"mlp": mlp, "flinear": FLinear, "gpt2": GPT2MLP, "matmul": MatmulAdd}[name]().eval()


@pytest.mark.parametrize(("name", "frontend", "forms", "outs"), FORMS)
def test_linear_forms_are_found(name, frontend, forms, outs, mlp, dynamo_capture):
    model = _model(name, mlp)
    x = torch.randn(2, 3, 32)
    gm, _ = _capture(frontend, model, x, dynamo_capture)
    sites = find_linears(gm)
    assert [s.form for s in sites] == forms
    assert [s.out_features for s in sites] == outs
    params = dict(model.named_parameters())
    for s in sites:
        assert s.weight.tensor is params[s.name]  # bound to the model's own parameter
        assert s.layout == ("in_out" if name in ("gpt2", "matmul") else "out_in")
    # the fused add carries the first matmul's bias, the second has none
    if name == "matmul":
        assert sites[0].bias.tensor is model.b1 and len(sites[0].absorbed) == 1 and sites[1].bias is None


@pytest.mark.parametrize(("name", "frontend", "forms", "outs"), FORMS)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_linear_forms_split_like_eager(name, frontend, forms, outs, alpha, mlp, dynamo_capture, count):
    model = _model(name, mlp)
    gm, example_inputs = _capture(frontend, model, torch.randn(2, 3, 32), dynamo_capture)
    n = len(forms)
    plan = _plan(gm, {"*": alpha})
    config = Config(device="cpu", profile="model", plan=plan)
    code = gm.code
    out, _ = transform(gm, config, WeightStore(CPU), example_inputs)
    assert gm.code == code and out is not gm  # the pipeline rewrites a copy
    split = 0 < alpha < 1
    assert count(out, "cat") == (n if split else 0)
    assert count(out, "copy") == count(out, "wait") == count(out, "release") == (0 if alpha == 1 else n)
    # the original Linear computations are gone: only the CPU and GPU parts remain
    parts = [
        x for x in out.graph.nodes if x.meta.get(meta.SIDE) in ("cpu", "gpu") and x.op == "call_function"
    ]
    assert {x.meta[meta.LAYER] for x in parts} == {s.name for s in find_linears(gm)}
    remaining = [s for s in find_linears(out) if meta.LAYER not in s.node.meta]
    assert remaining == []
    # fresh inputs; export graphs have a dynamic sequence length, dynamo graphs take the parameters as inputs
    with torch.no_grad():
        for shape in ((2, 3, 32), (2, 7, 32)) if frontend != "dynamo" else ((2, 3, 32),):
            x = torch.randn(shape)
            args = [x if not isinstance(a, nn.Parameter) else a for a in example_inputs]
            got = out(*args)
            got = got[0] if isinstance(got, (tuple, list)) else got
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


class NotLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16))
        self.scale = nn.Parameter(torch.randn(1))  # broadcast, not a bias of 16 outputs
        self.v = nn.Parameter(torch.randn(32))  # 1-D: not a weight
        self.left = nn.Parameter(torch.randn(8, 32))
        self.w2 = nn.Parameter(torch.randn(32, 16))
        self.b2 = nn.Parameter(torch.randn(16))

    def forward(self, x, y):
        a = x @ x.transpose(-1, -2)  # two activations
        b = F.linear(x, y)  # weight is an activation
        c = x @ self.v  # 1-D parameter
        d = self.left @ x[0]  # parameter on the left
        e = x @ self.w + self.scale  # a Linear (the matmul) followed by a broadcast add
        m = x @ self.w2
        f = (m + self.b2) * m  # the matmul is read twice: a Linear, but the add cannot absorb it
        return a.sum() + b.sum() + c.sum() + d.sum() + e + f


def test_non_linears_are_not_matched(count):
    model = NotLinears()
    gm = capture_fx(model)
    sites = find_linears(gm)
    assert [(s.name, s.form, s.bias) for s in sites] == [("w", "matmul", None), ("w2", "matmul", None)]
    plan = _plan(gm, {"*": 0.5})
    out, _ = transform(gm, Config(device="cpu", profile="model", plan=plan), WeightStore(CPU))
    assert count(out, "cat") == 2 and count(out, "copy") == 2
    x, y = torch.randn(5, 32), torch.randn(7, 32)
    torch.testing.assert_close(out(x, y), model(x, y), rtol=1e-5, atol=1e-4)


def test_conv1d_parts_are_contiguous_and_cached(mlp):
    model = GPT2MLP()
    gm = capture_fx(model)
    store = WeightStore(CPU)
    config = Config(device="cpu", profile="model", plan=_plan(gm, {"*": 0.5}))
    out, _ = transform(gm, config, store)
    w = model.fc.weight.detach()
    cpu = out.fc_weight__cpu_part  # the CPU job takes [k, in] rows: the columns' copy, made transposed
    gpu = out.fc_weight__gpu_part_host
    assert cpu.is_contiguous() and gpu.is_contiguous()
    assert torch.equal(cpu, w[:, :24].t()) and torch.equal(gpu, w[:, 24:])
    # a second graph of the same model reuses the same host parts (made once)
    out2, _ = transform(capture_fx(model), config, store)
    assert out2.fc_weight__cpu_part.data_ptr() == cpu.data_ptr()
    x = torch.randn(3, 32)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert out2.fc_weight__gpu_part_host.data_ptr() == gpu.data_ptr()


def test_linears_sharing_an_input_are_one_cpu_job():
    """q/k/v (or gate/up) read the same activation: their CPU parts are one job (one transfer of the input,
    one wait for the CPU), queued before their GPU parts and collected after them."""
    import hetegen_fx

    class QKV(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(32, 48) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    m = QKV()
    x = torch.randn(4, 32)
    budget = 48 * 32 * 4 + 3 * 48 * 4 + 1024  # room for one full staging buffer and the biases: all offloaded
    c = hetegen_fx.compile(
        m, (x,), device="cpu", gpu_memory=budget, alpha=0.5, profile="model", prefetch=1, activation_reserve=0
    )
    assert all(not lp.resident and 0 < lp.split < lp.out_features for lp in c.plan.layers)
    nodes = list(c.graph_module.graph.nodes)
    (begin,) = [n for n in nodes if n.target is CPU_BEGIN]
    (end,) = [n for n in nodes if n.target is CPU_END]
    assert [w.meta[meta.LAYER] for w in begin.args[1]] == ["q.weight", "k.weight", "v.weight"]
    splits = [c.plan.layer(f"{n}.weight").split for n in "qkv"]
    assert end.args[2] == sum(splits)  # one result holding every Linear's CPU columns
    gpu_parts = [i for i, n in enumerate(nodes) if n.target is F.linear and n.meta[meta.SIDE] == "gpu"]
    assert len(gpu_parts) == 3 and nodes.index(begin) < min(gpu_parts) and max(gpu_parts) < nodes.index(end)
    torch.testing.assert_close(c(x), m(x))


@pytest.mark.parametrize(("alpha", "copied"), [(0.5, True), (1.0, False)])
def test_in_out_cpu_parts_are_rows(alpha, copied):
    """A Conv1D's CPU part is handed to the CPU kernel as ``[k, in]`` rows: contiguous for a share (the copy
    of its columns, made transposed), a view of the whole weight for all of it (no second copy)."""
    model = GPT2MLP().eval()
    gm = capture_fx(model)
    _, plan = _partition(gm, _plan(gm, {"*": alpha}))
    w = model.fc.weight
    k = plan.layer("fc.weight").split
    part = gm.fc_weight__cpu_part
    assert part.shape == (k, w.shape[0]) and torch.equal(part, w.detach()[:, :k].t())
    assert part.is_contiguous() is copied
    assert (part.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()) is not copied
    x = torch.randn(3, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
