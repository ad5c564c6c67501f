"""MLP blocks as one CPU job (``block_jobs``, hetegen_fx.blocks), on the emulated device: the worker's block
job against plain torch for every activation it knows; which MLPs are found (gated and plain, functions and
modules, biases) and which are not; PartitionPass's op counts; numerics against eager on fresh random
inputs and greedy-token parity for HF models, at a profiled α, at α = 0.5 and with everything on the CPU;
plans with blocks saved and applied; the ONNX export of a block."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hetegen_fx
from hetegen_fx import ConfigError, blocks
from hetegen_fx.host import HostWorker
from hetegen_fx.kernels import GEMV_ROWS
from hetegen_fx.models import build_random
from hetegen_fx.plan import LayerPlan, Plan
from hetegen_fx.testing import count_ops

#: a budget that offloads nearly every Linear of the tiny models (their KV cache held small)
TIGHT = {"device": "cpu", "max_seq_len": 32, "activation_reserve": 4096}
#: a budget that offloads every Linear of the MLPs below
SMALL = "40KiB"
BUDGET = {"llama": "150KiB", "qwen2": "150KiB", "mistral": "150KiB", "opt": "240KiB", "gpt2": "150KiB"}
#: architectures whose MLP has no gate (two Linears a block)
PLAIN = ("opt", "gpt2")


def _reference(x, ws, bs, act, gated):
    mids = [F.linear(x, w, b) for w, b in zip(ws[:-1], bs[:-1], strict=True)]
    fn, kwargs = blocks.FUNCTIONS[act]
    h = fn(mids[0], **kwargs)
    if gated:
        h = h * mids[1]
    return F.linear(h, ws[-1], bs[-1])


@pytest.mark.parametrize("together", [True, False])
@pytest.mark.parametrize("act", [blocks.SILU, blocks.GELU, blocks.GELU_TANH, blocks.RELU])
@pytest.mark.parametrize("gated", [True, False])
def test_the_worker_runs_an_mlp_block_as_one_job(act, gated, together):
    host = HostWorker(torch.device("cpu"))
    host.together = together
    gen = torch.Generator().manual_seed(act * 2 + gated)
    x = torch.randn(3, 24, generator=gen)
    k = 10  # the CPU's share of 16 intermediate features
    ws = [torch.randn(k, 24, generator=gen) for _ in range(2 if gated else 1)] + [
        torch.randn(24, k, generator=gen)
    ]
    bs = [torch.randn(k, generator=gen), None][: len(ws) - 1] + [torch.randn(24, generator=gen)]
    seq = host.begin(x, ws, bs, act)
    plain = host.begin(x, ws[:-1], bs[:-1])  # a plain job after it, in the same buffers' pool
    y = host.end(seq, (3, 24), x.dtype)
    torch.testing.assert_close(y, _reference(x, ws, bs, act, gated))
    torch.testing.assert_close(
        host.end(plain, (3, k * (len(ws) - 1)), x.dtype),
        torch.cat([F.linear(x, w, b) for w, b in zip(ws[:-1], bs[:-1], strict=True)], -1),
    )
    host.free()


# -- which MLPs are blocks --------------------------------------------------------------------------------


class GatedMLP(nn.Module):
    def __init__(
        self, act: nn.Module | None = None, bias: bool = False, dim: int = 48, inner: int = 96
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, inner, bias=bias)
        self.up = nn.Linear(dim, inner, bias=bias)
        self.down = nn.Linear(inner, dim, bias=bias)
        self.act = act

    def forward(self, x):
        g = self.gate(x)
        return self.down((self.act(g) if self.act is not None else F.silu(g)) * self.up(x))


class PlainMLP(nn.Module):
    def __init__(self, act, dim: int = 48, inner: int = 96) -> None:
        super().__init__()
        self.fc, self.proj, self.act = nn.Linear(dim, inner), nn.Linear(inner, dim), act

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class LeakyGate(GatedMLP):
    """The gate's output is also returned: not a block (the gate's whole output is needed)."""

    def forward(self, x):
        g = self.gate(x)
        return self.down(F.silu(g) * self.up(x)), g


class Unknown(GatedMLP):
    """A formula that is no activation the worker knows (``x * sigmoid(1.5 x)``): not a block."""

    def forward(self, x):
        g = self.gate(x)
        return self.down(g * torch.sigmoid(1.5 * g) * self.up(x))


class Formula(nn.Module):
    """GPT-2's ``gelu_new`` written out, as transformers' ``NewGELUActivation`` does (Phi, GPT-J, CodeGen)."""

    def forward(self, h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


class LeakyFormula(PlainMLP):
    """A formula one of whose steps is read outside it: not a block."""

    def __init__(self) -> None:
        super().__init__(Formula())

    def forward(self, x):
        h = self.fc(x)
        inner = torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0)))
        return self.proj(0.5 * h * (1.0 + inner)), inner


class FlatRow(PlainMLP):
    """The row Linear reads the product flattened: its output's leading shape is not its input's: not a block."""

    def __init__(self) -> None:
        super().__init__(nn.GELU())

    def forward(self, x):
        return self.proj(self.act(self.fc(x)).view(-1, 96))


class LateSizes(PlainMLP):
    """A reshape whose sizes are read from the input after the first Linear (fx computes them there)."""

    def __init__(self) -> None:
        super().__init__(nn.GELU())

    def forward(self, x):
        h = self.fc(x.view(-1, 48)).view(x.shape[0], x.shape[1], 96)
        return self.proj(self.act(h))


class Conv1DMLP(nn.Module):
    """GPT-2's MLP: transformers' Conv1D (``addmm`` between two reshapes) around ``gelu_new``."""

    def __init__(self, dim: int = 48, inner: int = 96) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj, self.act = Conv1D(inner, dim), Conv1D(dim, inner), Formula()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class UpFirst(GatedMLP):
    """``down(up(x) * silu(gate(x)))``: the product's arguments and the Linears in the other order."""

    def forward(self, x):
        u = self.up(x)
        return self.down(u * F.silu(self.gate(x)))


