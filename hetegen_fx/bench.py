"""``hetegen bench``: hetegen_fx side by side with what users would otherwise pick, in one process.

On one model (a real architecture with random weights, built in seconds), one prompt and one GPU budget:

* ``gpu``        all weights on the GPU where they fit: the reference (and the tokens every variant must match);
* ``accelerate`` HF Accelerate ``infer_auto_device_map`` + ``dispatch_model`` with ``max_memory``;
* ``stream``     hetegen_fx with α = 0: offloaded weights streamed with prefetch (the FlexGen way);
* ``cpu``        hetegen_fx with α = 1: offloaded Linears computed on the CPU (llama.cpp ``-ngl``);
* ``hetegen``    hetegen_fx with profiled α.

It also measures the ceilings of the machine in the same run (pinned host→device, CPU GEMV, both at once,
HBM) and computes the bandwidth bound of the offloaded decode step. Output: a table, JSON, a PNG chart.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import kernels
from .costs import _threads, streaming_bytes
from .host import default_threads
from .plan import atomic_write

VARIANTS = ("accelerate", "stream", "cpu", "hetegen", "gpu")
#: variants run only when asked for: "graphs" is hetegen with CUDA graphs (``cuda_graphs=True``) and one
#: static KV cache of its own for every generate, so that its decode steps repeat their shapes and addresses;
#: "default" is hetegen as a user compiles it, naming no ``max_seq_len`` (the KV cache reserved by use,
#: where the other variants name the workload's length); "compiled" is "graphs" with its stretches of device
#: work compiled by inductor (``compile_stretches=True``), the graphs recorded from inductor's code; "blocks" is
#: hetegen with each offloaded MLP as one CPU job (``block_jobs=True``)
EXTRA_VARIANTS = ("graphs", "default", "compiled", "blocks")
#: the variants whose decode step is recorded as a timeline, and the stem of its files (JSON, PNG): hetegen's,
#: and with ``block_jobs`` the same step with each offloaded MLP one CPU job (before and after)
TIMELINES = {"hetegen": "trace_decode", "blocks": "trace_decode_blocks"}
#: the variants that replay CUDA graphs, and so decode into one static KV cache of their own
STATIC_CACHE = ("graphs", "compiled")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="llama-2-7b",
        help="architecture preset with random weights (hetegen_fx.models.PRESETS)",
    )
    p.add_argument("--model", default=None, help="a local checkpoint instead of a preset")
    p.add_argument(
        "--dtype", default="float16", choices=sorted(DTYPES), help="the model's dtype (default: %(default)s)"
    )
    p.add_argument(
        "--gpu-memory",
        default="6GiB",
        help="the GPU budget of the offloading variants (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cuda",
        help="the accelerator (default: %(default)s; on cpu it only shows that the variants run and agree)",
    )
    p.add_argument(
        "--prompt-len", type=int, default=512, help="tokens of the random prompt (default: %(default)s)"
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="tokens each timed generate produces (default: %(default)s)",
    )
    p.add_argument(
        "--accelerate-tokens", type=int, default=8, help="Accelerate is ~1 tok/s: fewer tokens for it"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {VARIANTS + EXTRA_VARIANTS} (default: all but {EXTRA_VARIANTS})",
    )
    p.add_argument(
        "--graph-memory", default=None, help="the graphs variant's pool (graph_memory; default: the option's)"
    )
    p.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="threads of the CPU work (torch.set_num_threads and cpu_threads; default: torch's)",
    )
    p.add_argument(
        "--reps", type=int, default=2, help="timed generates per variant (the decode time is their median)"
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="afterwards, compile the stream, cpu and hetegen variants side by side and time their decode "
        "steps in this many round-robin rounds: ratios that the machine's drift between variants does not "
        "skew (needs their budgets on the GPU at once)",
    )
    p.add_argument(
        "--grow",
        type=int,
        default=None,
        metavar="TOKENS",
        help="afterwards, one generate from the prompt to TOKENS tokens: the default variant's (peak GPU memory "
        "against the budget, decode speed per 512-token stretch) if it is among --variants, the gpu variant's "
        "(the reference tokens) if it is, else the reference is read from --reference-cache",
    )
    p.add_argument(
        "--raise-to",
        default=None,
        metavar="BUDGET",
        help="afterwards, raise the default variant's budget to BUDGET with set_gpu_memory and time it against "
        "a fresh compile at BUDGET",
    )
    p.add_argument(
        "--reference-cache",
        default=None,
        metavar="DIR",
        help="keep the all-GPU reference tokens of the --grow generate in DIR, for runs without the gpu "
        "variant (they take minutes on a 7B)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="BUDGETS",
        help="instead of the table at --gpu-memory: the hetegen, stream, cpu, compiled, blocks and graphs variants "
        "(those of --variants) at each "
        "of these comma-separated budgets, e.g. 2GiB,4GiB,8GiB,all (all: everything resident), beside llama.cpp "
        "at the -ngl that fits each budget; sweep.json, sweep.png and the table under --out "
        "(hetegen_fx.bench_sweep)",
    )
    p.add_argument(
        "--cpu-memory",
        default=None,
        metavar="BYTES",
        help="instead of the table: the model's weights saved as safetensors under --storage-dir and run with "
        "this much host memory beside --gpu-memory: hetegen_fx's three tiers (hetegen, layered), Accelerate's "
        "disk offload, llama.cpp's mmap in a memory cgroup (llama) (hetegen_fx.bench_storage)",
    )
    p.add_argument(
        "--storage-slots",
        type=int,
        default=None,
        help="with --cpu-memory: slots of the storage ring (storage_slots; default: the option's)",
    )
    p.add_argument(
        "--storage-dir",
        default=None,
        metavar="DIR",
        help="with --cpu-memory: where the checkpoint is written once and kept (default: OUT/checkpoint)",
    )
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="PATH",
        help="with --sweep: a built llama-bench (the binary, or a folder holding it, its bin/ or build/bin/), or "
        "llama.cpp's source .tgz to build (minutes; needs cmake and nvcc); default: $LLAMA_CPP_BIN, else "
        "llama-bench on PATH, else the sweep runs without llama.cpp",
    )


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Start the next variant from a clean device: no graphs, staging buffers or cached blocks left."""
    from hetegen_fx.runtime import clear_blas_workspaces, get_runtime

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        get_runtime(device).free()
        # cuBLAS keeps a workspace per stream in torch's allocator (32 MiB on Hopper): a variant's peak is
        # measured from what is allocated when it starts, so each variant allocates (and counts) its own
        clear_blas_workspaces(device)


