"""Loading straight from a safetensors checkpoint (``hetegen_fx.load``, ``hetegen_fx.checkpoint``): a tiny
random model saved sharded loads to eager's greedy tokens with Linears offloaded; the index agrees with
safetensors' own reader bit for bit; row reads equal slicing; bad checkpoints are clear errors that leave the
folder as it was; loading holds no second copy of the weights (peak RSS of a subprocess)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hetegen_fx
from hetegen_fx.checkpoint import Checkpoint, CheckpointError, build_model

NEW_TOKENS = 6


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _save(model, folder: Path, shard: str | None = "50KB") -> Path:
    if shard is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _listing(folder: Path) -> list[tuple[str, int, int, int]]:
    """Every file under ``folder``: name, size, mtime, mode."""
    return sorted(
        (str(p.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_mode)
        for p in folder.rglob("*")
        for st in [p.stat()]
    )


def _generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def _shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def _edit_header(file: Path, edit) -> None:
    """Rewrite the JSON header of a safetensors file in place through ``edit(header)``, keeping its length
    (padded with spaces, as safetensors pads it) so the data offsets stay valid."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    file.write_bytes(raw[:8] + new.ljust(n, b" ") + raw[8 + n :])


# -- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_load_gives_eager_greedy_tokens_with_linears_offloaded(arch, tiny_hf, tmp_path):
    model = tiny_hf(arch)
    folder = _save(model, tmp_path / arch)
    assert len(list(folder.glob("*.safetensors"))) > 2  # sharded
    before = _listing(folder)
    ids = torch.randint(3, 128, (1, 7))
    ref = _generate(model, ids)
    compiled = hetegen_fx.load(
        folder, gpu_memory=_nbytes(model), device="cpu", max_seq_len=64, profile="model", progress=False
    )
    assert torch.equal(_generate(compiled, ids), ref)
    plans = hetegen_fx.explain(compiled).plans
    assert plans and all(any(not lp.resident for lp in p.layers) for p in plans), plans[0].table()
    assert _listing(folder) == before  # nothing written into the checkpoint folder


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_build_model_holds_the_saved_tensors_ties_and_buffers(arch, tiny_hf, tmp_path):
    model = tiny_hf(arch)
    built = build_model(_save(model, tmp_path), progress=False)
    want, got = model.state_dict(), built.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    for (name, a), (_, b) in zip(model.named_buffers(), built.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # non-persistent buffers (rotary inv_freq) computed as HF does
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert (built.lm_head.weight is built.get_input_embeddings().weight) == tied
    assert not built.training and built.generation_config.pad_token_id == model.generation_config.pad_token_id


def test_bfloat16_checkpoint_read_as_stored_or_cast(tiny_hf, tmp_path):
    model = tiny_hf("llama").to(torch.bfloat16)
    folder = _save(model, tmp_path)
    assert (
        next(build_model(folder, progress=False).parameters()).dtype == torch.bfloat16
    )  # dtype=None: as stored
    built = build_model(folder, dtype=torch.float32, progress=False)
    assert all(
        p.dtype == torch.float32 and torch.equal(p, model.get_parameter(n).float())
        for n, p in built.named_parameters()
    )


def test_a_base_model_checkpoint_loads_under_the_lm_heads_prefix(tiny_hf, tmp_path):
    """Keys saved from the base model (GPT-2 on the hub: ``h.0...`` for ``transformer.h.0...``) and a buffer
    old versions saved (``attn.bias``) load as transformers loads them."""
    from safetensors.torch import save_file

    model = tiny_hf("gpt2")
    folder = _save(model, tmp_path, shard=None)
    state = {
        k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file({**state, "h.0.attn.bias": torch.ones(1, 1, 4, 4)}, folder / "model.safetensors")
    built = build_model(folder, progress=False)
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in model.state_dict().items())


# -- the index and reads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_and_reads_match_safetensors_bit_for_bit(dtype, tiny_hf, tmp_path):
    from safetensors import safe_open

    folder = _save(tiny_hf("gpt2").to(dtype), tmp_path)
    with Checkpoint.open(folder) as ckpt:
        total = 0
        for file in ckpt.files():
            with safe_open(file, framework="pt") as f:
                assert set(f.keys()) == {n for n in ckpt.names() if ckpt.entry(n).file == file}
                for name in f.keys():
                    ref, entry = f.get_tensor(name), ckpt.entry(name)
                    assert (entry.dtype, entry.shape, entry.nbytes) == (
                        ref.dtype,
                        tuple(ref.shape),
                        ref.nbytes,
                    )
                    raw = file.read_bytes()[entry.offset : entry.offset + entry.nbytes]
                    assert raw == ref.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    got = ckpt.read(name)
                    assert torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))
                    out = torch.empty_like(ref)
                    assert ckpt.read(name, out=out) is out and torch.equal(out, ref)
                    total += ref.nbytes
        stats = ckpt.stats()
        assert stats.bytes == 2 * total and stats.reads == 2 * len(ckpt) and stats.rate > 0
        assert ckpt.nbytes == total


