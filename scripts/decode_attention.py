"""Decode attention (one query token) over a static cache's slots, by backend: what a decode step's attention
costs with torch's default choice, each ``scaled_dot_product_attention`` backend forced, plain matmuls and
the matmuls compiled by inductor. Per slot count: 32 calls (one per layer of a 7B: 32 heads of 128, fp16,
a mask hiding the last tenth of the slots, as a static cache's unfilled slots are), recorded once as a CUDA
graph and replayed, so launches cost what they cost inside hetegen_fx's graphs. Prints µs per call and the
largest difference from the default's output; writes ``decode_attention.json`` under ``--out``.

    python3 scripts/decode_attention.py --slots 584,1024,4096 --out attn_out

Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM, LAYERS = 32, 128, 32


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _matmuls(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)) * (HEAD_DIM**-0.5) + mask
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _variants():
    compiled = torch.compile(_matmuls, dynamic=False)
    return [
        ("sdpa_default", _sdpa, None),
        ("sdpa_efficient", _sdpa, SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa_cudnn", _sdpa, SDPBackend.CUDNN_ATTENTION),
        ("sdpa_math", _sdpa, SDPBackend.MATH),
        ("matmuls", _matmuls, None),
        ("inductor_matmuls", compiled, None),
    ]


def _time(fn, backend, calls, reps: int) -> float:
    """µs per call of ``fn`` over ``calls`` (argument tuples), recorded as one CUDA graph and replayed."""
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for args in calls:
                    fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for args in calls:
                fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps / len(calls) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="584,1024,4096", help="cache lengths, comma-separated")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default="attn_out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dt, dev = torch.float16, "cuda"
    results: dict[int, dict] = {}
    variants = _variants()
    for slots in (int(s) for s in args.slots.split(",")):
        calls = [
            tuple(torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=dt) for n in (1, slots, slots))
            for _ in range(LAYERS)
        ]
        mask = torch.zeros(1, 1, 1, slots, device=dev, dtype=dt)
        mask[..., slots * 9 // 10 :] = float("-inf")
        calls = [(q, k, v, mask) for q, k, v in calls]
        ref = [_sdpa(*c) for c in calls]
        row = {}
        for name, fn, backend in variants:
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    err = max(
                        (fn(*c).float() - r.float()).abs().max().item()
                        for c, r in zip(calls, ref, strict=True)
                    )
                row[name] = {
                    "us_per_call": round(_time(fn, backend, calls, args.reps), 2),
                    "max_abs_diff": err,
                }
            except Exception as e:  # a backend this build or device lacks
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results[slots] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "decode_attention.json").write_text(json.dumps({**meta, "us_per_call": results}, indent=1))
    names = [n for n, _, _ in variants]
    print(
        f"{meta['device']}, torch {meta['torch']}: µs per decode attention call (32 heads of 128, fp16, masked)"
    )
    print("| slots | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for slots, row in results.items():
        cells = [f"{row[n]['us_per_call']:.1f}" if "us_per_call" in row[n] else "error" for n in names]
        print(f"| {slots} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
