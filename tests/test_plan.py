"""The Plan as data: JSON round trip, atomic saves, the table, and compiling from a saved plan."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

import hetegen_fx
import hetegen_fx.costs
from hetegen_fx.errors import ConfigError
from hetegen_fx.plan import FORMAT_VERSION, LayerPlan, Plan, atomic_write, load_plan


def _sample_plan() -> Plan:
    return Plan(
        device="cuda",
        gpu_memory=6 * 2**30,
        tokens=7,
        layers=[
            LayerPlan(
                "model.layers.0.self_attn.q_proj.weight",
                4096,
                4096,
                7,
                "float16",
                33554432,
                True,
                t_cpu=4e-4,
                t_copy=6e-4,
                t_gpu=2e-5,
            ),
            LayerPlan(
                "model.layers.31.mlp.down_proj.weight_with_a_really_long_name_suffix",
                4096,
                11008,
                7,
                "float16",
                90177536,
                False,
                alpha=0.45,
                split=1856,
                t_cpu=1.2e-3,
                t_copy=1.6e-3,
                t_gpu=4e-5,
                slot=1,
            ),
        ],
        reserved={"kv_cache": 2**30, "activations": 2**20, "other_params": 3, "staging": 4},
        source="measured",
        label="prefill",
        host_tables=["model.embed_tokens.weight"],
    )


def test_json_round_trip():
    plan = _sample_plan()
    text = plan.to_json()
    d = json.loads(text)
    assert d["format_version"] == FORMAT_VERSION and len(d["layers"]) == 2
    again = Plan.from_json(text)
    assert again == plan and again is not plan
    assert again.layers[1].slot == 1 and again.reserved == plan.reserved
    assert again.host_tables == ["model.embed_tokens.weight"] and "on the host: model.embed" in again.table()


def test_a_plan_saved_before_host_tables_loads_with_none():
    d = _sample_plan().to_dict()
    del d["host_tables"]  # plans written before commit bacdd74 (2026-11-22) kept every table on the device
    assert Plan.from_dict(d).host_tables == []


def test_a_version_1_plan_loads_without_its_staging_buffers():
    plan = _sample_plan()
    d = plan.to_dict()
    d["format_version"] = 1  # its `slot` was a staging buffer's index, not a byte offset in the arena
    old = Plan.from_dict(d)
    assert old.layers[1].slot == -1
    old.layers[1].slot = plan.layers[1].slot
    assert old == plan


def test_save_load(tmp_path):
    plan = _sample_plan()
    path = plan.save(tmp_path / "plan.json")
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert Plan.load(path) == plan
    assert load_plan(str(path)) == plan and load_plan(plan) is plan and load_plan(plan.to_dict()) == plan


def test_save_into_missing_folder_is_a_config_error(tmp_path):
    target = tmp_path / "nope" / "plan.json"
    with pytest.raises(ConfigError, match="does not exist"):
        _sample_plan().save(target)
    assert not (tmp_path / "nope").exists() and list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, _sample_plan().to_json())
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # the temporary file is gone


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"format_version": 99, "layers": []}), "format version 99"),
        (json.dumps({"device": "cpu", "layers": []}), "format version None"),
        (
            json.dumps(
                {"format_version": FORMAT_VERSION, "device": "cpu", "tokens": 1, "layers": [{"name": "x"}]}
            ),
            "not a hetegen_fx plan",
        ),
        (
            json.dumps({"format_version": FORMAT_VERSION, "device": "cpu", "gpu_memory": 1, "tokens": 1}),
            "not a hetegen_fx plan",
        ),
    ],
)
def test_bad_plans_are_config_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        Plan.from_json(text)


def test_missing_plan_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def test_table():
    plan = _sample_plan()
    table = plan.table()
    lines = table.splitlines()
    assert lines[0].split() == [
        "layer",
        "place",
        "alpha",
        "cpu",
        "ms",
        "copy",
        "ms",
        "gpu",
        "ms",
        "pred",
        "ms",
        "bytes",
    ]
    q, down = lines[2], lines[3]
    assert q.startswith("model.layers.0.self_attn.q_proj.weight") and "resident" in q and "32.00 MiB" in q
    assert down.startswith("…") and len(down.split()[0]) == 44 and down.split()[0].endswith("suffix")
    assert "offload" in down and " 0.45 " in down  # 1856 / 4096 = 0.453
    assert "86.00 MiB" in down
    # predicted times: resident = GPU time; split = max(α·C, (1 − α)(M + G))
    a = 1856 / 4096
    assert plan.layers[0].t_pred == pytest.approx(2e-5)
    assert plan.layers[1].t_pred == pytest.approx(max(a * 1.2e-3, (1 - a) * (1.6e-3 + 4e-5)))
    assert f"{plan.layers[1].t_pred * 1e3:8.3f}" in down
    # a fixed CPU cost F is paid by any CPU part: F + α(C − F)
    lp = dataclasses.replace(plan.layers[1], t_cpu_fixed=1e-4)
    assert lp.t_cpu_part == pytest.approx(1e-4 + a * (1.2e-3 - 1e-4))
    assert dataclasses.replace(lp, split=0).t_cpu_part == 0.0
    total = lines[-1]
    for piece in (
        "2 Linears at 7 token(s) on cuda",
        "1 resident (32.00 MiB)",
        "1 offloaded (86.00 MiB)",
        "budget 6.00 GiB",
        "kv_cache 1.00 GiB",
        "costs: measured",
    ):
        assert piece in total
    assert str(plan) == table
    assert "streamed" not in total
    streamed = dataclasses.replace(plan.layers[1], alpha=0.0, split=0, segment=plan.layers[0].name)
    total = dataclasses.replace(plan, layers=[plan.layers[0], streamed]).table().splitlines()[-1]
    assert "1 offloaded (86.00 MiB, 1 of them streamed beside the CPU job before them)" in total
    assert "of Linear work (the sum of the rows: streamed Linears counted as if alone)" in total
    assert plan.resident_bytes == 33554432 and plan.offloaded_bytes == 90177536
    assert (
        plan.layers[1].gpu_part_bytes == 90177536 * (4096 - 1856) // 4096
        and plan.layers[0].gpu_part_bytes == 0
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 96)
        self.down = nn.Linear(96, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _compile(model, **kw):
    opts = {"device": "cpu", "gpu_memory": 14000, "activation_reserve": 0, "prefetch": 1, "profile": "model"}
    return hetegen_fx.compile(model, **{**opts, **kw})


def test_compiling_from_a_saved_plan_does_not_profile(tmp_path, monkeypatch):
    model = Net().eval()
    first = _compile(model)
    assert any(not lp.resident for lp in first.plan.layers)  # the plan is worth reusing
    assert any(0 < lp.split < lp.out_features for lp in first.plan.layers)
    path = first.plan.save(tmp_path / "net.json")

    def no_measuring(*args, **kwargs):
        raise AssertionError("profiled although a plan was given")

    import hetegen_fx.passes.profile

    monkeypatch.setattr(hetegen_fx.costs, "measure_cost", no_measuring)
    monkeypatch.setattr(hetegen_fx.passes.profile, "measure_cost", no_measuring)
    # profile="measure" would time every Linear; the plan makes that unnecessary
    second = _compile(model, plan=path, profile="measure", cache_dir=str(tmp_path / "cache"))
    assert second.plan.source == "plan"
    assert [(lp.name, lp.resident, lp.split) for lp in second.plan.layers] == [
        (lp.name, lp.resident, lp.split) for lp in first.plan.layers
    ]
    assert not (tmp_path / "cache").exists()
    x = torch.randn(4, 32)
    torch.testing.assert_close(second(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second(x), first(x))


def test_a_plan_edited_by_hand_is_obeyed(tmp_path):
    model = Net().eval()
    plan = _compile(model).plan
    d = plan.to_dict()
    for lp in d["layers"]:
        lp.update(resident=False, split=lp["out_features"] // 4)
    compiled = _compile(model, plan=d)
    assert [lp.split for lp in compiled.plan.layers] == [24, 8]
    assert not any(lp.resident for lp in compiled.plan.layers)
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_plan_for_another_model_is_refused(tmp_path):
    other = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    path = _compile(other).plan.save(tmp_path / "other.json")
    with pytest.raises(
        ConfigError, match=r"no entry for Linear\(s\) \['up.weight', 'down.weight'\].*another model"
    ):
        _compile(Net().eval(), plan=path)
    wider = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    with pytest.raises(ConfigError, match=r"plan entry 0.weight is 96x32 but the model's Linear is 128x32"):
        _compile(wider, plan=path)
