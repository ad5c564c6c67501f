"""The repository reads as a product: docs cite results by date and commit, every link resolves, ``docs/``
holds the pages and an indexed ``results/`` folder, the design page's module map names every module, and no
module reads a private attribute of the weight store or of a compiled model."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_ORDINALS = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
#: a result cited by a work period (an ordinal or a number with the word for a period of work) instead of a
#: date and commit
PERIOD = re.compile(
    r"\b(?:"
    + "|".join(_ORDINALS)
    + r")[- ]session\b|\bsession \d+\b|\b(?:this|next|last|previous|earlier) session\b",
    re.I,
)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".cpp", ".toml", ".txt", ".cfg", ".json", ""}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES]


def test_no_text_cites_a_work_period_instead_of_a_date_and_commit():
    hits = []
    for path in _tracked():
        if path == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if PERIOD.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "cite results by date and commit:\n" + "\n".join(hits)


def test_the_period_pattern_catches_what_it_must():
    word = "ses" + "sion"  # spelled in parts, so that this file does not cite one itself
    assert PERIOD.search(f"(docs/benchmarks.md, eighth {word})")
    assert PERIOD.search(f"Until this {word} the ring") and PERIOD.search(f"{word} 15 found")
    assert not PERIOD.search("session = ort.InferenceSession('m.onnx')")
    assert not PERIOD.search("(docs/benchmarks-history.md, 2026-11-22, commit 7605416)")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("doc", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # links in code blocks are code
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, mailto:, or an anchor in the same page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_docs_hold_the_pages_and_an_indexed_results_folder():
    pages = {p.name for p in DOCS.iterdir() if p.is_file()}
    assert {"guide.md", "design.md", "export.md", "benchmarks.md", "benchmarks-history.md"} <= pages
    strays = sorted(p for p in pages if p.endswith((".json", ".png")) and p != "plan-tiny-llama.png")
    assert not strays, f"run artifacts belong under docs/results/ (with the index): {strays}"
    results = DOCS / "results"
    index = (results / "README.md").read_text(encoding="utf-8")
    for artifact in results.iterdir():
        if artifact.name != "README.md":
            assert artifact.name in index, f"docs/results/README.md does not list {artifact.name}"
    for name in re.findall(r"\(([^)/\s]+\.(?:json|png))\)", index):
        assert (results / name).exists(), f"the results index lists {name}, which is not there"


# -- no private reads ----------------------------------------------------------------------------------------

#: attributes that used to be pasted onto a compiled model: the link lives in hetegen_fx.introspect now
PASTED = {"hetegen_store", "hetegen_config"}


def _private_names() -> set[str]:
    import dataclasses

    from hetegen_fx.api import CompiledModule
    from hetegen_fx.store import WeightStore

    names = {f.name for f in dataclasses.fields(WeightStore) if f.name.startswith("_")}
    names |= {n for n in vars(WeightStore) if n.startswith("_") and not n.startswith("__")}
    names |= {n for n in vars(CompiledModule) if n.startswith("_") and not n.startswith("__")}
    names |= {"_call", "_store", "_HANDLES"}
    return names


def _python_files() -> list[Path]:
    return [p for p in _tracked() if p.suffix == ".py"] + [ROOT / "tests" / "test_introspect.py"]


def test_no_module_reads_a_private_attribute_of_the_store_or_a_compiled_model():
    private = _private_names()
    assert {"_device_copies", "_host_parts", "_locked"} <= private  # the scan knows what to look for
    hits = []
    for path in dict.fromkeys(_python_files()):
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if (node.attr in private and not own) or node.attr in PASTED:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not hits, "read these through hetegen_fx.state() or a public method:\n" + "\n".join(hits)


def test_the_design_pages_module_map_names_every_module_and_only_real_ones():
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    for entry in named:
        assert (ROOT / entry).exists(), f"docs/design.md's module map names {entry}, which does not exist"
    modules = {
        f"{p.parent.name}/{p.name}"
        for folder in ("hetegen_fx", "passes")
        for p in (ROOT / folder).glob("*.py")
        if p.name != "__init__.py"
    }
    missing = sorted(m for m in modules if m not in named)
    assert not missing, f"add these modules to the map in docs/design.md: {missing}"
    assert "models/" in named
