"""The hetegen:: custom ops (copy_h2d → wait_copy → release_slot): behaviour on "cpu", survival through
dead-code elimination, torch.library.opcheck, and export / functionalization keeping them in order."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from hetegen_fx.ops import COPY, RELEASE, WAIT, is_op
from hetegen_fx.runtime import get_runtime

SLOT = 1 << 16  # a staging offset beyond the small arenas of the pipeline tests


def test_copy_wait_release_on_cpu():
    rt = get_runtime("cpu")
    src = torch.randn(16, 8)
    staged = torch.ops.hetegen.copy_h2d(src, SLOT, "cpu")
    assert torch.equal(staged, src)
    assert staged.data_ptr() != src.data_ptr()  # a real copy into the staging arena, never an alias
    assert staged.data_ptr() == rt._arena.data_ptr() + SLOT
    assert torch.ops.hetegen.wait_copy(staged, SLOT) is None
    assert torch.equal(staged, src)
    assert torch.ops.hetegen.release_slot(staged, SLOT) is None
    # the region is reused by the next copy: same memory, new contents
    src2 = torch.randn(16, 8)
    staged2 = torch.ops.hetegen.copy_h2d(src2, SLOT, "cpu")
    assert staged2.data_ptr() == staged.data_ptr() and torch.equal(staged2, src2)
    # a copy past the arena's end grows it; smaller ones fit, with their own shape and dtype
    big = torch.randn(64, 8)
    assert torch.equal(torch.ops.hetegen.copy_h2d(big, SLOT, "cpu"), big)
    assert rt.staging_bytes() >= SLOT + big.numel() * 4
    half = torch.randn(3, 5, dtype=torch.float16)
    out = torch.ops.hetegen.copy_h2d(half, SLOT, "cpu")
    assert out.dtype == torch.float16 and out.shape == (3, 5) and torch.equal(out, half)


def test_a_copy_with_a_tail_stages_both_parts_one_after_the_other():
    """A GPU part whose rows lie partly in RAM, partly in the storage ring: one region, ``src``'s rows then
    ``tail``'s; parts that cannot be one weight are refused."""
    rt = get_runtime("cpu")
    src, tail = torch.randn(5, 8), torch.randn(3, 8)
    staged = torch.ops.hetegen.copy_h2d(src, SLOT, "cpu", tail)
    assert staged.shape == (8, 8) and torch.equal(staged, torch.cat([src, tail]))
    assert staged.data_ptr() == rt._arena.data_ptr() + SLOT
    with pytest.raises(ValueError, match="two parts"):
        torch.ops.hetegen.copy_h2d(src, SLOT, "cpu", torch.randn(3, 4))


def test_packet_and_default_both_match():
    assert is_op(torch.ops.hetegen.copy_h2d, COPY) and is_op(torch.ops.hetegen.copy_h2d.default, COPY)
    assert not is_op(torch.ops.hetegen.wait_copy.default, COPY)
    assert is_op(torch.ops.hetegen.release_slot, RELEASE) and is_op(WAIT, WAIT)


def _split_graph(use_result: bool = True) -> fx.GraphModule:
    """x → copy(w) → wait → linear → release, built by hand; plus a dead add."""
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    staged = g.call_function(COPY, (w, SLOT, "cpu"))
    g.call_function(WAIT, (staged, SLOT))
    y = g.call_function(F.linear, (x, staged)) if use_result else x
    g.call_function(RELEASE, (staged, SLOT))
    g.call_function(operator.add, (x, x))  # dead, and pure: must go
    g.output(y)
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("use_result", [True, False])
def test_ops_survive_dead_code_elimination(use_result):
    gm = _split_graph(use_result)
    changed = gm.graph.eliminate_dead_code()
    assert changed  # the dead add went ...
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert operator.add not in targets
    # ... but copy, wait and release stay, in order, even when nothing reads the staged weight
    expected = [COPY, WAIT, F.linear, RELEASE] if use_result else [COPY, WAIT, RELEASE]
    assert targets == expected
    gm.recompile()
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    out = gm(x, w)
    torch.testing.assert_close(out, F.linear(x, w) if use_result else x)


