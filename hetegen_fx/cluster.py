"""Several devices of different sizes and speeds (HexGen): the cost model of a layout, the scheduler that
chooses one, and the layout as data (:class:`ClusterPlan`).

Owns: :class:`DeviceSpec` / :class:`Cluster` (devices with their memory, matmul rate and memory bandwidth,
links with bandwidth and latency), :class:`ModelShape` (what the cost model needs of a model), the cost of a
layout (:func:`stage_time`, :func:`evaluate`), the scheduler (:func:`schedule`) and :class:`ClusterPlan`
(a table, JSON both ways, a picture).
Must not: run anything on a device. Executing a layout on torch.distributed is another module's.

**A layout** is a sequence of pipeline *stages*; each holds a contiguous range of the model's layers and a
group of devices that split its layers tensor-parallel (Megatron's pairing: q/k/v and gate/up by columns,
o and down by rows, two all-reduces of the hidden state per layer), its *TP degree* being the group's size,
which must divide the attention heads and the KV heads. Stages may differ in TP degree and in layer count
(the asymmetry HexGen adds to homogeneous layouts), and devices may be left out.

**The cost model** (batch 1, one decode token; :func:`stage_time`): a device reads its share of a layer's
weights and KV cache at its memory bandwidth (or computes it at its matmul rate for a prompt of ``tokens``
tokens, whichever is slower); the group waits for its slowest member; each all-reduce moves
``2 (t - 1) / t`` of the hidden state over the group's slowest link in ``2 (t - 1)`` steps of the link's
latency (a ring); a stage hands
its hidden state to the next over the link between them. Where a stage's share of weights does not fit a
device's memory (beside its KV cache and a reserve), the rest is offloaded the HeteGen way and read at the
device's ``offload_rate`` (the CPU and PCIe together, as :mod:`hetegen_fx.bench` measures them), up to its
host's memory. The last stage also reads ``lm_head`` whole on each of its devices (:func:`head_time`).
Latency is the sum of stage times and hand-offs; throughput (requests in flight fill the
pipeline) is one over the slowest stage.

**The scheduler** (:func:`schedule`) enumerates every way of putting the devices into groups (TP degrees that
divide the heads; a device may stay out) and every order of the groups, and, for each, distributes the layers
by dynamic programming over (stage, layers so far): minimising the sum of stage times for latency, the
largest for throughput (subject to ``latency_limit``). It returns the optimum of its own cost model, which
tests check against brute force on small cases. For clusters beyond :data:`MAX_DEVICES` it refuses (HexGen
searches those with a genetic algorithm).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import format_bytes, parse_bytes
from .errors import ConfigError

#: the most devices :func:`schedule` searches exhaustively
MAX_DEVICES = 8
#: bytes kept free on every device beside weights and KV cache (CUDA context, activations, workspace)
RESERVE = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: ``memory`` bytes, ``bandwidth`` (memory, bytes/s), ``flops`` (dense matmul at the
    model's dtype, FLOP/s), ``host`` (the machine it sits in: links within a host are faster),
    ``offload_rate`` (bytes/s at which weights that do not fit are read the HeteGen way, CPU and PCIe
    together; 0: no offload) and ``host_memory`` (bytes of RAM those may take)."""

    name: str
    memory: int
    bandwidth: float
    flops: float
    host: str = "host0"
    offload_rate: float = 0.0
    host_memory: int = 0


@dataclass(frozen=True)
class Link:
    """Bandwidth (bytes/s) and latency (s) between two devices (both directions)."""

    a: str
    b: str
    bandwidth: float
    latency: float = 10e-6


