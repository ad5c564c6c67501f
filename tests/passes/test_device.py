"""DevicePass: parameters read from device copies, inputs moved on entry, host constants retargeted,
outputs moved back to the inputs' device.

On "cpu" the graph can run; on "meta" (an accelerator stand-in that needs no hardware) the structure is
checked: which nodes move what where.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hetegen_fx import meta
from hetegen_fx.capture import capture_export, capture_fx
from hetegen_fx.config import Config
from hetegen_fx.linear import host_tables, param_of
from hetegen_fx.ops import CPU_BEGIN
from hetegen_fx.passes import DevicePass, PartitionPass, PlacementPass, ProfilePass
from hetegen_fx.plan import load_plan
from hetegen_fx.runtime import embed_on_host, park, to_device, write_back
from hetegen_fx.store import WeightStore


class Block(nn.Module):
    """A norm, a Linear, a buffer, a host-made tensor and an int argument."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)
        self.fc = nn.Linear(32, 16)
        self.register_buffer("pos", torch.randn(16))

    def forward(self, x, n: int = 2):
        steps = torch.arange(x.shape[-1] // 2, device="cpu")  # [16], made on the host at trace time
        return self.fc(self.norm(x)) * n + self.pos + steps


def _run(gm, device="cpu", example_inputs=None, upto="device", **kw):
    config = Config(device=device, profile="model", **kw)
    store = WeightStore(torch.device(device))
    results = {}
    passes = [
        ProfilePass(config, example_inputs),
        PlacementPass(config, store, plan=None if config.plan is None else load_plan(config.plan)),
        PartitionPass(config, store),
        DevicePass(config, store),
    ]
    for p in passes:
        results[type(p).__name__] = p(gm)
    gm.graph.lint()
    gm.recompile()
    return results["DevicePass"], store


def _moves(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is to_device]


def test_parameters_come_from_device_copies_and_numerics_hold():
    model = Block().eval()
    gm = capture_fx(model)
    read_before = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    assert read_before == {"norm.weight", "norm.bias", "pos"}
    res, store = _run(gm, example_inputs=[torch.randn(3, 32), 2])
    assert res.modified is True
    attrs = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    assert {"norm_weight__dev", "norm_bias__dev", "pos__dev", "fc_weight__dev", "fc_bias__dev"} <= attrs
    assert not attrs & read_before  # nothing reads the host parameters any more
    for n in gm.graph.find_nodes(op="get_attr"):
        assert n.meta[meta.SIDE] == "gpu"
    # emulation: the "device copy" of a host weight is the weight itself (no copy)
    assert gm.norm_weight__dev.data_ptr() == model.norm.weight.data_ptr()
    # x is moved once on entry; the int argument is not a tensor and is not moved
    (move,) = _moves(gm)
    assert move.args[0].target == "x" and move.args[1] == "cpu"
    for n in (2, 5):
        x = torch.randn(4, 32)
        torch.testing.assert_close(gm(x, n), model(x, n))


def test_dynamo_parameter_placeholders_lose_their_users(mlp, dynamo_capture):
    model = mlp()
    x = torch.randn(2, 32)
    gm, example_inputs = dynamo_capture(model, x)
    params = [n for n in gm.graph.find_nodes(op="placeholder") if param_of(n) is not None]
    assert len(params) == 5 and all(p.users for p in params)
    res, _ = _run(gm, example_inputs=example_inputs)
    assert res.modified
    assert all(not p.users for p in params)  # read through __dev attributes instead
    (move,) = _moves(gm)
    assert move.args[0].target == "L_x_"
    args = [torch.randn(2, 32) if not isinstance(a, nn.Parameter) else a for a in example_inputs]
    xi = next(a for a in args if not isinstance(a, nn.Parameter))
    torch.testing.assert_close(gm(*args)[0], model(xi))


def test_accelerator_structure_on_meta():
    gm = capture_fx(Block())
    _run(
        gm,
        device="meta",
        example_inputs=[torch.randn(3, 32), 2],
        alpha=0.5,
        gpu_memory=2000,
        prefetch=1,
        activation_reserve=0,
    )
    plan = gm.meta[meta.PLAN]
    assert not plan.layers[0].resident  # split: a CPU part that must stay on the host
    moves = _moves(gm)
    entry = [m for m in moves if m.args[0].op == "placeholder"]
    assert [(m.args[0].target, m.args[1]) for m in entry] == [("x", "meta")]
    # the host constant is retargeted to the device, the CPU part's own moves are not
    (arange,) = [n for n in gm.graph.nodes if n.target is torch.arange]
    assert arange.kwargs["device"] == torch.device("meta")
    (job,) = [n for n in gm.graph.nodes if n.target is CPU_BEGIN]
    assert job.args[3] == "meta"  # the CPU job hands its result to the device ...
    assert all(getattr(gm, w.target).device.type == "cpu" for w in job.args[1])  # ... its weights stay home
    # device copies of parameters are on the device
    assert gm.norm_weight__dev.device.type == "meta" and gm.pos__dev.device.type == "meta"
    # output_device="input": the result goes back to the host
    out = gm.graph.output_node().args[0]
    assert out.target is to_device and out.args[1] == "cpu"


class Head(nn.Module):
    """A decoder's end: a hidden state (returned too, like a KV cache) and the logits of the last Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.lm_head(h), h * 2


def test_the_last_linears_output_goes_back_whatever_its_split():
    """output_device="auto": what the last Linear computes (the logits) goes back to the caller, the rest is
    parked on the device, at any α of that Linear. Streamed (α = 0), its last node is the staging slot's
    release, which nothing reads; that release taken for the Linear parked the logits (a host stand-in never
    written: wrong tokens on CUDA after a residency change that streamed an LM's head)."""
    for alpha in (0.0, 0.5, 1.0):
        gm = capture_fx(Head())
        _run(gm, device="meta", example_inputs=[torch.randn(3, 32)], alpha=alpha, gpu_memory=9000,
             prefetch=1, activation_reserve=0, output_device="auto")  # fmt: skip
        plan = gm.meta[meta.PLAN]
        head = next(lp for lp in plan.layers if lp.name == "lm_head.weight")
        assert not head.resident and head.split == round(alpha * 64), (alpha, head)
        logits, hidden = gm.graph.output_node().args[0]
        assert logits.target is to_device and logits.args[1] == "cpu", (alpha, logits.target)
        assert hidden.target is park, alpha


class Counts(nn.Module):
    """Changes two of its inputs in place (one through a view) and returns nothing computed from them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, count, cache):
        count.add_(1)
        cache.view(-1).narrow(0, 0, 4).copy_(x[0, :4])
        return self.fc(x)


def _counts_inputs():
    return [torch.randn(2, 8), torch.zeros((), dtype=torch.int64), torch.zeros(2, 4)]


def test_inputs_changed_in_place_are_written_back_from_the_device():
    gm = capture_fx(Counts())
    _run(gm, device="meta", example_inputs=_counts_inputs())
    (back,) = [n for n in gm.graph.nodes if n.target is write_back]  # one call for all: one copy over
    hosts, moved = back.args[:2]
    assert [h.target for h in hosts] == ["count", "cache"]  # x is only read
    assert all(m.target is to_device and m.args[0] is h for h, m in zip(hosts, moved, strict=True))
    (add,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_"]
    (copy,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_"]
    assert back.args[2:] == (add, copy)  # after the changes (the cache's through two views)
    nodes = list(gm.graph.nodes)
    assert all(nodes.index(back) > nodes.index(w) for w in back.args[2:])


def test_inputs_changed_in_place_on_the_emulated_device():
    """Inputs already on the device are changed in place by the graph itself: no write-back."""
    model = Counts()
    gm = capture_fx(model)
    _run(gm, example_inputs=_counts_inputs())
    assert not [n for n in gm.graph.nodes if n.target is write_back]
    x, count, cache = _counts_inputs()
    x.normal_()
    for i in range(1, 3):
        torch.testing.assert_close(gm(x, count, cache), model(x, torch.zeros(()), torch.zeros(2, 4)))
        assert count.item() == i and torch.equal(cache.view(-1)[:4], x[0, :4])


class Counter(nn.Module):
    """HF's StaticLayer in miniature: its lazy initialisation moves the length counter "to the device it is
    on" (the host, at capture), keeps the result as its state, and the update adds to it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, count):
        kept = count.to(torch.device("cpu"))  # the same tensor, in eager
        cast = count.to(torch.float32)  # a new tensor: not the input
        copied = count.to(torch.device("cpu"), copy=True)  # a copy: not the input either
        count.add_(1)
        return self.fc(x), kept, cast, copied


class Spellings(nn.Module):
    """Other spellings of the same no-op move, and near misses that are real copies or casts."""

    def forward(self, count):
        same = [
            count.to(torch.device("cpu"), torch.int64),  # the input's own dtype too
            count.to(torch.device("cpu"), non_blocking=True, copy=False),
            count.to(torch.int64),  # the dtype alone
            count.to(torch.device("cpu")).to(torch.device("cpu")),  # twice
        ]
        other = [
            count.to(torch.device("cpu"), torch.float32),  # a cast
            count.to(torch.device("cpu"), torch.int64, False, True),  # copy=True, by position
            count.to(torch.device("cpu"), copy=True),
            count + 0,
        ]
        count.add_(1)
        return (*same, *other)


def test_spellings_of_a_no_op_move_all_go_back_as_the_input():
    gm = capture_fx(Spellings())
    (count,) = gm.graph.find_nodes(op="placeholder")
    count.meta["val"] = torch.zeros((), dtype=torch.int64)  # as dynamo records it: the dtype is known
    _run(gm, device="meta", example_inputs=[torch.zeros((), dtype=torch.int64)], output_device="auto")
    outs = _outputs(gm)
    assert [o.op == "placeholder" for o in outs] == [True] * 4 + [False] * 4
    # the function form, as a graph may record it
    graph = fx.Graph()
    count = graph.placeholder("count")
    graph.output((graph.call_function(torch.Tensor.to, (count, torch.device("cpu"))),))
    gm = fx.GraphModule(nn.Module(), graph)
    _run(gm, device="meta", example_inputs=[torch.zeros((), dtype=torch.int64)], output_device="auto")
    assert _outputs(gm)[0].op == "placeholder"


def _outputs(gm) -> tuple:
    return gm.graph.output_node().args[0]


def test_an_output_that_is_an_input_goes_back_as_the_callers_tensor():
    """Parked, the counter would come back as a host stand-in whose bytes are never written; HF builds the
    decode mask from it on the host, and read garbage there (the CPU-only first-decode-step bug)."""
    for mode in ("auto", "input"):
        gm = capture_fx(Counter())
        _run(
            gm,
            device="meta",
            example_inputs=[torch.randn(2, 8), torch.zeros((), dtype=torch.int64)],
            output_device=mode,
        )
        logits, kept, cast, copied = _outputs(gm)
        assert kept.op == "placeholder" and kept.target == "count", mode
        assert [[h.target for h in n.args[0]] for n in gm.graph.nodes if n.target is write_back] == [
            ["count"]
        ]
        assert logits.target is to_device
        for other in (cast, copied):  # made from the input, not the input: moved back or parked
            assert other.op == "call_function" and other.target in (to_device, park), mode


def test_an_input_returned_as_itself_runs_like_eager():
    """On the emulated device nothing moves and the graph runs as eager does: the caller's own counter comes
    back, advanced (the structure test above covers the accelerator)."""
    model = Counter()
    gm = capture_fx(model)
    count = torch.zeros((), dtype=torch.int64)
    _run(gm, example_inputs=[torch.randn(2, 8), count.clone()])
    x = torch.randn(2, 8)
    out = gm(x, count)
    torch.testing.assert_close(out[0], model.fc(x))
    assert out[1] is count and count.item() == 1


def test_output_stays_on_the_accelerator_when_asked():
    gm = capture_fx(Block())
    _run(gm, device="meta", example_inputs=[torch.randn(3, 32), 2], output_device="accelerator")
    out = gm.graph.output_node().args[0]
    assert out.target is not to_device


def test_output_goes_back_even_without_shapes(mlp):
    """fx graphs compiled without example inputs have no shapes: outputs must still follow the inputs."""
    gm = capture_fx(mlp())
    _run(gm, device="meta")
    out = gm.graph.output_node().args[0]
    assert out.target is to_device
    # on "cpu" the same rewrite runs and returns on the input's device
    model = mlp()
    gm = capture_fx(model)
    _run(gm, device="cpu")
    x = torch.randn(3, 32)
    torch.testing.assert_close(gm(x), model(x))


def test_no_parameters_no_inputs_unchanged():
    class Const(nn.Module):
        def forward(self, x):
            return 3

    gm = capture_fx(Const())
    code = gm.code
    res, _ = _run(gm)
    assert res.modified is False and gm.code == code


class Embed(nn.Module):
    """A token embedding, a norm and an LM head, untied (``tied``: the head reads the embedding table)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def _lookups(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is embed_on_host]


def test_embedding_table_stays_on_the_host(count):
    model = Embed().eval()
    gm = capture_fx(model)
    assert count(gm, F.embedding) == 1
    ids = torch.randint(0, 50, (2, 7))
    _, store = _run(gm, example_inputs=[ids], host_embeddings=True)
    plan = gm.meta[meta.PLAN]
    assert plan.host_tables == ["emb.weight"]
    assert plan.reserved["other_params"] == 2 * 16 * 4  # the norm only
    assert count(gm, F.embedding) == 0
    (lookup,) = _lookups(gm)
    table, idx = lookup.args[1], lookup.args[0]
    assert table.op == "get_attr" and gm.get_parameter(table.target) is model.emb.weight  # the host table
    assert idx.op == "placeholder"  # the caller's host indices, not a copy moved to the device
    assert lookup.meta[meta.SIDE] == "host"
    assert "emb_weight__dev" not in {n.target for n in gm.graph.find_nodes(op="get_attr")}
    assert not [m for m in _moves(gm) if m.args[0] is idx]  # nothing else reads them: no copy is made
    fresh = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(gm(fresh), model(fresh))


def test_embedding_table_on_the_accelerator_structure():
    gm = capture_fx(Embed())
    _run(
        gm,
        device="meta",
        example_inputs=[torch.randint(0, 50, (1, 3))],
        gpu_memory=10_000,
        host_embeddings=True,
    )
    (lookup,) = _lookups(gm)
    assert lookup.args[2] == "meta" and lookup.args[0].op == "placeholder"
    # no input is moved: the lookup was the indices' only reader
    assert not [m for m in _moves(gm) if m.args[0].op == "placeholder"]


def test_a_table_tied_to_the_lm_head_is_looked_up_on_the_host_once_counted(count, dynamo_capture):
    """The head's placement covers the shared table's bytes: it is not an "other parameter" as well."""
    model = Embed(tied=True).eval()
    ids = torch.randint(0, 50, (2, 3))
    gm, example_inputs = dynamo_capture(model, ids)
    (table,) = [n for n in gm.graph.find_nodes(op="placeholder") if param_of(n) and len(n.users) == 2]
    assert len(table.users) == 2 and param_of(table).tensor.shape == (50, 16)  # the lookup and lm_head
    _run(gm, example_inputs=example_inputs, host_embeddings=True)
    plan = gm.meta[meta.PLAN]
    (name,) = plan.host_tables
    assert plan.layer(name) is not None  # the same weight is lm_head's
    assert plan.reserved["other_params"] == 2 * 16 * 4  # the norm only
    (lookup,) = _lookups(gm)
    assert lookup.args[1] is table and list(table.users) == [lookup]
    args = [torch.randint(0, 50, (2, 3)) if a is ids else a for a in example_inputs]
    fresh = next(a for a in args if a.dtype == torch.int64)
    torch.testing.assert_close(gm(*args)[0], model(fresh))


def test_embedding_tables_stay_on_the_device_when_asked(count):
    gm = capture_fx(Embed())
    _run(gm, example_inputs=[torch.randint(0, 50, (2, 3))], host_embeddings=False)
    plan = gm.meta[meta.PLAN]
    assert plan.host_tables == [] and not _lookups(gm) and count(gm, F.embedding) == 1
    assert plan.reserved["other_params"] == (50 * 16 + 2 * 16) * 4
    assert "emb_weight__dev" in {n.target for n in gm.graph.find_nodes(op="get_attr")}


class WideTable(nn.Module):
    """A token table (400 x 16) larger than the head (16 -> 8) and the head's staging when offloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(400, 16)
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_auto_keeps_the_tables_on_the_device_only_where_every_linear_fits_beside_them(count):
    """``host_embeddings="auto"`` (the default): the token table goes to the device where the budget holds it
    beside every Linear resident and the reserves; where it does not, it stays on the host and its bytes are
    left to the weights. "meta" stands for the device."""
    ids = torch.randint(0, 400, (2, 3))
    gm = capture_fx(WideTable())
    _run(gm, device="meta", example_inputs=[ids])  # no budget: everything fits
    ledger, _ = gm.meta[meta.LEDGER]
    table = 400 * 16 * 4
    everything = ledger.total({"head.weight": True})  # with the table on the device
    least = max(everything - table, ledger.minimum() - table)  # with it on the host
    assert gm.meta[meta.PLAN].host_tables == [] and not ledger.host_tables and least < everything
    for budget, on_host in [(everything, False), ((least + everything) // 2, True)]:
        gm = capture_fx(WideTable())
        _run(gm, device="meta", example_inputs=[ids], gpu_memory=budget)
        plan = gm.meta[meta.PLAN]
        assert plan.host_tables == (["emb.weight"] if on_host else []), budget
        assert len(_lookups(gm)) == on_host and count(gm, F.embedding) == (not on_host)
        assert plan.reserved["other_params"] == (0 if on_host else table)
        assert plan.layer("head.weight").resident  # the table never takes a weight's place


def test_auto_keeps_a_table_tied_to_the_lm_head_on_the_host(dynamo_capture):
    """With room for everything, a table tied to ``lm_head`` still stays on the host (on the device its lookup
    would read the head's copy, which a later demotion would leave there uncounted), reserved nowhere twice."""
    model = Embed(tied=True).eval()
    ids = torch.randint(0, 50, (2, 3))
    gm, example_inputs = dynamo_capture(model, ids)
    _run(gm, example_inputs=example_inputs)
    plan = gm.meta[meta.PLAN]
    (name,) = plan.host_tables
    assert plan.layer(name).resident and len(_lookups(gm)) == 1
    assert plan.reserved["other_params"] == 2 * 16 * 4  # the norm only
    args = [torch.randint(0, 50, (2, 3)) if a is ids else a for a in example_inputs]
    fresh = next(a for a in args if a.dtype == torch.int64)
    torch.testing.assert_close(gm(*args)[0], model(fresh))


def test_a_given_plan_keeps_its_tables_on_the_device_when_asked(count):
    """A plan saved with its token table on the host, applied with ``host_embeddings=False``: the lookup stays
    on the device and the table is reserved there (the plan's reserve left it out)."""
    gm = capture_fx(Embed())
    _run(gm, example_inputs=[torch.randint(0, 50, (2, 3))], host_embeddings=True)
    saved = gm.meta[meta.PLAN]
    assert saved.host_tables == ["emb.weight"] and saved.reserved["other_params"] == 2 * 16 * 4
    gm2 = capture_fx(Embed())
    _run(gm2, example_inputs=[torch.randint(0, 50, (2, 3))], plan=saved, host_embeddings=False)
    plan = gm2.meta[meta.PLAN]
    assert plan.source == "plan"
    assert plan.host_tables == [] and not _lookups(gm2) and count(gm2, F.embedding) == 1
    assert plan.reserved["other_params"] == (50 * 16 + 2 * 16) * 4
    gm3 = capture_fx(Embed())
    _run(gm3, example_inputs=[torch.randint(0, 50, (2, 3))], plan=saved)  # by default the plan's choice holds
    assert gm3.meta[meta.PLAN].host_tables == ["emb.weight"] and len(_lookups(gm3)) == 1


def test_embedding_lookups_of_export_graphs_run_on_the_host(count):
    model = Embed().eval()
    ids = torch.randint(0, 50, (2, 5))
    gm = capture_export(model, (ids,))
    assert count(gm, torch.ops.aten.embedding.default) == 1
    _run(gm, example_inputs=[ids], host_embeddings=True)
    assert gm.meta[meta.PLAN].host_tables == ["emb.weight"]
    assert count(gm, torch.ops.aten.embedding.default) == 0 and len(_lookups(gm)) == 1
    fresh = torch.randint(0, 50, (2, 5))
    out = gm(fresh)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(fresh))


def test_embed_on_host_reads_indices_back_and_keeps_host_results_on_the_host():
    table = torch.randn(20, 4)
    ids = torch.tensor([[3, 0, 19]])
    torch.testing.assert_close(embed_on_host(ids, table, "cpu"), table[ids])


class Gpt2Like(nn.Module):
    """Views its ids before the token lookup, and looks positions up from indices it computes itself."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.wpe = nn.Embedding(12, 16)
        self.head = nn.Linear(16, 50, bias=False)

    def forward(self, ids):
        ids = ids.view(-1, ids.shape[-1])
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return self.head(self.wte(ids) + self.wpe(pos))


def test_viewed_token_ids_are_looked_up_on_the_host_and_computed_positions_on_the_device(count):
    model = Gpt2Like().eval()
    gm = capture_fx(model)
    _run(
        gm,
        device="meta",
        example_inputs=[torch.randint(0, 50, (2, 5))],
        gpu_memory=20_000,
        host_embeddings=True,
    )
    assert gm.meta[meta.PLAN].host_tables == ["wte.weight"]  # wpe's indices are made in the graph
    (lookup,) = _lookups(gm)
    view = lookup.args[0]
    assert view.target == "view" and view.args[0].op == "placeholder"  # the view runs on the host ...
    assert view.meta[meta.SIDE] == "host"
    (pos,) = [n for n in gm.graph.nodes if n.target is F.embedding]
    assert pos.args[1].target == "wpe_weight__dev"  # ... wpe on the device
    # the device copy of the ids still feeds the shape the positions are computed from
    assert [m.args[0].target for m in _moves(gm) if m.args[0].op == "placeholder"] == ["ids"]
    gm = capture_fx(model)
    _run(gm, example_inputs=[torch.randint(0, 50, (2, 5))])
    fresh = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(gm(fresh), model(fresh))


def test_host_lookup_reads_the_tensor_behind_a_stand_in(monkeypatch):
    """Ids the previous graph of a graph break returned as a parked stand-in: the lookup must read the
    device tensor behind it (the stand-in's own memory is never written)."""
    import hetegen_fx.runtime as runtime

    table = torch.randn(20, 4)
    stand_in, real = torch.empty(1, 3, dtype=torch.int64), torch.tensor([[4, 0, 19]])
    monkeypatch.setattr(runtime, "unpark", lambda x: real if x is stand_in else None)
    torch.testing.assert_close(runtime.embed_on_host(stand_in, table, "cpu"), table[real])


def test_a_table_on_a_device_is_not_looked_up_on_the_host():
    model = Embed()
    model.emb.to("meta")  # e.g. placed there by the caller
    gm = capture_fx(model)
    assert host_tables(gm.graph) == {}
    assert list(host_tables(capture_fx(Embed()).graph)) == ["emb.weight"]
