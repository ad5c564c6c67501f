"""hetegen bench on the CPU (the GPU side emulated): every variant runs, matches the reference, and the
report (JSON, table, chart, one decode step's trace) is written. Timing is not asserted."""

from __future__ import annotations

import json

import torch

from hetegen_fx.cli import main


def test_bench_smoke_on_cpu(tmp_path):
    rc = main(
        [
            "bench",
            "--preset",
            "tiny-llama",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--gpu-memory",
            "300KiB",
            "--prompt-len",
            "12",
            "--new-tokens",
            "4",
            "--variants",
            "stream,cpu,hetegen,gpu,graphs",
            "--graph-memory",
            "16KiB",
            "--interleave",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    by = {r["variant"]: r for r in report["results"]}
    assert set(by) == {"stream", "cpu", "hetegen", "gpu", "graphs"}
    assert all(r["tokens_match_reference"] for r in by.values())
    assert by["stream"]["mean_alpha"] == 0.0 and by["cpu"]["mean_alpha"] == 1.0
    assert 0.0 < by["hetegen"]["mean_alpha"] < 1.0
    assert {"cpu_gemv_float16", "cpu_gemv_bfloat16", "cpu_gemv_float32"} <= set(report["ceilings"])
    assert by["hetegen"]["trace"]["copy_busy_s"] > 0
    graphs = by["graphs"]["cuda_graphs"]  # emulated graphs: the static-cache decode steps replay them
    assert graphs["recorded"] > 0 and graphs["replays"] > graphs["recorded"] and graphs["failed"] == 0
    for r in by.values():  # two timed generates of 4 tokens: 3 decode steps each, as the caller saw them
        steps = r["decode_step_s"]
        assert len(steps["all"]) == 6 and all(t > 0 for t in steps["all"])
        assert min(steps["all"]) <= steps["p10"] <= steps["median"] <= steps["p90"] <= max(steps["all"])
    inter = report["interleaved"]  # stream, cpu and hetegen side by side, two round-robin rounds
    assert inter["rounds"] == 2 and set(inter["round_step_s"]) == {"stream", "cpu", "hetegen"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in inter["round_step_s"].values())
    assert set(inter["speedup"]) == {"hetegen / cpu", "hetegen / stream"}
    for pair, r in inter["speedup"].items():
        a, b = pair.split(" / ")
        expect = [tb / ta for ta, tb in zip(inter["round_step_s"][a], inter["round_step_s"][b], strict=True)]
        assert r["per_round"] == expect and r["min"] <= r["median"] <= r["max"]
    trace = json.loads((tmp_path / "trace_decode.json").read_text())
    assert any(e.get("cat") == "PCIe" for e in trace["traceEvents"])
    table = (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0 and "| hetegen |" in table
    assert "interleaved, 2 round-robin rounds" in table and "- hetegen / cpu: " in table


def test_a_variant_of_the_same_model_frees_the_last_ones_store(tiny_hf):
    """The bench compiles one model once per variant: the last variant's store (its resident weights) must go
    once its model does, or the next variant's peak is measured on top of it."""
    import gc
    import weakref

    import hetegen_fx
    from hetegen_fx.store import find_store, forget

    model = tiny_hf("llama")
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = hetegen_fx.compile(model, gpu_memory=int(nbytes * 0.6), device="cpu", max_seq_len=32)
    compiled.generate(ids, max_new_tokens=3, do_sample=False)
    store = weakref.ref(compiled.hetegen_store)
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert store() is not None and find_store(list(model.parameters())) is store()  # still registered
    forget(list(model.parameters()))
    gc.collect()
    assert store() is None and find_store(list(model.parameters())) is None
