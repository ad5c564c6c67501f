"""The ``hetegen`` command line, on the emulated device (``--device cpu``).

* bad arguments, inputs and output paths fail before any model loads, in one line, exit status 2;
  interrupts exit 130; ``--help`` is plain text and explains every flag; ``--version``;
* ``generate``, ``chat`` and ``plan`` share one set of defaults for the compilation;
* ``generate`` samples (``--temperature``, ``--top-p``, ``--top-k``, ``--seed``) and prints the prompt and
  generation speeds; ``chat`` keeps the compiled model and the KV cache between turns, from a pipe;
* the plan picture's title names the model, the budget and the graph in words;
* the real default model (SmolLM2-135M) answers with CUDA graphs on.

Most tests use a tiny random Llama saved with a byte-level tokenizer and a chat template (a real checkpoint
folder, built in a second) instead of SmolLM2, whose GGUF takes about 20 s to load.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hetegen_fx
from hetegen_fx import cli
from hetegen_fx.cli import build_parser, compile_options, generation_options, main

CPU = ["--device", "cpu"]
SPEEDS = re.compile(
    r"prompt: (\d+) tokens in [\d.]+ s \(([\d.]+|-) tok/s\) \| generation: (\d+) tokens in [\d.]+ s "
    r"\(([\d.]+|-) tok/s\)"
)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A checkpoint folder: tiny-llama (2 layers, 64 wide) with random weights and a byte-level tokenizer
    (3 special tokens + 256 bytes) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hetegen_fx.models import build_random

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: tiny-llama's pad, bos and eos
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: its order changes with PYTHONHASHSEED
        vocab[ch] = len(vocab)
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tiny-chat")
    build_random("tiny-llama", vocab_size=len(vocab)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: the command must stop before."""
    import hetegen_fx.models

    def load(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(hetegen_fx.models, "load", load)


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# help, version, defaults


def test_help_is_plain_text_and_every_flag_is_explained(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "``" not in top and ":func:" not in top
    for command in ("generate", "chat", "plan", "bench"):
        assert command in top
        assert main([command, "--help"]) == 0
        assert "``" not in capsys.readouterr().out
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"hetegen {command} {'/'.join(action.option_strings)} has no help"
    assert {"chat", "generate", "plan", "bench"} <= set(subparsers)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"hetegen {hetegen_fx.__version__} (torch ")


def test_generate_chat_and_plan_share_the_compile_defaults():
    parser = build_parser()
    common = ["--gpu-memory", "1MiB", *CPU]
    gen = parser.parse_args(["generate", "--prompt", "hi", *common])
    chat = parser.parse_args(["chat", *common])
    plan = parser.parse_args(["plan", *common])
    assert compile_options(gen) == compile_options(chat) == compile_options(plan)
    assert compile_options(gen)["max_seq_len"] is None  # hetegen_fx.compile's: the model's limit, ≤ 4096
    assert gen.dtype == chat.dtype == plan.dtype == "float32"
    threads = parser.parse_args(["plan", *common, "--threads", "3", "--prefetch", "2"])
    assert compile_options(threads)["cpu_threads"] == 3
    assert hetegen_fx.Config.from_options(compile_options(threads)).cpu_threads == 3


@pytest.mark.parametrize("name", ["cudnn_attention", "host_embeddings"])
def test_auto_flags_choose_the_setting_and_exclude_each_other(capsys, name):
    parser = build_parser()
    common = ["plan", "--gpu-memory", "1MiB", *CPU]
    flag = name.replace("_", "-")
    settings = [
        getattr(hetegen_fx.Config.from_options(compile_options(parser.parse_args([*common, *given]))), name)
        for given in ([], [f"--{flag}"], [f"--no-{flag}"])
    ]
    assert settings == ["auto", True, False]
    with pytest.raises(SystemExit):
        parser.parse_args([*common, f"--{flag}", f"--no-{flag}"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_sampling_flags_become_generate_options():
    parser = build_parser()
    greedy = parser.parse_args(["generate", "--prompt", "hi"])
    assert generation_options(greedy) == {"max_new_tokens": 64, "do_sample": False}
    sampled = parser.parse_args(
        "generate --prompt hi --temperature 0.7 --top-p 0.9 --top-k 40 --repeat-penalty 1.1 --seed 3".split()
    )
    assert generation_options(sampled) == {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
    }
    assert parser.parse_args(["chat"]).max_new_tokens == 256  # a reply, not a sample


# --------------------------------------------------------------------------------------------------------------
# errors: one line, before the model loads


BAD = [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "--temperature: must be at least 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p: must lie in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p: must lie in (0, 1]"),
    (["chat", "--top-k", "-1"], "--top-k: must be at least 0"),
    (["chat", "--threads", "0"], "--threads: must be at least 1"),
    (["chat", "--seed", "x"], "--seed: expected a whole number"),
    (["plan", "--alpha", "1.5"], "--alpha: must lie in [0, 1]"),
    (["plan", "--gpu-memory", "lots"], "cannot read 'lots'"),
    (["plan", "--prefetch", "0"], "--prefetch: must be at least 1"),
    (["generate"], "required: --prompt"),
    (["generate", "--prompt", "hi", "--model", "{tmp}/missing"], "no such file or folder, and not a preset"),
    (["generate", "--prompt", "hi", "--model", "{tmp}"], "has no config.json"),
    (["chat", "--model", "tiny-llama"], "is a preset: random weights and no tokenizer"),
    (["generate", "--prompt", "hi", "--plan", "{tmp}/plan.json"], "--plan {tmp}/plan.json: no such file"),
    (["generate", "--prompt", "hi", "--save-plan", "{tmp}/nowhere/p.json"], "does not exist"),
    (["generate", "--prompt", "hi", "--save-plan", "{file}/p.json"], "is not a folder"),
    (["generate", "--prompt", "hi", "--save-plan", "{tmp}"], "is a folder; give a file name"),
    (["plan", "--model", "tiny-llama", "--out", "{file}/plan.json"], "is not a folder"),
    (["plan", "--model", "tiny-llama", "--png", "{tmp}/plan.jpg"], "must end in .png"),
    (["plan", "--model", "tiny-llama", "--svg", "{tmp}/nowhere/plan.svg"], "does not exist"),
    (["plan", "--model", "tiny-llama", "--draw-layer", "x", "--draw-out", "{file}/x.dot"], "is not a folder"),
    (["plan", "--model", "tiny-llama", "--png", "{tmp}/a.png", "--svg", "{tmp}/a.svg"], "not both"),
    (["plan", "--model", "tiny-llama", "--tokens", "3"], "no graph was compiled for 3 token(s)"),
    (["plan", "--model", "tiny-llama", "--max-seq-len", "4"], "shorter than the run"),
    (["bench", "--preset", "tiny-llama", "--out", "{file}/bench"], "is not a folder"),
    (["bench", "--preset", "nope"], "not a preset"),
    (["generate", "--prompt", "hi", "--graph-memory", "64MiB"], "add --cuda-graphs"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_arguments_fail_in_one_line_before_loading(argv, message, tmp_path, capsys, no_load):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    fill = {"tmp": str(tmp_path), "file": str(file)}
    argv = [a.format(**fill) for a in argv]
    if argv[0] != "bench":
        argv += CPU
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("hetegen") and message.format(**fill) in line
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing written, not even a probe


def test_cuda_without_a_gpu_fails_before_loading(capsys, no_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["plan", "--model", "tiny-llama", "--device", "cuda"]) == 2
    assert "--device cuda: device 'cuda' is not available" in _one_line_error(capsys.readouterr().err)


def test_read_only_output_folder(tmp_path, capsys, no_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway: the probe must succeed and leave nothing
            cli._writable(str(folder / "plan.json"), "--out")
            assert list(folder.iterdir()) == []
            pytest.skip("running as root: a read-only folder is writable")
        assert main(["plan", "--model", "tiny-llama", *CPU, "--out", str(folder / "plan.json")]) == 2
        assert "cannot write in folder" in _one_line_error(capsys.readouterr().err)
    finally:
        folder.chmod(0o700)


def test_errors_while_running_are_one_line_and_interrupts_exit_130(monkeypatch, capsys):
    from hetegen_fx.errors import BudgetError

    def fails(error):
        def command(args):
            raise error

        return command

    class Wrapped(Exception):  # how dynamo hands a backend's error on
        def __init__(self, inner):
            super().__init__("backend='backend' raised:\n" + str(inner))
            self.inner_exception = inner

    argv = ["plan", "--model", "tiny-llama", *CPU]
    cases = [
        (PermissionError(13, "Permission denied", "/data/plan.png"), 2, "hetegen: error: /data/plan.png: Permission denied"),
        (IsADirectoryError(21, "Is a directory", "/data"), 2, "hetegen: error: /data: Is a directory"),
        (Wrapped(BudgetError("gpu_memory 1 MiB is below\nthe minimum")), 2, "below the minimum"),
        (KeyboardInterrupt(), 130, "hetegen: interrupted"),
    ]  # fmt: skip
    for error, status, message in cases:
        monkeypatch.setattr(cli, "cmd_plan", fails(error))
        assert main(argv) == status
        assert message in _one_line_error(capsys.readouterr().err)
    monkeypatch.setattr(cli, "cmd_plan", fails(BrokenPipeError()))  # `hetegen ... | head`: quietly
    assert main(argv) == 141 and capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "cmd_plan", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        main(argv)


def test_fit_context_lowers_new_tokens_or_refuses(capsys):
    assert cli._fit_context(30, 64, None) == 64
    assert cli._fit_context(30, 64, 100) == 64
    assert cli._fit_context(30, 64, 80) == 50
    assert "--max-new-tokens 64 lowered to 50" in capsys.readouterr().err
    with pytest.raises(hetegen_fx.HetegenError, match="the prompt is 90 tokens"):
        cli._fit_context(90, 4, 80)


# --------------------------------------------------------------------------------------------------------------
# generate


def test_generate_samples_with_a_seed_and_prints_speeds(chat_model, capsys, recwarn):
    base = ["generate", "--model", chat_model, *CPU, "--gpu-memory", "500KiB", "--prompt", "hello", "--quiet"]
    sample = ["--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "50"]
    texts = []
    for seed in ("7", "7", "8"):
        assert main([*base, *sample, "--seed", seed]) == 0
        out, err = capsys.readouterr()
        texts.append(out)
        m = SPEEDS.search(err)
        assert m, err
        assert int(m.group(1)) == 24  # the prompt through the chat template, a token a byte
        assert int(m.group(3)) <= 5  # of 6 new tokens the first comes from the prompt's pass
        assert f"seed {seed}" in err and "compiled and warmed up" in err
    assert texts[0] == texts[1] != texts[2]
    # without the warm-up the speeds say that they include compiling
    assert main([*base, "--max-new-tokens", "3", "--no-warmup"]) == 0
    err = capsys.readouterr().err
    assert SPEEDS.search(err) and "includes compiling" in err and "warmed up" not in err
    # no warning comes from the project's own calls (e.g. transformers' past_key_values → cache)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) or "hetegen_fx" in w.filename], [
        str(w.message) for w in recwarn
    ]


# --------------------------------------------------------------------------------------------------------------
# chat


def test_chat_keeps_the_kv_cache_between_turns(chat_model, monkeypatch, capsys):
    lines = ["hello", "how are you?", "", "/reset", "again", "x" * 90, "y" * 40, "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["chat", "--model", chat_model, *CPU, "--gpu-memory", "500KiB", "--max-seq-len", "80"]
    assert main([*argv, "--max-new-tokens", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    speeds = list(SPEEDS.finditer(err))
    contexts = [int(c) for c in re.findall(r"context (\d+)/80 tokens", err)]
    assert len(speeds) == len(contexts) == 4, err  # hello, how are you?, again, the y's
    (p1, p2, p3, p4) = (int(m.group(1)) for m in speeds)
    (n1, n2, n3, n4) = (int(m.group(3)) + 1 for m in speeds)  # new tokens: decode steps + the first
    (c1, c2, c3, c4) = contexts
    assert p1 == 24 and c1 == p1 + n1  # the first turn computes its whole prompt
    # the second computes only its own tokens and the last token of the reply before (not yet in the cache)
    assert p2 == (c2 - n2) - (c1 - 1) < c2 - n2
    assert "a new conversation" in err and (p3, c3) == (24, 24 + n3)  # /reset, then "again"
    assert "the message is 109 tokens" in err and "KV cache holds 80" in err  # the x's: the chat goes on
    assert "starting anew" in err and (p4, c4) == (59, 59 + n4)  # the y's fit only alone
    assert "4 replies" in err


def _chat_turns(chat_model, generation):
    """Three turns of a chat with the compiled ``chat_model``; per turn: the reply's ids, the tokens before it,
    the tokens the chat held before the turn, the tokens it computed, and eager ``generate()`` on the whole
    conversation from scratch."""
    from hetegen_fx.models import load

    model, tok = load(chat_model, progress=False)
    compiled = hetegen_fx.compile(model, device="cpu", gpu_memory="500KiB")
    chat = cli.Chat(compiled, tok, generation, system="be brief", context=256)
    turns = []
    for text in ("hello", "what is 2 + 2?", "and 3 + 3?"):
        held = list(chat.ids)
        turn = chat.say(text)
        prompt = chat.ids[: -len(turn.reply_ids)]
        assert turn.context_tokens == len(chat.ids)
        with torch.no_grad():  # eager, the whole conversation from scratch
            ref = model.generate(torch.tensor([prompt]), pad_token_id=0, **generation)
        turns.append((turn, prompt, held, ref[0, len(prompt) :].tolist()))
    assert chat.messages[0] == {"role": "system", "content": "be brief"} and len(chat.messages) == 7
    return turns


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_chat_replies_as_if_the_conversation_were_computed_anew(chat_model):
    for turn, prompt, held, ref in _chat_turns(chat_model, {"max_new_tokens": 4, "do_sample": False}):
        assert ref == turn.reply_ids
        # the earlier turns came from the cache (all but the last token of the previous reply, never computed);
        # where a reply held a special token, which its rendering drops, from the token before it
        assert turn.prompt_tokens == len(prompt) - min(_agree(prompt, held), max(len(held) - 1, 0))


def test_a_chat_reply_with_special_tokens_keeps_the_cache_up_to_them(chat_model):
    """A reply with ``<pad>`` in it (forced here) reads differently once rendered: the cache is cut back to the
    token before it, not thrown away, and the next reply is still eager's on the whole conversation."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class PadAtEvenLengths(LogitsProcessor):
        def __call__(self, ids, scores):
            scores[:, 0] += 1e4 * (ids.shape[1] % 2 == 0)
            return scores

    generation = {
        "max_new_tokens": 4,
        "do_sample": False,
        "logits_processor": LogitsProcessorList([PadAtEvenLengths()]),
    }
    turns = _chat_turns(chat_model, generation)
    assert all(0 in turn.reply_ids for turn, *_ in turns)
    for turn, prompt, held, ref in turns[1:]:
        keep = _agree(prompt, held)
        assert 0 < keep < len(held) - 1  # the earlier turns' tokens up to the first <pad> were kept
        assert ref == turn.reply_ids and turn.prompt_tokens == len(prompt) - keep


def test_chat_from_a_pipe_in_a_subprocess(chat_model):
    argv = [sys.executable, "-m", "hetegen_fx.cli", "chat", "--model", chat_model, *CPU]
    argv += ["--gpu-memory", "500KiB", "--max-new-tokens", "3", "--quiet"]
    proc = subprocess.run(argv, input="hi\nthere\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and len(SPEEDS.findall(proc.stderr)) == 2 and "2 replies" in proc.stderr
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------------------
# plan


def test_plan_title_in_words():
    assert (
        cli.plan_title("SmolLM2-135M", 400 << 20, 1)
        == "SmolLM2-135M, 400 MiB budget: the decode step (1 token)"
    )
    assert cli.plan_title("tiny-llama", 420 << 10, 8) == "tiny-llama, 420 KiB budget: the prefill (8 tokens)"
    assert cli.plan_title("m", 3 << 29, 1).startswith("m, 1.50 GiB budget")
    assert cli.plan_title("m", None, 1).startswith("m, all free memory")


def test_plan_picture_is_titled_with_the_model_budget_and_graph(tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    svg = tmp_path / "prefill.svg"
    argv = [
        "plan",
        "--model",
        "tiny-llama",
        *CPU,
        "--gpu-memory",
        "420KiB",
        "--tokens",
        "8",
        "--svg",
        str(svg),
    ]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        assert main(argv) == 0
    text = svg.read_text()
    assert "tiny-llama, 420 KiB budget: the prefill (8 tokens)" in text
    assert "graph inputs" not in text
    assert "at 8 token(s) on cpu" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# the real default model


def test_generate_with_cuda_graphs_replays_and_answers(smollm2, monkeypatch, capsys):
    import hetegen_fx.models

    def load(name, dtype, progress):  # the run's loaded default model, not a second GGUF dequantization
        assert name is None and dtype == torch.float32
        return smollm2

    monkeypatch.setattr(hetegen_fx.models, "load", load)
    argv = [
        "generate",
        "--device", "cpu",
        "--prompt", "What is the capital of France?",
        "--max-new-tokens", "8",
        "--max-seq-len", "128",
        "--gpu-memory", "400MiB",  # of 540 MB: some Linears offloaded, so the step has hand-offs
        "--cuda-graphs",
        "--graph-memory", "64MiB",
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    m = re.search(r"CUDA graphs: (\d+) recorded, (\d+) replays", err)
    assert m, err
    assert int(m.group(1)) > 0 and int(m.group(2)) > 0  # a static cache: decode steps replay
    assert SPEEDS.search(err), err


def test_graph_memory_without_cuda_graphs_is_refused_before_loading(capsys, no_load):
    assert main(["generate", "--device", "cpu", "--prompt", "hi", "--graph-memory", "64MiB"]) == 2
    assert "add --cuda-graphs" in capsys.readouterr().err
    assert (
        main(["generate", "--device", "cpu", "--prompt", "hi", "--cuda-graphs", "--graph-memory", "lots"])
        == 2
    )
    assert "cannot read 'lots'" in capsys.readouterr().err


def test_output_path_checks_leave_no_file_behind(tmp_path):
    cli._writable(str(tmp_path / "plan.json"), "--out")
    cli._writable_folder(str(tmp_path / "new" / "bench"), "--out")  # bench makes the folders
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "plan.json").write_text("{}")
    cli._writable(str(tmp_path / "plan.json"), "--out")  # an existing file is overwritten
    assert Path(tmp_path / "plan.json").read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_the_default_device_without_cuda_is_said(capsys):
    from hetegen_fx.cli import main

    assert main(["plan", "--model", "tiny-llama", "--gpu-memory", "600KiB", "--prompt-len", "4"]) == 0
    assert "no CUDA device here: the GPU side runs emulated on the CPU" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# generate --devices


def _cores(text: str) -> set[int]:
    """``"0-2,5"`` → ``{0, 1, 2, 5}``."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def test_generate_over_several_processes_gives_the_one_process_answer(chat_model, capsys):
    base = ["generate", "--model", chat_model, *CPU, "--prompt", "hello", "--quiet", "--max-new-tokens", "5"]
    assert main(base) == 0
    alone = capsys.readouterr().out
    # two pipeline stages of one layer each, then one stage tensor-parallel over two processes
    for layout in ("0-1,1-2", "0-2x2"):
        assert main([*base, "--devices", "cpu,cpu", "--layout", layout]) == 0
        out, err = capsys.readouterr()
        assert out == alone, (layout, out, alone)
        assert "2 processes on cpu, cpu" in err and "tok/s" in err
        cores = re.search(r"cores (\S+) / (\S+)", err)  # disjoint cores, one set a process
        assert cores and not _cores(cores.group(1)) & _cores(cores.group(2)), err
    # sampling: every process draws the same tokens (the parent picks one seed), so a TP stage stays in step
    sampled = [*base, "--devices", "cpu,cpu", "--layout", "0-2x2", "--temperature", "1.0", "--top-k", "50"]
    assert main(sampled) == 0
    out, err = capsys.readouterr()
    m = re.search(r"seed (\d+)", err)
    assert m, err
    assert main([*base, "--temperature", "1.0", "--top-k", "50", "--seed", m.group(1)]) == 0
    assert capsys.readouterr().out == out  # one process with that seed gives the same text
    bad = {
        ("--devices", "cpu,cpu", "--save-plan", "plan.json"): "leave it out with --devices",
        ("--devices", "cpu,cpu", "--layout", "0-1x2,1-2"): "needs 3 processes",
        ("--devices", "cpu,cpu", "--layout", "0:1,1:2"): "START-STOPxTP",
        ("--layout", "0-1,1-2"): "give --devices too",
        ("--cores", "0/1"): "give --devices too",
        ("--devices", "cpu,cpu", "--cores", "0"): "names 1 processes' cores, the run has 2",
        ("--devices", "cpu,cpu", "--cores", "0/0"): "given to two processes",
        ("--devices", "cpu,cpu", "--cores", "0/100000"): "not among this machine's",
        ("--devices", "cpu,cpu", "--cores", "0/a"): "processes separated by '/'",
        ("--devices", "cpu,cpu", "--cores", "0/1-999999999999"): "not among this machine's",
    }
    for flags, message in bad.items():
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
