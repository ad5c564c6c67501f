"""The Python API: ``hetegen_fx.compile`` (capture, the pass pipeline, the compiled model that comes out) and
``hetegen_fx.explain``. The link from a compiled model to its config and weight store lives in
:mod:`hetegen_fx.state`, not in attributes on the model; a validated :class:`Config` is never changed here
(what the API decides for a model is a new Config, by ``dataclasses.replace``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from . import launch
from .capture import capture_export, capture_fx, is_hf_model, param_names
from .config import Config
from .decoding import refusal
from .errors import CaptureError, ConfigError, UnsupportedModelError
from .introspect import attach, state
from .plan import Plan
from .residency import MIN_KV_CLASS, Runner, kv_class
from .store import store_for


class CompiledModule(torch.nn.Module):
    """A model compiled through the fx or export frontend: call it like the original. Its graph follows the
    model's residency (:mod:`hetegen_fx.residency`): after a change, e.g. :func:`hetegen_fx.set_gpu_memory`,
    it is compiled again before the next call."""

    def __init__(self, runner: Runner, frontend: str, config: Config | None = None) -> None:
        super().__init__()
        self._runner = runner
        self.frontend = frontend
        attach(self, config, runner.store)  # hetegen_fx.state(self) reads the store and config from there

    @property
    def graph_module(self) -> fx.GraphModule:
        """The compiled graph (the one the current residency was compiled into)."""
        return self._runner.current()

    @property
    def plan(self) -> Plan:
        """The Plan of :attr:`graph_module`."""
        self._runner.current()
        return self._runner.plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            with self._runner.lock:  # one call at a time per device, as the traced path does
                return self._runner.current()(*args, **kwargs)
        return self._runner(*args)  # records a timeline inside hetegen_fx.trace.record()

    @property
    def code(self) -> str:
        """The generated Python code."""
        return self.graph_module.code


def compile(  # noqa: A001  (mirrors torch.compile)
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Compile ``model`` so offloaded Linears run split between CPU and GPU.

    ``options`` are :class:`Config` fields (``gpu_memory="6GiB"``, ``device="cuda"``, ``frontend=...``).

    * A Hugging Face model (frontend "auto" or "dynamo") is returned as a shallow copy whose forward goes
      through ``torch.compile`` with this backend, so ``generate()`` works with a KV cache; graphs are
      compiled on first call. The original model is not modified.
    * Any other module is traced now (``fx``, or ``export`` with ``example_inputs``) and returned as a
      :class:`CompiledModule`.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"hetegen_fx.compile expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(
            f"example_inputs must be a tuple of the model's inputs, e.g. (ids,), got {example_inputs!r}; the "
            "budget and the other options are keywords: hetegen_fx.compile(model, gpu_memory='6GiB')"
        )
    config = Config.from_options(options)
    config.check_device()
    if config.plan is not None:  # a clear error for a bad plan now, before anything is captured
        from .plan import load_plan

        load_plan(config.plan)
    _check_weights(model)
    _check_storage(model, config)
    frontend = config.frontend
    if frontend == "auto":
        frontend = "dynamo" if is_hf_model(model) else "fx"
    if frontend == "dynamo":
        return _compile_dynamo(model, config)
    params = list(model.parameters())
    store = store_for(params, torch.device(config.device), fresh=True)
    errors: list[CaptureError] = []
    for fe in [frontend] if config.frontend != "auto" else ["fx", "export"]:
        try:
            if fe == "fx":
                gm = capture_fx(model)
            else:
                gm = capture_export(model, tuple(example_inputs or ()), example_kwargs)
        except CaptureError as e:
            errors.append(e)
            continue
        inputs = (
            None if example_inputs is None else tree_leaves((tuple(example_inputs), example_kwargs or {}))
        )
        label = f"{type(model).__name__} ({fe})"

        def build(_inputs, gm=gm, inputs=inputs, label=label):
            return launch.build(gm, config, store, inputs, label)

        return CompiledModule(Runner(build, store, config, None), fe, config)
    raise CaptureError(
        "could not capture the model: "
        + "; ".join(str(e) for e in errors)
        + ("" if example_inputs else "; pass example_inputs=(...) to allow the 'export' frontend")
    )


def _compile_dynamo(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    from .backend import make_backend

    cache = _kv_cache(model, config)  # first: a clear error before anything else reads the model
    hf = is_hf_model(model)
    config = dataclasses.replace(
        config,
        # an HF model's logits back to the host, its KV cache kept on the device (parked); a plain module's
        # outputs all go back, as asked
        output_device="auto" if hf and config.output_device == "input" else config.output_device,
        # the KV-cache reserve: the model's limit, capped
        max_seq_len=_max_positions(model) if config.max_seq_len is None else config.max_seq_len,
    )
    floor = _check_budget_floor(model, config)
    store = store_for(list(model.parameters()), torch.device(config.device), fresh=True)
    if config.cpu_memory is not None:  # the storage tier's ring: slots for the largest deferred Linear
        from .checkpoint import source_of

        deferred = (p for p in model.parameters() if p.dim() == 2 and source_of(p) is not None)
        store.largest_deferred = max((p.numel() * p.element_size() for p in deferred), default=0)
    compiled = copy.copy(model)  # shares parameters and submodules; the original's __dict__ stays untouched
    if cache:
        compiled.generate = _static_cache_by_default(
            compiled.generate, model, config.max_seq_len, store, floor, hand_on=config.cuda_graphs
        )
    if hasattr(model, "generate") and not config.is_cpu_emulation and config.output_device == "auto":
        compiled.generate = _refuse_host_cache_edits(compiled.generate, compiled)
    _room_for_graphs()
    backend = make_backend(config, param_names(model), store)
    if hf:
        compiled.compile(backend=backend, dynamic=None)
    else:  # a plain module: torch.compile's wrapper (Module.compile leaves some, nn.Sequential, uncompiled)
        compiled = torch.compile(model, backend=backend, dynamic=None)
    attach(compiled, config, store)  # this copy's graphs and plans, whatever is compiled after it
    return compiled


_COPIES = itertools.count(1)
#: graphs a compiled copy may add to its forward's dynamo cache: a prefill and a decode step per size class of
#: its static cache (each class's cache keeps a static size, :func:`hetegen_fx.launch.launcher`; 16 to 4096
#: tokens are 9 classes; a batch of another size is another class too), the first prompt length's prefill,
#: spares
GRAPHS_PER_COPY = 24


def _room_for_graphs() -> None:
    """Raise dynamo's recompile limit (8 graphs per code object by default) with every compiled copy: all
    copies of one model class share its ``forward``, each copy's graphs guard on its own module, and past
    the limit dynamo runs the forward eagerly without a word, so a fifth compiled copy in one process (a
    notebook cell run again, a benchmark's variants) ran on the host, uncompiled. The setting is torch's, for
    the whole process; it is only ever raised."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    need = 8 + GRAPHS_PER_COPY * next(_COPIES)
    if getattr(cfg, name) < need:
        setattr(cfg, name, need)


def _kv_cache(model: torch.nn.Module, config: Config) -> bool:
    """Whether the compiled copy of ``model`` gets a ``generate()`` that uses a static KV cache when the call
    names no cache (``config.kv_cache``)."""
    gen = getattr(model, "generation_config", None)
    if config.kv_cache == "dynamic":
        return False
    if gen is None or not hasattr(model, "generate") or getattr(model.config, "is_encoder_decoder", False):
        if config.kv_cache == "static":
            raise ConfigError(
                f"kv_cache='static' needs a Hugging Face decoder-only model with generate(); "
                f"{type(model).__name__} is not one: leave kv_cache at 'auto'"
            )
        return False
    if config.kv_cache == "auto":
        return gen.cache_implementation is None and bool(getattr(model, "_can_compile_fullgraph", False))
    return True


def _static_cache_by_default(
    generate,
    model: torch.nn.Module,
    max_seq_len: int | None,
    store=None,
    floor: int = MIN_KV_CLASS,
    hand_on: bool = False,
):
    """``generate`` (``model``'s bound HF ``generate``), giving a static KV cache to calls that name no cache:
    no ``past_key_values``, ``cache_implementation``, ``use_cache=False`` or a ``generation_config`` naming one
    (HF refuses a cache object together with a cache implementation, so the model's own
    ``generation_config`` is left alone), or calls from HF's assisted decoding to this model as its assistant
    (it crops the assistant's cache, which a static one cannot do). The cache holds the call's tokens rounded up
    to a size class (:func:`hetegen_fx.residency.kv_class`, ``max_seq_len`` the limit), so calls of one class
    share its shape and compiled graphs (HF would size it per call and recompile for each longer one), and the
    ledger makes room for it before the call; a call that needs more than ``max_seq_len`` gets HF's own
    (``cache_implementation="static"``). With ``hand_on`` (a model that records CUDA graphs), the cache goes
    on to the next call of its class and batch (:class:`_HeldCache`); without, each call makes its own (the
    first call handed a used cache compiles one more graph, which pays only where graphs replay over it)."""

    held = _HeldCache()

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        gen = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        named = (
            kwargs.get("past_key_values") is not None
            or kwargs.get("cache") is not None
            or kwargs.get("cache_implementation") is not None
            or kwargs.get("use_cache") is False
            or (gen is not None and (gen.cache_implementation is not None or gen.use_cache is False))
            # HF's assisted decoding calls its assistant's generate() with a marked config and crops the
            # assistant's cache between calls, which a static cache cannot do: HF's default there
            or getattr(gen, "is_assistant", False)
        )
        if not named:
            need = _tokens_needed(args, kwargs, gen or model.generation_config)
            if max_seq_len is not None and need is not None and need <= max_seq_len:
                from transformers import StaticCache

                cfg = model.config
                cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
                # sized by use: the call's size class (hetegen_fx.residency.kv_class), max_seq_len the limit;
                # calls of one class share a cache shape, so their graphs are compiled once
                ledger = store.ledger
                size = kv_class(need, max_seq_len, ledger.kv_floor if ledger is not None else floor)
                key = _reuse_key(args, kwargs, gen or model.generation_config, size) if hand_on else None
                cache = held.take(key, lambda: StaticCache(config=cfg, max_cache_len=size))
                kwargs[cache_argument()] = cache
                try:
                    return generate(*args, **kwargs)
                finally:
                    held.give_back(cache)
            else:
                kwargs["cache_implementation"] = "static"
        return generate(*args, **kwargs)

    wrapper.hetegen_static_cache = True
    wrapper.hetegen_held_cache = held
    return wrapper


class _HeldCache:
    """The static KV cache of a model's latest generate call that named none, handed (reset) to the next such
    call of the same size class and batch, so that the device tensors stay where they are and the CUDA graphs
    recorded over them replay in every request (a new cache per call moved them, and each call recorded its
    graphs again until their pool was full). Not handed on while a call uses it (calls from two threads) or
    while anything but this holder refers to it (a caller that kept ``past_key_values`` to go on from it;
    dynamo, until its next compile, where a call compiled a graph)."""

    #: references to the held cache when only the holder has it: its attribute, a local, getrefcount's argument
    ALONE = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cache = None
        self.key = None
        self.busy = False
        self.reused = 0  # calls that got the held cache

    def take(self, key, make):
        """The cache for a call of ``key`` (None: a call whose cache is not kept): the held one, reset, when free
        and alike; else ``make()``, which becomes the held one where nothing is in use."""
        with self._lock:
            cache = self.cache
            if key is not None and cache is not None and not self.busy and self.key == key:
                if sys.getrefcount(cache) <= self.ALONE:
                    self.busy = True
                    self.reused += 1
                    reset_cache(cache)
                    return cache
            cache = make()
            if key is not None and not self.busy:  # the held one is dropped (its memory freed with it)
                self.cache, self.key, self.busy = cache, key, True
            return cache

    def give_back(self, cache) -> None:
        with self._lock:
            if cache is self.cache:
                self.busy = False


def reset_cache(cache) -> None:
    """``cache.reset()`` (an HF cache) with its parked layers zeroed where they are: on the device, not through
    their host stand-ins, whose memory :func:`hetegen_fx.runtime.park` never writes (zeroed there, every page
    of a KV cache's size would be touched on the host, and the device's values would stay as they were)."""
    from .runtime import unpark

    swapped = []
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            device = unpark(t) if isinstance(t, torch.Tensor) else None
            if device is not None:
                setattr(layer, name, device)
                swapped.append((layer, name, t))
    try:
        cache.reset()
    finally:
        for layer, name, t in swapped:
            setattr(layer, name, t)


def _reuse_key(args: tuple, kwargs: dict, gen, size: int) -> tuple | None:
    """What a kept static cache must match to serve a generate call: its size class and the call's batch of
    token ids; None where one call's cache cannot serve another (beams, several sequences per prompt, prompts
    given as embeddings)."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    for name in ("num_beams", "num_return_sequences"):
        if (kwargs.get(name) or getattr(gen, name, None) or 1) != 1:
            return None
    return (size, ids.shape[0])


@functools.cache
def cache_argument() -> str:
    """The name under which HF's ``generate()`` takes a cache object: ``cache`` where ``past_key_values`` is
    deprecated (it warns, transformers 5.25), else ``past_key_values``. Read off the deprecation wrapper, which
    keeps the old and the new name."""
    from transformers import GenerationMixin

    fn = GenerationMixin.generate
    while fn is not None:
        names = {c.cell_contents for c in fn.__closure__ or () if isinstance(_cell(c), str)}
        if {"past_key_values", "cache"} <= names:
            return "cache"
        fn = getattr(fn, "__wrapped__", None)
    return "past_key_values"


def _cell(c) -> object:
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return None


#: generate() arguments whose decoding edits the KV cache on the host between steps: beam search reorders it
#: (``Cache.reorder_cache``), the assisted kinds of decoding (an assistant model, prompt lookup, early exit,
#: multi-token prediction) crop it
_HOST_CACHE_EDITS = {
    "num_beams": "beam search (num_beams > 1) reorders the KV cache",
    "assistant_model": "assisted decoding (assistant_model) crops the KV cache",
    "prompt_lookup_num_tokens": "prompt-lookup decoding (prompt_lookup_num_tokens) crops the KV cache",
    "assistant_early_exit": "self-speculative decoding (assistant_early_exit) crops the KV cache",
    "use_mtp": "multi-token-prediction decoding (use_mtp) crops the KV cache",
    "penalty_alpha": "contrastive search (penalty_alpha) selects among candidates in the KV cache",
    "custom_generate": "a custom decoding method (custom_generate, from the Hub or a callable) may edit the KV cache",
}


def _refuse_host_cache_edits(generate, compiled: torch.nn.Module):
    """``generate`` that refuses, before anything runs, the decoding modes that edit the KV cache on the host
    (:data:`_HOST_CACHE_EDITS`): the compiled graphs keep the cache on the accelerator behind host stand-ins
    whose bytes are never written, so such an edit would compute on garbage and go wrong silently."""

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        gen = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        if getattr(gen, "is_assistant", False):  # HF marks the config it hands an assistant model's generate
            raise ConfigError(
                "hetegen_fx keeps the KV cache on the accelerator, and this compiled model is another model's "
                "assistant_model: assisted decoding crops the assistant's KV cache on the host, where it would "
                "read garbage. Use the compiled model as the main model, with greedy decoding or sampling"
            )
        for name, what in _HOST_CACHE_EDITS.items():
            if name in kwargs:  # an explicit None too: HF then uses its default (no such mode)
                value = kwargs[name]
            else:  # the call's generation config, else the compiled copy's (what HF reads)
                source = gen if gen is not None else getattr(compiled, "generation_config", None)
                value = getattr(source, name, None)
            if _asks_for(name, value):
                raise refusal(what)
        return generate(*args, **kwargs)

    return wrapper


def _asks_for(name: str, value) -> bool:
    """Whether ``value`` of the generate option ``name`` turns its decoding mode on, as HF reads it: any value
    but None or False, except one beam (``num_beams=1``) and ``penalty_alpha=0`` (greedy). A 0 elsewhere
    counts (HF starts prompt lookup or early exit for any value that is not None). Contrastive search also
    needs ``top_k > 1`` and no sampling; it is refused for any positive ``penalty_alpha`` all the same."""
    if value is None or value is False:
        return False
    if name == "num_beams":
        return value > 1
    if name == "penalty_alpha":
        return value > 0
    return True


def _tokens_needed(args: tuple, kwargs: dict, gen) -> int | None:
    """The sequence length a generate call reaches (prompt and new tokens), or None if it cannot be told."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs", kwargs.get("inputs_embeds")))
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return None
    new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
    if new is not None:
        return ids.shape[1] + int(new)
    length = kwargs.get("max_length", getattr(gen, "max_length", None))
    return None if length is None else int(length)


