"""Layouts over several processes (``hetegen_fx.distributed``, ``passes/stages.py``, ``passes/shard.py``), with
gloo on the CPU: tiny Llama-, Qwen2- and GPT-2-family models under pipeline stages of different layer counts,
tensor parallelism alone, and stages of different TP degrees and layer counts give eager's greedy tokens in
every process; a process that dies mid-generate ends the others with a clear error within the time limit; bad
layouts and TP degrees are clear errors; the passes' op counts."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from hetegen_fx import distributed
from hetegen_fx.errors import ConfigError
from hetegen_fx.models import build_random

NEW = 12  # past the recompiles of the first decode steps: a stand-in that did not grow would recompile each


def _model(arch: str, **config):
    kw = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 128}
    if arch == "opt":
        kw.update(ffn_dim=128)
    elif arch != "gpt2":
        kw.update(intermediate_size=128, num_key_value_heads=2)
    return build_random(arch, seed=3, **kw, **config)


def _ids():
    return torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))


ARCHS = ("llama", "qwen2", "gpt2")


def _stage(rank: int, archs, layout, out: str, die_at: int | None) -> None:
    result = {}
    for arch in archs:  # one process group for the three families: fewer processes to start
        model = _model(arch)
        try:
            compiled = distributed.compile_stage(
                model, layout, gpu_memory=1 << 20, device="cpu", max_seq_len=64, profile="model"
            )
            if die_at is not None and rank == 1:  # its die_at-th transfer or sum is never made
                calls = {"n": 0}
                for name in ("send", "all_reduce"):
                    real = getattr(distributed, name)

                    def dying(*a, calls=calls, real=real):
                        calls["n"] += 1
                        if calls["n"] == die_at:
                            os._exit(3)  # the process dies mid-generate, without a word to the others
                        return real(*a)

                    setattr(distributed, name, dying)
            with torch.no_grad():
                tokens = compiled.generate(_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            import hetegen_fx

            result[arch] = {"tokens": tokens[0].tolist(), "graphs": len(hetegen_fx.explain(compiled).plans)}
        except Exception as e:
            result[arch] = {"error": f"{type(e).__name__}: {e}"}
        path = os.path.join(
            out, f"rank{rank}.json"
        )  # whole or not at all: spawn may end this process any time
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)


def _results(out, ranks):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]


def _eager(arch: str) -> list[int]:
    with torch.no_grad():
        return (
            _model(arch).generate(_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0].tolist()
        )


LAYOUTS = {
    "pipeline": [(0, 1), (1, 3), (3, 4)],  # pipeline only: one, two and one layers
    "tensor-parallel": [(0, 4, 2)],  # tensor parallel only: each process half the heads and MLP width
    "asymmetric": [(0, 3, 2), (3, 4, 1)],  # asymmetric: three layers on TP 2, one on TP 1
}


def _ranks(layout) -> int:
    return sum(st[2] if len(st) > 2 else 1 for st in layout)


def _stages(rank: int, layouts, out: str) -> None:
    """:func:`_stage` for each of ``layouts`` in turn (in ``out/<i>``), each from a fresh dynamo cache."""
    for i, layout in enumerate(layouts):
        torch._dynamo.reset()
        _stage(rank, ARCHS, layout, os.path.join(out, str(i)), None)


@pytest.fixture(scope="module")
def layout_results(request, tmp_path_factory):
    """``layout_results(name)`` → every process's results for ``LAYOUTS[name]``. The selected layouts of as many
    processes run in one spawn, one after the other: the processes start and import once for them (pipeline
    and asymmetric are both three)."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_layouts_give_the_eager_tokens_in_every_process"
    }
    done: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in done:
            ranks = _ranks(LAYOUTS[name])
            names = [
                n
                for n, lay in LAYOUTS.items()
                if _ranks(lay) == ranks and n not in done and n in {*selected, name}
            ]
            out = tmp_path_factory.mktemp(f"layouts-of-{ranks}")
            for i in range(len(names)):
                (out / str(i)).mkdir()
            distributed.spawn(_stages, ranks, args=([LAYOUTS[n] for n in names], str(out)), timeout=60)
            for i, n in enumerate(names):
                done[n] = _results(out / str(i), ranks)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_give_the_eager_tokens_in_every_process(name, layout_results):
    results = layout_results(name)
    for arch in ARCHS:
        ref = _eager(arch)
        for r, got in enumerate(results):
            assert got[arch].get("tokens") == ref, (arch, r, got[arch])
            # a prefill and a decode graph, and the decode graph again once the cache's length is dynamic: the
            # stand-ins of other stages' caches grow with it rather than recompile the graph at every length
            assert got[arch]["graphs"] <= 3, (arch, r, got[arch])


