"""Decode-step breakdown on the GPU host: how long the launching thread takes to launch one decode step of
the 7B (6 GiB) and how long it then waits for the CPU parts (stamps around the graph's final cpu_wait),
and the whole step on the host's clock, from the model's forward to the next (``phases``): HF between
forwards, entering the graph (dynamo), launching up to the first CPU job, the device reaching that job
(the worker's own stamps), the jobs, the wait after the last, and leaving.

    OUT=/tmp/out THREADS=12,15,12 RESIDENT=1 python scripts/diag_decode.py   # with the package importable

THREADS: worker thread counts, each compiled afresh in this order (0: the default); RESIDENT=1 adds the
same graph with every weight resident (20 GiB budget), the launch floor of the generated code.
VARIANTS='{"tag": {options...}, ...}' runs those instead of THREADS (6 GiB unless given); an option
"_generate" holds generate() arguments, e.g. {"graphs": {"cuda_graphs": true, "_generate":
{"cache_implementation": "static"}}}.
"""

import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
from diag_common import OUT, dev, llama_7b, log, watchdog

import hetegen_fx
import hetegen_fx.backend
from hetegen_fx.host import HostWorker
from hetegen_fx.runtime import get_runtime

watchdog(400)
m, ids, base_kw = llama_7b()
marks = []
orig = HostWorker.wait_all
# host-clock stamps of one timed generate: (what, time[, job number])
events: list = []
orig_begin, orig_traced = HostWorker.begin, hetegen_fx.backend.traced


def begin(self, x, w, b):
    seq = orig_begin(self, x, w, b)
    events.append(("post", time.perf_counter(), seq))
    return seq


def traced(gm, device, *rest):
    fn = orig_traced(gm, device, *rest)

    def call(*args):
        events.append(("graph_in", time.perf_counter()))
        out = fn(*args)
        events.append(("graph_out", time.perf_counter()))
        return out

    return call


HostWorker.begin = begin
hetegen_fx.backend.traced = traced


def phases(jobs: dict) -> dict:
    """Median ms of each phase of a decode step (host clock), from ``events`` and the worker's stamps."""
    steps, cur = [], None
    for e in events:
        if e[0] == "fwd_in":
            cur = {"fwd_in": e[1], "posts": []}
            steps.append(cur)
        elif cur is not None and e[0] == "post":
            cur["posts"].append((e[2], e[1]))
        elif cur is not None:
            cur.setdefault(e[0], e[1])  # the first of each (one graph per forward)
            if e[0] in ("fwd_out", "wait_out"):
                cur[e[0]] = e[1]
    rows = []
    for prev, s in zip(steps[1:], steps[2:], strict=False):  # decode steps after the first decode
        posted = [q for q, _ in s["posts"] if q in jobs]
        if not posted or "graph_in" not in s or "wait_out" not in s:
            continue
        first, last = jobs[posted[0]], jobs[posted[-1]]
        s["first_post"] = s["posts"][0][1]
        rows.append(
            {
                "hf_between_forwards": s["fwd_in"] - prev["fwd_out"],
                "enter_graph": s["graph_in"] - s["fwd_in"],
                "launch_to_first_job": s["first_post"] - s["graph_in"],
                "device_to_first_job": first[0] - s["first_post"],
                "jobs_span": last[1] - first[0],
                "cpu_busy": sum(jobs[q][1] - jobs[q][0] for q in posted),
                "after_last_job": s["wait_out"] - last[1],
                "leave_graph": s["graph_out"] - s["wait_out"],
                "leave_forward": s["fwd_out"] - s["graph_out"],
                "step": s["fwd_out"] - prev["fwd_out"],
            }
        )
    if rows:
        log("launch_to_first_job per step (ms):", [round(r["launch_to_first_job"] * 1e3, 1) for r in rows])
    return {k: round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in rows[0]} if rows else {}


def wait_all(self):
    t = time.perf_counter()
    orig(self)
    marks.append((t, time.perf_counter()))
    events.append(("wait_out", marks[-1][1]))


HostWorker.wait_all = wait_all
res = {}


def run(tag, _generate=None, **cfg):
    kw = {**base_kw, **(_generate or {})}
    torch._dynamo.reset()
    get_runtime(dev).free()
    torch.cuda.empty_cache()
    c = hetegen_fx.compile(m, device="cuda", max_seq_len=600, **cfg)
    compiled_call = c._compiled_call_impl  # what Module.compile() made of the forward (hooks would be traced)

    def forward_stamped(*a, **k):
        events.append(("fwd_in", time.perf_counter()))
        out = compiled_call(*a, **k)
        events.append(("fwd_out", time.perf_counter()))
        return out

    c._compiled_call_impl = forward_stamped
    host = get_runtime(dev).host
    with torch.no_grad():
        c.generate(ids, max_new_tokens=3, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        c.generate(ids, max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        p = time.perf_counter() - t
        marks.clear()
        events.clear()
        host.log = []  # the worker's stamps of each job
        prof = cProfile.Profile() if os.environ.get("PROFILE") else None
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        c.generate(ids, max_new_tokens=17, **kw)
        torch.cuda.synchronize()
        w = time.perf_counter() - t
        if prof is not None:
            prof.disable()
        host.drain()
        jobs = {seq: (a, b) for seq, a, b in host.log}
        host.log = None
    ph = phases(jobs)
    if prof is not None:  # the launching thread's Python functions over the timed generate
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        log(tag, "cProfile, by own time:\n" + text.getvalue()[-4000:])
    d = (w - p) / 16
    steps = []
    for k in range(2, len(marks)):
        steps.append(
            dict(
                step=marks[k][1] - marks[k - 1][1],
                launch=marks[k][0] - marks[k - 1][1],
                wait=marks[k][1] - marks[k][0],
            )
        )
    agg = {k: statistics.median(s[k] for s in steps) * 1e3 for k in steps[0]} if steps else {}
    dec = min(hetegen_fx.explain(c).plans, key=lambda p: p.tokens)
    n_nodes = len(list(hetegen_fx.explain(c).graph_module.graph.nodes))
    res[tag] = dict(
        ms_per_token=d * 1e3,
        agg=agg,
        offloaded=dec.offloaded_bytes,
        pred_ms=dec.predicted_seconds * 1e3,
        nodes=n_nodes,
        cuda_graphs=getattr(c.hetegen_store.graph_pool, "stats", dict)(),
        phases=ph,
    )
    log(
        tag,
        f"decode {d * 1e3:.1f} ms/token",
        {k: round(v, 2) for k, v in agg.items()},
        "graph nodes",
        n_nodes,
        "pred",
        round(dec.predicted_seconds * 1e3, 1),
    )
    log(tag, "phases (median ms):", ph)


if os.environ.get("VARIANTS"):
    for tag, opts in json.loads(os.environ["VARIANTS"]).items():
        run(tag, **{"gpu_memory": "6GiB", **opts})
for th in [] if os.environ.get("VARIANTS") else os.environ.get("THREADS", "0").split(","):
    th = int(th)
    run(f"hetegen-6GiB-threads{th}", gpu_memory="6GiB", cpu_threads=th or None)
    host = get_runtime(dev).host
    log("jobs posted so far", host._seq, "worker threads", host.threads)
if os.environ.get("RESIDENT"):
    run("resident-20GiB", gpu_memory="20GiB")
json.dump(res, open(f"{OUT}/diag7{os.environ.get('TAG', '')}.json", "w"), indent=1)
log("done")
