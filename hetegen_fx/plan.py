"""The Plan: what the compiler decided for one graph, as data.

Per Linear: resident or offloaded, the CPU share α and the split row, the rows kept in storage (the
storage tier: read at every step), the predicted whole-layer CPU / copy / GPU times and the predicted time
of the split layer, and bytes; per Plan, the storage tier's figures (host budget, ring, read rate). It prints as a table, round-trips
through JSON, and a saved Plan can be compiled from directly (no profiling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import format_bytes
from .errors import ConfigError

#: 2: ``LayerPlan.slot`` is a byte offset in the staging arena (in 1 it was a buffer index; read as -1)
FORMAT_VERSION = 2


@dataclass
class LayerPlan:
    name: str
    out_features: int
    in_features: int
    tokens: int
    dtype: str
    bytes: int
    resident: bool
    alpha: float = 0.0  # share of output features computed on the CPU (offloaded layers only)
    split: int = 0  # output features [0, split) on the CPU, [split, out) on the GPU
    t_cpu: float = 0.0  # predicted seconds for the whole layer on the CPU ...
    t_copy: float = 0.0  # ... to copy the whole layer host→device
    t_gpu: float = 0.0  # ... on the GPU
    slot: int = -1  # byte offset of the GPU part's region in the device's staging arena (-1: none)
    t_cpu_fixed: float = 0.0  # of t_cpu, what a CPU part costs however few rows it computes
    #: streamed into the segment of the CPU job whose first Linear this names (PlacementPass._stream_jobs): its
    #: copies run beside that job's CPU part; "" otherwise
    segment: str = ""
    #: output features ``[out - storage_rows, out)`` stay in storage and are read at every step (the storage
    #: tier); the rows before them are in RAM. ``split`` falls anywhere: the CPU computes rows ``[0, split)``
    #: (from RAM, and beyond the RAM rows from the storage reader's ring), the device the rest
    storage_rows: int = 0
    #: the MLP block (:mod:`hetegen_fx.blocks`) whose one CPU job this Linear's CPU part is in, named by the
    #: Linear its activation reads (gate); "" otherwise. The block's features ``[0, split)`` run on the CPU, gate/up's output
    #: rows and down's input columns alike
    block: str = ""
    #: ``split`` counts input features (down's in a block: the CPU and the device each compute a partial sum of
    #: the whole output), not output features
    split_inputs: bool = False

    @property
    def features(self) -> int:
        """The features ``split`` divides: input features with :attr:`split_inputs`, else output features."""
        return self.in_features if self.split_inputs else self.out_features

    @property
    def share(self) -> float:
        """The CPU's share of this Linear as planned (0 when resident)."""
        if self.resident or not self.features:
            return 0.0
        return self.split / self.features

    @property
    def storage_bytes(self) -> int:
        """Bytes read from storage at every step for this Linear."""
        if self.resident or not self.out_features:
            return 0
        return self.bytes * self.storage_rows // self.out_features

    @property
    def tier(self) -> str:
        """ "gpu" (resident), "ram", "storage" (every row) or "ram+storage"."""
        if self.resident:
            return "gpu"
        if not self.storage_rows:
            return "ram"
        return "storage" if self.storage_rows >= self.out_features else "ram+storage"

    def validate(self) -> LayerPlan:
        """Check every field's type and range; return ``self``."""
        where = f"layer {self.name!r}" if isinstance(self.name, str) else "layer"
        _expect(isinstance(self.name, str) and self.name, "name", self.name, "the weight's name", where)
        for f in ("out_features", "in_features", "bytes"):
            _expect(_is_int(getattr(self, f), 0), f, getattr(self, f), "a non-negative integer", where)
        _expect(_is_int(self.tokens, 0), "tokens", self.tokens, "a token count", where)
        _expect(isinstance(self.dtype, str), "dtype", self.dtype, "a dtype name such as 'float16'", where)
        _expect(isinstance(self.resident, bool), "resident", self.resident, "true or false", where)
        _expect(_is_real(self.alpha, 0.0, 1.0), "alpha", self.alpha, "a CPU share in [0, 1]", where)
        _expect(
            isinstance(self.split_inputs, bool), "split_inputs", self.split_inputs, "true or false", where
        )
        side, what = (
            ("in_features", "an input feature") if self.split_inputs is True else ("out_features", "a row")
        )
        _expect(
            _is_int(self.split, 0) and self.split <= getattr(self, side),
            "split",
            self.split,
            f"{what} in [0, {side} = {getattr(self, side)}]",
            where,
        )
        for f in ("t_cpu", "t_copy", "t_gpu", "t_cpu_fixed"):
            _expect(
                _is_real(getattr(self, f), 0.0, math.inf), f, getattr(self, f), "seconds, at least 0", where
            )
        _expect(_is_int(self.slot, -1), "slot", self.slot, "a byte offset, or -1", where)
        _expect(isinstance(self.segment, str), "segment", self.segment, "a layer name or ''", where)
        _expect(isinstance(self.block, str), "block", self.block, "a layer name or ''", where)
        _expect(
            _is_int(self.storage_rows, 0) and self.storage_rows <= self.out_features,
            "storage_rows",
            self.storage_rows,
            f"a row count in [0, out_features = {self.out_features}]",
            where,
        )
        return self

    @property
    def t_cpu_part(self) -> float:
        """Predicted seconds of the CPU part as planned (0 without one)."""
        if self.resident or self.split == 0 or not self.features:
            return 0.0
        f = min(self.t_cpu_fixed, self.t_cpu)
        return f + self.share * (self.t_cpu - f)

    @property
    def t_pred(self) -> float:
        """Predicted seconds of this layer as planned (CPU part ∥ copy + GPU part)."""
        if self.resident:
            return self.t_gpu
        return max(self.t_cpu_part, (1 - self.share) * (self.t_copy + self.t_gpu))

    @property
    def gpu_part_bytes(self) -> int:
        return 0 if self.resident else self.offloaded_gpu_bytes

    @property
    def offloaded_gpu_bytes(self) -> int:
        """Bytes of features ``[split, features)``: the GPU part this Linear stages when offloaded."""
        if self.features == 0:
            return 0
        return self.bytes * (self.features - self.split) // self.features


