"""The torch.compile backend "hetegen": found through its entry point, options, and eager fallback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import hetegen_fx
import hetegen_fx.backend as backend_mod
from hetegen_fx.capture import dynamo_param_name
from hetegen_fx.errors import BudgetError, ConfigError

FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    assert "hetegen_fx" not in sys.modules
    assert "hetegen" in torch._dynamo.list_backends()
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    lin = torch.nn.Linear(16, 8)
    nbytes = sum(p.numel() * p.element_size() for p in seq.parameters())
    options = {"device": "cpu", "gpu_memory": int(nbytes * 0.6), "profile": "model", "alpha": 0.5,
               "activation_reserve": 0, "prefetch": 1}
    module = torch.compile(seq, backend="hetegen", options=options)

    def fn(x):
        return torch.tanh(lin(x)) * 3

    compiled_fn = torch.compile(fn, backend="hetegen", options={"device": "cpu", "alpha": 1.0})
    errors = []
    with torch.no_grad():
        for shape in ((4, 32), (2, 3, 32)):
            x = torch.randn(shape)
            errors.append((module(x) - seq(x)).abs().max().item())
        y = torch.randn(5, 16)
        errors.append((compiled_fn(y) - fn(y)).abs().max().item())
    import hetegen_fx  # already loaded by dynamo through the entry point
    ex = hetegen_fx.explain(seq)
    print(json.dumps({
        "loaded": "hetegen_fx.backend" in sys.modules,
        "errors": errors,
        "graphs": len(ex.plans),
        "offloaded": [lp.name for lp in ex.plans[0].layers if not lp.resident],
        "alphas": [lp.split / lp.out_features for lp in ex.plans[0].layers if not lp.resident],
        "copies": ex.codes[0].count("hetegen.copy_h2d"),
        "fn_layers": [lp.name for lp in hetegen_fx.explain(lin).plans[0].layers],
    }))
    """
)


def test_entry_point_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"]
    assert max(result["errors"]) < 1e-5, result
    assert result["graphs"] >= 1 and result["offloaded"] and result["copies"] >= 1
    assert all(a == 0.5 for a in result["alphas"])
    assert result["fn_layers"] == ["lin.weight"]  # a global module used by a compiled function


@pytest.mark.parametrize(
    ("placeholder", "name"),
    [
        (
            "L_self_modules_model_modules_layers_modules_0_modules_mlp_modules_up_proj_parameters_weight_",
            "model.layers.0.mlp.up_proj.weight",
        ),
        ("L_self_modules_lm_head_parameters_weight_", "lm_head.weight"),
        ("L_self_modules_model_modules_rotary_emb_buffers_inv_freq_", "model.rotary_emb.inv_freq"),
        ("G_lin_parameters_bias_", "lin.bias"),
        ("L_net_modules_0_parameters_weight_", "net.0.weight"),
        (  # a compiled module reached as a wrapper's first argument (torch 2.13, transformers 5.25)
            "L_args_0_modules_model_modules_embed_tokens_parameters_weight_",
            "model.embed_tokens.weight",
        ),
    ],
)
def test_dynamo_param_names(placeholder, name):
    assert dynamo_param_name(placeholder) == name


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()


def test_unknown_option_raises():
    f = torch.compile(_mlp(), backend="hetegen", options={"device": "cpu", "gpu_memroy": "1GiB"})
    with pytest.raises(Exception, match=r"unknown hetegen option\(s\) \['gpu_memroy'\]") as exc:
        f(torch.randn(2, 32))
    assert "known options are:" in str(exc.value) and "gpu_memory" in str(exc.value)
    inner = getattr(exc.value, "inner_exception", exc.value)
    assert isinstance(inner, ConfigError)


