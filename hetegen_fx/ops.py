"""Custom ops for the side effects of a partitioned graph.

* ``hetegen::copy_h2d(src, slot, device) -> Tensor``: start an asynchronous host-to-device copy of an
  offloaded weight part into staging buffer ``slot`` (records the slot's "copied" event);
* ``hetegen::wait_copy(staged!, slot)``: the compute stream waits for that event;
* ``hetegen::release_slot(staged!, slot)``: records the "released" event after the GPU part, so the next
  copy into the slot waits for it.

``wait_copy`` and ``release_slot`` declare that they mutate the staged buffer, and all three are
registered as side-effectful: dead-code elimination keeps them, and functionalization (export,
decompositions) threads the staged tensor through them, which keeps copy → wait → matmul → release in order.
"""

from __future__ import annotations

import torch
from torch.fx.node import has_side_effect

from .runtime import get_runtime


@torch.library.custom_op("hetegen::copy_h2d", mutates_args=())
def copy_h2d(src: torch.Tensor, slot: int, device: str) -> torch.Tensor:
    return get_runtime(device).copy_h2d(src, slot)  # a staging buffer: never a view of ``src``


@copy_h2d.register_fake
def _copy_h2d_fake(src: torch.Tensor, slot: int, device: str) -> torch.Tensor:
    return torch.empty(src.shape, dtype=src.dtype, device=device)


@torch.library.custom_op("hetegen::wait_copy", mutates_args=("staged",))
def wait_copy(staged: torch.Tensor, slot: int) -> None:
    get_runtime(staged.device).wait(slot)


@wait_copy.register_fake
def _wait_copy_fake(staged: torch.Tensor, slot: int) -> None:
    return None


@torch.library.custom_op("hetegen::release_slot", mutates_args=("staged",))
def release_slot(staged: torch.Tensor, slot: int) -> None:
    get_runtime(staged.device).release(slot)


@release_slot.register_fake
def _release_slot_fake(staged: torch.Tensor, slot: int) -> None:
    return None


COPY = torch.ops.hetegen.copy_h2d.default
WAIT = torch.ops.hetegen.wait_copy.default
RELEASE = torch.ops.hetegen.release_slot.default

# Side effects beyond their outputs: DCE must keep them. Mutating ops are kept by fx's DCE anyway, but once
# functionalized (export's run_decompositions) wait/release become auto_functionalized nodes whose results
# nobody reads, and only this registration keeps them.
for _op in (COPY, WAIT, RELEASE):
    has_side_effect(_op)


def is_op(node_target: object, op: torch._ops.OpOverload) -> bool:
    """Match a node target both as the overload packet and as ``.default``."""
    return node_target is op or node_target is op.overloadpacket
