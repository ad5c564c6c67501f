"""One-GPU host: a two-stage pipeline, stage 0 on the GPU with HeteGen offload under a budget, stage 1 on the
CPU, over gloo; tokens against the one-device reference; measured stage times against cluster.stage_time.
It runs twice: both processes on every core ("shared"), and each on its own cores (``distributed.core_sets``,
"disjoint"), as ``hetegen generate --devices`` runs them.

    OUT=results python3 scripts/pipeline_gpu_cpu.py     # writes $OUT/pp.json and prints a table

Without CUDA it runs a tiny model with both stages on the CPU (a check of the script, not a measurement).
A stage's time is the median of its decode calls less the time they spent in transfers (waiting for the
other stage). Each run's prediction uses the rates its processes measure on their own cores, one process
after the other (the GPU stage's copies and CPU GEMV together, the CPU stage's fp32 GEMV), beside the
prediction at the rates of every core. docs/benchmarks.md ("One-GPU host: a GPU stage and a CPU stage")
records a run.
"""

import json
import os
import statistics
import time

import torch

from hetegen_fx import cluster, distributed, residency
from hetegen_fx.models import build_random

OUT = os.environ.get("OUT", "/tmp/ppout")
CFG = dict(
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
)
SPLIT, BUDGET, PROMPT, NEW = 12, int(1.5 * 2**30), 64, 32
GPU = "cuda" if torch.cuda.is_available() else "cpu"
if GPU == "cpu":  # a dry run of the script's logic
    CFG.update(hidden_size=256, intermediate_size=512, vocab_size=1000)
    BUDGET = 12 << 20


def model():
    return build_random("llama", dtype=torch.float32, seed=5, **CFG)