def test_read_rows_equals_slicing(tiny_hf, tmp_path):
    folder = _save(tiny_hf("llama"), tmp_path)
    with Checkpoint.open(folder) as ckpt:
        name = "model.layers.0.mlp.gate_proj.weight"
        full = ckpt.read(name)
        rows = full.shape[0]
        for start, stop in [(0, rows), (3, 17), (rows - 1, rows), (5, 5)]:
            assert torch.equal(ckpt.read(name, rows=(start, stop)), full[start:stop])
        out = torch.empty(10, full.shape[1])
        assert ckpt.read(name, out=out, rows=(20, 30)) is out and torch.equal(out, full[20:30])
        before = ckpt.stats()
        ckpt.read(name, rows=(0, 4))
        assert ckpt.stats().bytes - before.bytes == 4 * full.shape[1] * 4  # only the rows asked for
        with pytest.raises(hetegen_fx.ConfigError, match=r"rows=\(5, 999\) is outside"):
            ckpt.read(name, rows=(5, 999))
        with pytest.raises(hetegen_fx.ConfigError, match=r"out= for .* must be a contiguous CPU tensor"):
            ckpt.read(name, out=torch.empty(10, full.shape[1], dtype=torch.float16), rows=(0, 10))


# -- bad checkpoints ---------------------------------------------------------------------------------------------


def _missing_shard(folder: Path) -> str:
    shard = _shard_of(folder, "model.layers.1.mlp.up_proj.weight")
    shard.unlink()
    return rf"names 1 shard\(s\) that are not there: {shard.name}; the checkpoint is incomplete"


def _truncated(folder: Path) -> str:
    shard = _shard_of(folder, "model.layers.1.mlp.up_proj.weight")
    os.truncate(shard, shard.stat().st_size - 100)
    return rf"{shard.name} is truncated: tensor model.layers.1.mlp.up_proj.weight ends at byte \d+, the file holds"


def _garbled_header(folder: Path) -> str:
    shard = _shard_of(folder, "model.norm.weight")
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("x")  # the header's opening brace
    shard.write_bytes(bytes(raw))
    return rf"{shard.name} is not a readable safetensors file \(the header is not JSON"


def _wrong_shape(folder: Path) -> str:
    name = "model.layers.0.self_attn.k_proj.weight"  # [32, 64] in the model, [64, 32] in the edited header

    def transpose(header):
        header[name]["shape"] = header[name]["shape"][::-1]

    _edit_header(_shard_of(folder, name), transpose)
    return rf"tensor {name} \(.*\) has shape \[64, 32\], but LlamaForCausalLM .* expects \[32, 64\]"


def _missing_tensor(folder: Path) -> str:
    name = "model.norm.weight"
    _edit_header(_shard_of(folder, name), lambda header: header.pop(name))
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][name]
    index.write_text(json.dumps(data))
    return rf"has no tensor for {name} \(expected by LlamaForCausalLM"


def _index_names_a_tensor_its_shard_lacks(folder: Path) -> str:
    name = "model.norm.weight"
    _edit_header(_shard_of(folder, name), lambda header: header.pop(name))
    return rf"places tensor {name} in .*, whose header does not hold it"


