"""PlacementPass: residency by priority g = T_cpu / bytes (at one token, pooled per dtype, with the job overhead)
under a budget, α and the split row per Linear."""

from __future__ import annotations

import re

import pytest
import torch

from hetegen_fx import meta, pipeline
from hetegen_fx.capture import capture_fx
from hetegen_fx.config import Config
from hetegen_fx.costs import LinearCost
from hetegen_fx.errors import BudgetError, ConfigError
from hetegen_fx.passes import PlacementPass, ProfilePass
from hetegen_fx.passes.placement import split_row
from hetegen_fx.plan import LayerPlan, Plan
from hetegen_fx.store import WeightStore

# bias-free MLP fixture: a 32→64 (8192 B), b 64→48 (12288 B), c 48→16 (3072 B); 23552 B in all
BYTES = {"a.weight": 8192, "b.weight": 12288, "c.weight": 3072}
TOTAL = sum(BYTES.values())


def _profiled(model, costs: dict[str, float] | None = None, example_inputs=None):
    """fx graph of ``model`` after ProfilePass; ``costs`` overrides T_cpu per layer (to control priority)."""
    gm = capture_fx(model)
    ProfilePass(Config(device="cpu", profile="model"), example_inputs)(gm)
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta and costs:
            t = costs[n.meta[meta.LINEAR].name]
            cost = LinearCost(t_cpu=t, t_copy=1e-6, t_gpu=1e-6, source="model")
            n.meta[meta.COST] = n.meta[meta.DECODE_COST] = cost
    return gm


def _config(**kw) -> Config:
    return Config(**{"device": "cpu", "profile": "model", "activation_reserve": 0, "prefetch": 1, **kw})


def _place(gm, config, store=None, adopt=True):
    """PlacementPass on ``gm``; with ``adopt``, its decision given to the store as the pipeline does."""
    store = store or WeightStore(torch.device("cpu"))
    res = PlacementPass(config, store)(gm)
    if adopt:
        pipeline.adopt(gm, store)
    return res, gm.meta[meta.PLAN], store


def _resident(plan: Plan) -> set[str]:
    return {lp.name for lp in plan.layers if lp.resident}


@pytest.mark.parametrize(
    ("alpha", "out", "expected"),
    [
        (0.5, 48, 24),
        (0.0, 48, 0),
        (1.0, 48, 48),
        (0.26, 10, 3),
        (1.5, 10, 10),  # clamped
        (-0.2, 10, 0),  # clamped
        (0.3, 4096, 1216),  # large layers: multiples of 64 (0.3 * 4096 / 64 = 19.2 → 19 * 64)
        (0.99, 1024, 1024),
        (0.01, 1024, 0),
    ],
)
def test_split_row(alpha, out, expected):
    assert split_row(alpha, out) == expected


def test_analysis_writes_plan_and_layer_plans(mlp, count):
    gm = _profiled(mlp(bias=False))
    code = gm.code
    res, plan, store = _place(gm, _config(gpu_memory=10**9), adopt=False)
    assert res.modified is False and gm.code == code and count(gm, "linear") == 3
    nodes = [n for n in gm.graph.nodes if meta.PLACEMENT in n.meta]
    assert [n.meta[meta.PLACEMENT] for n in nodes] == plan.layers
    assert [lp.name for lp in plan.layers] == list(BYTES)
    assert {lp.name: lp.bytes for lp in plan.layers} == BYTES
    assert plan.source == "model" and plan.device == "cpu" and plan.gpu_memory == 10**9
    ledger, reserved = gm.meta[meta.LEDGER]  # the model's first ledger, for the pipeline to give to the store
    assert ledger.residency == dict.fromkeys(BYTES, True) and reserved["kv_cache"] == ledger.kv_cache
    assert store.residency is None and store.ledger is None  # the pass wrote the graph, not the store


def test_everything_resident_when_the_budget_holds_the_model(mlp):
    gm = _profiled(mlp(bias=False))
    _, plan, _ = _place(gm, _config(gpu_memory=TOTAL))  # exactly the weights (no other reserve here)
    assert _resident(plan) == set(BYTES)
    assert all(lp.alpha == 0 and lp.split == 0 and lp.slot == -1 for lp in plan.layers)
    assert plan.reserved["staging"] == 0
    # one byte less and something must be offloaded
    _, plan, _ = _place(_profiled(mlp(bias=False)), _config(gpu_memory=TOTAL - 1))
    assert _resident(plan) != set(BYTES)


def test_no_budget_on_cpu_means_everything_resident(mlp):
    _, plan, _ = _place(_profiled(mlp(bias=False)), _config(gpu_memory=None))
    assert _resident(plan) == set(BYTES) and plan.gpu_memory is None


def test_everything_resident_with_biases_and_dynamo_params(mlp, dynamo_capture):
    """Linear biases count once (in the Linear's bytes), not again as 'other parameters'."""
    model = mlp(bias=True)
    gm, example_inputs = dynamo_capture(model, torch.randn(3, 32))
    ProfilePass(Config(device="cpu", profile="model"), example_inputs)(gm)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _, plan, store = _place(gm, _config(gpu_memory=model_bytes))
    assert plan.reserved["other_params"] == 0
    assert sum(lp.bytes for lp in plan.layers) == model_bytes
    assert _resident(plan) == set(BYTES)


