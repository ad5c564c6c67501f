"""``hetegen bench --sweep BUDGETS``: decode speed against the GPU budget, hetegen_fx beside llama.cpp.

At each budget of the list (``2GiB,4GiB,8GiB,all``; ``all``: no budget, everything resident) the
``hetegen``, ``stream`` and ``cpu`` variants (those of ``--variants``) run as in the main table
(:func:`hetegen_fx.bench.run_variant`: prefill, median decode, tokens, torch's peak, the plan), each while
``nvidia-smi`` samples the GPU's memory, and get their bandwidth bound at that budget
(:func:`hetegen_fx.bench.decode_bounds` with the ceilings measured at the start). Then llama.cpp's
``llama-bench`` runs the same weights (a GGUF written from the bench model) at the ``-ngl`` that fits the
same budget, found by measuring candidate ``-ngl`` values the same way, with nvidia-smi.

Both systems' memory is nvidia-smi's, as a whole process: llama-bench's is what its runs add to the GPU
(its CUDA context included); hetegen_fx's is what this process holds at its peak over the reading taken
before it made a CUDA context. A budget is what hetegen_fx's allocator may hold beside its context, so a
llama.cpp point fits a budget when its process holds at most the budget plus this process's own context
(measured with no model on the GPU).

Owns: the budget list (:func:`parse_budgets`), the points, the choice of llama.cpp's ``-ngl`` per point,
and the sweep's report: ``sweep.json``, the table (``bench.md`` and stdout), ``sweep.png``.
Must not: time a variant any other way than the main table does (:mod:`hetegen_fx.bench`), or hold
llama.cpp's own knowledge (file layout, build, output format: :mod:`hetegen_fx.llamacpp`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import llamacpp
from .config import format_bytes, parse_bytes
from .errors import BudgetError, ConfigError
from .plan import atomic_write

#: the variants a point runs (in this order: stream, cpu and blocks are skipped where hetegen offloads nothing)
#: compiled: hetegen with compile_stretches; blocks: hetegen with block_jobs (each offloaded MLP one CPU job);
#: graphs: hetegen with CUDA graphs over a static cache (where little is offloaded, launches pace the step)
SWEEP_VARIANTS = ("hetegen", "stream", "cpu", "compiled", "blocks", "graphs")
#: the table's columns beside hetegen's
_OTHERS = SWEEP_VARIANTS[1:]
#: the budget that holds everything: hetegen_fx with no budget, llama.cpp with every layer and the output
ALL = "all"
#: llama-bench runs per budget while looking for the -ngl that fits it
MAX_TRIES = 6


def parse_budgets(text: str) -> list[tuple[str, int | None]]:
    """``"2GiB,4GiB,all"`` → ``[("2GiB", 2147483648), ("4GiB", 4294967296), ("all", None)]``, sorted by size
    (``all`` last). Raises :class:`ConfigError` for an empty list, an unreadable or repeated budget."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--sweep {text!r}: name at least one budget, e.g. 2GiB,4GiB,8GiB,all")
    out: list[tuple[str, int | None]] = []
    for item in items:
        if item.lower() == ALL:
            out.append((ALL, None))
            continue
        try:
            n = parse_bytes(item, "a --sweep budget")
        except ConfigError as e:
            raise ConfigError(f"--sweep: {e}, or 'all' (everything resident)") from None
        if not n:
            raise ConfigError(f"--sweep: a budget of {item!r} holds nothing; name budgets above zero")
        out.append((item, n))
    seen: dict[int | None, str] = {}
    for label, n in out:
        if n in seen:
            raise ConfigError(f"--sweep: {seen[n]!r} and {label!r} are the same budget; name each once")
        seen[n] = label
    return sorted(out, key=lambda b: (b[1] is None, b[1] or 0))


