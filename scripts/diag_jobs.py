"""Where a 7B decode step's time goes, from the device's side: each CPU job's latency as the compute stream
sees it (a CUDA event after its "ready" write, another after its "done" wait) and the gaps between jobs.

    OUT=/tmp/out python scripts/diag_jobs.py        # on the GPU host, with the package importable

Prints, per compiled model (the first one in a process is a warm-up): decode ms/token, jobs per step, the
sum of job latencies against the plan's predicted CPU time, the sum of gaps, and the host's posting time
of every 8th job against the device's "ready" time (the device behind the host: the step is bound by the
CPU jobs, not by the launching thread), and the copy lane of the same step: its copies' busy time against
the plan's and the span they cover. Writes $OUT/diag_jobs.json.
"""

import json
import statistics
import time

import torch
from diag_common import OUT, dev, llama_7b, log, watchdog

import hetegen_fx
from hetegen_fx.host import HostWorker
from hetegen_fx.runtime import get_runtime

watchdog(500)
m, ids, kw = llama_7b()
rec = {"on": False, "jobs": []}  # [number, ready event, done event, CPU weight bytes, host time posted]
begin, end = HostWorker.begin, HostWorker.end


def timed_begin(self, x, w, b):
    seq = begin(self, x, w, b)
    if rec["on"]:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        rec["jobs"].append([seq, e, None, sum(t.numel() * t.element_size() for t in w), time.perf_counter()])
    return seq


def timed_end(self, seq, shape, dtype):
    y = end(self, seq, shape, dtype)
    if rec["on"]:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        for j in rec["jobs"]:
            if j[0] == seq:
                j[2] = e
    return y


HostWorker.begin, HostWorker.end = timed_begin, timed_end
res = {}
for tag in ("warm-up", "measured"):
    torch._dynamo.reset()
    get_runtime(dev).free()
    torch.cuda.empty_cache()
    c = hetegen_fx.compile(m, device="cuda", max_seq_len=600, gpu_memory="6GiB")
    with torch.no_grad():
        c.generate(ids, max_new_tokens=3, **kw)
        torch.cuda.synchronize()
        rec["jobs"].clear()
        rec["on"] = True
        runtime = get_runtime(dev)
        runtime.copy_log = []  # a pair of CUDA events around every weight copy
        runtime.host.log = []  # the job server's own stamps: "ready" seen to output written, per job
        c.generate(ids, max_new_tokens=4, **kw)
        torch.cuda.synchronize()
        runtime.host.drain()
        rec["on"] = False
        copies, runtime.copy_log = runtime.copy_log, None
        stamps = {seq: (a, b) for seq, a, b in runtime.host.log}
        runtime.host.log = None
        t = time.perf_counter()
        c.generate(ids, max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        p = time.perf_counter() - t
        t = time.perf_counter()
        c.generate(ids, max_new_tokens=17, **kw)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t - p) / 16 * 1e3
    jobs = rec["jobs"]
    # the last decode step: its jobs repeat the previous step's pattern of sizes
    size = [j[3] for j in jobs]
    n = max(k for k in range(1, len(jobs) // 2 + 1) if size[-k:] == size[-2 * k : -k])
    step = jobs[-n:]
    lat = [j[1].elapsed_time(j[2]) for j in step]
    gaps = [step[i - 1][2].elapsed_time(step[i][1]) for i in range(1, n)]
    gbps = [j[3] / (t * 1e-3) / 1e9 for j, t in zip(step, lat, strict=True)]
    # the worker's side of the same jobs: its compute time, and its idle time before each (waiting for "ready")
    work = [(stamps[j[0]][1] - stamps[j[0]][0]) * 1e3 if j[0] in stamps else float("nan") for j in step]
    idle = [
        (stamps[b[0]][0] - stamps[a[0]][1]) * 1e3 if a[0] in stamps and b[0] in stamps else float("nan")
        for a, b in zip(step, step[1:], strict=False)
    ]
    work_gbps = [j[3] / (t * 1e-3) / 1e9 for j, t in zip(step, work, strict=True)]
    dec = min(hetegen_fx.explain(c).plans, key=lambda p: p.tokens)
    pred = sum(lp.t_cpu_part for lp in dec.layers) * 1e3
    # the copy lane in the same (last) step: its copies are the plan's GPU parts of offloaded layers
    parts = [lp for lp in dec.layers if not lp.resident and lp.split < lp.out_features]
    last = copies[-len(parts) :] if parts else []
    busy = sum(a.elapsed_time(b) for a, b in last)
    span = last[0][0].elapsed_time(last[-1][1]) if last else 0.0
    copy_pred = sum((1 - lp.split / lp.out_features) * lp.t_copy for lp in parts) * 1e3
    step_span = step[0][1].elapsed_time(step[-1][2])  # first job's "ready" to last job's "done"
    posted = [
        (round((j[4] - step[0][4]) * 1e3, 1), round(step[0][1].elapsed_time(j[1]), 1)) for j in step[::8]
    ]
    res[tag] = dict(
        ms_per_token=ms,
        jobs=n,
        latency_ms=lat,
        gaps_ms=gaps,
        gb_s=gbps,
        predicted_cpu_ms=pred,
        copies=len(last),
        copy_busy_ms=busy,
        copy_span_ms=span,
        predicted_copy_ms=copy_pred,
        jobs_span_ms=step_span,
        copy_ms=[a.elapsed_time(b) for a, b in last],
        worker_ms=work,
        worker_idle_ms=idle,
        worker_gb_s=work_gbps,
        job_bytes=[j[3] for j in step],
    )
    log(
        f"{tag}: {ms:.1f} ms/token; {n} jobs a step, job latencies {sum(lat):.1f} ms (plan: {pred:.1f} ms of "
        f"CPU parts), gaps {sum(gaps):.1f} ms; median job {statistics.median(gbps):.1f} GB/s"
    )
    log(
        f" copy lane: {len(last)} copies busy {busy:.1f} ms (plan: {copy_pred:.1f} ms) over a span of {span:.1f} "
        f"ms; the jobs span {step_span:.1f} ms"
    )
    log(
        f" worker: computing {sum(work):.1f} ms (median {statistics.median(work_gbps):.1f} GB/s), idle between "
        f"jobs {sum(idle):.1f} ms; latency beyond the worker's time {sum(lat) - sum(work):.1f} ms"
    )
    log(" per job (MiB, device latency ms, worker ms, worker idle before ms):")
    for k, j in enumerate(step):
        log(f"  {j[3] / 2**20:6.1f} {lat[k]:6.2f} {work[k]:6.2f} {idle[k - 1] if k else 0:6.2f}")
    log(" host posted vs device ready (ms, every 8th job):", posted)
    del c
with open(f"{OUT}/diag_jobs.json", "w") as f:
    json.dump(res, f, indent=1)
