"""hetegen_fx.state: the public read-out of a compiled model (graphs, Plans, the memory ledger by category,
the CUDA-graph pool), through every way a model gets compiled, and the frozen Config."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import hetegen_fx
from hetegen_fx import Config, ConfigError, ModelState
from hetegen_fx.introspect import config_of, store_of


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)
    ).eval()


def _nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_state_of_a_compiled_module_is_its_plan_and_ledger():
    model = _mlp()
    compiled = hetegen_fx.compile(
        model, gpu_memory=int(_nbytes(model) * 0.5), device="cpu", profile="model", prefetch=1
    )
    st = hetegen_fx.state(compiled)
    assert isinstance(st, ModelState) and st.device == torch.device("cpu")
    assert st.config is config_of(compiled) and st.config.gpu_memory == int(_nbytes(model) * 0.5)
    assert [g.graph_module for g in st.graphs] == [compiled.graph_module]
    assert st.plans == [compiled.plan] and st.decode_plan is compiled.plan
    plan = compiled.plan
    assert st.memory["resident_weights"] == plan.resident_bytes > 0
    assert {k: v for k, v in st.memory.items() if k != "resident_weights"} == plan.reserved
    assert st.budget == plan.gpu_memory
    # the ledger of the plan stays within the budget it was placed under
    assert sum(st.memory.values()) <= st.budget
    assert st.allocated["weights"] == 0  # the emulated device keeps weights in place
    assert st.cuda_graphs is None
    text = str(st)
    assert "1 graph(s) on cpu" in text and "resident_weights" in text and "budget" in text
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), model(x))


def test_state_of_an_hf_copy_lists_prefill_and_decode_and_the_kv_cache(tiny_hf):
    model = tiny_hf("llama")
    compiled = hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.6), device="cpu", max_seq_len=32)
    empty = hetegen_fx.state(compiled)
    assert empty.graphs == [] and empty.decode_plan is None and empty.memory == {}
    assert "nothing compiled yet" in str(empty)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = compiled.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))
    st = hetegen_fx.state(compiled)
    assert len(st.graphs) >= 2 and {p.tokens for p in st.plans} >= {1, 6}
    assert st.decode_plan.tokens == 1 and st.memory["kv_cache"] > 0
    # the API's decisions for an HF model are in the Config it kept: a new one, the user's options kept
    assert st.config.output_device == "auto" and st.config.max_seq_len == 32
    assert hetegen_fx.explain(compiled).plans == st.plans
    assert config_of(model) is None  # the original model is not registered


def test_state_through_the_torch_compile_backend_has_no_config(tiny_hf):
    model = tiny_hf("llama")
    model.compile(backend="hetegen", options={"device": "cpu", "max_seq_len": 32})
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
    st = hetegen_fx.state(model)
    assert st.config is None and len(st.graphs) >= 1


def test_state_with_emulated_cuda_graphs_reports_the_pool(tiny_hf):
    model = tiny_hf("llama")
    compiled = hetegen_fx.compile(
        model,
        gpu_memory=int(_nbytes(model) * 0.6) + (1 << 20),  # the pool's MiB on top
        device="cpu",
        max_seq_len=32,
        profile="model",
        cuda_graphs=True,
        graph_memory="1MiB",
    )
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        for _ in range(2):
            compiled.generate(ids, **kw)
    st = hetegen_fx.state(compiled)
    assert st.memory["cuda_graphs"] == 1 << 20
    assert st.cuda_graphs is not None and st.cuda_graphs["recorded"] > 0, st.cuda_graphs
    assert "CUDA graphs:" in str(st)


@pytest.mark.parametrize("thing", [nn.Linear(4, 4), "not a model", None])
def test_state_of_something_not_compiled_is_a_clear_error(thing):
    with pytest.raises(ConfigError, match="not compiled by hetegen_fx"):
        hetegen_fx.state(thing)


def test_the_registry_does_not_keep_a_compiled_model_alive():
    model = _mlp()
    compiled = hetegen_fx.compile(
        model, gpu_memory=int(_nbytes(model) * 0.5), device="cpu", profile="model", prefetch=1
    )
    store = weakref.ref(store_of(compiled))
    ref = weakref.ref(compiled)
    del compiled
    gc.collect()
    assert ref() is None
    assert store() is not None  # still registered for the model's parameters, until a fresh compile


def test_config_is_frozen_and_replace_checks_again():
    cfg = Config(gpu_memory="1MiB")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gpu_memory = 5  # type: ignore[misc]
    new = dataclasses.replace(cfg, max_seq_len=64, graph_memory="2MiB")
    assert (new.gpu_memory, new.max_seq_len, new.graph_memory) == (1 << 20, 64, 2 << 20)
    assert cfg.max_seq_len is None
    with pytest.raises(ConfigError, match="alpha"):
        dataclasses.replace(cfg, alpha=2.0)


def test_cli_turns_flags_into_compile_options_in_one_place():
    from hetegen_fx.cli import build_parser, compile_options

    parser = build_parser()
    gen = parser.parse_args(
        "generate --prompt hi --device cpu --gpu-memory 1MiB --alpha 0.25 --no-stream-jobs --cuda-graphs "
        "--graph-memory 64MiB --max-seq-len 128 --block-jobs".split()
    )
    assert compile_options(gen) == {
        "gpu_memory": "1MiB",
        "device": "cpu",
        "max_seq_len": 128,
        "verbose": False,
        "alpha": 0.25,
        "stream_jobs": False,
        "cuda_graphs": True,
        "graph_memory": "64MiB",
        "block_jobs": True,
    }
    plan = parser.parse_args("plan --device cpu --gpu-memory 2MiB --prefetch 2 --verbose".split())
    assert compile_options(plan) == {
        "gpu_memory": "2MiB",
        "device": "cpu",
        "max_seq_len": None,
        "verbose": True,
        "prefetch": 2,
    }
    for args in (gen, plan):  # every option is one hetegen_fx.compile takes
        Config.from_options(compile_options(args))
