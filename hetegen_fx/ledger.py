"""The memory ledger of one model on its device: what is there and what may be, against the budget.

Owns: the budget arithmetic (resident weights, the KV cache, activations, other parameters, the staging
arena, the cuBLAS workspace, the CUDA-graph pool), the choice of resident weights under it by priority
``g = T_cpu / bytes`` (highest first), and the record of every residency change while the model runs. It
only computes and records: PlacementPass builds it and writes its decision into the Plan; the weight store
and the compiled graphs apply a change (:mod:`hetegen_fx.residency`). It touches no device.

    ledger.choose(kv=...)          # the residency that fits the budget with that KV cache
    ledger.total(residency, kv)    # the bytes that residency and reserves take
    ledger.history                 # ResidencyChange records: when, which Linears moved, bytes, why
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import format_bytes
from .errors import BudgetError
from .plan import staging_size


@dataclass(frozen=True)
class LedgerLayer:
    """One Linear as the ledger sees it."""

    name: str
    held: int  # device bytes its weight holds when resident (the allocator's rounding included)
    gpu_part: int  # bytes of its GPU part when offloaded (at its α): what the staging arena must hold
    priority: float  # g: CPU time saved per byte by keeping it resident


@dataclass(frozen=True)
class ResidencyChange:
    """One change of residency while a model runs."""

    at: float  # time.time()
    reason: str
    promoted: tuple[str, ...]
    demoted: tuple[str, ...]
    promoted_bytes: int
    demoted_bytes: int
    kv_cache: int  # the KV-cache bytes the new residency leaves room for
    budget: int | None

    def __str__(self) -> str:
        moved = []
        if self.promoted:
            moved.append(f"promoted {len(self.promoted)} Linear(s) ({format_bytes(self.promoted_bytes)})")
        if self.demoted:
            moved.append(f"demoted {len(self.demoted)} Linear(s) ({format_bytes(self.demoted_bytes)})")
        stamp = time.strftime("%H:%M:%S", time.localtime(self.at))
        return f"{stamp} {', '.join(moved) or 'no change'}: {self.reason}"


#: the reason a residency change records when a step's device allocation failed (hetegen_fx.residency)
ALLOCATION_FAILED = "a device allocation failed"


@dataclass
class Ledger:
    """The device memory of one model: ``reserves`` (bytes by category, the KV cache apart: it changes with
    use), ``kv_cache`` (bytes the current residency leaves room for), ``layers`` in graph order (the staging
    arena holds their GPU parts in that order, see :func:`hetegen_fx.plan.staging_size`) and the budget."""

    budget: int | None
    reserves: dict[str, int]
    kv_cache: int
    layers: list[LedgerLayer]
    prefetch: int | None = None
    #: the smallest KV-cache size class in tokens (:func:`hetegen_fx.residency.kv_class`): 256, or less where
    #: the budget cannot hold a cache of 256 tokens beside the reserves
    kv_floor: int = 256
    residency: dict[str, bool] = field(default_factory=dict)
    history: list[ResidencyChange] = field(default_factory=list)
    #: whether the embedding tables the graphs only look up stay on the host (``host_embeddings``; with
    #: "auto" the first placement's choice, which the model's later graphs keep)
    host_tables: bool = True

    def staging(self, residency: dict[str, bool]) -> int:
        """Bytes of the staging arena for the GPU parts of the Linears ``residency`` offloads."""
        return staging_size(
            [0 if residency.get(lp.name) else lp.gpu_part for lp in self.layers], self.prefetch
        )

    def resident_bytes(self, residency: dict[str, bool] | None = None) -> int:
        residency = self.residency if residency is None else residency
        return sum(lp.held for lp in self.layers if residency.get(lp.name))

    def total(self, residency: dict[str, bool] | None = None, kv: int | None = None) -> int:
        """Bytes on the device under ``residency`` (default: the current one) with a KV cache of ``kv`` bytes."""
        residency = self.residency if residency is None else residency
        kv = self.kv_cache if kv is None else kv
        return sum(self.reserves.values()) + kv + self.resident_bytes(residency) + self.staging(residency)

    def by_category(self) -> dict[str, int]:
        """The current ledger, bytes by category (what :func:`hetegen_fx.state` shows)."""
        return {
            "resident_weights": self.resident_bytes(),
            "kv_cache": self.kv_cache,
            **self.reserves,
            "staging": self.staging(self.residency),
        }

    def minimum(self, kv: int | None = None) -> int:
        """The least the device must hold: the reserves, the KV cache and the arena with nothing resident."""
        kv = self.kv_cache if kv is None else kv
        return sum(self.reserves.values()) + kv + self.staging({})

    def choose(self, kv: int | None = None, budget: int | None | bool = False) -> dict[str, bool]:
        """The residency that keeps the most valuable weights (highest g; among equals the later Linears)
        within ``budget`` (default: the ledger's) beside the reserves and a KV cache of ``kv`` bytes."""
        kv = self.kv_cache if kv is None else kv
        budget = self.budget if budget is False else budget
        everything = {lp.name: True for lp in self.layers}
        if budget is None or self.total(everything, kv) <= budget:
            return everything
        minimum = self.minimum(kv)
        if budget < minimum:
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in {"kv_cache": kv, **self.reserves}.items())
            lowered = next(
                (c for c in reversed(self.history) if c.reason == ALLOCATION_FAILED and c.budget == budget),
                None,
            )
            why = ""
            if lowered is not None:
                stamp = time.strftime("%H:%M:%S", time.localtime(lowered.at))
                why = (
                    f" (the budget was lowered to what was left when {ALLOCATION_FAILED} at {stamp}: "
                    "hetegen_fx.set_gpu_memory(compiled, ...) raises it again once device memory is free)"
                )
            raise BudgetError(
                f"gpu_memory {format_bytes(budget)}{why} is below the minimum working set of {format_bytes(minimum)} "
                f"({minimum} bytes: {parts}, staging {format_bytes(self.staging({}))} for prefetch="
                f"{self.prefetch}); raise gpu_memory to at least {format_bytes(minimum)}, or lower "
                "max_seq_len / prefetch"
            )
        fixed = sum(self.reserves.values()) + kv
        chosen = dict.fromkeys(everything, False)
        held = 0
        order = sorted(reversed(self.layers), key=lambda lp: lp.priority, reverse=True)
        for lp in order:
            chosen[lp.name] = True
            if fixed + held + lp.held + self.staging(chosen) <= budget:
                held += lp.held
            else:
                chosen[lp.name] = False
        return chosen

    def apply(
        self,
        residency: dict[str, bool],
        reason: str,
        kv: int | None = None,
        budget: int | None | bool = False,
    ) -> ResidencyChange | None:
        """Make ``residency`` (with room for ``kv`` bytes of KV cache, under ``budget``) the ledger's and record
        the change; None when nothing moved (the KV room and budget are taken all the same)."""
        before = self.residency
        if kv is not None:
            self.kv_cache = kv
        if budget is not False:
            self.budget = budget
        promoted = tuple(lp.name for lp in self.layers if residency.get(lp.name) and not before.get(lp.name))
        demoted = tuple(lp.name for lp in self.layers if before.get(lp.name) and not residency.get(lp.name))
        self.residency = dict(residency)
        if not promoted and not demoted:
            return None
        held = {lp.name: lp.held for lp in self.layers}
        change = ResidencyChange(
            at=time.time(),
            reason=reason,
            promoted=promoted,
            demoted=demoted,
            promoted_bytes=sum(held[n] for n in promoted),
            demoted_bytes=sum(held[n] for n in demoted),
            kv_cache=self.kv_cache,
            budget=self.budget,
        )
        self.history.append(change)
        return change
