"""HexGen's layouts in several processes, on torch.distributed: pipeline stages of their own layer counts,
each tensor-parallel over its own number of processes.

A layout lists its stages in order, each ``(start, stop)`` (its decoder layers) or ``(start, stop, tp)`` (and
its tensor-parallel degree, default 1). Stage ``s`` runs in ``tp_s`` processes, the global ranks after the
previous stages' (so stages of TP 2, 1, 1 are ranks 0-1, 2 and 3). The hidden state goes from process ``i`` of
a stage to every process ``j`` of the next with ``j % tp_prev == i`` (after its stage's all-reduce each process
of a stage holds the whole hidden state); the last stage's first process broadcasts the logits to all.

Owns: :func:`compile_stage` (one process's part of a layout: ``hetegen_fx.compile`` with the
:class:`~hetegen_fx.passes.stages.StageSplitPass` and, for TP > 1, the
:class:`~hetegen_fx.passes.shard.ShardPass` in front of the pipeline), :func:`roles` (what a process does in a
layout), the tensor-parallel process groups, the transfers and collectives the stage ops make (:func:`send`,
:func:`recv`, :func:`broadcast`, :func:`all_reduce`: gloo on the host, so that everything runs without a GPU; a
CUDA tensor goes through the host), their errors, and :func:`spawn` (a run of every process on this machine,
as tests and the command line start them; ``torchrun`` starts the same processes elsewhere). Must not: place
or split anything itself (the passes do).

Every process runs the same ``generate`` on the same prompt: the last stage's logits are broadcast to all, so
each picks the same token, and each process keeps the KV cache of its own layers and heads. A process that
dies or stops answering ends the others' transfers with :class:`StageError` within ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, HetegenError

#: seconds a transfer waits for its peer before the run is given up
DEFAULT_TIMEOUT = 60.0


class StageError(HetegenError):
    """A pipeline stage's transfer failed: another stage's process died, stopped answering or raised."""


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            "pipeline stages need torch.distributed initialised in every process (torchrun, or "
            "hetegen_fx.distributed.spawn): torch.distributed.init_process_group('gloo', ...)"
        )
    return dist


def _failed(what: str, peer: int, e: BaseException) -> StageError:
    return StageError(
        f"stage transfer failed: {what} rank {peer} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        "another stage's process died, raised or stopped answering: every process of the run stops"
    )


def send(x: torch.Tensor, dst: int) -> None:
    """``x`` to rank ``dst``; nothing for ``dst = -1`` (see :class:`~hetegen_fx.passes.stages.StageSplitPass`)."""
    if dst < 0:
        return
    dist = _dist()
    try:
        dist.send(x.detach().to("cpu").contiguous(), dst)
    except RuntimeError as e:
        raise _failed("sending the hidden state to", dst, e) from None


def recv(shape: Sequence[int], dtype: torch.dtype, src: int, device: str) -> torch.Tensor:
    dist = _dist()
    buf = torch.empty(list(shape), dtype=dtype)
    try:
        dist.recv(buf, src)
    except RuntimeError as e:
        raise _failed("receiving the hidden state from", src, e) from None
    return buf.to(device)


def broadcast(x: torch.Tensor, src: int) -> torch.Tensor:
    dist = _dist()
    t = x.detach().to("cpu").contiguous()
    try:
        dist.broadcast(t, src)
    except RuntimeError as e:
        raise _failed("receiving the logits from", src, e) from None
    return t.to(x.device)


#: the tensor-parallel process groups of this process's layout: global ranks → group
_GROUPS: dict[tuple[int, ...], Any] = {}


def make_groups(layout: Sequence[Sequence[int]]) -> None:
    """Create the process group of every stage of ``layout`` with TP > 1 (every process must create every
    group, in the same order: torch.distributed's rule), once per layout."""
    dist = _dist()
    for group in stage_ranks(layout):
        if len(group) > 1 and group not in _GROUPS:
            _GROUPS[group] = dist.new_group(list(group))


def all_reduce(x: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """The sum of ``x`` over the processes of a stage (a row-parallel Linear's partial outputs)."""
    dist = _dist()
    key = tuple(group)
    if key not in _GROUPS:
        raise ConfigError(
            f"no process group for ranks {list(key)}: compile tensor-parallel stages with "
            "hetegen_fx.distributed.compile_stage, which creates them"
        )
    t = x.detach().to("cpu").contiguous()
    if t.data_ptr() == x.data_ptr():  # the sum is made in place: never in the caller's tensor
        t = t.clone()
    try:
        dist.all_reduce(t, group=_GROUPS[key])
    except RuntimeError as e:
        raise _failed(f"summing a row-parallel Linear over ranks {list(key)} with", key[0], e) from None
    return t.to(x.device)


@dataclass(frozen=True)
class Roles:
    """What the process of global rank ``rank`` does in a layout: its ``stage`` (of ``stages``), its decoder
    ``layers`` ``(start, stop)``, its place ``tp_rank`` among the ``tp`` processes of its stage (global ranks
    ``group``), where its hidden state comes from (``recv_from``; None on the first stage) and goes to
    (``send_to``), and the rank that broadcasts the logits (``logits_from``)."""

    rank: int
    ranks: int
    stage: int
    stages: int
    layers: tuple[int, int]
    tp_rank: int
    tp: int
    group: tuple[int, ...]
    recv_from: int | None
    send_to: tuple[int, ...]
    logits_from: int


def stage_ranks(layout: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The global ranks of each stage of ``layout``, in order."""
    out, first = [], 0
    for st in layout:
        tp = int(st[2]) if len(st) > 2 else 1
        out.append(tuple(range(first, first + tp)))
        first += tp
    return out


def roles(layout: Sequence[Sequence[int]], rank: int) -> Roles:
    """The :class:`Roles` of global ``rank`` in ``layout`` (see the module)."""
    groups = stage_ranks(layout)
    ranks = sum(len(g) for g in groups)
    if not 0 <= rank < ranks:
        raise ConfigError(f"rank {rank} is outside the layout's {ranks} processes")
    s = next(i for i, g in enumerate(groups) if rank in g)
    group, i = groups[s], groups[s].index(rank)
    prev = groups[s - 1] if s > 0 else None
    nxt = groups[s + 1] if s + 1 < len(groups) else None
    return Roles(
        rank=rank,
        ranks=ranks,
        stage=s,
        stages=len(groups),
        layers=(int(layout[s][0]), int(layout[s][1])),
        tp_rank=i,
        tp=len(group),
        group=group,
        recv_from=prev[i % len(prev)] if prev else None,
        send_to=tuple(r for j, r in enumerate(nxt) if j % len(group) == i) if nxt else (),
        logits_from=groups[-1][0],
    )


def stage_roles(stage: dict) -> Roles:
    """The :class:`Roles` a ``Config.pipeline_stage`` names: ``{"rank": r, "layout": [...]}``, or the
    pipeline-only form ``{"rank": r, "ranks": n, "layers": [start, stop]}`` (rank r is stage r)."""
    if "layout" in stage:
        return roles(stage["layout"], stage["rank"])
    rank, ranks = stage["rank"], stage["ranks"]
    return Roles(
        rank=rank,
        ranks=ranks,
        stage=rank,
        stages=ranks,
        layers=tuple(stage["layers"]),
        tp_rank=0,
        tp=1,
        group=(rank,),
        recv_from=rank - 1 if rank > 0 else None,
        send_to=(rank + 1,) if rank + 1 < ranks else (),
        logits_from=ranks - 1,
    )


def even_layout(layers: int, stages: int) -> list[tuple[int, int]]:
    """``stages`` contiguous layer ranges of sizes as equal as possible."""
    if not 1 <= stages <= layers:
        raise ConfigError(f"{stages} stages for {layers} layers: give between 1 and {layers}")
    out, start = [], 0
    for s in range(stages):
        n = layers // stages + (1 if s < layers % stages else 0)
        out.append((start, start + n))
        start += n
    return out


def check_layout(layout: Sequence[Sequence[int]], layers: int) -> list[tuple[int, int, int]]:
    """``layout`` (one ``(start, stop)`` or ``(start, stop, tp)`` per stage) covering ``[0, layers)`` in order,
    each stage non-empty, each TP degree at least 1; returned as ``(start, stop, tp)``."""
    try:
        out = [(int(st[0]), int(st[1]), int(st[2]) if len(st) > 2 else 1) for st in layout]
        ok = all(2 <= len(st) <= 3 for st in layout)
    except (TypeError, ValueError, IndexError):
        out, ok = [], False
    starts = [0] + [b for _, b, _ in out[:-1]]
    if (
        not ok
        or not out
        or [a for a, _, _ in out] != starts
        or out[-1][1] != layers
        or any(b <= a or tp < 1 for a, b, tp in out)
    ):
        raise ConfigError(
            "a layout lists each stage as (start, stop) or (start, stop, tp): its layers, in order, from 0 to "
            f"the model's {layers} layers with none empty, and its tensor-parallel degree (at least 1); got "
            f"{list(layout)}"
        )
    return out


def check_tp(model: torch.nn.Module, tp: int) -> None:
    """A TP degree must divide the attention heads, the key/value heads and the MLP's width."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    width = (
        getattr(cfg, "intermediate_size", None)
        or getattr(cfg, "ffn_dim", None)
        or getattr(cfg, "n_inner", None)
    )
    sizes = {
        "attention heads": heads,
        "key/value heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "MLP width": width or (4 * hidden if hidden else None),  # GPT-2's n_inner None: 4 x n_embd
    }
    for what, n in sizes.items():
        if n and n % tp:
            raise ConfigError(
                f"TP {tp} does not divide the model's {n} {what}: each process of a tensor-parallel stage holds "
                f"an equal share of them; choose a TP degree that divides {n}"
            )


def compile_stage(model: torch.nn.Module, layout: Sequence[Sequence[int]] | None = None, **options: Any):
    """This process's part of ``layout`` (stages ``(start, stop)`` or ``(start, stop, tp)``; default: the layers
    split evenly over the processes, one stage each), compiled by :func:`hetegen_fx.compile` with ``options``
    (its budget is this process's)."""
    from .api import compile as compile_model

    dist = _dist()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    stages = check_layout(layout, n) if layout is not None else [(a, b, 1) for a, b in even_layout(n, ranks)]
    if sum(tp for _, _, tp in stages) != ranks:
        raise ConfigError(
            f"the layout's stages need {sum(tp for _, _, tp in stages)} processes (one per stage and TP rank), "
            f"the run has {ranks}"
        )
    for tp in {tp for _, _, tp in stages}:
        check_tp(model, tp)
    make_groups(stages)
    stage = {"rank": rank, "layout": [list(st) for st in stages]}
    if options.get("kv_cache", "dynamic") != "dynamic":
        raise ConfigError(
            "pipeline stages decode with HF's DynamicCache (kv_cache='dynamic'): a StaticCache keeps the length "
            "generate reads in layer 0's entry, which only the first stage updates"
        )
    return compile_model(model, pipeline_stage=stage, **{**options, "kv_cache": "dynamic"})


#: the share of its stage's layers whose weights an accelerator stage's CPU is taken to read each step, when
#: the cores of one machine are divided among processes (:func:`core_sets`): about what a budget below the
#: stage's weights gives it at α ≈ 0.5; not measured
ACCELERATOR_CPU_SHARE = 0.5


#: where Linux describes its CPUs' topology (which logical CPUs are threads of one physical core)
CPU_TOPOLOGY = "/sys/devices/system/cpu"


def physical_cores(cpus: Sequence[int], topology: str | os.PathLike | None = CPU_TOPOLOGY) -> list[list[int]]:
    """``cpus`` grouped by physical core (the threads of one core together: SMT siblings), groups in the order
    of their first CPU. A CPU's core is the list of its siblings (``topology/core_cpus_list``, or
    ``thread_siblings_list`` on older kernels), else its package and core id; a CPU whose topology cannot be
    read under ``topology`` (or with ``topology`` None) is a core of its own."""
    groups: dict[tuple, list[int]] = {}
    for c in sorted(set(cpus)):
        key: tuple = ("cpu", c)
        folder = os.path.join(topology, f"cpu{c}", "topology") if topology is not None else None
        for name in ("core_cpus_list", "thread_siblings_list") if folder else ():
            try:
                with open(os.path.join(folder, name)) as f:
                    key = ("siblings", f.read().strip())
                break
            except OSError:
                continue
        else:
            if folder is not None:
                try:
                    with open(os.path.join(folder, "physical_package_id")) as f:
                        package = int(f.read())
                    with open(os.path.join(folder, "core_id")) as f:
                        key = (package, int(f.read()))
                except (OSError, ValueError):
                    pass
        groups.setdefault(key, []).append(c)
    return sorted(groups.values(), key=lambda g: g[0])


def core_sets(
    devices: Sequence[str],
    layout: Sequence[Sequence[int]] | None = None,
    cores: Sequence[int] | None = None,
    topology: str | os.PathLike | None = CPU_TOPOLOGY,
) -> list[list[int]]:
    """Sets of this machine's cores (``cores``, default the ones this process may run on), one per process
    of a run on ``devices`` (process i on ``devices[i]``, the processes of ``layout`` in order), disjoint
    where there are enough: a process of an accelerator stage first gets one core for the thread that
    launches its device work (where the cores allow), then every process a share of the rest in proportion to
    the decoder layers whose weights its CPU reads a step, at least one core each: a process that runs its
    stage on the CPU, its stage's layers over its TP degree (equal shares without a layout); a process of an
    accelerator stage, whose CPU worker computes the CPU parts of its offloaded Linears,
    :data:`ACCELERATOR_CPU_SHARE` of that (a guess, not measured: what its CPU reads depends on the budget
    and α). Cores are divided as physical cores (:func:`physical_cores`: a core's threads go to one process)
    where there are at least as many as processes, else as logical CPUs. With fewer logical CPUs than
    processes, every process gets them all (shared). Why: on an H100 host
    (2026-12-07, commit c655f4d) a CPU stage beside an offloading GPU stage, both on every core, took 325 ms
    a decode step against 12.8 ms predicted; sharing the cores is the likely cause, not yet measured
    (docs/benchmarks.md)."""
    avail = sorted(set(cores if cores is not None else os.sched_getaffinity(0)))
    n = len(devices)
    weights = [1.0] * n
    if layout is not None:
        stages = _stages(layout)
        bad = [st for st in stages if st[1] <= st[0] or st[2] < 1]
        if bad:
            raise ConfigError(
                f"layout stage {bad[0]}: a stage is (start, stop[, tp]) with stop > start and tp >= 1"
            )
        weights = [(stop - start) / tp for start, stop, tp in stages for _ in range(tp)]
        if len(weights) != n:
            raise ConfigError(f"the layout has {len(weights)} processes and {n} devices are named: one each")
    if len(avail) < n:
        return [list(avail) for _ in range(n)]
    units = physical_cores(avail, topology)
    if len(units) < n:  # fewer physical cores than processes: logical CPUs, a core's threads side by side
        units = [[c] for unit in units for c in unit]
    accelerators = [torch.device(d).type != "cpu" for d in devices]
    weights = [
        w * (ACCELERATOR_CPU_SHARE if acc else 1.0) for w, acc in zip(weights, accelerators, strict=True)
    ]
    launchers = [int(acc) for acc in accelerators] if len(units) >= n + sum(accelerators) else [0] * n
    counts = [
        c + extra for c, extra in zip(_shares(len(units) - sum(launchers), weights), launchers, strict=True)
    ]
    out, at = [], 0
    for c in counts:
        out.append(sorted(cpu for unit in units[at : at + c] for cpu in unit))
        at += c
    return out


def _stages(layout: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    return [(int(st[0]), int(st[1]), int(st[2]) if len(st) > 2 else 1) for st in layout]


def _shares(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` items (at least one a weight) in proportion to ``weights`` (finite, at least 0; equal shares
    where they are all 0), at least one each, by largest remainders; they add up to ``total``."""
    n = len(weights)
    if total < n:
        raise ValueError(f"{total} items cannot give {n} shares at least one each")
    weights = [w if math.isfinite(w) and w > 0 else 0.0 for w in weights]
    if not sum(weights):
        weights = [1.0] * n
    scale = max(weights)
    weights = [w / scale for w in weights]  # no overflow in the sum
    rest, whole = total - n, sum(weights)
    exact = [rest * x / whole for x in weights]
    counts = [1 + int(e) for e in exact]
    by_remainder = sorted(range(n), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    assert sum(counts) == total, (total, weights, counts)
    return counts


def parse_cores(text: str, processes: int) -> list[list[int]]:
    """``--cores``: each process's cores, processes separated by ``/``, each a comma-separated list of cores
    and ranges, e.g. ``0-11/12-15``; checked against this machine's cores and for overlaps."""
    import re

    avail = os.sched_getaffinity(0)
    sets = []
    for part in text.split("/"):
        cores: set[int] = set()
        for item in part.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
            if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                raise ConfigError(
                    f"--cores {text!r}: give each process's cores as a list of cores and ranges, processes "
                    "separated by '/', e.g. 0-11/12-15"
                )
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if last > max(avail):  # before expanding: a range may be absurdly long
                raise ConfigError(
                    f"--cores {text!r}: core {last} is not among this machine's {format_cores(avail)}"
                )
            cores.update(range(first, last + 1))
        sets.append(sorted(cores))
    if len(sets) != processes:
        raise ConfigError(f"--cores {text!r} names {len(sets)} processes' cores, the run has {processes}")
    seen: set[int] = set()
    for cores in sets:
        unknown = sorted(set(cores) - avail)
        if unknown:
            raise ConfigError(
                f"--cores {text!r}: core(s) {unknown} are not among this machine's {format_cores(avail)}"
            )
        if seen & set(cores):
            raise ConfigError(
                f"--cores {text!r}: core(s) {sorted(seen & set(cores))} are given to two processes"
            )
        seen.update(cores)
    return sets


def format_cores(cores) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"`` (as ``--cores`` takes them)."""
    out: list[list[int]] = []
    for c in sorted(set(cores)):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def pin_cores(cores: Sequence[int]) -> None:
    """Run this process on ``cores`` only, with as many intra-op threads: every thread it has now (e.g.
    torch.distributed's, started before) and every thread it starts later (they inherit the caller's)."""
    cores = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def _entry(rank: int, ranks: int, init: str, timeout: float, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=ranks, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        fn(rank, *args)
    finally:
        _GROUPS.clear()
        dist.destroy_process_group()


def spawn(
    fn: Callable, ranks: int, args: tuple = (), timeout: float = DEFAULT_TIMEOUT, folder: str | None = None
):
    """Run ``fn(rank, *args)`` in ``ranks`` processes of one gloo group on this machine (a file rendezvous in
    ``folder``, default a new temporary one) and wait for all; one that fails makes this raise."""
    import tempfile

    import torch.multiprocessing as mp

    folder = folder or tempfile.mkdtemp(prefix="hetegen-stages-")
    init = f"file://{os.path.join(folder, 'rendezvous')}"
    mp.spawn(_entry, args=(ranks, init, timeout, fn, args), nprocs=ranks, join=True)
