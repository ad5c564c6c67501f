"""The storage tier (issue: models larger than host RAM): a tiny model saved as sharded safetensors, loaded
with ``cpu_memory`` well below its bytes, keeps Linear rows in three tiers (device, RAM, storage), reads its
storage rows at every step and gives eager's greedy tokens; the choice of RAM rows by policy; bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import hetegen_fx
from hetegen_fx import tiers
from hetegen_fx.errors import ConfigError
from hetegen_fx.plan import LayerPlan

NEW = 6


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _linear_bytes(model) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )


def _generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


@pytest.fixture
def saved(tiny_hf, tmp_path):
    model = tiny_hf("llama")
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="50KB")
    return model, folder


@pytest.mark.parametrize("policy", ["balanced", "layered"])
def test_three_tiers_give_eager_tokens_and_read_storage_every_step(saved, policy):
    model, folder = saved
    ids = torch.randint(3, 128, (1, 7))
    ref = _generate(model, ids)
    linear = _linear_bytes(model)
    slots = 3
    # room for a third of the Linear rows in RAM beside the other weights and a ring of 3 slots
    other = _nbytes(model) - linear
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    cpu_memory = other + slots * largest + linear // 3
    compiled = hetegen_fx.load(
        folder,
        gpu_memory=int(_nbytes(model) * 0.4),
        cpu_memory=cpu_memory,
        storage_policy=policy,
        storage_slots=slots,
        device="cpu",
        max_seq_len=64,
        profile="model",
        progress=False,
    )
    out = _generate(compiled, ids)
    assert torch.equal(out, ref)
    plan = hetegen_fx.explain(compiled).plan
    tiers_used = {lp.tier for lp in plan.layers}
    assert "gpu" in tiers_used and tiers_used & {"storage", "ram+storage"}, plan.table()
    assert tiers_used & {"ram", "ram+storage"}, plan.table()
    assert plan.storage and plan.storage["policy"] == policy and plan.storage_bytes > 0
    assert plan.storage["ram_bytes"] + plan.storage["ring_bytes"] + plan.storage["other_bytes"] <= cpu_memory
    assert "storage tier" in plan.table()
    reader = hetegen_fx.store.find_store(
        list(model.parameters()) + list(compiled.parameters())
    ).storage_reader
    stats = reader.stats()
    # every step (a prefill and NEW - 1 decode steps) read every storage part once
    assert stats.bytes >= NEW * plan.storage_bytes, (stats, plan.storage_bytes)
    parts = len([lp for lp in plan.layers if lp.storage_rows])
    assert stats.passes == NEW and stats.reads >= NEW * parts and stats.restarts == 0
    _generate(compiled, ids)  # the next request reads them all again (the reader runs a few parts ahead)
    again = reader.stats()
    assert again.passes == 2 * NEW and again.reads >= 2 * NEW * parts and again.restarts == 0
    if policy == "balanced":  # a saved plan with cpu_memory: the same tiers, nothing measured
        saved_plan = plan.to_dict()
        del compiled, reader
        again = hetegen_fx.load(
            folder,
            plan=saved_plan,
            cpu_memory=cpu_memory,
            storage_slots=slots,
            device="cpu",
            max_seq_len=64,
            progress=False,
        )
        assert torch.equal(_generate(again, ids), ref)
        replanned = hetegen_fx.explain(again).plan
        assert replanned.source == "plan" and replanned.storage_bytes == plan.storage_bytes
        assert [lp.tier for lp in replanned.layers] == [lp.tier for lp in plan.layers]


def _three_tiers(saved, gpu: float = 0.4, slots: int = 3, **options):
    """``(compiled, ids, ref)``: the saved model loaded on the emulated device with ``gpu`` of its bytes as
    ``gpu_memory`` and room in RAM for the other weights, a ring of ``slots`` slots and a third of the Linear
    rows; a prompt and eager's tokens for it."""
    model, folder = saved
    ids = torch.randint(3, 128, (1, 7))
    ref = _generate(model, ids)
    linear = _linear_bytes(model)
    other = _nbytes(model) - linear
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    compiled = hetegen_fx.load(
        folder,
        gpu_memory=int(_nbytes(model) * gpu),
        cpu_memory=other + slots * largest + linear // 3,
        storage_slots=slots,
        device="cpu",
        max_seq_len=64,
        profile="model",
        progress=False,
        **options,
    )
    return compiled, ids, ref


