"""hetegen_fx.plot (the predicted timeline, plot_plan, draw_layer), Explanation.plan, and `hetegen plan`."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

import hetegen_fx
from hetegen_fx import meta
from hetegen_fx.cli import main
from hetegen_fx.errors import HetegenError
from hetegen_fx.plan import LayerPlan, Plan
from hetegen_fx.plot import Span, draw_layer, layer_names, plot_plan, predict_timeline


def _lp(name, *, resident=False, split=0, out=4, t_cpu=0.0, t_copy=0.0, t_gpu=0.0, slot=-1):
    return LayerPlan(
        name, out, 8, 1, "float32", out * 8 * 4, resident, split / out, split, t_cpu, t_copy, t_gpu, slot
    )


def _plan(*layers) -> Plan:
    return Plan("cpu", 1 << 20, 1, list(layers), label="test")


# --------------------------------------------------------------------------------------------------------------
# predict_timeline


def test_streamed_layers_wait_for_their_slot():
    a, b = (_lp(n, t_copy=1.0, t_gpu=1.0) for n in "ab")
    # one staging slot: b's copy waits until a's GPU part has released it
    assert predict_timeline(_plan(a, b), prefetch=1) == [
        Span("PCIe", "a", 0.0, 1.0),
        Span("GPU", "a", 1.0, 2.0),
        Span("PCIe", "b", 2.0, 3.0),
        Span("GPU", "b", 3.0, 4.0),
    ]
    # two slots: b's copy runs right after a's, during a's GPU part
    two = predict_timeline(_plan(a, b), prefetch=2)
    assert two[2] == Span("PCIe", "b", 1.0, 2.0) and two[3] == Span("GPU", "b", 2.0, 3.0)


def test_split_layer_then_resident():
    split = _lp("s", split=2, t_cpu=2.0, t_copy=2.0, t_gpu=2.0)  # α = 0.5: each part takes half
    res = _lp("r", resident=True, t_gpu=1.0, t_cpu=9.0, t_copy=9.0)
    spans = predict_timeline(_plan(split, res), prefetch=2)
    assert sorted(spans, key=lambda s: (s.start, s.lane)) == [
        Span("CPU", "s", 0.0, 1.0),
        Span("PCIe", "s", 0.0, 1.0),
        Span("GPU", "s", 1.0, 2.0),
        Span("GPU", "r", 2.0, 3.0),  # resident: t_gpu on the GPU lane, after the split layer's output
    ]


def test_cpu_parts_run_in_order_and_wait_for_their_input():
    a = _lp("a", split=4, t_cpu=1.0)  # α = 1: CPU only, no copy
    b = _lp("b", split=4, t_cpu=2.0)
    assert predict_timeline(_plan(a, b)) == [Span("CPU", "a", 0.0, 1.0), Span("CPU", "b", 1.0, 3.0)]


def test_an_mlp_block_runs_its_cpu_and_gpu_parts_without_a_join_between():
    """Gate/up and down as one block at α = 0.5: down's CPU part follows gate/up's on the CPU lane at once,
    without waiting for their slower GPU parts; the block's output waits for both lanes."""
    gate, up = (_lp(n, split=2, t_cpu=2.0, t_copy=4.0, t_gpu=2.0) for n in ("gate", "up"))
    down = _lp("down", split=4, t_cpu=2.0, t_copy=4.0, t_gpu=2.0)  # 8 input features, 4 on the CPU
    for lp in (gate, up, down):
        lp.block = "gate"
    down.split_inputs = True
    after = _lp("after", resident=True, t_gpu=1.0)
    spans = predict_timeline(_plan(gate, up, down, after), prefetch=3)
    cpu = [s for s in spans if s.lane == "CPU"]
    assert [(s.name, s.start, s.end) for s in cpu] == [
        ("gate", 0.0, 1.0),
        ("up", 1.0, 2.0),
        ("down", 2.0, 3.0),
    ]
    gpu = [s for s in spans if s.lane == "GPU"]
    assert [s.name for s in gpu] == ["gate", "up", "down", "after"]
    assert gpu[-1].start == max(cpu[-1].end, gpu[-2].end)  # the block's output joins both lanes
    apart = predict_timeline(
        _plan(*(_lp(n, split=2, t_cpu=2.0, t_copy=4.0, t_gpu=2.0) for n in ("g", "u", "d"))), prefetch=3
    )
    assert [s.start for s in apart if s.lane == "CPU"][1] > 1.0  # without the block each waits for the join


def test_plan_slots_are_used_unless_prefetch_is_given():
    layers = [_lp(n, t_copy=1.0, t_gpu=1.0, slot=0) for n in "abc"]  # as PartitionPass with prefetch=1
    own = predict_timeline(_plan(*layers))
    assert [s.start for s in own if s.lane == "PCIe"] == [0.0, 2.0, 4.0]
    three = predict_timeline(_plan(*layers), prefetch=3)
    assert [s.start for s in three if s.lane == "PCIe"] == [0.0, 1.0, 2.0]
    assert max(s.end for s in three) == 4.0


def test_timeline_is_never_faster_than_each_lane():
    layers = [_lp(f"l{i}", split=i % 4, t_cpu=1.0 + i, t_copy=0.5, t_gpu=0.25, slot=i % 2) for i in range(8)]
    spans = predict_timeline(_plan(*layers))
    for lane in ("PCIe", "CPU", "GPU"):
        mine = sorted((s for s in spans if s.lane == lane), key=lambda s: s.start)
        assert all(x.end <= y.start + 1e-12 for x, y in zip(mine, mine[1:], strict=False))  # one at a time
    assert max(s.end for s in spans) >= max(lp.t_pred for lp in layers)


