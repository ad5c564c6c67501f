"""hetegen_fx.compile / explain on plain modules (fx and export frontends), and what the API refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hetegen_fx
from hetegen_fx import (
    BudgetError,
    CaptureError,
    CompiledModule,
    Config,
    ConfigError,
    UnsupportedModelError,
    format_bytes,
    parse_bytes,
)


class Net(nn.Module):
    """An MLP block with a norm and a residual: Linears of three shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 96)
        self.gate = nn.Linear(32, 96, bias=False)
        self.down = nn.Linear(96, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(h)


class Untraceable(Net):
    """Python control flow on a shape: fx cannot trace it (a Proxy has no truth value), export can."""

    def forward(self, x):
        if x.shape[-1] != 32:
            raise ValueError("expected 32 features")
        return super().forward(x)


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


OPTS = {"device": "cpu", "profile": "model", "activation_reserve": 0, "prefetch": 1}


def _offloaded(plan):
    return [lp for lp in plan.layers if not lp.resident]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, None])
def test_fx_frontend_matches_eager(alpha):
    model = Net().eval()
    compiled = hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.6), alpha=alpha, **OPTS)
    assert isinstance(compiled, CompiledModule) and compiled.frontend == "fx"
    off = _offloaded(compiled.plan)
    assert off and any(lp.resident for lp in compiled.plan.layers)
    if alpha is None:
        assert all(0 < lp.split < lp.out_features for lp in off)  # profiled α strictly inside (0, 1)
    else:
        assert all(lp.split == round(alpha * lp.out_features) for lp in off)
    code = compiled.code
    assert ("hetegen.copy_h2d" in code) == (alpha != 1.0)
    assert ("torch.cat" in code) == (alpha not in (0.0, 1.0))
    for shape in ((4, 32), (2, 5, 32)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_frontend_with_dynamic_sequence():
    model = Untraceable().eval()
    x = torch.randn(2, 6, 32)
    compiled = hetegen_fx.compile(model, (x,), gpu_memory=int(_nbytes(model) * 0.6), alpha=0.5, **OPTS)
    assert compiled.frontend == "export"  # "auto" tried fx first, which cannot trace it
    assert _offloaded(compiled.plan) and compiled.plan.tokens == 12
    for seq in (1, 6, 11):
        x = torch.randn(2, seq, 32)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_explicit_export_frontend_on_a_traceable_model():
    model = Net().eval()
    compiled = hetegen_fx.compile(model, [torch.randn(1, 3, 32)], frontend="export", gpu_memory=10**9, **OPTS)
    assert compiled.frontend == "export" and not _offloaded(compiled.plan)
    x = torch.randn(1, 9, 32)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_explain():
    model = Net().eval()
    compiled = hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.6), alpha=0.5, **OPTS)
    ex = hetegen_fx.explain(compiled)
    assert ex.plans == [compiled.plan] and ex.codes == [compiled.code]
    assert ex.labels == ["Net (fx)"]
    text = str(ex)
    assert text.startswith("=== Net (fx) ===")
    for lp in compiled.plan.layers:
        assert lp.name in text
    assert "hetegen.copy_h2d" in text and "offload" in text and "resident" in text
    # a model that was never compiled
    with pytest.raises(ConfigError, match="not compiled by hetegen_fx"):
        hetegen_fx.explain(Net())


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: id(p) for k, p in model.named_parameters()},
        {k: p.data_ptr() for k, p in model.named_parameters()},
        dict(vars(model)).keys(),
    )


def _assert_untouched(model, snap):
    state, ids, ptrs, attrs = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs
    assert "forward" not in vars(model) and type(model).forward is Net.forward
    assert dict(vars(model)).keys() == attrs
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_model_untouched_after_success():
    model = Net().eval()
    snap = _snapshot(model)
    x = torch.randn(3, 32)
    ref = model(x)
    compiled = hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.6), alpha=0.5, **OPTS)
    compiled(x)
    _assert_untouched(model, snap)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"gpu_memory": 1}, BudgetError),
        (
            {"plan": {"format_version": 1, "device": "cpu", "gpu_memory": 1, "tokens": 1, "layers": []}},
            ConfigError,
        ),
    ],
)
def test_model_untouched_after_failure(options, error):
    model = Net().eval()
    snap = _snapshot(model)
    with pytest.raises(error):
        hetegen_fx.compile(model, **{**OPTS, **options})
    _assert_untouched(model, snap)