@dataclass
class Cluster:
    """Devices and the links between them; a pair without a link uses ``default_link`` within a host and
    ``cross_host_link`` between hosts."""

    devices: list[DeviceSpec]
    links: list[Link] = field(default_factory=list)
    default_link: tuple[float, float] = (25e9, 10e-6)  # PCIe within a host
    cross_host_link: tuple[float, float] = (3e9, 50e-6)  # 25 Gb/s Ethernet
    #: bytes kept free on every device beside weights and KV cache
    reserve: int = RESERVE

    def __post_init__(self) -> None:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ConfigError(f"device names must be unique, got {names}")
        self._by_name = {d.name: d for d in self.devices}
        self._links = {frozenset((lk.a, lk.b)): lk for lk in self.links}

    def device(self, name: str) -> DeviceSpec:
        return self._by_name[name]

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth, latency) between devices ``a`` and ``b``."""
        if a == b:
            return (math.inf, 0.0)
        lk = self._links.get(frozenset((a, b)))
        if lk is not None:
            return (lk.bandwidth, lk.latency)
        same = self._by_name[a].host == self._by_name[b].host
        return self.default_link if same else self.cross_host_link

    def to_dict(self) -> dict:
        return {
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "links": [dataclasses.asdict(lk) for lk in self.links],
            "default_link": list(self.default_link),
            "cross_host_link": list(self.cross_host_link),
            "reserve": self.reserve,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Cluster:
        try:
            devices = [
                DeviceSpec(
                    **{
                        **x,
                        "memory": parse_bytes(x["memory"]),
                        "host_memory": parse_bytes(x.get("host_memory", 0)),
                    }
                )
                for x in d["devices"]
            ]
            links = [Link(**x) for x in d.get("links", [])]
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"not a cluster description: {e}; give devices as "
                '[{"name": "a100-0", "memory": "80GiB", "bandwidth": 2.0e12, "flops": 3.1e14, "host": "h0"}, ...]'
            ) from None
        kw: dict = {k: tuple(d[k]) for k in ("default_link", "cross_host_link") if k in d}
        if "reserve" in d:
            kw["reserve"] = parse_bytes(d["reserve"])
        return cls(devices, links, **kw)


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer (all layers alike)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def layer_bytes(self) -> int:
        """Weights of one layer: q/o (hidden²), k/v (hidden × kv width), gate/up/down (hidden × intermediate)."""
        kv = self.hidden * self.kv_heads // self.heads
        return self.dtype_bytes * (
            2 * self.hidden**2 + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        )

    @property
    def layer_flops(self) -> int:
        """FLOPs of one layer for one token (two per weight)."""
        return self.layer_bytes // self.dtype_bytes * 2

    def kv_bytes(self, tokens: int) -> int:
        """One layer's KV cache for ``tokens`` tokens."""
        return 2 * tokens * self.hidden * self.kv_heads // self.heads * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes + 2 * self.vocab * self.hidden * self.dtype_bytes

    @classmethod
    def from_config(cls, config, name: str = "", dtype_bytes: int = 2) -> ModelShape:
        """From a Hugging Face config (Llama, Qwen2, Mistral, GPT-2 names)."""
        g = functools.partial(getattr, config)
        hidden = g("hidden_size", None) or g("n_embd")
        heads = g("num_attention_heads", None) or g("n_head")
        return cls(
            name=name or g("name_or_path", "") or type(config).__name__,
            layers=g("num_hidden_layers", None) or g("n_layer"),
            hidden=hidden,
            intermediate=g("intermediate_size", None) or g("n_inner", None) or 4 * hidden,
            heads=heads,
            kv_heads=g("num_key_value_heads", None) or heads,
            vocab=g("vocab_size"),
            dtype_bytes=dtype_bytes,
        )


@dataclass
class Stage:
    """Layers ``[start, stop)`` on ``devices`` (tensor-parallel over all of them); the cost model's figures:
    ``seconds`` (one token), ``offloaded`` (bytes per device read the HeteGen way)."""

    start: int
    stop: int
    devices: list[str]
    seconds: float = 0.0
    offloaded: int = 0

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def layers(self) -> int:
        return self.stop - self.start


def _group_ok(shape: ModelShape, tp: int) -> bool:
    return shape.heads % tp == 0 and shape.kv_heads % tp == 0