def _release(model, device: torch.device) -> None:
    """Nothing of the last variant on the device: its store forgotten, the runtime freed, and (on CUDA)
    torch's cached blocks given back, so that nvidia-smi sees only what the next run allocates."""
    from hetegen_fx.store import forget

    from .bench import _free

    forget(list(model.parameters()))
    _free(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _budget_error(e: BaseException) -> BudgetError | None:
    """The BudgetError behind ``e`` (the compiler may wrap it), or None."""
    while e is not None:
        if isinstance(e, BudgetError):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def _run(name: str, model, ids, args, device, gpu: str | None, idle: int | None) -> dict:
    """:func:`hetegen_fx.bench.run_variant` while nvidia-smi samples; ``smi_process_bytes`` is the process's
    peak on the device (over ``idle``, the reading before it had a CUDA context)."""
    from .bench import run_variant

    _release(model, device)
    with llamacpp.MemorySampler(gpu) as mem:
        r = run_variant(name, model, ids, args, device)
    r["gpu_smi"] = mem.to_dict()
    r["smi_process_bytes"] = mem.peak - idle if mem.peak is not None and idle is not None else None
    return r


class Peer:
    """llama.cpp for the sweep: the binary, the GGUF of the bench model, its :class:`~hetegen_fx.llamacpp.
    Footprint`, and every ``-ngl`` run so far (each is run once, whichever budgets ask for it)."""

    def __init__(self, binary: Path, gguf: Path, foot, args, gpu: str | None, allowance: int, threads: int):
        self.binary, self.gguf, self.foot = binary, gguf, foot
        self.args, self.gpu, self.allowance, self.threads = args, gpu, allowance, threads
        self.runs: dict[int, dict] = {}
        self.measured: dict[int, int] = {}

    def run(self, ngl: int) -> dict:
        from .bench import _log

        if ngl not in self.runs:
            _log(f"llama.cpp: -ngl {ngl} (estimated {format_bytes(self.foot.estimate(ngl))} on the GPU) ...")
            try:
                r = llamacpp.run_bench(
                    self.binary,
                    self.gguf,
                    ngl,
                    self.threads,
                    self.args.prompt_len,
                    self.args.new_tokens,
                    self.args.reps,
                    gpu=self.gpu,
                    progress=_log,
                )
            except llamacpp.LlamaCppError as e:
                _log(f"llama.cpp -ngl {ngl} FAILED: {str(e)[:2000]}")
                r = {"ngl": ngl, "error": str(e)}
                self.measured[ngl] = llamacpp.NEVER_FITS
            else:
                if r["gpu_delta_bytes"] is not None:
                    self.measured[ngl] = r["gpu_delta_bytes"]
                    self.foot.calibrate(self.measured)
                mem = r["gpu_delta_bytes"]
                _log(
                    f"llama.cpp -ngl {ngl}: prompt {r.get('prompt_tok_s', 0):.1f} tok/s, decode "
                    f"{r.get('decode_tok_s', 0):.2f} tok/s, GPU "
                    + (f"{format_bytes(mem)} (nvidia-smi)" if mem is not None else "not measured")
                )
            r["estimate_bytes"] = self.foot.estimate(ngl)
            self.runs[ngl] = r
        return self.runs[ngl]

    def at(self, budget: int | None) -> dict:
        """llama.cpp at the largest -ngl whose process fits ``budget`` plus this process's own CUDA context
        (:attr:`allowance`): measured by nvidia-smi where it can be, else estimated; ``budget`` None is
        everything on the GPU."""
        if budget is None:
            return {**self.run(self.foot.layers + 1), "limit_bytes": None, "fits_by": "all layers"}
        limit = budget + self.allowance
        for _ in range(MAX_TRIES):
            n = llamacpp.ngl_for_budget(limit, self.foot, self.measured)
            if n is None and 0 not in self.runs and self.gpu is not None:
                n = 0  # estimated not to fit: measured once, as the estimate is only a first guess
            if n is None:
                break
            if n in self.runs:  # measured and fits, or nothing can be measured here
                return {**self.runs[n], "limit_bytes": limit, "fits_by": self._how(n)}
            self.run(n)
        fitting = [n for n, m in self.measured.items() if m <= limit]
        if fitting:
            n = max(fitting)
            return {**self.runs[n], "limit_bytes": limit, "fits_by": self._how(n)}
        if "error" in self.runs.get(0, {}):
            return {"error": self.runs[0]["error"], "limit_bytes": limit}
        least = self.measured.get(0)
        held = (
            f"{format_bytes(least)} (nvidia-smi)" if least else f"about {format_bytes(self.foot.estimate(0))}"
        )
        return {
            "skipped": f"-ngl 0 holds {held} on the GPU, over {format_bytes(limit)}",
            "limit_bytes": limit,
        }

    def _how(self, n: int) -> str:
        return "nvidia-smi" if n in self.measured else "estimate"

    def to_dict(self) -> dict:
        return {
            "binary": str(self.binary),
            "threads": self.threads,
            "allowance_bytes": self.allowance,
            "footprint": self.foot.to_dict(),
            "runs": {str(n): r for n, r in sorted(self.runs.items())},
        }


def _peer(args, model, device: torch.device, gpu: str | None, allowance: int, work: Path):
    """The :class:`Peer`, or None with a log line saying why there is none."""
    from .bench import _log

    binary = None
    source = args.llama_cpp
    try:
        if source is not None and llamacpp.is_source(source):
            cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "hetegen_fx"
            arch = "90"
            if device.type == "cuda":
                major, minor = torch.cuda.get_device_capability(device)
                arch = f"{major}{minor}"
            src = Path(source).expanduser()
            stem = src.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
            dest = cache / f"build-{stem}-{src.stat().st_size}"  # reused by later sweeps on the machine
            binary = llamacpp.build(src, dest, progress=_log, cuda_arch=arch)
        else:
            binary = llamacpp.find_binary(source)
    except llamacpp.LlamaCppError as e:
        _log(f"no llama.cpp: {e}")
        return None
    if binary is None:
        _log(
            f"no llama.cpp: no {llamacpp.BINARY} (--llama-cpp, ${llamacpp.BINARY_ENV} or PATH); the sweep runs "
            "hetegen_fx alone"
        )
        return None
    _log(f"llama.cpp: {binary}")
    try:
        foot = llamacpp.footprint(model, args.prompt_len + args.new_tokens)
        name = args.model or args.preset
        gguf = llamacpp.write_gguf(model, work / "model.gguf", progress=_log, name=name, gguf_py=binary)
    except llamacpp.LlamaCppError as e:
        _log(f"no llama.cpp: {e}")
        return None
    # llama.cpp decodes fastest with every core (it launches the GPU work from one of its threads); hetegen_fx's
    # CPU parts take three quarters, the rest launch: each gets its own best unless --cpu-threads names one
    threads = args.cpu_threads or os.cpu_count() or torch.get_num_threads()
    return Peer(binary, gguf, foot, args, gpu, allowance, threads)


def _point(label, nbytes, model, ids, args, device, out_dir, gpu, idle, variants, ceilings, peer) -> dict:
    """One budget: the variants, their bounds, llama.cpp; a failure is recorded and the sweep goes on."""
    from .bench import _log, at_budget, decode_bounds

    point: dict = {"budget": label, "budget_bytes": nbytes, "variants": {}, "skipped": {}, "errors": {}}
    point["date"] = time.strftime("%Y-%m-%d %H:%M")
    folder = out_dir / "sweep" / label
    folder.mkdir(parents=True, exist_ok=True)
    pargs = at_budget(args, label if nbytes is not None else None)
    pargs.out = str(folder)  # one decode step's timeline per budget
    for name in variants:
        hetegen = point["variants"].get("hetegen")
        if (
            name in ("stream", "cpu", "blocks")
            and hetegen is not None
            and hetegen.get("offloaded_bytes") == 0
        ):
            point["skipped"][name] = "nothing offloaded at this budget: it would run hetegen's plan"
            _log(f"{label}: {name} skipped ({point['skipped'][name]})")
            continue
        _log(f"{label}: running {name} ...")
        try:
            r = _run(name, model, ids, pargs, device, gpu, idle)
        except Exception as e:  # a budget below the minimum working set, or a failure: recorded, not raised
            _release(model, device)
            budget = _budget_error(e)
            if budget is not None:
                point["skipped"][name] = str(budget)
                _log(f"{label}: {name} skipped: {budget}")
            else:
                traceback.print_exc()
                point["errors"][name] = f"{type(e).__name__}: {str(e)[:2000]}"
                _log(f"{label}: {name} FAILED: {point['errors'][name]}")
            continue
        smi = r["smi_process_bytes"]
        _log(
            f"{label}: {name} prefill {r['prefill_s']:.3f} s, decode {r['decode_tok_s']:.2f} tok/s, offloaded "
            f"{format_bytes(r.get('offloaded_bytes', 0))}"
            + (f", process on the GPU {format_bytes(smi)} (nvidia-smi)" if smi is not None else "")
        )
        point["variants"][name] = r
    _release(model, device)
    ran = list(point["variants"].values())
    if not ran:
        reasons = list(point["skipped"].values()) + list(point["errors"].values())
        point["reason"] = reasons[0] if reasons else "no variant to run"
        _log(f"{label}: point skipped: {point['reason']}")
        return point
    point["bounds_decode_s"] = decode_bounds(ran, ceilings)
    if peer is not None:
        try:
            point["llama_cpp"] = peer.at(nbytes)
        except Exception as e:  # recorded; the next budget tries again
            traceback.print_exc()
            point["llama_cpp"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        lc = point["llama_cpp"]
        if "decode_tok_s" in lc:
            _log(f"{label}: llama.cpp at -ngl {lc['ngl']} ({lc['fits_by']}): {lc['decode_tok_s']:.2f} tok/s")
        else:
            _log(f"{label}: llama.cpp: {lc.get('skipped') or lc.get('error')}")
    return point


def run_sweep(args: argparse.Namespace, out_dir: Path) -> int:
    """The sweep (see the module): ceilings, the all-GPU reference, every budget, the report."""
    from .bench import _log, _rss, run_facts, run_variant, setup
    from .costs import streaming_bytes

    device = torch.device(args.device)
    budgets = parse_budgets(args.sweep)
    requested = {v.strip() for v in args.variants.split(",")}
    variants = [v for v in SWEEP_VARIANTS if v in requested]
    if not variants:
        raise ConfigError(f"--sweep runs {', '.join(SWEEP_VARIANTS)}: --variants names none of them")
    cuda = device.type == "cuda"
    gpu = llamacpp.smi_id(device) if cuda else None
    idle = llamacpp.gpu_memory_used(gpu)  # before this process has a CUDA context: other processes' memory
    if idle is not None:
        _log(f"nvidia-smi: {format_bytes(idle)} in use on GPU {gpu} before this process's CUDA context")
        if torch.cuda.is_initialized():  # then the reading holds the context: the process is undercounted
            _log(
                "CUDA was initialised before the first nvidia-smi reading: the process's memory is undercounted"
            )
    model, ids, model_bytes, build_s, ceilings = setup(args, device)

    reference = None
    if "gpu" in requested:
        fits = not cuda or model_bytes <= torch.cuda.mem_get_info(device)[0] * 0.9
        if fits:
            _log("running the all-GPU reference ...")
            try:
                reference = run_variant("gpu", model, ids, args, device)
                _log(
                    f"gpu: prefill {reference['prefill_s']:.3f} s, decode {reference['decode_tok_s']:.2f} tok/s"
                )
            except Exception as e:
                traceback.print_exc()
                _log(f"gpu FAILED: {type(e).__name__}: {str(e)[:2000]}")
            finally:
                model.to("cpu")
        else:
            _log("the model does not fit the GPU: no all-GPU reference")
    _release(model, device)
    held = llamacpp.gpu_memory_used(gpu)
    context = held - idle if held is not None and idle is not None else 0
    if cuda:
        _log(f"this process holds {format_bytes(context)} on the GPU with no model (its CUDA context)")

    def report(
        points: list[dict],
    ) -> str:  # written after every point: a sweep cut short keeps what it measured
        ref_tokens, ref_name = (reference["tokens"], "gpu") if reference else (None, None)
        if (
            ref_tokens is None
        ):  # the largest budget's hetegen: a check that the variants agree, not a reference
            for p in reversed(points):
                if "hetegen" in p["variants"]:
                    ref_tokens, ref_name = p["variants"]["hetegen"]["tokens"], f"hetegen at {p['budget']}"
                    break
        for p in points:
            for r in p["variants"].values():
                n = len(r["tokens"])
                r["tokens_match_reference"] = None if ref_tokens is None else r["tokens"] == ref_tokens[:n]
        summary = {
            **run_facts(args, device, model_bytes, build_s),
            "reps": args.reps,
            "ceilings": ceilings,
            "ceiling_working_set_bytes": streaming_bytes(),
            "gpu_idle_bytes": idle,
            "process_context_bytes": context if cuda else None,
            "host_rss_bytes": _rss(),
            "reference": ref_name,
            "gpu_reference": reference,
            "llama_cpp": peer.to_dict() if peer is not None else None,
            "budgets": [label for label, _ in budgets],
            "points": list(points),
        }
        kept = merge_earlier(summary, earlier)
        if kept:
            _log(f"kept the points {', '.join(kept)} of the earlier sweep in {out_dir} (same settings)")
        atomic_write(out_dir / "sweep.json", json.dumps(summary, indent=1))
        table = format_table(summary)
        (out_dir / "bench.md").write_text(table + "\n")
        chart(summary, out_dir / "sweep.png")
        return table

    earlier = read_earlier(out_dir / "sweep.json")  # read once: this run rewrites the file after each point
    work = Path(tempfile.mkdtemp(prefix="hetegen-sweep-"))  # the GGUF: as large as the model
    peer = None
    try:
        peer = _peer(args, model, device, gpu, context, work)
        points: list[dict] = []
        for label, nbytes in budgets:
            _log(f"budget {label} ...")
            points.append(
                _point(label, nbytes, model, ids, args, device, out_dir, gpu, idle, variants, ceilings, peer)
            )
            table = report(points)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table)
    return 0


#: the settings an earlier sweep in the same --out must share for its points to stand beside this run's
SAME_SETTINGS = ("model", "dtype", "device", "prompt_len", "new_tokens", "reps", "cpu_threads")


def read_earlier(path: Path) -> dict | None:
    """The earlier ``sweep.json`` at ``path``, or None when there is none or it cannot be read."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def merge_earlier(summary: dict, earlier: dict | None) -> list[str]:
    """Add to ``summary`` the points of an earlier sweep (:func:`read_earlier`) whose budgets this run did not
    measure, when it has the same :data:`SAME_SETTINGS`: a long sweep can run in pieces (e.g. a few budgets
    per command where commands have a time limit), each point keeping its own date, reference check and
    llama.cpp run. Returns the budgets kept."""
    if earlier is None or any(earlier.get(k) != summary.get(k) for k in SAME_SETTINGS):
        return []
    mine = {p["budget_bytes"] for p in summary["points"]}
    kept = [dict(p) for p in earlier.get("points", []) if p.get("budget_bytes", -1) not in mine]
    for p in kept:
        p.setdefault("date", earlier.get("date"))
    summary["points"] = sorted(
        summary["points"] + kept, key=lambda p: (p["budget_bytes"] is None, p["budget_bytes"] or 0)
    )
    summary["budgets"] = [p["budget"] for p in summary["points"]]
    summary["kept_from_earlier"] = [p["budget"] for p in kept]
    return summary["kept_from_earlier"]


def _rate(r: dict | None) -> str:
    return f"{r['decode_tok_s']:.2f}" if r and "decode_tok_s" in r else "-"


def _bytes(n) -> str:
    return format_bytes(n) if isinstance(n, (int, float)) else "-"


#: hetegen_fx's own ways of running a model (``stream`` and ``cpu`` are the baselines it is measured against)
BEST_OF = ("hetegen", "compiled", "blocks", "graphs")


def best_variant(variants: dict) -> tuple[str | None, dict | None]:
    """``(name, result)`` of the fastest of :data:`BEST_OF` among a point's ``variants`` that decoded, hetegen on
    a tie, leaving out any whose tokens differ from the reference; ``(None, None)`` if none is left."""
    ran = [
        (n, variants[n])
        for n in BEST_OF
        if "decode_tok_s" in variants.get(n, {}) and variants[n].get("tokens_match_reference") is not False
    ]
    if not ran:
        return None, None
    return max(ran, key=lambda nr: nr[1]["decode_tok_s"])


def format_table(s: dict) -> str:
    """The sweep as markdown: one row per budget."""
    lc_info = s.get("llama_cpp")
    head = (
        f"{s['model']} {s['dtype']} ({format_bytes(s['model_bytes'])}), prompt {s['prompt_len']}, "
        f"{s['new_tokens']} new tokens, {s['device']}, {s['date']}, torch {s['torch']}, {s['cpu_threads']} CPU "
        "threads" + (f", llama.cpp with {lc_info['threads']} threads" if lc_info else ", no llama.cpp")
    )
    rows = [
        head,
        "",
        "| budget | hetegen tok/s | "
        + "".join(f"{n} tok/s | " for n in _OTHERS)
        + "llama.cpp tok/s (-ngl) | best / llama.cpp | hetegen % of bound | prefill s best / llama.cpp "
        "| peak GPU best torch / nvidia-smi | peak GPU llama.cpp nvidia-smi | tokens = ref |",
        "|---" * (9 + len(_OTHERS)) + "|",
    ]
    for p in s["points"]:
        v = p["variants"]
        if not v:
            rows.append(
                f"| {p['budget']} | skipped: {p.get('reason', '')[:160]} |" + "|" * (7 + len(_OTHERS))
            )
            continue
        h = v.get("hetegen")
        lc = p.get("llama_cpp") or {}
        lc_rate = f"{lc['decode_tok_s']:.2f} ({lc['ngl']})" if "decode_tok_s" in lc else "-"
        if lc.get("skipped"):
            lc_rate = "does not fit"
        elif lc.get("error"):
            lc_rate = "FAILED"
        name, b = best_variant(v)
        mark = f" ({name})" if name not in (None, "hetegen") else ""
        ratio = (
            f"{b['decode_tok_s'] / lc['decode_tok_s']:.2f}x{mark}" if b and lc.get("decode_tok_s") else "-"
        )
        bound = (p.get("bounds_decode_s") or {}).get("hetegen")
        reached = f"{bound / h['decode_s_per_token'] * 100:.0f}%" if bound and h else "-"
        prefill = f"{b['prefill_s']:.3f} / " if b else "- / "
        prefill += f"{lc['prompt_s']:.3f}" if "prompt_s" in lc else "-"
        peak = f"{_bytes(b.get('peak_gpu_bytes'))} / {_bytes(b.get('smi_process_bytes'))}" if b else "-"
        lc_peak = _bytes(lc.get("gpu_delta_bytes"))
        if lc_peak != "-" and lc.get("fits_by") == "estimate":
            lc_peak += " (est.)"
        matches = [r.get("tokens_match_reference") for r in v.values()]
        differ = [n for n, r in v.items() if r.get("tokens_match_reference") is False]
        tokens = (
            "-" if all(m is None for m in matches) else ("yes" if not differ else "NO: " + ", ".join(differ))
        )
        rows.append(
            f"| {p['budget']} | {_rate(h)} | "
            + "".join(f"{_rate(v.get(n))} | " for n in _OTHERS)
            + f"{lc_rate} | {ratio} | {reached} | {prefill} | {peak} | {lc_peak} | {tokens} |"
        )
    rows += [
        "",
        "best: hetegen_fx's fastest variant at that budget (of "
        + ", ".join(BEST_OF)
        + "; named where it is not hetegen), whose prefill and memory the row gives; "
        "peak GPU: its torch peak (max_memory_allocated) and its process on the GPU by nvidia-smi (CUDA "
        "context included); llama.cpp's process by nvidia-smi, at the largest -ngl whose process holds at most "
        "the budget plus this process's CUDA context"
        + (f" ({format_bytes(s['process_context_bytes'])})" if s.get("process_context_bytes") else "")
        + "; % of bound: hetegen's bandwidth bound at that budget (ceilings measured in the run) over its step; "
        f"tokens compared with {s.get('reference') or 'nothing (no reference)'}",
    ]
    if s.get("kept_from_earlier"):
        rows.append(
            "points from an earlier sweep in the same folder (same settings): "
            + ", ".join(
                f"{p['budget']} ({p.get('date')})"
                for p in s["points"]
                if p["budget"] in s["kept_from_earlier"]
            )
        )
    skipped = [
        f"- {p['budget']}: {n} skipped ({why[:200]})"
        for p in s["points"]
        if p["variants"]
        for n, why in p["skipped"].items()
    ]
    errors = [
        f"- {p['budget']}: {n} FAILED ({why[:200]})" for p in s["points"] for n, why in p["errors"].items()
    ]
    if skipped or errors:
        rows += ["", *skipped, *errors]
    graphs = _graph_lines(s)
    if graphs:
        rows += [
            "",
            "CUDA graphs (recorded, replays; why keys ran unrecorded; pinned inputs that moved):",
            *graphs,
        ]
    if lc_info and lc_info["runs"]:
        rows += ["", "llama.cpp runs: " + ", ".join(_run_line(n, r) for n, r in lc_info["runs"].items())]
    return "\n".join(rows)


def _graph_lines(s: dict) -> list[str]:
    """One line per variant that recorded CUDA graphs: how many it recorded and replayed, and why it did not
    more (a variant whose decode steps were not replayed ran its kernels launched one by one)."""
    lines = []
    for p in s["points"]:
        for name, r in p["variants"].items():
            g = r.get("cuda_graphs")
            if not g:
                continue
            why = ", ".join(f"{k} {n}" for k, n in g.get("eager_keys", {}).items()) or "none"
            moved = sum(g.get("pinned_inputs_moved", {}).values())
            lines.append(
                f"- {p['budget']} {name}: {g['recorded']} recorded, {g['replays']} replays of {g['stretches']} "
                f"stretches; unrecorded keys: {why}; moved: {moved}"
                + ("; pool full" if g.get("full") else "")
            )
    return lines


def _run_line(n: str, r: dict) -> str:
    if "error" in r:
        return f"-ngl {n} failed"
    mem = r.get("gpu_delta_bytes")
    return f"-ngl {n} {r.get('decode_tok_s', 0):.2f} tok/s at " + (
        format_bytes(mem) if mem is not None else f"~{format_bytes(r['estimate_bytes'])} (est.)"
    )


def _x(points: list[dict]) -> dict[str, float]:
    """Each point's place on the budget axis (GiB); ``all`` one step past the largest budget."""
    finite = [p["budget_bytes"] / 2**30 for p in points if p["budget_bytes"] is not None]
    step = (finite[-1] - finite[0]) / max(len(finite) - 1, 1) if len(finite) > 1 else max(finite or [1.0])
    top = (finite[-1] if finite else 0.0) + (step or 1.0)
    return {
        p["budget"]: (p["budget_bytes"] / 2**30 if p["budget_bytes"] is not None else top) for p in points
    }


def chart(s: dict, path: Path) -> None:
    """Decode tokens/s against the budget (each variant, llama.cpp, hetegen's bound dashed), and beside it
    each system's measured GPU memory against the budget (hetegen_fx's at its fastest variant,
    :func:`best_variant`)."""
    from .bench import _log

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no chart (pip install matplotlib)")
        return
    points = [p for p in s["points"] if p["variants"]]
    if not points:
        _log("no point ran: no chart")
        return
    xs = _x(points)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "hetegen": ("#4472c4", "o"),
        "stream": ("#a5a5a5", "s"),
        "cpu": ("#ed7d31", "^"),
        "compiled": ("#2e7d32", "D"),
        "blocks": ("#7030a0", "v"),
        "graphs": ("#c00000", "P"),
    }
    rates: list[float] = []
    for name, (color, marker) in styles.items():
        ys = [p["variants"][name]["decode_tok_s"] if name in p["variants"] else math.nan for p in points]
        if any(not math.isnan(y) for y in ys):  # a gap where a budget did not run it: no line across
            ax[0].plot([xs[p["budget"]] for p in points], ys, marker=marker, color=color, label=name)
            rates += [y for y in ys if not math.isnan(y)]
    lc = [(xs[p["budget"]], p["llama_cpp"]) for p in points if "decode_tok_s" in (p.get("llama_cpp") or {})]
    if lc:
        ax[0].plot(
            [x for x, _ in lc],
            [r["decode_tok_s"] for _, r in lc],
            marker="D",
            color="#70ad47",
            label="llama.cpp",
        )
        for x, r in lc:
            ax[0].annotate(
                f"-ngl {r['ngl']}",
                (x, r["decode_tok_s"]),
                fontsize=7,
                xytext=(3, -10),
                textcoords="offset points",
            )
        rates += [r["decode_tok_s"] for _, r in lc]
    bound = [
        (xs[p["budget"]], 1 / p["bounds_decode_s"]["hetegen"])
        for p in points
        if (p.get("bounds_decode_s") or {}).get("hetegen")
    ]
    if bound:
        ax[0].plot(*zip(*bound, strict=True), ls="--", color="#4472c4", alpha=0.6, label="hetegen bound")
    if rates and max(rates) / max(min(rates), 1e-9) > 20:
        ax[0].set_yscale("log")
    ax[0].set_ylabel("decode tokens/s")
    ax[0].legend(fontsize=8)
    best = [(xs[p["budget"]], best_variant(p["variants"])[1]) for p in points]
    mem = {
        "hetegen_fx, best variant (nvidia-smi)": [(x, b.get("smi_process_bytes")) for x, b in best if b],
        "hetegen_fx, best variant (torch peak)": [(x, b.get("peak_gpu_bytes")) for x, b in best if b],
        "llama.cpp (nvidia-smi)": [(x, r.get("gpu_delta_bytes")) for x, r in lc],
    }
    for (label, pts), color in zip(mem.items(), ("#4472c4", "#9dc3e6", "#70ad47"), strict=True):
        pts = [(x, y / 2**30) for x, y in pts if y is not None]
        if pts:
            ax[1].plot(*zip(*pts, strict=True), marker="o", color=color, label=label)
    finite = [xs[p["budget"]] for p in points if p["budget_bytes"] is not None]
    if finite:
        ax[1].plot(finite, finite, ls=":", color="gray", label="the budget")
    ax[1].set_ylabel("GPU memory, GiB")
    ax[1].legend(fontsize=8)
    for a in ax:
        a.set_xticks(list(xs.values()), [p["budget"] for p in points], fontsize=8)
        a.set_xlabel("budget")
    fig.suptitle(
        f"{s['model']} {s['dtype']}, prompt {s['prompt_len']}, {s['device']}, {s['date']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
