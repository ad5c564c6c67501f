"""hetegen bench --sweep on the CPU (the GPU side emulated, llama-bench a stand-in script): every budget runs
or is skipped with its reason, the tokens match the reference, the report is written; the GGUF of the bench
model reads back as llama.cpp's layout; the -ngl choice, llama-bench's JSON and the bad inputs. Timing is
not asserted."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hetegen_fx import llamacpp
from hetegen_fx.bench_sweep import parse_budgets
from hetegen_fx.cli import main
from hetegen_fx.errors import ConfigError
from hetegen_fx.llamacpp import Footprint, LlamaCppError, ngl_for_budget

MiB, GiB = 2**20, 2**30

#: a llama-bench of this checkout's Python: checks the GGUF's magic, logs its arguments, prints JSON in
#: llama-bench's format with a decode rate of 10 + ngl tokens/s and a prompt rate of 100 + ngl
FAKE = """\
#!{python}
import json, sys
a = sys.argv[1:]
opt = lambda k, d=None: a[a.index(k) + 1] if k in a else d
with open(opt("-m"), "rb") as f:
    assert f.read(4) == b"GGUF"
with open({log!r}, "a") as f:
    f.write(" ".join(a) + "\\n")
ngl, p, n, d = int(opt("-ngl")), int(opt("-p", 512)), int(opt("-n", 128)), int(opt("-d", 0))
tests = []
if p:
    tests.append({{"n_prompt": p, "n_gen": 0, "avg_ts": 100.0 + ngl, "samples_ts": [100.0 + ngl]}})
if n:
    tests.append({{"n_prompt": 0, "n_gen": n, "avg_ts": 10.0 + ngl, "samples_ts": [10.0 + ngl]}})
for t in tests:
    t.update(n_depth=d, stddev_ts=0.0, n_gpu_layers=ngl, n_threads=int(opt("-t")), build_commit="stand-in")
