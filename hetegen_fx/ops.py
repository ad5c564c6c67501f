"""Custom ops for the side effects of a partitioned graph.

* ``hetegen::copy_h2d(src, slot, device, tail=None) -> Tensor``: start an asynchronous host-to-device copy of
  an offloaded weight part into the staging region at byte offset ``slot`` of the device's staging arena
  (records the region's "copied" event); with ``tail``, its rows follow ``src``'s in the region (a Linear's
  GPU part whose rows lie partly in RAM, partly in the storage ring);
* ``hetegen::wait_copy(staged!, slot)``: the compute stream waits for that event;
* ``hetegen::release_slot(staged!, slot)``: records the "released" event after the GPU part, so later
  copies into any of the region's bytes wait for it;
* ``hetegen::cpu_begin(x, weights, biases, device, act=0) -> ticket``: queue the CPU parts of the Linears that
  read ``x`` (their host weight rows ``weights``) on the worker thread (:mod:`hetegen_fx.host`); with an
  activation code ``act``, an MLP block's share (:mod:`hetegen_fx.blocks`); the ticket is a host int64
  scalar holding the job's number;
* ``hetegen::cpu_end(ticket, x, features, device) -> Tensor``: the job's result ``[..., features]`` on the
  device; on CUDA the compute stream waits for the worker on the device, the launching thread does not;
* ``hetegen::cpu_wait(device)``: the launching thread waits until every CPU job queued so far has run (the
  last node before a graph's outputs are handed back; see :mod:`hetegen_fx.host` for why);
* ``hetegen::fetch_rows(store, name, ram_rows, rows, cols, dtype) -> Tensor``: the first ``rows`` storage rows
  of Linear ``name`` (those from ``ram_rows`` on) in their slot of the storage reader's ring, the launching
  thread waiting until they are read (:mod:`hetegen_fx.prefetch`); what a ``copy_h2d`` then copies, or a CPU
  job reads;
* ``hetegen::ring_rows(after, store, name, ram_rows, start, rows, cols, dtype) -> Tensor``: rows
  ``[start, start + rows)`` of the storage rows a ``fetch_rows`` brought in this step, their slot still held:
  the device's share when the CPU computes the first of them (``after``: the ticket of the CPU job that reads
  those, which orders this after their fetch without aliasing the ring);
* ``hetegen::fetched(after, store, name, ram_rows, compute=False)``: the slot may be read into again once the
  copies queued so far have landed (an event on the copy stream); with ``compute``, also once the compute
  stream has done what it was given so far (placed after the ``cpu_end`` of a CPU job that read the slot,
  where the stream waits for the job: ``after`` is the Linear's output);
* ``hetegen::stage_send(x, dst)``, ``hetegen::stage_recv(shape, dtype, src, device) -> Tensor`` and
  ``hetegen::stage_broadcast(x, src) -> Tensor``: a pipeline stage's hidden state to the next stage's process,
  and the last stage's logits to every stage (:mod:`hetegen_fx.distributed`, torch.distributed);
* ``hetegen::tp_all_reduce(x, group) -> Tensor``: the sum of a row-parallel Linear's partial outputs over the
  processes ``group`` of a tensor-parallel stage;
* ``hetegen::tp_whole(x, dim, parts) -> Tensor`` and ``hetegen::tp_local(x, dim, parts) -> Tensor``: this
  process's share of a KV cache (``1 / parts`` of dim ``dim``, its heads) handed back as a host stand-in of
  the whole shape, and the share behind such a stand-in when it comes back (:func:`hetegen_fx.runtime.stand_in`).

``wait_copy`` and ``release_slot`` declare that they mutate the staged buffer, and all three are
registered as side-effectful: dead-code elimination keeps them, and functionalization (export,
decompositions) threads the staged tensor through them, which keeps copy → wait → matmul → release in order.
"""

from __future__ import annotations

import torch
from torch.fx.node import has_side_effect

from .runtime import get_runtime

# -- what each op does, as plain functions: the custom ops below call them, and the code that runs
# -- (launch.direct) calls them without the dispatcher