def _unreadable(folder: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode")
    shard = _shard_of(folder, "model.embed_tokens.weight")
    shard.chmod(0)
    return rf"cannot read .*{shard.name} \(permission denied\): make it readable"


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return r"has no config.json: the model's architecture comes from it"


def _no_weights(folder: Path) -> str:
    for p in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        p.unlink()
    return r"has neither model.safetensors nor model.safetensors.index.json"


BAD = [
    _missing_shard,
    _truncated,
    _garbled_header,
    _wrong_shape,
    _missing_tensor,
    _index_names_a_tensor_its_shard_lacks,
    _unreadable,
    _no_config,
    _no_weights,
]


@pytest.mark.parametrize("damage", BAD, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_checkpoint_is_a_clear_error_and_the_folder_is_left_as_it_was(damage, tiny_hf, tmp_path):
    folder = _save(tiny_hf("llama"), tmp_path / "ckpt")
    try:
        message = damage(folder)
        before = _listing(folder)
        with pytest.raises(CheckpointError, match=message):
            hetegen_fx.load(folder, gpu_memory="1MiB", device="cpu", progress=False)
        assert _listing(folder) == before
    finally:
        for p in folder.iterdir():
            p.chmod(0o644)


def test_a_file_the_user_cannot_read_is_named_also_when_running_as_root(tiny_hf, tmp_path, monkeypatch):
    """The error of ``_unreadable`` above, with the refusal simulated (root reads a file whatever its mode)."""
    folder = _save(tiny_hf("llama"), tmp_path)
    shard = _shard_of(folder, "model.embed_tokens.weight")
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if Path(path) == shard:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name} \(permission denied\)"):
        hetegen_fx.load(folder, gpu_memory="1MiB", device="cpu", progress=False)


def test_no_folder_and_bad_options_fail_before_any_read(tiny_hf, tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint folder at .*: give the folder that holds"):
        hetegen_fx.load(tmp_path / "nothing", gpu_memory="1MiB", device="cpu", progress=False)
    folder = _save(tiny_hf("llama"), tmp_path / "ckpt", shard=None)
    with pytest.raises(hetegen_fx.ConfigError, match="unknown hetegen option"):
        hetegen_fx.load(folder, gpu_memory="1MiB", device="cpu", progress=False, gpu_memroy="2MiB")


# -- host memory -------------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    import hetegen_fx, hetegen_fx.backend
    from transformers import AutoConfig, AutoModelForCausalLM
    from hetegen_fx.checkpoint import build_model

    path = sys.argv[1]

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset():  # the peak RSS (VmHWM) back to the current RSS: Linux >= 4.0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm("VmRSS")

    def peak():
        return vm("VmHWM")

    with torch.device("meta"):  # the architecture's modules imported: the baseline holds them
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    out = {}
    base = reset()
    compiled = hetegen_fx.load(path, gpu_memory=1 << 20, device="cpu", progress=False)
    out["load"] = peak() - base
    base = reset()
    model = build_model(path, progress=False)
    out["build"] = peak() - base
    base = reset()
    half = build_model(path, dtype=torch.bfloat16, progress=False)
    out["build_bf16"] = peak() - base
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loading_holds_no_second_copy_of_the_weights(tmp_path):
    """Peak RSS (``VmHWM``) of a subprocess over its RSS after importing torch, transformers and hetegen_fx,
    the peak reset through ``/proc/self/clear_refs`` before each load so that the imports' own peak does not
    hide the load's (``ru_maxrss`` cannot be reset: it also keeps the peak of threads that have exited), for a
    20 MiB float32 Llama in 6 shards:

    * ``build_model``: at most the model's bytes + 8 MiB. The 8 MiB is bookkeeping independent of the model's
      size: the module skeleton, the parsed headers, the state-dict views, first-use imports (measured 4-5 MiB
      in a fresh process, for this model and for a 128 MiB one alike; 0.3 MiB here, after a first load);
    * ``build_model(dtype=torch.bfloat16)``: at most the model's bf16 bytes + its largest float32 tensor (the
      one tensor read before it is cast) + 8 MiB;
    * ``hetegen_fx.load``: at most the model's bytes + 32 MiB: the 8 MiB above plus what the first
      ``torch.compile`` of the process imports and builds (measured 22 MiB in all, the same for both sizes).

    A second copy of the weights (a state dict, a mapped file read through) would add another 20 MiB."""
    from hetegen_fx.models import build_random

    model = build_random(
        "llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=4096,
    )
    nbytes = _nbytes(model)
    largest = max(p.nbytes for p in model.parameters())
    folder = _save(model, tmp_path / "ckpt", shard="4MB")
    del model
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert got["build"] <= nbytes + 8 * mib, (got, nbytes)
    assert got["build_bf16"] <= nbytes // 2 + largest + 8 * mib, (got, nbytes)
    assert got["load"] <= nbytes + 32 * mib, (got, nbytes)
    assert got["build"] >= nbytes  # the weights were really read into memory