def _max_positions(model: torch.nn.Module, cap: int = 4096) -> int | None:
    """The longest sequence the model's config allows, capped at ``cap`` (None if it does not say)."""
    from hetegen_fx.models import max_positions

    cfg = getattr(model, "config", None)
    limit = max_positions(cfg) if cfg is not None else None
    return None if limit is None else min(limit, cap)


def _check_budget_floor(model: torch.nn.Module, config: Config) -> int:
    """Refuse at compile time a budget that cannot hold even the parameters that are not Linear weights plus
    the smallest KV cache (16 tokens; the exact minimum, with staging, is checked when the first graph is
    placed). Returns the size class floor for the first static cache, before the ledger exists: 256 tokens,
    or the largest smaller power of two whose cache takes at most half of what the budget leaves beside those
    parameters (the ledger then keeps to it, :attr:`hetegen_fx.ledger.Ledger.kv_floor`)."""
    if config.gpu_memory is None:
        return MIN_KV_CLASS
    from hetegen_fx.models import kv_cache_bytes

    linear_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    # looked up on the host (True, or "auto" where the budget is short), unless tied to a Linear (counted there)
    if config.host_embeddings is not False:
        linear_weights |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    other = 0
    for p in model.parameters():
        if id(p) not in linear_weights and id(p) not in seen:
            seen.add(id(p))
            other += p.numel() * p.element_size()
    dtype = next(iter(model.parameters()), torch.empty(0)).dtype
    cfg = getattr(model, "config", None)  # an HF config says the KV cache's size; a plain module has none

    def kv(floor: int) -> int:
        tokens = kv_class(1, config.max_seq_len, floor)
        return (kv_cache_bytes(cfg, config.batch_size, tokens, dtype) or 0) if cfg else 0

    if config.gpu_memory < other + kv(16):
        from .config import format_bytes
        from .errors import BudgetError

        least = other + kv(16)
        raise BudgetError(
            f"gpu_memory {format_bytes(config.gpu_memory)} is below the minimum working set: at least "
            f"{format_bytes(least)} ({least} bytes: parameters other than Linear weights and host embedding "
            f"tables {format_bytes(other)}, KV cache for {kv_class(1, config.max_seq_len, 16)} tokens "
            f"{format_bytes(kv(16))}), before staging buffers; raise gpu_memory"
        )
    floor = MIN_KV_CLASS
    while floor > 16 and kv(floor) > (config.gpu_memory - other) // 2:
        floor //= 2
    return floor


