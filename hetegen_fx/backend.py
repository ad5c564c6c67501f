"""The ``torch.compile`` backend "hetegen" (registered through the ``torch_dynamo_backends`` entry point).

    model.compile(backend="hetegen", options={"gpu_memory": "6GiB"})     # HF generate() reaches this
    fn = torch.compile(fn, backend="hetegen", options={"device": "cpu"})

Dynamo hands over one graph per shape (prefill, decode, ...); parameters arrive as graph inputs and are
recognised by identity, so all graphs of one model share one WeightStore (weights placed and copied once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import launch
from .capture import bind_placeholder_params
from .config import Config
from .errors import BudgetError, ConfigError, HetegenError
from .linear import param_of
from .residency import Runner
from .store import WeightStore, store_for

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
            return launch.build(gm, config, store, inputs, label)

        from .passes.placement import kv_use

        # compiled again when the model's residency changes (hetegen_fx.residency)
        return Runner(build, store, config, kv_use(gm), example_inputs)
    except (BudgetError, ConfigError):
        raise  # the user must change a setting: falling back would hide it
    except HetegenError as e:
        if config.pipeline_stage is not None:  # run eagerly, the whole model would meet no other stage
            raise
        _warn_once(f"hetegen: cannot compile this graph ({e}); running it eagerly")
    except Exception as e:  # an unexpected graph: run it unchanged rather than fail the user's program
        if config.pipeline_stage is not None:
            raise
        _warn_once(f"hetegen: compiling a graph failed ({type(e).__name__}: {e}); running it eagerly")
    return gm.forward
