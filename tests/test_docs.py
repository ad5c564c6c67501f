"""The documentation works: every ```python block of README.md and docs/*.md runs, and what the README
says about the commands, the CLI and the options matches the code.

* A block fenced ```python runs on a CPU-only machine: each document in one fresh subprocess (in a
  temporary working folder, hub access off), each block in a fresh namespace with a fresh dynamo cache.
* A block fenced ```python no-run (it needs CUDA or a big checkpoint, or it is an excerpt) is only
  compiled, so it must still be valid Python; use ```text for anything else.
* The README's test command is the line .ci/run runs; its CLI examples parse; its options table lists
  every :class:`hetegen_fx.Config` field with its default.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
MARKER = "@@hetegen-doc-results@@"


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    flags: tuple[str, ...]
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in ("python", "py") and "no-run" not in self.flags


def fenced_blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        info = m.group("info").split()
        lang = info[0].lower() if info else ""
        out.append(Block(doc, text.count("\n", 0, m.start()) + 1, lang, tuple(info[1:]), m.group("body")))
    return out


ALL_BLOCKS = [b for doc in DOCUMENTS for b in fenced_blocks(doc)]
PYTHON = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
RUNNABLE = [b for b in PYTHON if b.runs]
NO_RUN = [b for b in PYTHON if not b.runs]

# Runs in the subprocess: blocks as JSON on stdin, results as JSON on stdout after MARKER.
RUNNER = r"""
import contextlib, io, json, sys, time, traceback
results = {}
for block in json.load(sys.stdin):
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            exec(compile(block["code"], block["file"], "exec"), {"__name__": "__main__"})
        error = None
    except BaseException:
        error = traceback.format_exc()
    results[block["id"]] = {"error": error, "output": buf.getvalue()[-4000:],
                            "seconds": time.perf_counter() - t0}
    if "torch" in sys.modules:
        sys.modules["torch"]._dynamo.reset()
sys.__stdout__.write("\n" + MARKER + json.dumps(results) + "\n")
""".replace("MARKER", repr(MARKER))


@pytest.fixture(scope="module")
def run_document():
    """``run_document(doc)`` → {block id: result}; each document runs once, in its own subprocess."""
    cache: dict[Path, tuple[dict, str]] = {}

    def run(doc: Path) -> tuple[dict, str]:
        if doc not in cache:
            # padded so that tracebacks give the line numbers of the document
            name = str(doc.relative_to(ROOT))
            blocks = [
                {"id": b.id, "file": name, "code": "\n" * b.line + b.code} for b in RUNNABLE if b.doc == doc
            ]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
            with tempfile.TemporaryDirectory(prefix="hetegen_docs_") as cwd:
                proc = subprocess.run(
                    [sys.executable, "-c", RUNNER],
                    input=json.dumps(blocks),
                    capture_output=True,
                    text=True,
                    cwd=cwd,
                    env=env,
                    timeout=300,
                )
            results = {}
            if MARKER in proc.stdout:
                results = json.loads(proc.stdout.rsplit(MARKER, 1)[1])
            cache[doc] = (results, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return cache[doc]

    return run


def test_documents_have_python_examples() -> None:
    assert README.is_file()
    assert any(b.doc == README for b in RUNNABLE), "the README should have a runnable ```python example"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_python_block_runs(block: Block, run_document) -> None:
    results, log = run_document(block.doc)
    assert block.id in results, f"the runner died before {block.id}:\n{log}"
    r = results[block.id]
    if r["error"] is not None:
        pytest.fail(f"{block.id} failed:\n{r['error']}\noutput:\n{r['output']}", pytrace=False)


@pytest.mark.parametrize("block", NO_RUN, ids=lambda b: b.id)
def test_no_run_block_is_valid_python(block: Block) -> None:
    compile(block.code, block.id, "exec")


# --------------------------------------------------------------------------------------------------------------
# the README against the code


def _readme_shell_lines() -> list[str]:
    return [
        line.strip()
        for b in ALL_BLOCKS
        if b.doc == README and b.lang in ("bash", "sh", "shell", "console")
        for line in b.code.splitlines()
        if line.strip()
    ]


def test_quick_start_is_two_one_line_commands() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in FENCE.finditer(section) if b.group("info").strip() == "bash"]
    commands = [b.group("body").strip() for b in blocks]
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each quick-start command must be a single line"
    assert commands[0].startswith("python3 -m venv .venv") and "hetegen generate" in commands[0]
    assert commands[1].startswith("python3 -m venv .venv") and "pytest" in commands[1]


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = [line for line in _readme_shell_lines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[0] in [line.strip() for line in ci], ".ci/run must run the README's test command verbatim"


def test_readme_cli_examples_parse() -> None:
    from hetegen_fx.cli import build_parser

    parser = build_parser()
    examples = []
    for line in _readme_shell_lines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["hetegen"]:
                examples.append(words[1:])
    assert {e[0] for e in examples} >= {"generate", "bench"}
    for argv in examples:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"`hetegen {shlex.join(argv)}` does not parse (exit {e.code})")


def test_readme_options_table_matches_config() -> None:
    from hetegen_fx import Config

    text = README.read_text(encoding="utf-8")
    table = text.split("### Options", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.M)
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "extra"}
    assert [name for name, _ in rows] == list(fields), (
        "the README's options table must list every Config field"
    )
    for name, default in rows:
        assert ast.literal_eval(default) == fields[name].default, f"README's default of {name}: {default}"
