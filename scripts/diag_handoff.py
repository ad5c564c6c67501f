"""What a CPU job's hand-off costs on the GPU host, piece by piece, from the device's side (CUDA events).

    OUT=/tmp/out python scripts/diag_handoff.py        # on the GPU host, with the package importable

1. A small host→device copy (a job's y) and device→host copy (its x) on the compute stream, alone and while
   weight copies stream on another stream (in 64, 4 and 1 MiB pieces): does a big copy hold a small one up
   in the copy engine? Also the same moves done by a kernel through host-mapped memory.
2. Whole jobs of the job server (:class:`hetegen_fx.host.HostWorker`) with tiny and 16 MiB weights, one and
   three Linears, after a short and a long idle gap of the device, with and without the copy load.
3. The kernel alone on the worker thread, hot and after 2 ms idle.
Writes $OUT/handoff.json.
"""

import json
import os
import statistics
import time

import torch

from hetegen_fx import kernels
from hetegen_fx.host import HostWorker, default_threads

OUT = os.environ["OUT"]
dev = torch.device("cuda")
res = {}
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
print("kernel", kernels.load())
with open("/proc/self/maps") as f:
    maps = [line.split()[-1] for line in f if "gomp" in line or "iomp" in line]
print("openmp libs", sorted(set(maps)))

big_h = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
big_h.random_()
big_d = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
cs = torch.cuda.Stream()


def load(chunk, total=3 * 2**30):
    with torch.cuda.stream(cs):
        done = 0
        while done < total:
            o = done % (64 * 2**20)
            s = (done // (64 * 2**20)) % 4 * 64 * 2**20
            big_d[o : o + chunk].copy_(big_h[s + o : s + o + chunk], non_blocking=True)
            done += chunk


class CAI:
    def __init__(self, t):
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": "<f2",
            "data": (t.data_ptr(), False),
            "version": 2,
            "strides": None,
        }


def lat(fn, n=40, loaded=None, sleep=150_000):
    torch.cuda.synchronize()
    if loaded is not None:
        load(loaded)
    evs = []
    for _ in range(n):
        torch.cuda._sleep(sleep)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    ts = [a.elapsed_time(b) * 1e3 for a, b in evs[3:]]
    return dict(median_us=statistics.median(ts), p90_us=sorted(ts)[int(0.9 * len(ts))], max_us=max(ts))


sh = torch.randn(12288, dtype=torch.float16).pin_memory()
sd = torch.empty_like(sh, device=dev)
hv = torch.as_tensor(CAI(sh), device=dev)
print("mapped view", hv.device, hv.data_ptr() == sh.data_ptr(), flush=True)
xd = torch.randn(4096, dtype=torch.float16, device=dev)
xh = torch.empty(4096, dtype=torch.float16).pin_memory()
xhv = torch.as_tensor(CAI(xh), device=dev)
ops = {
    "h2d memcpy 24KB": lambda: sd.copy_(sh, non_blocking=True),
    "h2d SM read 24KB (mul)": lambda: torch.mul(hv, 1, out=sd),
    "h2d copy_ of mapped view": lambda: sd.copy_(hv),
    "d2h memcpy 8KB": lambda: xh.copy_(xd, non_blocking=True),
    "d2h SM write 8KB (mul)": lambda: torch.mul(xd, 1, out=xhv),
}
for name, fn in ops.items():
    for loaded in (None, 64 * 2**20, 4 * 2**20, 1 * 2**20):
        r = lat(fn, loaded=loaded)
        res[f"{name} | load {loaded}"] = r
        print(
            f"{name:28s} load={loaded!s:>9}: median {r['median_us']:7.1f} us p90 {r['p90_us']:7.1f} max {r['max_us']:7.1f}",
            flush=True,
        )
assert torch.equal(hv.cpu(), sh)

# load bandwidth with chunks
for chunk in (64 * 2**20, 4 * 2**20, 1 * 2**20):
    torch.cuda.synchronize()
    t = time.perf_counter()
    load(chunk, 2**30)
    cs.synchronize()
    print(f"load chunk {chunk >> 20} MiB: {2**30 / (time.perf_counter() - t) / 1e9:.1f} GB/s", flush=True)

# whole jobs
th = default_threads()
w = HostWorker(dev, threads=th)
g = torch.Generator().manual_seed(0)
tiny = [torch.empty(64, 4096, dtype=torch.float16).uniform_(-0.05, 0.05, generator=g) for _ in range(3)]
mid = [
    torch.empty(2048, 4096, dtype=torch.float16).uniform_(-0.05, 0.05, generator=g) for _ in range(3)
]  # 16 MB each
xj = torch.randn(1, 4096, dtype=torch.float16, device=dev)


def job(ws):
    def f():
        s = w.begin(xj, ws, [None] * len(ws))
        w.end(s, (1, sum(t.shape[0] for t in ws)), torch.float16)

    return f


for name, ws in (
    ("tiny 1 linear", tiny[:1]),
    ("tiny 3 linears", tiny),
    ("mid 1 linear 16MB", mid[:1]),
    ("mid 3 linears 48MB", mid),
):
    for loaded in (None, 64 * 2**20, 4 * 2**20):
        for sleep in (150_000, 1_500_000):
            r = lat(job(ws), n=30, loaded=loaded, sleep=sleep)
            w.wait_all()
            res[f"job {name} | load {loaded} | sleep {sleep}"] = r
            print(
                f"job {name:20s} load={loaded!s:>9} gap={sleep / 1.7e3:5.0f}us: median {r['median_us']:7.1f} us p90 {r['p90_us']:7.1f}",
                flush=True,
            )


# kernel alone on the worker, hot
def kt():
    out = {}
    with torch.no_grad():
        x = torch.randn(1, 4096, dtype=torch.float16)
        for name, ws in (("tiny", tiny[:1]), ("mid", mid[:1])):
            for _ in range(5):
                torch.ops.hetegen_cpu.linear(x, ws[0], None)
            ts = []
            for _ in range(50):
                t = time.perf_counter()
                torch.ops.hetegen_cpu.linear(x, ws[0], None)
                ts.append(time.perf_counter() - t)
            out[name] = statistics.median(ts) * 1e6
            time.sleep(0.002)
            t = time.perf_counter()
            torch.ops.hetegen_cpu.linear(x, ws[0], None)
            out[name + " after 2ms idle"] = (time.perf_counter() - t) * 1e6
    return out


print("kernel on worker (us):", w.call(kt), flush=True)
os.makedirs(OUT, exist_ok=True)
with open(f"{OUT}/handoff.json", "w") as f:
    json.dump(res, f, indent=1)