# priorities that disagree with both size order and absolute T_cpu order
PER_BYTE = {"a.weight": 1.0, "b.weight": 1.2, "c.weight": 0.2}  # g: a 1.2e-4 > b 9.8e-5 > c 6.5e-5


def test_priority_is_time_saved_per_byte(mlp):
    # α = 0.5 for every Linear, prefetch 1: staging = half of the largest offloaded Linear.
    # by g: a (8192 + staging 6144 ≤ 18000) → resident; b (8192 + 12288 > 18000) → offloaded;
    #        c (8192 + 3072 + staging 6144 = 17408 ≤ 18000) → resident
    gm = _profiled(mlp(bias=False), PER_BYTE)
    _, plan, _ = _place(gm, _config(gpu_memory=18000, alpha=0.5))
    assert _resident(plan) == {"a.weight", "c.weight"}
    b = plan.layer("b.weight")
    assert b.split == 24 and b.alpha == 0.5 and not b.resident
    assert plan.reserved["staging"] == 6144
    assert plan.resident_bytes + plan.reserved["staging"] <= 18000


def test_cpu_time_differences_within_a_dtype_do_not_reorder_residency(mlp):
    """At one token T_cpu / M is one rate per dtype: per-shape measurements (noise) do not reorder the
    Linears; the job overhead per byte does (c, the smallest, then a; b does not fit)."""
    for costs in (
        {"a.weight": 1.0, "b.weight": 10.0, "c.weight": 0.1},
        {"a.weight": 0.1, "b.weight": 1.0, "c.weight": 10.0},
    ):
        _, plan, _ = _place(_profiled(mlp(bias=False), costs), _config(gpu_memory=18000, alpha=0.5))
        assert _resident(plan) == {"a.weight", "c.weight"}


def test_priority_with_a_hardware_model(mlp):
    """With a big per-call CPU overhead, small Linears save the most time per byte and stay resident."""
    from hetegen_fx.costs import HardwareModel

    hw = HardwareModel(
        cpu_bw=1e12, cpu_flops=1e15, h2d_bw=1e12, gpu_bw=1e12, gpu_flops=1e15, cpu_overhead=1e-3
    )
    gm = capture_fx(mlp(bias=False))
    ProfilePass(Config(device="cpu", profile="model"), hardware=hw)(gm)
    _, plan, _ = _place(gm, _config(gpu_memory=17500, alpha=0.5))
    # by g: c (3072 + staging 6144), then a (3072 + 8192 + 6144 = 17408); b: 3072 + 8192 + 12288 > 17500
    assert _resident(plan) == {"c.weight", "a.weight"}


def test_alpha_from_costs_when_not_forced(mlp):
    gm = _profiled(mlp(bias=False), example_inputs=[torch.randn(4, 32)])
    _, plan, _ = _place(gm, _config(gpu_memory=12290))  # a and b cannot be resident
    offloaded = [lp for lp in plan.layers if not lp.resident]
    assert {lp.name for lp in offloaded} >= {"a.weight", "b.weight"}
    nodes = {n.meta[meta.LINEAR].name: n for n in gm.graph.nodes if meta.LINEAR in n.meta}
    for lp in offloaded:
        cost = nodes[lp.name].meta[meta.COST]
        assert lp.alpha == pytest.approx(cost.alpha())
        assert 0 < lp.split < lp.out_features
        assert lp.split == split_row(cost.alpha(), lp.out_features)
        assert (lp.t_cpu, lp.t_copy, lp.t_gpu) == (cost.t_cpu, cost.t_copy, cost.t_gpu)
        assert lp.tokens == 4


def test_budget_error_names_the_minimum_in_bytes(mlp):
    # α = 0, prefetch 1: the minimum is one staging buffer for the largest Linear (b, 12288 B)
    cfg = dict(alpha=0.0, prefetch=1)
    with pytest.raises(BudgetError) as exc:
        _place(_profiled(mlp(bias=False)), _config(gpu_memory=12287, **cfg))
    msg = str(exc.value)
    assert "12288 bytes" in msg and "prefetch=1" in msg
    assert re.search(r"raise gpu_memory to at least 12\.00 KiB", msg)
    # exactly the minimum works: everything offloaded
    _, plan, _ = _place(_profiled(mlp(bias=False)), _config(gpu_memory=12288, **cfg))
    assert not _resident(plan)
    assert plan.reserved["staging"] == 12288


def test_no_budget_error_when_the_model_fits(mlp):
    # two staging buffers (24576 B) would exceed the whole model (23552 B): it simply stays resident
    _, plan, _ = _place(_profiled(mlp(bias=False)), _config(gpu_memory=TOTAL, alpha=0.0, prefetch=2))
    assert _resident(plan) == set(BYTES)


def test_budget_minimum_includes_the_activation_reserve(mlp):
    with pytest.raises(BudgetError, match=r"\(12800 bytes: .*activations 512 B"):
        _place(
            _profiled(mlp(bias=False)),
            _config(gpu_memory=12799, alpha=0.0, prefetch=1, activation_reserve=512),
        )


def test_residency_is_decided_once_per_store(mlp):
    model = mlp(bias=False)
    store = WeightStore(torch.device("cpu"))
    _, first, _ = _place(_profiled(model, PER_BYTE), _config(gpu_memory=18000, alpha=0.5), store)
    # a second graph of the same model (another shape) with another α reuses the residency (its larger GPU
    # parts need a larger staging arena than the budget leaves: a warning, see the test below)
    gm2 = _profiled(model, example_inputs=[torch.randn(9, 32)])
    with pytest.warns(RuntimeWarning, match="staging arena"):
        _, second, _ = _place(gm2, _config(gpu_memory=18000, alpha=0.25), store)
    assert _resident(second) == _resident(first) == {"a.weight", "c.weight"}
    assert second.layer("b.weight").split == 12 and second.tokens == 9


