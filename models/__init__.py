"""Model zoo for hetegen_fx: random-weight HF architectures, offline loading, architecture facts.

Importing this package is cheap: transformers is imported lazily and CUDA is never touched.
"""

from .adapters import family, kv_cache_bytes, max_positions
from .builders import ARCHS, PRESETS, build_random, preset_config, tiny, tiny_config
from .loading import (
    DEFAULT_MODEL,
    TOKENIZER_FILES,
    DefaultModelMissingError,
    chat_prompt,
    default_gguf_path,
    load,
)

__all__ = [
    "ARCHS",
    "DEFAULT_MODEL",
    "TOKENIZER_FILES",
    "PRESETS",
    "DefaultModelMissingError",
    "build_random",
    "chat_prompt",
    "default_gguf_path",
    "family",
    "kv_cache_bytes",
    "load",
    "max_positions",
    "preset_config",
    "tiny",
    "tiny_config",
]
