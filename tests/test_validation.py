"""Bad input gets a clear error at the door (a ConfigError naming the option, the value and what is accepted),
before anything is captured or placed, and the user's model comes out untouched; quantized Linears are
reported, never skipped silently. The table in docs/guide.md ("What bad input gives") lists these cases."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import hetegen_fx
from hetegen_fx import Config, ConfigError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()} | {"__dict__": sorted(vars(model))}


def _untouched(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["__dict__"] == before["__dict__"]
    for k, v in before.items():
        if k != "__dict__":
            assert torch.equal(after[k], v), k


BAD_OPTIONS = [
    ({"gpu_memory": float("inf")}, "gpu_memory must be a finite"),
    ({"gpu_memory": float("nan")}, "gpu_memory must be a finite"),
    ({"gpu_memory": -1}, "gpu_memory must be a finite, non-negative"),
    ({"gpu_memory": [1]}, "gpu_memory must be a number of bytes"),
    ({"gpu_memory": "lots"}, "cannot read 'lots' as a byte count for gpu_memory"),
    ({"max_seq_len": -5}, "max_seq_len must be a token count of at least 1"),
    ({"max_seq_len": 2.0}, "max_seq_len must be"),
    ({"cpu_threads": 2.5}, "cpu_threads must be a thread count"),
    ({"cpu_threads": True}, "cpu_threads must be"),
    ({"verbose": "yes"}, "verbose must be True or False"),
    ({"alpha": "half"}, "alpha must be a CPU share in \\[0, 1\\]"),
    ({"alpha": 7.5}, "alpha must be"),
    ({"alpha": float("nan")}, "alpha must be"),
    ({"prefetch": "2"}, "prefetch must be a count of GPU parts"),
    ({"prefetch": 0}, "prefetch must be"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"job_overhead": -1e-3}, "job_overhead must be seconds"),
    ({"device": "gpu"}, "is not a torch device name"),
    ({"device": 3}, "device must be a string"),
    ({"frontend": "jit"}, "frontend must be one of"),
    ({"kv_cache": None}, "kv_cache must be one of"),
    ({"plan": 5}, "plan must be a Plan, a dict or the path"),
    ({"cache_dir": 5}, "cache_dir must be a folder path"),
    ({"bogus": 1}, "unknown hetegen option"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_every_bad_option_is_a_config_error_naming_it(options, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_options({"device": "cpu", **options})
    model = _mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=message):
        hetegen_fx.compile(model, **{"device": "cpu", **options})
    _untouched(model, before)


@pytest.mark.parametrize("device", ["mps", "meta", "xpu:0"])
def test_a_device_kind_hetegen_fx_cannot_run_on_fails_at_compile(device):
    Config(device=device)  # a Config may name it (e.g. "meta" to test a pass's structure) ...
    model = _mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=f"device '{device}' is not supported"):  # ... compiling refuses it
        hetegen_fx.compile(model, device=device, gpu_memory="1MiB")
    _untouched(model, before)


def test_good_values_of_other_numeric_types_are_taken():
    import numpy as np

    cfg = Config(device="cpu", max_seq_len=np.int64(64), alpha=np.float32(0.5), gpu_memory=np.int64(1 << 20))
    assert (cfg.max_seq_len, cfg.gpu_memory) == (64, 1 << 20)
    assert Config(device=torch.device("cpu")).device == "cpu"


def test_the_budget_must_be_a_keyword():
    model = _mlp()
    with pytest.raises(ConfigError, match="options are keywords: hetegen_fx.compile\\(model, gpu_memory="):
        hetegen_fx.compile(model, "6GiB")
    x = torch.randn(4, 64)
    one = hetegen_fx.compile(model, x, frontend="export", device="cpu", gpu_memory="30KiB", prefetch=1)
    torch.testing.assert_close(one(x), model(x))  # a single tensor is taken as the one input


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_the_default_device_without_cuda_is_a_clear_error_everywhere(tiny_hf):
    model = _mlp()
    with pytest.raises(ConfigError, match="pass device='cpu'|Pass device='cpu'"):
        hetegen_fx.compile(model, gpu_memory="1MiB")
    hf = tiny_hf("llama")
    with pytest.raises(ConfigError, match="Pass device='cpu'"):
        hetegen_fx.compile(hf, gpu_memory="1MiB")
    assert hetegen_fx.introspect.config_of(hf) is None
    fn = torch.compile(model, backend="hetegen", options={"gpu_memory": "1MiB"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not a silent eager fallback
        with pytest.raises(Exception, match="Pass device='cpu'"):
            fn(torch.randn(2, 64))


def test_frontend_dynamo_takes_a_plain_module():
    model = _mlp()
    compiled = hetegen_fx.compile(model, frontend="dynamo", device="cpu", gpu_memory="30KiB", prefetch=1)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 64)
            torch.testing.assert_close(compiled(x), model(x))
    plans = hetegen_fx.state(compiled).plans
    assert plans and any(not lp.resident for lp in plans[-1].layers)


def test_frontend_export_takes_a_batch_of_feature_vectors():
    model = _mlp()
    compiled = hetegen_fx.compile(
        model, (torch.randn(4, 64),), frontend="export", device="cpu", gpu_memory="30KiB", prefetch=1
    )
    for batch in (2, 4, 9):  # the batch is dynamic, the features fixed
        x = torch.randn(batch, 64)
        torch.testing.assert_close(compiled(x), model(x))


# -- plans --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_plan(tmp_path):
    model = _mlp()
    compiled = hetegen_fx.compile(model, device="cpu", gpu_memory="30KiB", prefetch=1, profile="model")
    path = tmp_path / "plan.json"
    compiled.plan.save(path)
    return model, path, json.loads(path.read_text())


def _write(tmp_path, data) -> str:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return str(p)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["layers"][0].update(resident="no"), "resident must be true or false, got 'no'"),
        (lambda d: d["layers"][0].update(split=-3), "split must be a row in \\[0, out_features"),
        (lambda d: d["layers"][0].update(split=10_000), "split must be a row"),
        (lambda d: d["layers"][0].update(alpha=7.5), "alpha must be a CPU share in \\[0, 1\\], got 7.5"),
        (lambda d: d["layers"][0].update(t_cpu="fast"), "t_cpu must be seconds"),
        (lambda d: d.update(reserved={"kv_cache": -1}), "reserved must be an object of byte counts"),
        (lambda d: d.update(layers="all"), "layers must be a list"),
        (
            lambda d: d["layers"][0].update(dtype="float16"),
            "made for float16 weights but the model's are float32",
        ),
        (lambda d: d["layers"][0].update(out_features=100), "is 100x64 but the model's Linear is 128x64"),
    ],
)
def test_a_plan_is_checked_field_by_field(saved_plan, tmp_path, edit, message):
    model, _, data = saved_plan
    edit(data)
    before = _state(model)
    with pytest.raises(ConfigError, match=message):
        hetegen_fx.compile(model, device="cpu", plan=_write(tmp_path, data))
    _untouched(model, before)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "invalid JSON"),
        (b"[1, 2]", "a plan is a JSON object, got list"),
        (b"", "invalid JSON"),
    ],
)
def test_a_file_that_is_no_plan_is_a_clear_error(tmp_path, content, message):
    p = tmp_path / "plan.json"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        hetegen_fx.compile(_mlp(), device="cpu", plan=str(p))


def test_a_plan_and_a_budget_it_does_not_fit_contradict(saved_plan):
    model, path, data = saved_plan
    with pytest.raises(ConfigError, match="over the gpu_memory 1.00 KiB given now"):
        hetegen_fx.compile(model, device="cpu", plan=str(path), gpu_memory="1KiB")
    roomy = hetegen_fx.compile(model, device="cpu", plan=str(path), gpu_memory="1MiB")  # it fits: taken
    assert roomy.plan.gpu_memory == 1 << 20
    x = torch.randn(3, 64)
    torch.testing.assert_close(roomy(x), model(x))
    same = hetegen_fx.compile(model, device="cpu", plan=str(path))
    assert same.plan.gpu_memory == data["gpu_memory"]


# -- Linear-like modules hetegen_fx cannot split -----------------------------------------------------------


def test_a_dynamically_quantized_linear_is_reported_not_skipped_silently():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notes about torch.ao quantization
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.warns(RuntimeWarning, match=r"2 Linear-like call\(s\).*0 \(torch\.ao\.nn\.quantized") as rec:
        compiled = hetegen_fx.compile(quantized, device="cpu", gpu_memory="1MiB")
    assert "not offloaded, not split" in str(rec[-1].message)
    assert compiled.plan.layers == []
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), quantized(x))


def test_plain_models_raise_no_such_warning(tiny_hf):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hetegen_fx.compile(_mlp(), device="cpu", gpu_memory="30KiB", prefetch=1)
        model = tiny_hf("llama")
        compiled = hetegen_fx.compile(model, device="cpu", max_seq_len=32)
        with torch.no_grad():
            compiled.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False)
