"""Interleaved A/B of hetegen_fx settings on one model, in one process.

The lent GPU hosts drift by tens of percent within a minute (docs/benchmarks.md, sixth session), so
variants measured one after the other cannot be compared. Here every variant is compiled once and kept;
then each round runs every variant in turn (the order rotating), and each decode step is stamped.

    OUT=/tmp/out python scripts/ab_decode.py --preset llama-2-7b --gpu-memory 6GiB \\
        --variant default='{}' --variant a45='{"alpha": 0.45}' --rounds 4 --new-tokens 24
    OUT=/tmp/out python scripts/ab_decode.py --preset tiny-llama --device cpu --gpu-memory 300KiB \\
        --variant a30='{"alpha": 0.3}' --variant a70='{"alpha": 0.7}' --prompt-len 12 --new-tokens 6
A variant may give generate() arguments under "_generate", e.g. '{"_generate": {"cache_implementation": "static"}}'.

Prints, per variant: the median decode step, its p10-p90, and the median over rounds of its round's median
step divided by the first variant's in the same round (with the lowest and highest such ratio): a ratio
whose range excludes 1 is a difference the drift does not explain. Each variant's tokens are checked
against the first's. Writes $OUT/ab_decode.json. Every variant holds its own resident weights on the device.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import LogitsProcessorList

import hetegen_fx
from hetegen_fx.bench import DTYPES, StepClock
from hetegen_fx.models import build_random

p = argparse.ArgumentParser()
p.add_argument("--preset", default="llama-2-7b")
p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
p.add_argument("--device", default="cuda")
p.add_argument("--gpu-memory", default="6GiB")
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--new-tokens", type=int, default=24)
p.add_argument("--rounds", type=int, default=4)
p.add_argument("--variant", action="append", default=[], help="NAME=JSON options for hetegen_fx.compile")
args = p.parse_args()
if len(args.variant) < 2:
    sys.exit("give at least two --variant NAME=JSON")
variants, generate_kw = {}, {}
for v in args.variant:
    name, _, opts = v.partition("=")
    variants[name] = json.loads(opts or "{}")
    generate_kw[name] = variants[name].pop("_generate", {})  # e.g. {"cache_implementation": "static"}
OUT = os.environ.get("OUT", ".")
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sync():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(variants))
model = build_random(args.preset, dtype=DTYPES[args.dtype])
vocab = model.config.vocab_size
ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
kw = {
    "do_sample": False,
    "pad_token_id": 0,
    "max_new_tokens": args.new_tokens,
    "min_new_tokens": args.new_tokens,
}
compiled, tokens = {}, {}
with torch.no_grad():
    for name, opts in variants.items():
        options = {
            "gpu_memory": args.gpu_memory,
            "device": args.device,
            "max_seq_len": args.prompt_len + args.new_tokens + 8,
            **opts,
        }
        compiled[name] = hetegen_fx.compile(model, **options)
        tokens[name] = (
            compiled[name].generate(ids, **kw, **generate_kw[name])[0, args.prompt_len :].tolist()
        )  # warm-up: all graphs
        log(f"{name}: compiled and warmed up, options {opts}")
    steps = {name: [] for name in variants}  # per round: that round's steps
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            clock = StepClock()
            sync()
            compiled[name].generate(
                ids, logits_processor=LogitsProcessorList([clock]), **kw, **generate_kw[name]
            )
            sync()
            steps[name].append(clock.steps())
        log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {statistics.median(steps[n][-1]) * 1e3:.1f} ms" for n in names)
        )
base = names[0]
res = {}
for name in names:
    every = [s for rnd in steps[name] for s in rnd]
    q = statistics.quantiles(every, n=10, method="inclusive")
    ratios = [
        statistics.median(a) / statistics.median(b) for a, b in zip(steps[name], steps[base], strict=True)
    ]
    plans = hetegen_fx.explain(compiled[name]).plans
    dec = min(plans, key=lambda pl: pl.tokens)
    off = [lp for lp in dec.layers if not lp.resident]
    res[name] = {
        "options": variants[name],
        "generate": generate_kw[name],
        "median_step_ms": statistics.median(every) * 1e3,
        "p10_ms": q[0] * 1e3,
        "p90_ms": q[-1] * 1e3,
        "ratio_to_first": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "tokens_match_first": tokens[name] == tokens[base],
        "mean_alpha": statistics.fmean([lp.alpha for lp in off] or [0.0]),
        "resident_bytes": dec.resident_bytes,
        "cuda_graphs": getattr(compiled[name].hetegen_store.graph_pool, "stats", dict)(),
        "steps_s": steps[name],
    }
with open(os.path.join(OUT, "ab_decode.json"), "w") as f:
    json.dump(
        {
            "args": vars(args),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "results": res,
        },
        f,
        indent=1,
    )
print(
    f"\n{args.preset} {args.dtype}, budget {args.gpu_memory}, {args.rounds} rounds of {args.new_tokens} tokens"
)
print(
    "| variant | median step ms | p10-p90 ms | vs "
    + base
    + " (median, min-max over rounds) | mean α | tokens = first |"
)
print("|---|---|---|---|---|---|")
for name, r in res.items():
    ratio = r["ratio_to_first"]
    print(
        f"| {name} | {r['median_step_ms']:.1f} | {r['p10_ms']:.0f}-{r['p90_ms']:.0f} | "
        f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) | {r['mean_alpha']:.2f} | "
        f"{'yes' if r['tokens_match_first'] else 'NO'} |"
    )
