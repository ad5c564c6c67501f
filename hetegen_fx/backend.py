"""The ``torch.compile`` backend "hetegen" (registered through the ``torch_dynamo_backends`` entry point).

    model.compile(backend="hetegen", options={"gpu_memory": "6GiB"})     # HF generate() reaches this
    fn = torch.compile(fn, backend="hetegen", options={"device": "cpu"})

Dynamo hands over one graph per shape (prefill, decode, ...); parameters arrive as graph inputs and are
recognised by identity, so all graphs of one model share one WeightStore (weights placed and copied once).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .capture import bind_placeholder_params
from .config import Config
from .decoding import refuse_cache_edits
from .errors import BudgetError, ConfigError, HetegenError
from .graphs import pool_for
from .linear import param_of
from .pipeline import transform
from .residency import Runner
from .runtime import park
from .store import WeightStore, store_for
from .trace import traced

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _label(example_inputs: Sequence[Any]) -> str:
    shapes = [
        tuple(x.shape)
        for x in example_inputs
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
    ]
    return f"graph inputs {shapes[:2]}" if shapes else "graph"


def make_backend(
    config: Config, names: dict[int, str] | None = None, store: WeightStore | None = None
) -> Callable:
    """A dynamo backend bound to ``config`` (``hetegen_fx.compile`` uses this for HF models) and, if given,
    to ``store``: every graph it compiles then places its weights there, even after the same model was
    compiled again (another variant) and registered a newer store for its parameters."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        return _compile_graph(gm, example_inputs, config, names, store)

    return backend


def guard_parked_state(run: Callable, gm: fx.GraphModule) -> Callable:
    """``run`` (the compiled ``gm``), refusing to run inside an HF decoding method that edits the KV cache on
    the host when ``gm`` parks outputs on the accelerator (:mod:`hetegen_fx.decoding`); ``run`` itself when
    it parks none (e.g. on an emulated device, or with ``output_device="input"``)."""
    if not any(gm.graph.find_nodes(op="call_function", target=park)):
        return run

    def guarded(*args: Any) -> Any:
        refuse_cache_edits(sys._getframe(1))
        return run(*args)

    guarded.graph_module = gm  # type: ignore[attr-defined]
    return guarded


def hetegen_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None
) -> Callable:
    """Entry-point backend: options as in :class:`hetegen_fx.Config` (``output_device`` defaults to "auto")."""
    config = Config.from_options(options, output_device="auto")
    return _compile_graph(gm, example_inputs, config, None)


def _compile_graph(
    gm, example_inputs, config: Config, names: dict[int, str] | None, store: WeightStore | None = None
) -> Callable:
    try:
        config.check_device()  # a missing device is the user's to fix, not a graph to run eagerly
        bind_placeholder_params(gm, example_inputs, names)
        if store is None:
            params = [
                param_of(n).tensor for n in gm.graph.find_nodes(op="placeholder") if param_of(n) is not None
            ]
            store = store_for(params, torch.device(config.device))
        label = _label(example_inputs)

        def build(inputs):
            out, plan = transform(gm, config, store, inputs, label=label)
            if config.verbose:
                print(plan.table(), file=sys.stderr)
            # records a timeline inside hetegen_fx.trace.record(); replays CUDA graphs of the model's pool
            run = traced(out, config.device, pool_for(store, config, plan), config.cudnn_attention)
            return out, plan, guard_parked_state(run, out)

        from .passes.placement import kv_use

        # compiled again when the model's residency changes (hetegen_fx.residency)
        return Runner(build, store, config, kv_use(gm), example_inputs)
    except (BudgetError, ConfigError):
        raise  # the user must change a setting: falling back would hide it
    except HetegenError as e:
        _warn_once(f"hetegen: cannot compile this graph ({e}); running it eagerly")
    except Exception as e:  # an unexpected graph: run it unchanged rather than fail the user's program
        _warn_once(f"hetegen: compiling a graph failed ({type(e).__name__}: {e}); running it eagerly")
    return gm.forward
