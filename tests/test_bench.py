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
            "stream,cpu,hetegen,gpu,graphs,blocks",
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
    assert set(by) == {"stream", "cpu", "hetegen", "gpu", "graphs", "blocks"}
    assert "MLP block(s) as one CPU job each" in by["blocks"]["plan_table"]
    assert all(r["tokens_match_reference"] for r in by.values())
    assert by["stream"]["mean_alpha"] == 0.0 and by["cpu"]["mean_alpha"] == 1.0
    assert 0.0 < by["hetegen"]["mean_alpha"] < 1.0
    assert {"cpu_gemv_float16", "cpu_gemv_bfloat16", "cpu_gemv_float32"} <= set(report["ceilings"])
    assert report["ceiling_working_set_bytes"] >= 256 * 2**20  # the ceilings stream from DRAM
    assert report["bounds_decode_s"] == {}  # no GPU, no bound
    assert by["hetegen"]["trace"]["copy_busy_s"] > 0
    graphs = by["graphs"]["cuda_graphs"]  # emulated graphs: the static-cache decode steps replay them
    assert graphs["recorded"] > 0 and graphs["replays"] > graphs["recorded"] and graphs["failed"] == 0
    for r in by.values():  # two timed generates of 4 tokens: 3 decode steps each, as the caller saw them
        steps = r["decode_step_s"]
        assert len(steps["all"]) == 6 and all(t > 0 for t in steps["all"])
        assert min(steps["all"]) <= steps["p10"] <= steps["median"] <= steps["p90"] <= max(steps["all"])
    inter = report["interleaved"]  # stream, cpu, hetegen and blocks side by side, two round-robin rounds
    assert inter["rounds"] == 2 and set(inter["round_step_s"]) == {"stream", "cpu", "hetegen", "blocks"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in inter["round_step_s"].values())
    assert set(inter["speedup"]) == {"hetegen / cpu", "hetegen / stream", "blocks / hetegen"}
    for pair, r in inter["speedup"].items():
        a, b = pair.split(" / ")
        expect = [tb / ta for ta, tb in zip(inter["round_step_s"][a], inter["round_step_s"][b], strict=True)]
        assert r["per_round"] == expect and r["min"] <= r["median"] <= r["max"]
    trace = json.loads((tmp_path / "trace_decode.json").read_text())
    assert any(e.get("cat") == "PCIe" for e in trace["traceEvents"])
    # the blocks variant's step too, with fewer CPU jobs than hetegen's (one per offloaded MLP, not two)
    assert (tmp_path / "trace_decode_blocks.json").stat().st_size > 0
    assert 0 < by["blocks"]["trace"]["cpu_jobs"] < by["hetegen"]["trace"]["cpu_jobs"]
    table = (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0 and "| hetegen |" in table
    assert "interleaved, 2 round-robin rounds" in table and "- hetegen / cpu: " in table


def test_a_variant_of_the_same_model_frees_the_last_ones_store(tiny_hf):
    """The bench compiles one model once per variant: the last variant's store (its resident weights) must go
    once its model does, or the next variant's peak is measured on top of it."""
    import gc
    import weakref

    import hetegen_fx
    from hetegen_fx.introspect import store_of
    from hetegen_fx.store import find_store, forget

    model = tiny_hf("llama")
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = hetegen_fx.compile(model, gpu_memory=int(nbytes * 0.6), device="cpu", max_seq_len=32)
    compiled.generate(ids, max_new_tokens=3, do_sample=False)
    store = weakref.ref(store_of(compiled))
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert store() is not None and find_store(list(model.parameters())) is store()  # still registered
    forget(list(model.parameters()))
    gc.collect()
    assert store() is None and find_store(list(model.parameters())) is None


def test_llc_size_is_read_from_sysfs_and_sets_a_working_set_that_streams_from_dram(tmp_path, monkeypatch):
    from hetegen_fx import costs

    for i, size in enumerate(["48K", "2048K", "300M", "bogus"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    (tmp_path / "index9").mkdir()  # no size file: skipped
    assert costs.llc_bytes(tmp_path) == 300 * 2**20
    assert costs.llc_bytes(tmp_path / "missing") is None
    monkeypatch.setattr(costs, "llc_bytes", lambda: 300 * 2**20)
    assert costs.streaming_bytes() == 1200 * 2**20
    monkeypatch.setattr(costs, "llc_bytes", lambda: 8 * 2**20)
    assert costs.streaming_bytes() == 256 * 2**20  # never less than that
    monkeypatch.setattr(costs, "llc_bytes", lambda: None)
    assert costs.streaming_bytes() == 2**30


def test_decode_bounds_stream_each_variants_offloaded_bytes_at_its_own_ceiling():
    from hetegen_fx.bench import decode_bounds, format_table

    ceilings = {"combined": 150e9, "cpu_gemv": 100e9, "h2d_pinned": 50e9, "hbm": 3e12}
    results = [
        {"variant": v, "offloaded_bytes": off, "resident_bytes": res, "decode_s_per_token": step}
        for v, off, res, step in [
            ("stream", 6e9, 6e9, 0.14),
            ("cpu", 7.5e9, 6e9, 0.08),
            ("hetegen", 7.5e9, 6e9, 0.0625),
            ("accelerate", 0, 0, 1.0),
        ]
    ]
    b = decode_bounds(results, ceilings)
    assert b == {"stream": 6e9 / 50e9 + 2e-3, "cpu": 7.5e9 / 100e9 + 2e-3, "hetegen": 7.5e9 / 150e9 + 2e-3}
    assert decode_bounds(results, {"cpu_gemv": 100e9}) == {}  # no GPU: no HBM, no bound
    for r in results:
        r.update(prefill_s=0.1, decode_tok_s=1 / r["decode_s_per_token"], tokens_match_reference=True)
    table = format_table(
        {
            "model": "m", "dtype": "float16", "gpu_memory": 2**30, "prompt_len": 8, "device": "d",
            "date": "today", "torch": "t", "cpu_threads": 1, "results": results, "ceilings": ceilings,
            "bounds_decode_s": b,
        }
    )  # fmt: skip
    assert "- hetegen: 52.0 ms (" in table and "reached 83%" in table
    assert (
        "- cpu: 77.0 ms (" in table
        and "at equal shares of their bounds, hetegen would be 1.48x CPU-only" in table
    )


def test_bench_grow_and_raise_on_cpu(tmp_path):
    """--grow: one long generate of the default variant against the all-GPU reference (kept in the reference
    cache and read back by the next run); --raise-to: set_gpu_memory promotes weights, the raised model gives
    the reference's tokens and is timed against a fresh compile at the raised budget."""
    args = ["bench", "--preset", "tiny-llama", "--dtype", "float32", "--device", "cpu", "--gpu-memory"]
    args += [
        "400KiB",
        "--prompt-len",
        "12",
        "--new-tokens",
        "4",
        "--variants",
        "gpu,default",
        "--grow",
        "200",
    ]
    args += ["--raise-to", "4MiB", "--reference-cache", str(tmp_path / "refs"), "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    grow, raised = report["grow"], report["raise"]
    assert grow["tokens_match_reference"] is True and len(grow["tokens"]) == 188
    assert grow["stretches"][0]["from"] == 12 and grow["stretches"][-1]["to"] == 200
    assert sum(s["steps"] for s in grow["stretches"]) == 187
    (ref,) = (tmp_path / "refs").glob("reference-*.json")
    assert json.loads(ref.read_text())["tokens"] == grow["tokens"]
    assert raised["promoted_bytes"] > 0 and raised["change"].count("promoted")
    assert raised["after_offloaded_bytes"] <= raised["before_offloaded_bytes"]
    assert raised["tokens_match_reference"] is True
    assert len(raised["raised_over_fresh_per_round"]) == 2
    table = (tmp_path / "bench.md").read_text()
    assert "one generate growing the cache to 200 tokens" in table and "with set_gpu_memory" in table
    # a second run reads the reference back: a wrong cached token shows as a mismatch, not a recomputation
    data = json.loads(ref.read_text())
    data["tokens"][5] += 1
    ref.write_text(json.dumps(data))
    assert main(args[: args.index("--raise-to")] + args[args.index("--reference-cache") :]) == 0
    grow = json.loads((tmp_path / "bench.json").read_text())["grow"]
    assert grow["tokens_match_reference"] is False and grow["first_difference"] == 5
    # where they part, the all-GPU model's logits say whether it is a near tie: here the cached token is not
    # the model's greedy choice at all
    div = grow["divergence"]
    assert (div["at"], div["reference_token"], div["variant_token"]) == (
        5,
        data["tokens"][5],
        grow["tokens"][5],
    )
    assert div["gap"] < 0 and not div["near_tie"], div
    assert "not a near tie" in (tmp_path / "bench.md").read_text()


def test_decode_time_is_measured_inside_the_long_generate_not_against_the_one_token_calls():
    """A one-token generate slower than a long one's prefill (a CUDA graph recorded in it) must not leak into
    the decode time: on an H200 (2026-12-07, tree 31a73c2) the `graphs` variant's one-token calls took 0.68 s
    against 0.035 s, and the decode speed came out as 520 tok/s for steps of 12 ms."""
    import time

    from hetegen_fx.bench import _time_generate

    class Model:  # a generate that spends `step` seconds per new token, and 0.2 s more in a one-token call
        step = 0.004

        def generate(self, ids, max_new_tokens, logits_processor=None, **kw):
            time.sleep(0.2 if max_new_tokens == 1 else 0.0)
            for _ in range(max_new_tokens):
                time.sleep(self.step)
                for p in logits_processor or ():
                    p(ids, None)
            return torch.cat([ids, torch.arange(max_new_tokens)[None]], dim=1)

    ids = torch.tensor([[5, 6, 7]])
    prefill, decode, tokens, steps = _time_generate(Model(), ids, 6, torch.device("cpu"), reps=2)
    assert tokens == [0, 1, 2, 3, 4, 5]
    assert len(steps) == 2 * 5
    assert prefill >= 0.2
    assert Model.step * 0.9 <= decode < 0.1  # the steps' time, not (call - prefill) / 5 (which is below zero)