def test_budget_error_is_not_hidden_by_the_fallback():
    f = torch.compile(_mlp(), backend="hetegen", options={"device": "cpu", "gpu_memory": 100, "alpha": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback either
        with pytest.raises(Exception, match="below the minimum working set") as exc:
            f(torch.randn(2, 32))
    assert isinstance(getattr(exc.value, "inner_exception", exc.value), BudgetError)


def _two_graphs(model):
    def fn(x):
        h = model[0](x)
        torch._dynamo.graph_break()
        return model[2](torch.nn.functional.gelu(h))

    return fn


def _count_fallbacks(record) -> list[warnings.WarningMessage]:
    return [
        w for w in record if issubclass(w.category, RuntimeWarning) and "running it eagerly" in str(w.message)
    ]


def test_unexpected_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    import hetegen_fx.pipeline as pipeline_mod

    model = _mlp()
    calls = []

    def broken_transform(*args, **kwargs):
        calls.append(1)
        raise KeyError("unexpected node")  # not a HetegenError: a bug in a pass, or an unknown graph

    monkeypatch.setattr(pipeline_mod, "transform", broken_transform)  # what launch.build runs
    monkeypatch.setattr(backend_mod, "_warned", set())
    fn = _two_graphs(model)
    f = torch.compile(fn, backend="hetegen", options={"device": "cpu"})
    x = torch.randn(3, 32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = f(x)
            out2 = f(x)
    assert len(calls) == 2  # both graphs were tried
    fallbacks = _count_fallbacks(record)
    assert len(fallbacks) == 1, [str(w.message) for w in record]
    assert "KeyError" in str(fallbacks[0].message)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(out2, out)


def test_integer_graph_falls_back_to_eager(monkeypatch):
    """A realistic graph the backend cannot split (integer weights): it runs eagerly, with one warning."""

    class IntLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randint(-3, 3, (4, 6)), requires_grad=False)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w) + 1

    monkeypatch.setattr(backend_mod, "_warned", set())
    model = IntLinear()
    f = torch.compile(model, backend="hetegen", options={"device": "cpu"})
    x = torch.randint(-3, 3, (2, 6))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = f(x)
    fallbacks = _count_fallbacks(record)
    assert len(fallbacks) == 1 and "cannot compile this graph" in str(fallbacks[0].message)
    assert torch.equal(out, model(x))


def test_graphs_of_one_model_share_one_store():
    model = _mlp()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    options = {
        "device": "cpu",
        "gpu_memory": int(nbytes * 0.6),
        "profile": "model",
        "activation_reserve": 0,
        "prefetch": 1,
    }
    f = torch.compile(model, backend="hetegen", options=options, dynamic=False)
    with torch.no_grad():
        for n in (2, 5):  # two shapes: two graphs
            x = torch.randn(n, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
    plans = hetegen_fx.explain(model).plans
    assert len(plans) == 2 and [p.tokens for p in plans] == [2, 5]
    residency = [[lp.resident for lp in p.layers] for p in plans]
    assert residency[0] == residency[1] and not all(residency[0])  # placed once, shared


def test_an_encoder_reserves_no_kv_cache_and_compiles_at_40_percent_of_its_bytes():
    """A BERT-style encoder computes its keys and drops them after each layer: no KV cache to reserve (it
    was refused before for a 'kv_cache' of the default 2048 tokens)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
    )
    model = BertModel(cfg).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        fn = torch.compile(
            model, backend="hetegen", options={"gpu_memory": int(nbytes * 0.4), "device": "cpu"}
        )
        out = fn(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    plan = hetegen_fx.explain(model).plans[-1]
    assert plan.reserved["kv_cache"] == 0
    assert any(not lp.resident for lp in plan.layers)


def test_a_decoder_called_without_a_cache_reserves_none(tiny_hf, dynamo_capture):
    from hetegen_fx.passes.placement import kv_cache_bytes_per_token

    model = tiny_hf("llama")
    ids = torch.randint(0, 128, (1, 6))
    without, _ = dynamo_capture(lambda i: model(input_ids=i, use_cache=False).logits, ids)
    with_cache, _ = dynamo_capture(lambda i: model(input_ids=i, use_cache=True), ids)
    assert kv_cache_bytes_per_token(without) == 0
    c = model.config
    assert kv_cache_bytes_per_token(with_cache) == (
        c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    )
