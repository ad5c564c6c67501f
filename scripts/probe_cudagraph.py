"""Probe (GPU host): can a CUDA graph carry a split decode step? Checks that the driver's stream memory
operations are captured and replayed (a replayed graph hands x to a CPU thread and waits for its y, with
per-job flag words that reset themselves), that copies issued outside a graph can be consumed inside it
(flag words, or external events), and what a replay costs against eager launches.
Run: python scripts/probe_cudagraph.py (writes $OUT/probe_graph.json when OUT is set)."""

import ctypes
import json
import os
import threading
import time

import torch
import torch.nn.functional as F

res = {}
dev = torch.device("cuda")
lib = ctypes.CDLL("libcuda.so.1")
W32 = lib.cuStreamWaitValue32_v2
R32 = lib.cuStreamWriteValue32_v2
for fn in (W32, R32):
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    fn.restype = ctypes.c_int
EQ = 1


def cs():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


print(
    "torch",
    torch.__version__,
    torch.cuda.get_device_name(0),
    "external event:",
    "external" in torch.cuda.Event.__new__.__code__.co_varnames,
    flush=True,
)
# ---- 1. CPU job round trip inside a captured graph (per-job self-resetting flags)
N = 8  # jobs per graph
h = torch.float16
flags = torch.zeros(2 * N, dtype=torch.int32, pin_memory=True)
fa = flags.data_ptr()
Ws = [torch.randn(1024, 4096, dtype=h) * 0.02 for _ in range(N)]
xs_h = [torch.empty(1, 4096, dtype=h, pin_memory=True) for _ in range(N)]
ys_h = [torch.empty(1, 1024, dtype=h, pin_memory=True) for _ in range(N)]
ready = [ctypes.c_int32.from_address(fa + 4 * j) for j in range(N)]
done = [ctypes.c_int32.from_address(fa + 4 * (N + j)) for j in range(N)]
go = threading.Semaphore(0)
stop = False


def worker():
    torch.set_num_threads(8)
    while True:
        go.acquire()
        if stop:
            return
        for j in range(N):
            while ready[j].value != 1:
                pass
            ready[j].value = 0
            torch.mm(xs_h[j], Ws[j].t(), out=ys_h[j])
            done[j].value = 1


threading.Thread(target=worker, daemon=True).start()
x0 = torch.randn(1, 4096, dtype=h, device=dev)
Wd = [w.to(dev) for w in Ws]


def step(x):
    outs = []
    for j in range(N):
        xs_h[j].copy_(x, non_blocking=True)
        assert R32(cs(), fa + 4 * j, 1, 0) == 0
        assert W32(cs(), fa + 4 * (N + j), 1, EQ) == 0
        assert R32(cs(), fa + 4 * (N + j), 0, 0) == 0
        y = ys_h[j].to(dev, non_blocking=True)
        x = torch.cat([y, y, y, y], -1) * 0.5 + x  # next x depends on the job
        outs.append(y)
    return x


def ref(x):
    for j in range(N):
        y = F.linear(x, Wd[j])
        x = torch.cat([y] * 4, -1) * 0.5 + x
    return x


try:
    static_x = x0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        go.release()
        out = step(static_x)  # warm-up eager (the protocol runs eagerly too)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = step(static_x)
    errs = []
    t0 = time.perf_counter()
    for it in range(50):
        xv = torch.randn(1, 4096, dtype=h, device=dev)
        static_x.copy_(xv)
        go.release()
        g.replay()
        torch.cuda.synchronize()
        if it % 10 == 0:
            errs.append(float((static_out.float() - ref(xv).float()).abs().max()))
    res["job_graph_ok"] = True
    res["job_graph_errs"] = errs
    res["job_graph_ms_per_replay"] = (time.perf_counter() - t0) / 50 * 1e3
    # eager same protocol for comparison
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        go.release()
        o = step(static_x)
        torch.cuda.synchronize()
    res["job_eager_ms"] = (time.perf_counter() - t0) / 50 * 1e3
except Exception as e:
    res["job_graph_ok"] = f"{type(e).__name__}: {e}"
