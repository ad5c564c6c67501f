"""hetegen_fx.export: the transformed graph as ONNX (onnxruntime parity, placement metadata, dynamic
sequence), as a torch.export archive, and the Plan; bad inputs leave no file behind."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from torch import nn

import hetegen_fx
from hetegen_fx import ConfigError, ExportError
from hetegen_fx.models import tiny

OPTS = {"frontend": "export", "device": "cpu", "gpu_memory": "250KiB", "max_seq_len": 16}


class Logits(nn.Module):
    """Prefill without a KV cache: input_ids → logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def compiled_models() -> dict:
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            eager = Logits(tiny(arch).eval())
            ids = torch.randint(3, 100, (1, 8))
            compiled = hetegen_fx.compile(eager, example_inputs=(ids,), **OPTS)
            assert any(not lp.resident and 0 < lp.split < lp.out_features for lp in compiled.plan.layers)
            cache[arch] = (eager, compiled)
        return cache[arch]

    return get


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _props(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_onnx_prefill_matches_eager(arch, compiled_models, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # the dynamo ONNX exporter
    ort = pytest.importorskip("onnxruntime")
    eager, compiled = compiled_models(arch)
    path = hetegen_fx.export(compiled, tmp_path / f"{arch}.onnx")
    assert path == tmp_path / f"{arch}.onnx" and _files(tmp_path) == [f"{arch}.onnx"]

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    # the sequence stays symbolic
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param and not dims[1].HasField("dim_value")
    # placement on the nodes, the Plan on the model
    nodes = [_props(n) for n in model.graph.node]
    sides = Counter(p.get("hetegen.side") for p in nodes)
    assert sides["cpu"] > 0 and sides["gpu"] > 0, sides
    offloaded = {lp.name: lp for lp in compiled.plan.layers if not lp.resident}
    cpu_nodes = [p for p in nodes if p.get("hetegen.side") == "cpu"]
    assert {p["hetegen.layer"] for p in cpu_nodes} <= set(offloaded)
    for p in cpu_nodes:
        lp = offloaded[p["hetegen.layer"]]
        assert float(p["hetegen.alpha"]) == pytest.approx(lp.split / lp.out_features)
    weights = Counter(_props(t).get("hetegen.side") for t in model.graph.initializer)
    assert weights["cpu"] > 0 and weights["copy"] > 0 and weights["gpu"] > 0, weights
    meta = _props(model)
    assert hetegen_fx.Plan.from_json(meta["hetegen.plan"]) == compiled.plan
    assert meta["hetegen.device"] == "cpu" and meta["hetegen.frontend"] == "export"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for seq in (8, 13, 1):  # the example length, and others
        ids = torch.randint(3, 100, (1, seq))
        (out,) = session.run(None, {name: ids.numpy()})
        with torch.no_grad():
            expected = eager(ids)
        torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)


def test_pt2_round_trip(compiled_models, tmp_path) -> None:
    eager, compiled = compiled_models("llama")
    path = hetegen_fx.export(compiled, tmp_path / "llama.pt2")
    assert _files(tmp_path) == ["llama.pt2"]
    program = hetegen_fx.load_exported(path)
    assert isinstance(program, torch.export.ExportedProgram)
    targets = {str(n.target) for n in program.graph.nodes}
    assert {
        "hetegen.copy_h2d.default",
        "hetegen.wait_copy.default",
        "hetegen.release_slot.default",
    } <= targets
    loaded = program.module()
    for seq in (8, 11):
        ids = torch.randint(3, 100, (1, seq))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), compiled(ids))
            torch.testing.assert_close(loaded(ids), eager(ids), atol=1e-4, rtol=1e-4)


def test_plan_round_trip(compiled_models, tmp_path) -> None:
    _, compiled = compiled_models("llama")
    path = hetegen_fx.export(compiled, tmp_path / "plan.json")
    assert hetegen_fx.Plan.load(path) == compiled.plan
    other = hetegen_fx.export(compiled, tmp_path / "plan.txt", format="plan")
    assert json.loads(other.read_text()) == compiled.plan.to_dict()


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def small() -> hetegen_fx.CompiledModule:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    return hetegen_fx.compile(model, example_inputs=(torch.randn(1, 4, 16),), frontend="export", device="cpu")


def test_not_compiled(tmp_path) -> None:
    with pytest.raises(ConfigError, match="hetegen_fx.compile"):
        hetegen_fx.export(nn.Linear(4, 4), tmp_path / "m.onnx")
    assert _files(tmp_path) == []


def test_dynamo_compiled_hf_model(tmp_path) -> None:
    compiled = hetegen_fx.compile(tiny("llama"), device="cpu")  # lazy: nothing traced yet
    for name in ("m.onnx", "m.pt2", "m.json"):
        with pytest.raises(ConfigError, match="frontend='export'"):
            hetegen_fx.export(compiled, tmp_path / name)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(("name", "fmt"), [("m.bin", None), ("m.onnx", "tflite")])
def test_unknown_format(small, tmp_path, name, fmt) -> None:
    with pytest.raises(ConfigError, match="format"):
        hetegen_fx.export(small, tmp_path / name, format=fmt)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("name", ["m.onnx", "m.pt2", "m.json"])
def test_missing_folder(small, tmp_path, name) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        hetegen_fx.export(small, tmp_path / "nowhere" / name)
    assert _files(tmp_path) == []


def test_read_only_folder(small, tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(ConfigError, match="not writable"):
            hetegen_fx.export(small, folder / "m.json")
        assert _files(folder) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("name", ["m.onnx", "m.pt2", "m.json"])
def test_unwritable_folder_emulated(small, tmp_path, monkeypatch, name) -> None:
    """As root a read-only folder is writable: emulate the failure to create the temporary file."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(ConfigError, match="Permission denied"):
        hetegen_fx.export(small, tmp_path / name)
    assert _files(tmp_path) == []


def test_failed_write_leaves_no_file(small, tmp_path, monkeypatch) -> None:
    def half_written(ep, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        hetegen_fx.export(small, tmp_path / "m.pt2")
    assert _files(tmp_path) == []


def test_conversion_error_is_export_error(small, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxscript")

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ExportError, match="unsupported op"):
        hetegen_fx.export(small, tmp_path / "m.onnx")
    assert _files(tmp_path) == []


def test_load_exported_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        hetegen_fx.load_exported(tmp_path / "m.pt2")