class Chain(nn.Module):
    """``fc3(gelu(fc2(relu(fc1(x)))))``: two MLPs that share ``fc2``; the first takes it."""

    def __init__(self, dim: int = 48, inner: int = 96) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, inner), nn.Linear(inner, inner), nn.Linear(inner, dim)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class Twice(GatedMLP):
    """The same MLP called twice: its weights are used by two Linears each, so neither call is a block."""

    def forward(self, x):
        once = super().forward(x)
        return super().forward(once + x)


#: case → (module, blocks, CPU jobs)
CASES = {
    "gated F.silu": (GatedMLP(), 1, 1),
    "gated nn.SiLU module": (GatedMLP(nn.SiLU()), 1, 1),
    "gated nn.GELU tanh, biases": (GatedMLP(nn.GELU(approximate="tanh"), bias=True), 1, 1),
    "up before gate": (UpFirst(), 1, 1),
    "plain ReLU": (PlainMLP(nn.ReLU()), 1, 1),
    "plain F.gelu": (PlainMLP(lambda h: F.gelu(h)), 1, 1),
    "a chain of two MLPs": (Chain(), 1, 2),
    "gated gelu_new formula": (GatedMLP(Formula(), bias=True), 1, 1),
    "plain gelu_new formula": (PlainMLP(Formula()), 1, 1),
    "a formula read outside it": (LeakyFormula(), 0, 2),
    "the row reads the product flattened": (FlatRow(), 0, 2),
    "reshape sizes read late": (LateSizes(), 0, 2),
    "gate read twice": (LeakyGate(), 0, 2),
    "unknown activation": (Unknown(), 0, 2),
    "an MLP called twice": (Twice(), 0, 4),
}


def _compile_mlp(module: nn.Module, x: torch.Tensor, frontend: str, gpu_memory: str = SMALL):
    """``module`` compiled at α = 0.5 with its Linears offloaded and ``block_jobs`` on."""
    return hetegen_fx.compile(
        module,
        example_inputs=(x,),
        device="cpu",
        gpu_memory=gpu_memory,
        alpha=0.5,
        block_jobs=True,
        frontend=frontend,
    )


@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
@pytest.mark.parametrize("case", list(CASES))
def test_which_mlps_run_as_one_job(case, frontend):
    torch.manual_seed(0)
    module, expected, jobs = CASES[case]
    module = module.eval()
    budget = "42KiB" if isinstance(module, Chain) else SMALL  # its staging arena holds fc2's larger part
    c = _compile_mlp(
        module, torch.randn(1, 3, 48), frontend, budget
    )  # 3 tokens: GEMV shapes, where blocks form
    for seed in (1, 2):  # fresh random inputs
        x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(c(x), module(x), atol=1e-5, rtol=1e-5)
    (graph,) = hetegen_fx.state(c).graphs
    assert len(_blocks_of_plan(graph.plan)) == expected
    assert count_ops(graph.graph_module)["hetegen.cpu_begin"] == jobs