def _check_storage(model: torch.nn.Module, config: Config) -> None:
    """With ``cpu_memory``: the model's Linear weights must stay in their checkpoint (``hetegen_fx.load``),
    and ``cpu_memory`` must hold at least what stays in RAM whatever the placement (the other weights, and
    the storage ring for the largest Linear): clear errors now, not at the first call."""
    if config.cpu_memory is None:
        return
    from .checkpoint import source_of
    from .prefetch import DEFAULT_SLOTS
    from .tiers import check_minimum

    params = {id(p): p for p in model.parameters()}.values()
    deferred = [p for p in params if source_of(p) is not None]
    if not deferred:
        raise ConfigError(
            "cpu_memory applies to a model whose Linear weights stay in their checkpoint until placed: load it "
            "with hetegen_fx.load(path, cpu_memory=...) (or `hetegen generate --model PATH --cpu-memory ...`); "
            "a model already in host memory needs no cpu_memory"
        )
    other = sum(p.numel() * p.element_size() for p in params if source_of(p) is None)
    largest = max(p.numel() * p.element_size() for p in deferred)
    check_minimum(config.cpu_memory, other, config.storage_slots or DEFAULT_SLOTS, largest)


def _check_weights(model: torch.nn.Module) -> None:
    bad = [(n, p.dtype) for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        n, dt = bad[0]
        raise UnsupportedModelError(
            f"parameter {n} is {dt}: hetegen_fx needs floating-point weights (dequantize first, e.g. load with "
            "dtype=torch.float16)"
        )


@dataclass(repr=False)
class Explanation:
    """What the compiler decided, for reading in a notebook: one Plan and generated code per graph.

    ``.plan`` is the decode plan (the graph with the fewest tokens), ``.graph_module`` its GraphModule
    (for :func:`hetegen_fx.plot.draw_layer`); ``print()`` shows every plan's table and code.
    """

    plans: list[Plan]
    codes: list[str]
    labels: list[str]
    graph_modules: list[fx.GraphModule] = field(default_factory=list)
    #: the model's residency changes while it ran (:class:`hetegen_fx.ledger.ResidencyChange`), oldest first
    changes: list = field(default_factory=list)

    def _decode_index(self) -> int:
        if not self.plans:
            raise ConfigError("nothing compiled yet: run the model once")
        return min(range(len(self.plans)), key=lambda i: self.plans[i].tokens)

    @property
    def plan(self) -> Plan:
        """The decode plan: that of the graph with the fewest tokens."""
        return self.plans[self._decode_index()]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The compiled GraphModule of :attr:`plan`."""
        return self.graph_modules[self._decode_index()]

    def plot(self, path, title: str | None = None):
        """Draw the decode plan (:func:`hetegen_fx.plot.plot_plan`), with the Linears the residency changes
        moved marked. Returns the path."""
        from .plot import plot_plan

        return plot_plan(self.plan, path, title=title, changes=self.changes)

    def __str__(self) -> str:
        parts = []
        for label, plan, code in zip(self.labels, self.plans, self.codes, strict=True):
            parts += [f"=== {label} ===", plan.table(), "", code]
        if self.changes:
            parts += ["=== residency changes ===", *map(str, self.changes)]
        return "\n".join(parts) if parts else "nothing compiled yet: run the model once"

    def __repr__(self) -> str:
        if not self.plans:
            return "Explanation(nothing compiled yet: run the model once)"
        graphs = ", ".join(
            f"{p.tokens} token(s): {sum(not lp.resident for lp in p.layers)}/{len(p.layers)} offloaded"
            for p in self.plans
        )
        return f"Explanation({len(self.plans)} graph(s) [{graphs}]; .plan is the decode plan)\n{self.plan.table()}"

    def _repr_html_(self) -> str:
        import html

        if not self.plans:
            return "<p>nothing compiled yet: run the model once</p>"
        parts = []
        for i, (label, plan, code) in enumerate(zip(self.labels, self.plans, self.codes, strict=True)):
            mark = " (decode: <code>.plan</code>)" if i == self._decode_index() else ""
            parts.append(
                f"<h4>{html.escape(label)}{mark}</h4><pre>{html.escape(plan.table())}</pre>"
                f"<details><summary>generated code</summary><pre>{html.escape(code)}</pre></details>"
            )
        return "".join(parts)

    _repr_pretty_ = lambda self, p, cycle: p.text(str(self))  # noqa: E731


def explain(compiled: torch.nn.Module) -> Explanation:
    """The Plans and generated code of everything compiled for ``compiled`` (a CompiledModule or a model)."""
    st = state(compiled)
    graphs = st.graphs
    return Explanation(
        [g.plan for g in graphs],
        [g.graph_module.code for g in graphs],
        [g.label for g in graphs],
        [g.graph_module for g in graphs],
        st.changes,
    )