@dataclass
class Plan:
    device: str
    gpu_memory: int | None
    tokens: int
    layers: list[LayerPlan] = field(default_factory=list)
    reserved: dict[str, int] = field(default_factory=dict)  # kv_cache, activations, other_params, staging
    source: str = "model"  # where the costs came from: "measured", "model" or "plan"
    label: str = ""
    host_tables: list[str] = field(default_factory=list)  # embedding tables looked up on the host
    #: the storage tier, when some rows stay in storage: cpu_memory, ring_bytes, ram_bytes (Linear rows in
    #: RAM), read_rate (bytes/s) and read_latency (s) as measured, policy ("balanced"/"layered")
    storage: dict = field(default_factory=dict)

    @property
    def storage_bytes(self) -> int:
        """Bytes read from storage at every step."""
        return sum(lp.storage_bytes for lp in self.layers)

    @property
    def storage_seconds(self) -> float:
        """Predicted seconds of one step's storage reads (one read per Linear with storage rows, each its
        latency plus its bytes at the measured rate); they overlap the Linear work."""
        rate, latency = self.storage.get("read_rate") or 0, self.storage.get("read_latency") or 0.0
        if not rate:
            return 0.0
        return sum(latency + lp.storage_bytes / rate for lp in self.layers if lp.storage_bytes)

    def layer(self, name: str) -> LayerPlan | None:
        return next((lp for lp in self.layers if lp.name == name), None)

    @property
    def resident_bytes(self) -> int:
        return sum(lp.bytes for lp in self.layers if lp.resident)

    @property
    def offloaded_bytes(self) -> int:
        return sum(lp.bytes for lp in self.layers if not lp.resident)

    @property
    def predicted_seconds(self) -> float:
        """The Linear work's predicted seconds, or the storage reads' where they take longer (they overlap)."""
        return max(sum(lp.t_pred for lp in self.layers), self.storage_seconds)

    def table(self) -> str:
        """A fixed-width table, one row per Linear, with totals."""
        head = f"{'layer':<44} {'place':<9} {'alpha':>5} {'cpu ms':>8} {'copy ms':>8} {'gpu ms':>8} {'pred ms':>8} {'bytes':>11}"
        rows = [head, "-" * len(head)]
        for lp in self.layers:
            place = (
                "resident" if lp.resident else "segment" if lp.segment else "block" if lp.block else "offload"
            )
            if lp.storage_rows:
                place = "storage" if lp.tier == "storage" else f"sto {lp.storage_rows / lp.out_features:.0%}"
            alpha = "" if lp.resident else f"{lp.share:.2f}"
            name = lp.name if len(lp.name) <= 44 else "…" + lp.name[-43:]
            rows.append(
                f"{name:<44} {place:<9} {alpha:>5} {lp.t_cpu * 1e3:8.3f} {lp.t_copy * 1e3:8.3f} "
                f"{lp.t_gpu * 1e3:8.3f} {lp.t_pred * 1e3:8.3f} {format_bytes(lp.bytes):>11}"
            )
        rows.append("-" * len(head))
        budget = "unlimited" if self.gpu_memory is None else format_bytes(self.gpu_memory)
        reserved = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.reserved.items())
        segments = sum(bool(lp.segment) for lp in self.layers)
        beside = f", {segments} of them streamed beside the CPU job before them" if segments else ""
        blocks = len({lp.block for lp in self.layers if lp.block})
        beside += f", {blocks} MLP block(s) as one CPU job each" if blocks else ""
        # a streamed Linear's row is its time alone; in the step its copy runs beside its head's CPU part
        alone = " (the sum of the rows: streamed Linears counted as if alone)" if segments else ""
        rows.append(
            f"{len(self.layers)} Linears at {self.tokens} token(s) on {self.device}: "
            f"{sum(lp.resident for lp in self.layers)} resident ({format_bytes(self.resident_bytes)}), "
            f"{sum(not lp.resident for lp in self.layers)} offloaded ({format_bytes(self.offloaded_bytes)}{beside}); "
            f"budget {budget}; reserved: {reserved or 'none'}; "
            f"predicted {self.predicted_seconds * 1e3:.2f} ms of Linear work{alone}; costs: {self.source}"
            + (f"; on the host: {', '.join(self.host_tables)}" if self.host_tables else "")
        )
        if self.storage:
            st = self.storage
            rows.append(
                f"storage tier ({st.get('policy', '?')}): {format_bytes(self.storage_bytes)} read per step at "
                f"{format_bytes(st.get('read_rate', 0))}/s ({self.storage_seconds * 1e3:.1f} ms); in RAM "
                f"{format_bytes(st.get('ram_bytes', 0))} of Linear rows and a ring of "
                f"{format_bytes(st.get('ring_bytes', 0))}, within cpu_memory {format_bytes(st.get('cpu_memory', 0))}"
            )
        return "\n".join(rows)

    __str__ = table

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def validate(self) -> Plan:
        """Check every field's type and range (a plan read from a file may be anything); return ``self``."""
        _expect(isinstance(self.device, str), "device", self.device, "a device name such as 'cuda'")
        _expect(
            self.gpu_memory is None or _is_int(self.gpu_memory, 0),
            "gpu_memory",
            self.gpu_memory,
            "bytes or null",
        )
        _expect(_is_int(self.tokens, 0), "tokens", self.tokens, "a token count")
        _expect(isinstance(self.layers, list), "layers", self.layers, "a list of layer entries")
        _expect(
            isinstance(self.reserved, dict)
            and all(isinstance(k, str) and _is_int(v, 0) for k, v in self.reserved.items()),
            "reserved",
            self.reserved,
            "an object of byte counts",
        )
        _expect(
            isinstance(self.host_tables, list) and all(isinstance(t, str) for t in self.host_tables),
            "host_tables",
            self.host_tables,
            "a list of names",
        )
        _expect(isinstance(self.storage, dict), "storage", self.storage, "an object")
        for lp in self.layers:
            _expect(isinstance(lp, LayerPlan), "layers", lp, "layer entries")
            lp.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise ConfigError(f"not a hetegen_fx plan: a plan is a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", None)
        if version not in (1, FORMAT_VERSION):
            raise ConfigError(f"plan format version {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            entries = d.pop("layers")
            _expect(isinstance(entries, list), "layers", entries, "a list of layer entries")
            _expect(all(isinstance(lp, dict) for lp in entries), "layers", entries, "a list of objects")
            layers = [LayerPlan(**lp) for lp in entries]
            if version == 1:
                # staging buffer indices, not offsets: unknown (compiling lays the arena out anew)
                for lp in layers:
                    lp.slot = -1
            return cls(layers=layers, **d).validate()
        except (TypeError, KeyError) as e:
            raise ConfigError(f"not a hetegen_fx plan: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"not a hetegen_fx plan (invalid JSON: {e})") from e
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically (no partial file is left on failure)."""
        return atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"plan file {str(p)!r} does not exist; write one with Plan.save() or `hetegen generate --save-plan FILE`"
            )
        try:
            text = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read plan file {str(p)!r}: {e.strerror or e}") from e
        try:
            return cls.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"{str(p)!r}: {e}") from e


def _is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_real(v: object, low: float, high: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


def _expect(ok: bool, field: str, value: object, what: str, where: str = "plan") -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(
            f"not a valid hetegen_fx plan: {where}'s {field} must be {what}, got {shown}; make a new plan by "
            "compiling without plan= (and save it with Plan.save or --save-plan)"
        )


#: staging regions start at multiples of this many bytes
STAGING_ALIGN = 256


def _aligned(n: int) -> int:
    return -(-n // STAGING_ALIGN) * STAGING_ALIGN


def staging_size(parts: list[int], prefetch: int | None) -> int:
    """Bytes of the staging arena for GPU parts of ``parts`` bytes (in the order their copies are issued),
    laid out by :func:`staging_offsets`.

    ``prefetch=k``: the largest sum of ``k`` consecutive parts (the window wraps around: the next call's
    first copies follow the last ones), plus (for ``k`` ≥ 2) the largest part, which the layout may leave
    unused at the arena's end before it starts over: so any ``k`` consecutive parts are in the arena at once.
    ``None``: twice the largest part (the memory of two buffers for it), in two halves that take turns:
    any two consecutive parts are in the arena at once, and as many more as the halves hold.
    """
    sizes = [_aligned(n) for n in parts if n > 0]
    if not sizes:
        return 0
    if prefetch is None:
        return 2 * max(sizes)
    k = min(prefetch, len(sizes))
    ring = sizes + sizes[: k - 1]
    slack = max(sizes) if 1 < k < len(sizes) else 0  # one part alone never overlaps itself
    return max(sum(ring[i : i + k]) for i in range(len(sizes))) + slack


def staging_offsets(parts: list[int], prefetch: int | None) -> list[int]:
    """Where each GPU part goes in the arena of :func:`staging_size`: one after the other, first in first
    out. With ``prefetch=k`` a part that no longer fits before the arena's end starts over at 0; with
    ``None`` it moves to the start of the other half. A part of 0 bytes takes an empty region where the
    next part will start. A copy overwrites only regions whose GPU parts were issued before it, and waits
    for those alone (see :mod:`hetegen_fx.runtime`)."""
    size = staging_size(parts, prefetch)
    half = size // 2 if prefetch is None else size
    out, start, head = [], 0, 0  # the current half (or the whole arena) begins at start
    for n in parts:
        if n > 0 and head + n > start + half:
            start = (start + half) % size if prefetch is None else 0
            head = start
        out.append(head)
        head += _aligned(n)
    return out


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def load_plan(plan: Plan | str | os.PathLike | dict) -> Plan:
    """Accept a Plan, a dict, or a path to a plan's JSON file."""
    if isinstance(plan, Plan):
        return plan.validate()
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    return Plan.load(plan)
