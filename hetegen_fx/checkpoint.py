"""Weights read straight from a Hugging Face safetensors checkpoint, and ``hetegen_fx.load``.

Owns: the index of a checkpoint folder (``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``; every safetensors header parsed here: tensor → file, absolute byte offset,
size, dtype, shape), its validation before any tensor is read, positional reads of whole tensors or row
ranges into caller-given CPU tensors (``os.preadv``, no mmap), the read statistics, and building an HF model
from such a folder one tensor at a time (``build_model``, ``load``); with ``defer``, the weights of its
Linears left unread in untouched anonymous memory, each bound to its place in the checkpoint (a
:class:`Source`, :func:`source_of`) so that placement reads only the rows that stay in RAM (:func:`fill`)
or go to the device (:func:`read_whole`), and the storage tier reads the rest at every step
(:mod:`hetegen_fx.prefetch`).
Must not: write into the checkpoint folder, map whole files into memory, or hold a second copy of the
weights (a state dict of every tensor); place weights (``hetegen_fx.compile`` does).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and the data, whose
offsets count from byte ``8 + n``; each tensor is contiguous and row-major, so rows ``[a, b)`` of a
tensor are one contiguous byte range.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import format_bytes
from .errors import ConfigError, HetegenError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: a header larger than this is not a safetensors header (the format caps it at 100 MB)
MAX_HEADER = 100_000_000

#: safetensors dtype names → torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(HetegenError):
    """A checkpoint folder that cannot be loaded as it is: missing, truncated, unreadable or not matching the
    model its config describes. Nothing has been loaded when it is raised."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: ``file`` (a path in the checkpoint folder), the absolute byte ``offset`` of its
    first element in that file, its size in bytes, dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index along dim 0); the whole tensor for a 0-d tensor."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class ReadStats:
    """What :meth:`Checkpoint.read` has read so far: bytes, seconds spent reading, number of reads."""

    bytes: int
    seconds: float
    reads: int

    @property
    def rate(self) -> float:
        """Bytes per second over all reads (0 before the first)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} in {self.reads} reads, {self.seconds:.2f} s ({format_bytes(self.rate)}/s)"


class Checkpoint:
    """An indexed safetensors checkpoint folder, its files open read-only. Use :meth:`open`."""

    def __init__(
        self,
        folder: Path,
        entries: dict[str, TensorEntry],
        drop_cache: bool,
        fds: dict[Path, int] | None = None,
    ) -> None:
        self.folder = folder
        self.drop_cache = drop_cache
        self._entries = entries
        self._fds: dict[Path, int] = dict(fds or {})
        self._lock = threading.Lock()
        self._bytes = 0
        self._seconds = 0.0
        self._reads = 0

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, drop_cache: bool = True) -> Checkpoint:
        """Index the checkpoint folder ``path`` and open its files; every error a read could meet later
        (a missing, truncated, unreadable or malformed file) is a :class:`CheckpointError` now.

        ``drop_cache``: after each read, advise the kernel to drop the pages read from the page cache
        (``POSIX_FADV_DONTNEED``), so that the cache does not hold a second copy of what the caller keeps."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(
                f"no checkpoint folder at {folder}: give the folder that holds config.json and "
                f"{SINGLE} (or {INDEX} and its shards), as save_pretrained writes it"
            )
        if not (folder / CONFIG).is_file():
            raise CheckpointError(
                f"{folder} has no {CONFIG}: the model's architecture comes from it; copy the checkpoint's "
                f"{CONFIG} into the folder (or save the model again with save_pretrained)"
            )
        files = _shard_files(folder)
        fds: dict[Path, int] = {}
        try:
            for file in dict.fromkeys(files.values()):
                fds[file] = _open(file)
            entries = _index(folder, files, fds)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(folder, entries, drop_cache, fds)

    def close(self) -> None:
        """Close the checkpoint's files (reads open them again)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter shutdown os may be gone
            pass

    # -- the index -------------------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._entries)

    def entry(self, name: str) -> TensorEntry:
        """Where tensor ``name`` lies (file, offset, bytes, dtype, shape)."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the checkpoint {self.folder}") from None

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(e.nbytes for e in self._entries.values())

    def files(self) -> list[Path]:
        """The safetensors files, in order."""
        return list(dict.fromkeys(e.file for e in self._entries.values()))

    # -- reading ---------------------------------------------------------------------------------------------

    def read(
        self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[start, stop)`` along dim 0), read from its file with positional
        reads into ``out`` (a contiguous CPU tensor of the checkpoint's dtype and the shape read, e.g. pinned)
        or into a new tensor; returns the tensor written."""
        entry = self.entry(name)
        shape = entry.shape
        offset, nbytes = entry.offset, entry.nbytes
        if rows is not None:
            if not shape:
                raise ConfigError(f"rows= needs a tensor of at least one dimension; {name} is 0-d")
            start, stop = rows
            if not 0 <= start <= stop <= shape[0]:
                raise ConfigError(
                    f"rows=({start}, {stop}) is outside {name}'s {shape[0]} rows: give 0 <= start <= stop <= {shape[0]}"
                )
            shape = (stop - start, *shape[1:])
            offset += start * entry.row_bytes
            nbytes = (stop - start) * entry.row_bytes
        if out is None:
            out = torch.empty(shape, dtype=entry.dtype)
        elif (
            out.device.type != "cpu"
            or out.dtype != entry.dtype
            or tuple(out.shape) != shape
            or not out.is_contiguous()
        ):
            raise ConfigError(
                f"out= for {name} must be a contiguous CPU tensor of dtype {entry.dtype} and shape "
                f"{list(shape)}; got {out.dtype} {list(out.shape)} on {out.device}"
                + ("" if out.is_contiguous() else " (not contiguous)")
            )
        if nbytes:
            self._read_into(entry.file, offset, _bytes_of(out), nbytes)
        return out

    def stats(self) -> ReadStats:
        """Bytes read, seconds spent in reads and number of reads since the checkpoint was opened."""
        with self._lock:
            return ReadStats(self._bytes, self._seconds, self._reads)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:  # opened again after close()
                fd = self._fds[file] = _open(file)
            return fd

    def _read_into(self, file: Path, offset: int, view: memoryview, nbytes: int) -> None:
        fd = self._fd(file)
        start = time.perf_counter()
        done = 0
        while done < nbytes:
            n = _pread_into(fd, view[done:nbytes], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{file} ended at byte {offset + done} while reading {nbytes} bytes at {offset}: the file was "
                    "truncated since it was opened; download or save it again"
                )
            done += n
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        seconds = time.perf_counter() - start
        with self._lock:
            self._bytes += nbytes
            self._seconds += seconds
            self._reads += 1


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # no preadv (macOS before 11): one copy through a bytes object
    view[: len(data)] = data
    return len(data)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, whatever its dtype."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


# -- weights bound to their checkpoint (the storage tier's sources) ------------------------------------------


@dataclass
class Source:
    """Where a deferred weight's values are: tensor ``name`` of ``checkpoint`` (kept open while the weight
    lives). ``filled``: rows ``[0, filled)`` have been read into the weight itself."""

    checkpoint: Checkpoint
    name: str
    filled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_SOURCES: dict[int, tuple[weakref.ref, Source]] = {}
_SOURCES_LOCK = threading.Lock()


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def bind(t: torch.Tensor, checkpoint: Checkpoint, name: str) -> None:
    """Record that ``t`` (a deferred weight, unread) holds tensor ``name`` of ``checkpoint``."""
    with _SOURCES_LOCK:
        _SOURCES[_key(t)] = (weakref.ref(t), Source(checkpoint, name))


def source_of(t: torch.Tensor) -> Source | None:
    """The checkpoint place of ``t`` when it is a deferred weight (:func:`build_model` with ``defer``)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    with _SOURCES_LOCK:
        hit = _SOURCES.get(_key(t))
    if hit is None or hit[0]() is None:
        return None
    return hit[1]