@pytest.mark.parametrize(
    ("layout", "others"), [([(0, 1), (1, 3), (3, 4)], (0, 2)), ([(0, 4, 2)], (0,))], ids=["pipeline", "tp"]
)
def test_a_process_that_dies_mid_generate_ends_the_others_with_a_clear_error(layout, others, tmp_path):
    ranks = sum(st[2] if len(st) > 2 else 1 for st in layout)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="exit code 3|exited with exit code|terminated"):
        distributed.spawn(_stage, ranks, args=(("llama",), layout, str(tmp_path), 2), timeout=20)
    assert time.perf_counter() - t0 < 90
    for r in others:  # the others stopped with an error that says what happened
        path = tmp_path / f"rank{r}.json"
        if path.exists():  # spawn may have ended them first; then there is nothing to read
            got = json.loads(path.read_text())["llama"]
            assert "stage transfer failed" in got.get("error", ""), got


def test_bad_layouts_are_clear_errors():
    assert distributed.even_layout(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ConfigError, match="from 0 to the model's 4 layers"):
        distributed.check_layout([(0, 2), (3, 4)], 4)
    with pytest.raises(ConfigError, match="between 1 and 4"):
        distributed.even_layout(4, 5)
    with pytest.raises(ConfigError, match="torch.distributed initialised"):
        distributed.compile_stage(_model("llama"), [(0, 4)], device="cpu")
    with pytest.raises(ConfigError, match=r"\(start, stop, tp\)"):
        distributed.check_layout([(0, 2, 0), (2, 4)], 4)  # a TP degree of 0
    with pytest.raises(ConfigError, match="TP 3 does not divide the model's 4 attention heads"):
        distributed.check_tp(_model("llama"), 3)
    with pytest.raises(ConfigError, match="TP 4 does not divide the model's 2 key/value heads"):
        distributed.check_tp(_model("qwen2"), 4)
    distributed.check_tp(_model("gpt2"), 4)
    from hetegen_fx.config import Config

    with pytest.raises(ConfigError, match="pipeline_stage must be"):
        Config(pipeline_stage={"rank": 2, "ranks": 2, "layers": [0, 1]})
    with pytest.raises(ConfigError, match="pipeline_stage must be"):
        Config(pipeline_stage={"rank": 3, "layout": [[0, 2, 2], [2, 4, 1]]})  # 3 processes: ranks 0-2
    Config(pipeline_stage={"rank": 2, "layout": [[0, 2, 2], [2, 4, 1]]})


def test_roles_pair_the_processes_of_neighbouring_stages():
    r = [distributed.roles([(0, 2, 2), (2, 3, 1), (3, 4, 3)], rank) for rank in range(6)]
    assert [x.stage for x in r] == [0, 0, 1, 2, 2, 2]
    assert [x.tp_rank for x in r] == [0, 1, 0, 0, 1, 2]
    assert [x.group for x in r] == [(0, 1), (0, 1), (2,), (3, 4, 5), (3, 4, 5), (3, 4, 5)]
    # two processes to one: the second sends to none; one to three: each of the three hears from it
    assert [x.send_to for x in r] == [(2,), (), (3, 4, 5), (), (), ()]
    assert [x.recv_from for x in r] == [None, None, 0, 2, 2, 2]
    assert {x.logits_from for x in r} == {3}


def _captured(arch: str, bind: bool = False, new: int = 2, **config):
    """The decode graph dynamo captures of the tiny model (a DynamicCache, as stages decode with); with
    ``bind``, its parameters bound as the backend binds them."""
    import copy

    from hetegen_fx.capture import bind_placeholder_params

    graphs = []

    def backend(gm, example_inputs):
        if bind:
            bind_placeholder_params(gm, example_inputs)
        graphs.append(gm)
        return gm.forward

    model = copy.copy(_model(arch, **config))
    model.compile(backend=backend)
    with torch.no_grad():
        model.generate(_ids(), max_new_tokens=new, do_sample=False, cache_implementation="dynamic")
    return graphs[-1]


