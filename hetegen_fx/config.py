"""Compiler settings: one dataclass, passed explicitly through the pipeline."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str | None, name: str = "the value") -> int | None:
    """Parse a byte count: ``6442450944``, ``"6GiB"``, ``"6 GB"``, ``"512MiB"`` (None stays None). ``name``
    (the option's) goes into the error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ConfigError(f"{name} must be a number of bytes or a string like '6GiB', not {value!r}")
    if isinstance(value, numbers.Real):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite, non-negative number of bytes, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read {value!r} as a byte count for {name}; write e.g. 6GiB, 512MiB, 8GB or a plain number "
            "of bytes"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int | float) -> str:
    """Human-readable binary size."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, eq=True)
class Config:
    """Settings of one compilation, checked when built and never changed after (frozen: a changed setting is a
    new Config, ``dataclasses.replace(config, max_seq_len=512)``, which is checked again).

    gpu_memory: the accelerator memory hetegen_fx may use (weights, KV cache, activations, staging);
        ``None`` means "all of the device's free memory".
    device: the accelerator ("cuda", "cuda:1"); "cpu" runs the GPU side on the CPU, for testing.
    frontend: "auto", "fx" (torch.fx.symbolic_trace), "export" (torch.export) or "dynamo".
    profile: "auto" (measure when the device exists, else the hardware model), "measure" or "model".
    alpha: force one CPU share for every offloaded Linear (0 = stream everything, 1 = CPU only);
        ``None`` chooses α per CPU job from the profile.
    job_overhead: seconds a CPU job costs the CPU lane beyond its GEMVs (the hand-offs between the device and
        the worker, and the device work between two jobs, while the CPU waits for its next input); the Linears
        of one job get the α that balances their CPU time, this included, against their copies. ``None``:
        the device kind's (:class:`hetegen_fx.costs.HardwareModel`; 0 on the emulated device "cpu").
    stream_jobs: at decode shapes, stream a CPU job (α = 0) whose copies fit beside the CPU part of the job
        before it, when the lane model says the step gets shorter, and raise that job's α to cover them
        (:meth:`hetegen_fx.passes.PlacementPass._stream_jobs`): fewer hand-offs between the device and the
        worker. ``False``: every job balanced on its own. Ignored when ``alpha`` is forced.
    block_jobs: in decode graphs (at most 4 tokens), run each offloaded MLP (gate/up, an activation the worker
        knows, down) as one CPU job where the lane model says the step gets no longer, or every one when
        ``alpha`` is forced (:mod:`hetegen_fx.blocks`): the CPU computes its share of the intermediate
        features from gate/up's rows to down's columns, a partial sum of the output, and the device the rest;
        one hand-off instead of two, and no wait for the device inside the MLP. Down's host weight is kept a
        second time, as its two column parts. Off by default: one run on an H100 host (2026-12-07) gave
        12.54 against 12.09 tok/s on a 7B at 6 GiB, within noise.
    prefetch: how far copies run ahead of the compute. The GPU parts of offloaded Linears are copied into a
        staging arena on the device, one after the other; a number sizes it for that many consecutive parts.
        ``None``: twice the largest part, which holds several of the usual smaller ones.
    max_seq_len: the most tokens a KV cache is reserved for. The cache is reserved by use, at the size class of
        what each call needs (:mod:`hetegen_fx.residency`); this is the limit of those classes. ``None``: the
        model's limit, capped at 4096 (no limit when the model is not known, e.g. through the backend).
    batch_size: the least number of sequences the KV-cache reserve is sized for (a call's own count is used
        when it is larger).
    activation_reserve: bytes kept free for activations; ``None`` estimates it from the graph.
    cpu_threads: intra-op threads of the worker thread that runs the CPU parts (it calls
        ``torch.set_num_threads`` itself; compiling leaves the caller's setting alone, which dynamo requires).
        ``None``: on CUDA three quarters of the cores (the rest launch GPU work), on the emulated device torch's
        own setting.
    plan: a Plan (or a path to its JSON) to apply instead of profiling and placing.
    output_device: where outputs go. "input": back to the device the inputs came from. "accelerator": left
        on the accelerator. "auto" (the torch.compile backend's default): outputs computed from the graph's
        last Linear (e.g. logits) go back to the inputs' device; other outputs (state such as an HF KV cache)
        stay on the accelerator behind host stand-ins (:func:`hetegen_fx.runtime.park`), so the host-resident
        model stays traceable and the state is never copied.
    cuda_graphs: record the stretches of device work between hand-offs as CUDA graphs and replay them, one
        launch each (:mod:`hetegen_fx.graphs`); they replay where shapes repeat, e.g. decode steps with HF's
        static cache (``generate(..., cache_implementation="static")``). Off by default: on the H100 host
        they halved a fully resident 7B decode step and left a 6 GiB split one as it was
        (docs/benchmarks-history.md, 2026-11-22, commit 7605416).
    compile_stretches: compile the stretches of device work between hand-offs (norms, rotary embedding,
        attention, residual adds, cache updates, resident Linears) with inductor, the compiler behind
        ``torch.compile`` (:mod:`hetegen_fx.inductor`): each shape at its second call, so decode steps run
        fused kernels and a prompt length seen once runs op by op; with ``cuda_graphs`` the graphs record
        inductor's code. Compiled code is cached on disk by inductor (``TORCHINDUCTOR_CACHE_DIR``). Off by
        default: the first calls compile for about a minute. On the H100 host (7B fp16, 2026-12-07, commit
        4483601), with ``cuda_graphs``, it decoded at 71.0 tok/s fully resident against 29.6 op by op.
    cudnn_attention: whether ``scaled_dot_product_attention`` may pick its cuDNN backend inside the compiled
        graphs. cuDNN builds an execution plan for every new shape: with a growing KV cache (HF's
        DynamicCache) that is every decode token, 36-57 ms of the launching thread's time per new length on
        the H100 host (torch 2.11), against 0.1 ms for the flash kernel torch picks without it
        (docs/benchmarks-history.md, 2026-11-22, commit 450b82b). Over a static cache a graph's shapes
        never change, the plan is built once, and cuDNN's kernel is the fast one: a masked decode step's
        attention took 11.2 µs a layer against the memory-efficient kernel's 29.0 over 584 slots, 13.1
        against 44.7 over 1024 and 28.6 against 167.1 over 4096 (H100 host, 2026-12-07, fp16, 32 heads of
        128, in a CUDA graph). "auto" (default): allowed in the graphs whose attention shapes dynamo fixed
        (:func:`hetegen_fx.graph_utils.attention_shapes_repeat`: the decode steps over a static cache, one
        graph per size class, and a prefill of the first prompt length), off in the others (a prompt length
        dynamo made symbolic after seeing a second one, a cache grown by concatenation, a graph traced
        without dynamo);
        ``True``: allowed everywhere; ``False``: off everywhere. Where it is off the graphs switch it off
        while they run and restore the caller's setting after. The setting is torch's, for the whole
        process: another thread's attention running meanwhile sees it off too, and two threads running
        compiled graphs at once may leave it on for part of one's call (a matter of speed only).
    host_embeddings: keep embedding tables (an LM's token embedding) in host memory and look the tokens up on
        the CPU: only the looked-up rows cross to the device, and the table's bytes go to resident weights
        instead (250 MiB for a Llama-2-7B). A table tied to ``lm_head`` counts once, as that Linear's
        weight. Tables whose indices the graph computes (learned positions) stay on the device. The indices
        come from the caller's host tensors where they are there already (HF's ``generate`` with a host
        model); ones on the device are read back first. "auto" (default): on the host unless the budget
        holds every Linear resident with the tables on the device too, beside the largest KV cache the
        model may hold (then no weight would use their bytes, and a step saves the lookup and the rows'
        copy: a fully resident 7B step took 13.29 against 13.63 ms, one run each, H100 host, 2026-12-08,
        tree c34c970), and none is tied to a Linear; decided by the model's first placement. ``True``:
        always on the host. ``False``: on the device, also the tables a given ``plan`` looked up on the
        host (and reserves them).
    graph_memory: bytes the graphs' memory pool may grow by (reserved from the budget); ``None``: 1/16 of
        the budget, at most 128 MiB, and none (no graphs) below 48 MiB.
    kv_cache: the KV cache ``generate()`` of a compiled Hugging Face model uses when the call names none.
        "static": HF's StaticCache of the call's size class (``max_seq_len`` the limit; with ``cuda_graphs``
        handed on, reset, to the next call of that class and batch unless the caller kept it; a call that
        needs more gets
        ``cache_implementation="static"``), written in place, so the budget reserves one copy of it and the
        compiled graphs serve every call; "dynamic": HF's default DynamicCache, extended by concatenation, so a step
        holds the cache it was given and the one it returns and the reserve is twice as large. "auto"
        (default): "static" for models whose HF class can be compiled whole (``_can_compile_fullgraph``)
        and whose ``generation_config`` names no cache, else HF's choice. On the H100 host a 7B split at
        6 GiB stepped in 0.951 of the DynamicCache's time with it (292 MiB more resident weights at 584
        tokens; docs/benchmarks-history.md, 2026-11-22, commit 63e61b2). Only :func:`hetegen_fx.compile` applies it (on its
        copy of the model); the torch.compile backend leaves ``generate()`` alone.
    cpu_memory: host memory the model's weights may take (bytes or "16GiB"), for a model whose Linear
        weights stay in their checkpoint until placed (:func:`hetegen_fx.load` with ``cpu_memory``). Rows
        that do not fit stay in storage and are read ahead of use, every step, into a ring of host slots
        (:mod:`hetegen_fx.prefetch`) counted in it. ``None``: no storage tier (every offloaded weight in RAM).
    storage_policy: which rows stay in RAM when some must stay in storage. "balanced" (default): the same
        share of every Linear of a kind (``q_proj``, ``down_proj``, ...), so every layer reads the same bytes
        from storage and reads spread evenly over a step; kinds whose reads cost the most time per byte (the
        smallest, where each read's latency weighs most) are kept first. "layered": RAM filled layer by
        layer in graph order, the later layers read whole (the obvious alternative, for comparison).
    storage_slots: slots of the storage ring (reads run that many storage parts ahead); ``None``: 6.
    pipeline_stage: this process's part of a layout over several processes, ``{"rank": r, "layout": [[start,
        stop, tp], ...]}`` (stages in order, each its decoder layers and tensor-parallel degree) or
        ``{"rank": r, "ranks": n, "layers": [start, stop]}`` (stage r of n, no TP): only its stage's decoder
        layers are compiled, with TP > 1 only its share of their heads and MLP width, and the hidden state
        goes between the stages over torch.distributed (:mod:`hetegen_fx.distributed`;
        :func:`hetegen_fx.distributed.compile_stage` fills it in). ``None``: the whole model in this process.
    cache_dir: where measured profiles are cached (default ``~/.cache/hetegen_fx``).
    verbose: print progress of long steps.
    """

    gpu_memory: int | None = None
    device: str = "cuda"
    frontend: str = "auto"
    profile: str = "auto"
    alpha: float | None = None
    job_overhead: float | None = None
    stream_jobs: bool = True
    block_jobs: bool = False
    prefetch: int | None = None
    max_seq_len: int | None = None
    batch_size: int = 1
    activation_reserve: int | None = None
    cpu_threads: int | None = None
    plan: Any = None
    output_device: str = "input"
    cuda_graphs: bool = False
    compile_stretches: bool = False
    cudnn_attention: bool | str = "auto"
    host_embeddings: bool | str = "auto"
    graph_memory: int | None = None
    kv_cache: str = "auto"
    cpu_memory: int | None = None
    storage_policy: str = "balanced"
    storage_slots: int | None = None
    pipeline_stage: dict | None = None
    cache_dir: str | None = None
    verbose: bool = False
    extra: dict = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        for name in (
            "gpu_memory",
            "activation_reserve",
            "graph_memory",
            "cpu_memory",
        ):  # the only normalisation: bytes
            object.__setattr__(self, name, parse_bytes(getattr(self, name), name))
        for flag in (
            "cuda_graphs",
            "compile_stretches",
            "stream_jobs",
            "block_jobs",
            "verbose",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        _check_choice("frontend", self.frontend, ("auto", "fx", "export", "dynamo"))
        _check_choice("profile", self.profile, ("auto", "measure", "model"))
        _check_choice("output_device", self.output_device, ("input", "accelerator", "auto"))
        _check_choice("kv_cache", self.kv_cache, ("auto", "static", "dynamic"))
        for name in ("cudnn_attention", "host_embeddings"):
            value = getattr(self, name)
            if value not in (True, False, "auto") or type(value) not in (bool, str):
                raise ConfigError(f"{name} must be True, False or 'auto', got {value!r}")
        _check_choice("storage_policy", self.storage_policy, ("balanced", "layered"))
        _check_int("storage_slots", self.storage_slots, 1, "a count of ring slots of at least 1, or None")
        _check_stage(self.pipeline_stage)
        _check_number("alpha", self.alpha, 0.0, 1.0, "a CPU share in [0, 1], or None to profile it")
        _check_number("job_overhead", self.job_overhead, 0.0, 1.0, "seconds in [0, 1] (e.g. 3e-4), or None")
        _check_int("prefetch", self.prefetch, 1, "a count of GPU parts of at least 1, or None")
        _check_int("cpu_threads", self.cpu_threads, 1, "a thread count of at least 1, or None")
        _check_int("max_seq_len", self.max_seq_len, 1, "a token count of at least 1, or None")
        _check_int("batch_size", self.batch_size, 1, "a count of sequences of at least 1", optional=False)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ConfigError(f"cache_dir must be a folder path or None, got {self.cache_dir!r}")
        if self.plan is not None and not isinstance(self.plan, (str, os.PathLike, dict)):
            from .plan import Plan

            if not isinstance(self.plan, Plan):
                raise ConfigError(
                    f"plan must be a Plan, a dict or the path of a plan's JSON file, got {type(self.plan).__name__}"
                )
        if type(self.device).__name__ == "device":  # a torch.device: kept as its name, as plans record it
            object.__setattr__(self, "device", str(self.device))
        if not isinstance(self.device, str):
            raise ConfigError(
                f"device must be a string such as 'cuda', 'cuda:1' or 'cpu', got {self.device!r}"
            )
        try:
            import torch

            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(
                f"device {self.device!r} is not a torch device name ('cuda', 'cuda:0', 'cpu')"
            ) from e

    @classmethod
    def from_options(cls, options: dict | None = None, **defaults: Any) -> Config:
        """Build a Config from a ``torch.compile(..., options={...})`` dict; unknown keys are an error."""
        merged = {**defaults, **(options or {})}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(
                f"unknown hetegen option(s) {unknown}; known options are: {', '.join(sorted(known))}"
            )
        return cls(**merged)

    def check_device(self) -> None:
        """Raise a :class:`ConfigError` that says what to do when :attr:`device` does not exist on this machine
        (called when compiling, not when a Config is built: a Config may describe another machine)."""
        import torch

        dev = torch.device(self.device)
        if dev.type not in ("cuda", "cpu"):  # a Config may name another kind ("meta" for a pass's unit test)
            raise ConfigError(
                f"device {self.device!r} is not supported: hetegen_fx runs the GPU side on 'cuda' (or "
                "'cuda:N'), or emulates it on the host with 'cpu' for testing"
            )
        if dev.type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {self.device!r} is not available: this torch ({torch.__version__}) sees no CUDA device. "
                "Pass device='cpu' to run the GPU side emulated on the CPU (for testing), or run on a machine "
                "with an NVIDIA GPU and a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {self.device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )

    @property
    def is_cpu_emulation(self) -> bool:
        """True when the "GPU side" runs on the CPU (testing without an accelerator)."""
        import torch

        return torch.device(self.device).type == "cpu"


def _check_stage(stage: Any) -> None:
    if stage is None:
        return
    ok = isinstance(stage, dict) and set(stage) in ({"rank", "ranks", "layers"}, {"rank", "layout"})
    if ok and "layout" in stage:
        layout, rank = stage["layout"], stage["rank"]
        ok = (
            isinstance(rank, int)
            and isinstance(layout, (list, tuple))
            and len(layout) > 0
            and all(
                isinstance(st, (list, tuple)) and len(st) == 3 and all(isinstance(x, int) for x in st)
                for st in layout
            )
        )
        ok = ok and 0 <= rank < sum(st[2] for st in layout) and all(st[2] >= 1 for st in layout)
        ok = ok and layout[0][0] == 0 and all(a < b for a, b, _ in layout)
        ok = ok and all(layout[i][1] == layout[i + 1][0] for i in range(len(layout) - 1))
    elif ok:
        rank, ranks, layers = stage["rank"], stage["ranks"], stage["layers"]
        ok = (
            isinstance(rank, int)
            and isinstance(ranks, int)
            and 0 <= rank < ranks
            and isinstance(layers, (list, tuple))
            and len(layers) == 2
            and all(isinstance(x, int) for x in layers)
            and 0 <= layers[0] < layers[1]
        )
    if not ok:
        raise ConfigError(
            'pipeline_stage must be {"rank": r, "ranks": n, "layers": [start, stop]} with 0 <= r < n and '
            '0 <= start < stop, {"rank": r, "layout": [[start, stop, tp], ...]} with stages in order from layer '
            f"0 and r below the sum of their TP degrees, or None; got {stage!r} "
            "(hetegen_fx.distributed.compile_stage fills it in)"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, what: str) -> None:
    """``value`` is None or a real number in ``[low, high]`` (not a bool, a string or NaN)."""
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        raise ConfigError(f"{name} must be {what}; got {value!r}")


def _check_int(name: str, value: Any, low: int, what: str, optional: bool = True) -> None:
    """``value`` is an integer of at least ``low`` (None too when ``optional``; not a bool or a float)."""
    if value is None and optional:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be {what}; got {value!r}")
