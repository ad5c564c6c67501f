"""Tiny random Hugging Face models: greedy generate() through hetegen_fx matches eager token for token,
with Linears really offloaded and split, and the KV-cache decode graph compiled too."""

from __future__ import annotations

import pytest
import torch

import hetegen_fx
from hetegen_fx.models import ARCHS

NEW_TOKENS = 8


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _prompt(batch: int = 1, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length))


def _generate(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS, **kw)
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
    return out


def _check_split(plans) -> None:
    assert plans, "nothing was compiled"
    for plan in plans:
        offloaded = [lp for lp in plan.layers if not lp.resident]
        assert offloaded, plan.table()
        assert any(lp.resident for lp in plan.layers), plan.table()
        assert any(0 < lp.split < lp.out_features for lp in offloaded), plan.table()
        assert plan.source == "model"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity(arch, tiny_hf):
    model = tiny_hf(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _prompt()
    ref = _generate(model, ids)
    compiled = hetegen_fx.compile(
        model, gpu_memory=_nbytes(model), device="cpu", max_seq_len=64, profile="model"
    )
    out = _generate(compiled, ids)
    assert torch.equal(out, ref), (out, ref)
    ex = hetegen_fx.explain(compiled)
    _check_split(ex.plans)
    assert any("hetegen.copy_h2d" in code and "torch.cat" in code for code in ex.codes)
    # the original model was not modified and still runs eagerly
    assert "forward" not in vars(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert torch.equal(_generate(model, ids), ref)


def test_decode_graph_is_compiled(tiny_hf):
    model = tiny_hf("llama")
    ids = _prompt(batch=2, length=5)
    ref = _generate(model, ids)
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    # no max_seq_len: the KV cache is reserved at the size class of the call (at least 256 tokens), capped at
    # the model's own limit (128 positions here), for the 2 sequences of the prompt
    budget = int(_nbytes(model) * 0.95) + 2 * 2 * per_token * c.max_position_embeddings
    compiled = hetegen_fx.compile(model, gpu_memory=budget, device="cpu", profile="model", kv_cache="dynamic")
    assert not hasattr(compiled.generate, "hetegen_static_cache")  # HF's default, a DynamicCache
    assert torch.equal(_generate(compiled, ids), ref)
    plans = hetegen_fx.explain(compiled).plans
    assert plans[0].reserved["kv_cache"] == 2 * 2 * per_token * c.max_position_embeddings  # old + new, 2 seqs
    assert len(plans) >= 2
    tokens = [p.tokens for p in plans]
    assert tokens[0] == 2 * 5 and 2 in tokens[1:]  # prefill (batch × prompt) and one-token decode steps
    # residency is one decision for the model, shared by every graph; α may differ per graph
    residency = {tuple(lp.resident for lp in p.layers) for p in plans}
    assert len(residency) == 1
    _check_split(plans)


def test_model_compile_with_backend_options(tiny_hf):
    model = tiny_hf("qwen2")
    ids = _prompt()
    ref = _generate(model, ids)
    model.compile(
        backend="hetegen",
        options={"device": "cpu", "gpu_memory": _nbytes(model), "max_seq_len": 64, "profile": "model"},
    )
    out = _generate(model, ids)
    assert torch.equal(out, ref)
    plans = hetegen_fx.explain(model).plans
    assert len(plans) >= 2
    _check_split(plans)


def test_hf_budget_far_too_small_fails_at_compile_naming_the_minimum(tiny_hf):
    model = tiny_hf("llama")
    with pytest.raises(hetegen_fx.BudgetError, match=r"at least .*\(\d+ bytes") as err:
        hetegen_fx.compile(model, gpu_memory=1024, device="cpu", max_seq_len=64)
    assert "KV cache for 16 tokens" in str(err.value)
    assert hetegen_fx.introspect.config_of(model) is None and "_compiled_call_impl" not in vars(model)


def test_static_cache_parity(tiny_hf):
    """An HF StaticCache updates its tensors in place (``index_copy_``, ``cumulative_length.add_``) and uses
    no result of those calls: the generated code must keep them."""
    model = tiny_hf("llama")
    ids = _prompt()
    ref = _generate(model, ids, cache_implementation="static")
    assert torch.equal(ref, _generate(model, ids))  # the static cache changes nothing in eager mode
    compiled = hetegen_fx.compile(
        model, gpu_memory=int(_nbytes(model) * 0.6), device="cpu", max_seq_len=64, profile="model"
    )
    assert torch.equal(_generate(compiled, ids, cache_implementation="static"), ref)
    code = "\n".join(hetegen_fx.explain(compiled).codes)
    assert "index_copy_" in code and "add_" in code


def test_generate_uses_a_static_cache_by_default_reserved_once(tiny_hf):
    """``kv_cache="auto"``: the compiled copy's generate() uses HF's StaticCache, written in place, so the
    plans reserve one copy of the cache instead of two; the user's model keeps its generation config."""
    model = tiny_hf("llama")
    ids = _prompt()
    ref = _generate(model, ids)
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    compiled = hetegen_fx.compile(
        model, gpu_memory=int(_nbytes(model) * 0.6), device="cpu", max_seq_len=64, profile="model"
    )
    assert compiled.generate.hetegen_static_cache and "generate" not in vars(model)
    assert torch.equal(_generate(compiled, ids), ref)
    plans = hetegen_fx.explain(compiled).plans
    assert {p.reserved["kv_cache"] for p in plans} == {per_token * 64}  # the class of 13 tokens, limit 64
    # the cache holds its class's tokens at every call: a longer generate of the same class compiles nothing
    longer = compiled.generate(
        ids, max_new_tokens=NEW_TOKENS + 3, do_sample=False, min_new_tokens=NEW_TOKENS + 3
    )
    assert torch.equal(longer[:, : ref.shape[1]], ref)
    assert len(hetegen_fx.explain(compiled).plans) == len(plans)
    assert any("index_copy_" in code for code in hetegen_fx.explain(compiled).codes)
    _check_split(plans)
    # a call that brings its own cache gets it (HF refuses a cache object with a cache implementation)
    from transformers import DynamicCache

    assert torch.equal(_generate(compiled, ids, past_key_values=DynamicCache()), ref)
    from hetegen_fx.introspect import store_of
    from hetegen_fx.residency import kv_class

    # reserved by use: two copies (a DynamicCache step holds the old and the new) of the call's size class
    ledger = store_of(compiled).ledger
    assert ledger.kv_cache == 2 * per_token * kv_class(ids.shape[1] + NEW_TOKENS, 64, ledger.kv_floor)


def test_kv_cache_option_respects_the_model_and_rejects_what_it_cannot_do(tiny_hf):
    model = tiny_hf("llama")
    model.generation_config.cache_implementation = "dynamic"  # the user's own choice wins under "auto"
    kw = {"gpu_memory": _nbytes(model), "device": "cpu", "max_seq_len": 64, "profile": "model"}
    assert not hasattr(hetegen_fx.compile(model, **kw).generate, "hetegen_static_cache")
    assert hetegen_fx.compile(model, kv_cache="static", **kw).generate.hetegen_static_cache
    assert model.generation_config.cache_implementation == "dynamic"
    with pytest.raises(hetegen_fx.ConfigError, match="kv_cache must be one of"):
        hetegen_fx.compile(model, kv_cache="paged", **kw)
    with pytest.raises(hetegen_fx.ConfigError, match="decoder-only model with generate"):
        hetegen_fx.compile(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            frontend="dynamo",
            kv_cache="static",
            gpu_memory=1 << 20,
            device="cpu",
        )


def test_two_compiled_variants_of_one_model_keep_their_own_plans(tiny_hf):
    """Compiling a model again (another α) registers a new store for its parameters; the first copy's graphs,
    including those dynamo compiles after that, and its explanation stay with its own store."""
    model = tiny_hf("llama")
    ids = _prompt()
    ref = _generate(model, ids)
    budget = int(_nbytes(model) * 0.6)
    low = hetegen_fx.compile(
        model, gpu_memory=budget, device="cpu", max_seq_len=64, profile="model", alpha=0.25
    )
    high = hetegen_fx.compile(
        model, gpu_memory=budget, device="cpu", max_seq_len=64, profile="model", alpha=0.75
    )
    for _ in range(2):  # interleaved, the way an A/B measures
        for c in (low, high):
            assert torch.equal(_generate(c, ids), ref)
    for c, alpha in ((low, 0.25), (high, 0.75)):
        plans = hetegen_fx.explain(c).plans
        assert plans and {lp.alpha for p in plans for lp in p.layers if not lp.resident} == {alpha}


@pytest.mark.parametrize("share, on_host", [(None, False), (0.6, True)])
def test_every_graph_of_a_model_keeps_its_token_table_where_the_first_placed_it(tiny_hf, share, on_host):
    """``host_embeddings="auto"``: with room for everything the token table is on the device in every graph
    (prefill and decode), with 60 % of the model's bytes it is looked up on the host in every graph; the
    tokens are eager's either way."""
    model = tiny_hf("llama")
    ids = _prompt()
    ref = _generate(model, ids)
    budget = None if share is None else int(_nbytes(model) * share)
    c = hetegen_fx.compile(model, gpu_memory=budget, device="cpu", max_seq_len=64, profile="model")
    assert torch.equal(_generate(c, ids), ref)
    plans = hetegen_fx.explain(c).plans
    assert len(plans) >= 2, plans
    table = ["model.embed_tokens.weight"] if on_host else []
    assert all(p.host_tables == table for p in plans), [p.host_tables for p in plans]


def test_decoding_that_edits_the_cache_on_the_host_is_refused_before_it_runs(tiny_hf):
    """On an accelerator the KV cache stays there behind host stand-ins whose bytes are never written; beam
    search (which reorders the cache on the host) and assisted decoding (which crops it) would compute on
    them and go wrong silently, so the compiled copy's generate() refuses them with a clear error."""
    from transformers import GenerationConfig

    from hetegen_fx.api import _refuse_host_cache_edits
    from hetegen_fx.errors import ConfigError

    compiled = tiny_hf("llama")  # stands for the compiled copy, whose generation config HF reads
    ran = []
    generate = _refuse_host_cache_edits(lambda *a, **k: ran.append(k) or "ran", compiled)
    assert generate(_prompt(), max_new_tokens=2) == "ran"
    assert generate(_prompt(), num_beams=1) == "ran"
    refused = [
        ({"num_beams": 4}, "beam search"),
        ({"generation_config": GenerationConfig(num_beams=2)}, "beam search"),
        ({"assistant_model": compiled}, "assisted decoding"),
        ({"prompt_lookup_num_tokens": 3}, "prompt-lookup"),
        ({"assistant_early_exit": 2}, "self-speculative"),
        ({"use_mtp": True}, "multi-token"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
        ({"custom_generate": "transformers-community/dola"}, "custom decoding"),
        ({"custom_generate": lambda **kw: None}, "custom decoding"),
        ({"prompt_lookup_num_tokens": 0}, "prompt-lookup"),  # HF starts it for any value but None
    ]
    for kwargs, what in refused:
        with pytest.raises(ConfigError, match=f"{what}.*on the host.*num_beams=1"):
            generate(_prompt(), **kwargs)
    assert generate(_prompt(), penalty_alpha=0.0) == "ran"  # contrastive search off: greedy
    as_assistant = GenerationConfig()
    as_assistant.is_assistant = True  # what HF's assisted decoding hands its assistant model's generate()
    with pytest.raises(ConfigError, match="another model's assistant_model"):
        generate(_prompt(), generation_config=as_assistant)
    compiled.generation_config.num_beams = 3  # the compiled copy's own default
    with pytest.raises(ConfigError, match="beam search"):
        generate(_prompt())
    assert generate(_prompt(), num_beams=None) == "ran"  # HF then falls back to its default
    assert generate(_prompt(), generation_config=GenerationConfig(num_beams=1)) == "ran"
    assert len(ran) == 5


def test_a_refusing_model_used_as_an_assistant_is_refused_by_hf_s_own_call(tiny_hf):
    """HF's assisted decoding calls the assistant model's generate() with a config it marks as the
    assistant's: a model whose generate() refuses host cache edits (as the compiled copy's does on a GPU)
    raises there, through HF's own code path, before its cache is ever cropped."""
    from hetegen_fx.api import _refuse_host_cache_edits
    from hetegen_fx.errors import ConfigError

    main, assistant = tiny_hf("llama"), tiny_hf("llama")
    assistant.generate = _refuse_host_cache_edits(assistant.generate, assistant)
    with torch.no_grad(), pytest.raises(ConfigError, match="another model's assistant_model"):
        main.generate(_prompt(), assistant_model=assistant, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_many_compiled_copies_of_one_model_class_all_compile(tiny_hf):
    """Every compiled copy of a model class shares its forward in dynamo's cache, each copy's graphs guarding
    on its own module; past dynamo's recompile limit (8) the forward would run eagerly without a word. Six
    copies in one process (two or three graphs each) all compile their graphs and match eager."""
    ids = _prompt()
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    for _ in range(6):
        model = tiny_hf("llama")
        with torch.no_grad():
            ref = model.generate(ids, **kw)
            compiled = hetegen_fx.compile(
                model, gpu_memory=600 << 10, device="cpu", max_seq_len=32, profile="model"
            )
            assert torch.equal(compiled.generate(ids, **kw), ref)
        assert len(hetegen_fx.state(compiled).graphs) >= 2  # a prefill and a decode graph, not eager


def test_a_compiled_copy_serves_as_an_assistant_on_the_emulated_device(tiny_hf):
    """Under emulation nothing is parked, so nothing refuses assisted decoding with a compiled assistant, and
    the assistant's calls keep HF's default cache (a static one, the compiled copy's own default, cannot be
    cropped): the tokens are the main model's greedy ones."""
    main, assistant = tiny_hf("llama"), tiny_hf("llama")
    ids = _prompt()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = main.generate(ids, **kw)
        compiled = hetegen_fx.compile(
            assistant, gpu_memory=600 << 10, device="cpu", max_seq_len=32, profile="model"
        )
        assert torch.equal(main.generate(ids, assistant_model=compiled, **kw), ref)


def test_beam_search_runs_on_the_emulated_device(tiny_hf):
    """Under emulation nothing is parked: beam search gives eager's tokens."""
    model = tiny_hf("llama")
    ids = _prompt()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        compiled = hetegen_fx.compile(
            model, gpu_memory=600 << 10, device="cpu", max_seq_len=32, profile="model"
        )
        assert torch.equal(compiled.generate(ids, **kw), ref)


def _callers_seen(model, **kwargs) -> list:
    """What :func:`hetegen_fx.decoding.cache_editing_caller` says at each forward of ``model`` during one
    generate() with ``kwargs``."""
    from hetegen_fx.decoding import cache_editing_caller

    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(cache_editing_caller()))
    try:
        with torch.no_grad():
            model.generate(_prompt(), max_new_tokens=3, pad_token_id=0, **kwargs)
    finally:
        hook.remove()
    assert seen, "the model's forward never ran"
    return seen


def test_the_decoding_method_that_edits_the_cache_is_found_on_the_stack(tiny_hf):
    """A graph called from HF's generate() can tell, from the stack, whether the decoding method runs edits
    the KV cache on the host: greedy decoding and sampling do not; beam search, assisted decoding (also as
    seen from the assistant's own forward), prompt lookup and a custom method do."""
    from hetegen_fx.decoding import cache_editing_caller

    model, other = tiny_hf("llama"), tiny_hf("llama")
    assert set(_callers_seen(model, do_sample=False)) == {None}
    assert set(_callers_seen(model, do_sample=True, top_k=5)) == {None}
    assert {s and s.split(" (")[0] for s in _callers_seen(model, num_beams=2, do_sample=False)} == {
        "beam search"
    }
    seen = _callers_seen(model, prompt_lookup_num_tokens=2, do_sample=False)
    assert all(s and s.startswith("assisted decoding") for s in seen), seen
    assert set(_callers_seen(other, do_sample=False)) == {None}  # the assistant-to-be, alone: greedy
    seen = []  # the assistant's forwards, inside the main model's assisted decoding
    hook = other.register_forward_pre_hook(lambda *_: seen.append(cache_editing_caller()))
    try:
        main_seen = _callers_seen(model, assistant_model=other, do_sample=False)
    finally:
        hook.remove()
    assert seen and all(s and s.startswith("assisted decoding") for s in seen), seen
    assert all(s and s.startswith("assisted decoding") for s in main_seen), main_seen

    def custom(model, input_ids, **kwargs):  # a custom decoding method: one greedy step by hand
        return model(input_ids).logits[:, -1:].argmax(-1)

    seen = _callers_seen(model, custom_generate=custom)
    assert all(s and s.startswith("a custom decoding method") for s in seen), seen


def test_a_graph_that_parks_state_refuses_decoding_that_edits_the_cache(tiny_hf):
    """The torch.compile route keeps HF's own generate(): a graph that parks outputs on the accelerator checks,
    at every call, that no decoding method on the stack edits the KV cache on the host, and raises a clear
    error before it runs if one does; a graph that parks nothing is returned as it was."""
    from hetegen_fx.errors import ConfigError
    from hetegen_fx.launch import guard_parked_state
    from hetegen_fx.runtime import park

    def graph(target) -> torch.fx.GraphModule:  # x → target(x), as DevicePass ends a graph
        g = torch.fx.Graph()
        g.output(g.call_function(target, (g.placeholder("x"),)))
        return torch.fx.GraphModule(torch.nn.Module(), g)

    ran = []
    run = lambda *a: ran.append(a) or None  # noqa: E731  (stands for the compiled graph)
    assert guard_parked_state(run, graph(torch.neg)) is run
    guarded = guard_parked_state(run, graph(park))
    assert guarded is not run
    model = tiny_hf("llama")
    forward = model.forward

    def forward_through_graph(*args, **kwargs):
        guarded(torch.ones(1))
        return forward(*args, **kwargs)

    model.forward = forward_through_graph
    with torch.no_grad():
        model.generate(_prompt(), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert len(ran) == 3
        with pytest.raises(ConfigError, match="beam search.*on the host.*output_device"):
            model.generate(_prompt(), max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert len(ran) == 3  # refused before the graph ran