# --------------------------------------------------------------------------------------------------------------
# plot_plan


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_plan_writes_the_format_of_the_extension(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    plan = _plan(
        _lp("model.layers.0.q_proj.weight", resident=True, t_gpu=1e-4),
        _lp("model.layers.0.up_proj.weight", split=1, t_cpu=4e-4, t_copy=2e-4, t_gpu=1e-4, slot=0),
    )
    out = plot_plan(plan, tmp_path / f"plan.{suffix}")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data[:2000]


def test_plot_plan_errors(tmp_path, monkeypatch):
    plan = _plan(_lp("a", t_copy=1.0))
    with pytest.raises(HetegenError, match=r"\.png or \.svg"):
        plot_plan(plan, tmp_path / "plan.jpg")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(HetegenError, match="pip install matplotlib"):
        plot_plan(plan, tmp_path / "plan.png")


# --------------------------------------------------------------------------------------------------------------
# draw_layer, Explanation


@pytest.fixture(scope="module")
def compiled_mlp():
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    ).eval()
    compiled = hetegen_fx.compile(model, device="cpu", gpu_memory="1.5MiB", alpha=0.5)
    return compiled


def test_explanation_plan_and_repr(compiled_mlp):
    ex = hetegen_fx.explain(compiled_mlp)
    assert ex.plan is compiled_mlp.plan and ex.graph_module is compiled_mlp.graph_module
    assert "Explanation(1 graph(s)" in repr(ex) and "offloaded" in repr(ex)
    html = ex._repr_html_()
    assert "<pre>" in html and "generated code" in html
    with pytest.raises(hetegen_fx.ConfigError, match="run the model once"):
        _ = hetegen_fx.Explanation([], [], []).plan


def test_draw_layer_dot(compiled_mlp, tmp_path):
    pytest.importorskip("pydot")
    gm = compiled_mlp.graph_module
    assert layer_names(gm) == ["0.weight", "2.weight"]
    offloaded = next(lp.name for lp in compiled_mlp.plan.layers if not lp.resident)
    text = draw_layer(gm, offloaded, tmp_path / "layer.dot").read_text()
    sides = {n.meta.get(meta.SIDE) for n in gm.graph.nodes if n.meta.get(meta.LAYER) == offloaded}
    assert {"cpu", "gpu", "copy", "sync", "move"} <= sides
    for color in ("#4C72B0", "#55A868", "#DD8452", "#C44E52", "#8172B3"):
        assert color in text
    assert "dashed" in text  # the direct inputs / users around the layer
    with pytest.raises(HetegenError, match="is not a Linear of this graph"):
        draw_layer(gm, "nope", tmp_path / "x.dot")


def test_draw_layer_png_with_graphviz(compiled_mlp, tmp_path):
    pytest.importorskip("pydot")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot program is not installed")
    out = draw_layer(compiled_mlp.graph_module, "2", tmp_path / "layer.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_draw_layer_says_what_to_install(compiled_mlp, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydot", None)  # import pydot → ImportError
    with pytest.raises(HetegenError, match=r"pip install pydot.*apt-get install graphviz"):
        draw_layer(compiled_mlp.graph_module, "0.weight", tmp_path / "layer.png")
    monkeypatch.delitem(sys.modules, "pydot")
    pytest.importorskip("pydot")
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(HetegenError, match="apt-get install graphviz"):
        draw_layer(compiled_mlp.graph_module, "0.weight", tmp_path / "layer.png")


# --------------------------------------------------------------------------------------------------------------
# hetegen plan


def test_cli_plan(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["plan", "--model", "tiny-llama", "--device", "cpu", "--gpu-memory", "420KiB"]
    argv += ["--out", str(tmp_path / "plan.json"), "--png", str(tmp_path / "plan.png")]
    dot = tmp_path / "layer.dot"
    try:
        import pydot  # noqa: F401

        argv += ["--draw-layer", "layers.0.mlp.down_proj", "--draw-out", str(dot)]
    except ImportError:
        dot = None
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "at 1 token(s) on cpu" in out and "offload" in out and "resident" in out
    plan = hetegen_fx.load_plan(tmp_path / "plan.json")
    assert plan.tokens == 1 and any(not lp.resident for lp in plan.layers)
    assert json.loads((tmp_path / "plan.json").read_text())["tokens"] == 1
    assert (tmp_path / "plan.png").read_bytes().startswith(b"\x89PNG")
    if dot is not None:
        assert "down_proj" in dot.read_text()
    # a graph that was not compiled is a one-line error
    assert main([*argv[:7], "--tokens", "3"]) == 2
    assert "no graph was compiled for 3 token(s)" in capsys.readouterr().err
    # a job overhead of a second outweighs every GEMV of this model: every offloaded Linear is streamed
    assert any(0 < lp.split for lp in plan.layers)
    assert main([*argv[:7], "--job-overhead", "1", "--out", str(tmp_path / "h.json")]) == 0
    streamed = hetegen_fx.load_plan(tmp_path / "h.json")
    assert any(not lp.resident for lp in streamed.layers)
    assert all(lp.split == 0 for lp in streamed.layers)
    # a small overhead: some jobs go into the segment of the job before them, none with --no-stream-jobs
    small = [*argv[:7], "--job-overhead", "1e-5"]
    assert main([*small, "--out", str(tmp_path / "s.json")]) == 0
    assert main([*small, "--no-stream-jobs", "--out", str(tmp_path / "n.json")]) == 0
    segments = hetegen_fx.load_plan(tmp_path / "s.json").layers
    assert any(lp.segment for lp in segments) and "segment" in capsys.readouterr().out
    assert not any(lp.segment for lp in hetegen_fx.load_plan(tmp_path / "n.json").layers)