def _ops(compiled) -> dict[str, int]:
    """The storage tier's ops in all of ``compiled``'s graphs: fetches, ring rows shared out, slots given back
    after a CPU job, and copies whose rows come from RAM and the ring together."""
    from hetegen_fx import ops

    n = {"fetch": 0, "ring_rows": 0, "fetched_after_job": 0, "copy_with_tail": 0}
    for g in hetegen_fx.state(compiled).graphs:
        for node in (n for n in g.graph_module.graph.nodes if n.op == "call_function"):
            if ops.is_op(node.target, ops.FETCH):
                n["fetch"] += 1
            elif ops.is_op(node.target, ops.RING_ROWS):
                n["ring_rows"] += 1
            elif ops.is_op(node.target, ops.FETCHED) and len(node.args) > 4 and node.args[4]:
                n["fetched_after_job"] += 1
            elif ops.is_op(node.target, ops.COPY) and len(node.args) > 3:
                n["copy_with_tail"] += 1
    return n


def _slots_come_back_after_their_jobs(compiled) -> None:
    """In every graph, a ring slot a CPU job reads is given back after that job's ``cpu_end`` (where the
    compute stream waits for the job), with the compute stream's event too."""
    from hetegen_fx import ops

    for g in hetegen_fx.state(compiled).graphs:
        nodes = list(g.graph_module.graph.nodes)
        at = {n: i for i, n in enumerate(nodes)}
        fetches = {
            (n.args[1], n.args[2]): n
            for n in nodes
            if n.op == "call_function" and ops.is_op(n.target, ops.FETCH)
        }
        for n in nodes:
            if n.op != "call_function" or not ops.is_op(n.target, ops.FETCHED) or len(n.args) < 5:
                continue
            fetch = fetches[(n.args[2], n.args[3])]
            begin = next(u for u in fetch.users if ops.is_op(u.target, ops.CPU_BEGIN))
            end = next(u for u in begin.users if ops.is_op(u.target, ops.CPU_END))
            assert at[end] < at[n] and n.args[4] is True, n.format_node()


def _expected(compiled) -> dict[str, int]:
    """What :func:`_ops` should count, from the graphs' Plans."""
    n = {"fetch": 0, "ring_rows": 0, "fetched_after_job": 0, "copy_with_tail": 0}
    for g in hetegen_fx.state(compiled).graphs:
        for lp in g.plan.layers:
            if lp.resident or not lp.storage_rows:
                continue
            ram = lp.out_features - lp.storage_rows
            n["fetch"] += 1
            n["fetched_after_job"] += lp.split > ram
            n["ring_rows"] += ram < lp.split < lp.out_features
            n["copy_with_tail"] += lp.split < ram
    return n


