"""hetegen_fx.testing: op counts with readable names, fresh inputs, and check_pass on the project's own passes
(PartitionPass, SchedulePass) and on a user-written pass, including each way it fails."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import hetegen_fx.testing as testing
from hetegen_fx.capture import capture_fx
from hetegen_fx.config import Config
from hetegen_fx.linear import find_linears
from hetegen_fx.passes import PartitionPass, PlacementPass, ProfilePass, SchedulePass
from hetegen_fx.passes.placement import split_row
from hetegen_fx.plan import LayerPlan, Plan
from hetegen_fx.store import WeightStore
from hetegen_fx.testing import check_pass, count_ops, fresh_inputs

CPU = torch.device("cpu")


def _placed(model: nn.Module, alpha: float, prefetch: int = 2):
    """``model`` captured, profiled and placed with every Linear offloaded at CPU share ``alpha``."""
    config = Config(device="cpu", profile="model", prefetch=prefetch)
    store = WeightStore(CPU)
    gm = capture_fx(model)
    layers = [
        LayerPlan(
            s.name,
            s.out_features,
            s.in_features,
            1,
            "float32",
            s.weight_bytes,
            False,
            alpha,
            split_row(alpha, s.out_features),
        )
        for s in find_linears(gm)
    ]
    ProfilePass(config, measure=False)(gm)
    PlacementPass(config, store, plan=Plan("cpu", None, 1, layers))(gm)
    return gm, config, store


def test_count_ops_names(mlp):
    gm = capture_fx(mlp())
    assert count_ops(gm) == {"linear": 3, "relu": 2}


def test_fresh_inputs_are_new_and_shaped_like_the_examples():
    x, ids, flag = torch.zeros(2, 3), torch.tensor([[1, 5, 9]]), torch.tensor([True, False])
    a, b = fresh_inputs((x, ids, flag, 7), seed=0), fresh_inputs((x, ids, flag, 7), seed=1)
    assert a[0].shape == x.shape and a[0].dtype == x.dtype and a[0].abs().sum() > 0  # never zeros
    assert a[1].dtype == ids.dtype and int(a[1].min()) >= 1 and int(a[1].max()) <= 9
    assert a[2].dtype == torch.bool and a[3] == 7
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    ("alpha", "after"),
    [
        (0.0, {"linear": 3, "hetegen.copy_h2d": 3, "hetegen.wait_copy": 3, "cat": 0}),
        (
            0.5,
            {"linear": 3, "hetegen.copy_h2d": 3, "hetegen.release_slot": 3, "cat": 3, "hetegen.cpu_begin": 3},
        ),
        (1.0, {"linear": 0, "hetegen.copy_h2d": 0, "cat": 0, "hetegen.cpu_begin": 3, "hetegen.cpu_end": 3}),
    ],
)
def test_partition_pass(mlp, alpha, after):
    gm, config, store = _placed(mlp(), alpha)
    report = check_pass(
        PartitionPass(config, store), gm, (torch.randn(4, 32),), before={"linear": 3}, after=after
    )
    assert report.modified is True
    assert not any(n.op == "call_module" for n in report.graph_module.graph.nodes)  # nn.Linear calls are gone


def test_partition_then_schedule_keeps_counts(mlp):
    gm, config, store = _placed(mlp(), 0.5)
    report = check_pass(
        [PartitionPass(config, store), SchedulePass()], gm, (torch.randn(2, 5, 32),), after={"cat": 3}, runs=3
    )
    assert report.runs == 3 and len(report.checked_inputs) == 3
    # SchedulePass reorders only: the same ops as after PartitionPass alone
    alone = check_pass(PartitionPass(config, store), gm, (torch.randn(2, 5, 32),))
    assert report.after == alone.after


def test_a_user_pass_in_five_lines():
    class LinearToMatmul:
        """Rewrite F.linear(x, w, b) as x @ w.T + b."""

        def __call__(self, gm: fx.GraphModule) -> None:
            for n in list(gm.graph.nodes):
                if n.op == "call_function" and n.target is F.linear:
                    x, w, b = n.args
                    with gm.graph.inserting_before(n):
                        y = gm.graph.call_function(torch.matmul, (x, gm.graph.call_method("t", (w,))))
                        y = gm.graph.call_function(torch.add, (y, b))
                    n.replace_all_uses_with(y)
                    gm.graph.erase_node(n)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.linear(x, self.w, self.b)

    report = check_pass(
        LinearToMatmul(), M(), (torch.randn(2, 8),), after={"linear": 0, "matmul": 1, "add": 1}
    )
    assert report.modified is None  # a plain callable reports nothing
    assert report.changed == {"add": (0, 1), "linear": (1, 0), "matmul": (0, 1), "t": (0, 1)}
    assert "linear 1→0" in str(report)


def test_the_original_is_not_modified(mlp):
    gm, config, store = _placed(mlp(), 0.5)
    code = gm.code
    check_pass(PartitionPass(config, store), gm, (torch.randn(4, 32),))
    assert gm.code == code and count_ops(gm) == {"linear": 3, "relu": 2}


# ---------------------------------------------------------------------------------------------------------------
# failures


def test_wrong_counts_fail_with_a_table(mlp):
    gm, config, store = _placed(mlp(), 0.5)
    with pytest.raises(
        AssertionError, match=r"after the pass: op counts differ\n.*op\s+expected\s+actual"
    ) as e:
        check_pass(PartitionPass(config, store), gm, (torch.randn(4, 32),), after={"linear": 6, "cat": 3})
    assert "linear" in str(e.value) and "cat" not in str(e.value).split("all counts")[0]
    with pytest.raises(AssertionError, match="before the pass"):
        check_pass(PartitionPass(config, store), gm, (torch.randn(4, 32),), before={"linear": 2})


def test_wrong_numerics_fail():
    def relu_to_tanh(gm):
        for n in gm.graph.nodes:
            if n.target is torch.relu:
                n.target = torch.tanh

    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    with pytest.raises(AssertionError, match=r"run 0 \(fresh inputs \[\(3, 4\)\]\): output 0 .* differs"):
        check_pass(relu_to_tanh, M(), (torch.randn(3, 4),))


def test_unreported_modification_fails(mlp):
    from torch.fx.passes.infra.pass_base import PassResult

    def sneaky(gm):
        for n in list(gm.graph.nodes):
            if n.target is torch.relu:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
        return PassResult(gm, False)

    with pytest.raises(
        AssertionError, match=r"changed op counts \{'relu': \(2, 0\)\} but returned modified=False"
    ):
        check_pass(sneaky, mlp(), (torch.randn(2, 32),), runs=0)


def test_docstring_example_runs():
    assert doctest.testmod(testing, raise_on_error=False).failed == 0
