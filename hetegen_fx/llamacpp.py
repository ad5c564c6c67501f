"""llama.cpp as a peer to measure hetegen_fx against (``hetegen bench --sweep``); never a dependency.

Owns: writing a Hugging Face Llama-architecture model's own weights as a GGUF that llama.cpp loads
(:func:`write_gguf`: llama.cpp's tensor names, the Q/K row order of its rotary embedding, a placeholder
tokenizer); finding (:func:`find_binary`) or building (:func:`build`) ``llama-bench``; running it at one
``-ngl`` and reading its JSON while ``nvidia-smi`` samples the GPU's memory (:func:`run_bench`,
:class:`MemorySampler`); and the model of its GPU memory by ``-ngl`` that picks the ``-ngl`` fitting a
budget (:class:`Footprint`, :func:`ngl_for_budget`).
Must not: import llama.cpp or its ``gguf-py`` (the ``gguf`` package from PyPI writes the file), or decide
anything about hetegen_fx's own runs (:mod:`hetegen_fx.bench_sweep` does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import format_bytes
from .errors import HetegenError

#: the environment variable naming a built ``llama-bench`` (the binary, or a folder holding it)
BINARY_ENV = "LLAMA_CPP_BIN"
BINARY = "llama-bench"
#: where a build leaves the binary, under the source tree
BUILD_BIN = Path("build") / "bin"

#: Hugging Face module (under ``model.layers[i]``) → llama.cpp tensor (under ``blk.i.``)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: Hugging Face ``model_type`` values whose checkpoints have Llama's layout (llama.cpp reads them as "llama")
LLAMA_TYPES = ("llama", "mistral")


class LlamaCppError(HetegenError):
    """llama.cpp could not be written for, built or run; the message says what to do."""


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


# --------------------------------------------------------------------------------------------------------------
# the GGUF


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Hugging Face q_proj / k_proj weight (or bias) in the order llama.cpp's rotary embedding
    reads them. HF rotates the two halves of each head (``rotate_half``: dimension j pairs with j + d/2);
    llama.cpp's LLAMA rope rotates adjacent pairs (2j, 2j + 1), the layout of Meta's checkpoints, so its
    converter interleaves each head's halves. ``heads`` is the query heads for q_proj, the key/value heads
    for k_proj."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: llama.cpp's row order back to Hugging Face's."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _config_value(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _rope(cfg: Any) -> tuple[float, str]:
    """(rope theta, rope type) of a config: transformers 5 keeps them in ``rope_parameters``, 4 in
    ``rope_theta`` / ``rope_scaling``."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None)) or 10000.0
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def _check_llama(model: torch.nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    fix = (
        "the llama.cpp comparison writes Llama-architecture models (LlamaForCausalLM); bench a Llama preset "
        "(e.g. --preset llama-2-7b) or a Llama checkpoint, or leave --llama-cpp out"
    )
    if kind not in LLAMA_TYPES:
        raise LlamaCppError(f"cannot write a GGUF of a {kind or type(model).__name__!r} model: {fix}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or getattr(model, "lm_head", None) is None:
        raise LlamaCppError(f"{type(model).__name__} has no model.layers / lm_head: {fix}")
    _, rope_type = _rope(cfg)
    if rope_type != "default":
        raise LlamaCppError(
            f"the model's rope scaling {rope_type!r} is not written (only plain rotary embeddings): {fix}"
        )
    return cfg


def _gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """(llama.cpp name, HF tensor, heads of the Q/K permutation or None) of every tensor, in file order."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inner = model.model
    yield "token_embd.weight", inner.embed_tokens.weight, None
    for i, layer in enumerate(inner.layers):
        for hf, name in LAYER_TENSORS.items():
            module = layer.get_submodule(hf)
            perm = {"attn_q": heads, "attn_k": kv_heads}.get(name)
            yield f"blk.{i}.{name}.weight", module.weight, perm
            bias = getattr(module, "bias", None)
            if bias is not None:
                yield f"blk.{i}.{name}.bias", bias, perm
    yield "output_norm.weight", inner.norm.weight, None
    if model.lm_head.weight is not inner.embed_tokens.weight:  # tied: llama.cpp reads token_embd instead
        yield "output.weight", model.lm_head.weight, None


def import_gguf(near: str | os.PathLike | None = None):
    """The ``gguf`` package: installed (``pip install gguf``), else the ``gguf-py/`` folder of a llama.cpp
    tree at or above ``near`` (a source tree, or its built binary), which is the same package. Raises
    :class:`LlamaCppError` saying how to get it."""
    try:
        import gguf

        return gguf
    except ImportError:
        pass
    here = Path(near).expanduser().resolve() if near is not None else None
    for folder in [here, *here.parents][:4] if here is not None else []:
        if (folder / "gguf-py" / "gguf" / "__init__.py").is_file():
            sys.path.insert(0, str(folder / "gguf-py"))
            try:
                import gguf

                return gguf
            except ImportError as e:  # its own needs (numpy, pyyaml) missing
                raise LlamaCppError(f"{folder / 'gguf-py'} does not import ({e}): pip install gguf") from None
    raise LlamaCppError(
        "writing the GGUF needs the gguf package: pip install gguf, or put the gguf-py folder of llama.cpp's "
        "source on PYTHONPATH"
    )


def _tokenizer(writer, cfg: Any) -> None:
    """A placeholder SentencePiece ("llama") vocabulary of ``vocab_size`` tokens: unk, bos and eos, the 256
    byte tokens as far as they fit, then fillers. llama-bench only feeds token ids, but llama.cpp needs a
    vocabulary to load a model; with fewer than 259 tokens it warns that there is no newline token."""
    gguf = import_gguf()

    vocab = cfg.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    tokens, types = tokens[:vocab], types[:vocab]
    tokens += [f"[tok{i}]" for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    for add, name, fallback in (
        (writer.add_unk_token_id, "unk_token_id", 0),
        (writer.add_bos_token_id, "bos_token_id", 1),
        (writer.add_eos_token_id, "eos_token_id", 2),
    ):
        value = getattr(cfg, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        value = value if isinstance(value, int) and 0 <= value < vocab else fallback
        add(min(value, vocab - 1))


def gguf_type(dtype: torch.dtype) -> str:
    """The GGUF type the model's matrices are written in: F16, BF16 or F32 (its own dtype: the same weights)."""
    types = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    if dtype not in types:
        raise LlamaCppError(f"write_gguf writes float16, bfloat16 or float32 weights, not {dtype}")
    return types[dtype]


def _array(t: torch.Tensor, kind: str):
    """``t`` as the numpy array written: F32 for 1-D tensors (norms, biases: llama.cpp's converter keeps them
    F32), else ``kind``; BF16 as its raw 16-bit words (numpy has no bfloat16)."""
    t = t.detach().to("cpu")
    if t.dim() <= 1 or kind == "F32":
        return t.float().contiguous().numpy()
    if kind == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return t.to(torch.float16).contiguous().numpy()


def write_gguf(
    model: torch.nn.Module,
    path: str | os.PathLike,
    progress: Callable[[str], None] | None = None,
    name: str | None = None,
    gguf_py: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (a Hugging Face Llama-architecture causal LM) as a GGUF that llama.cpp runs: its own
    weights in its own dtype (F16, BF16 or F32; norms F32), llama.cpp's tensor names, Q and K rows in
    llama.cpp's rotary order (:func:`permute_qk`), the hyperparameters of its config and a placeholder
    tokenizer. Tensors are written one at a time (no second copy of the model in memory), into a temporary
    file renamed over ``path`` when complete. ``progress`` gets a line now and then. ``gguf_py``: where to
    look for llama.cpp's ``gguf-py`` if the gguf package is not installed (:func:`import_gguf`)."""
    import numpy as np

    cfg = _check_llama(model)
    gguf = import_gguf(gguf_py)
    path = Path(path)
    params = list(_gguf_tensors(model))
    written = {id(t) for _, t, _ in params}
    missing = [n for n, p in model.named_parameters() if id(p) not in written]
    if missing:
        raise LlamaCppError(
            f"write_gguf does not know where llama.cpp keeps {missing[:3]} ({len(missing)} parameter(s)): "
            "the model is not a plain Llama; bench a Llama preset (e.g. --preset llama-2-7b)"
        )
    dtype = next(t for _, t, _ in params if t.dim() == 2).dtype
    kind = gguf_type(dtype)
    raw = {"F16": None, "F32": None, "BF16": gguf.GGMLQuantizationType.BF16}[kind]
    file_type = {
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "F32": gguf.LlamaFileType.ALL_F32,
    }[kind]
    heads = cfg.num_attention_heads
    head_dim = _config_value(cfg, "head_dim", default=cfg.hidden_size // heads)
    theta, _ = _rope(cfg)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(name or getattr(cfg, "name_or_path", None) or "hetegen-bench-llama")
        writer.add_file_type(int(file_type))
        writer.add_context_length(_config_value(cfg, "max_position_embeddings", default=4096))
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(_config_value(cfg, "num_key_value_heads", default=heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(_config_value(cfg, "rms_norm_eps", default=1e-5)))
        writer.add_vocab_size(cfg.vocab_size)
        _tokenizer(writer, cfg)
        for tname, t, _ in params:
            np_dtype = {"F32": "float32", "F16": "float16", "BF16": "int16"}["F32" if t.dim() <= 1 else kind]
            writer.add_tensor_info(
                tname,
                tuple(t.shape),
                np.dtype(np_dtype),
                t.numel() * np.dtype(np_dtype).itemsize,
                raw_dtype=raw if t.dim() > 1 else None,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.numel() * (4 if t.dim() <= 1 or kind == "F32" else 2) for _, t, _ in params)
        done = 0
        step = max(total // 10, 2**28)  # a line per tenth, of at least 256 MiB
        t0 = time.perf_counter()
        for _, t, perm in params:
            with torch.no_grad():
                data = permute_qk(t, perm) if perm is not None else t
            arr = _array(data, kind)
            writer.write_tensor_data(arr)
            before, done = done, done + arr.nbytes
            if done // step > before // step:
                _say(
                    progress,
                    f"GGUF: {format_bytes(done)} of {format_bytes(total)} written "
                    f"({time.perf_counter() - t0:.0f} s)",
                )
        writer.close()
        tmp.replace(path)  # never a half-written file under the real name
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    _say(progress, f"GGUF: wrote {path} ({kind}, {format_bytes(path.stat().st_size)})")
    return path


# --------------------------------------------------------------------------------------------------------------
# finding and building llama-bench


def _binary_in(place: Path) -> Path | None:
    if place.is_file():
        return place if os.access(place, os.X_OK) else None
    for candidate in (place / BINARY, place / "bin" / BINARY, place / BUILD_BIN / BINARY):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_binary(folder: str | os.PathLike | None = None) -> Path | None:
    """``llama-bench``: in ``folder`` (the binary itself, or a folder holding it, its ``bin/`` or a source
    tree's ``build/bin/``), else where ``$LLAMA_CPP_BIN`` says, else on ``PATH``; None if nowhere."""
    if folder is not None:
        return _binary_in(Path(folder).expanduser())
    env = os.environ.get(BINARY_ENV)
    if env:
        return _binary_in(Path(env).expanduser())
    found = shutil.which(BINARY)
    return Path(found) if found else None


def is_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a source archive to build (``.tgz``, ``.tar.gz``, ``.tar``)."""
    return str(path).endswith((".tgz", ".tar.gz", ".tar"))


def check_llama_cpp(path: str | os.PathLike) -> None:
    """That ``--llama-cpp PATH`` names a source archive or a built ``llama-bench`` (checked before a model
    loads); raises :class:`LlamaCppError` saying what to pass."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LlamaCppError(
            f"--llama-cpp {path}: no such file or folder; pass a folder holding a built {BINARY} or llama.cpp's "
            "source as a .tgz to build"
        )
    if p.is_file() and is_source(p):
        return
    if _binary_in(p) is None:
        raise LlamaCppError(
            f"--llama-cpp {path}: no executable {BINARY} there (looked in it, bin/ and build/bin/); pass the "
            "folder of a built one or llama.cpp's source as a .tgz to build"
        )


def _nvcc() -> str | None:
    found = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _extract(src: Path, dest: Path) -> Path:
    """Unpack ``src`` under ``dest``; the folder holding its top CMakeLists.txt."""
    with tarfile.open(src) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and paths out of dest
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python before 3.10.12
            tar.extractall(dest)  # noqa: S202
    return _tree(dest) or dest


def _tree(dest: Path) -> Path | None:
    if (dest / "CMakeLists.txt").is_file():
        return dest
    for child in sorted(dest.iterdir()) if dest.is_dir() else []:
        if child.is_dir() and (child / "CMakeLists.txt").is_file():
            return child
    return None


def _run_logged(cmd: Sequence[str], cwd: Path, log_file: Path, progress, what: str) -> None:
    """Run ``cmd``, its output into ``log_file``; a progress line per tenth of the build (cmake's ``[ n%]``
    lines) and on the way; an error with the log's tail if it fails."""
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = -10
        t0 = time.perf_counter()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[") and "%]" in line:
                try:
                    pct = int(line[1 : line.index("%")].strip())
                except ValueError:
                    continue
                if pct >= last + 10:
                    last = pct
                    _say(progress, f"{what}: {pct}% ({time.perf_counter() - t0:.0f} s)")
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise LlamaCppError(f"{what} failed (exit {rc}); the last lines of {log_file}:\n{tail}")


def build(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    progress: Callable[[str], None] | None = None,
    cuda_arch: str = "90",
    jobs: int | None = None,
) -> Path:
    """Unpack llama.cpp's source archive ``src`` under ``dest`` and build ``llama-bench`` with CUDA for
    ``cuda_arch`` (the flags of shared/tools/README.md: no curl, tests, examples, server, OpenSSL or NCCL).
    Returns the binary. A binary already built there is reused. Needs cmake and nvcc; without them, an
    error saying so. The build takes minutes (280 s on a 16-core H100 host, 2026-12-06)."""
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    tree = _tree(dest)
    if tree is not None and (found := _binary_in(tree / BUILD_BIN)) is not None:
        _say(progress, f"llama.cpp: reusing {found}")
        return found
    missing = [tool for tool, where in (("cmake", shutil.which("cmake")), ("nvcc", _nvcc())) if not where]
    if missing:
        raise LlamaCppError(
            f"building llama.cpp needs {' and '.join(missing)} (not found on PATH or in CUDA_HOME): install the "
            f"CUDA toolkit and cmake, or pass --llama-cpp the folder of a built {BINARY}"
        )
    if tree is None:
        _say(progress, f"llama.cpp: unpacking {src} into {dest}")
        tree = _extract(src, dest)
    log_file = dest / "build.log"
    configure = [
        "cmake",
        "-B",
        "build",
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_CUDA_NCCL=OFF",
    ]
    nvcc = _nvcc()
    if nvcc and not shutil.which("nvcc"):
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    _say(progress, f"llama.cpp: configuring (CUDA arch {cuda_arch}); the log is {log_file}")
    _run_logged(configure, tree, log_file, progress, "llama.cpp configure")
    jobs = jobs or os.cpu_count() or 4
    _say(progress, f"llama.cpp: building {BINARY} with {jobs} jobs (minutes)")
    _run_logged(
        ["cmake", "--build", "build", "-j", str(jobs), "--target", BINARY],
        tree,
        log_file,
        progress,
        "llama.cpp build",
    )
    found = _binary_in(tree / BUILD_BIN)
    if found is None:
        raise LlamaCppError(f"the build finished but left no {BINARY} in {tree / BUILD_BIN}; see {log_file}")
    _say(progress, f"llama.cpp: built {found}")
    return found


# --------------------------------------------------------------------------------------------------------------
# GPU memory by nvidia-smi


def smi_id(device: torch.device | str | int = 0) -> str:
    """The id ``nvidia-smi -i`` takes for a CUDA device of this process: its index, mapped through
    ``CUDA_VISIBLE_DEVICES`` (an index or a UUID there) when that is set."""
    if isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def _smi_query(gpu: str) -> list[str]:
    return ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(gpu)]


def _mib(line: str) -> int | None:
    """Bytes of one nvidia-smi ``memory.used`` line (MiB, no unit), or None."""
    try:
        return int(float(line.strip())) * 2**20
    except ValueError:
        return None


def gpu_memory_used(gpu: str | None) -> int | None:
    """Bytes in use on GPU ``gpu`` (an ``nvidia-smi -i`` id) by every process, as nvidia-smi reports them
    (MiB); None without nvidia-smi or a GPU."""
    if gpu is None:
        return None
    try:
        out = subprocess.run(_smi_query(gpu), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return _mib(lines[0]) if out.returncode == 0 and lines else None


class MemorySampler:
    """Samples a GPU's used memory every ``interval`` seconds while the ``with`` block runs: one
    ``nvidia-smi -lms`` process printing a reading per interval (no process started per sample, which would
    take CPU time from the run it measures), or ``read(gpu)`` called from a thread when ``read`` is given.
    ``before`` is the reading as the block starts, ``peak`` the highest one (``before`` and a reading at the
    end included), ``delta`` their difference: what the block added, whoever allocated it (a child process
    as well as this one). A peak shorter than the interval can be missed. All None where nothing can be
    read."""

    def __init__(
        self,
        gpu: str | None,
        interval: float = 0.1,
        read: Callable[[str | None], int | None] | None = None,
    ) -> None:
        self.gpu = gpu
        self.interval = interval
        self.read = read or gpu_memory_used
        self.follow = read is None
        self.before: int | None = None
        self.peak: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def _add(self, value: int | None) -> None:
        if value is not None:
            self.samples += 1
            self.peak = value if self.peak is None else max(self.peak, value)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._add(self.read(self.gpu))

    def _tail(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._add(_mib(line))

    def __enter__(self) -> MemorySampler:
        self.before = self.read(self.gpu)
        self.peak = self.before
        if self.before is None:
            return self
        target = self._poll
        if self.follow:
            loop = [*_smi_query(self.gpu), "-lms", str(max(int(self.interval * 1000), 10))]
            try:
                self._proc = subprocess.Popen(
                    loop, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
                target = self._tail
            except OSError:
                self._proc = None
        self._thread = threading.Thread(target=target, name="nvidia-smi sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join()
            self._add(self.read(self.gpu))

    @property
    def delta(self) -> int | None:
        return None if self.before is None or self.peak is None else self.peak - self.before

    def to_dict(self) -> dict:
        return {
            "before_bytes": self.before,
            "peak_bytes": self.peak,
            "delta_bytes": self.delta,
            "samples": self.samples,
        }


# --------------------------------------------------------------------------------------------------------------
# running llama-bench


def parse_bench_json(text: str) -> dict:
    """The tests of one ``llama-bench -o json`` output: the prompt test's (``n_prompt`` > 0, ``n_gen`` 0)
    tokens/s as ``prompt_tok_s``, the generation test's (``n_gen`` > 0) as ``decode_tok_s``, each with its
    standard deviation and samples, and the run's facts (build, backend, GPU, threads, -ngl)."""
    start, end = text.find("["), text.rfind("]")
    try:
        tests = json.loads(text[start : end + 1]) if start >= 0 and end > start else None
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench's JSON output does not parse ({e}): {text[:300]!r}") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise LlamaCppError(f"expected llama-bench's JSON list of tests, got {text[:300]!r}")
    out: dict = {}
    for t in tests:
        if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
            key, tokens = "prompt", t["n_prompt"]
        elif t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
            key, tokens = "decode", t["n_gen"]
        else:  # -pg: a prompt and a generation together, not one of the two rates
            continue
        out[f"{key}_tokens"] = tokens
        out[f"{key}_tok_s"] = float(t["avg_ts"])
        out[f"{key}_stddev_tok_s"] = float(t.get("stddev_ts", 0.0))
        out[f"{key}_samples_tok_s"] = [float(x) for x in t.get("samples_ts", [])]
        out[f"{key}_depth"] = t.get("n_depth", 0)
        for fact in (
            "build_commit",
            "backends",
            "gpu_info",
            "n_threads",
            "n_gpu_layers",
            "model_size",
            "type_k",
        ):
            if fact in t:
                out[fact] = t[fact]
    if "prompt_tok_s" not in out and "decode_tok_s" not in out:
        raise LlamaCppError(f"llama-bench's JSON holds no prompt or generation test: {text[:300]!r}")
    return out


def run_bench(
    binary: str | os.PathLike,
    gguf: str | os.PathLike,
    ngl: int,
    threads: int,
    prompt: int,
    new: int,
    reps: int,
    gpu: str | None = None,
    depth: int | None = None,
    timeout: float = 3600.0,
    progress: Callable[[str], None] | None = None,
    prefix: Sequence[str] = (),
) -> dict:
    """llama-bench on ``gguf`` with ``-ngl ngl -t threads -r reps``: a prompt test of ``prompt`` tokens and a
    generation test of ``new`` tokens after a context of ``depth`` (default ``prompt``: the decode steps of a
    generate that follows the prompt), two runs of the binary, while :class:`MemorySampler` samples GPU
    ``gpu`` (also the only GPU the binary sees, through ``CUDA_VISIBLE_DEVICES``). Returns the rates of
    :func:`parse_bench_json`, ``prompt_s`` (the prefill's seconds), ``gpu_delta_bytes`` (the GPU memory the
    runs added: llama-bench's whole process, its CUDA context included), ``gpu_peak_bytes`` (the raw peak of
    the GPU, everyone's) and the wall time. ``prefix``: a command that runs the binary (its arguments
    follow), e.g. one that puts it in a memory cgroup. Raises :class:`LlamaCppError` if llama-bench fails."""
    depth = prompt if depth is None else depth
    base = [str(binary), "-m", str(gguf), "-ngl", str(ngl), "-t", str(threads), "-r", str(max(1, reps))]
    base += ["-o", "json"]
    runs = []
    if prompt > 0:
        runs.append(["-p", str(prompt), "-n", "0"])
    if new > 0:
        runs.append(["-p", "0", "-n", str(new)] + (["-d", str(depth)] if depth > 0 else []))
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    result: dict = {"ngl": ngl, "threads": threads, "prompt": prompt, "new_tokens": new, "reps": reps}
    t0 = time.perf_counter()
    with MemorySampler(gpu) as mem:
        for extra in runs:
            cmd = [*prefix, *base, *extra]
            _say(progress, f"llama.cpp: {BINARY} {' '.join(base[1:] + extra)}")
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise LlamaCppError(f"llama-bench ran past {timeout:.0f} s at -ngl {ngl}") from None
            if out.returncode != 0:
                tail = "\n".join(out.stderr.strip().splitlines()[-8:])
                raise LlamaCppError(f"llama-bench exited {out.returncode} at -ngl {ngl}:\n{tail}")
            result.update(parse_bench_json(out.stdout))
    result["wall_s"] = time.perf_counter() - t0
    if result.get("prompt_tok_s"):
        result["prompt_s"] = prompt / result["prompt_tok_s"]
    result["gpu"] = mem.to_dict()
    result["gpu_delta_bytes"] = mem.delta
    result["gpu_peak_bytes"] = mem.peak
    return result


# --------------------------------------------------------------------------------------------------------------
# GPU memory by -ngl


@dataclass
class Footprint:
    """llama.cpp's GPU memory at ``-ngl n`` as a line: ``fixed_bytes`` (the CUDA context and compute
    buffers, there at -ngl 0) plus, per repeating layer on the GPU (the first ``min(n, layers)``), its
    weights and its KV cache, plus the output matrix at ``n > layers``. The token embeddings stay on the
    CPU at any -ngl. ``fixed_bytes`` starts as a guess and is set from measurements (:meth:`calibrate`)."""

    layers: int
    layer_bytes: int
    kv_bytes_per_layer: int
    output_bytes: int
    fixed_bytes: int

    def variable(self, ngl: int) -> int:
        on_gpu = min(max(ngl, 0), self.layers)
        return on_gpu * (self.layer_bytes + self.kv_bytes_per_layer) + (
            self.output_bytes if ngl > self.layers else 0
        )

    def estimate(self, ngl: int) -> int:
        return self.fixed_bytes + self.variable(ngl)

    def calibrate(self, measured: Mapping[int, int | None]) -> None:
        """Set ``fixed_bytes`` to the median of what the measured points hold beyond their layers."""
        rest = sorted(m - self.variable(n) for n, m in measured.items() if m is not None and m != NEVER_FITS)
        if rest:
            self.fixed_bytes = rest[len(rest) // 2]

    def to_dict(self) -> dict:
        return asdict(self)


#: the memory recorded for an -ngl whose run failed: it fits no budget
NEVER_FITS = sys.maxsize


def footprint(model: torch.nn.Module, ctx: int, kind: str | None = None, ubatch: int = 512) -> Footprint:
    """The :class:`Footprint` of ``model`` written by :func:`write_gguf` (``kind`` F16/BF16/F32, default its
    dtype's) with a context of ``ctx`` tokens (an f16 KV cache, padded to 256 tokens). The first guess of the
    fixed part: 512 MiB of CUDA context and runtime, a compute buffer of ``ubatch`` tokens (logits,
    activations) and room for the largest matrix, which llama.cpp copies to the GPU to multiply a prompt
    batch by a layer kept on the CPU."""
    cfg = _check_llama(model)
    per = 4 if (kind or gguf_type(model.lm_head.weight.dtype)) == "F32" else 2
    inner = model.model
    layer_bytes = sum(
        p.numel() * (per if p.dim() > 1 else 4) for p in inner.layers[0].parameters()
    )  # every layer has the first one's shapes
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    padded = -(-ctx // 256) * 256
    kv = 2 * kv_heads * head_dim * padded * 2
    output = model.lm_head.weight.numel() * per + inner.norm.weight.numel() * 4
    largest = max(p.numel() * per for p in model.parameters() if p.dim() > 1)
    compute = ubatch * (cfg.vocab_size + 4 * cfg.intermediate_size + 8 * cfg.hidden_size) * 4
    return Footprint(
        layers=cfg.num_hidden_layers,
        layer_bytes=layer_bytes,
        kv_bytes_per_layer=kv,
        output_bytes=output,
        fixed_bytes=512 * 2**20 + compute + largest,
    )


def ngl_for_budget(
    limit: int, foot: Footprint, measured: Mapping[int, int | None] | None = None
) -> int | None:
    """The largest ``-ngl`` (0 to ``layers + 1``) whose GPU memory is at most ``limit`` bytes: measured where
    ``measured`` has it (bytes, or :data:`sys.maxsize` for a run that failed), else :meth:`Footprint.estimate`.
    Memory grows with -ngl, so nothing above a measured -ngl that does not fit is taken. None when not even
    -ngl 0 fits."""
    measured = {n: m for n, m in (measured or {}).items() if m is not None}
    over = [n for n, m in measured.items() if m > limit]
    top = min([foot.layers + 1, *(n - 1 for n in over)])
    for n in range(top, -1, -1):
        if measured.get(n, foot.estimate(n)) <= limit:
            return n
    return None