def stage_time(
    cluster: Cluster, shape: ModelShape, devices: tuple[str, ...], layers: int, context: int, tokens: int = 1
) -> tuple[float, int]:
    """Seconds of ``layers`` layers on ``devices`` (TP over all of them) for ``tokens`` new tokens after a
    context of ``context`` tokens, and the bytes each device offloads (see the module); ``(inf, ...)`` when
    the devices cannot hold them even with offload."""
    if layers == 0:
        return 0.0, 0
    tp = len(devices)
    weights = layers * shape.layer_bytes / tp
    kv = layers * shape.kv_bytes(context + tokens) / tp
    worst, offloaded = 0.0, 0
    for name in devices:
        d = cluster.device(name)
        room = d.memory - cluster.reserve - kv
        if room < 0:
            return math.inf, 0
        over = max(0.0, weights - room)
        if over > 0 and (d.offload_rate <= 0 or over > d.host_memory):
            return math.inf, 0
        resident = weights - over
        read = (resident + kv) / d.bandwidth + (over / d.offload_rate if over else 0.0)
        compute = layers * shape.layer_flops * tokens / tp / d.flops
        worst = max(worst, read, compute)
        offloaded = max(offloaded, int(over))
    if tp > 1:
        bw, lat = min((cluster.link(a, b) for a, b in itertools.combinations(devices, 2)), key=lambda x: x[0])
        moved = 2 * (tp - 1) / tp * shape.hidden * shape.dtype_bytes * tokens
        worst += layers * 2 * (moved / bw + 2 * (tp - 1) * lat)  # a ring: 2 (t - 1) steps, each a latency
    return worst, offloaded


def head_time(cluster: Cluster, shape: ModelShape, devices: tuple[str, ...], tokens: int = 1) -> float:
    """The last stage's ``lm_head`` (not split: every device of the stage reads it whole, as
    :mod:`hetegen_fx.passes.shard` leaves it), at the slowest device's memory bandwidth or matmul rate."""
    read = shape.vocab * shape.hidden * shape.dtype_bytes
    flops = 2 * shape.vocab * shape.hidden * tokens
    return max(max(read / cluster.device(d).bandwidth, flops / cluster.device(d).flops) for d in devices)


def hop_time(
    cluster: Cluster, shape: ModelShape, a: tuple[str, ...], b: tuple[str, ...], tokens: int = 1
) -> float:
    """One stage handing its hidden state to the next (the fastest pair of their devices)."""
    bw, lat = max((cluster.link(x, y) for x in a for y in b), key=lambda v: v[0])
    return shape.hidden * shape.dtype_bytes * tokens / bw + lat


