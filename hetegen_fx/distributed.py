"""Pipeline stages in several processes, on torch.distributed (the first part of HexGen's layouts: pipeline
parallelism with stages of their own layer counts; tensor parallelism inside a stage is not built yet).

Owns: :func:`compile_stage` (one process's stage of a layout: ``hetegen_fx.compile`` with the
:class:`~hetegen_fx.passes.stages.StageSplitPass` in front of the pipeline), the transfers the stage ops make
(:func:`send`, :func:`recv`, :func:`broadcast`: gloo on the host, so that everything runs without a GPU; a
CUDA tensor goes through the host), their errors, and :func:`spawn` (a run of every stage on this machine, one
process each, as tests and the command line start them; ``torchrun`` starts the same processes elsewhere).
Must not: place or split anything itself (the passes do).

Every process runs the same ``generate`` on the same prompt: the last stage's logits are broadcast to all, so
each picks the same token, and each stage keeps the KV cache of its own layers. A process that dies or stops
answering ends the others' transfers with :class:`StageError` within ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
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


def check_layout(layout: Sequence[Sequence[int]], layers: int) -> list[tuple[int, int]]:
    """``layout`` (one ``(start, stop)`` per stage) covering ``[0, layers)`` in order, each stage non-empty."""
    out = [(int(a), int(b)) for a, b in layout]
    starts = [0] + [b for _, b in out[:-1]]
    if not out or [a for a, _ in out] != starts or out[-1][1] != layers or any(b <= a for a, b in out):
        raise ConfigError(
            f"a layout lists each stage's layers as (start, stop), in order, from 0 to the model's {layers} "
            f"layers with none empty; got {list(layout)}"
        )
    return out


def compile_stage(model: torch.nn.Module, layout: Sequence[Sequence[int]] | None = None, **options: Any):
    """This process's stage of ``layout`` (its rank's ``(start, stop)``; default: the layers split evenly over
    the processes), compiled by :func:`hetegen_fx.compile` with ``options`` (its budget is this stage's)."""
    from .api import compile as compile_model

    dist = _dist()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    layout = check_layout(layout, n) if layout is not None else even_layout(n, ranks)
    if len(layout) != ranks:
        raise ConfigError(f"the layout has {len(layout)} stages for {ranks} processes: one stage per process")
    start, stop = layout[rank]
    stage = {"rank": rank, "ranks": ranks, "layers": [start, stop]}
    if options.get("kv_cache", "dynamic") != "dynamic":
        raise ConfigError(
            "pipeline stages decode with HF's DynamicCache (kv_cache='dynamic'): a StaticCache keeps the length "
            "generate reads in layer 0's entry, which only the first stage updates"
        )
    return compile_model(model, pipeline_stage=stage, **{**options, "kv_cache": "dynamic"})


def _entry(rank: int, ranks: int, init: str, timeout: float, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=ranks, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        fn(rank, *args)
    finally:
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