def fill(t: torch.Tensor, rows: int) -> None:
    """Read rows ``[0, rows)`` of deferred weight ``t`` into it (those not read yet); a weight with no
    source is left alone. Rows stay read: a weight is filled once per row."""
    src = source_of(t)
    if src is None:
        return
    rows = min(rows, t.shape[0])
    with src.lock:
        if rows > src.filled:
            src.checkpoint.read(src.name, out=t.detach()[src.filled : rows], rows=(src.filled, rows))
            src.filled = rows


def read_whole(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t``: ``t`` itself, or for a deferred weight a new tensor read from its checkpoint
    (what goes to the device: the weight's own memory stays untouched)."""
    src = source_of(t)
    if src is None or src.filled >= t.shape[0]:
        return t
    return src.checkpoint.read(src.name)


def _untouched(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in its own anonymous memory map, not touched: it takes no host memory until rows are
    written (the kernel maps pages on first write), and pinning a range of it pins only that range."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled on first touch
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def _unreadable(file: Path) -> str:
    return (
        f"cannot read {file} (permission denied): make it readable by this user (e.g. chmod a+r {file}) "
        "or load from a copy you can read"
    )


def _open(file: Path) -> int:
    """A read-only file descriptor of ``file``; an unreadable or vanished file is a :class:`CheckpointError`."""
    try:
        return os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise CheckpointError(_unreadable(file)) from None
    except FileNotFoundError:
        raise CheckpointError(
            f"{file} is not there (any more): put it back, or open the checkpoint folder again"
        ) from None


def _shard_files(folder: Path) -> dict[str, Path]:
    """Tensor name → file for a sharded checkpoint (from its index), or {"": model.safetensors}."""
    index = folder / INDEX
    if not index.is_file():
        single = folder / SINGLE
        if single.is_file():
            return {"": single}
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.safetensors")
        )
        hint = f" (it holds {', '.join(others[:3])}{'...' if len(others) > 3 else ''})" if others else ""
        raise CheckpointError(
            f"{folder} has neither {SINGLE} nor {INDEX}{hint}: only safetensors checkpoints load straight "
            "from disk; save the model with save_pretrained (safetensors, the default) into a new folder"
        )
    try:
        os.close(_open(index))
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index} is not a readable safetensors index ({type(e).__name__}: {e}): it must be JSON with a "
            '"weight_map" of tensor name → shard file; copy it again from the checkpoint\'s source'
        ) from None
    files = {name: folder / str(shard) for name, shard in weight_map.items()}
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
        raise CheckpointError(
            f"{INDEX} in {folder} names {len(missing)} shard(s) that are not there: {', '.join(missing)}; "
            "the checkpoint is incomplete: copy or download the missing file(s) into the folder"
        )
    return files