@pytest.mark.parametrize(
    ("op", "make_args"),
    [
        # offset 0: the op returns a view of the staging arena at byte offset `slot`, which its fake kernel
        # (a fresh tensor) cannot reproduce as a storage offset
        (COPY, lambda: (torch.randn(4, 3), 0, "cpu")),
        (COPY, lambda: (torch.randn(4, 3), 0, "cpu", torch.randn(2, 3))),
        (WAIT, lambda: (torch.randn(4, 3), SLOT)),
        (RELEASE, lambda: (torch.randn(4, 3), SLOT)),
    ],
)
def test_opcheck(op, make_args):
    result = torch.library.opcheck(op, make_args())
    assert all(v == "SUCCESS" for v in result.values()), result
    assert {"test_schema", "test_faketensor"} <= set(result)


def test_fake_copy_is_on_the_target_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        src = mode.from_tensor(torch.randn(4, 3))
        out = torch.ops.hetegen.copy_h2d(src, SLOT, "meta")
    assert out.device.type == "meta" and out.shape == (4, 3)


class UsesOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 4))

    def forward(self, x):
        staged = torch.ops.hetegen.copy_h2d(self.w, SLOT, "cpu")
        torch.ops.hetegen.wait_copy(staged, SLOT)
        y = F.linear(x, staged)
        torch.ops.hetegen.release_slot(staged, SLOT)
        return torch.relu(y)


def _positions(gm: fx.GraphModule) -> dict[str, int]:
    pos = {}
    for i, n in enumerate(gm.graph.nodes):
        target = n.target
        if n.op == "call_function" and target in (
            torch.ops.higher_order.auto_functionalized,
            torch.ops.higher_order.auto_functionalized_v2,
        ):
            target = n.args[0]  # the op a functionalized node stands for
        for name, op in (("copy", COPY), ("wait", WAIT), ("release", RELEASE)):
            if n.op == "call_function" and is_op(target, op):
                pos[name] = i
        if n.op == "call_function" and target in (torch.ops.aten.linear.default, torch.ops.aten.mm.default):
            pos["matmul"] = i
    return pos


def test_export_keeps_the_ops_in_order():
    model = UsesOps()
    x = torch.randn(3, 4)
    ep = torch.export.export(model, (x,))
    pos = _positions(ep.graph_module)
    assert pos["copy"] < pos["wait"] < pos["matmul"] < pos["release"]
    torch.testing.assert_close(ep.module()(x), model(x))


def test_functionalization_keeps_the_ops_in_order():
    """run_decompositions functionalizes the graph: the mutating wait/release become auto_functionalized
    nodes whose results nobody reads; they must not be dropped as dead code."""
    model = UsesOps()
    x = torch.randn(3, 4)
    ep = torch.export.export(model, (x,)).run_decompositions()
    pos = _positions(ep.graph_module)
    assert set(pos) == {"copy", "wait", "matmul", "release"}
    assert pos["copy"] < pos["wait"] < pos["matmul"] < pos["release"]
    torch.testing.assert_close(ep.module()(x), model(x))


def test_direct_runs_the_same_program_without_the_dispatcher(mlp):
    """launch.direct: the executed twin calls the ops' plain functions; the graph with the ops stays
    the one to inspect and export, and the twin shares its weights."""
    import hetegen_fx
    from hetegen_fx.launch import direct

    model = mlp()
    c = hetegen_fx.compile(model, device="cpu", gpu_memory=8000, alpha=0.5, prefetch=1, activation_reserve=0)
    fast = direct(c.graph_module)
    assert "torch.ops.hetegen" in c.graph_module.code and "torch.ops.hetegen" not in fast.code
    assert "run_cpu_begin" in fast.code and "run_copy_h2d" in fast.code
    names = {n for n, _ in c.graph_module.named_buffers()}
    assert names and all(
        getattr(fast, n).data_ptr() == getattr(c.graph_module, n).data_ptr()
        for n in names
        if hasattr(fast, n)
    )
    x = torch.randn(3, 32)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