print(res, flush=True)
# ---- 2. copies issued eagerly on a copy stream, consumed inside a graph: flags and external events
S = 4
Wh = [torch.randn(2048, 4096, dtype=h).pin_memory() for _ in range(6)]
stage = [torch.empty(2048, 4096, dtype=h, device=dev) for _ in range(S)]
cf = torch.zeros(2 * S, dtype=torch.int32, pin_memory=True)
ca = cf.data_ptr()
for k in range(S):
    ctypes.c_int32.from_address(ca + 4 * (S + k)).value = 1  # released
cstream = torch.cuda.Stream()
xin = torch.randn(1, 4096, dtype=h, device=dev)


def issue(widx, slot):
    with torch.cuda.stream(cstream):
        st = ctypes.c_void_p(cstream.cuda_stream)
        assert W32(st, ca + 4 * (S + slot), 1, EQ) == 0
        assert R32(st, ca + 4 * (S + slot), 0, 0) == 0
        stage[slot].copy_(Wh[widx], non_blocking=True)
        assert R32(st, ca + 4 * slot, 1, 0) == 0


def consume(slot, x):
    assert W32(cs(), ca + 4 * slot, 1, EQ) == 0
    assert R32(cs(), ca + 4 * slot, 0, 0) == 0
    y = F.linear(x, stage[slot])
    assert R32(cs(), ca + 4 * (S + slot), 1, 0) == 0
    return y


try:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        issue(0, 0)
        yw = consume(0, xin)
    torch.cuda.synchronize()
    gs = []
    for slot in range(S):
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2):
            yo = consume(slot, xin)
        gs.append((g2, yo))
    errs = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for it in range(24):
        slot = it % S
        issue(it % 6, slot)  # eager, while earlier graphs may still run
        g2, yo = gs[slot]
        g2.replay()
        if it % 5 == 0:
            torch.cuda.synchronize()
            errs.append(float((yo.float() - F.linear(xin, Wh[it % 6].to(dev)).float()).abs().max()))
    torch.cuda.synchronize()
    res["copy_flags_ok"] = True
    res["copy_flags_errs"] = errs
    res["copy_flags_GBps"] = 24 * Wh[0].numel() * 2 / (time.perf_counter() - t0) / 1e9
except Exception as e:
    res["copy_flags_ok"] = f"{type(e).__name__}: {e}"
print(res, flush=True)
try:
    ev = torch.cuda.Event(external=True)
    with torch.cuda.stream(cstream):
        stage[0].copy_(Wh[1], non_blocking=True)
        ev.record(cstream)
    g3 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g3):
        torch.cuda.current_stream().wait_event(ev)
        y3 = F.linear(xin, stage[0])
    errs = []
    for it in range(6):
        with torch.cuda.stream(cstream):
            stage[0].copy_(Wh[it], non_blocking=True)
            ev.record(cstream)
        g3.replay()
        torch.cuda.synchronize()
        errs.append(float((y3.float() - F.linear(xin, Wh[it].to(dev)).float()).abs().max()))
    res["external_event_ok"] = True
    res["external_event_errs"] = errs
except Exception as e:
    res["external_event_ok"] = f"{type(e).__name__}: {e}"
# ---- 3. launch costs: 200 small kernels eager vs one replay
try:
    a = torch.randn(1, 4096, device=dev, dtype=h)

    def small(a):
        for _ in range(50):
            a = (a * 1.0001 + 0.0001).to(h)
            a = torch.nn.functional.silu(a)
        return a

    small(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    small(a)
    torch.cuda.synchronize()
    res["eager_us_per_op"] = (time.perf_counter() - t0) / 200 * 1e6
    g4 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g4):
        b = small(a)
    g4.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        g4.replay()
    torch.cuda.synchronize()
    res["replay_200_ops_us"] = (time.perf_counter() - t0) / 20 * 1e6
    t0 = time.perf_counter()
    for _ in range(20):
        g4.replay()
    res["replay_launch_us"] = (time.perf_counter() - t0) / 20 * 1e6
    torch.cuda.synchronize()
except Exception as e:
    res["launch_probe"] = f"{type(e).__name__}: {e}"
stop = True
go.release()
print("PROBE", json.dumps(res), flush=True)
out = os.environ.get("OUT")
if out:
    json.dump(res, open(os.path.join(out, "probe_graph.json"), "w"), indent=1)
