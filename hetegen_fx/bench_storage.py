"""``hetegen bench --cpu-memory BYTES``: a model larger than the host memory it may use, its weights in a
safetensors checkpoint on the host's disk, side by side with the systems that do the same.

Owns: the checkpoint the run measures (the bench model's weights saved once under ``--storage-dir`` and kept
for later runs), the storage's read rate measured the way the storage tier reads, the page cache dropped
before each variant (``POSIX_FADV_DONTNEED`` on every file: what the variant reads comes from the drive), the
variants of this mode, each one's peak host memory (``VmHWM``, reset before it), the bound, and the report
(``bench_storage.json``, the table in ``bench.md`` and stdout, ``bench_storage.png``).

Variants (of ``--variants``; the others are left out with a line saying so):

* ``gpu``: the all-GPU model, for the reference tokens (when it fits the device);
* ``hetegen``: ``hetegen_fx.load(checkpoint, gpu_memory, cpu_memory)``: three tiers, balanced locking;
* ``layered``: the same with ``storage_policy="layered"`` (RAM filled layer by layer);
* ``accelerate``: HF Accelerate's disk offload: ``from_pretrained(device_map="auto", max_memory={gpu,
  "cpu": cpu_memory}, offload_folder=...)``;
* ``llama``: llama.cpp's ``llama-bench`` on a GGUF of the same weights with its default mmap, at the ``-ngl``
  that fits ``gpu_memory``, in a memory cgroup of ``cpu_memory`` (cgroup v2, as root), as FlexInfer measured
  its reference system.

The bound of the three-tier variant is its plan's: the storage bytes of a step at the measured read rate,
overlapped with the Linear work (:attr:`hetegen_fx.plan.Plan.predicted_seconds`).
Must not: time a generate any other way than the main table does (:func:`hetegen_fx.bench._time_generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .config import format_bytes, parse_bytes
from .plan import atomic_write

#: the variants of this mode, in the order they run
STORAGE_VARIANTS = ("gpu", "hetegen", "layered", "accelerate", "llama")
#: bytes read to measure the storage's rate for the record (the plan's own probe reads less)
RATE_BYTES = 1 << 30


def drop_cache(files: list[Path]) -> None:
    """Drop every page of ``files`` from the OS page cache (no root needed)."""
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _vm(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Reset the peak RSS to the current RSS (Linux ``/proc/self/clear_refs``); the RSS now, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _vm("VmRSS")


def save_checkpoint(model, folder: Path, log) -> Path:
    """The bench model's weights as a sharded safetensors checkpoint in ``folder``, written once (a folder
    that holds one of the same config is reused: a 13B takes minutes to write)."""
    config = folder / "config.json"
    if config.is_file() and any(folder.glob("*.safetensors")):
        saved = json.loads(config.read_text())
        if saved.get("num_hidden_layers") == model.config.num_hidden_layers and saved.get(
            "hidden_size"
        ) == getattr(model.config, "hidden_size", None):
            log(f"reusing the checkpoint in {folder}")
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"writing the checkpoint to {folder} ...")
    model.save_pretrained(folder, max_shard_size="2GB")
    log(f"wrote the checkpoint in {time.perf_counter() - t0:.1f} s")
    return folder


def read_rate(folder: Path) -> dict:
    """The storage's read rate as the storage tier reads (cut across its threads, pages dropped after each
    read), over up to :data:`RATE_BYTES` of the checkpoint's largest tensors, and one small read's latency."""
    from .checkpoint import Checkpoint
    from .prefetch import DEFAULT_THREADS, Item, StorageReader, measure_reads

    with Checkpoint.open(folder) as ckpt:
        names = sorted(ckpt.names(), key=lambda n: -ckpt.entry(n).nbytes)
        probe = measure_reads(ckpt, names[:8])
        done, seconds = 0, 0.0
        for name in names:
            e = ckpt.entry(name)
            if done >= RATE_BYTES or not e.shape:
                break
            item = Item(name, (0, e.shape[0]), e.shape, e.dtype)
            reader = StorageReader(ckpt, [item], slots=1, threads=DEFAULT_THREADS)
            try:
                out = torch.empty(e.shape, dtype=e.dtype)
                t0 = time.perf_counter()
                reader._read(item, out)
                seconds += time.perf_counter() - t0
                done += e.nbytes
            finally:
                reader.close()
    return {"rate": done / seconds if seconds else 0.0, "bytes": done, **probe}


def _timed(name: str, runner, ids, args, device, cache=None) -> dict:
    from .bench import _time_generate

    new = args.accelerate_tokens if name == "accelerate" else args.new_tokens
    prefill, decode, tokens, _ = _time_generate(runner, ids, new, device, args.reps, cache)
    return {"prefill_s": prefill, "decode_tok_s": 1.0 / decode, "tokens": tokens}


def _hetegen(name: str, folder: Path, ids, args, device) -> dict:
    import hetegen_fx
    from hetegen_fx.store import find_store

    policy = "layered" if name == "layered" else "balanced"
    t0 = time.perf_counter()
    compiled = hetegen_fx.load(
        folder,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
        storage_policy=policy,
        storage_slots=args.storage_slots,
        device=str(device),
        max_seq_len=args.prompt_len + args.new_tokens + 8,
        cpu_threads=args.cpu_threads,
        progress=False,
    )
    with torch.no_grad():
        compiled.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    r = {"setup_s": time.perf_counter() - t0, **_timed(name, compiled, ids, args, device)}
    plan = hetegen_fx.explain(compiled).plan
    r.update(
        storage_bytes=plan.storage_bytes,
        storage_s=plan.storage_seconds,
        bound_s=plan.predicted_seconds,
        storage=plan.storage,
        tiers={t: sum(lp.tier == t for lp in plan.layers) for t in ("gpu", "ram", "ram+storage", "storage")},
        plan_table=plan.table(),
    )
    reader = find_store(list(compiled.parameters())).storage_reader
    if reader is not None:
        s = reader.stats()
        r["reader"] = {"reads": s.reads, "bytes": s.bytes, "steps": s.passes, "waited_s": s.waited_s}
        reader.close()
    del compiled
    return r


def _accelerate(folder: Path, ids, args, device) -> dict:
    from transformers import AutoModelForCausalLM

    from .bench import DTYPES

    offload = Path(tempfile.mkdtemp(prefix="hetegen-offload-", dir=args.storage_dir))
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=DTYPES[args.dtype],
            device_map="auto",
            max_memory={device.index or 0: args.gpu_memory, "cpu": args.cpu_memory},
            offload_folder=str(offload),
            local_files_only=True,
        )
        drop_cache(list(offload.rglob("*")))
        r = {"setup_s": time.perf_counter() - t0, **_timed("accelerate", model, ids, args, device)}
        r["offloaded_to_disk"] = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())
        del model
        return r
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def _llama(foot, args, gguf: Path) -> dict:
    """llama-bench with mmap at the -ngl that fits the budget, in a memory cgroup of cpu_memory."""
    from . import llamacpp

    binary = llamacpp.find_binary(args.llama_cpp)
    if binary is None:
        return {"skipped": "no llama-bench (--llama-cpp: a built binary or its folder)"}
    cgroup = Path("/sys/fs/cgroup")
    if not (cgroup / "cgroup.controllers").is_file() or not os.access(cgroup, os.W_OK):
        return {"skipped": "no writable cgroup v2 hierarchy (needs root on a cgroup v2 host)"}
    group = cgroup / f"hetegen-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.max").write_text(str(args.cpu_memory))
        ngl = llamacpp.ngl_for_budget(parse_bytes(args.gpu_memory), foot)
        if ngl is None:
            return {"skipped": f"not even -ngl 0 fits gpu_memory {args.gpu_memory}"}
        drop_cache([gguf])
        wrapper = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
        r = llamacpp.run_bench(
            binary,
            gguf,
            ngl,
            threads=args.cpu_threads or os.cpu_count() or 1,
            prompt=args.prompt_len,
            new=args.new_tokens,
            reps=1,
            prefix=wrapper,
        )
        r["cgroup_memory_max"] = args.cpu_memory
        return r
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


def run_storage(args: argparse.Namespace, out_dir: Path) -> int:
    """The storage mode of the bench (see the module)."""
    from .bench import _free, _log, run_facts, run_variant, setup

    device = torch.device(args.device)
    args.cpu_memory = parse_bytes(args.cpu_memory, "--cpu-memory")
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [v for v in STORAGE_VARIANTS if v in asked]
    left_out = [v for v in asked if v not in STORAGE_VARIANTS]
    if left_out:
        _log(f"--cpu-memory runs {', '.join(STORAGE_VARIANTS)}: leaving out {', '.join(left_out)}")
    args.storage_dir = str(Path(args.storage_dir or out_dir / "checkpoint").expanduser())
    model, ids, model_bytes, build_s, ceilings = setup(args, device)
    name = Path(args.model).name if args.model else args.preset
    folder = save_checkpoint(model, Path(args.storage_dir) / f"{name}-{args.dtype}", _log)
    rate = read_rate(folder)
    _log(
        f"storage: {format_bytes(rate['rate'])}/s over {format_bytes(rate['bytes'])}, a small read "
        f"{rate['read_latency'] * 1e3:.2f} ms"
    )
    results: dict[str, dict] = {}
    if "gpu" in variants:
        try:
            results["gpu"] = run_variant("gpu", model, ids, args, device)
        except Exception as e:
            traceback.print_exc()
            results["gpu"] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        model.to("cpu")
        _free(device)
    gguf = foot = None
    if "llama" in variants:
        from . import llamacpp

        try:
            foot = llamacpp.footprint(model, args.prompt_len + args.new_tokens)
            gguf = Path(args.storage_dir) / "model.gguf"
            if not gguf.is_file():
                llamacpp.write_gguf(model, gguf, progress=_log, name=args.model or args.preset)
        except llamacpp.LlamaCppError as e:
            results["llama"] = {"skipped": str(e)}
            variants.remove("llama")
    files = sorted(folder.glob("*.safetensors"))
    del model  # the storage variants must not find the weights in this process's memory
    for name in [v for v in variants if v != "gpu"]:
        if name in ("accelerate", "llama") and device.type != "cuda":
            results[name] = {"skipped": "a GPU peer: runs on CUDA only"}
            continue
        _log(f"running {name} ...")
        drop_cache(files)
        base = _reset_peak()
        try:
            if name in ("hetegen", "layered"):
                r = _hetegen(name, folder, ids, args, device)
            elif name == "accelerate":
                r = _accelerate(folder, ids, args, device)
            else:
                r = _llama(foot, args, gguf)
        except Exception as e:
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        peak = _vm("VmHWM")
        if base is not None and peak is not None and name != "llama":
            r["peak_host_bytes"] = peak - base
        results[name] = r
        _free(device)
        if "decode_tok_s" in r:
            _log(f"{name}: prefill {r['prefill_s']:.3f} s, decode {r['decode_tok_s']:.3f} tok/s")
        else:
            _log(f"{name}: {r.get('skipped') or r.get('error')}")
    ref = results.get("gpu", {}).get("tokens") or results.get("hetegen", {}).get("tokens")
    for r in results.values():
        if "tokens" in r and ref is not None:
            n = min(len(r["tokens"]), len(ref))
            r["tokens_match_reference"] = r["tokens"][:n] == ref[:n]
    summary = {
        **run_facts(args, device, model_bytes, build_s),
        "gpu_memory": parse_bytes(args.gpu_memory),
        "cpu_memory": args.cpu_memory,
        "ceilings": ceilings,
        "storage_read": rate,
        "reference": "gpu" if results.get("gpu", {}).get("tokens") else "hetegen",
        "results": results,
    }
    atomic_write(out_dir / "bench_storage.json", json.dumps(summary, indent=1))
    table = format_table(summary)
    (out_dir / "bench.md").write_text(table + "\n")
    chart(summary, out_dir / "bench_storage.png")
    print(table)
    return 0


def format_table(s: dict) -> str:
    rows = [
        f"{s['model']} {s['dtype']} ({format_bytes(s['model_bytes'])}), gpu_memory "
        f"{format_bytes(s['gpu_memory'] or 0)}, cpu_memory {format_bytes(s['cpu_memory'])}, prompt "
        f"{s['prompt_len']}, {s['device']}, {s['date']}, storage read {format_bytes(s['storage_read']['rate'])}/s",
        "",
        "| variant | prefill s | decode tok/s | vs accelerate | bound tok/s | share of bound | read per step "
        "| peak host | tokens = ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    acc = s["results"].get("accelerate", {}).get("decode_tok_s")
    for name, r in s["results"].items():
        if "decode_tok_s" not in r:
            rows.append(f"| {name} | {r.get('skipped') or r.get('error', '?')} |||||||| ")
            continue
        bound = 1 / r["bound_s"] if r.get("bound_s") else None
        rows.append(
            f"| {name} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.3f} | "
            + (f"{r['decode_tok_s'] / acc:.2f}x" if acc and name != "accelerate" else "-")
            + f" | {f'{bound:.3f}' if bound else '-'} | "
            + (f"{r['decode_tok_s'] / bound:.0%}" if bound else "-")
            + f" | {format_bytes(r['storage_bytes']) if r.get('storage_bytes') else '-'} | "
            + (format_bytes(r["peak_host_bytes"]) if r.get("peak_host_bytes") is not None else "-")
            + f" | {'yes' if r.get('tokens_match_reference') else 'NO' if 'tokens_match_reference' in r else '-'} |"
        )
    return "\n".join(rows)


def chart(s: dict, path: Path) -> None:
    from .errors import HetegenError
    from .plot import _pyplot

    try:
        plt = _pyplot()
    except HetegenError:
        return
    res = {n: r for n, r in s["results"].items() if "decode_tok_s" in r and n != "gpu"}
    if not res:
        return
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = list(res)
    ax.bar(names, [r["decode_tok_s"] for r in res.values()], color="#1565c0")
    for i, r in enumerate(res.values()):
        if r.get("bound_s"):
            ax.plot([i - 0.4, i + 0.4], [1 / r["bound_s"]] * 2, color="#c62828", lw=2)
    ax.set_ylabel("decode tok/s")
    ax.set_title(
        f"{s['model']} {s['dtype']}: gpu {format_bytes(s['gpu_memory'] or 0)}, cpu {format_bytes(s['cpu_memory'])}"
        " (red: bound)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