@pytest.mark.parametrize("frontend, expected", [("dynamo", 1), ("export", 1), ("fx", 0)])
def test_a_conv1d_mlp_is_a_block_where_its_reshapes_are_known(frontend, expected):
    """GPT-2's MLP (Conv1D: ``addmm`` between reshapes) is a block where the capture writes its reshapes'
    sizes out (dynamo, torch.export); torch.fx.symbolic_trace computes them from ``size()`` nodes, which
    read the product too: two jobs there. The same outputs either way."""
    torch.manual_seed(0)
    module = Conv1DMLP().eval()
    c = _compile_mlp(module, torch.randn(1, 3, 48), frontend)
    for seed in (1, 2):
        x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(c(x), module(x), atol=1e-5, rtol=1e-5)
    (graph,) = hetegen_fx.state(c).graphs
    assert len(_blocks_of_plan(graph.plan)) == expected
    assert count_ops(graph.graph_module)["hetegen.cpu_begin"] == 2 - expected


def test_a_formula_that_writes_into_its_input_is_no_block():
    """``mul(h, 0.0, out=h)`` is not evaluated on the probe (it would write into it): two jobs, eager's
    output, and a formula compiled afterwards is still told apart from SiLU."""

    class OutKwarg(PlainMLP):
        def forward(self, x):
            h = self.fc(x)
            return self.proj(torch.mul(h, 0.0, out=h))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 48)
    for module, jobs in ((OutKwarg(nn.SiLU()), 2), (PlainMLP(lambda h: h * 2.0), 2), (PlainMLP(F.silu), 1)):
        module = module.eval()
        c = _compile_mlp(module, x, "fx")
        with torch.no_grad():
            torch.testing.assert_close(c(x), module(x), atol=1e-5, rtol=1e-5)
        (graph,) = hetegen_fx.state(c).graphs
        assert count_ops(graph.graph_module)["hetegen.cpu_begin"] == jobs


def test_partition_op_counts_with_blocks():
    """Per block: one CPU job instead of two, no gather of gate/up or down, the activation (and product)
    copied for the device's share and their old nodes gone, one sum of the two partial outputs."""
    torch.manual_seed(0)
    module = GatedMLP().eval()
    x = torch.randn(1, 3, 48)
    opts = {"example_inputs": (x,), "device": "cpu", "gpu_memory": SMALL, "alpha": 0.5, "frontend": "fx"}
    apart = count_ops(hetegen_fx.compile(module, **opts).graph_module)
    block = count_ops(hetegen_fx.compile(module, block_jobs=True, **opts).graph_module)
    assert apart["hetegen.cpu_begin"] == 2 and block["hetegen.cpu_begin"] == 1
    assert block["hetegen.cpu_end"] == 1 and block["hetegen.cpu_wait"] == 1
    assert apart["cat"] == 3 and block["cat"] == 0
    assert block["add"] == apart["add"] + 1
    for op in ("hetegen.copy_h2d", "hetegen.wait_copy", "hetegen.release_slot", "linear"):
        assert block[op] == apart[op] == 3, op
    assert block["silu"] == apart["silu"] == 1 and block["mul"] == apart["mul"] == 1


# -- HF models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models() -> dict:
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_random(arch)
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch, alpha",
    [
        ("llama", None),
        ("qwen2", 0.5),
        ("mistral", None),
        ("opt", None),
        ("opt", 1.0),
        ("llama", 1.0),
        ("gpt2", None),
        ("gpt2", 0.5),
    ],
)
def test_hf_models_give_eager_tokens_with_blocks(hf_models, arch, alpha):
    """In the decode graphs, every MLP that is offloaded whole runs as one job (the lane model finds it no
    slower on the emulated device, where a job costs nothing beyond its GEMVs), in the prefill none; α = 1
    puts every block on the CPU (the row Linear's bias with it). GPT-2: Conv1D's reshapes and ``gelu_new``
    written as a formula inside the block. Logits against eager on fresh random ids, and 12 greedy tokens."""
    model = hf_models(arch)
    c = hetegen_fx.compile(model, gpu_memory=BUDGET[arch], block_jobs=True, alpha=alpha, **TIGHT)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (1, 9), generator=gen)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        out = c.generate(ids, max_new_tokens=12, do_sample=False)
        fresh = torch.randint(3, 100, (1, 3), generator=gen)  # ≤ GEMV_ROWS tokens: a graph with blocks
        torch.testing.assert_close(c(fresh).logits, model(fresh).logits, atol=1e-5, rtol=1e-5)
    assert out.tolist() == ref.tolist()
    plans = [g.plan for g in hetegen_fx.state(c).graphs]
    assert all(bool(_blocks_of_plan(p)) == (p.tokens <= GEMV_ROWS) for p in plans)  # decode steps only
    for p in plans:
        by_name = {lp.name: lp for lp in p.layers}
        for head in _blocks_of_plan(p):
            members = [lp for lp in p.layers if lp.block == head]
            assert len(members) == (2 if arch in PLAIN else 3) and by_name[head] is members[0]
            assert [lp.split_inputs for lp in members] == [False] * (len(members) - 1) + [True]
            assert len({lp.split for lp in members}) == 1 and all(not lp.resident for lp in members)
            if alpha == 1.0:
                assert members[-1].split == members[-1].in_features