def test_the_stage_split_keeps_its_layers_and_adds_one_transfer_each_way():
    from torch.fx.passes.infra.pass_base import PassResult

    from hetegen_fx.linear import LINEAR_TARGETS
    from hetegen_fx.ops import STAGE_BROADCAST, STAGE_RECV, STAGE_SEND
    from hetegen_fx.passes.stages import StageSplitPass, layer_of

    def linear_layers(graph):
        return {layer_of(n) for n in graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS}

    gm = _captured("llama")
    assert linear_layers(gm.graph) == {0, 1, 2, 3, None}  # lm_head: the postlude
    placeholders = len(list(gm.graph.find_nodes(op="placeholder")))
    res = StageSplitPass(1, 3, rank=1, ranks=3, device="cpu")(gm)
    assert isinstance(res, PassResult) and res.modified
    g = res.graph_module.graph
    count = lambda op: sum(n.op == "call_function" and n.target is op for n in g.nodes)  # noqa: E731
    assert (count(STAGE_RECV), count(STAGE_SEND), count(STAGE_BROADCAST)) == (1, 1, 1)
    assert linear_layers(g) == {1, 2}  # and no lm_head off the last stage
    assert len(list(g.find_nodes(op="placeholder"))) == placeholders  # the caller's signature is kept


def _count(graph, op) -> int:
    return sum(n.op == "call_function" and n.target is op for n in graph.nodes)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_shard_pass_halves_each_pair_and_sums_the_rows_once_per_block(arch):
    from hetegen_fx.linear import find_linears
    from hetegen_fx.ops import TP_ALL_REDUCE, TP_LOCAL, TP_WHOLE
    from hetegen_fx.passes.shard import ShardPass

    gm = _captured(arch, bind=True)
    before = {s.name: tuple(s.weight.tensor.shape) for s in find_linears(gm)}
    assert _count(gm.graph, TP_ALL_REDUCE) == 0
    res = ShardPass(0, 4, tp_rank=1, tp=2, group=(0, 1))(gm)
    g = res.graph_module.graph
    # two blocks a layer (attention, MLP), one sum each; the decode graph's cache: keys and values a layer
    assert _count(g, TP_ALL_REDUCE) == 8
    assert _count(g, TP_LOCAL) == 8 and _count(g, TP_WHOLE) == 8
    after = {s.name: tuple(s.weight.tensor.shape) for s in find_linears(res.graph_module)}
    assert len(after) == len(before)
    shared = {n.split("@")[0]: shape for n, shape in after.items() if "@tp1of2" in n}
    assert len(shared) == len(before) - 1  # every Linear of the layers; lm_head stays whole
    for name, shape in shared.items():
        whole = before[name]
        assert shape[0] * shape[1] * 2 == whole[0] * whole[1], (name, whole, shape)


class _MLP(torch.nn.Module):
    """A block of two Linears; ``mix="mean"`` subtracts the mean over the features between them, ``"written
    out"`` writes the second as ``h @ W.T + b``."""

    def __init__(self, mix):
        super().__init__()
        self.up = torch.nn.Linear(8, 48 if mix == "fused" else 16)
        self.down, self.mix = torch.nn.Linear(16, 8), mix

    def forward(self, x):
        if self.mix == "fused":  # one Linear for three parts, clamped before the split (MPT's clip_qkv)
            a, b, c = self.up(x).clamp(-0.5, 0.5).chunk(3, -1)
            return self.down(torch.relu(a) * b + c)
        h = torch.relu(self.up(x))
        if self.mix == "mean":
            h = h - h.mean(-1, keepdim=True)
        if self.mix == "softmax":
            h = h.softmax(-1)
        if self.mix == "written out":  # a Linear as some architectures write it: x @ W.T + b
            return h @ self.down.weight.t() + self.down.bias
        return self.down(h)


class _Layer(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.mlp = _MLP(mix)

    def forward(self, x):
        return x + self.mlp(x)


class _Toy(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(mix)])

    def forward(self, x):
        return self.layers[0](x)


def _toy_graph(mix, model=None, x=None):
    """The graph dynamo captures of ``model`` (default a new ``_Toy(mix)``) and its example inputs."""
    from hetegen_fx.capture import bind_placeholder_params

    graphs = []

    def backend(gm, example_inputs):
        bind_placeholder_params(gm, example_inputs)
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model or _Toy(mix), backend=backend)(torch.randn(2, 8) if x is None else x)
    return graphs[0]