def run_copy_h2d(src: torch.Tensor, slot: int, device: str, tail: torch.Tensor | None = None) -> torch.Tensor:
    return get_runtime(device).copy_h2d(src, slot, tail)  # a staging buffer: never a view of ``src``


def run_wait_copy(staged: torch.Tensor, slot: int) -> None:
    get_runtime(staged.device).wait(slot)


def run_release_slot(staged: torch.Tensor, slot: int) -> None:
    get_runtime(staged.device).release(slot, staged.numel() * staged.element_size())


def run_cpu_begin(x: torch.Tensor, weights: list, biases: list, device: str, act: int = 0) -> int:
    return get_runtime(device).host.begin(x, weights, biases, act)


def run_cpu_end(ticket: torch.Tensor | int, x: torch.Tensor, features: int, device: str) -> torch.Tensor:
    return get_runtime(device).host.end(int(ticket), (*x.shape[:-1], features), x.dtype)


def run_cpu_wait(device: str) -> None:
    get_runtime(device).host.wait_all()


def run_fetch_rows(
    store: int, name: str, ram_rows: int, rows: int, cols: int, dtype: torch.dtype
) -> torch.Tensor:
    from .store import by_token

    reader, i = by_token(store).storage_part(name, ram_rows, taking=True)
    return reader.wait(i, rows)


def run_ring_rows(
    after: torch.Tensor | int,
    store: int,
    name: str,
    ram_rows: int,
    start: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    from .store import by_token

    reader, i = by_token(store).storage_part(name, ram_rows)
    return reader.held(i, start, start + rows)


def run_fetched(after: torch.Tensor, store: int, name: str, ram_rows: int, compute: bool = False) -> None:
    from .store import by_token

    reader, i = by_token(store).storage_part(name, ram_rows)
    rt = get_runtime(after.device)
    reader.release(i, (rt.copy_event(), rt.compute_event()) if compute else rt.copy_event())


def run_stage_send(x: torch.Tensor, dst: int) -> None:
    from .distributed import send

    send(x, dst)


def run_stage_recv(shape: list[int], dtype: torch.dtype, src: int, device: str) -> torch.Tensor:
    from .distributed import recv

    return recv(shape, dtype, src, device)


def run_stage_broadcast(x: torch.Tensor, src: int) -> torch.Tensor:
    from .distributed import broadcast

    return broadcast(x, src)


def run_tp_all_reduce(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    from .distributed import all_reduce

    return all_reduce(x, group)


def run_tp_whole(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    from .runtime import stand_in

    shape = list(x.shape)
    shape[dim] *= parts
    return stand_in(x, shape)


def run_tp_local(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    from .runtime import unpark

    local = unpark(x)
    if local is not None:
        return local
    # on an accelerator the stand-in may have been swapped for its share already (runtime.to_device); a
    # tensor empty along the shared dimension has nothing to share
    if x.device.type != "cpu" or (x.dim() > dim and x.shape[dim] == 0):
        return x
    raise RuntimeError(
        f"a tensor-parallel stage was given a KV cache of shape {tuple(x.shape)} that it did not hand back: a "
        "tensor-parallel stage keeps its share of the cache itself; start generate() without a cache"
    )


for _f in (
    run_tp_all_reduce,
    run_tp_whole,
    run_tp_local,
    run_stage_send,
    run_stage_recv,
    run_stage_broadcast,
    run_copy_h2d,
    run_wait_copy,
    run_release_slot,
    run_cpu_begin,
    run_cpu_end,
    run_cpu_wait,
    run_fetch_rows,
    run_ring_rows,
    run_fetched,
):
    torch.fx.wrap(_f.__name__)


@torch.library.custom_op("hetegen::copy_h2d", mutates_args=())
def copy_h2d(src: torch.Tensor, slot: int, device: str, tail: torch.Tensor | None = None) -> torch.Tensor:
    return run_copy_h2d(src, slot, device, tail)


@copy_h2d.register_fake
def _copy_h2d_fake(
    src: torch.Tensor, slot: int, device: str, tail: torch.Tensor | None = None
) -> torch.Tensor:
    shape = src.shape if tail is None else (src.shape[0] + tail.shape[0], *src.shape[1:])
    return torch.empty(shape, dtype=src.dtype, device=device)


@torch.library.custom_op("hetegen::wait_copy", mutates_args=("staged",))
def wait_copy(staged: torch.Tensor, slot: int) -> None:
    run_wait_copy(staged, slot)


@wait_copy.register_fake
def _wait_copy_fake(staged: torch.Tensor, slot: int) -> None:
    return None


@torch.library.custom_op("hetegen::release_slot", mutates_args=("staged",))
def release_slot(staged: torch.Tensor, slot: int) -> None:
    run_release_slot(staged, slot)


@release_slot.register_fake
def _release_slot_fake(staged: torch.Tensor, slot: int) -> None:
    return None


@torch.library.custom_op("hetegen::cpu_begin", mutates_args=())
def cpu_begin(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], device: str, act: int = 0
) -> torch.Tensor:
    """Queue a CPU job: ``cat([linear(x, w, b) ...], -1)``; with an activation code ``act``
    (:mod:`hetegen_fx.blocks`) an MLP block's share: the last weight reads ``act(first) * second`` (or
    ``act(first)``) of the Linears before it."""
    return torch.tensor(run_cpu_begin(x, weights, biases, device, act), dtype=torch.int64)


@cpu_begin.register_fake
def _cpu_begin_fake(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], device: str, act: int = 0
) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("hetegen::cpu_end", mutates_args=())
def cpu_end(ticket: torch.Tensor, x: torch.Tensor, features: int, device: str) -> torch.Tensor:
    return run_cpu_end(ticket, x, features, device)


@cpu_end.register_fake
def _cpu_end_fake(ticket: torch.Tensor, x: torch.Tensor, features: int, device: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], features), device=device)


