"""The ``hetegen`` command line.

hetegen generate --prompt "What is the capital of France?"          # SmolLM2-135M, bundled
hetegen generate --model ./Llama-2-7b-hf --gpu-memory 6GiB --prompt "..." --dtype float16
hetegen bench --preset llama-2-7b --gpu-memory 6GiB                   # see docs/benchmarks.md
hetegen plan --model tiny-llama --device cpu --gpu-memory 400KiB --png plan.png   # inspect a compilation
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import parse_bytes
from .errors import ConfigError, HetegenError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _log(msg: str) -> None:
    print(f"[hetegen] {msg}", file=sys.stderr, flush=True)


#: compile options read from flags of the same name (``--job-overhead`` → ``job_overhead``), when given
_OPTION_FLAGS = ("plan", "alpha", "job_overhead", "prefetch")


def compile_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`hetegen_fx.compile` that the flags of ``generate`` and ``plan`` ask for
    (a flag a command does not have is left at the Config's default)."""
    options = {
        "gpu_memory": args.gpu_memory,
        "device": args.device,
        "max_seq_len": args.max_seq_len,
        "verbose": args.verbose,
    }
    for name in _OPTION_FLAGS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if getattr(args, "no_stream_jobs", False):
        options["stream_jobs"] = False
    if getattr(args, "cuda_graphs", False):
        options["cuda_graphs"] = True
        if args.graph_memory is not None:
            options["graph_memory"] = args.graph_memory
    if getattr(args, "cudnn_attention", False):
        options["cudnn_attention"] = True
    return options


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    import hetegen_fx
    from hetegen_fx.models import chat_prompt, load

    if args.graph_memory is not None:  # before the model loads
        if not args.cuda_graphs:
            raise ConfigError("--graph-memory sizes the CUDA graphs' memory pool: add --cuda-graphs")
        parse_bytes(args.graph_memory)  # a clear error now for a value it cannot read
    model, tok = load(args.model, dtype=DTYPES[args.dtype], progress=True)
    if tok is None:
        raise HetegenError(f"{args.model!r} has no tokenizer: generate needs a checkpoint with one")
    compiled = hetegen_fx.compile(model, **compile_options(args))
    ids = chat_prompt(tok, args.prompt)
    _log(
        f"generating up to {args.max_new_tokens} tokens on {args.device} (budget {args.gpu_memory or 'all free'})"
    )
    streamer = None if args.quiet else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    # CUDA graphs replay where shapes repeat: a static KV cache keeps the decode step's shapes
    cache = {"cache_implementation": "static"} if args.cuda_graphs else {}
    with torch.no_grad():
        out = compiled.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **cache,
        )
    dt = time.perf_counter() - t0
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if args.quiet:
        print(text)
    n = out.shape[1] - ids.shape[1]
    _log(f"{n} tokens in {dt:.2f} s (first call includes compiling)")
    st = hetegen_fx.state(compiled).cuda_graphs
    if args.cuda_graphs and st is None:
        _log(
            "CUDA graphs: none (no memory pool was reserved: the budget is too small, or --graph-memory is 0)"
        )
    elif args.cuda_graphs:
        _log(f"CUDA graphs: {st['recorded']} recorded, {st['replays']} replays, {st['keys']} stretch shapes")
    if args.show_plan:
        print(hetegen_fx.explain(compiled), file=sys.stderr)
    if args.save_plan:
        plans = hetegen_fx.explain(compiled).plans
        decode = min(plans, key=lambda p: p.tokens)
        decode.save(args.save_plan)
        _log(f"plan written to {args.save_plan}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Compile, run one short generation (prefill + decode graphs), print and draw one graph's plan."""
    import hetegen_fx
    from hetegen_fx.models import load

    if args.png and args.svg:
        raise HetegenError("give --png or --svg, not both")
    if bool(args.draw_layer) != bool(args.draw_out):
        raise HetegenError("--draw-layer NAME and --draw-out FILE go together")
    model, _ = load(args.model, dtype=DTYPES[args.dtype], progress=args.verbose)
    compiled = hetegen_fx.compile(model, **compile_options(args))
    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, args.prompt_len), generator=gen)
    _log(f"compiling and running {args.prompt_len} prompt tokens + 2 new tokens on {args.device}")
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    _log(f"done in {time.perf_counter() - t0:.1f} s")
    ex = hetegen_fx.explain(compiled)
    index = [i for i, p in enumerate(ex.plans) if p.tokens == args.tokens]
    if not index:
        have = sorted({p.tokens for p in ex.plans})
        raise HetegenError(f"no graph was compiled for {args.tokens} token(s); graphs have {have} tokens")
    plan, gm = ex.plans[index[0]], ex.graph_modules[index[0]]
    print(plan.table())
    if args.out:
        plan.save(args.out)
        _log(f"plan written to {args.out}")
    picture = args.png or args.svg
    if picture:
        from .plot import plot_plan

        plot_plan(plan, picture, prefetch=args.prefetch)
        _log(f"plan drawn to {picture}")
    if args.draw_layer:
        from .plot import draw_layer

        draw_layer(gm, args.draw_layer, args.draw_out)
        _log(f"layer {args.draw_layer} drawn to {args.draw_out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetegen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a model compiled by hetegen_fx")
    g.add_argument(
        "--model", default=None, help="local HF checkpoint dir, .gguf file or preset (default: SmolLM2-135M)"
    )
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--gpu-memory", default=None, help="accelerator memory budget, e.g. 6GiB (default: all free)"
    )
    g.add_argument("--device", default=_default_device(), help="cuda, cuda:1, or cpu (emulates the GPU side)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-seq-len", type=int, default=2048, help="tokens the KV-cache reserve is sized for")
    g.add_argument("--alpha", type=float, default=None, help="force one CPU share for every offloaded Linear")
    g.add_argument(
        "--job-overhead",
        type=float,
        default=None,
        help="seconds a CPU job costs beyond its GEMVs, for the profiled α (default: the device's, 1.5e-4 on CUDA)",
    )
    g.add_argument(
        "--no-stream-jobs",
        action="store_true",
        help="balance every CPU job on its own: stream none into the segment of the job before it (stream_jobs=False)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the stretches of device work between hand-offs as CUDA graphs (generates with a static KV cache)",
    )
    g.add_argument(
        "--graph-memory", default=None, help="the CUDA graphs' memory pool, e.g. 256MiB (with --cuda-graphs)"
    )
    g.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="let attention use cuDNN (off by default: it plans every new KV length anew, tens of ms a token)",
    )
    g.add_argument("--plan", default=None, help="compile from a saved plan JSON (skips profiling)")
    g.add_argument("--save-plan", default=None, help="write the decode graph's plan as JSON")
    g.add_argument("--show-plan", action="store_true", help="print the plans and generated code")
    g.add_argument("--quiet", action="store_true", help="print only the answer, once, at the end")
    g.add_argument("--verbose", action="store_true")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser(
        "plan", help="compile a model, run it once, print its decode plan and draw it (PNG / SVG)"
    )
    q.add_argument(
        "--model", default=None, help="local HF checkpoint dir, .gguf file or preset (default: SmolLM2-135M)"
    )
    q.add_argument(
        "--gpu-memory", default=None, help="accelerator memory budget, e.g. 6GiB (default: all free)"
    )
    q.add_argument("--device", default=_default_device(), help="cuda, cuda:1, or cpu (emulates the GPU side)")
    q.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    q.add_argument(
        "--tokens", type=int, default=1, help="which graph's plan: 1 = decode, --prompt-len = prefill"
    )
    q.add_argument("--prompt-len", type=int, default=8, help="tokens of the random prompt run once")
    q.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="tokens the KV-cache reserve is sized for (default: the model's limit, at most 4096)",
    )
    q.add_argument("--alpha", type=float, default=None, help="force one CPU share for every offloaded Linear")
    q.add_argument(
        "--job-overhead",
        type=float,
        default=None,
        help="seconds a CPU job costs beyond its GEMVs, for the profiled α (default: the device's, 1.5e-4 on CUDA)",
    )
    q.add_argument(
        "--no-stream-jobs",
        action="store_true",
        help="balance every CPU job on its own: stream none into the segment of the job before it (stream_jobs=False)",
    )
    q.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="GPU parts the staging arena holds, i.e. copied ahead (default: the Config default)",
    )
    q.add_argument("--out", default=None, help="write the plan as JSON")
    q.add_argument("--png", default=None, help="draw α per Linear and the predicted timeline to a PNG")
    q.add_argument("--svg", default=None, help="the same picture as SVG")
    q.add_argument("--draw-layer", default=None, help="a Linear to draw, e.g. layers.0.mlp.down_proj")
    q.add_argument("--draw-out", default=None, help="where to draw it: .png / .svg (need graphviz) or .dot")
    q.add_argument("--verbose", action="store_true")
    q.set_defaults(func=cmd_plan)

    from .bench import add_arguments

    b = sub.add_parser(
        "bench", help="benchmark hetegen_fx against Accelerate, streaming and CPU-only offload"
    )
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"hetegen: error: {cause}", file=sys.stderr)
        return 2


def _user_error(e: BaseException) -> BaseException | None:
    """The error to show the user in one line (dynamo wraps a backend's errors), or None for a bug."""
    while e is not None:
        if isinstance(e, (HetegenError, ValueError, FileNotFoundError)):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


if __name__ == "__main__":
    sys.exit(main())