def _blocks_of_plan(plan: Plan) -> set[str]:
    return {lp.block for lp in plan.layers if lp.block}


def test_without_block_jobs_no_plan_has_blocks(hf_models):
    c = hetegen_fx.compile(hf_models("llama"), gpu_memory=BUDGET["llama"], **TIGHT)
    with torch.no_grad():
        c(torch.randint(3, 100, (1, 5)))
    assert not any(_blocks_of_plan(g.plan) for g in hetegen_fx.state(c).graphs)


def test_a_saved_plan_with_blocks_applies(hf_models, tmp_path):
    model = hf_models("llama")
    ids = torch.randint(3, 100, (1, 3), generator=torch.Generator().manual_seed(3))  # GEMV shapes
    c = hetegen_fx.compile(model, gpu_memory=BUDGET["llama"], block_jobs=True, alpha=0.5, **TIGHT)
    with torch.no_grad():
        ref = c(ids).logits
    (graph,) = hetegen_fx.state(c).graphs
    path = graph.plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == graph.plan and _blocks_of_plan(loaded)
    again = hetegen_fx.compile(model, plan=path, **TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref)
    (applied,) = hetegen_fx.state(again).graphs
    assert _blocks_of_plan(applied.plan) == _blocks_of_plan(loaded)
    assert count_ops(applied.graph_module) == count_ops(graph.graph_module)


def test_a_plan_entry_split_past_its_inputs_is_refused():
    lp = LayerPlan(
        "mlp.down.weight",
        8,
        16,
        1,
        "float32",
        512,
        False,
        0.5,
        12,
        split_inputs=True,
        block="mlp.gate.weight",
    )
    lp.validate()  # 12 of 16 input features
    with pytest.raises(ConfigError, match="in_features = 16"):
        LayerPlan(**{**lp.__dict__, "split": 17}).validate()
    with pytest.raises(ConfigError, match="out_features = 8"):
        LayerPlan(**{**lp.__dict__, "split_inputs": False}).validate()


def test_the_plan_table_names_blocks(hf_models):
    c = hetegen_fx.compile(
        hf_models("llama"), gpu_memory=BUDGET["llama"], block_jobs=True, alpha=0.5, **TIGHT
    )
    with torch.no_grad():
        c(torch.randint(3, 100, (1, 3)))
    table = hetegen_fx.state(c).graphs[0].plan.table()
    assert "MLP block(s) as one CPU job each" in table
    places = Counter(line.split()[1] for line in table.splitlines()[2:-1] if ".mlp." in line)
    assert places["block"] >= 3, table


def test_onnx_export_of_a_block_matches_eager(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = GatedMLP(nn.GELU(approximate="tanh"), bias=True).eval()
    c = _compile_mlp(module, torch.randn(1, 4, 48), "export")
    assert _blocks_of_plan(c.plan)
    path = hetegen_fx.export(c, tmp_path / "mlp.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fresh = torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(1))
    (out,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), module(fresh), atol=1e-5, rtol=1e-5)


def test_blocks_in_replayed_stretches_and_across_a_raised_budget(hf_models):
    """Blocks inside the emulated CUDA graphs' stretches (the job's sum replayed with the device work), and a
    budget raised between generates: Linears promoted, the graphs compiled again with fewer blocks, the
    tokens still eager's."""
    model = hf_models("llama")
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False).tolist()

    def blocks_now(c) -> list[int]:
        """Blocks in each decode graph (a prefill has none)."""
        return [
            len(_blocks_of_plan(g.plan)) for g in hetegen_fx.state(c).graphs if g.plan.tokens <= GEMV_ROWS
        ]

    graphs = hetegen_fx.compile(
        model,
        gpu_memory=BUDGET["llama"],
        block_jobs=True,
        alpha=0.5,
        cuda_graphs=True,
        graph_memory="64KiB",
        **TIGHT,
    )
    with torch.no_grad():
        assert graphs.generate(ids, max_new_tokens=10, do_sample=False).tolist() == ref
    pool = hetegen_fx.state(graphs).cuda_graphs
    assert pool["replays"] > pool["recorded"] > 0 and pool["failed"] == 0 and all(blocks_now(graphs))

    c = hetegen_fx.compile(model, gpu_memory=BUDGET["llama"], block_jobs=True, alpha=0.5, **TIGHT)
    with torch.no_grad():
        assert c.generate(ids, max_new_tokens=10, do_sample=False).tolist() == ref
    offloaded = [sum(not lp.resident for lp in g.plan.layers) for g in hetegen_fx.state(c).graphs]
    change = hetegen_fx.set_gpu_memory(c, "260KiB")
    assert change is not None and change.promoted
    with torch.no_grad():
        assert c.generate(ids, max_new_tokens=10, do_sample=False).tolist() == ref
    for g, before in zip(hetegen_fx.state(c).graphs, offloaded, strict=True):  # compiled again, placed anew
        assert sum(not lp.resident for lp in g.plan.layers) < before
        for head in _blocks_of_plan(g.plan):
            assert not any(lp.resident for lp in g.plan.layers if lp.block == head)
    assert all(blocks_now(c))


