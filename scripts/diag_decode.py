"""Decode-step breakdown on the GPU host: how long the launching thread takes to launch one decode step of
the 7B (6 GiB) and how long it then waits for the CPU parts (stamps around the graph's final cpu_wait).

    OUT=/tmp/out THREADS=12,15,12 RESIDENT=1 python scripts/diag_decode.py   # with the package importable

THREADS: worker thread counts, each compiled afresh in this order (0: the default); RESIDENT=1 adds the
same graph with every weight resident (20 GiB budget), the launch floor of the generated code.
VARIANTS='{"tag": {options...}, ...}' runs those instead of THREADS (6 GiB unless given); an option
"_generate" holds generate() arguments, e.g. {"graphs": {"cuda_graphs": true, "_generate":
{"cache_implementation": "static"}}}.
"""

import json
import os
import statistics
import time

import torch
from diag_common import OUT, dev, llama_7b, log, watchdog

import hetegen_fx
from hetegen_fx.host import HostWorker
from hetegen_fx.runtime import get_runtime

watchdog(400)
m, ids, base_kw = llama_7b()
marks = []
orig = HostWorker.wait_all


def wait_all(self):
    t = time.perf_counter()
    orig(self)
    marks.append((t, time.perf_counter()))


HostWorker.wait_all = wait_all
res = {}


def run(tag, _generate=None, **cfg):
    kw = {**base_kw, **(_generate or {})}
    torch._dynamo.reset()
    get_runtime(dev).free()
    torch.cuda.empty_cache()
    c = hetegen_fx.compile(m, device="cuda", max_seq_len=600, **cfg)
    with torch.no_grad():
        c.generate(ids, max_new_tokens=3, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        c.generate(ids, max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        p = time.perf_counter() - t
        marks.clear()
        t = time.perf_counter()
        c.generate(ids, max_new_tokens=17, **kw)
        torch.cuda.synchronize()
        w = time.perf_counter() - t
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