def ids():
    return torch.randint(3, CFG["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(2))


def own_rates(rank: int) -> dict:
    """The rates this process gets on its cores, measured while the other process waits (a barrier each side):
    the GPU stage's ceilings (copies, CPU GEMV, both together, HBM), the CPU stage's fp32 GEMV."""
    import torch.distributed as dist

    from hetegen_fx.bench import cpu_gemv_by_dtype, measure_ceilings

    rates: dict = {}
    for turn in range(2):
        if turn == rank:
            if rank == 0:
                rates = measure_ceilings(torch.device(GPU), torch.float32)
            else:
                rates = {"cpu_gemv_float32": cpu_gemv_by_dtype(11008, 4096)["cpu_gemv_float32"]}
        dist.barrier()
    return rates


def rank_main(rank, folder, mode, sets):
    if sets:
        distributed.pin_cores(sets[rank])
    rates = own_rates(rank)
    waits = {"s": 0.0}
    for name in ("recv", "broadcast", "send"):
        real = getattr(distributed, name)

        def timed(*a, real=real):
            t0 = time.perf_counter()
            try:
                return real(*a)
            finally:
                waits["s"] += time.perf_counter() - t0

        setattr(distributed, name, timed)
    calls = []
    run = residency.Runner.__call__

    def clocked(self, *a):
        w0, t0 = waits["s"], time.perf_counter()
        out = run(self, *a)
        if GPU == "cuda" and rank == 0:
            torch.cuda.synchronize()
        calls.append((time.perf_counter() - t0, waits["s"] - w0))
        return out

    residency.Runner.__call__ = clocked
    m = model()
    layout = [(0, SPLIT), (SPLIT, CFG["num_hidden_layers"])]
    opts = {"device": GPU, "gpu_memory": BUDGET} if rank == 0 else {"device": "cpu"}
    t0 = time.perf_counter()
    c = distributed.compile_stage(m, layout, max_seq_len=PROMPT + NEW, **opts)
    with torch.no_grad():
        c.generate(ids(), max_new_tokens=4, min_new_tokens=4, do_sample=False)  # compiles prefill and decode
        warm = time.perf_counter() - t0
        calls.clear()
        t1 = time.perf_counter()
        out = c.generate(ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        wall = time.perf_counter() - t1
    decode = calls[1:]
    import hetegen_fx

    plan = hetegen_fx.state(c).decode_plan
    res = {
        "tokens": out[0, PROMPT:].tolist(),
        "graphs": len(hetegen_fx.explain(c).plans),
        "wall_s": wall,
        "warm_s": warm,
        "prefill_busy_s": calls[0][0] - calls[0][1],
        "decode_busy_ms": 1e3 * statistics.median(t - w for t, w in decode),
        "decode_step_ms": 1e3 * statistics.median(t for t, _ in decode),
        "offloaded_bytes": plan.offloaded_bytes if plan else None,
        "cores": sorted(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "rates": rates,
        "resident_bytes": plan.resident_bytes
        if plan is not None and hasattr(plan, "resident_bytes")
        else None,
    }
    json.dump(res, open(f"{folder}/pp-{mode}{rank}.json", "w"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    from hetegen_fx.bench import measure_ceilings

    t0 = time.perf_counter()
    ceil = measure_ceilings(torch.device(GPU), torch.float32)
    print(
        "ceilings",
        {k: round(v / 1e9, 1) for k, v in ceil.items()},
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    m = model()
    with torch.no_grad():
        ref = (
            m.to(GPU)
            .generate(ids().to(GPU), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, PROMPT:]
            .tolist()
        )
    shape = cluster.ModelShape.from_config(m.config, dtype_bytes=4)
    del m
    if GPU == "cuda":
        torch.cuda.empty_cache()
    else:
        ceil.setdefault("hbm", 100e9)
        ceil.setdefault("combined", ceil["cpu_gemv"])
    layout = [(0, SPLIT), (SPLIT, CFG["num_hidden_layers"])]
    runs = {"shared": None, "disjoint": distributed.core_sets([GPU, "cpu"], layout)}
    for mode, sets in runs.items():
        distributed.spawn(rank_main, 2, args=(OUT, mode, sets), timeout=300)
    by_mode = {mode: [json.load(open(f"{OUT}/pp-{mode}{r}.json")) for r in range(2)] for mode in runs}

    def predict(gpu_rates: dict, cpu_rate: float) -> dict:
        """The cost model's stage times (ms) at these rates (CPU stage: torch's fp32 GEMV, its lm_head read
        added)."""
        devs = [
            cluster.DeviceSpec(
                "gpu",
                BUDGET,
                gpu_rates.get("hbm", ceil["hbm"]),
                50e12,
                offload_rate=gpu_rates.get("combined", gpu_rates["cpu_gemv"]),
                host_memory=100 << 30,
            ),
            cluster.DeviceSpec("cpu", 100 << 30, cpu_rate, 2e12),
        ]
        cl = cluster.Cluster(devs, reserve=(256 if GPU == "cuda" else 1) << 20)
        p0, off0 = cluster.stage_time(cl, shape, ("gpu",), SPLIT, PROMPT + NEW // 2)
        p1, _ = cluster.stage_time(cl, shape, ("cpu",), CFG["num_hidden_layers"] - SPLIT, PROMPT + NEW // 2)
        head = shape.vocab * shape.hidden * 4 / cpu_rate
        return {
            "gpu_stage": p0 * 1e3,
            "gpu_offloaded_bytes": off0,
            "cpu_stage": p1 * 1e3,
            "cpu_stage_with_lm_head": (p1 + head) * 1e3,
        }

    every_core = predict(ceil, ceil.get("cpu_gemv_float32") or ceil["cpu_gemv"])
    summary = {
        "ceilings": ceil,
        "reference": ref,
        "predicted_ms": every_core,  # at the rates measured with every core
        "runs": {
            mode: {
                "ranks": got,
                "cores": [g["cores"] for g in got],
                "tokens_equal": all(g["tokens"] == ref for g in got),
                "measured_ms": {
                    "gpu_stage": got[0]["decode_busy_ms"],
                    "cpu_stage": got[1]["decode_busy_ms"],
                    "step": got[0]["decode_step_ms"],
                },
                # at the rates each process measured on its own cores
                "predicted_ms": predict(got[0]["rates"], got[1]["rates"]["cpu_gemv_float32"]),
            }
            for mode, got in by_mode.items()
        },
    }
    json.dump(summary, open(f"{OUT}/pp.json", "w"), indent=1)
    print(
        f"predicted at every core's rates: gpu 0-11 {every_core['gpu_stage']:.2f} ms (offloaded "
        f"{every_core['gpu_offloaded_bytes']}); cpu 12-15 {every_core['cpu_stage_with_lm_head']:.2f} ms"
    )
    print(f"{'run':<9} {'tokens':<7} {'gpu ms (pred)':>16} {'cpu ms (pred)':>16} {'step ms':>8}  cores")
    for mode, run in summary["runs"].items():
        ms, pred = run["measured_ms"], run["predicted_ms"]
        cores = " / ".join(f"{len(c)}" for c in run["cores"])
        print(
            f"{mode:<9} {str(run['tokens_equal']):<7} {ms['gpu_stage']:7.2f} ({pred['gpu_stage']:6.2f}) "
            f"{ms['cpu_stage']:7.2f} ({pred['cpu_stage_with_lm_head']:6.2f}) {ms['step']:8.2f}  {cores}"
        )