def _index(folder: Path, files: dict[str, Path], fds: dict[Path, int]) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, from the headers of its files, checked against the index."""
    entries: dict[str, TensorEntry] = {}
    for file, fd in fds.items():
        for entry in _parse_header(file, fd):
            if entry.name in entries:
                raise CheckpointError(
                    f"tensor {entry.name} is in both {entries[entry.name].file.name} and {file.name}: "
                    "the checkpoint mixes two saves; save the model again into an empty folder"
                )
            entries[entry.name] = entry
    if (folder / INDEX).is_file():
        for name, file in files.items():
            if name not in entries or entries[name].file != file:
                raise CheckpointError(
                    f"{INDEX} places tensor {name} in {file.name}, whose header does not hold it: the index "
                    "and its shards come from different saves; save the model again into an empty folder"
                )
    return entries


def _parse_header(file: Path, fd: int) -> list[TensorEntry]:
    """Every tensor of one safetensors file, checked against the file's size."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{file} is not a readable safetensors file ({why}): it is damaged or not safetensors; "
            "download or save it again"
        )

    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise bad(f"a header length of {n} bytes")
    if 8 + n > size:
        raise CheckpointError(
            f"{file} is truncated: its header needs {8 + n} bytes, the file holds {size}; "
            "download or save it again"
        )
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON: {e}") from None
    base = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name} has no dtype, shape and data_offsets") from None
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise UnsupportedModelError(
                f"tensor {name} in {file} has dtype {dtype_name}, which hetegen_fx cannot read "
                f"(known: {', '.join(DTYPES)}); convert the checkpoint to a float dtype"
            )
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise bad(f"tensor {name}: data_offsets {[begin, end]} do not fit {dtype_name} {list(shape)}")
        if base + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name} ends at byte {base + end}, the file holds {size} bytes; "
                "download or save it again"
            )
        entries.append(TensorEntry(name, file, base + begin, end - begin, dtype, shape))
    entries.sort(key=lambda e: e.offset)
    return entries


