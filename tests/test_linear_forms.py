"""Linears written as a matmul with a transposed weight (``x @ W.T``, ``matmul(x, W.t())``, ...), as custom
Linear classes of some architectures do: recognised by every frontend, split like nn.Linear, and the budget
no longer counts their weights as parameters that must stay resident."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hetegen_fx
from hetegen_fx.capture import capture_export, capture_fx
from hetegen_fx.linear import find_linears


class TLinear(nn.Module):
    """A Linear that keeps W as [out, in] and multiplies by its transpose, written one of several ways."""

    def __init__(self, fin: int, fout: int, form: str, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / fin**0.5)
        self.bias = nn.Parameter(torch.randn(fout) * 0.1) if bias else None
        self.form = form

    def forward(self, x):
        w = self.weight
        if self.form == "T":
            y = x @ w.T
        elif self.form == "t":
            y = torch.matmul(x, w.t())
        elif self.form == "transpose":
            y = x @ w.transpose(0, 1)
        elif self.form == "permute":
            y = torch.matmul(x, w.permute(1, 0))
        else:
            y = x @ torch.t(w)
        return y if self.bias is None else y + self.bias


FORMS = ["T", "t", "transpose", "permute", "torch.t"]


class Block(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(48)
        self.up = TLinear(48, 96, form)
        self.down = TLinear(96, 48, form, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def _nbytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


@pytest.mark.parametrize("form", FORMS)
def test_transposed_matmul_is_found_by_fx_and_export(form):
    model = Block(form).eval()
    x = torch.randn(2, 5, 48)
    for gm in (capture_fx(model), capture_export(model, (x,))):
        sites = find_linears(gm)
        assert [s.name for s in sites] == ["up.weight", "down.weight"], gm.graph
        assert all(s.layout == "out_in" and s.form == "matmul_t" for s in sites)
        assert sites[0].bias is not None and sites[0].bias.name == "up.bias" and sites[1].bias is None
        assert (sites[0].out_features, sites[0].in_features) == (96, 48)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_transposed_matmul_splits_and_matches_eager(form, alpha):
    model = Block(form).eval()
    compiled = hetegen_fx.compile(
        model, gpu_memory="20KiB", device="cpu", profile="model", alpha=alpha, prefetch=1
    )
    plan = compiled.plan
    assert [lp.name for lp in plan.layers] == ["up.weight", "down.weight"]
    assert any(not lp.resident for lp in plan.layers)  # the budget cannot hold both weights
    assert plan.reserved["other_params"] == 2 * 48 * 4  # the norm only: the Linears' weights are theirs
    code = compiled.code
    assert "matmul" not in code and ".t()" not in code and "permute" not in code  # rewritten, transpose gone
    for shape in ((3, 48), (2, 7, 48)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_transposed_matmul_through_the_backend():
    model = Block("T").eval()
    fn = torch.compile(
        model,
        backend="hetegen",
        options={"device": "cpu", "gpu_memory": "24KiB", "prefetch": 1, "activation_reserve": 0},
    )
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), rtol=1e-5, atol=1e-5)
    plan = hetegen_fx.explain(model).plans[-1]
    assert {lp.name for lp in plan.layers} == {"up.weight", "down.weight"}
    assert not any(lp.resident for lp in plan.layers)


def test_a_transpose_read_twice_is_kept_for_its_other_reader():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32, 16))

        def forward(self, x):
            wt = self.weight.t()
            return x @ wt, wt.sum(0)

    model = Twice().eval()
    compiled = hetegen_fx.compile(
        model, gpu_memory="4KiB", device="cpu", profile="model", alpha=0.5, prefetch=1
    )
    assert compiled.plan.reserved["other_params"] == 32 * 16 * 4  # W is also read on the device
    x = torch.randn(3, 16)
    for got, want in zip(compiled(x), model(x), strict=True):
        torch.testing.assert_close(got, want)
