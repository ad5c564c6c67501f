"""Fast construction of real Hugging Face architectures with seeded random weights.

Models are built on the ``meta`` device (no allocation, no HF init), materialised with
``to_empty`` and then every parameter is filled in bulk, chunk by chunk, from generators
seeded by ``(seed, parameter name, chunk index)``.  On CPU the chunks are filled by a thread
pool, so a Llama-2-7B shape in fp16 takes seconds; the values do not depend on the number of
threads (they do depend on the device type, whose generators differ).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ARCHS = ("llama", "opt", "gpt2", "qwen2", "mistral")

EMBED_STD = 0.02
"""Standard deviation of token / position embeddings."""
NORM_NOISE = 0.02
"""Half-width of the uniform noise added to norm weights (around 1) and norm biases (around 0)."""
CHUNK = 1 << 22
"""Elements filled per generator; fixed so values are independent of the thread count."""

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_TINY_DECODER = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    **_TOKENS,
}
_TINY: dict[str, dict[str, Any]] = {
    "llama": _TINY_DECODER,
    "mistral": _TINY_DECODER,
    "qwen2": _TINY_DECODER,
    "opt": {
        "vocab_size": 256,
        "hidden_size": 64,
        "word_embed_proj_dim": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        **_TOKENS,
    },
    "gpt2": {
        "vocab_size": 256,
        "n_embd": 64,
        "n_inner": 128,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        **_TOKENS,
    },
}


def _llama2(hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _opt(hidden: int, ffn: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 50272,
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 2048,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", _llama2(4096, 11008, 32, 32, 32)),
    "llama-2-13b": ("llama", _llama2(5120, 13824, 40, 40, 40)),
    "llama-2-70b": ("llama", _llama2(8192, 28672, 80, 64, 8)),
    "opt-6.7b": ("opt", _opt(4096, 16384, 32, 32)),
    "opt-13b": ("opt", _opt(5120, 20480, 40, 40)),
    "opt-30b": ("opt", _opt(7168, 28672, 48, 56)),
    "mistral-7b": (
        "mistral",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "qwen2-7b": (
        "qwen2",
        {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "eos_token_id": 151643,
        },
    ),
    "gpt2-xl": (
        "gpt2",
        {"vocab_size": 50257, "n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024},
    ),
    **{f"tiny-{arch}": (arch, kwargs) for arch, kwargs in _TINY.items()},
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Tiny config (vocab 256, hidden 64, 2 layers, 4 heads, GQA 2 kv heads where supported)."""
    if arch not in _TINY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return _make_config(arch, {**_TINY[arch], **overrides})


def preset_config(name: str, **overrides: Any) -> PretrainedConfig:
    """Config of a named preset from ``PRESETS`` (e.g. ``"llama-2-7b"``), with overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    arch, kwargs = PRESETS[name]
    return _make_config(arch, {**kwargs, **overrides})


def _make_config(arch: str, kwargs: dict[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **kwargs)


def _resolve_config(arch_or_preset: str | PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    from transformers import PretrainedConfig

    if isinstance(arch_or_preset, PretrainedConfig):
        cfg = copy.deepcopy(arch_or_preset)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg
    if arch_or_preset in PRESETS:
        return preset_config(arch_or_preset, **overrides)
    if arch_or_preset in _TINY:
        return tiny_config(arch_or_preset, **overrides)
    raise ValueError(
        f"unknown architecture or preset {arch_or_preset!r}; "
        f"architectures: {', '.join(ARCHS)}; presets: {', '.join(PRESETS)}"
    )


def _init_spec(module: nn.Module, pname: str, param: torch.Tensor) -> tuple[str, float, float]:
    """``("uniform", low, high)`` or ``("normal", mean, std)`` for one direct parameter of ``module``."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Embedding):
        return ("normal", 0.0, EMBED_STD)
    if "Norm" in type(module).__name__:
        center = 1.0 if pname == "weight" else 0.0
        return ("uniform", center - NORM_NOISE, center + NORM_NOISE)
    if isinstance(module, Conv1D):  # GPT-2 stores weights as [in, out]
        fan_in = module.weight.shape[0]
    elif isinstance(module, nn.Linear):
        fan_in = module.in_features
    elif param.dim() >= 2:
        fan_in = math.prod(param.shape[1:])
    else:
        return ("uniform", -NORM_NOISE, NORM_NOISE)
    bound = 1.0 / math.sqrt(fan_in)
    return ("uniform", -bound, bound)


def _chunk_seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _fill_jobs(model: nn.Module, seed: int) -> list[tuple[torch.Tensor, int, tuple[str, float, float]]]:
    """(flat chunk, generator seed, init spec) for every distinct parameter of ``model``."""
    jobs = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            spec = _init_spec(module, pname, param)
            full_name = f"{mod_name}.{pname}" if mod_name else pname
            for index, chunk in enumerate(param.detach().view(-1).split(CHUNK)):
                jobs.append((chunk, _chunk_seed(seed, full_name, index), spec))
    return jobs


def _fill(job: tuple[torch.Tensor, int, tuple[str, float, float]]) -> None:
    chunk, chunk_seed, (kind, a, b) = job
    gen = torch.Generator(device=chunk.device).manual_seed(chunk_seed)
    if kind == "normal":
        chunk.normal_(a, b, generator=gen)
    else:
        chunk.uniform_(a, b, generator=gen)


@torch.no_grad()
def init_buffers(model: PreTrainedModel) -> None:
    """Zero every buffer, then let HF recompute the ones it derives (rotary ``inv_freq`` ...)."""
    for module in model.modules():
        buffers = list(module.buffers(recurse=False))
        for buf in buffers:
            buf.zero_()
        if buffers:
            model._init_weights(module)


@torch.no_grad()
def _check(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        low, high = (v.item() for v in torch.aminmax(tensor))  # NaN propagates into both
        if not (math.isfinite(low) and math.isfinite(high)):
            raise RuntimeError(f"build_random: {name} has non-finite values")
        if low == 0 and high == 0:
            raise RuntimeError(f"build_random: {name} is all zeros")


def _set_pad_token(model: PreTrainedModel) -> None:
    gen_cfg = model.generation_config
    if gen_cfg.pad_token_id is not None:
        return
    eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = model.config.pad_token_id
    gen_cfg.pad_token_id = pad if pad is not None else (eos if eos is not None else 0)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def build_random(
    arch_or_preset: str | PretrainedConfig,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> PreTrainedModel:
    """Build a real HF causal-LM architecture with seeded random weights, fast.

    ``arch_or_preset`` is an architecture from ``ARCHS`` (tiny config), a preset name from
    ``PRESETS`` or a config; ``overrides`` are applied to the config.  Linear / Conv1D weights and
    biases are uniform(+-1/sqrt(fan_in)), embeddings normal(0, ``EMBED_STD``), norm weights
    1 +- ``NORM_NOISE``; embedding padding rows are zero as in HF's own init.
    """
    from transformers import AutoModelForCausalLM

    cfg = _resolve_config(arch_or_preset, overrides)
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    init_buffers(model)

    jobs = _fill_jobs(model, seed)
    with torch.no_grad():
        if device.type == "cpu":
            with ThreadPoolExecutor(max_workers=_cpu_count()) as pool:
                list(pool.map(_fill, jobs))
        else:
            for job in jobs:
                _fill(job)
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()

    _check(model)
    _set_pad_token(model)
    return model.eval()


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``build_random(tiny_config(arch))``: a 2-layer, 64-wide model of the given family."""
    return build_random(tiny_config(arch), dtype=dtype, seed=seed)