@pytest.mark.parametrize("alpha", [None, 0.2, 1.0])
def test_the_split_falls_anywhere_the_cpu_computing_ring_rows_and_the_device_ram_rows(saved, alpha):
    """A Linear with storage rows keeps the split the lane model gives it (here also a forced α): inside its
    RAM rows, the device's copy takes RAM rows and the ring's in one go; beyond them, the CPU job reads the
    ring's first rows (fetched before the job is queued, given back after its cpu_end) and the device the
    rest. Eager's tokens, no restart of the reader, and the CPU worker's tables do not grow from one request
    to the next (the ring rows a job reads are the same tensors at every step)."""
    from hetegen_fx.runtime import get_runtime

    compiled, ids, ref = _three_tiers(saved, alpha=alpha)
    assert torch.equal(_generate(compiled, ids), ref)
    host = get_runtime("cpu").host
    sites = len(host._sites)
    assert torch.equal(_generate(compiled, ids), ref)
    assert len(host._sites) == sites
    counted, expected = _ops(compiled), _expected(compiled)
    assert counted == expected
    _slots_come_back_after_their_jobs(compiled)
    assert counted["fetched_after_job"] > 0  # every variant has a CPU part reading ring rows
    if alpha == 0.2:  # and one whose device part takes RAM rows too
        assert counted["copy_with_tail"] > 0 and counted["ring_rows"] > 0
    if alpha == 1.0:  # the CPU computes every row: nothing is copied from the ring
        assert counted["ring_rows"] == counted["copy_with_tail"] == 0
    plan = hetegen_fx.explain(compiled).plan
    split = {lp.name: lp.split for lp in plan.layers}
    assert any(lp.split > lp.out_features - lp.storage_rows for lp in plan.layers if lp.storage_rows)
    if alpha is None:  # the lane model's split, not the RAM rows
        assert any(
            split[lp.name] != lp.out_features - lp.storage_rows for lp in plan.layers if lp.storage_rows
        )
    stats = hetegen_fx.store.find_store(list(compiled.parameters())).storage_reader.stats()
    assert stats.restarts == 0 and stats.passes == 2 * NEW


def test_a_graph_run_through_the_dispatcher_hands_its_jobs_the_same_ring_rows(saved, monkeypatch):
    """The transformed graph itself (its ops dispatched, as a user calling ``explain().graph_module`` or an
    exported program runs it) hands the CPU jobs the ring's own rows, not copies: the CPU worker's tables
    (which know weights by their tensor) stay as they are from one request to the next."""
    from hetegen_fx import launch
    from hetegen_fx.runtime import get_runtime

    monkeypatch.setattr(launch, "direct", lambda gm, *args, **kwargs: gm)
    compiled, ids, ref = _three_tiers(saved, alpha=0.8)
    assert torch.equal(_generate(compiled, ids), ref)
    host = get_runtime("cpu").host
    sites = len(host._sites)
    assert torch.equal(_generate(compiled, ids), ref)
    assert len(host._sites) == sites
    assert _ops(compiled)["fetched_after_job"] > 0


def test_parts_of_a_deferred_weight_are_page_locked_in_ranges_that_never_overlap(monkeypatch):
    """A prefill's GPU part and a decode step's start at other rows of a deferred weight's RAM rows: each is
    locked from the weight's start, beyond what is locked already, since the driver refuses to lock a range
    twice (copies from such a part would run from pageable memory)."""
    from hetegen_fx.checkpoint import bind
    from hetegen_fx.store import WeightStore

    ranges = []

    class Driver:  # cudaHostRegister as the driver does it: an overlapping range is an error
        def cudaHostRegister(self, ptr, nbytes, flags):
            if any(ptr < b and a < ptr + nbytes for a, b in ranges):
                return 712  # cudaErrorHostMemoryAlreadyRegistered
            ranges.append((ptr, ptr + nbytes))
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Driver())
    w = torch.empty(64, 16)
    bind(w, None, "w")
    store = WeightStore(device=torch.device("cuda"))
    row = 16 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused range would warn
        for start, stop in [(32, 48), (16, 48), (40, 44), (0, 64)]:
            store.pin(w[start:stop])
    base = w.data_ptr()
    assert ranges == [(base, base + 48 * row), (base + 48 * row, base + 64 * row)]