@torch.library.custom_op("hetegen::cpu_wait", mutates_args=())
def cpu_wait(device: str) -> None:
    run_cpu_wait(device)


@cpu_wait.register_fake
def _cpu_wait_fake(device: str) -> None:
    return None


@torch.library.custom_op("hetegen::fetch_rows", mutates_args=())
def fetch_rows(
    store: int, name: str, ram_rows: int, rows: int, cols: int, dtype: torch.dtype
) -> torch.Tensor:
    # the ring's own rows, the same tensor at every step (not a copy: a CPU job reading them is known by its
    # tensors); like copy_h2d's region, a view its fake (a fresh tensor) cannot reproduce as a storage offset
    return run_fetch_rows(store, name, ram_rows, rows, cols, dtype)


@fetch_rows.register_fake
def _fetch_rows_fake(
    store: int, name: str, ram_rows: int, rows: int, cols: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.empty((rows, cols), dtype=dtype)


@torch.library.custom_op("hetegen::ring_rows", mutates_args=())
def ring_rows(
    after: torch.Tensor,
    store: int,
    name: str,
    ram_rows: int,
    start: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    # the ring's rows (as fetch_rows)
    return run_ring_rows(after, store, name, ram_rows, start, rows, cols, dtype)


@ring_rows.register_fake
def _ring_rows_fake(
    after: torch.Tensor,
    store: int,
    name: str,
    ram_rows: int,
    start: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return torch.empty((rows, cols), dtype=dtype)


@torch.library.custom_op("hetegen::fetched", mutates_args=())
def fetched(after: torch.Tensor, store: int, name: str, ram_rows: int, compute: bool = False) -> None:
    run_fetched(after, store, name, ram_rows, compute)


@fetched.register_fake
def _fetched_fake(after: torch.Tensor, store: int, name: str, ram_rows: int, compute: bool = False) -> None:
    return None


@torch.library.custom_op("hetegen::stage_send", mutates_args=())
def stage_send(x: torch.Tensor, dst: int) -> None:
    run_stage_send(x, dst)


@stage_send.register_fake
def _stage_send_fake(x: torch.Tensor, dst: int) -> None:
    return None


@torch.library.custom_op("hetegen::stage_recv", mutates_args=())
def stage_recv(shape: list[int], dtype: torch.dtype, src: int, device: str) -> torch.Tensor:
    return run_stage_recv(shape, dtype, src, device)


@stage_recv.register_fake
def _stage_recv_fake(shape: list[int], dtype: torch.dtype, src: int, device: str) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("hetegen::stage_broadcast", mutates_args=())
def stage_broadcast(x: torch.Tensor, src: int) -> torch.Tensor:
    return run_stage_broadcast(x, src).clone()


@stage_broadcast.register_fake
def _stage_broadcast_fake(x: torch.Tensor, src: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("hetegen::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    return run_tp_all_reduce(x, group).clone()


@tp_all_reduce.register_fake
def _tp_all_reduce_fake(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("hetegen::tp_whole", mutates_args=())
def tp_whole(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    return run_tp_whole(x, dim, parts)


@tp_whole.register_fake
def _tp_whole_fake(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * parts
    return x.new_empty(shape, device="cpu")


@torch.library.custom_op("hetegen::tp_local", mutates_args=())
def tp_local(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    out = run_tp_local(x, dim, parts)
    return out.clone() if out is x else out


@tp_local.register_fake
def _tp_local_fake(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] // parts
    return x.new_empty(shape)


COPY = torch.ops.hetegen.copy_h2d.default
WAIT = torch.ops.hetegen.wait_copy.default
RELEASE = torch.ops.hetegen.release_slot.default
CPU_BEGIN = torch.ops.hetegen.cpu_begin.default
CPU_END = torch.ops.hetegen.cpu_end.default
CPU_WAIT = torch.ops.hetegen.cpu_wait.default
FETCH = torch.ops.hetegen.fetch_rows.default
RING_ROWS = torch.ops.hetegen.ring_rows.default
FETCHED = torch.ops.hetegen.fetched.default
STAGE_SEND = torch.ops.hetegen.stage_send.default
STAGE_RECV = torch.ops.hetegen.stage_recv.default
STAGE_BROADCAST = torch.ops.hetegen.stage_broadcast.default
TP_ALL_REDUCE = torch.ops.hetegen.tp_all_reduce.default
TP_WHOLE = torch.ops.hetegen.tp_whole.default
TP_LOCAL = torch.ops.hetegen.tp_local.default

# Side effects beyond their outputs: DCE must keep them. Mutating ops are kept by fx's DCE anyway, but once
# functionalized (export's run_decompositions) wait/release become auto_functionalized nodes whose results
# nobody reads, and only this registration keeps them. A CPU job queued must also be collected.
for _op in (
    COPY,
    WAIT,
    RELEASE,
    CPU_BEGIN,
    CPU_END,
    CPU_WAIT,
    FETCH,
    RING_ROWS,
    FETCHED,
    STAGE_SEND,
    STAGE_RECV,
    STAGE_BROADCAST,
    TP_ALL_REDUCE,
):
    has_side_effect(_op)


#: each op → the plain function that does its work (what :func:`hetegen_fx.launch.direct` calls)
DIRECT = {
    COPY: run_copy_h2d,
    WAIT: run_wait_copy,
    RELEASE: run_release_slot,
    CPU_BEGIN: run_cpu_begin,
    CPU_END: run_cpu_end,
    CPU_WAIT: run_cpu_wait,
    FETCH: run_fetch_rows,
    RING_ROWS: run_ring_rows,
    FETCHED: run_fetched,
    STAGE_SEND: run_stage_send,
    STAGE_RECV: run_stage_recv,
    STAGE_BROADCAST: run_stage_broadcast,
    TP_ALL_REDUCE: run_tp_all_reduce,
    TP_WHOLE: run_tp_whole,
    TP_LOCAL: run_tp_local,
}


def is_op(node_target: object, op: torch._ops.OpOverload) -> bool:
    """Match a node target both as the overload packet and as ``.default``."""
    return node_target is op or node_target is op.overloadpacket