def test_uncapturable_model_names_the_frontends():
    with pytest.raises(CaptureError) as exc:
        hetegen_fx.compile(Untraceable().eval(), **OPTS)
    msg = str(exc.value)
    assert "frontend 'fx'" in msg and "example_inputs" in msg
    with pytest.raises(CaptureError, match="frontend 'export' needs example inputs"):
        hetegen_fx.compile(Untraceable().eval(), frontend="export", **OPTS)
    with pytest.raises(CaptureError, match="frontend 'fx'") as exc:
        hetegen_fx.compile(Untraceable().eval(), frontend="fx", **OPTS)
    assert "export" not in str(exc.value).split("frontend 'fx'")[0]


def test_budget_below_minimum():
    model = Net().eval()
    # α = 0, room for one part: the largest Linear (up, 96x32 + 96 floats = 12672 B, rounded up to the
    # staging arena's 256-byte alignment) + the other params
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("norm"))
    minimum = 12800 + other
    with pytest.raises(BudgetError) as exc:
        hetegen_fx.compile(model, gpu_memory=minimum - 1, alpha=0.0, **OPTS)
    assert f"({minimum} bytes" in str(exc.value) and format_bytes(minimum) in str(exc.value)
    compiled = hetegen_fx.compile(model, gpu_memory=minimum, alpha=0.0, **OPTS)
    x = torch.randn(2, 32)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_integer_weights_are_unsupported():
    model = Net().eval()
    model.head.weight = nn.Parameter(torch.ones(10, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"head\.weight is torch\.int8"):
        hetegen_fx.compile(model, **OPTS)


def test_unknown_options_list_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        hetegen_fx.compile(Net(), gpu_memroy="1GiB", device="cpu")
    msg = str(exc.value)
    assert "gpu_memroy" in msg
    for known in ("gpu_memory", "device", "alpha", "prefetch", "plan", "max_seq_len"):
        assert known in msg
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        hetegen_fx.compile(lambda x: x, device="cpu")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"alpha": 1.5}, "alpha must be a CPU share in"),
        ({"prefetch": 0}, "prefetch"),
        ({"job_overhead": -1e-4}, "job_overhead must be seconds"),
        ({"job_overhead": 300}, "job_overhead must be seconds"),
        ({"frontend": "jit"}, "frontend must be one of"),
        ({"profile": "guess"}, "profile must be one of"),
        ({"device": "gpu0"}, "not a torch device"),
        ({"gpu_memory": "lots"}, "cannot read 'lots'"),
        ({"gpu_memory": -1}, "must be a finite, non-negative"),
        ({"batch_size": 0}, "batch_size"),
        ({"cudnn_attention": "yes"}, "cudnn_attention must be True, False or 'auto'"),
        ({"cudnn_attention": 1}, "cudnn_attention must be True, False or 'auto'"),
    ],
)
def test_bad_option_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("6 GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5gib", 3 * 2**29),
        ("8GB", 8 * 10**9),
        ("100kb", 100_000),
        ("2KiB", 2048),
        ("123", 123),
        (4096, 4096),
        (2.5e3, 2500),
        (None, None),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6 GiBs", "GiB", "-1GiB", "1e3", True, "six"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.00 KiB"
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert parse_bytes(format_bytes(6 * 2**30).replace(" ", "")) == 6 * 2**30


def test_cpu_threads_sets_the_workers_pool_and_leaves_the_callers_alone():
    """The worker applies ``cpu_threads``; compiling must not change the caller's setting (dynamo
    fails a trace during which the global thread count changed)."""
    from hetegen_fx.runtime import get_runtime

    before = torch.get_num_threads()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    host = get_runtime("cpu").host
    old = host.threads
    try:
        hetegen_fx.compile(m, (torch.randn(2, 8),), device="cpu", profile="model", cpu_threads=1)
        assert host.threads == 1
        assert torch.get_num_threads() == before
    finally:
        host.threads = old
    with pytest.raises(hetegen_fx.ConfigError, match="cpu_threads"):
        hetegen_fx.compile(m, device="cpu", cpu_threads=0)
