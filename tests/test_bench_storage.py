"""``hetegen bench --cpu-memory`` on the CPU (the GPU side emulated): the checkpoint is written once and
reused, both placements run with rows in storage and give the reference's tokens, the GPU peers say why
they did not run, and the report has every variant."""

from __future__ import annotations

import json

from hetegen_fx.cli import main


def _run(tmp_path, capsys, variants: str = "gpu,hetegen,layered,accelerate,llama") -> dict:
    args = ["bench", "--preset", "tiny-llama", "--device", "cpu", "--gpu-memory", "150KiB", "--cpu-memory"]
    args += ["140KiB", "--storage-slots", "2", "--prompt-len", "16", "--new-tokens", "6", "--reps", "1"]
    args += ["--variants", variants, "--out", str(tmp_path / "out")]
    args += ["--storage-dir", str(tmp_path / "disk")]
    assert main(args) == 0
    capsys.readouterr()
    return json.loads((tmp_path / "out" / "bench_storage.json").read_text())


def test_the_storage_bench_runs_both_placements_from_storage_with_the_reference_tokens(tmp_path, capsys):
    s = _run(tmp_path, capsys)
    r = s["results"]
    assert s["reference"] == "gpu" and s["storage_read"]["rate"] > 0
    for name in ("hetegen", "layered"):
        assert r[name]["tokens_match_reference"], name
        assert r[name]["storage_bytes"] > 0 and r[name]["reader"]["steps"] >= 6, r[name]
        assert r[name]["storage"]["policy"] == ("layered" if name == "layered" else "balanced")
    assert "CUDA only" in r["accelerate"]["skipped"] and "CUDA only" in r["llama"]["skipped"]
    assert (tmp_path / "out" / "bench.md").read_text().count("| hetegen |") == 1
    # the checkpoint is kept: the second run reads the same weights (hetegen alone: the other variants' second
    # compiles would check nothing more)
    again = _run(tmp_path, capsys, "hetegen")
    assert again["results"]["hetegen"]["tokens"] == r["hetegen"]["tokens"]
