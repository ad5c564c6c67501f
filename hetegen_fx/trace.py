"""Measured timelines of compiled graphs: copies, CPU parts and GPU work, as a Chrome/Perfetto trace.

Owns: :func:`record`, the :class:`Timeline` it fills and :func:`run_recorded`, which the launcher
(:mod:`hetegen_fx.launch`) calls instead of the program while a recording is open. Must not: change results,
or run anything when no recording is on.

    with hetegen_fx.trace.record() as timelines:
        compiled.generate(ids, max_new_tokens=2)       # or compiled(x) for a CompiledModule
    decode = timelines[-1]                             # one Timeline per graph call
    decode.save("decode.json")                         # open in ui.perfetto.dev or chrome://tracing
    decode.plot("decode.png")

While recording, each call of a compiled graph runs node by node under :class:`TimelineInterpreter`:
GPU work is timed with CUDA events on the compute stream, copies with CUDA events on the copy stream (the
runtime records them), CPU jobs with the worker's own stamps (:attr:`hetegen_fx.host.HostWorker.log`), and the launching
thread's own work ("host": queueing jobs, moves, waits) with host timestamps; everything is placed on one clock
(a CUDA event recorded on an idle device at the same instant as the host's start time). Recording
synchronises the device once per call and adds per-node overhead: use it to look, not to time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from . import meta
from .ops import COPY, CPU_BEGIN, is_op
from .plan import atomic_write
from .runtime import get_runtime

#: lanes of the timeline, in display order
LANES = ("PCIe", "CPU", "GPU", "host")


class Event(NamedTuple):
    lane: str  # "PCIe" (copy stream), "CPU" (CPU parts), "GPU" (compute stream), "host" (transfers, waits)
    name: str  # the FX node
    start: float  # seconds from the start of the call
    end: float


@dataclass
class Timeline:
    """What one call of a compiled graph did, and when."""

    events: list[Event] = field(default_factory=list)
    label: str = ""
    #: what changed before this call, since the previous one recorded: residency changes (promotions and
    #: demotions, :class:`hetegen_fx.ledger.ResidencyChange` as text) and the graph compiled again for them
    changes: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def busy(self, lane: str) -> float:
        """Seconds ``lane`` was busy (overlapping events counted once)."""
        return _union([(e.start, e.end) for e in self.events if e.lane == lane])

    def overlap(self, lane_a: str, lane_b: str) -> float:
        """Seconds during which both lanes were busy: e.g. copies in flight while the CPU computes."""
        a = _merge([(e.start, e.end) for e in self.events if e.lane == lane_a])
        b = _merge([(e.start, e.end) for e in self.events if e.lane == lane_b])
        total, i, j = 0.0, 0, 0
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            total += max(0.0, hi - lo)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return total

    def to_chrome(self) -> dict:
        """Chrome trace-event JSON (microseconds), one thread per lane."""
        tids = {lane: i for i, lane in enumerate(LANES)}
        events: list[dict] = [
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": lane}}
            for lane, tid in tids.items()
        ]
        events += [
            {
                "ph": "X",
                "name": e.name,
                "cat": e.lane,
                "pid": 1,
                "tid": tids[e.lane],
                "ts": e.start * 1e6,
                "dur": max(e.end - e.start, 0.0) * 1e6,
            }
            for e in self.events
        ]
        events += [  # what happened before the call: instant events at its start, on the host lane
            {"ph": "i", "s": "g", "name": c, "cat": "residency", "pid": 1, "tid": tids["host"], "ts": 0.0}
            for c in self.changes
        ]
        other = {"label": self.label, "changes_before": list(self.changes)}
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the Chrome/Perfetto trace JSON (atomically)."""
        return atomic_write(path, json.dumps(self.to_chrome()))

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """A PNG/SVG of the lanes over time."""
        from .plot import SIDE_COLORS, _pyplot

        plt = _pyplot()
        colors = {
            "PCIe": SIDE_COLORS["copy"],
            "CPU": SIDE_COLORS["cpu"],
            "GPU": SIDE_COLORS["gpu"],
            "host": "#9E9E9E",
        }
        lanes = [lane for lane in LANES if any(e.lane == lane for e in self.events)]
        fig, ax = plt.subplots(figsize=(11, 1 + 0.7 * len(lanes)))
        for y, lane in enumerate(reversed(lanes)):
            bars = [(e.start * 1e3, (e.end - e.start) * 1e3) for e in self.events if e.lane == lane]
            ax.broken_barh(bars, (y - 0.35, 0.7), color=colors[lane], edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
        ax.set_xlabel("ms")
        heading = title or (
            f"{self.label}: {self.duration * 1e3:.2f} ms, copies overlapping CPU parts "
            f"{self.overlap('PCIe', 'CPU') * 1e3:.2f} ms"
        )
        if self.changes:  # a promotion or demotion before this call: a line each (the last three)
            ax.axvline(0, color="#2E7D32", linewidth=2)
            heading += "".join(f"\nbefore this call: {c}" for c in self.changes[-3:])
        ax.set_title(heading, fontsize=9 if self.changes else None)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _union(spans: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in _merge(spans))


_LANE_OF_SIDE = {"cpu": "CPU", "gpu": "GPU", "move": "host", "sync": "host", "host": "host"}


class TimelineInterpreter(fx.Interpreter):
    """Runs a compiled graph node by node and records when each piece of work ran."""

    def __init__(self, gm: fx.GraphModule, device: str) -> None:
        super().__init__(gm)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.runtime = get_runtime(self.device)
        self._pending: list[
            tuple[str, str, Any, Any]
        ] = []  # (lane, name, start, end): events or host seconds

    def run_timed(self, *args: Any) -> tuple[Any, Timeline]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._t0 = time.perf_counter()
        self.runtime.copy_log = []
        host = self.runtime.host
        host.log, self._jobs = [], {}
        try:
            out = self.run(*args)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            host.drain()
            for seq, start, end in host.log:
                self._pending.append(("CPU", self._jobs.get(seq, f"cpu job {seq}"), start, end))
        finally:
            self.runtime.copy_log = host.log = None
        return out, Timeline([self._resolve(*p) for p in self._pending], label=_label(self.module))

    def _resolve(self, lane: str, name: str, start: Any, end: Any) -> Event:
        if isinstance(start, float):
            return Event(lane, name, start - self._t0, end - self._t0)
        return Event(lane, name, self._base.elapsed_time(start) / 1e3, self._base.elapsed_time(end) / 1e3)

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        side = n.meta.get(meta.SIDE)
        if is_op(n.target, COPY):
            before = len(self.runtime.copy_log)
            out = super().run_node(n)
            for start, end in self.runtime.copy_log[before:]:
                self._pending.append(("PCIe", n.name, start, end))
            return out
        if is_op(n.target, CPU_BEGIN):  # queued here ("host"); the worker's log times the job itself
            t0 = time.perf_counter()
            out = super().run_node(n)
            self._jobs[int(out)] = n.name
            self._pending.append(("host", n.name, t0, time.perf_counter()))
            return out
        lane = _LANE_OF_SIDE.get(side, "GPU")  # nodes PartitionPass did not add run on the device
        if lane == "GPU" and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = super().run_node(n)
            end.record()
            self._pending.append((lane, n.name, start, end))
            return out
        t0 = time.perf_counter()
        out = super().run_node(n)
        self._pending.append((lane, n.name, t0, time.perf_counter()))
        return out


def _label(gm: fx.GraphModule) -> str:
    """The graph's Plan label and token count, e.g. "graph inputs [(1, 1)] (1 token)"."""
    plan = gm.meta.get(meta.PLAN)
    if plan is None:
        return type(gm).__name__
    return f"{plan.label or type(gm).__name__} ({plan.tokens} token{'s' if plan.tokens != 1 else ''})"


_RECORDING: list[list[Timeline]] = []


@contextlib.contextmanager
def record() -> Iterator[list[Timeline]]:
    """Record a :class:`Timeline` for every call of a hetegen_fx-compiled graph inside the block."""
    timelines: list[Timeline] = []
    _RECORDING.append(timelines)
    try:
        yield timelines
    finally:
        _RECORDING.remove(timelines)
        if not _RECORDING:  # changes no recorded call came after are not carried to a later recording
            _CHANGES.clear()


#: changes since the last recorded call of their model's graphs, for its next Timeline: (owner, text)
_CHANGES: list[tuple[int, str]] = []


def note(change: str, owner: object = None) -> None:
    """Remember ``change`` (a residency change, a graph compiled again) of ``owner``'s model (its weight
    store) for the next recorded call of one of its graphs (:attr:`Timeline.changes`); nothing when no
    recording is open."""
    if _RECORDING:
        _CHANGES.append((id(owner), change))


def recording() -> bool:
    """Whether a :func:`record` block is open (the launcher then runs graphs through :func:`run_recorded`)."""
    return bool(_RECORDING)


def run_recorded(gm: fx.GraphModule, device: str, args: tuple, owner: object = None) -> Any:
    """Run ``gm`` (a graph of ``owner``'s model) node by node on ``args``, adding its :class:`Timeline`, with
    the changes noted for that model since its last recorded call, to the innermost :func:`record`."""
    out, timeline = TimelineInterpreter(gm, device).run_timed(*args)
    mine = id(owner)
    timeline.changes = [text for who, text in _CHANGES if who == mine]
    _CHANGES[:] = [(who, text) for who, text in _CHANGES if who != mine]
    _RECORDING[-1].append(timeline)
    return out