def test_kv_cache_reserve_from_attention(tiny_hf, dynamo_capture):
    model = tiny_hf("llama")
    ids = torch.randint(0, 128, (1, 6))
    gm, example_inputs = dynamo_capture(model, ids)
    ProfilePass(Config(device="cpu", profile="model"), example_inputs)(gm)
    cfg = _config(max_seq_len=64, batch_size=3, gpu_memory=None, host_embeddings=True)
    _, plan, _ = _place(gm, cfg)
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    # twice the cache: a decode step holds the cache it was given and the one it returns
    assert plan.reserved["kv_cache"] == 2 * per_token * 64 * 3
    # the norms are "other parameters"; the Linears are not, nor the embedding, looked up on the host
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert plan.reserved["other_params"] == other
    assert plan.host_tables == ["model.embed_tokens.weight"]
    table = model.model.embed_tokens.weight
    _, plan, _ = _place(gm, _config(max_seq_len=64, batch_size=3, gpu_memory=None, host_embeddings=False))
    assert plan.reserved["other_params"] == other + table.numel() * 4 and plan.host_tables == []
    assert len(plan.layers) == 2 * 7 + 1
    # "auto" (the default): no budget, everything fits, so the table is on the device too
    _, plan, _ = _place(gm, _config(max_seq_len=64, batch_size=3, gpu_memory=None))
    assert plan.reserved["other_params"] == other + table.numel() * 4 and plan.host_tables == []


def test_auto_keeps_the_token_table_on_the_host_unless_the_longest_cache_fits_beside_everything(
    tiny_hf, dynamo_capture
):
    """``host_embeddings="auto"`` moves the table to the device only where every Linear stays resident beside
    the largest cache the model may hold (``max_seq_len``), so no request growing its cache later demotes a
    weight to keep the table there."""
    model = tiny_hf("llama")
    gm, example_inputs = dynamo_capture(model, torch.randint(0, 128, (1, 6)))
    ProfilePass(Config(device="cpu", profile="model"), example_inputs)(gm)
    _, plan, store = _place(gm, _config(max_seq_len=64, gpu_memory=None))
    ledger = store.ledger
    everything = ledger.total({lp.name: True for lp in plan.layers})  # the table and a 64-token cache
    assert plan.host_tables == [] and not ledger.host_tables
    _, plan, _ = _place(gm, _config(max_seq_len=64, gpu_memory=everything))
    assert plan.host_tables == [] and all(lp.resident for lp in plan.layers)
    _, plan, _ = _place(gm, _config(max_seq_len=1024, gpu_memory=everything))  # a 1024-token cache: no room
    assert plan.host_tables == ["model.embed_tokens.weight"]


def test_a_static_kv_cache_is_reserved_once(tiny_hf):
    """HF's StaticCache is allocated by the first step and updated in place: one copy at a time, where a
    DynamicCache's step holds the cache it was given and the one it returns."""
    import hetegen_fx

    model = tiny_hf("llama")
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    ids = torch.randint(3, 128, (1, 6))
    for cache, copies in (("static", 1), ("dynamic", 2)):
        compiled = hetegen_fx.compile(model, device="cpu", profile="model", max_seq_len=32)
        with torch.no_grad():
            out = compiled.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation=cache)
            ref = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation=cache)
        assert out.tolist() == ref.tolist()
        plans = hetegen_fx.explain(compiled).plans
        assert len(plans) == 2 and {p.reserved["kv_cache"] for p in plans} == {copies * per_token * 32}


