import math
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from hetegen_fx.models import (
    ARCHS,
    PRESETS,
    build_random,
    family,
    kv_cache_bytes,
    max_positions,
    preset_config,
    tiny,
    tiny_config,
)

CLASS_NAMES = {
    "llama": "LlamaForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hf_reference(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_builds_real_architecture(arch: str) -> None:
    model = tiny(arch)
    assert type(model).__name__ == CLASS_NAMES[arch]
    assert not model.training
    assert family(model) == arch
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
        assert tensor.any(), name

    # Same structure as a normally initialised HF model: its state dict loads strictly and the
    # logits agree exactly (which also checks the recomputed rotary buffers).
    ref = _hf_reference(tiny_config(arch))
    ref.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, ref(ids).logits)
    assert logits.shape == (2, 12, 256)
    assert logits.std() > 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_by_seed(arch: str) -> None:
    assert _same_weights(tiny(arch, seed=3), tiny(arch, seed=3))
    a, b = tiny(arch, seed=0), tiny(arch, seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert not torch.equal(pa, pb), name


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(arch: str) -> None:
    model = tiny(arch)
    assert model.generation_config.pad_token_id is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert torch.equal(out[:, :4], ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype: torch.dtype) -> None:
    model = tiny("llama", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_tied_weights_and_padding_row() -> None:
    for arch in ("opt", "gpt2"):
        model = tiny(arch)
        assert model.lm_head.weight is model.get_input_embeddings().weight
    llama = tiny("llama")
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    emb = llama.model.embed_tokens
    assert emb.padding_idx == 0 and not emb.weight[0].any() and emb.weight[1:].any(dim=1).all()


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}),
        ("qwen2", {"rope_theta": 1e6}),
        ("mistral", {"head_dim": 32}),
    ],
)
def test_inv_freq_matches_hf(arch: str, overrides: dict) -> None:
    cfg = tiny_config(arch, **overrides)
    ours = build_random(cfg).model.rotary_emb
    ref = _hf_reference(cfg).model.rotary_emb
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    assert torch.equal(ours.original_inv_freq, ref.original_inv_freq)
    assert ours.inv_freq.dtype == torch.float32


def test_mid_size_llama_fast_and_well_scaled() -> None:
    start = time.perf_counter()
    model = build_random(
        "llama",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"build took {elapsed:.1f} s"
    layer = model.model.layers[0]
    for weight, fan_in in [
        (layer.self_attn.q_proj.weight, 1024),
        (layer.mlp.gate_proj.weight, 1024),
        (layer.mlp.down_proj.weight, 2816),
        (model.lm_head.weight, 1024),
    ]:
        bound = 1 / math.sqrt(fan_in)
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)
    norm = layer.input_layernorm.weight
    assert (norm - 1).abs().max() <= 0.02 and norm.std() > 0.005
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_config_input_and_overrides() -> None:
    cfg = tiny_config("gpt2")
    model = build_random(cfg, seed=7, n_layer=1)
    assert model.config.n_layer == 1 and cfg.n_layer == 2
    assert len(model.transformer.h) == 1
    assert build_random("tiny-opt").config.num_hidden_layers == 2


def test_unknown_arch_is_rejected() -> None:
    with pytest.raises(ValueError, match="llama, opt, gpt2, qwen2, mistral"):
        tiny_config("bert")
    with pytest.raises(ValueError, match="llama-2-7b"):
        build_random("nope")


def test_presets() -> None:
    assert {f"tiny-{arch}" for arch in ARCHS} | {"llama-2-7b", "llama-2-13b"} <= PRESETS.keys()
    for name, (arch, _) in PRESETS.items():
        cfg = preset_config(name)
        assert family(cfg) == arch, name
        assert kv_cache_bytes(cfg, 1, 1, torch.float16) > 0, name
        assert max_positions(cfg) is not None, name
    cfg = preset_config("llama-2-13b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        5120,
        13824,
        40,
        40,
    )


def test_kv_cache_bytes() -> None:
    cfg = preset_config("llama-2-7b")
    assert kv_cache_bytes(cfg, batch=1, seq_len=1, dtype=torch.float16) == 2 * 32 * 32 * 128 * 2 == 524288
    assert kv_cache_bytes(cfg, 4, 4096, torch.float16) == 524288 * 4 * 4096
    assert kv_cache_bytes(preset_config("llama-2-70b"), 1, 1, torch.float16) == 2 * 80 * 8 * 128 * 2
    assert kv_cache_bytes(tiny_config("llama"), 1, 10, torch.float32) == 2 * 2 * 2 * 16 * 10 * 4
    # OPT and GPT-2 have no GQA; GPT-2 uses n_layer / n_head / n_embd.
    assert kv_cache_bytes(tiny_config("opt"), 1, 10, torch.float32) == 2 * 2 * 4 * 16 * 10 * 4
    assert kv_cache_bytes(tiny(arch="gpt2"), 2, 10, torch.float32) == 2 * 2 * 4 * 16 * 10 * 2 * 4
    assert kv_cache_bytes(object(), 1, 1, torch.float16) is None


def test_max_positions_and_family() -> None:
    assert max_positions(preset_config("llama-2-7b")) == 4096
    assert max_positions(tiny_config("gpt2", n_positions=512)) == 512
    assert max_positions(object()) is None
    assert family(preset_config("opt-13b")) == "opt"
    assert family(object()) == "unknown"


def test_import_is_cheap() -> None:
    code = (
        "import sys, torch, hetegen_fx.models; "
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'; "
        "assert not torch.cuda.is_initialized()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