def test_the_storage_tier_with_compiled_stretches_keeps_its_reads_outside_them(saved):
    """``compile_stretches``: inductor compiles the device work between hand-offs; the storage tier's fetches,
    ring rows and slot releases stay host steps between the stretches, so every step still reads every
    storage part once, in order, and the tokens are eager's."""
    compiled, ids, ref = _three_tiers(saved, gpu=0.5, compile_stretches=True)
    for _ in range(2):
        assert torch.equal(_generate(compiled, ids), ref)
    st = hetegen_fx.state(compiled)
    assert st.compiled_stretches["compiled"] > 0 and st.compiled_stretches["failed"] == 0
    stats = hetegen_fx.store.find_store(list(compiled.parameters())).storage_reader.stats()
    assert stats.restarts == 0 and stats.passes == 2 * NEW


def test_every_graph_fetches_the_storage_parts_in_one_order_whatever_its_splits(tmp_path, monkeypatch):
    """A model whose attention and MLP read one input (GPT-J): with a prefill at α = 0 and decode steps with CPU
    parts, every graph still fetches the storage parts in one order, so the reader (one cycle for the model)
    never starts over, over prompts of several lengths; eager's tokens."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from hetegen_fx import meta
    from hetegen_fx.passes.placement import PlacementPass
    from hetegen_fx.store import fetches_of, find_store

    cfg = GPTJConfig(vocab_size=128, n_embd=128, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)
    model = GPTJForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = cfg.eos_token_id
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    alphas = PlacementPass._alphas

    def prefill_on_the_device(self, sites, costs):  # the lane model's α, but none in a graph of many tokens
        tokens = max(s.node.meta.get(meta.TOKENS, 1) for s in sites)
        got = alphas(self, sites, costs)
        return {k: 0.0 for k in got} if tokens > 1 else got

    monkeypatch.setattr(PlacementPass, "_alphas", prefill_on_the_device)
    linear = _linear_bytes(model)
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    compiled = hetegen_fx.load(
        tmp_path / "ckpt",
        gpu_memory=int(_nbytes(model) * 0.7),
        cpu_memory=_nbytes(model) - linear + 6 * largest + linear // 10,
        device="cpu",
        max_seq_len=64,
        profile="model",
        progress=False,
    )
    for length in (7, 12, 12):
        ids = torch.randint(3, 128, (1, length))
        assert torch.equal(_generate(compiled, ids), _generate(model, ids))
    graphs = hetegen_fx.state(compiled).graphs
    splits = {g.plan.tokens: {lp.split for lp in g.plan.layers if not lp.resident} for g in graphs}
    assert splits[1] != {0} and all(v == {0} for t, v in splits.items() if t > 1), splits  # the case at hand
    orders = {tuple(fetches_of(g.graph_module)) for g in graphs}
    assert len(orders) == 1 and len(next(iter(orders))) > 1, orders
    assert find_store(list(compiled.parameters())).storage_reader.stats().restarts == 0


def test_a_cpu_job_with_more_storage_parts_than_ring_slots_keeps_to_its_ram_rows(saved):
    """A job whose CPU part read ring rows would hold a slot for each of its storage parts until it is done:
    with more parts than ``storage_slots`` (gate and up in one slot) its CPU parts keep to RAM rows, while a
    job of one storage part (lm_head) still reads the ring."""
    compiled, ids, ref = _three_tiers(saved, slots=1, alpha=1.0)
    assert torch.equal(_generate(compiled, ids), ref)
    plan = hetegen_fx.explain(compiled).plan
    by = {lp.name: lp for lp in plan.layers}
    gate, up = by["model.layers.0.mlp.gate_proj.weight"], by["model.layers.0.mlp.up_proj.weight"]
    head = by["lm_head.weight"]
    assert gate.storage_rows and up.storage_rows and head.storage_rows, plan.table()  # the case at hand
    for lp in (gate, up):
        assert lp.split <= lp.out_features - lp.storage_rows and lp.alpha == lp.split / lp.out_features
    assert head.split == head.out_features  # α = 1: one storage part, every row on the CPU
    assert hetegen_fx.store.find_store(list(compiled.parameters())).storage_reader.stats().restarts == 0


def _layers(sizes: dict[str, int]) -> list[LayerPlan]:
    return [
        LayerPlan(n, out_features=b // 64, in_features=16, tokens=1, dtype="float32", bytes=b, resident=False)
        for n, b in sizes.items()
    ]


def test_balanced_keeps_the_same_share_of_every_linear_of_a_kind_and_small_kinds_first():
    sizes = {}
    for i in range(4):
        sizes[f"layers.{i}.k_proj.weight"] = 64 * 64
        sizes[f"layers.{i}.down_proj.weight"] = 64 * 1024
    layers = _layers(sizes)
    room = 4 * 64 * 64 + 2 * 64 * 1024  # every k_proj, and half of the down_proj rows
    rows = tiers.host_rows(layers, set(sizes), room, "balanced", read_rate=1e9, read_latency=1e-4)
    assert all(rows[f"layers.{i}.k_proj.weight"] == 64 for i in range(4))
    down = {rows[f"layers.{i}.down_proj.weight"] for i in range(4)}
    assert down == {512}  # the same share in every layer: each reads the same bytes
    layered = tiers.host_rows(layers, set(sizes), room, "layered", read_rate=1e9, read_latency=1e-4)
    assert layered["layers.0.down_proj.weight"] == 1024 and layered["layers.3.down_proj.weight"] == 0
    assert tiers.host_rows(layers, set(sizes), 10**9) == {lp.name: lp.out_features for lp in layers}


def test_cpu_memory_below_the_minimum_says_what_the_minimum_is(saved):
    model, folder = saved
    with pytest.raises(
        ConfigError, match=r"cpu_memory 1.00 KiB is below the .* needs in host memory at least"
    ):
        hetegen_fx.load(
            folder,
            gpu_memory=int(_nbytes(model) * 0.4),
            cpu_memory=1024,
            device="cpu",
            profile="model",
            progress=False,
            max_seq_len=64,
        )


def test_cpu_memory_for_a_model_already_in_ram_is_a_clear_error(tiny_hf):
    model = tiny_hf("llama")
    with pytest.raises(ConfigError, match=r"hetegen_fx.load\(path, cpu_memory=...\)"):
        hetegen_fx.compile(model, gpu_memory=int(_nbytes(model) * 0.4), cpu_memory="1GiB", device="cpu")


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    import hetegen_fx, hetegen_fx.backend

    path, cpu_memory, gpu_memory = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cpu_memory = None if cpu_memory == "none" else int(cpu_memory)

    from hetegen_fx.bench_storage import _reset_peak as reset, _vm as vm

    from hetegen_fx.models import build_random

    # what a first compile and generate of the process import and build (dynamo, the worker: about 80 MiB,
    # whatever the model's size), done on a tiny model of the same architecture before the baseline
    tiny = build_random("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=2048)
    warm = hetegen_fx.compile(tiny, gpu_memory=1 << 20, device="cpu", profile="model", max_seq_len=64)
    warm.generate(torch.randint(3, 1000, (1, 8)), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    del warm, tiny
    base = reset()
    compiled = hetegen_fx.load(
        path, gpu_memory=gpu_memory, cpu_memory=cpu_memory, device="cpu", profile="model", max_seq_len=64,
        progress=False,
    )
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    out = compiled.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    peak = vm("VmHWM") - base
    plan = hetegen_fx.explain(compiled).plan
    ring = plan.storage.get("ring_bytes", 0)
    print(json.dumps({"peak": peak, "tokens": out[0].tolist(), "storage": plan.storage_bytes, "ring": ring}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_host_memory_stays_within_cpu_memory_while_loading_and_generating(tmp_path):
    """Peak RSS of a subprocess (``VmHWM`` reset after a first compile and generate of a tiny model: the
    imports and builds of a process's first compile) while it loads a 105 MiB float32 Llama and generates,
    once with every weight in RAM and once with ``cpu_memory`` at half the model's bytes. The runtime's own
    overhead O is what the first run adds beyond the weights (compiled graphs, BLAS and thread buffers,
    activations: about 100 MiB here, on the emulated device). The second run stays within ``cpu_memory``
    + the emulated device's budget (on device="cpu" resident weights are host memory too) + O + 8 MiB, and
    below the first by at least half of what it keeps in storage beyond its ring."""
    from hetegen_fx.models import build_random

    model = build_random(
        "llama",
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    )
    nbytes = _nbytes(model)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="20MB")
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0].tolist()
    del model
    cpu_memory, gpu_memory = nbytes // 2, 16 << 20

    def peak(cpu: str) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(folder), cpu, str(gpu_memory)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert got["tokens"] == ref
        return got

    ram, tiered = peak("none"), peak(str(cpu_memory))
    overhead = ram["peak"] - nbytes
    assert tiered["storage"] > nbytes // 4  # a real storage tier: a quarter of the model read at every step
    assert tiered["peak"] <= cpu_memory + gpu_memory + overhead + (8 << 20), (ram, tiered, nbytes)
    assert tiered["peak"] <= ram["peak"] - (tiered["storage"] - tiered["ring"]) // 2, (ram, tiered)


def test_the_plan_command_places_a_checkpoint_in_three_tiers(saved, tmp_path, capsys):
    from hetegen_fx.cli import main

    model, folder = saved
    linear = _linear_bytes(model)
    other = _nbytes(model) - linear
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    cpu = other + 2 * largest + linear // 3
    args = ["plan", "--model", str(folder), "--device", "cpu", "--gpu-memory", str(int(_nbytes(model) * 0.4))]
    args += ["--cpu-memory", str(cpu), "--storage-slots", "2", "--prompt-len", "8", "--max-seq-len", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "storage tier (balanced)" in out and "storage" in out


def test_cpu_memory_needs_a_checkpoint_folder_on_the_command_line(capsys):
    from hetegen_fx.cli import main

    assert main(["plan", "--model", "tiny-llama", "--device", "cpu", "--cpu-memory", "1GiB"]) != 0
    assert "--cpu-memory keeps weights in their safetensors checkpoint" in capsys.readouterr().err


def test_a_residency_change_gives_a_reader_in_the_graphs_order(saved):
    """Demoting a Linear (a lower budget) adds it to the storage tier: the reader is made anew in the order
    the recompiled graphs use its parts, so steps after the change never make it start over."""
    model = saved[0]
    compiled, ids, ref = _three_tiers(saved, gpu=0.9)
    assert torch.equal(_generate(compiled, ids), ref)
    before = hetegen_fx.explain(compiled).plan
    change = hetegen_fx.set_gpu_memory(compiled, int(_nbytes(model) * 0.45))
    assert change is not None and change.demoted
    assert torch.equal(_generate(compiled, ids), ref)
    after = hetegen_fx.explain(compiled).plan
    assert after.storage_bytes > before.storage_bytes  # the demoted Linears are read from storage
    reader = hetegen_fx.store.find_store(list(compiled.parameters())).storage_reader
    assert reader.stats().restarts == 0 and reader.stats().passes == NEW
    # promoted back: the reader reads only what the recompiled graphs fetch, nothing for nothing
    change = hetegen_fx.set_gpu_memory(compiled, int(_nbytes(model) * 0.9))
    assert change is not None and change.promoted
    assert torch.equal(_generate(compiled, ids), ref)
    store = hetegen_fx.store.find_store(list(compiled.parameters()))
    fetched = {
        part
        for g in hetegen_fx.state(compiled).graphs
        for part in hetegen_fx.store.fetches_of(g.graph_module)
    }
    reader = store.storage_reader
    assert reader is None if not fetched else set(reader.order) == fetched and reader.stats().restarts == 0