def test_kv_cache_copies_need_a_buffer_written_in_place():
    """Keys that are a graph input count once only where the graph writes them in place (a StaticCache);
    an input it only reads may be a concatenation made before a graph break: twice."""
    import torch.nn.functional as F

    from hetegen_fx.passes.placement import kv_cache_copies

    def reads(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def updates(q, k, v, new, pos):
        k.index_copy_(2, pos, new)
        v.index_copy_(2, pos, new)
        return F.scaled_dot_product_attention(q, k, v)

    def concatenates(q, k, v, new):
        return F.scaled_dot_product_attention(q, torch.cat([k, new], 2), torch.cat([v, new], 2))

    assert kv_cache_copies(torch.fx.symbolic_trace(reads)) == 2
    assert kv_cache_copies(torch.fx.symbolic_trace(updates)) == 1
    assert kv_cache_copies(torch.fx.symbolic_trace(concatenates)) == 2


def test_the_cublas_workspace_is_reserved_as_torch_sizes_it():
    from hetegen_fx.runtime import blas_workspace_bytes

    assert blas_workspace_bytes(None) == 0  # not CUDA: no reserve (plans on "cpu" have no such key)
    assert blas_workspace_bytes((9, 0)) == blas_workspace_bytes((12, 0)) == 32 * 2**20  # Hopper, Blackwell
    assert blas_workspace_bytes((8, 0)) == (4096 * 2 + 16 * 8) * 1024  # torch's ":4096:2:16:8" before them
    assert blas_workspace_bytes((9, 0), ":4096:8") == 32 * 2**20
    assert blas_workspace_bytes((8, 6), ":16:8") == 128 * 1024  # CUBLAS_WORKSPACE_CONFIG wins
    assert (
        blas_workspace_bytes((9, 0), "nonsense") == 32 * 2**20
    )  # unreadable: torch's default, as torch does


def test_given_plan_is_applied(mlp):
    gm = _profiled(mlp(bias=False))
    layers = [
        LayerPlan(
            name, out, inn, 1, "float32", BYTES[name], resident=(name == "b.weight"), alpha=0.5, split=split
        )
        for name, out, inn, split in [
            ("a.weight", 64, 32, 10),
            ("b.weight", 48, 64, 0),
            ("c.weight", 16, 48, 16),
        ]
    ]
    given = Plan(device="cpu", gpu_memory=1234, tokens=1, layers=layers, reserved={"staging": 4})
    store = WeightStore(torch.device("cpu"))
    res = PlacementPass(_config(gpu_memory=None), store, plan=given)(gm)
    plan = gm.meta[meta.PLAN]
    assert res.modified is False
    assert plan.source == "plan" and plan.layers == layers and plan.layers[0] is not layers[0]
    ledger, _ = gm.meta[meta.LEDGER]
    assert ledger.residency == {"a.weight": False, "b.weight": True, "c.weight": False}
    assert store.residency is None


def test_given_plan_for_another_model(mlp):
    other = Plan("cpu", None, 1, [LayerPlan("x.weight", 64, 32, 1, "float32", 8192, True)])
    with pytest.raises(ConfigError, match="another model"):
        PlacementPass(_config(), WeightStore(torch.device("cpu")), plan=other)(_profiled(mlp(bias=False)))
    wrong_shape = Plan("cpu", None, 1, [LayerPlan(n, 7, 7, 1, "float32", 196, True) for n in BYTES])
    with pytest.raises(ConfigError, match=r"a\.weight is 7x7 but the model's Linear is 64x32"):
        PlacementPass(_config(), WeightStore(torch.device("cpu")), plan=wrong_shape)(
            _profiled(mlp(bias=False))
        )


def test_matmul_add_weights_and_biases_count_once():
    """A Conv1D-style ``x @ W + b``: W is read by the absorbed matmul, b by the add; neither is 'other'."""

    class MatmulAdd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 40))
            self.b = torch.nn.Parameter(torch.randn(40))
            self.norm = torch.nn.Parameter(torch.randn(40))

        def forward(self, x):
            return (x @ self.w + self.b) * self.norm

    model = MatmulAdd()
    gm = capture_fx(model)
    ProfilePass(Config(device="cpu", profile="model"))(gm)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    _, plan, _ = _place(gm, _config(gpu_memory=model_bytes))
    assert plan.reserved["other_params"] == 40 * 4  # the norm only
    assert [lp.bytes for lp in plan.layers] == [(32 * 40 + 40) * 4]
    assert _resident(plan) == {"w"}


def test_residency_follows_the_decode_costs_whatever_graph_comes_first(mlp):
    """Residency is chosen once, by one-token costs. Here the prefill costs (the graph's own) would put a
    and c wholly on the GPU side (α = 0: no CPU job, no job overhead) and so rank b first; the decode costs
    split all three, which ranks c and a first."""
    gm = _profiled(mlp(bias=False))
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta:
            name = n.meta[meta.LINEAR].name
            n.meta[meta.DECODE_COST] = LinearCost(t_cpu=1e-3, t_copy=1e-3, t_gpu=0.0, source="model")
            slow = 1.0 if name != "b.weight" else 1e-3  # a, c: far slower on the CPU at the prefill shape
            n.meta[meta.COST] = LinearCost(t_cpu=slow, t_copy=1e-3, t_gpu=0.0, source="model")
    # 21000 B: by the prefill ranking b fits first (12288 + staging 8192) and then nothing else; by the
    # decode ranking c and a fit (3072 + 8192 + staging 6144) and b does not
    _, plan, _ = _place(gm, _config(gpu_memory=21000))
    assert _resident(plan) == {"a.weight", "c.weight"}