# -- building a model from a checkpoint --------------------------------------------------------------------------


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _renamer(model: PreTrainedModel, meta_keys: dict[str, Any]):
    """Checkpoint key → the model's state-dict key, as transformers renames keys when it loads (legacy
    renames, the base-model prefix added or dropped). A key that needs one of transformers' weight
    converters (fused or split tensors) is refused: one checkpoint tensor must be one model tensor."""
    prefix = model.base_model_prefix or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_converters, rename_source_key
    except ImportError:  # another transformers layout: the base-model prefix only

        def simple(key: str) -> str:
            if prefix and key not in meta_keys:
                if f"{prefix}.{key}" in meta_keys:
                    return f"{prefix}.{key}"
                if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in meta_keys:
                    return key[len(prefix) + 1 :]
            return key

        return simple

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        if converters and apply_converters(key, converters)[1] is not None:
            raise UnsupportedModelError(
                f"checkpoint tensor {key} must be converted by transformers before {type(model).__name__} "
                "can use it (fused or split on load); load the model with from_pretrained and pass it to "
                "hetegen_fx.compile instead"
            )
        return rename_source_key(key, renamings, [], prefix, meta_keys)[0]

    return rename


def _tied_targets(model: PreTrainedModel) -> set[str]:
    """State-dict keys that tie_weights() makes the same tensor as another (absent from saved checkpoints)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers
        tied = (
            {}
            if not getattr(model.config, "tie_word_embeddings", False)
            else dict.fromkeys(getattr(model, "_tied_weights_keys", None) or ())
        )
    return set(tied)


def _ignored(model: PreTrainedModel, key: str) -> bool:
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    return any(re.search(p, key) for p in patterns)


def _plan_reads(model: PreTrainedModel, ckpt: Checkpoint) -> dict[str, TensorEntry]:
    """Model state-dict key → checkpoint entry for every tensor to read, checked: every parameter present
    with the model's shape and a dtype it can take."""
    meta = model.state_dict(keep_vars=True)
    rename = _renamer(model, meta)
    tied = _tied_targets(model)
    persistent_buffers = {n for n, _ in model.named_buffers()} & set(meta)
    reads: dict[str, TensorEntry] = {}
    unexpected = []
    for name in ckpt.names():
        key = rename(name)
        if key in tied:
            continue  # tie_weights() makes it the tensor it is tied to, as transformers does
        if key not in meta:
            if not _ignored(model, name):
                unexpected.append(name)
            continue
        reads[key] = ckpt.entry(name)
    where = ckpt.folder
    missing = [k for k in meta if k not in reads and k not in tied and k not in persistent_buffers]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"the checkpoint in {where} has no tensor for {shown} (expected by {type(model).__name__} as its "
            f"{CONFIG} describes it): the checkpoint is incomplete or belongs to another model; save it again"
        )
    for key, entry in reads.items():
        want = meta[key]
        if tuple(want.shape) != entry.shape:
            raise CheckpointError(
                f"checkpoint tensor {entry.name} ({entry.file.name}) has shape {list(entry.shape)}, but "
                f"{type(model).__name__} as {CONFIG} describes it expects {list(want.shape)} for {key}: the "
                f"weights and {CONFIG} come from different models; use the matching {CONFIG}"
            )
        castable = want.dtype.is_floating_point and entry.dtype.is_floating_point
        if want.dtype != entry.dtype and not castable:
            raise CheckpointError(
                f"checkpoint tensor {entry.name} ({entry.file.name}) is {entry.dtype}, but {key} is "
                f"{want.dtype}: only floating-point tensors are cast on load; the checkpoint does not match "
                f"its {CONFIG}"
            )
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (
            f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        )
        warnings.warn(
            f"the checkpoint in {where} has tensors {type(model).__name__} does not use, left unread: {shown}",
            stacklevel=3,
        )
    return reads


def _checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype that holds most of the checkpoint's bytes (float32 where none is floating)."""
    by_dtype: dict[torch.dtype, int] = {}
    for name in ckpt.names():
        e = ckpt.entry(name)
        if e.dtype.is_floating_point:
            by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