print(json.dumps(tests, indent=2))
"""


def _stand_in(folder: Path, body: str = FAKE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "llama-bench"
    binary.write_text(body.format(python=sys.executable, log=str(folder / "calls.log")))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_sweep_on_cpu_runs_or_skips_every_budget_and_writes_the_report(tmp_path):
    peer = tmp_path / "llama.cpp"
    _stand_in(peer)
    out = tmp_path / "out"
    temps = set(Path(tempfile.gettempdir()).glob("hetegen-sweep-*"))
    argv = ["bench", "--preset", "tiny-llama", "--dtype", "float32", "--device", "cpu", "--prompt-len", "8"]
    argv += ["--new-tokens", "4", "--reps", "1", "--sweep", "all,60KiB,200KiB", "--llama-cpp", str(peer)]
    assert main([*argv, "--out", str(out)]) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert s["budgets"] == ["60KiB", "200KiB", "all"]  # sorted, all last
    assert s["reference"] == "gpu" and s["gpu_reference"]["tokens"]
    points = {p["budget"]: p for p in s["points"]}
    for p in points.values():
        assert not p["errors"], p["errors"]
        for name in ("hetegen", "stream", "cpu"):  # ran, or skipped with a reason
            assert (name in p["variants"]) != bool(p["skipped"].get(name)), (p["budget"], name)
        assert all(r["tokens_match_reference"] for r in p["variants"].values())
    # 60 KiB is below the minimum working set of hetegen and stream: skipped with the BudgetError's message
    assert "minimum working set" in points["60KiB"]["skipped"]["hetegen"]
    assert points["all"]["variants"]["hetegen"]["offloaded_bytes"] == 0  # everything resident
    assert "nothing offloaded" in points["all"]["skipped"]["stream"]
    ran = [p["variants"]["hetegen"]["offloaded_bytes"] for p in s["points"] if "hetegen" in p["variants"]]
    assert len(ran) >= 2 and all(a > b for a, b in zip(ran, ran[1:], strict=False))
    assert points["200KiB"]["variants"]["cpu"]["mean_alpha"] == 1.0
    # llama.cpp: every layer and the output at "all"; -ngl 0 is estimated over the tiny budgets
    lc = points["all"]["llama_cpp"]
    assert lc["ngl"] == 3 and lc["decode_tok_s"] == 13.0 and lc["prompt_s"] == pytest.approx(8 / 103.0)
    assert lc["fits_by"] == "all layers" and lc["gpu_delta_bytes"] is None  # no nvidia-smi here
    assert "over" in points["200KiB"]["llama_cpp"]["skipped"]
    calls = (peer / "calls.log").read_text().splitlines()
    assert len(calls) == 2  # -ngl 3 once: the prompt test, then the decode steps after the prompt
    assert "-ngl 3" in calls[0] and "-p 8 -n 0" in calls[0] and "-p 0 -n 4 -d 8" in calls[1]
    assert s["llama_cpp"]["runs"]["3"]["decode_tok_s"] == 13.0
    table = (out / "bench.md").read_text()
    assert "| all | " in table and "13.00 (3)" in table and "| 60KiB | - | - |" in table
    assert "minimum working set" in table
    assert (out / "sweep.png").stat().st_size > 0
    assert (out / "sweep" / "200KiB" / "trace_decode.json").exists()  # one decode step per budget
    assert set(Path(tempfile.gettempdir()).glob("hetegen-sweep-*")) == temps  # the GGUF is gone


# -- the GGUF ------------------------------------------------------------------------------------------------


def _tiny(dtype=torch.float16):
    from hetegen_fx.models import build_random

    return build_random("tiny-llama", dtype=dtype)


def test_write_gguf_reads_back_as_llama_cpps_layout(tmp_path):
    import gguf

    model = _tiny(torch.float16)
    cfg = model.config
    path = llamacpp.write_gguf(model, tmp_path / "tiny.gguf", progress=lambda m: None)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no temporary file left
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    layer = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    expect = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expect |= {f"blk.{i}.{n}.weight" for i in range(cfg.num_hidden_layers) for n in layer}
    assert set(tensors) == expect

    def field(key):
        return r.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert field("llama.block_count") == cfg.num_hidden_layers
    assert field("llama.embedding_length") == cfg.hidden_size
    assert field("llama.feed_forward_length") == cfg.intermediate_size
    assert field("llama.attention.head_count") == cfg.num_attention_heads
    assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("llama.context_length") == cfg.max_position_embeddings
    assert field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field("tokenizer.ggml.model") == "llama"
    assert len(field("tokenizer.ggml.tokens")) == cfg.vocab_size and field("tokenizer.ggml.bos_token_id") == 1

    hf = dict(model.named_parameters())
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    names["output_norm.weight"] = "model.norm.weight"
    hf_layer = dict(zip(layer, llamacpp.LAYER_TENSORS, strict=True))
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, t in tensors.items():
        data = torch.from_numpy(t.data.copy())
        if name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            source = hf[f"model.layers.{i}.{hf_layer[kind]}.weight"]
            if kind in heads:  # llama.cpp's rotary order: back to HF's, exactly
                assert not torch.equal(data, source)
                data = llamacpp.unpermute_qk(data, heads[kind])
        else:
            source = hf[names[name]]
        assert tuple(data.shape) == tuple(source.shape), name
        assert t.tensor_type == (
            gguf.GGMLQuantizationType.F32 if source.dim() == 1 else gguf.GGMLQuantizationType.F16
        )
        assert torch.equal(data.to(source.dtype), source.detach()), name


def test_the_gguf_loads_in_transformers_as_the_same_model(tmp_path):
    """transformers' GGUF reader undoes llama.cpp's Q/K order on its own: the weights come back equal."""
    from transformers import AutoModelForCausalLM

    model = _tiny(torch.float32)
    llamacpp.write_gguf(model, tmp_path / "tiny.gguf")
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", local_files_only=True, dtype=torch.float32
    )
    a, b = model.state_dict(), again.state_dict()
    assert set(a) <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_qk_permutation_is_a_permutation_of_rows_and_its_inverse_undoes_it():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = llamacpp.permute_qk(w, heads=2)
    # head 0 rows 0..3 = halves [0, 1] and [2, 3]: interleaved to 0, 2, 1, 3
    assert p[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert torch.equal(llamacpp.unpermute_qk(p, 2), w)
    assert torch.equal(
        llamacpp.unpermute_qk(llamacpp.permute_qk(torch.arange(16.0), 4), 4), torch.arange(16.0)
    )


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_write_gguf_refuses_a_model_that_is_not_a_llama(tmp_path, arch):
    from hetegen_fx.models import tiny

    with pytest.raises(LlamaCppError, match=r"Llama-architecture .*--preset llama-2-7b"):
        llamacpp.write_gguf(tiny(arch), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# -- -ngl by budget --------------------------------------------------------------------------------------------


def test_ngl_for_budget_takes_the_largest_that_fits_measured_before_estimated():
    foot = Footprint(layers=32, layer_bytes=390 * MiB, kv_bytes_per_layer=10 * MiB, output_bytes=250 * MiB,
                     fixed_bytes=GiB)  # fmt: skip
    assert foot.estimate(0) == GiB and foot.estimate(32) == GiB + 32 * 400 * MiB
    assert foot.estimate(33) == foot.estimate(32) + 250 * MiB  # the output matrix at -ngl layers + 1
    assert ngl_for_budget(GiB - 1, foot) is None  # not even -ngl 0
    assert ngl_for_budget(GiB, foot) == 0
    assert ngl_for_budget(GiB + 13 * 400 * MiB, foot) == 13
    assert ngl_for_budget(GiB + 13 * 400 * MiB - 1, foot) == 12
    assert ngl_for_budget(foot.estimate(33) - 1, foot) == 32
    assert ngl_for_budget(100 * GiB, foot) == 33
    limit = GiB + 13 * 400 * MiB
    # measured over: that -ngl and every larger one are out, whatever their estimate
    assert ngl_for_budget(limit, foot, {13: limit + 1}) == 12
    assert ngl_for_budget(limit, foot, {11: limit + 1}) == 10
    # measured under where the estimate was over: measured wins; a failed run fits nothing
    assert ngl_for_budget(limit, foot, {14: limit - MiB}) == 14
    assert ngl_for_budget(limit, foot, {13: sys.maxsize}) == 12
    assert ngl_for_budget(limit, foot, {13: None}) == 13  # no nvidia-smi: the estimate stands
    # calibrated from measurements (llama-2-7b F16 on the H100 host, shared/tools/README.md)
    foot.calibrate({0: int(1.1 * GiB), 13: int(1.1 * GiB) + 13 * 400 * MiB})
    assert foot.fixed_bytes == int(1.1 * GiB)


def test_the_footprint_of_the_bench_model_counts_its_layers_kv_and_output():
    model = _tiny(torch.float16)
    cfg = model.config
    foot = llamacpp.footprint(model, ctx=300)
    layer0 = model.model.layers[0]
    expect = sum(p.numel() * (2 if p.dim() > 1 else 4) for p in layer0.parameters())
    assert foot.layers == cfg.num_hidden_layers and foot.layer_bytes == expect
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert foot.kv_bytes_per_layer == 2 * cfg.num_key_value_heads * head_dim * 512 * 2  # 300 → 512 tokens
    assert foot.output_bytes == cfg.vocab_size * cfg.hidden_size * 2 + cfg.hidden_size * 4


# -- llama-bench ---------------------------------------------------------------------------------------------

#: llama-bench -o json of a llama-2-7b F16 at -ngl 14, in the fields of the vendored llama.cpp's
#: tools/llama-bench (get_fields(), then samples_ns / samples_ts): a prompt test and a generation test
SAMPLE = """[
  {
    "build_commit": "b1a2c3d4", "build_number": 7001, "cpu_info": "Intel(R) Xeon(R) Platinum 8480+",
    "gpu_info": "NVIDIA H100 80GB HBM3", "backends": "CUDA", "model_filename": "/tmp/model.gguf",
    "model_type": "llama 7B F16", "model_size": 13476839424, "model_n_params": 6738415616, "n_batch": 2048,
    "n_ubatch": 512, "n_threads": 12, "cpu_mask": "0x0", "cpu_strict": false, "poll": 50, "type_k": "f16",
    "type_v": "f16", "n_gpu_layers": 14, "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0,
    "no_kv_offload": false, "flash_attn": -1, "devices": "auto", "tensor_split": "0.00",
    "tensor_buft_overrides": "none", "load_mode": "mmap", "lazy_mode": "auto", "embeddings": false,
    "no_op_offload": 0, "no_host": false, "repack": true, "fit_target": 0, "fit_min_ctx": 0,
    "n_prompt": 512, "n_gen": 0, "n_depth": 0, "test_time": "2026-12-06T10:00:00Z", "avg_ns": 301123456,
    "stddev_ns": 2345678, "avg_ts": 1700.321, "stddev_ts": 13.25,
    "samples_ns": [ 299000000, 303246912 ],
    "samples_ts": [ 1712.37, 1688.27 ]
  },
  {
    "build_commit": "b1a2c3d4", "build_number": 7001, "cpu_info": "Intel(R) Xeon(R) Platinum 8480+",
    "gpu_info": "NVIDIA H100 80GB HBM3", "backends": "CUDA", "model_filename": "/tmp/model.gguf",
    "model_type": "llama 7B F16", "model_size": 13476839424, "model_n_params": 6738415616, "n_batch": 2048,
    "n_ubatch": 512, "n_threads": 12, "cpu_mask": "0x0", "cpu_strict": false, "poll": 50, "type_k": "f16",
    "type_v": "f16", "n_gpu_layers": 14, "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0,
    "no_kv_offload": false, "flash_attn": -1, "devices": "auto", "tensor_split": "0.00",
    "tensor_buft_overrides": "none", "load_mode": "mmap", "lazy_mode": "auto", "embeddings": false,
    "no_op_offload": 0, "no_host": false, "repack": true, "fit_target": 0, "fit_min_ctx": 0,
    "n_prompt": 0, "n_gen": 64, "n_depth": 512, "test_time": "2026-12-06T10:00:09Z", "avg_ns": 5925925925,
    "stddev_ns": 51234567, "avg_ts": 10.8, "stddev_ts": 0.093,
    "samples_ns": [ 5890000000, 5961851850 ],
    "samples_ts": [ 10.866, 10.735 ]
  }
]
"""


def test_llama_bench_json_gives_the_prompt_and_decode_rates():
    r = llamacpp.parse_bench_json("main: some stray line\n" + SAMPLE)
    assert r["prompt_tok_s"] == 1700.321 and r["prompt_tokens"] == 512 and r["prompt_depth"] == 0
    assert r["decode_tok_s"] == 10.8 and r["decode_tokens"] == 64 and r["decode_depth"] == 512
    assert r["decode_samples_tok_s"] == [10.866, 10.735] and r["decode_stddev_tok_s"] == 0.093
    assert r["n_gpu_layers"] == 14 and r["n_threads"] == 12 and r["build_commit"] == "b1a2c3d4"
    assert r["backends"] == "CUDA" and r["model_size"] == 13476839424
    pg = json.loads(SAMPLE)[:1]
    pg[0].update(n_prompt=512, n_gen=64)  # -pg: prompt and generation together, neither rate
    with pytest.raises(LlamaCppError, match="no prompt or generation test"):
        llamacpp.parse_bench_json(json.dumps(pg))
    with pytest.raises(LlamaCppError, match="does not parse"):
        llamacpp.parse_bench_json("[{not json]")
    with pytest.raises(LlamaCppError, match="expected llama-bench's JSON list"):
        llamacpp.parse_bench_json("error: failed to load model")


def test_run_bench_runs_the_binary_and_says_why_it_failed(tmp_path):
    binary = _stand_in(tmp_path / "ok")
    gguf_path = llamacpp.write_gguf(_tiny(), tmp_path / "m.gguf")
    r = llamacpp.run_bench(binary, gguf_path, ngl=2, threads=3, prompt=16, new=5, reps=2)
    assert r["prompt_tok_s"] == 102.0 and r["prompt_s"] == pytest.approx(16 / 102.0)
    assert r["decode_tok_s"] == 12.0 and r["decode_depth"] == 16 and r["n_threads"] == 3
    assert r["gpu_delta_bytes"] is None and r["gpu"]["samples"] == 0  # no GPU named: nothing sampled
    broken = _stand_in(
        tmp_path / "broken", "#!/bin/sh\necho 'llama_model_load: error: out of memory' >&2\nexit 1\n"
    )
    with pytest.raises(LlamaCppError, match=r"exited 1 at -ngl 2:\n.*out of memory"):
        llamacpp.run_bench(broken, gguf_path, ngl=2, threads=3, prompt=16, new=5, reps=1)


def test_the_memory_sampler_reports_the_peak_over_the_reading_before():
    readings = iter([1000, 1500, 4000, 2000] + [2000] * 1000)
    with llamacpp.MemorySampler("0", interval=0.001, read=lambda gpu: next(readings)) as mem:
        while mem.samples < 3:
            pass
    assert mem.before == 1000 and mem.peak == 4000 and mem.delta == 3000
    with llamacpp.MemorySampler(None) as none:  # no GPU: nothing read, nothing claimed
        pass
    assert none.to_dict() == {"before_bytes": None, "peak_bytes": None, "delta_bytes": None, "samples": 0}


#: an nvidia-smi that reads 1000 MiB once, and with -lms prints 1500, 4000, then 2000 until stopped
SMI = """\
#!{python}
import sys, time
assert "--query-gpu=memory.used" in sys.argv and sys.argv[sys.argv.index("-i") + 1] == "3"
if "-lms" not in sys.argv:
    print("1000")
    sys.exit()