def test_a_lone_linear_outranks_one_that_shares_its_job():
    """At equal T_cpu / M, the job overhead makes a Linear with its own CPU job the one to keep resident."""

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(64, 64, bias=False)
            self.k = torch.nn.Linear(64, 64, bias=False)
            self.o = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x))

    h = 150e-6  # the job overhead
    t = 10 * h  # the same T_cpu for all three; the overhead share decides
    gm = _profiled(Attn(), {"q.weight": t, "k.weight": t, "o.weight": t})
    weight = 64 * 64 * 4
    _, plan, _ = _place(gm, _config(gpu_memory=weight + weight // 2 + 100, alpha=0.5, job_overhead=h))
    assert _resident(plan) == {"o.weight"}


def test_among_equal_priorities_the_later_linears_stay_resident():
    """Four blocks of one shape: every Linear has the same priority, and the budget holds two. The last two
    stay resident, so the first CPU job is the first block's (a decode step starts with CPU work)."""

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64, bias=False) for _ in range(4))

        def forward(self, x):
            for blk in self.blocks:
                x = torch.relu(blk(x))
            return x

    names = [f"blocks.{i}.weight" for i in range(4)]
    gm = _profiled(Stack(), dict.fromkeys(names, 1e-3))
    weight = 64 * 64 * 4
    _, plan, _ = _place(gm, _config(gpu_memory=2 * weight + weight // 2 + 100, alpha=0.5))
    assert _resident(plan) == {"blocks.2.weight", "blocks.3.weight"}
    assert [lp.name for lp in plan.layers if not lp.resident] == ["blocks.0.weight", "blocks.1.weight"]


def test_linears_of_one_job_share_an_alpha_lowered_by_the_job_overhead():
    """q and k read one input: one CPU job, one α, balancing H + their CPU parts against their copies; o has
    its own job. A larger H lowers every α; forcing α ignores H."""
    from hetegen_fx.costs import job_alpha

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(64, 64, bias=False)
            self.k = torch.nn.Linear(64, 32, bias=False)
            self.o = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x).repeat(1, 2))

    costs = {
        "q.weight": LinearCost(t_cpu=2e-3, t_copy=1.5e-3, t_gpu=1e-4, source="model"),
        "k.weight": LinearCost(t_cpu=1e-3, t_copy=0.5e-3, t_gpu=1e-4, source="model", t_cpu_fixed=1e-4),
        "o.weight": LinearCost(t_cpu=2e-3, t_copy=1.5e-3, t_gpu=1e-4, source="model"),
    }
    gm = _profiled(Attn())
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta:
            n.meta[meta.COST] = n.meta[meta.DECODE_COST] = costs[n.meta[meta.LINEAR].name]
    alphas = {}
    for h in (0.0, 4e-4):
        _, plan, _ = _place(gm, _config(gpu_memory=14_000, job_overhead=h), WeightStore(torch.device("cpu")))
        by = {lp.name: lp for lp in plan.layers}
        assert not _resident(plan)
        assert (
            by["q.weight"].alpha
            == by["k.weight"].alpha
            == pytest.approx(job_alpha([costs["q.weight"], costs["k.weight"]], h))
        )
        assert by["o.weight"].alpha == pytest.approx(job_alpha([costs["o.weight"]], h))
        for lp in plan.layers:
            assert lp.split == split_row(lp.alpha, lp.out_features)
        alphas[h] = by
    for name in costs:
        assert 0 < alphas[4e-4][name].alpha < alphas[0.0][name].alpha
    _, plan, _ = _place(
        gm, _config(gpu_memory=14_000, job_overhead=4e-4, alpha=0.6), WeightStore(torch.device("cpu"))
    )
    assert {lp.alpha for lp in plan.layers} == {0.6}


def test_a_profiled_alpha_below_the_floor_streams_the_job():
    """A job whose balanced α is below MIN_ALPHA is streamed (α = 0); a forced α is kept however small."""
    from hetegen_fx.costs import job_alpha
    from hetegen_fx.passes.placement import MIN_ALPHA

    gm = _profiled(
        torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    )
    # a prefill-like cost: the CPU 30× slower than the copy, so the balanced α is about 0.03
    cost = LinearCost(t_cpu=30e-3, t_copy=1e-3, t_gpu=0.0, source="measured")
    assert 0 < job_alpha([cost]) < MIN_ALPHA
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta:
            n.meta[meta.COST] = n.meta[meta.DECODE_COST] = cost
    _, plan, _ = _place(gm, _config(gpu_memory=20_000, job_overhead=0.0))
    assert [(lp.resident, lp.alpha, lp.split) for lp in plan.layers] == [(False, 0.0, 0)] * 2
    _, plan, _ = _place(gm, _config(gpu_memory=20_000, alpha=0.02))
    assert [lp.alpha for lp in plan.layers] == [0.02] * 2


def test_the_job_overhead_comes_from_the_profiles_hardware_model():
    """Without ``Config.job_overhead``, H is the job overhead of the hardware model ProfilePass used: a
    second per job outweighs every GEMV, so every offloaded Linear is streamed; the device's default
    (0 on "cpu") splits them."""
    from hetegen_fx.costs import HardwareModel

    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    plans = {}
    for h in (0.0, 1.0):
        hw = HardwareModel(
            cpu_bw=50e9, cpu_flops=1e12, h2d_bw=50e9, gpu_bw=1e12, gpu_flops=1e14, job_overhead=h
        )
        gm = capture_fx(model)
        ProfilePass(Config(device="cpu", profile="model"), hardware=hw)(gm)
        assert gm.meta[meta.HARDWARE] is hw
        _, plans[h], _ = _place(gm, _config(gpu_memory=20_000))
    assert all(not lp.resident and lp.alpha > 0 for lp in plans[0.0].layers), plans[0.0].table()
    assert [(lp.resident, lp.alpha) for lp in plans[1.0].layers] == [(False, 0.0)] * 2