def _deferrable(model: PreTrainedModel, reads: dict[str, TensorEntry]) -> set[str]:
    """State-dict keys of the weights of the model's ``nn.Linear`` modules that can stay in the checkpoint:
    stored in the model's dtype (read raw, rows at a time) and not shared with another parameter (a tied
    ``lm_head`` is the embedding table, which the model reads whole)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"{name}.weight" if name else "weight"
            entry = reads.get(key)
            w = module.weight
            if entry is not None and count.get(id(w)) == 1 and entry.dtype == w.dtype and w.dim() == 2:
                keys.add(key)
    return keys


def build_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    defer: bool = False,
) -> PreTrainedModel:
    """The Hugging Face causal LM of the checkpoint folder ``path``, in eval mode on the CPU, built on the
    meta device from ``config.json`` and filled one tensor at a time from the safetensors files (no
    second copy: host memory is the model's bytes plus one tensor when casting).

    ``dtype``: the model's dtype (floating tensors are cast while read); None keeps the dtype most of the
    checkpoint's bytes are stored in. ``defer``: leave the weights of the Linears unread (:func:`_deferrable`),
    in untouched memory bound to the checkpoint (:func:`source_of`), for a compile with ``cpu_memory`` to
    place them; the checkpoint's files then stay open while the model lives. A missing tensor or one of the
    wrong shape is a :class:`CheckpointError` before any tensor is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    ckpt = Checkpoint.open(path)
    deferred: set[str] = set()
    try:
        folder = ckpt.folder
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{folder / CONFIG} does not describe a model transformers knows ({type(e).__name__}: {e}); "
                f"use the {CONFIG} that came with the checkpoint"
            ) from None
        dtype = dtype or _checkpoint_dtype(ckpt)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise UnsupportedModelError(
                f"{folder / CONFIG} describes a {type(config).__name__}, which transformers has no causal "
                f"language model for ({e}); hetegen_fx.load builds AutoModelForCausalLM models only: build the "
                "model yourself and pass it to hetegen_fx.compile"
            ) from None
        reads = _plan_reads(model, ckpt)  # every check before the first byte is read
        total = sum(e.nbytes for e in reads.values())
        _log(progress, f"loading {folder}: {len(reads)} tensors, {format_bytes(total)} ({dtype})")

        model.to_empty(device="cpu")  # allocated, not touched: pages are filled as tensors are read
        model.tie_weights()
        from hetegen_fx.models.builders import init_buffers

        # buffers the checkpoint does not hold (rotary inv_freq ...), computed as transformers does on load
        init_buffers(model)
        targets = model.state_dict(keep_vars=True)
        deferred = _deferrable(model, reads) if defer else set()
        for key in deferred:
            param = targets[key]
            param.data = _untouched(tuple(param.shape), param.dtype)
            bind(param, ckpt, reads[key].name)
        if deferred:
            kept = sum(reads[k].nbytes for k in deferred)
            _log(progress, f"  {len(deferred)} Linear weights ({format_bytes(kept)}) left in the checkpoint")
            reads = {k: e for k, e in reads.items() if k not in deferred}
            total -= kept
        start, done, shown = time.perf_counter(), 0, 0
        for key, entry in reads.items():
            target = targets[key].data
            if target.dtype == entry.dtype:
                ckpt.read(entry.name, out=target)
            else:  # one tensor of the checkpoint's dtype at a time
                target.copy_(ckpt.read(entry.name))
            done += entry.nbytes
            if progress and total and (done * 10 // total > shown or done == total):
                shown = done * 10 // total
                seconds = time.perf_counter() - start
                rate = f", {format_bytes(done / seconds)}/s" if seconds > 0 else ""
                _log(
                    True, f"  {100 * done // total:3d}%  {format_bytes(done)} of {format_bytes(total)}{rate}"
                )
        model.tie_weights()
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except OSError:
            pass  # no generation_config.json: the one from_config derived stays
        model.config.name_or_path = str(folder)
        _log(progress, f"  read {ckpt.stats()}")
    except BaseException:
        ckpt.close()
        raise
    if not deferred:
        ckpt.close()  # else kept open by the weights' sources
    return model.eval()


def load(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    **compile_options: Any,
) -> torch.nn.Module:
    """``hetegen_fx.compile(build_model(path, dtype=dtype), **compile_options)``: a model compiled straight
    from a safetensors checkpoint folder, without loading it through transformers first. Its weights are read
    once, tensor by tensor, into host memory (see :func:`build_model`). With ``cpu_memory`` the weights of
    its Linears stay in the checkpoint until placement has decided where each row goes: resident rows are
    read straight to the device, RAM rows into host memory, and the rest are read from storage at every step
    (the storage tier), so host memory stays within ``cpu_memory``.

        compiled = hetegen_fx.load("path/to/Llama-2-7b-hf", gpu_memory="6GiB", dtype=torch.float16)
        out = compiled.generate(ids, max_new_tokens=32)
    """
    from .api import compile as compile_model
    from .config import Config

    config = Config.from_options(compile_options)
    config.check_device()  # a bad option: an error before any read
    model = build_model(path, dtype=dtype, progress=progress, defer=config.cpu_memory is not None)
    return compile_model(model, **compile_options)