for value in ["1500", "4000"] + ["2000"] * 10000:
    print(value, flush=True)
    time.sleep(int(sys.argv[sys.argv.index("-lms") + 1]) / 1000)
"""


def test_the_sampler_follows_one_looping_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(SMI.format(python=sys.executable))
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert llamacpp.gpu_memory_used("3") == 1000 * MiB
    with llamacpp.MemorySampler("3", interval=0.01) as mem:
        while mem.samples < 3:
            time.sleep(0.01)
    assert mem.before == 1000 * MiB and mem.peak == 4000 * MiB and mem.delta == 3000 * MiB
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert llamacpp.gpu_memory_used("3") is None


def test_nvidia_smi_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert llamacpp.smi_id("cuda:1") == "1" and llamacpp.smi_id("cuda") == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert llamacpp.smi_id("cuda:0") == "3" and llamacpp.smi_id(1) == "GPU-abc"


def test_llama_bench_is_found_in_a_folder_the_environment_or_path(tmp_path, monkeypatch):
    built = _stand_in(tmp_path / "tree" / "build" / "bin")
    monkeypatch.delenv(llamacpp.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert llamacpp.find_binary(tmp_path / "tree") == built  # a source tree's build/bin
    assert llamacpp.find_binary(built) == built
    assert llamacpp.find_binary(tmp_path / "nothing") is None
    assert llamacpp.find_binary() is None
    monkeypatch.setenv(llamacpp.BINARY_ENV, str(built.parent))
    assert llamacpp.find_binary() == built
    monkeypatch.delenv(llamacpp.BINARY_ENV)
    monkeypatch.setenv("PATH", str(built.parent))
    assert llamacpp.find_binary() == built


def test_building_without_cmake_or_nvcc_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    monkeypatch.setattr(llamacpp, "_nvcc", lambda: None)
    with pytest.raises(LlamaCppError, match=r"needs cmake and nvcc .*--llama-cpp the folder of a built"):
        llamacpp.build(tmp_path / "llama.cpp.tgz", tmp_path / "dest")


# -- bad inputs ----------------------------------------------------------------------------------------------


def test_budget_lists_parse_sort_and_refuse_what_they_cannot_read():
    assert parse_budgets("8GiB, all,2GiB") == [("2GiB", 2 * GiB), ("8GiB", 8 * GiB), ("all", None)]
    assert parse_budgets("ALL") == [("all", None)]
    with pytest.raises(ConfigError, match=r"'lots'.*or 'all'"):
        parse_budgets("2GiB,lots")
    with pytest.raises(ConfigError, match="at least one budget"):
        parse_budgets(" , ")
    with pytest.raises(ConfigError, match="same budget"):
        parse_budgets("1GiB,1024MiB")
    with pytest.raises(ConfigError, match="holds nothing"):
        parse_budgets("0GiB")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sweep", "2GiB,lots"], "cannot read 'lots'"),
        (["--sweep", "2GiB", "--grow", "600"], "drop --grow"),
        (["--llama-cpp", "."], "--llama-cpp compares against llama.cpp in a --sweep"),
        (["--sweep", "2GiB", "--llama-cpp", "/no/such/place"], "no such file or folder"),
        (["--sweep", "2GiB", "--llama-cpp", "."], "no executable llama-bench"),
    ],
)
def test_bad_sweep_flags_are_one_line_before_a_model_loads(tmp_path, capsys, flags, message):
    assert main(["bench", "--preset", "tiny-llama", "--device", "cpu", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetegen: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_sweep_in_pieces_keeps_the_earlier_points_of_the_same_settings(tmp_path):
    from hetegen_fx.bench_sweep import merge_earlier, read_earlier

    settings = {"model": "m", "dtype": "float16", "device": "d", "prompt_len": 8, "new_tokens": 4, "reps": 1}
    settings["cpu_threads"] = 12

    def point(label, n):
        return {"budget": label, "budget_bytes": n, "variants": {}, "skipped": {}, "errors": {}}

    earlier = {**settings, "date": "2026-12-06", "points": [point("2GiB", 2 * GiB), point("4GiB", 4 * GiB)]}
    (tmp_path / "sweep.json").write_text(json.dumps(earlier))
    now = {**settings, "points": [point("4GiB", 4 * GiB), point("all", None)]}
    assert merge_earlier(now, read_earlier(tmp_path / "sweep.json")) == [
        "2GiB"
    ]  # 4GiB was measured again: the new one
    assert now["budgets"] == ["2GiB", "4GiB", "all"] and now["points"][0]["date"] == "2026-12-06"
    other = {**settings, "prompt_len": 512, "points": [point("all", None)]}
    assert merge_earlier(other, read_earlier(tmp_path / "sweep.json")) == [] and len(other["points"]) == 1
    assert merge_earlier(other, read_earlier(tmp_path / "missing.json")) == []


def test_the_peer_measures_its_way_to_the_largest_ngl_that_fits_each_budget(monkeypatch):
    """llama.cpp's real memory (here a line the estimate does not know) decides: each -ngl tried is measured,
    the estimate recalibrated, and a budget's point is the largest measured -ngl within budget + context."""
    import argparse

    from hetegen_fx.bench_sweep import Peer

    def true_bytes(ngl):
        return int(1.1 * GiB) + min(ngl, 32) * 400 * MiB + (250 * MiB if ngl > 32 else 0)

    calls = []

    def fake_run_bench(binary, gguf, ngl, threads, prompt, new, reps, gpu=None, progress=None):
        calls.append(ngl)
        if ngl == 20:
            raise LlamaCppError("llama-bench exited 1 at -ngl 20: out of memory")
        return {"ngl": ngl, "decode_tok_s": 6.0 + ngl, "prompt_s": 0.5, "gpu_delta_bytes": true_bytes(ngl)}

    monkeypatch.setattr(llamacpp, "run_bench", fake_run_bench)
    foot = Footprint(layers=32, layer_bytes=380 * MiB, kv_bytes_per_layer=10 * MiB, output_bytes=250 * MiB,
                     fixed_bytes=600 * MiB)  # fmt: skip
    args = argparse.Namespace(prompt_len=512, new_tokens=64, reps=1)
    peer = Peer(Path("llama-bench"), Path("m.gguf"), foot, args, "0", allowance=GiB // 2, threads=12)
    two = peer.at(2 * GiB)  # 2.5 GiB with the context: 1.1 GiB + 3 layers
    assert two["ngl"] == 3 and two["fits_by"] == "nvidia-smi" and two["gpu_delta_bytes"] <= 2.5 * GiB
    assert calls == [5, 3] and abs(foot.fixed_bytes - 1.1 * GiB) < 100 * MiB  # recalibrated by -ngl 5's 3 GiB
    six = peer.at(6 * GiB)
    assert six["ngl"] == 13 and true_bytes(14) > 6.5 * GiB
    n = len(calls)
    assert peer.at(6 * GiB)["ngl"] == 13 and len(calls) == n  # every -ngl runs once
    assert peer.at(int(8.5 * GiB))["ngl"] == 19  # -ngl 20 failed: it fits nothing, and nothing above it
    assert peer.at(None)["ngl"] == 33 and peer.at(None)["fits_by"] == "all layers"
    small = peer.at(GiB // 4)  # below -ngl 0's measured 1.1 GiB
    assert "decode_tok_s" not in small and "holds 1.10 GiB (nvidia-smi)" in small["skipped"]


#: a cmake that configures nothing and "builds" a llama-bench; and an nvcc that only exists
CMAKE = """\
#!{python}
import os, stat, sys
if sys.argv[1] == "-B":
    assert "-DGGML_CUDA=ON" in sys.argv and "-DCMAKE_CUDA_ARCHITECTURES=90" in sys.argv
    print("-- Configuring done")
    sys.exit()
assert sys.argv[1:3] == ["--build", "build"] and sys.argv[-2:] == ["--target", "llama-bench"]
for pct in (5, 40, 100):
    print(f"[{{pct:3d}}%] Building CXX object something", flush=True)
os.makedirs("build/bin", exist_ok=True)
with open("build/bin/llama-bench", "w") as f:
    f.write("#!/bin/sh\\n")
os.chmod("build/bin/llama-bench", 0o755)
"""


def test_a_source_archive_is_unpacked_built_once_and_reused(tmp_path, monkeypatch):
    import tarfile

    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in (("cmake", CMAKE), ("nvcc", "#!/bin/sh\n")):
        (tools / name).write_text(body.format(python=sys.executable))
        (tools / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    tree = tmp_path / "src" / "llama.cpp"
    tree.mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    archive = tmp_path / "llama.cpp.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="llama.cpp")
    lines = []
    built = llamacpp.build(archive, tmp_path / "dest", progress=lines.append)
    assert built == tmp_path / "dest" / "llama.cpp" / "build" / "bin" / "llama-bench"
    assert any("build: 40%" in line for line in lines) and any("build: 100%" in line for line in lines)
    assert "Configuring done" in (tmp_path / "dest" / "build.log").read_text()
    lines.clear()
    assert llamacpp.build(archive, tmp_path / "dest", progress=lines.append) == built
    assert lines == [f"llama.cpp: reusing {built}"]


def test_without_the_gguf_package_llama_cpps_own_gguf_py_serves(tmp_path, monkeypatch):
    tree = tmp_path / "llama.cpp"
    (tree / "gguf-py" / "gguf").mkdir(parents=True)
    (tree / "gguf-py" / "gguf" / "__init__.py").write_text("FROM_THE_TREE = True\n")
    binary = _stand_in(tree / "build" / "bin")
    monkeypatch.delitem(sys.modules, "gguf")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])  # not installed
    with pytest.raises(LlamaCppError, match="pip install gguf"):
        llamacpp.import_gguf(tmp_path / "elsewhere")
    assert llamacpp.import_gguf(binary).FROM_THE_TREE
    monkeypatch.delitem(sys.modules, "gguf")  # the stand-in goes; monkeypatch brings the real one back


def test_the_table_has_a_column_for_every_sweep_variant_and_rows_of_its_width():
    """Every variant the sweep runs (``graphs`` too) has its column; a skipped budget's row has as many cells;
    a line says how often each variant's CUDA graphs replayed."""
    from hetegen_fx.bench_sweep import SWEEP_VARIANTS, format_table

    run = {"decode_tok_s": 10.0, "decode_s_per_token": 0.1, "prefill_s": 0.5, "tokens_match_reference": True}
    graphs = {
        "recorded": 2,
        "replays": 3,
        "stretches": 3,
        "eager_keys": {},
        "pinned_inputs_moved": {"c": 2},
        "full": True,
    }
    summary = {
        "model": "tiny-llama", "dtype": "float32", "model_bytes": 1 << 20, "prompt_len": 8, "new_tokens": 4,
        "device": "cpu", "date": "2026-12-07", "torch": torch.__version__, "cpu_threads": 2, "llama_cpp": None,
        "points": [
            {"budget": "1MiB", "budget_bytes": 1 << 20, "variants": {"hetegen": run, "graphs": {**run, "decode_tok_s": 25.0, "cuda_graphs": graphs}}, "skipped": {}, "errors": {}},
            {"budget": "2KiB", "budget_bytes": 2048, "variants": {}, "reason": "below the minimum working set", "skipped": {"hetegen": "below the minimum working set"}, "errors": {}},
        ],
    }  # fmt: skip
    lines = format_table(summary).splitlines()
    header = next(line for line in lines if line.startswith("| budget"))
    assert all(f"| {name} tok/s |" in header for name in SWEEP_VARIANTS if name != "hetegen")
    rows = [line for line in lines if line.startswith("| 1MiB") or line.startswith("| 2KiB")]
    widths = {line.count("|") for line in (header, *rows)}
    assert widths == {header.count("|")}, (header, rows)
    graphs_at = header.split("|").index(" graphs tok/s ")
    assert rows[0].split("|")[graphs_at].strip() == "25.00"
    # how often the graphs replayed: a variant that barely did ran its kernels one launch at a time
    assert (
        "- 1MiB graphs: 2 recorded, 3 replays of 3 stretches; unrecorded keys: none; moved: 2; pool full"
        in lines
    )


def test_the_ratio_to_llama_cpp_is_the_fastest_hetegen_fx_variant_named_where_not_hetegen():
    """A budget where only `compiled` ran (all resident, say) still gets its ratio, prefill and memory; where
    several ran, the fastest of hetegen_fx's own variants counts (stream and cpu are baselines)."""
    from hetegen_fx.bench_sweep import best_variant, format_table

    def run(rate, prefill, peak):
        return {
            "decode_tok_s": rate, "decode_s_per_token": 1 / rate, "prefill_s": prefill, "peak_gpu_bytes": peak,
            "smi_process_bytes": peak + (512 << 20), "tokens_match_reference": True,
        }  # fmt: skip

    lc = {"decode_tok_s": 50.0, "ngl": 30, "prompt_s": 0.18, "gpu_delta_bytes": 12 << 30}
    summary = {
        "model": "llama-2-7b", "dtype": "float16", "model_bytes": 13 << 30, "prompt_len": 512, "new_tokens": 64,
        "device": "cuda", "date": "2026-12-07", "torch": torch.__version__, "cpu_threads": 16, "llama_cpp": None,
        "points": [
            {"budget": "8GiB", "budget_bytes": 8 << 30, "llama_cpp": lc, "skipped": {}, "errors": {},
             "variants": {"hetegen": run(60.0, 0.10, 7 << 30), "compiled": run(55.0, 0.11, 7 << 30), "stream": run(90.0, 0.2, 1 << 30)}},
            {"budget": "all", "budget_bytes": None, "llama_cpp": lc, "skipped": {}, "errors": {},
             "variants": {"compiled": run(48.0, 0.033, 12 << 30)}},
        ],
    }  # fmt: skip
    assert best_variant(summary["points"][0]["variants"])[0] == "hetegen"  # not the stream baseline
    assert best_variant({"stream": run(1.0, 1.0, 1)}) == (None, None)
    wrong = {**run(99.0, 0.1, 1), "tokens_match_reference": False}  # fast, but not the reference's tokens
    assert best_variant({"hetegen": run(10.0, 0.1, 1), "graphs": wrong})[0] == "hetegen"
    lines = format_table(summary).splitlines()
    header = next(line for line in lines if line.startswith("| budget")).split("|")
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith(("| 8GiB", "| all"))
    }
    ratio, prefill, peak = (header.index(f" {c} ") for c in ("best / llama.cpp", "prefill s best / llama.cpp", "peak GPU best torch / nvidia-smi"))  # fmt: skip
    assert rows["8GiB"][ratio].strip() == "1.20x"
    assert rows["all"][ratio].strip() == "0.96x (compiled)"
    assert rows["all"][prefill].strip() == "0.033 / 0.180"
    assert rows["all"][peak].strip() == "12.00 GiB / 12.50 GiB"