@dataclass
class ClusterPlan:
    """A layout of a model on a cluster (see the module), with its predicted latency (s per token at batch 1)
    and throughput (tokens/s with the pipeline full)."""

    model: str
    stages: list[Stage]
    objective: str
    latency_s: float
    throughput: float
    context: int
    cluster: dict = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'stage':<6} {'layers':<10} {'TP':>3}  {'devices':<40} {'ms/token':>9} {'offloaded':>11}"]
        rows.append("-" * len(rows[0]))
        for i, s in enumerate(self.stages):
            devs = ", ".join(s.devices)
            rows.append(
                f"{i:<6} {f'{s.start}-{s.stop - 1}':<10} {s.tp:>3}  {devs[:40]:<40} {s.seconds * 1e3:9.2f} "
                f"{format_bytes(s.offloaded) if s.offloaded else '-':>11}"
            )
        rows.append("-" * len(rows[0]))
        rows.append(
            f"{self.model}: {len(self.stages)} stages, predicted {self.latency_s * 1e3:.2f} ms/token at batch 1, "
            f"{self.throughput:.1f} tokens/s with the pipeline full (objective: {self.objective}, context "
            f"{self.context})" + (f"; unused: {', '.join(self.unused)}" if self.unused else "")
        )
        return "\n".join(rows)

    __str__ = table

    def layout(self) -> list[tuple[int, int, int]]:
        """The stages as :func:`hetegen_fx.distributed.compile_stage` takes them: ``(start, stop, tp)``."""
        return [(s.start, s.stop, s.tp) for s in self.stages]

    def processes(self) -> list[str]:
        """The device of each process of :meth:`layout`, in rank order (a stage's devices, stage after stage)."""
        return [d for s in self.stages for d in s.devices]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ClusterPlan:
        try:
            d = json.loads(text)
            d["stages"] = [Stage(**s) for s in d["stages"]]
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"not a hetegen_fx cluster plan: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        from .plan import atomic_write

        return atomic_write(path, self.to_json())

    def plot(self, path: str | os.PathLike) -> None:
        """Stages as boxes along the layers, one row per device, labelled with TP degree and time."""
        from .plot import _pyplot

        plt = _pyplot()
        devices = [d for s in self.stages for d in s.devices] + list(self.unused)
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(devices) + 1.4))
        colors = plt.get_cmap("tab10")
        for i, s in enumerate(self.stages):
            for d in s.devices:
                y = devices.index(d)
                ax.barh(y, s.layers, left=s.start, color=colors(i % 10), edgecolor="black")
                ax.text(
                    s.start + s.layers / 2,
                    y,
                    f"TP{s.tp} {s.seconds * 1e3:.1f} ms",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
        ax.set_yticks(range(len(devices)), devices, fontsize=8)
        ax.set_xlabel("layers")
        ax.invert_yaxis()
        ax.set_title(
            f"{self.model}: {self.latency_s * 1e3:.1f} ms/token, {self.throughput:.1f} tok/s", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _partitions(items: list[str]):
    """Every set partition of ``items`` (lists of blocks)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1 :]
        yield [[first], *part]


def _signature(cluster: Cluster, name: str):
    """What makes two devices interchangeable to the cost model: their spec and host (with no link named
    for them; a device with a link of its own is only itself)."""
    d = cluster.device(name)
    if any(name in (lk.a, lk.b) for lk in cluster.links):
        return (name,)
    return (d.memory, d.bandwidth, d.flops, d.host, d.offload_rate, d.host_memory)


def _groupings(cluster: Cluster, shape: ModelShape):
    """Every set of device groups (a device may stay out) whose sizes divide the heads, once per class of
    groupings that interchanging identical devices maps onto each other."""
    names = [d.name for d in cluster.devices]
    sig = {n: _signature(cluster, n) for n in names}
    seen = set()
    for used_mask in range(1, 1 << len(names)):
        used = [n for i, n in enumerate(names) if used_mask >> i & 1]
        for part in _partitions(used):
            if not all(_group_ok(shape, len(g)) for g in part):
                continue
            key = tuple(sorted(tuple(sorted(map(repr, (sig[n] for n in g)))) for g in part))
            if key in seen:
                continue
            seen.add(key)
            yield [tuple(g) for g in part], [n for n in names if n not in used]


def _layers_dp(times, hops, layers: int, objective: str, head: float = 0.0):
    """Best split of ``layers`` over groups in order: ``times[g][n]`` = seconds of n layers on group g
    (each group at least one layer), ``hops[g]`` = hand-off after group g, ``head`` = the last group's
    ``lm_head``. Returns (cost, counts)."""
    k = len(times)
    if k > layers:
        return math.inf, None
    best = {0: (0.0, [])}  # layers so far → (cost, counts), after the groups seen
    for g in range(k):
        nxt: dict[int, tuple[float, list[int]]] = {}
        left_groups = k - g - 1
        for done, (cost, counts) in best.items():
            for n in range(1, layers - done - left_groups + 1):
                t = times[g][n]
                if t == math.inf:
                    break  # more layers only take more memory
                hop = hops[g] if g < k - 1 else head
                c = cost + t + hop if objective == "latency" else max(cost, t + hop)
                key = done + n
                if key not in nxt or c < nxt[key][0]:
                    nxt[key] = (c, [*counts, n])
        best = nxt
    return best.get(layers, (math.inf, None))


def schedule(
    cluster: Cluster,
    shape: ModelShape,
    objective: str = "latency",
    context: int = 1024,
    latency_limit: float | None = None,
) -> ClusterPlan:
    """The layout that minimises batch-1 latency (``objective="latency"``) or maximises throughput with the
    pipeline full (``"throughput"``, at a latency of at most ``latency_limit`` seconds per token when given),
    over every grouping and order of the devices (see the module). Raises :class:`ConfigError` when no
    layout holds the model, saying how much memory it would need."""
    if objective not in ("latency", "throughput"):
        raise ConfigError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    if len(cluster.devices) > MAX_DEVICES:
        raise ConfigError(
            f"{len(cluster.devices)} devices: the scheduler searches at most {MAX_DEVICES} exhaustively; split "
            "the cluster into replicas of at most that many"
        )
    best: tuple[float, ClusterPlan] | None = None
    cache: dict[tuple[str, ...], list[float]] = {}
    for groups, unused in _groupings(cluster, shape):
        for g in groups:
            if g not in cache:
                cache[g] = [stage_time(cluster, shape, g, n, context)[0] for n in range(shape.layers + 1)]
        for order in itertools.permutations(groups) if len(groups) <= 4 else [groups]:
            times = [cache[g] for g in order]
            hops = [hop_time(cluster, shape, order[i], order[i + 1]) for i in range(len(order) - 1)]
            head = head_time(cluster, shape, order[-1])
            cost, counts = _layers_dp(times, hops, shape.layers, objective, head)
            if counts is None:
                continue
            plan = _plan(cluster, shape, list(order), counts, objective, context, unused)
            if latency_limit is not None and plan.latency_s > latency_limit:
                continue
            key = plan.latency_s if objective == "latency" else -plan.throughput
            if best is None or key < best[0] - 1e-15:
                best = (key, plan)
    if best is None:
        total = sum(d.memory + d.host_memory for d in cluster.devices)
        raise ConfigError(
            f"no layout of {shape.name} ({format_bytes(shape.total_bytes)}) on these {len(cluster.devices)} "
            f"devices holds it within their memory and offload room ({format_bytes(total)} in all, less "
            f"{format_bytes(cluster.reserve)} per device and the KV cache of {context} tokens)"
            + (f" at a latency of at most {latency_limit * 1e3:.1f} ms/token" if latency_limit else "")
            + ": add devices or host memory for offload, or use a smaller context"
        )
    return best[1]


def _plan(cluster, shape, groups, counts, objective, context, unused) -> ClusterPlan:
    stages, start = [], 0
    for i, (g, n) in enumerate(zip(groups, counts, strict=True)):
        t, off = stage_time(cluster, shape, g, n, context)
        if i == len(groups) - 1:
            t += head_time(cluster, shape, g)
        stages.append(Stage(start, start + n, list(g), t, off))
        start += n
    hops = [
        hop_time(cluster, shape, tuple(a.devices), tuple(b.devices)) for a, b in itertools.pairwise(stages)
    ]
    latency = sum(s.seconds for s in stages) + sum(hops)
    slowest = max(s.seconds + (hops[i] if i < len(hops) else 0.0) for i, s in enumerate(stages))
    return ClusterPlan(
        model=shape.name,
        stages=stages,
        objective=objective,
        latency_s=latency,
        throughput=1.0 / slowest if slowest > 0 else math.inf,
        context=context,
        cluster=cluster.to_dict(),
        unused=list(unused),
    )


def homogeneous(
    cluster: Cluster, shape: ModelShape, tp: int, context: int = 1024, objective: str = "latency"
) -> ClusterPlan:
    """The usual layout to compare with: every device used, groups of ``tp`` in the devices' order, the layers
    split as evenly as possible (Megatron's TP × PP)."""
    names = [d.name for d in cluster.devices]
    if len(names) % tp or not _group_ok(shape, tp):
        raise ConfigError(f"TP {tp} must divide the {len(names)} devices and the model's heads")
    groups = [tuple(names[i : i + tp]) for i in range(0, len(names), tp)]
    k = len(groups)
    counts = [shape.layers // k + (1 if i < shape.layers % k else 0) for i in range(k)]
    return _plan(cluster, shape, groups, counts, objective, context, [])


def _mixed_8() -> Cluster:
    """A mixed set of eight GPUs over three hosts, like HexGen's heterogeneous settings: 2 A100-80GB (SXM,
    2.0 TB/s, 312 TFLOP/s fp16, NVLink between them), 4 RTX A6000 (48 GB, 768 GB/s, 155 TFLOP/s), 2 RTX 3090
    (24 GB, 936 GB/s, 71 TFLOP/s); PCIe 4.0 within a host, 25 Gb/s Ethernet between hosts; datasheet numbers."""
    d = [DeviceSpec(f"a100-{i}", 80 * 2**30, 2.0e12, 312e12, "host-a") for i in range(2)]
    d += [DeviceSpec(f"a6000-{i}", 48 * 2**30, 768e9, 155e12, "host-b") for i in range(4)]
    d += [DeviceSpec(f"3090-{i}", 24 * 2**30, 936e9, 71e12, "host-c") for i in range(2)]
    return Cluster(d, links=[Link("a100-0", "a100-1", 300e9, 5e-6)])


#: named clusters for ``hetegen cluster --example NAME``
EXAMPLES = {"mixed-8": _mixed_8}


def load_cluster(path: str | os.PathLike) -> Cluster:
    """A cluster from a JSON file (:meth:`Cluster.to_dict`'s form)."""
    p = Path(path)
    try:
        return Cluster.from_dict(json.loads(p.read_text()))
    except OSError as e:
        raise ConfigError(f"cannot read the cluster description {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not JSON: {e}") from None