def test_a_later_graph_whose_staging_does_not_fit_is_reported(mlp):
    """Residency is chosen with the first graph. A later graph of the same model whose GPU parts are larger
    (here α 0 against 0.5: whole weights streamed) needs a larger staging arena; where that goes over the
    budget a warning says by how much and what to change; a later graph like the first raises none."""
    import warnings

    store = WeightStore(torch.device("cpu"))
    model = mlp(bias=False)
    _, first, _ = _place(_profiled(model), _config(gpu_memory=17500, alpha=0.5), store)
    assert any(not lp.resident for lp in first.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again, _ = _place(_profiled(model), _config(gpu_memory=17500, alpha=0.5), store)
    assert again.reserved["staging"] == first.reserved["staging"]
    with pytest.warns(RuntimeWarning, match=r"staging arena .* over gpu_memory .* Raise gpu_memory by"):
        _place(_profiled(model), _config(gpu_memory=17500, alpha=0.0), store)


def test_a_later_graph_that_reads_a_host_table_on_the_device_reserves_it():
    """Residency and reserves come from the model's first graph. A later graph that keeps the table on the
    device (here it also sums it; in practice a graph break) must count it, and say when that overshoots."""

    class Lookup(torch.nn.Module):
        def __init__(self, emb, head):
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, ids):
            return self.head(self.emb(ids))

    class LookupAndSum(Lookup):
        def forward(self, ids):
            return self.head(self.emb(ids)) + self.emb.weight.sum()

    emb, head = torch.nn.Embedding(500, 16), torch.nn.Linear(16, 64, bias=False)
    ids = torch.randint(0, 500, (1, 4))
    store = WeightStore(torch.device("cpu"))
    table = 500 * 16 * 4
    first = capture_fx(Lookup(emb, head))
    ProfilePass(Config(device="cpu", profile="model"), [ids])(first)
    _, plan, _ = _place(first, _config(gpu_memory=8000), store)
    assert plan.host_tables == ["emb.weight"] and plan.reserved["other_params"] == 0
    later = capture_fx(LookupAndSum(emb, head))
    ProfilePass(Config(device="cpu", profile="model"), [ids])(later)
    with pytest.warns(RuntimeWarning, match="of other parameters"):
        _, plan2, _ = _place(later, _config(gpu_memory=8000), store)
    assert plan2.host_tables == [] and plan2.reserved["other_params"] == table


