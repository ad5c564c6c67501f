"""Probe: how the CPU kernel's OpenMP schedule (how rows are shared out to the team) fares in the decode step's
conditions. Variants of hetegen_fx/csrc/gemv.cpp, each built under its own op namespace, run the 7B decode step's CPU jobs (q/k/v parts 3 x 2496x4096, gate/up parts 2 x 6912x4096, fp16,
from 32 layers' distinct buffers) on a worker thread with 12 threads, 0.16 ms apart, while host-to-device copies
stream on a side stream. Interleaved rounds; per variant the median job time per class and the step's sum.

    OUT=/tmp/out python scripts/probe_schedule.py        # on the GPU host (without CUDA: no copies)

Eleventh session, H100 host: static shares 112 ms a step (68-182 over 8 rounds), guided 76 (66-102), which
is why the kernel's schedule is guided (docs/benchmarks.md). Writes $OUT/sched.json.
"""

import json
import os
import re
import statistics
import threading
import time

import torch
from torch.utils.cpp_extension import load

from hetegen_fx.costs import CopyLoad

OUT = os.environ.get("OUT", "/tmp/out")
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hetegen_fx", "csrc", "gemv.cpp")
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


PRAGMA = re.compile(r"#pragma omp parallel for num_threads\(threads\) schedule\([^)]*\)")
VARIANTS = {
    "static": "#pragma omp parallel for num_threads(threads) schedule(static)",
    "dyn_grain": "#pragma omp parallel for num_threads(threads) schedule(dynamic, grain)",
    "dyn_4grain": "#pragma omp parallel for num_threads(threads) schedule(dynamic, 4 * grain)",
    "guided": "#pragma omp parallel for num_threads(threads) schedule(guided, grain)",
}
src = open(SRC).read()
assert len(PRAGMA.findall(src)) == 1, "the kernel's OpenMP loop changed: update this probe"
ops = {}
for name, pragma in VARIANTS.items():
    text = PRAGMA.sub(pragma, src)
    text = re.sub(r"\bhetegen_cpu\b", f"hgs_{name}", text)
    path = f"/tmp/sched_{name}.cpp"
    with open(path, "w") as f:
        f.write(text)
    t = time.time()
    load(
        name=f"hgs_{name}",
        sources=[path],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    ops[name] = getattr(torch.ops, f"hgs_{name}").linear
    log(f"built {name} in {time.time() - t:.0f} s")

LAYERS = int(os.environ.get("LAYERS", "32"))
gen = torch.Generator().manual_seed(0)
jobs = []  # per layer: [q, k, v], [gate, up]
for _ in range(LAYERS):
    jobs.append(
        [torch.empty(2496, 4096, dtype=torch.float16).uniform_(-0.05, 0.05, generator=gen) for _ in range(3)]
    )
    jobs.append(
        [torch.empty(6912, 4096, dtype=torch.float16).uniform_(-0.05, 0.05, generator=gen) for _ in range(2)]
    )
x = torch.randn(1, 4096, dtype=torch.float16)
log("weights filled", sum(w.numel() * 2 for j in jobs for w in j) / 2**30, "GiB")
load_ = CopyLoad(torch.device("cuda")) if torch.cuda.is_available() else None


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def step(op, gap):
    """One step's jobs on this thread; returns the seconds of each job."""
    out = []
    for ws in jobs:
        spin(gap)
        t0 = time.perf_counter()
        for w in ws:
            op(x, w, None)
        out.append(time.perf_counter() - t0)
    return out


res = {n: {"qkv": [], "gu": [], "step": []} for n in VARIANTS}


def worker():
    torch.set_num_threads(int(os.environ.get("THREADS", "12")))
    names = list(VARIANTS)
    for op in ops.values():  # warm
        step(op, 0.0)
    for r in range(int(os.environ.get("ROUNDS", "6"))):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if load_ is not None:
                load_.start(0.12)
            ts = step(ops[name], 160e-6)
            if load_ is not None:
                load_.stop()
            res[name]["qkv"] += ts[0::2]
            res[name]["gu"] += ts[1::2]
            res[name]["step"].append(sum(ts))
        log(f"round {r + 1}: " + ", ".join(f"{n} {res[n]['step'][-1] * 1e3:.1f} ms" for n in names))


th = threading.Thread(target=worker)
th.start()
th.join()
qkv_bytes, gu_bytes = 3 * 2496 * 4096 * 2, 2 * 6912 * 4096 * 2
summary = {}
for n, r in res.items():
    summary[n] = dict(
        qkv_ms=statistics.median(r["qkv"]) * 1e3,
        gu_ms=statistics.median(r["gu"]) * 1e3,
        qkv_gbs=qkv_bytes / statistics.median(r["qkv"]) / 1e9,
        gu_gbs=gu_bytes / statistics.median(r["gu"]) / 1e9,
        step_ms=statistics.median(r["step"]) * 1e3,
        step_ratio=statistics.median(a / b for a, b in zip(r["step"], res["static"]["step"], strict=True)),
        step_ratio_min=min(a / b for a, b in zip(r["step"], res["static"]["step"], strict=True)),
        step_ratio_max=max(a / b for a, b in zip(r["step"], res["static"]["step"], strict=True)),
    )
os.makedirs(OUT, exist_ok=True)
json.dump({"summary": summary, "raw": res}, open(os.path.join(OUT, "sched.json"), "w"))
print("| variant | q/k/v job ms (GB/s) | gate/up job ms (GB/s) | step ms | vs static (min-max) |")
for n, s in summary.items():
    print(
        f"| {n} | {s['qkv_ms']:.3f} ({s['qkv_gbs']:.1f}) | {s['gu_ms']:.3f} ({s['gu_gbs']:.1f}) | {s['step_ms']:.1f} | "
        f"{s['step_ratio']:.3f} ({s['step_ratio_min']:.3f}-{s['step_ratio_max']:.3f}) |"
    )
