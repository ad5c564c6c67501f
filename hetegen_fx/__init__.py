"""hetegen_fx: run LLMs that do not fit the GPU by computing offloaded Linears on the CPU and the GPU
in parallel (HeteGen, MLSys 2024), built as a pipeline of torch.fx passes.

    import hetegen_fx
    compiled = hetegen_fx.compile(model, gpu_memory="6GiB")            # HF models: generate() works
    print(hetegen_fx.explain(compiled))                                # the Plan and the generated code
    print(hetegen_fx.state(compiled))                                  # graphs, memory by category

or, without importing it: ``model.compile(backend="hetegen", options={"gpu_memory": "6GiB"})``.
Importing this package touches no GPU.
"""

from .api import CompiledModule, Explanation, compile, explain
from .checkpoint import load
from .config import Config, format_bytes, parse_bytes
from .errors import BudgetError, CaptureError, ConfigError, HetegenError, UnsupportedModelError
from .exporting import ExportError, export, load_exported
from .introspect import ModelState, state
from .plan import LayerPlan, Plan, load_plan
from .residency import set_gpu_memory

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CaptureError",
    "CompiledModule",
    "Config",
    "ConfigError",
    "Explanation",
    "ExportError",
    "HetegenError",
    "LayerPlan",
    "ModelState",
    "Plan",
    "UnsupportedModelError",
    "compile",
    "explain",
    "export",
    "format_bytes",
    "load",
    "load_exported",
    "load_plan",
    "parse_bytes",
    "set_gpu_memory",
    "state",
]