def test_an_op_that_mixes_the_shares_is_a_clear_error():
    from hetegen_fx.errors import UnsupportedModelError
    from hetegen_fx.ops import TP_ALL_REDUCE
    from hetegen_fx.passes.shard import ShardPass

    for form in (None, "written out"):
        res = ShardPass(0, 1, tp_rank=1, tp=2, group=(0, 1))(_toy_graph(form)[0])
        assert _count(res.graph_module.graph, TP_ALL_REDUCE) == 1, form
    with pytest.raises(UnsupportedModelError, match="cannot run on this process's share"):
        ShardPass(0, 1, tp_rank=0, tp=2, group=(0, 1))(_toy_graph("mean")[0])
    with pytest.raises(UnsupportedModelError, match="works along the split heads or features"):
        ShardPass(0, 1, tp_rank=0, tp=2, group=(0, 1))(_toy_graph("softmax")[0])


@pytest.mark.parametrize("form", [None, "written out", "fused"])
def test_the_shares_add_up_to_the_whole_block(form, monkeypatch):
    """Each process's graph with the sum left out: the partial outputs of the row Linear (the bias in the
    first only) add up to eager's, on fresh random inputs."""
    from hetegen_fx import distributed
    from hetegen_fx.passes.shard import ShardPass

    monkeypatch.setattr(distributed, "all_reduce", lambda x, group: x)  # each process's partial sum alone
    torch.manual_seed(11)
    model = _Toy(form)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        outs = []
        for rank in (0, 1):
            gm, inputs = _toy_graph(form, model, x)
            outs.append(ShardPass(0, 1, tp_rank=rank, tp=2, group=(0, 1))(gm).graph_module(*inputs)[0])
    # out_r = x + partial_r: the two partials sum to the block's output
    torch.testing.assert_close(outs[0] + outs[1] - x, ref)


def test_linears_directly_in_a_layer_and_eager_attention_with_grouped_heads_are_split():
    """OPT's fc1 / fc2 sit in the decoder layer itself: one block. Eager attention with fewer key/value heads
    repeats them by sizes read off the cache, which in a dynamic decode graph are the share's."""
    from hetegen_fx.ops import TP_ALL_REDUCE
    from hetegen_fx.passes.shard import ShardPass
    from hetegen_fx.passes.stages import StageSplitPass

    gm = _captured("opt", bind=True)
    res = ShardPass(0, 4, tp_rank=0, tp=2, group=(0, 1))(gm)
    assert _count(res.graph_module.graph, TP_ALL_REDUCE) == 8
    gm = _captured("llama", bind=True, new=5, attn_implementation="eager")
    staged = StageSplitPass(0, 2, 0, 2, "cpu")(gm).graph_module
    res = ShardPass(0, 2, tp_rank=1, tp=2, group=(0, 1))(staged)
    assert _count(res.graph_module.graph, TP_ALL_REDUCE) == 4


# -- cores of one machine ------------------------------------------------------------------------------------


def test_the_cores_are_divided_among_the_processes_without_sharing():
    """An accelerator stage's process gets a core for its launching thread, then every process a share of
    the rest by the layers whose weights its CPU reads (a CPU stage's layers, half an accelerator stage's);
    every process at least one core; no core twice; every core used; with fewer cores than processes,
    all of them shared."""
    cores = range(16)
    sets = distributed.core_sets(
        ["cuda", "cpu"], [(0, 12), (12, 16)], cores, topology=None
    )  # 1 + (6 : 4 of 15)
    assert [len(c) for c in sets] == [10, 6]
    tp = distributed.core_sets(
        ["cuda", "cpu", "cpu"], [(0, 12), (12, 16, 2)], cores, topology=None
    )  # 1 + (6 : 2 : 2 of 15)
    assert [len(c) for c in tp] == [9, 4, 3]
    assert [
        len(c) for c in distributed.core_sets(["cuda", "cpu"], [(0, 2), (2, 32)], cores, topology=None)
    ] == [2, 14]
    assert [len(c) for c in distributed.core_sets(["cpu"] * 3, None, cores, topology=None)] == [6, 5, 5]
    assert [
        len(c) for c in distributed.core_sets(["cpu", "cpu"], [(0, 31), (31, 32)], range(4), topology=None)
    ] == [3, 1]
    assert distributed.core_sets(["cuda", "cpu"], None, range(2), topology=None) == [
        [0],
        [1],
    ]  # no core to spare
    for got in (sets, tp):
        flat = [c for s in got for c in s]
        assert sorted(flat) == list(cores) and len(set(flat)) == len(flat)
    assert distributed.core_sets(["cpu"] * 3, None, range(2), topology=None) == [[0, 1]] * 3
    with pytest.raises(ConfigError, match="the layout has 3 processes and 2 devices"):
        distributed.core_sets(["cpu", "cpu"], [(0, 1, 2), (1, 2)], cores, topology=None)
    with pytest.raises(ConfigError, match="stop > start"):
        distributed.core_sets(["cpu", "cpu"], [(4, 0), (0, 4)], cores, topology=None)


