"""Architecture facts the compiler needs, read from an HF config (None where unknown)."""

from __future__ import annotations

from typing import Any

import torch

from .builders import ARCHS

_NO_GQA = ("opt", "gpt2")


def _config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def family(model_or_config: Any) -> str:
    """The family (one of ``ARCHS``) of a model or config, or ``"unknown"``."""
    model_type = getattr(_config(model_or_config), "model_type", None)
    return model_type if model_type in ARCHS else "unknown"


def max_positions(config: Any) -> int | None:
    """Longest sequence the position encoding supports, or None if the config does not say."""
    return _first_int(_config(config), "max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def kv_cache_bytes(config: Any, batch: int, seq_len: int, dtype: torch.dtype) -> int | None:
    """Bytes of a full K+V cache: ``2 * layers * kv_heads * head_dim * seq_len * batch * itemsize``."""
    config = _config(config)
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None:
        return None
    kv_heads = heads
    if family(config) not in _NO_GQA:
        kv_heads = _first_int(config, "num_key_value_heads") or heads
    head_dim = _first_int(config, "head_dim")
    if head_dim is None:
        if hidden is None:
            return None
        head_dim = hidden // heads
    return 2 * layers * kv_heads * head_dim * seq_len * batch * dtype.itemsize