def test_allocated_bytes_follows_the_cuda_caching_allocator():
    """Resident weights are counted as the allocator holds them: a 13B MLP weight (5120 × 13824 fp16, 135 MiB)
    gets a 136 MiB segment that is not split (1 MiB left over), so a 10 GiB plan that counted 135 went 40 MiB
    over the budget on the H100."""
    from hetegen_fx.passes.placement import allocated_bytes

    mib = 1 << 20
    assert allocated_bytes(5120 * 13824 * 2) == 136 * mib
    assert allocated_bytes(5120 * 5120 * 2) == 50 * mib  # a whole number of 2 MiB: as it is
    assert allocated_bytes(4096 * 11008 * 2) == 86 * mib
    assert allocated_bytes(11 * mib + 512) == 12 * mib  # 12 MiB segment, 1 MiB - 512 B left: not split
    assert allocated_bytes(12 * mib + mib // 2) == 12 * mib + mib // 2  # 14 MiB segment, split
    assert allocated_bytes(3 * mib + 1) == 3 * mib + 512  # from a 20 MiB segment, split
    assert allocated_bytes(1000) == 1024
    assert allocated_bytes(5120 * 13824 * 2, "cpu") == 5120 * 13824 * 2


class _TwoLayers(torch.nn.Module):
    """Two Llama-like layers, each an attention-like job (q, k read x) and an MLP-like job (g, u read h)
    with no down projection (in the 7B at 6 GiB every down_proj is resident)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.d = d
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "q": torch.nn.Linear(d, d, bias=False),
                    "k": torch.nn.Linear(d, d, bias=False),
                    "g": torch.nn.Linear(d, 2 * d, bias=False),
                    "u": torch.nn.Linear(d, 2 * d, bias=False),
                }
            )
            for _ in range(2)
        )

    def forward(self, x):
        for m in self.layers:
            x = x + m["q"](x) * m["k"](x)
            y = torch.nn.functional.silu(m["g"](x)) * m["u"](x)
            x = x + y[..., : self.d] + y[..., self.d :]
        return x


# decode costs in the proportions of the 7B on the H100 host (ms → s): a q/k job is the smaller
_LLAMA_COSTS = {
    "q": LinearCost(t_cpu=0.40e-3, t_copy=0.87e-3, t_gpu=0.01e-3, source="measured", t_cpu_fixed=0.02e-3),
    "g": LinearCost(t_cpu=0.71e-3, t_copy=1.56e-3, t_gpu=0.02e-3, source="measured", t_cpu_fixed=0.02e-3),
}


def _two_layers(tokens: int = 1):
    gm = _profiled(_TwoLayers().eval())
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta:
            kind = n.meta[meta.LINEAR].name.split(".")[-2]
            n.meta[meta.COST] = n.meta[meta.DECODE_COST] = _LLAMA_COSTS["q" if kind in ("q", "k") else "g"]
            n.meta[meta.TOKENS] = tokens
    return gm


def _by_kind(plan: Plan) -> dict[str, LayerPlan]:
    return {".".join(lp.name.split(".")[1:3]): lp for lp in plan.layers}


def test_a_job_is_streamed_into_the_segment_of_the_job_before_it():
    """With a job overhead H, the q/k job of layer 1 costs more as a job of its own than its copies cost
    beside the CPU part of layer 0's g/u job: it is streamed (α = 0) and the g/u job's α rises to the
    segment's (segment_alpha with the q/k copies). Layer 0's q/k job is the first: it stays a job. Without
    stream_jobs, or with a forced α, every job keeps its own α."""
    from hetegen_fx.costs import job_alpha, segment_alpha

    h = 0.3e-3
    gm = _two_layers()
    budget = 36_000  # everything offloaded (the arena takes 24 KiB, the smallest Linear 16), room for 32 KiB
    _, plan, _ = _place(gm, _config(gpu_memory=budget, job_overhead=h, prefetch=None))
    _, apart, _ = _place(
        _two_layers(), _config(gpu_memory=budget, job_overhead=h, prefetch=None, stream_jobs=False)
    )
    assert not _resident(plan) and not _resident(apart)
    by, alone = _by_kind(plan), _by_kind(apart)
    q, g = _LLAMA_COSTS["q"], _LLAMA_COSTS["g"]
    assert alone["1.q"].alpha == alone["1.k"].alpha == pytest.approx(job_alpha([q, q], h))
    assert alone["1.q"].alpha > 0
    assert alone["0.g"].alpha == pytest.approx(job_alpha([g, g], h))
    # layer 1's q/k job goes into layer 0's g/u segment; layer 1's g/u job is the last head
    assert (by["1.q"].alpha, by["1.q"].split, by["1.k"].split) == (0.0, 0, 0)
    # the plan says where they went, in its table and through JSON
    assert by["1.q"].segment == by["1.k"].segment == "layers.0.g.weight"
    assert not any(by[k].segment for k in ("0.q", "0.k", "0.g", "0.u", "1.g", "1.u"))
    assert not any(lp.segment for lp in apart.layers)
    assert "2 of them streamed beside the CPU job before them" in plan.table()
    assert [row.split()[1] for row in plan.table().splitlines()[2:10]].count("segment") == 2
    assert Plan.from_json(plan.to_json()).layers == plan.layers
    streamed = 2 * (q.t_copy + q.t_gpu)
    assert by["0.g"].alpha == by["0.u"].alpha == pytest.approx(segment_alpha([g, g], h, streamed)[0])
    assert by["0.g"].alpha > alone["0.g"].alpha
    assert by["0.q"].alpha == pytest.approx(alone["0.q"].alpha)
    assert by["1.g"].alpha == pytest.approx(alone["1.g"].alpha)
    assert by["0.q"].alpha > 0 and by["1.g"].alpha > 0
    for lp in plan.layers:
        assert lp.split == split_row(lp.alpha, lp.out_features)
    # the lane model: the segment is shorter than the two jobs apart
    assert segment_alpha([g, g], h, streamed)[1] < segment_alpha([g, g], h)[1] + segment_alpha([q, q], h)[1]
    # without the overhead two balanced jobs are never longer than one segment: nothing is streamed
    _, plan, _ = _place(_two_layers(), _config(gpu_memory=budget, job_overhead=0.0, prefetch=None))
    assert all(lp.split > 0 for lp in plan.layers)
    _, plan, _ = _place(_two_layers(), _config(gpu_memory=budget, job_overhead=h, alpha=0.5, prefetch=None))
    assert {lp.alpha for lp in plan.layers if not lp.resident} == {0.5}


def test_the_gap_between_jobs_counts_for_streaming_a_job():
    """What a job fewer saves: the hardware model's job_gap (the device's work between two jobs, measured on
    the H100 host), of which H is a part. With H alone too small for the merge to pay, the gap makes it pay."""
    import dataclasses

    from hetegen_fx.costs import CUDA_HOST

    def place(gap: float) -> dict[str, LayerPlan]:
        gm = _two_layers()
        gm.meta[meta.HARDWARE] = dataclasses.replace(CUDA_HOST, job_gap=gap)
        return _by_kind(_place(gm, _config(gpu_memory=36_000, job_overhead=0.1e-3, prefetch=None))[1])

    assert place(0.0)["1.q"].split > 0
    assert place(0.27e-3)["1.q"].split == 0
    assert CUDA_HOST.job_gap > CUDA_HOST.job_overhead


class _HeadAndTwo(torch.nn.Module):
    """A g/u job followed by two small jobs of one Linear each (a reads h, b reads a's output)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.d = d
        self.g = torch.nn.Linear(d, 2 * d, bias=False)
        self.u = torch.nn.Linear(d, 2 * d, bias=False)
        self.a = torch.nn.Linear(d, d, bias=False)
        self.b = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        y = torch.nn.functional.silu(self.g(x)) * self.u(x)
        return self.b(self.a(y[..., : self.d] + y[..., self.d :]))


def test_a_segment_takes_every_job_its_head_can_cover():
    """Two small jobs after a g/u job both go into its segment: the head's α covers the copies of both."""
    from hetegen_fx.costs import segment_alpha

    h = 0.15e-3
    small = LinearCost(t_cpu=0.4e-3, t_copy=0.79e-3, t_gpu=0.01e-3, source="measured", t_cpu_fixed=0.01e-3)
    g = _LLAMA_COSTS["g"]
    gm = _profiled(_HeadAndTwo().eval())
    for n in gm.graph.nodes:
        if meta.LINEAR in n.meta:
            name = n.meta[meta.LINEAR].name
            n.meta[meta.COST] = n.meta[meta.DECODE_COST] = g if name[0] in "gu" else small
    plan = _place(gm, _config(gpu_memory=36_000, job_overhead=h, prefetch=None))[1]
    by = {lp.name[0]: lp for lp in plan.layers}
    assert not _resident(plan)
    assert by["a"].split == by["b"].split == 0
    streamed = 2 * (small.t_copy + small.t_gpu)
    assert by["g"].alpha == by["u"].alpha == pytest.approx(segment_alpha([g, g], h, streamed)[0])
    assert segment_alpha([g, g], h, streamed)[0] > segment_alpha([g, g], h, streamed / 2)[0]


def test_prefill_shapes_keep_one_alpha_per_job():
    """Beyond GEMV shapes (a prefill) the CPU parts are compute-bound GEMMs and no job is streamed."""
    from hetegen_fx.kernels import GEMV_ROWS

    h = 0.3e-3
    plans = [
        _place(
            _two_layers(GEMV_ROWS + 1),
            _config(gpu_memory=36_000, job_overhead=h, prefetch=None, stream_jobs=s),
        )[1]
        for s in (True, False)
    ]
    assert [(lp.alpha, lp.split) for lp in plans[0].layers] == [
        (lp.alpha, lp.split) for lp in plans[1].layers
    ]
    assert all(lp.split > 0 for lp in plans[0].layers)


def test_streaming_a_job_never_grows_the_staging_arena_past_the_budget():
    """A streamed job's GPU parts are whole Linears, larger than split ones: the staging arena (two consecutive
    parts and a largest one at prefetch=2) grows with them. Where the budget leaves no room for that, the plan
    stays the per-job one, α and all."""
    h = 0.3e-3

    def plan(budget: int, stream: bool = True) -> Plan:
        return _place(
            _two_layers(), _config(gpu_memory=budget, job_overhead=h, prefetch=2, stream_jobs=stream)
        )[1]

    tight, apart = plan(40_000), plan(40_000, stream=False)
    assert not _resident(tight) and not _resident(apart)
    assert [(lp.alpha, lp.split) for lp in tight.layers] == [(lp.alpha, lp.split) for lp in apart.layers]
    assert tight.reserved["staging"] == apart.reserved["staging"] <= 40_000
    roomy = plan(50_000)
    assert not _resident(roomy)
    assert _by_kind(roomy)["1.q"].split == 0
    assert apart.reserved["staging"] < roomy.reserved["staging"] <= 50_000


def test_a_job_whose_copies_cannot_all_be_in_flight_is_not_streamed():
    """At prefetch=1 the arena holds one GPU part: of a streamed q/k job only q's copy could run beside the
    head's CPU part, so the job stays a job; at prefetch=2 both fit and it is streamed."""
    h = 0.3e-3
    one = _place(_two_layers(), _config(gpu_memory=28_000, job_overhead=h, prefetch=1))[1]
    apart = _place(_two_layers(), _config(gpu_memory=28_000, job_overhead=h, prefetch=1, stream_jobs=False))[
        1
    ]
    assert not _resident(one)
    assert [(lp.alpha, lp.split) for lp in one.layers] == [(lp.alpha, lp.split) for lp in apart.layers]
    two = _place(_two_layers(), _config(gpu_memory=50_000, job_overhead=h, prefetch=2))[1]
    assert _by_kind(two)["1.q"].split == 0


def test_a_plan_with_streamed_jobs_runs_like_eager_with_fewer_cpu_jobs(count):
    """The segment plan compiles and runs (emulated device) with one CPU job fewer than the per-job plan, and
    both match eager on fresh random inputs."""
    import hetegen_fx

    model = _TwoLayers().eval()
    outs, jobs = {}, {}
    x = torch.randn(1, 1, 64)
    for stream in (True, False):
        gm = capture_fx(model)
        ProfilePass(Config(device="cpu", profile="model"))(gm)
        for n in gm.graph.nodes:
            if meta.LINEAR in n.meta:
                kind = n.meta[meta.LINEAR].name.split(".")[-2]
                n.meta[meta.COST] = n.meta[meta.DECODE_COST] = _LLAMA_COSTS[
                    "q" if kind in ("q", "k") else "g"
                ]
        _, plan, _ = _place(
            gm, _config(gpu_memory=36_000, job_overhead=0.3e-3, prefetch=None, stream_jobs=stream)
        )
        compiled = hetegen_fx.compile(model, device="cpu", plan=plan, prefetch=None)
        jobs[stream] = count(compiled.graph_module, "cpu_begin")
        with torch.no_grad():
            outs[stream] = compiled(x)
            torch.testing.assert_close(outs[stream], model(x), rtol=1e-5, atol=1e-5)
    assert (jobs[True], jobs[False]) == (3, 4)


@pytest.mark.parametrize("block_jobs", [False, True])
def test_a_weight_used_twice_shares_each_job_it_is_in(block_jobs):
    """``c`` shares its CPU job with the first use of ``a`` (both read ``x``): half the job overhead each, with
    or without ``block_jobs`` (no MLP block here: ``a``'s weight is used twice)."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(32, 32, bias=False)
            self.c = torch.nn.Linear(32, 32, bias=False)

        def forward(self, x):
            return self.a(torch.relu(self.c(x) + self.a(x)))

    h, t = 150e-6, 1e-3
    gm = _profiled(Twice(), {"a.weight": t, "c.weight": t})
    sites = [n.meta[meta.LINEAR] for n in gm.graph.nodes if meta.LINEAR in n.meta]
    placement = PlacementPass(
        _config(alpha=0.5, job_overhead=h, block_jobs=block_jobs), WeightStore(torch.device("cpu"))
    )
    g = placement._priority(sites, placement._blocks(gm, sites))
    nbytes = 32 * 32 * 4
    assert g["c.weight"] == pytest.approx(t / nbytes + h / 2 / nbytes)
