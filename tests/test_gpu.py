"""GPU tests: run on a CUDA host (``pytest -m gpu``); skipped without CUDA.

Token parity against the all-GPU model, the budget never exceeded over a whole generate, and the
split Linears' numerics on the real device (copy stream, events, pinned memory).
"""

from __future__ import annotations

import pytest
import torch

import hetegen_fx
from hetegen_fx.models import build_random

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _small_llama(dtype=torch.float32):
    return build_random(
        "llama",
        dtype=dtype,
        seed=1,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
    )


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@needs_cuda
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, None])
def test_split_linear_matches_gpu(alpha):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).half()
    x = torch.randn(3, 1024, dtype=torch.float16)
    ref = m.cuda()(x.cuda()).float().cpu()
    m.cpu()
    c = hetegen_fx.compile(
        m, (x,), gpu_memory="10MiB", device="cuda", alpha=alpha, activation_reserve=0, prefetch=1
    )
    assert any(not lp.resident for lp in c.plan.layers)
    out = c(x).float()
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_generate_parity_and_budget():
    model = _small_llama()
    ids = torch.randint(3, 4096, (1, 32), generator=torch.Generator().manual_seed(3))
    gpu = model.cuda()
    with torch.no_grad():
        ref = gpu.generate(ids.cuda(), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 32:].cpu()
    model.cpu()
    torch.cuda.empty_cache()
    budget = int(_bytes(model) * 0.6)
    c = hetegen_fx.compile(model, gpu_memory=budget, device="cuda", max_seq_len=64)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = c.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 32:].cpu()
    peak = torch.cuda.max_memory_allocated() - base
    plans = hetegen_fx.explain(c).plans
    assert len(plans) >= 2
    assert any(0 < lp.split < lp.out_features for lp in plans[-1].layers if not lp.resident)
    assert peak <= budget, f"peak {peak} over budget {budget}"
    assert out.tolist() == ref.tolist(), (out.tolist(), ref.tolist(), [p.label for p in plans])


@needs_cuda
def test_trace_shows_copies_overlapping_cpu_parts(tmp_path):
    from hetegen_fx import trace

    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)]).half()
    x = torch.randn(1, 2048, dtype=torch.float16)
    c = hetegen_fx.compile(m, (x,), gpu_memory="20MiB", device="cuda", alpha=0.5, activation_reserve=0)
    assert sum(not lp.resident for lp in c.plan.layers) >= 4
    c(x)  # warm-up
    with trace.record() as timelines:
        c(x)
    t = timelines[-1]
    assert t.overlap("PCIe", "CPU") > 0, "copies should be in flight while the CPU computes its parts"
    t.save(tmp_path / "trace.json")
