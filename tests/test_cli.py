"""`hetegen generate` on the real default model (SmolLM2-135M), on the emulated device: its options reach
the compile and the answer comes out; bad combinations fail before the model loads."""

from __future__ import annotations

import re

from hetegen_fx.cli import main


def test_generate_with_cuda_graphs_replays_and_answers(capsys):
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


def test_graph_memory_without_cuda_graphs_is_refused_before_loading(capsys, monkeypatch):
    import hetegen_fx.models

    def no_load(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(hetegen_fx.models, "load", no_load)
    assert main(["generate", "--device", "cpu", "--prompt", "hi", "--graph-memory", "64MiB"]) == 2
    assert "add --cuda-graphs" in capsys.readouterr().err
    assert (
        main(["generate", "--device", "cpu", "--prompt", "hi", "--cuda-graphs", "--graph-memory", "lots"])
        == 2
    )
    assert "cannot read 'lots'" in capsys.readouterr().err
