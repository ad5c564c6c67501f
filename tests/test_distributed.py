"""Pipeline stages in several processes (``hetegen_fx.distributed``, ``passes/stages.py``), with gloo on the
CPU: tiny Llama-, Qwen2- and GPT-2-family models split into stages of different layer counts give eager's
greedy tokens in every process; a process that dies mid-generate ends the others with a clear error within
the time limit; bad layouts are clear errors."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from hetegen_fx import distributed
from hetegen_fx.errors import ConfigError
from hetegen_fx.models import build_random

NEW = 5


def _model(arch: str):
    kw = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 128}
    if arch != "gpt2":
        kw.update(intermediate_size=128, num_key_value_heads=2)
    return build_random(arch, seed=3, **kw)


def _ids():
    return torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))


def _stage(rank: int, arch: str, layout, out: str, die_at: int | None) -> None:
    model = _model(arch)
    try:
        compiled = distributed.compile_stage(
            model, layout, gpu_memory=1 << 20, device="cpu", max_seq_len=64, profile="model"
        )
        if die_at is not None and rank == 1:
            sent = {"n": 0}
            send = distributed.send

            def dying(x, dst):
                sent["n"] += 1
                if sent["n"] == die_at:
                    os._exit(3)  # the process dies mid-generate, without a word to the others
                send(x, dst)

            distributed.send = dying
        with torch.no_grad():
            tokens = compiled.generate(_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        result = {"tokens": tokens[0].tolist()}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    path = os.path.join(out, f"rank{rank}.json")  # whole or not at all: spawn may end this process any time
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def _results(out, ranks):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_stages_of_different_layer_counts_give_the_eager_tokens(arch, tmp_path):
    with torch.no_grad():
        ref = (
            _model(arch).generate(_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0].tolist()
        )
    layout = [(0, 1), (1, 3), (3, 4)]  # one, two and one layers
    distributed.spawn(_stage, 3, args=(arch, layout, str(tmp_path), None), timeout=60)
    for r, got in enumerate(_results(tmp_path, 3)):
        assert got.get("tokens") == ref, (r, got)


def test_a_process_that_dies_mid_generate_ends_the_others_with_a_clear_error(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="exit code 3|exited with exit code|terminated"):
        distributed.spawn(_stage, 3, args=("llama", [(0, 1), (1, 3), (3, 4)], str(tmp_path), 2), timeout=20)
    assert time.perf_counter() - t0 < 90
    for r in (0, 2):  # the others stopped with an error that says what happened
        path = tmp_path / f"rank{r}.json"
        if path.exists():  # spawn may have ended them first; then there is nothing to read
            got = json.loads(path.read_text())
            assert "stage transfer failed" in got.get("error", ""), got


def test_bad_layouts_are_clear_errors():
    assert distributed.even_layout(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ConfigError, match="from 0 to the model's 4 layers"):
        distributed.check_layout([(0, 2), (3, 4)], 4)
    with pytest.raises(ConfigError, match="between 1 and 4"):
        distributed.even_layout(4, 5)
    with pytest.raises(ConfigError, match="torch.distributed initialised"):
        distributed.compile_stage(_model("llama"), [(0, 4)], device="cpu")
    with pytest.raises(ConfigError, match="pipeline_stage must be"):
        from hetegen_fx.config import Config

        Config(pipeline_stage={"rank": 2, "ranks": 2, "layers": [0, 1]})


def _captured(arch: str):
    """The decode graph dynamo captures of the tiny model (a DynamicCache, as stages decode with)."""
    import copy

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = copy.copy(_model(arch))
    model.compile(backend=backend)
    with torch.no_grad():
        model.generate(_ids(), max_new_tokens=2, do_sample=False, cache_implementation="dynamic")
    return graphs[-1]


def test_the_stage_split_keeps_its_layers_and_adds_one_transfer_each_way():
    from torch.fx.passes.infra.pass_base import PassResult

    from hetegen_fx.linear import LINEAR_TARGETS
    from hetegen_fx.ops import STAGE_BROADCAST, STAGE_RECV, STAGE_SEND
    from hetegen_fx.passes.stages import StageSplitPass, layer_of

    def linear_layers(graph):
        return {layer_of(n) for n in graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS}

    gm = _captured("llama")
    assert linear_layers(gm.graph) == {0, 1, 2, 3, None}  # lm_head: the postlude
    placeholders = len(list(gm.graph.find_nodes(op="placeholder")))
    res = StageSplitPass(1, 3, rank=1, ranks=3, device="cpu")(gm)
    assert isinstance(res, PassResult) and res.modified
    g = res.graph_module.graph
    count = lambda op: sum(n.op == "call_function" and n.target is op for n in g.nodes)  # noqa: E731
    assert (count(STAGE_RECV), count(STAGE_SEND), count(STAGE_BROADCAST)) == (1, 1, 1)
    assert linear_layers(g) == {1, 2}  # and no lm_head off the last stage
    assert len(list(g.find_nodes(op="placeholder"))) == placeholders  # the caller's signature is kept
