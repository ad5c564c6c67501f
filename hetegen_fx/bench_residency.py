"""The run-time residency scenarios of ``hetegen bench``: a cache that grows long, and a budget raised
between two generates.

Owns: ``--grow N`` (one generate of the ``default`` variant, as a user compiles it, from the prompt to a
sequence of N tokens: the device's peak against the budget, tokens against the all-GPU reference, decode
speed per 512-token stretch, the residency changes on the way) and ``--raise-to BUDGET`` (the ``default``
variant compiled at ``--gpu-memory``, its budget raised with :func:`hetegen_fx.set_gpu_memory`, against a
fresh compile at the raised budget: the change's cost and both decode speeds, timed in round-robin rounds).
The all-GPU reference tokens of the long generate come from the ``gpu`` variant's run of it, and can be
kept in a folder (``--reference-cache``) for runs without it, as computing them takes minutes on a 7B.
Must not: time anything the main table times (:mod:`hetegen_fx.bench`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

#: tokens per stretch of the growing generate whose decode speed is reported
STRETCH = 512


def _generate(model, ids: torch.Tensor, new: int, clock=None) -> list[int]:
    from transformers import LogitsProcessorList

    procs = LogitsProcessorList([clock]) if clock is not None else None
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            logits_processor=procs,
        )
    return out[0, ids.shape[1] :].tolist()


def _reference_key(args, ids: torch.Tensor, new: int) -> str:
    """What the reference tokens depend on: the model (preset or checkpoint, dtype), the prompt, the length."""
    what = [args.model or args.preset, args.dtype, new, ids.tolist()]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def reference_tokens(
    model, ids: torch.Tensor, new: int, args, device: torch.device, compute: bool
) -> list[int] | None:
    """The all-GPU model's greedy tokens of a ``new``-token generate, read from ``args.reference_cache`` when
    it holds them, else computed if ``compute`` (the gpu variant is in the run) and the model fits the device,
    and written there. None when there is none."""
    from .bench import _free, _log

    folder = Path(args.reference_cache) if args.reference_cache else None
    path = folder / f"reference-{_reference_key(args, ids, new)}.json" if folder else None
    if path is not None and path.exists():
        _log(f"reference tokens of the {new}-token generate from {path}")
        return json.loads(path.read_text())["tokens"]
    if not compute:
        _log(
            "no reference for the long generate: run the gpu variant too, or name a --reference-cache with it"
        )
        return None
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda" and model_bytes > torch.cuda.mem_get_info(device)[0] * 0.8:
        _log("the model does not fit the GPU: no all-GPU reference for the long generate")
        return None
    _log(f"all-GPU reference of a {new}-token generate ...")
    t0 = time.perf_counter()
    model.to(device)
    try:
        tokens = _generate(model, ids.to(device), new)
    finally:
        model.to("cpu")
        _free(device)
    _log(f"reference done in {time.perf_counter() - t0:.0f} s")
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": args.model or args.preset, "new_tokens": new, "tokens": tokens}))
        tmp.replace(path)  # never a half-written file
    return tokens


#: a gap between two tokens' logits within this many units of the dtype's resolution is a near tie
TIE_ULPS = 8


def divergence(
    model, ids: torch.Tensor, reference: list[int], first: int, got: int, device: torch.device
) -> dict | None:
    """Where a variant's greedy tokens first leave the all-GPU reference's (at new token ``first``, ``got``
    instead of ``reference[first]``): the all-GPU model's logits for both tokens after the prompt and the
    reference's first ``first`` tokens, their gap, and whether the gap is within :data:`TIE_ULPS` units of
    the dtype's resolution at their size (a near tie, which another order of the same sums may flip: not
    an error). None when the model does not fit the device."""
    from .bench import _free

    if device.type == "cuda":
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if nbytes > torch.cuda.mem_get_info(device)[0] * 0.8:
            return None
    seq = torch.tensor([ids[0].tolist() + list(reference[:first])], device=device)
    dtype = next(model.parameters()).dtype
    model.to(device)
    try:
        with torch.no_grad():
            logits = model(seq).logits[0, -1].float()
    finally:
        model.to("cpu")
        _free(device)
    ref_logit, got_logit = float(logits[reference[first]]), float(logits[got])
    resolution = torch.finfo(dtype).eps * max(abs(ref_logit), abs(got_logit), 1e-6)
    gap = ref_logit - got_logit
    return {
        "at": first,
        "reference_token": int(reference[first]),
        "variant_token": int(got),
        "reference_logit": ref_logit,
        "variant_logit": got_logit,
        "gap": gap,
        "resolution": resolution,
        "near_tie": abs(gap) <= TIE_ULPS * resolution,
    }


def run_grow(model, ids: torch.Tensor, args, device: torch.device, reference: list[int] | None) -> dict:
    """One generate of the default variant from the prompt to ``args.grow`` tokens (see the module)."""
    import hetegen_fx
    from hetegen_fx.config import parse_bytes
    from hetegen_fx.store import forget

    from .bench import StepClock, _compile, _free, _log, _sync

    new = args.grow - ids.shape[1]
    forget(list(model.parameters()))
    _free(device)
    cuda = device.type == "cuda"
    if cuda:  # the peak counts everything the variant allocates, its resident weights included
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    base_reserved = torch.cuda.memory_reserved(device) if cuda else 0
    compiled = _compile("default", model, args, device)
    try:
        _generate(compiled, ids, 4)  # compiles the graphs of the short class: the long one is compiled below
        clock = StepClock()
        _log(f"default: one generate of {new} tokens, the cache growing to {args.grow} ...")
        _sync(device)
        t0 = time.perf_counter()
        tokens = _generate(compiled, ids, new, clock)
        _sync(device)
        wall = time.perf_counter() - t0
        steps = clock.steps()
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        # what the allocator held (allocated, cached and fragmented): the device memory the process took
        peak_reserved = torch.cuda.max_memory_reserved(device) - base_reserved if cuda else None
        state = hetegen_fx.state(compiled)
        changes = [str(c) for c in state.changes]
        decode_plan = state.decode_plan
    finally:
        del compiled
        forget(list(model.parameters()))
        _free(device)
    prompt = ids.shape[1]
    stretches = []
    # step i runs with a cache of prompt + i + 1 tokens (the prefill made the first token)
    for start in range(prompt // STRETCH * STRETCH, args.grow, STRETCH):
        mine = [s for i, s in enumerate(steps) if start <= prompt + i + 1 < start + STRETCH]
        if mine:
            stretches.append(
                {
                    "from": max(start, prompt),
                    "to": min(start + STRETCH, args.grow),
                    "steps": len(mine),
                    "decode_tok_s": 1 / statistics.median(mine),
                }
            )
    budget = parse_bytes(args.gpu_memory)
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference or [], strict=False)) if a != b), None)
    return {
        "tokens_total": args.grow,
        "new_tokens": new,
        "wall_s": wall,
        "peak_gpu_bytes": peak - base if cuda else None,
        "budget": budget,
        "within_budget": (peak - base <= budget) if cuda else None,
        "peak_reserved_bytes": peak_reserved,
        "tokens_match_reference": None if reference is None else tokens == reference[: len(tokens)],
        "first_difference": first,
        "stretches": stretches,
        "residency_changes": changes,
        "offloaded_bytes_at_end": decode_plan.offloaded_bytes if decode_plan is not None else None,
        "tokens": tokens,
    }


def run_raise(model, ids: torch.Tensor, args, device: torch.device, reference: list[int] | None) -> dict:
    """The default variant at ``--gpu-memory``, raised to ``--raise-to`` with set_gpu_memory, against a fresh
    compile at ``--raise-to`` (see the module)."""
    import hetegen_fx
    from hetegen_fx.store import forget

    from .bench import StepClock, _compile, _free, _log, _sync, at_budget

    new = max(args.new_tokens, 3)
    res: dict = {"from": args.gpu_memory, "to": args.raise_to}
    forget(list(model.parameters()))
    _free(device)
    raised = fresh = None
    try:
        raised = _compile("default", model, args, device)
        _generate(raised, ids, 4)
        before = hetegen_fx.state(raised).decode_plan
        clock = StepClock()
        _generate(raised, ids, new, clock)
        res["before_decode_tok_s"] = 1 / statistics.median(clock.steps())
        res["before_offloaded_bytes"] = before.offloaded_bytes
        _sync(device)
        t0 = time.perf_counter()
        change = hetegen_fx.set_gpu_memory(raised, args.raise_to)
        res["set_gpu_memory_s"] = time.perf_counter() - t0
        res["change"] = str(change) if change is not None else None
        res["promoted_bytes"] = change.promoted_bytes if change is not None else 0
        t0 = time.perf_counter()
        _generate(raised, ids, 4)  # the first call after the change compiles the graphs again
        _sync(device)
        res["first_generate_after_change_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _generate(raised, ids, 4)
        _sync(device)
        res["same_generate_warm_s"] = time.perf_counter() - t0
        res["after_offloaded_bytes"] = hetegen_fx.state(raised).decode_plan.offloaded_bytes
        forget(list(model.parameters()))  # the fresh compile gets a store of its own
        fresh_args = at_budget(args, args.raise_to)
        t0 = time.perf_counter()
        fresh = _compile("default", model, fresh_args, device)
        _generate(fresh, ids, 4)
        res["fresh_compile_and_first_generate_s"] = time.perf_counter() - t0
        res["fresh_offloaded_bytes"] = hetegen_fx.state(fresh).decode_plan.offloaded_bytes
        steps: dict[str, list[float]] = {"raised": [], "fresh": []}
        tokens = {}
        rounds_start = time.time()
        rounds = max(args.interleave, 2)
        for r in range(rounds):
            order = [("raised", raised), ("fresh", fresh)]
            for name, m in order[r % 2 :] + order[: r % 2]:
                clock = StepClock()
                _sync(device)
                tokens[name] = _generate(m, ids, new, clock)
                _sync(device)
                steps[name].append(statistics.median(clock.steps()))
            _log(
                f"raise round {r + 1}/{rounds}: raised {steps['raised'][-1] * 1e3:.1f} ms, "
                f"fresh {steps['fresh'][-1] * 1e3:.1f} ms"
            )
        per_round = [f / r for r, f in zip(steps["raised"], steps["fresh"], strict=True)]
        res.update(
            raised_decode_tok_s=1 / statistics.median(steps["raised"]),
            fresh_decode_tok_s=1 / statistics.median(steps["fresh"]),
            raised_over_fresh=statistics.median(per_round),
            raised_over_fresh_per_round=per_round,
            # the common length: the reference may be shorter (fewer tokens, or an early end of sequence)
            tokens_match_reference=None
            if reference is None
            else all(t[: len(reference)] == reference[: len(t)] for t in tokens.values()),
            # a change during the rounds (a device allocation failed with both models on the device) would
            # make this a comparison with a demoted model: listed here, not hidden
            changes_during_rounds=[
                str(c) for m in (raised, fresh) for c in hetegen_fx.state(m).changes if c.at >= rounds_start
            ],
        )
    finally:
        raised = fresh = None
        forget(list(model.parameters()))
        _free(device)
    return res


def format_rows(grow: dict | None, raised: dict | None) -> list[str]:
    """Markdown lines of both scenarios for the bench's table."""
    from hetegen_fx.config import format_bytes

    rows: list[str] = []
    if grow:
        peak = grow["peak_gpu_bytes"]
        tie = grow.get("divergence")
        why = ""
        if tie:
            why = (
                f"; the all-GPU model's logits there: {tie['reference_logit']:.4f} for its token, "
                f"{tie['variant_logit']:.4f} for this one, "
                + ("a near tie" if tie["near_tie"] else "not a near tie")
                + f" (resolution {tie['resolution']:.4f})"
            )
        match = {
            None: "no reference",
            True: "yes",
            False: f"NO (first difference at {grow['first_difference']}{why})",
        }
        rows += [
            "",
            f"one generate growing the cache to {grow['tokens_total']} tokens ({grow['new_tokens']} new, "
            f"{grow['wall_s']:.0f} s): peak GPU {format_bytes(peak) if peak is not None else '-'} of "
            f"{format_bytes(grow['budget'])} (the allocator's reserve at its peak "
            f"{format_bytes(grow['peak_reserved_bytes']) if grow.get('peak_reserved_bytes') is not None else '-'}"
            "), tokens = all-GPU reference: "
            f"{match[grow['tokens_match_reference']]}, {len(grow['residency_changes'])} residency change(s)",
            "",
            "| cache tokens | decode tok/s |",
            "|---|---|",
        ]
        rows += [f"| {s['from']}-{s['to']} | {s['decode_tok_s']:.2f} |" for s in grow["stretches"]]
        rows += [f"- {c}" for c in grow["residency_changes"]]
    if raised:
        rows += [
            "",
            f"budget raised from {raised['from']} to {raised['to']} with set_gpu_memory: "
            f"{format_bytes(raised['promoted_bytes'])} promoted in {raised['set_gpu_memory_s'] * 1e3:.0f} ms, the "
            f"next generate {raised['first_generate_after_change_s']:.2f} s (warm {raised['same_generate_warm_s']:.2f} "
            f"s); decode {raised['before_decode_tok_s']:.2f} -> {raised['raised_decode_tok_s']:.2f} tok/s, a fresh "
            f"compile at {raised['to']} {raised['fresh_decode_tok_s']:.2f} tok/s (raised / fresh "
            f"{raised['raised_over_fresh']:.2f}x, per round "
            + ", ".join(f"{x:.2f}" for x in raised["raised_over_fresh_per_round"])
            + f"); offloaded {format_bytes(raised['after_offloaded_bytes'])} vs fresh "
            f"{format_bytes(raised['fresh_offloaded_bytes'])}; tokens = reference: "
            f"{ {None: 'no reference', True: 'yes', False: 'NO'}[raised['tokens_match_reference']] }",
        ]
        rows += [f"- residency change during the rounds: {c}" for c in raised["changes_during_rounds"]]
    return rows


def chart(grow: dict, path: Path, title: str) -> None:
    """Decode speed per stretch of the growing generate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = [(s["from"] + s["to"]) / 2 for s in grow["stretches"]]
    ax.plot(xs, [s["decode_tok_s"] for s in grow["stretches"]], "o-", color="#4472c4")
    ax.set_xlabel("tokens in the KV cache")
    ax.set_ylabel("decode tokens/s (median step)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