def test_a_saved_block_that_no_longer_holds_runs_as_two_jobs(hf_models, tmp_path):
    """A plan whose block has splits that disagree (an edited file), or whose MLP this graph does not hold as
    a block, runs those Linears as two jobs at its α: eager's logits, no error."""
    model = hf_models("llama")
    ids = torch.randint(3, 100, (1, 3), generator=torch.Generator().manual_seed(4))
    c = hetegen_fx.compile(model, gpu_memory=BUDGET["llama"], block_jobs=True, alpha=0.5, **TIGHT)
    with torch.no_grad():
        c(ids)
    (graph,) = hetegen_fx.state(c).graphs
    heads = sorted(_blocks_of_plan(graph.plan))
    data = graph.plan.to_dict()
    up = next(
        lp
        for lp in data["layers"]
        if lp["block"] == heads[0] and not lp["split_inputs"] and lp["name"] != heads[0]
    )
    up["split"] += 1
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    again = hetegen_fx.compile(model, plan=path, **TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    (applied,) = hetegen_fx.state(again).graphs
    assert sorted(_blocks_of_plan(applied.plan)) == heads[1:]
    jobs = count_ops(applied.graph_module)["hetegen.cpu_begin"]
    assert jobs == count_ops(graph.graph_module)["hetegen.cpu_begin"] + 1


def test_with_block_jobs_residency_offloads_whole_mlps(hf_models):
    """g counts a job's overhead per Linear of the job: without blocks a lone down projection weighs more
    and stays resident while gate/up and q are offloaded; with ``block_jobs`` the MLP is one job, so whole
    MLPs are offloaded (and run as blocks) before anything else. Same budget, same bytes to place."""
    model = hf_models("llama")
    ids = torch.randint(3, 100, (1, 1), generator=torch.Generator().manual_seed(2))
    opts = {**TIGHT, "gpu_memory": "250KiB", "job_overhead": 1e-6}  # α > 0 for these small Linears

    def offloaded(**kw) -> tuple[set[str], int]:
        c = hetegen_fx.compile(model, **opts, **kw)
        with torch.no_grad():
            torch.testing.assert_close(c(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        (graph,) = hetegen_fx.state(c).graphs
        names = {lp.name.split(".", 3)[-1] for lp in graph.plan.layers if not lp.resident}
        return names, len(_blocks_of_plan(graph.plan))

    apart, none = offloaded()
    assert none == 0 and "mlp.down_proj.weight" not in apart and "self_attn.q_proj.weight" in apart
    whole, blocks = offloaded(block_jobs=True)
    assert whole == {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"} and blocks == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_worker_runs_a_half_precision_block(dtype):
    """fp16 and bf16 weights, as offloaded models have them: the block's activation and product run on the
    CPU in that dtype; within a few units of the dtype's resolution of float32's result."""
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 64, generator=gen)
    ws = [torch.randn(24, 64, generator=gen) * 0.1 for _ in range(2)] + [
        torch.randn(64, 24, generator=gen) * 0.1
    ]
    for act in (blocks.SILU, blocks.GELU, blocks.GELU_TANH, blocks.RELU):
        seq = host.begin(x.to(dtype), [w.to(dtype) for w in ws], [None] * 3, act)
        y = host.end(seq, (1, 64), dtype)
        ref = _reference(x, [w.to(dtype).float() for w in ws], [None] * 3, act, gated=True)
        torch.testing.assert_close(y.float(), ref, atol=8e-3, rtol=2e-2)
    host.free()