def _fake_topology(root, siblings: list[list[int]], lists: bool = True) -> str:
    """sysfs's topology files for ``siblings`` (one list of logical CPUs per core); ``lists=False``: only the
    package and core ids (older kernels)."""
    for core, cpus in enumerate(siblings):
        for cpu in cpus:
            folder = root / f"cpu{cpu}" / "topology"
            folder.mkdir(parents=True)
            (folder / "physical_package_id").write_text("0\n")
            (folder / "core_id").write_text(f"{core}\n")
            if lists:
                (folder / "thread_siblings_list").write_text(",".join(map(str, cpus)) + "\n")
    return str(root)


def test_the_threads_of_one_core_go_to_one_process(tmp_path):
    """8 logical CPUs as 4 cores of two threads, numbered as Linux does (siblings 0/4, 1/5, 2/6, 3/7): a
    GPU stage's and a CPU stage's processes get whole cores; with more processes than cores, logical CPUs."""
    topo = _fake_topology(tmp_path, [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert distributed.physical_cores(range(8), topo) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert distributed.physical_cores([0, 1, 9], topo) == [[0], [1], [9]]  # 9: no topology, its own core
    sets = distributed.core_sets(["cuda", "cpu"], [(0, 12), (12, 16)], range(8), topology=topo)
    assert sets == [[0, 1, 2, 4, 5, 6], [3, 7]]  # 1 launcher core + (6 : 4 of 3 cores: 2 : 1)
    for s in sets:
        assert all({a % 4 for a in s} & {b % 4 for b in t} == set() for t in sets if t is not s)
    many = distributed.core_sets(["cpu"] * 6, None, range(8), topology=topo)
    assert sorted(c for s in many for c in s) == list(range(8)) and all(many)
    assert distributed.core_sets(["cpu", "cpu"], None, [0, 4], topology=topo) == [[0], [4]]  # one core, two
    three = distributed.core_sets(["cpu"] * 3, None, [0, 1, 4, 5], topology=topo)  # 2 cores, 3 processes
    assert three == [[0, 4], [1], [5]]  # logical CPUs, a core's threads side by side
    ids_only = _fake_topology(tmp_path / "old", [[0, 4], [1, 5], [2, 6], [3, 7]], lists=False)
    assert distributed.physical_cores(range(8), ids_only) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _report_cores(rank: int, sets: list, folder: str) -> None:
    distributed.pin_cores(sets[rank])  # after torch.distributed started its threads
    threading.Thread(target=time.sleep, args=(0,)).start()
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    affinity = set()
    for tid in tasks:
        try:
            affinity.add(tuple(sorted(os.sched_getaffinity(tid))))
        except ProcessLookupError:
            pass
    seen = {"affinity": sorted(affinity), "threads": torch.get_num_threads(), "tasks": len(tasks)}
    with open(os.path.join(folder, f"cores{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_each_process_runs_on_its_own_cores(tmp_path):
    sets = distributed.core_sets(["cpu", "cpu"], [(0, 1), (1, 2)])
    distributed.spawn(_report_cores, 2, args=(sets, str(tmp_path)), folder=str(tmp_path))
    for rank, cores in enumerate(sets):
        seen = json.loads((tmp_path / f"cores{rank}.json").read_text())
        assert seen["tasks"] > 1 and seen["affinity"] == [cores], seen  # every thread, gloo's included
        assert seen["threads"] == len(cores)
