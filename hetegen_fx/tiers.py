"""The storage tier's arithmetic: which rows of the offloaded Linears stay in RAM under ``cpu_memory``, and
the least ``cpu_memory`` a model can run in.

Owns: :func:`host_rows` (the choice, by policy) and :func:`check_minimum` (what must be in RAM whatever the
choice: the weights that are not deferred Linears, and the ring). PlacementPass calls them and writes the
result into the Plan; the weight store and the storage reader apply it.
Must not: read weights or touch the device.

Policies (``Config.storage_policy``), for the offloaded Linears whose weights stay in their checkpoint:

* ``"balanced"`` (FlexInfer's balanced memory locking and tensor preservation): Linears are grouped by
  *kind*, their name with the layer index taken out (``model.layers.*.mlp.down_proj.weight``). Kinds are
  kept in RAM whole in the order of the time a storage read of them costs per byte (a read's latency over
  its bytes, plus one over the read rate: the smallest Linears first, where each read's latency weighs
  most), and the first kind that no longer fits keeps the same share of rows in every one of its Linears.
  So every layer reads the same bytes from storage, and the reads spread evenly over a step.
* ``"layered"``: Linears in graph order, each kept whole while RAM lasts; the first that does not fit keeps
  what fits, the rest are read whole. The first layers then read nothing and the last read everything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import format_bytes
from .errors import ConfigError
from .plan import LayerPlan

#: RAM rows are kept in multiples of this for Linears of at least 1024 output features (as CPU splits are)
ROW_QUANTUM = 64


def kind(name: str) -> str:
    """``model.layers.12.mlp.down_proj.weight`` → ``model.layers.*.mlp.down_proj.weight``."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _rows_for(lp: LayerPlan, nbytes: float) -> int:
    """The most rows of ``lp`` whose bytes fit ``nbytes``, rounded down to the quantum."""
    if nbytes <= 0 or not lp.out_features:
        return 0
    row = lp.bytes / lp.out_features
    rows = min(lp.out_features, int(nbytes // max(row, 1e-9)))
    q = ROW_QUANTUM if lp.out_features >= 1024 else 1
    return rows // q * q if rows < lp.out_features else rows


def host_rows(
    layers: Sequence[LayerPlan],
    deferred: set[str],
    room: int,
    policy: str = "balanced",
    read_rate: float = 0.0,
    read_latency: float = 0.0,
) -> dict[str, int]:
    """Rows kept in RAM (``[0, r)``; the rest in storage) of every offloaded Linear in ``deferred`` (those
    whose weight stays in its checkpoint), within ``room`` bytes of RAM for their rows; see the module."""
    cands = [lp for lp in layers if not lp.resident and lp.name in deferred]
    total = sum(lp.bytes for lp in cands)
    if total <= room:
        return {lp.name: lp.out_features for lp in cands}
    rows: dict[str, int] = {}
    left = float(max(room, 0))
    if policy == "layered":
        for lp in cands:
            r = lp.out_features if lp.bytes <= left else _rows_for(lp, left)
            rows[lp.name] = r
            left -= lp.bytes * r / max(lp.out_features, 1)
        return rows
    kinds: dict[str, list[LayerPlan]] = {}
    for lp in cands:
        kinds.setdefault(kind(lp.name), []).append(lp)

    def cost_per_byte(members: list[LayerPlan]) -> float:
        mean = sum(lp.bytes for lp in members) / len(members)
        rate = read_rate if read_rate > 0 else 1.0
        return read_latency / max(mean, 1.0) + 1.0 / rate

    for members in sorted(kinds.values(), key=cost_per_byte, reverse=True):
        nbytes = sum(lp.bytes for lp in members)
        if nbytes <= left:
            rows.update((lp.name, lp.out_features) for lp in members)
            left -= nbytes
            continue
        share = left / nbytes if nbytes else 0.0  # the same share of every Linear of the kind
        for lp in members:
            r = _rows_for(lp, lp.bytes * share)
            rows[lp.name] = r
            left -= lp.bytes * r / max(lp.out_features, 1)
        left = 0.0
    return rows


def check_minimum(cpu_memory: int, other: int, slots: int, largest: int) -> int:
    """The least ``cpu_memory``: the weights that stay in RAM whatever the choice (``other`` bytes) and the
    ring of ``slots`` slots of the ``largest`` Linear; a :class:`ConfigError` saying so when ``cpu_memory`` is
    below it. Returns it."""
    least = other + slots * largest
    if cpu_memory < least:
        raise ConfigError(
            f"cpu_memory {format_bytes(cpu_memory)} is below the {format_bytes(least)} this model needs in host "
            f"memory at least: its weights other than the Linears' ({format_bytes(other)}: embeddings, norms, "
            f"biases) stay in RAM, and the storage ring holds {slots} slots of the largest Linear "
            f"({format_bytes(largest)}). Give cpu_memory of at least {format_bytes(least)}, or a smaller ring "
            "(storage_slots=2)"
        )
    return least