def cpu_gemv_by_dtype(out_f: int, in_f: int) -> dict[str, float]:
    """CPU GEMV bandwidth (weight bytes/s, from DRAM) for fp16, bf16 and fp32, and each one's relative
    error against an fp64 reference: which CPU dtype is fastest at acceptable accuracy."""
    res: dict[str, float] = {}
    gen = torch.Generator().manual_seed(1)
    w64 = torch.empty(out_f, in_f, dtype=torch.float64).uniform_(-0.01, 0.01, generator=gen)
    x64 = torch.empty(1, in_f, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    ref = torch.nn.functional.linear(x64, w64)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dt).removeprefix("torch.")
        ws = [w64.to(dt) for _ in range(_copies(w64.numel() * dt.itemsize))]  # streamed from DRAM
        x = x64.to(dt)
        rate, y = _gemv_rate(lambda w, x=x: torch.nn.functional.linear(x, w), ws)
        res[f"cpu_gemv_{name}"] = rate
        res[f"cpu_gemv_{name}_rel_err"] = float((y.double() - ref).norm() / ref.norm())
        if dt != torch.float32 and kernels.load():  # the CPU parts' own kernel (hetegen_fx.kernels)
            rate, y = _gemv_rate(lambda w, x=x: torch.ops.hetegen_cpu.linear(x, w, None), ws)
            res[f"cpu_gemv_kernel_{name}"] = rate
            res[f"cpu_gemv_kernel_{name}_rel_err"] = float((y.double() - ref).norm() / ref.norm())
        del ws
    return res


#: windows each ceiling is measured in (the best counts)
_WINDOWS = 3


