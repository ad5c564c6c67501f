"""Where a fully resident decode step goes: the bench's model (random weights, built fast) compiled with every
weight on the device, in up to five variants (eager; CUDA graphs; inductor-compiled stretches; both; both
with cuDNN's attention off, to weigh it on the same machine), each decoding three generates into one
reused StaticCache as ``hetegen bench`` does. Per variant: the median
decode step (a sync per token), the CUDA-graph and inductor counts, then a one-token and a nine-token
generate under torch.profiler, whose difference over the 8 extra steps gives a step's kernels, the device
time of the top kernels and the host time of the top host calls (``cudaMemcpyAsync`` includes the waits of
blocking copies). Writes ``profile_resident_step.json`` under ``--out`` and prints a table last.

    python3 scripts/profile_resident_step.py --preset llama-2-7b --out prof_out
    python3 scripts/profile_resident_step.py --device cpu --preset tiny-llama --prompt-len 16  # a dry run

Timings of a CPU run mean nothing (the GPU side is emulated); it shows that the script works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import hetegen_fx
from hetegen_fx.api import cache_argument
from hetegen_fx.models import build_random

VARIANTS = {
    "eager": {},
    "graphs": {"cuda_graphs": True},
    "compiled": {"compile_stretches": True},
    "compiled_graphs": {"compile_stretches": True, "cuda_graphs": True},
    # cuDNN's attention kept off, as in every graph before cudnn_attention="auto" (and, in the decode
    # graphs over a parked static cache, up to 3562b0c): the same machine's measure of what cuDNN gives
    "compiled_graphs_no_cudnn": {"compile_stretches": True, "cuda_graphs": True, "cudnn_attention": False},
}
NEW_TOKENS = 64


def _log(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


def _profiled(c, ids, cache, n: int, cuda: bool):
    """(wall seconds, per-event (count, device µs, host µs)) of a generate of ``n`` tokens, warmed up once."""
    from torch.profiler import ProfilerActivity, profile

    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    cache.reset()
    c.generate(ids, **{cache_argument(): cache}, **kw)
    cache.reset()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        c.generate(ids, **{cache_argument(): cache}, **kw)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = {
        e.key: (e.count, getattr(e, "self_device_time_total", 0.0), e.self_cpu_time_total)
        for e in prof.key_averages()
    }
    return wall, events


class _Stamps:
    """A streamer that stamps the time of each token it is handed (stamp 0: the prompt), after a sync."""

    def __init__(self, sync) -> None:
        self.sync, self.times = sync, []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_variant(name: str, model, ids, args) -> dict:
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = ids.shape[1] + NEW_TOKENS + 24
    t0 = time.perf_counter()
    c = hetegen_fx.compile(model, device=args.device, max_seq_len=size, **VARIANTS[name])
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=size)
    steps: list[float] = []
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        for g in range(3):  # the first compiles and records
            cache.reset()
            stamps = _Stamps(sync)
            out = c.generate(ids, **{cache_argument(): cache}, streamer=stamps, **kw)
            if g:  # stamps[0] is the prompt, stamps[1] the prefill's token
                t = stamps.times
                steps += [b - a for a, b in zip(t[2:], t[3:], strict=False)]
        _log(f"{name}: compiled and decoded in {time.perf_counter() - t0:.1f} s; profiling")
        w1, e1 = _profiled(c, ids, cache, 1, cuda)
        w9, e9 = _profiled(c, ids, cache, 9, cuda)
    st = hetegen_fx.state(c)

    def per_step(key: str, i: int) -> float:
        return (e9[key][i] - e1.get(key, (0, 0.0, 0.0))[i]) / 8

    kernels = [k for k, v in e9.items() if v[1] > 0 and not k.startswith(("aten::", "Torch-Compiled"))]
    return {
        "median_step_ms": 1e3 * statistics.median(steps),
        "tok_s": 1 / statistics.median(steps),
        "tokens": out[0, ids.shape[1] :].tolist(),
        "cuda_graphs": st.cuda_graphs,
        "compiled_stretches": st.compiled_stretches,
        "profiled_step_wall_ms": 1e3 * (w9 - w1) / 8,
        "kernels_per_step": sum(per_step(k, 0) for k in kernels),
        "kernel_device_ms_per_step": sum(per_step(k, 1) for k in kernels) / 1e3,
        "top_kernels": sorted(
            ((k[:90], per_step(k, 0), per_step(k, 1) / 1e3) for k in kernels), key=lambda x: -x[2]
        )[:12],
        "top_host_calls": sorted(
            ((k[:60], per_step(k, 0), per_step(k, 2) / 1e3) for k in e9), key=lambda x: -x[2]
        )[:12],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="profile_out")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: pass --device cpu for a dry run")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_random(args.preset, dtype=torch.float16 if args.device == "cuda" else torch.float32)
    _log(f"built {args.preset} in {time.perf_counter() - t0:.1f} s")
    ids = torch.randint(
        3, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)
    )
    res = {}
    for name in names:
        res[name] = run_variant(name, model, ids, args)
        (out_dir / "profile_resident_step.json").write_text(json.dumps(res, indent=1, default=str))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for name, r in res.items():
        print(f"{name}: top kernels a step (name, calls, ms):")
        for k in r["top_kernels"]:
            print(f"  {k[0]}  {k[1]:.1f}  {k[2]:.3f}")
        print(f"{name}: top host calls a step (name, calls, ms):")
        for k in r["top_host_calls"]:
            print(f"  {k[0]}  {k[1]:.1f}  {k[2]:.3f}")
    print(
        "| variant | median step ms | tok/s | graphs recorded / replays | kernels a step | their device ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        g = r["cuda_graphs"] or {}
        print(
            f"| {name} | {r['median_step_ms']:.2f} | {r['tok_s']:.1f} | {g.get('recorded', '-')} / "
            f"{g.get('replays', '-')} | {r['kernels_per_step']:.0f} | {r['kernel_device_ms_per_step']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