def _copies(nbytes: int) -> int:
    """Copies of an ``nbytes`` buffer that together stream from DRAM when cycled (:func:`costs.streaming_bytes`)."""
    return max(2, -(-streaming_bytes() // max(nbytes, 1)))


def _gemv_rate(gemv, ws: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Weight bytes/s of ``gemv(w)`` cycling once through ``ws`` (after one untimed call), and its last result."""
    gemv(ws[-1])
    t0 = time.perf_counter()
    for w in ws:
        y = gemv(w)
    return len(ws) * ws[0].numel() * ws[0].element_size() / (time.perf_counter() - t0), y


def _rss() -> int:
    """Resident host memory of this process, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Bandwidths in bytes/s measured now: pinned H2D, CPU GEMV (with the CPU parts' kernel and thread
    count), both at once, device copy."""
    with _threads(default_threads() if device.type == "cuda" else None):
        return _ceilings(device, dtype)


def _ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The rates of :func:`measure_ceilings`. Weights and pinned host buffers are cycled through working sets
    of :func:`costs.streaming_bytes`, so both the CPU and the copies read DRAM, as a step does."""
    out_f, in_f = 11008, 4096
    linear = kernels.cpu_linear()
    x = torch.randn(1, in_f, dtype=dtype)
    w = [
        torch.empty(out_f, in_f, dtype=dtype).uniform_(-0.01, 0.01)
        for _ in range(_copies(out_f * in_f * dtype.itemsize))
    ]
    # each ceiling is the best of a few windows: on a shared host something else can only slow a window down
    res = {"cpu_gemv": max(_gemv_rate(lambda m: linear(x, m), w)[0] for _ in range(_WINDOWS))}
    res.update(cpu_gemv_by_dtype(out_f, in_f))
    same = ("cpu_gemv_kernel_" if kernels.load() else "cpu_gemv_") + str(dtype).removeprefix("torch.")
    res["cpu_gemv"] = max(res["cpu_gemv"], res.get(same, 0.0))  # the dtype table timed it once more
    if device.type != "cuda":
        return res
    chunk = 64 * 2**20
    host = torch.empty(_copies(chunk) * chunk, dtype=torch.uint8).pin_memory()
    chunks = host.view(-1, chunk)
    dev = torch.empty(chunk, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def queue_copies(n: int) -> None:
        with torch.cuda.stream(stream):
            for i in range(n):
                dev.copy_(chunks[i % len(chunks)], non_blocking=True)

    def h2d(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        queue_copies(n)
        stream.synchronize()
        return n * chunk / (time.perf_counter() - t0)

    h2d(len(chunks))
    res["h2d_pinned"] = max(h2d(2 * len(chunks)) for _ in range(_WINDOWS))

    def together() -> tuple[float, float]:
        """Both at once, both busy the whole time: copies queued on the copy stream, GEMVs until they are done."""
        n_copy = max(160, 2 * len(chunks))  # ~0.2 s at 55 GB/s
        _sync(device)
        t0 = time.perf_counter()
        queue_copies(n_copy)
        done = torch.cuda.Event()
        done.record(stream)
        n_gemv = 0
        while not done.query():
            linear(x, w[n_gemv % len(w)])
            n_gemv += 1
        wall = time.perf_counter() - t0
        done.synchronize()
        return n_gemv * w[0].numel() * w[0].element_size() / wall, n_copy * chunk / wall

    res["together_cpu"], res["together_h2d"] = max((together() for _ in range(_WINDOWS)), key=sum)
    res["combined"] = res["together_cpu"] + res["together_h2d"]
    big = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    big2 = torch.empty_like(big)
    big2.copy_(big)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        big2.copy_(big)
    _sync(device)
    res["hbm"] = 5 * 2 * big.numel() / (time.perf_counter() - t0)
    del big, big2
    return res


class StepClock:
    """A logits processor that only stamps the time: ``generate`` calls it once per new token, after that
    token's logits, so the gaps between stamps are the decode steps as the caller sees them."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores

    def steps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]


def _time_generate(
    model, ids: torch.Tensor, new_tokens: int, device: torch.device, reps: int = 2, cache=None
) -> tuple[float, float, list[int], list[float]]:
    """(prefill seconds, decode seconds per token, tokens, every decode step's seconds) with a warm model.

    The prefill time is the median of three generates of one token. The decode time is the median over
    ``reps`` generates of ``new_tokens`` of the time from the first token's logits to the last one's over
    the steps between them, so it is measured inside one call and owes nothing to the prefill's (a prefill
    slower in the one-token calls than in the long ones, say a CUDA graph recorded there, once made the
    difference of the two calls' totals meaningless); the steps are those of every rep, so their spread shows
    the hosts' drift (tens of percent within a minute). With a ``cache`` (an HF StaticCache), every generate
    starts from it, reset.
    """
    from transformers import LogitsProcessorList

    kw = {"do_sample": False, "pad_token_id": 0}
    result = {}
    clock = StepClock()

    def timed(n: int, processors=None) -> float:
        _sync(device)
        t0 = time.perf_counter()
        result["out"] = model.generate(
            ids, max_new_tokens=n, logits_processor=processors, **kw, **_cache_kw(cache)
        )
        _sync(device)
        return time.perf_counter() - t0

    steps: list[float] = []
    with torch.no_grad():
        prefill = statistics.median(timed(1) for _ in range(3))
        spans = []
        for _ in range(max(1, reps)):
            clock.stamps.clear()
            total = timed(new_tokens, LogitsProcessorList([clock]))
            gaps = clock.steps()
            steps += gaps
            # one new token has no step between logits: its decode time is the call's less the prefill's
            spans.append(sum(gaps) / len(gaps) if gaps else max(total - prefill, 1e-9))
    out = result["out"]
    decode = max(statistics.median(spans), 1e-9)
    return prefill, decode, out[0, ids.shape[1] :].tolist(), steps


def _warmups(name: str) -> int:
    """Warm-up generates before a variant is timed: the compiled one's stretches run inductor's code only
    from their :data:`~hetegen_fx.inductor.COMPILE_AFTER`-th call (the prefill's too), so it gets one more."""
    from .inductor import COMPILE_AFTER

    return COMPILE_AFTER + 1 if name == "compiled" else 1


def _static_cache(name: str, model, args):
    """The one KV cache a variant of :data:`STATIC_CACHE` decodes into in every generate (HF would make a new
    one, at new addresses, per call, and the CUDA graphs would re-record); None for the others."""
    if name not in STATIC_CACHE:
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=args.prompt_len + args.new_tokens + 8)


def _cache_kw(cache) -> dict:
    """generate() arguments that start from ``cache`` (an HF StaticCache, reset), or none."""
    if cache is None:
        return {}
    from hetegen_fx.api import cache_argument, reset_cache

    reset_cache(cache)

    return {cache_argument(): cache}


def _build(args):
    from hetegen_fx.models import build_random, load

    if args.model:
        return load(args.model, dtype=DTYPES[args.dtype])[0]
    return build_random(args.preset, dtype=DTYPES[args.dtype])


def at_budget(args: argparse.Namespace, gpu_memory) -> argparse.Namespace:
    """A copy of the bench's arguments with another ``--gpu-memory`` (None: no budget)."""
    return argparse.Namespace(**{**vars(args), "gpu_memory": gpu_memory})


def _compile(name: str, model, args, device: torch.device):
    """hetegen_fx's variant ``name`` of ``model`` (stream, cpu, hetegen, graphs, default, compiled or blocks)."""
    import hetegen_fx

    alpha = {"stream": 0.0, "cpu": 1.0}.get(name)
    graphs = {"cuda_graphs": True, "graph_memory": args.graph_memory} if name in STATIC_CACHE else {}
    if name == "compiled":
        graphs["compile_stretches"] = True
    if name == "blocks":
        graphs["block_jobs"] = True
    return hetegen_fx.compile(
        model,
        gpu_memory=args.gpu_memory,
        device=str(device),
        alpha=alpha,
        max_seq_len=None if name == "default" else args.prompt_len + args.new_tokens + 8,
        cpu_threads=args.cpu_threads,
        **graphs,
    )


#: the variants ``--interleave`` times side by side, and the ratios it reports (a's speed over b's)
INTERLEAVED = ("stream", "cpu", "hetegen", "default", "compiled", "blocks")
INTERLEAVED_RATIOS = (
    ("hetegen", "cpu"),
    ("hetegen", "stream"),
    ("default", "hetegen"),
    ("compiled", "hetegen"),
    ("blocks", "hetegen"),
)


def run_interleaved(names: list[str], model, ids: torch.Tensor, args, device: torch.device) -> dict:
    """Compile ``names`` side by side (each with its own store and budget), then time one generate of each
    per round, round-robin from a rotating start, for ``args.interleave`` rounds. Each round's median decode
    step gives a per-round speed ratio for :data:`INTERLEAVED_RATIOS`: the GPU hosts drift by tens of percent
    between the minutes that the variants run in one after the other, but little within a round."""
    from transformers import LogitsProcessorList

    from hetegen_fx.store import forget

    _free(device)
    runners, caches = {}, {}
    kw = {"do_sample": False, "pad_token_id": 0}
    steps: dict[str, list[float]] = {n: [] for n in names}
    try:
        with torch.no_grad():
            for name in names:
                forget(list(model.parameters()))  # a store of its own: the variants must not share residency
                runners[name] = _compile(name, model, args, device)
                caches[name] = _static_cache(name, model, args)
                for _ in range(_warmups(name)):
                    runners[name].generate(ids, max_new_tokens=4, **kw, **_cache_kw(caches[name]))
            forget(list(model.parameters()))
            new = max(args.new_tokens, 3)
            for r in range(args.interleave):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    clock = StepClock()
                    _sync(device)
                    runners[name].generate(
                        ids,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        logits_processor=LogitsProcessorList([clock]),
                        **kw,
                        **_cache_kw(caches[name]),
                    )
                    _sync(device)
                    steps[name].append(statistics.median(clock.steps()))
                _log(
                    f"interleaved round {r + 1}/{args.interleave}: "
                    + ", ".join(f"{n} {steps[n][-1] * 1e3:.1f} ms" for n in names)
                )
    finally:  # the runners go whatever happens (an error's traceback keeps this frame, and the dict, alive)
        runners.clear()
        caches.clear()
        _free(device)
    speedups = {}
    for a, b in INTERLEAVED_RATIOS:
        if a in steps and b in steps:
            per_round = [tb / ta for ta, tb in zip(steps[a], steps[b], strict=True)]
            speedups[f"{a} / {b}"] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
                "rounds_faster": sum(x > 1 for x in per_round),
                "per_round": per_round,
            }
    return {"rounds": args.interleave, "round_step_s": steps, "speedup": speedups}


def run_variant(name: str, model, ids: torch.Tensor, args, device: torch.device) -> dict:
    import hetegen_fx
    from hetegen_fx.runtime import get_runtime
    from hetegen_fx.store import forget

    result: dict = {"variant": name}
    new_tokens = args.accelerate_tokens if name == "accelerate" else args.new_tokens
    forget(list(model.parameters()))  # the last variant's store (its resident weights) goes with it
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    if name == "gpu":
        runner = model.to(device)
    elif name == "accelerate":
        from accelerate import dispatch_model, infer_auto_device_map

        model = _build(args)  # dispatch_model rewrites the model it is given: use a twin
        dmap = infer_auto_device_map(
            model,
            max_memory={device.index or 0: args.gpu_memory, "cpu": "1000GiB"},
            no_split_module_classes=getattr(model, "_no_split_modules", None),
        )
        runner = dispatch_model(model, device_map=dmap, main_device=device)
    else:
        runner = _compile(name, model, args, device)
    result["setup_s"] = time.perf_counter() - t0
    result["host_rss_after_setup_bytes"] = _rss()
    cache = _static_cache(name, model, args)
    with torch.no_grad():  # warm-up: compiles the prefill and decode graphs (and the stretches, from their
        for _ in range(_warmups(name)):  # COMPILE_AFTER-th call)
            runner.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **_cache_kw(cache))
        # a one-token generate (the timed prefill) is a graph of its own: compiled, and its stretches
        # recorded, here rather than in its timed calls
        for _ in range(_warmups(name) + (name in STATIC_CACHE)):
            runner.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, **_cache_kw(cache))
    result["first_call_s"] = time.perf_counter() - t0
    _log(f"{name}: set up, compiled and warmed up in {result['first_call_s']:.1f} s")
    prefill, decode, tokens, steps = _time_generate(runner, ids, new_tokens, device, args.reps, cache)
    result.update(prefill_s=prefill, decode_s_per_token=decode, decode_tok_s=1.0 / decode, tokens=tokens)
    if steps:
        q = statistics.quantiles(steps, n=10, method="inclusive") if len(steps) > 1 else [steps[0]] * 9
        result["decode_step_s"] = {
            "p10": q[0],
            "median": statistics.median(steps),
            "p90": q[-1],
            "all": steps,
        }
    if device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device) - base
        result["allocated_at_start_bytes"] = base  # 0 unless an earlier variant left something behind
    if name not in ("gpu", "accelerate"):
        plans = hetegen_fx.explain(runner).plans
        dec = min(plans, key=lambda p: p.tokens)
        result["offloaded_bytes"] = dec.offloaded_bytes
        result["resident_bytes"] = dec.resident_bytes
        result["mean_alpha"] = statistics.fmean([lp.share for lp in dec.layers if not lp.resident] or [0])
        result["plan_table"] = dec.table()
        result["plans"] = [
            {
                "label": p.label,
                "tokens": p.tokens,
                "mean_alpha": statistics.fmean([lp.share for lp in p.layers if not lp.resident] or [0]),
                "predicted_linear_s": p.predicted_seconds,
            }
            for p in plans
        ]
        host = get_runtime(device).host
        result["cpu_worker"] = {
            "threads": host.threads,
            "stream_wait": host.stream_wait,
            "one_call_per_job": host.together,  # HETEGEN_FUSED_JOBS
        }
        st = hetegen_fx.state(runner)
        if st.cuda_graphs is not None:
            result["cuda_graphs"] = st.cuda_graphs
        if st.compiled_stretches is not None:  # inductor: shapes compiled, refused, seconds spent compiling
            result["compiled_stretches"] = st.compiled_stretches
    if name in TIMELINES:  # a measured timeline of one decode step: the picture of the overlap
        from hetegen_fx.trace import record

        with torch.no_grad(), record() as timelines:
            runner.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        step = timelines[-1]
        out_dir = Path(args.out)
        stem = TIMELINES[name]
        step.save(out_dir / f"{stem}.json")
        try:
            what = f"one decode step of {args.model or args.preset}" + (
                "" if name == "hetegen" else f" ({name})"
            )
            step.plot(out_dir / f"{stem}.png", title=what)
        except Exception as e:  # matplotlib missing: the JSON is still there
            _log(f"no timeline picture: {e}")
        result["trace"] = {
            "step_s": step.duration,
            "copy_busy_s": step.busy("PCIe"),
            "cpu_busy_s": step.busy("CPU"),
            "gpu_busy_s": step.busy("GPU"),
            "copy_cpu_overlap_s": step.overlap("PCIe", "CPU"),
            "cpu_jobs": sum(e.lane == "CPU" for e in step.events),
        }
    del runner, model
    _free(device)
    return result


def setup(args, device: torch.device) -> tuple:
    """What every run starts from: the model (built, timed), the random prompt, the model's bytes and the
    ceilings of the machine measured now: ``(model, ids, model_bytes, build_s, ceilings)``."""
    from hetegen_fx.config import format_bytes

    t0 = time.perf_counter()
    model = _build(args)
    build_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _log(f"built {args.model or args.preset} ({format_bytes(model_bytes)}, {args.dtype}) in {build_s:.1f} s")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=gen)
    ceilings = measure_ceilings(device, DTYPES[args.dtype])
    _log("ceilings: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in ceilings.items()))
    return model, ids, model_bytes, build_s, ceilings


def run_facts(args, device: torch.device, model_bytes: int, build_s: float) -> dict:
    """What every report of the bench starts with: the device, date, model, dtype and size, the workload,
    torch and the CPU threads."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or args.preset,
        "dtype": args.dtype,
        "model_bytes": model_bytes,
        "build_s": build_s,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def main(args: argparse.Namespace) -> int:
    from hetegen_fx.config import parse_bytes

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hetegen bench: no CUDA device here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = VARIANTS + EXTRA_VARIANTS
    if getattr(args, "cpu_memory", None):
        from .bench_storage import STORAGE_VARIANTS

        known = known + tuple(v for v in STORAGE_VARIANTS if v not in known)
    unknown = set(variants) - set(known)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {known}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "cpu_memory", None):  # a model beyond host memory: its own variants and report
        from .bench_storage import run_storage

        return run_storage(args, out_dir)
    if getattr(args, "sweep", None):  # budgets instead of variants: ceilings, reference, points, report
        from .bench_sweep import run_sweep

        return run_sweep(args, out_dir)

    model, ids, model_bytes, build_s, ceilings = setup(args, device)
    rss_model = _rss()

    results = []
    order = [v for v in VARIANTS + EXTRA_VARIANTS if v in variants]
    if "gpu" in order and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if model_bytes > free * 0.9:
            _log("the model does not fit the GPU: no all-GPU reference")
            order.remove("gpu")
    for name in order:
        if name == "accelerate" and device.type != "cuda":
            continue
        _log(f"running {name} ...")
        try:
            r = run_variant(name, model, ids, args, device)
        except Exception as e:  # record the failure and go on with the other variants
            import traceback

            traceback.print_exc()
            _log(f"{name} FAILED: {type(e).__name__}: {str(e)[:2000]}")
            _free(device)
            continue
        st = r.get("decode_step_s")
        spread = f" (steps p10-p90 {st['p10'] * 1e3:.1f}-{st['p90'] * 1e3:.1f} ms)" if st else ""
        _log(f"{name}: prefill {r['prefill_s']:.3f} s, decode {r['decode_tok_s']:.2f} tok/s{spread}")
        results.append(r)
        if name == "gpu":
            model.to("cpu")

    interleaved = None
    together = [v for v in INTERLEAVED if v in {r["variant"] for r in results}]  # those that ran
    if args.interleave > 0 and len(together) > 1:
        _log(f"interleaving {', '.join(together)} for {args.interleave} rounds ...")
        try:
            interleaved = run_interleaved(together, model, ids, args, device)
        except Exception as e:  # e.g. the variants' budgets do not fit the GPU at once: the table stands
            _log(f"interleaving FAILED: {type(e).__name__}: {str(e)[:2000]}")
            _free(device)

    by = {r["variant"]: r for r in results}
    ref = by.get("gpu") or by.get("stream")
    summary = {
        **run_facts(args, device, model_bytes, build_s),
        "gpu_memory": parse_bytes(args.gpu_memory),
        "ceilings": ceilings,
        "ceiling_working_set_bytes": streaming_bytes(),
        "host_rss_after_build_bytes": rss_model,
        "results": results,
        "interleaved": interleaved,
        "grow": None,
        "raise": None,
    }

    def write() -> None:  # after each stage: a run stopped in a later one keeps what it measured
        ref_tokens = ref["tokens"] if ref else summary.get("reference_prefix")
        for r in results:
            n = len(r["tokens"])
            r["tokens_match_reference"] = ref_tokens is not None and r["tokens"] == ref_tokens[:n]
        bounds = decode_bounds(results, ceilings)
        summary.update(bound_decode_s=bounds.get("hetegen"), bounds_decode_s=bounds)
        atomic_write(out_dir / "bench.json", json.dumps(summary, indent=1))

    write()
    _residency_scenarios(model, ids, args, device, ref, summary, write)
    table = format_table(summary)
    (out_dir / "bench.md").write_text(table + "\n")
    _chart(summary, out_dir / "bench.png")
    grow = summary["grow"]
    if grow and grow["stretches"]:
        try:
            from .bench_residency import chart

            chart(
                grow, out_dir / "bench_grow.png", f"{summary['model']} {args.dtype}, budget {args.gpu_memory}"
            )
        except ImportError:
            pass
    print(table)
    return 0


def _residency_scenarios(model, ids, args, device, ref: dict | None, summary: dict, write) -> None:
    """``--grow`` and ``--raise-to`` (:mod:`hetegen_fx.bench_residency`), into ``summary["grow"]`` and
    ``summary["raise"]``, ``write()`` after each; a failure is logged, not raised. Where the run has no short
    reference (no gpu or stream variant), the long generate's reference gives one: its first tokens
    (``summary["reference_prefix"]``), as greedy decoding of the same prompt makes the same prefix."""
    from .bench_residency import divergence, reference_tokens, run_grow, run_raise

    variants = {v.strip() for v in args.variants.split(",")}
    short = ref["tokens"] if ref else None
    if args.grow:
        try:
            reference = reference_tokens(
                model, ids, args.grow - ids.shape[1], args, device, "gpu" in variants
            )
            if short is None and reference is not None:
                short = summary["reference_prefix"] = reference[: max(args.new_tokens, 3)]
            if "default" in variants:
                summary["grow"] = grow = run_grow(model, ids, args, device, reference)
                first = grow["first_difference"]
                if first is not None:  # a near tie or an error: the all-GPU model's logits tell
                    grow["divergence"] = divergence(
                        model, ids, reference, first, grow["tokens"][first], device
                    )
        except Exception as e:
            _log(f"grow FAILED: {type(e).__name__}: {str(e)[:2000]}")
            _free(device)
        write()
    if args.raise_to:
        try:
            summary["raise"] = run_raise(model, ids, args, device, short)
        except Exception as e:
            _log(f"raise FAILED: {type(e).__name__}: {str(e)[:2000]}")
            _free(device)
        write()


#: the ceiling each kind of variant streams its offloaded bytes at
_BOUND_RATE = {
    "hetegen": "combined",
    "default": "combined",
    "compiled": "combined",
    "blocks": "combined",
    "cpu": "cpu_gemv",
    "stream": "h2d_pinned",
}


def decode_bounds(results: list[dict], ceilings: dict[str, float]) -> dict[str, float]:
    """Seconds per decode step each of the hetegen, CPU-only and stream variants needs at the ceilings
    measured in the run: its plan's offloaded bytes at the rate it streams them (the CPU and the copies at
    once, CPU GEMV alone, copies alone) plus its resident bytes at HBM speed. Empty without a GPU."""
    if "hbm" not in ceilings:
        return {}
    return {
        r["variant"]: r["offloaded_bytes"] / ceilings[_BOUND_RATE[r["variant"]]]
        + r["resident_bytes"] / ceilings["hbm"]
        for r in results
        if r["variant"] in _BOUND_RATE and "offloaded_bytes" in r
    }


def format_table(s: dict) -> str:
    from hetegen_fx.config import format_bytes

    rows = [
        f"{s['model']} {s['dtype']}, budget {format_bytes(s['gpu_memory'] or 0)}, prompt {s['prompt_len']}, "
        f"{s['device']}, {s['date']}, torch {s['torch']}, {s['cpu_threads']} CPU threads",
        "",
        "| variant | prefill s | decode tok/s | ms/token | step p10-p90 ms | peak GPU | tokens = ref | vs accelerate "
        "| vs stream | vs cpu |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {r["variant"]: r for r in s["results"]}

    def ratio(r, other):
        o = by.get(other)
        return f"{r['decode_tok_s'] / o['decode_tok_s']:.2f}x" if o else "-"

    for r in s["results"]:
        peak = format_bytes(r["peak_gpu_bytes"]) if "peak_gpu_bytes" in r else "-"
        st = r.get("decode_step_s")
        spread = f"{st['p10'] * 1e3:.0f}-{st['p90'] * 1e3:.0f}" if st else "-"
        rows.append(
            f"| {r['variant']} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.2f} | {r['decode_s_per_token'] * 1e3:.1f} | "
            f"{spread} | {peak} | {'yes' if r['tokens_match_reference'] else 'NO'} | {ratio(r, 'accelerate')} | "
            f"{ratio(r, 'stream')} | {ratio(r, 'cpu')} |"
        )
    bounds = s.get("bounds_decode_s") or {}
    if bounds:
        c = s["ceilings"]
        rows += ["", "bandwidth bounds of the decode step (ceilings measured in this run, from DRAM):"]
        for name, bound in bounds.items():
            r = by[name]
            rows.append(
                f"- {name}: {bound * 1e3:.1f} ms ({format_bytes(r['offloaded_bytes'])} offloaded at "
                f"{c[_BOUND_RATE[name]] / 1e9:.0f} GB/s {_BOUND_RATE[name]}, {format_bytes(r['resident_bytes'])} "
                f"resident at {c['hbm'] / 1e9:.0f} GB/s); reached {bound / r['decode_s_per_token'] * 100:.0f}%"
            )
        if "hetegen" in bounds and "cpu" in bounds:
            rows.append(
                f"- at equal shares of their bounds, hetegen would be {bounds['cpu'] / bounds['hetegen']:.2f}x CPU-only"
            )
    inter = s.get("interleaved")
    if inter:
        steps = ", ".join(
            f"{n} {statistics.median(v) * 1e3:.1f} ms" for n, v in inter["round_step_s"].items()
        )
        rows += [
            "",
            f"interleaved, {inter['rounds']} round-robin rounds in one process (median step: {steps}):",
        ]
        rows += [
            f"- {pair}: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}), faster in {r['rounds_faster']} of "
            f"{inter['rounds']} rounds"
            for pair, r in inter["speedup"].items()
        ]
    from .bench_residency import format_rows

    rows += format_rows(s.get("grow"), s.get("raise"))
    c = s["ceilings"]
    dts = [d for d in ("float16", "bfloat16", "float32") if f"cpu_gemv_{d}" in c]
    if dts:
        rows += [
            "",
            "CPU GEMV by dtype (weights from DRAM; relative error vs fp64): "
            + ", ".join(
                f"{d} {c[f'cpu_gemv_{d}'] / 1e9:.1f} GB/s ({c[f'cpu_gemv_{d}_rel_err']:.1e})" for d in dts
            ),
        ]
        kern = [d for d in dts if f"cpu_gemv_kernel_{d}" in c]
        if kern:
            rows.append(
                "CPU GEMV with the CPU parts' kernel (hetegen_cpu::linear): "
                + ", ".join(
                    f"{d} {c[f'cpu_gemv_kernel_{d}'] / 1e9:.1f} GB/s ({c[f'cpu_gemv_kernel_{d}_rel_err']:.1e})"
                    for d in kern
                )
            )
    model_bytes = s.get("model_bytes") or 0
    rss = [
        (r["variant"], r["host_rss_after_setup_bytes"])
        for r in s["results"]
        if r.get("host_rss_after_setup_bytes")
    ]
    if model_bytes and rss:
        rows.append(
            "host memory after setup / model bytes: "
            + ", ".join(f"{v} {b / model_bytes:.2f}x" for v, b in rss)
            + f" (after building the model: {s.get('host_rss_after_build_bytes', 0) / model_bytes:.2f}x)"
        )
    return "\n".join(rows)


def _chart(s: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no chart (pip install matplotlib)")
        return
    res = s["results"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["variant"] for r in res]
    rates = [r["decode_tok_s"] for r in res]
    # the spread of single steps: tokens/s at the p90 step (slow) to the p10 step (fast)
    spread = [
        (
            max(0.0, rate - 1 / r["decode_step_s"]["p90"]),
            max(0.0, 1 / r["decode_step_s"]["p10"] - rate),
        )
        if r.get("decode_step_s")
        else (0.0, 0.0)
        for r, rate in zip(res, rates, strict=True)
    ]
    ax[0].bar(
        names, rates, color="#4472c4", yerr=[[lo for lo, _ in spread], [hi for _, hi in spread]], capsize=3
    )
    ax[0].set_ylabel("decode tokens/s (bars: p10-p90 step)")
    if s.get("bound_decode_s"):
        ax[0].axhline(1 / s["bound_decode_s"], color="gray", ls="--", label="bandwidth bound")
        ax[0].legend()
    ax[1].bar(names, [r["prefill_s"] for r in res], color="#ed7d31")
    ax[1].set_ylabel(f"prefill-{s['prompt_len']} s")
    fig.suptitle(f"{s['model']} {s['dtype']}, budget {s['gpu_memory'] / 2**30:.1f} GiB, {s['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
