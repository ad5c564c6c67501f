"""Which HF decoding method a compiled graph is being called from, when that method edits the KV cache on
the host.

On an accelerator the compiled graphs keep the KV cache there, behind host *stand-ins* whose bytes are
never written (:func:`hetegen_fx.runtime.park`). A decoding method that reorders or crops the cache between
steps (beam search, assisted decoding, a custom method) edits those stand-ins on the host and hands the
graph garbage: wrong tokens, without an error. ``hetegen_fx.compile`` refuses such ``generate()`` arguments
before anything runs (``api._refuse_host_cache_edits``), but a model compiled with
``torch.compile(..., backend="hetegen")`` keeps HF's own ``generate``. So a graph that parks its outputs
looks, at every call, for HF's ``generate`` on the Python stack and asks it which method it runs
(:func:`cache_editing_caller`); :func:`refuse_cache_edits` turns the answer into a clear error.
"""

from __future__ import annotations

import inspect
import sys
from types import CodeType, FrameType

from .errors import ConfigError

#: HF's decoding methods (``GenerationMixin``) that edit the KV cache on the host, and what they do to it
EDITING_METHODS = {
    "_beam_search": "beam search (num_beams > 1) reorders the KV cache",
    "_assisted_decoding": "assisted decoding (an assistant model, prompt lookup or early exit) crops the KV cache",
}
#: the decoding method that never edits the cache on the host (greedy decoding and sampling)
SAFE_METHOD = "_sample"
#: frames looked at, from the graph's call outwards (HF's generate sits about 10 to 20 frames up)
MAX_DEPTH = 64

#: [the code of GenerationMixin.generate], looked up once transformers is loaded
_GENERATE: list[CodeType | None] = []


def _generate_code() -> CodeType | None:
    """The code object of ``transformers``' ``GenerationMixin.generate`` (None while transformers is not
    imported: nothing is looked up, or imported, before the caller has done so)."""
    if _GENERATE:
        return _GENERATE[0]
    utils = sys.modules.get("transformers.generation.utils")
    mixin = getattr(utils, "GenerationMixin", None)
    if mixin is None:
        return None
    code = getattr(inspect.unwrap(mixin.generate), "__code__", None)
    _GENERATE.append(code)
    return code


def cache_editing_caller(frame: FrameType | None = None) -> str | None:
    """What a decoding method that edits the KV cache on the host does to it, if one of HF's ``generate``
    calls on the stack above ``frame`` (default: the caller's) runs one; else None.

    ``generate`` names its method in its locals before it calls it: ``decoding_method`` (``_sample`` for
    greedy decoding and sampling, ``_beam_search``, ``_assisted_decoding``, or a custom callable), or
    ``custom_generate`` for a method loaded from the Hub (which the deprecated contrastive search, DoLa and
    group or constrained beam search now are). Every ``generate`` on the stack is asked: a compiled model
    used as another model's assistant runs ``_sample`` inside the main model's ``_assisted_decoding``."""
    code = _generate_code()
    if code is None:
        return None
    frame = sys._getframe(1) if frame is None else frame
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            found = frame.f_locals
            if found.get("custom_generate") is not None:
                return "a custom decoding method (custom_generate, from the Hub or a callable) may edit the KV cache"
            method = found.get("decoding_method")
            name = getattr(method, "__name__", None)
            if method is not None and name != SAFE_METHOD:
                return EDITING_METHODS.get(
                    name, f"the decoding method {name or method!r} may edit the KV cache"
                )
        frame = frame.f_back
    return None


def refuse_cache_edits(frame: FrameType | None = None) -> None:
    """Raise a :class:`ConfigError` when a compiled graph that keeps the KV cache on the accelerator is
    called from a decoding method that edits it on the host (:func:`cache_editing_caller`)."""
    what = cache_editing_caller(sys._getframe(1) if frame is None else frame)
    if what is not None:
        raise refusal(
            what,
            "; with torch.compile(..., backend='hetegen'), options={'output_device': 'input'} keeps the cache "
            "on the host instead (slower)",
        )


def refusal(what: str, advice: str = "") -> ConfigError:
    """The error for decoding that ``what`` (e.g. "beam search ... reorders the KV cache") on the host, where
    the compiled graphs' parked cache holds garbage; ``advice`` is appended to what it says to do."""
    return ConfigError(
        f"hetegen_fx keeps the KV cache on the accelerator, and {what} on the host, where it would read "
        f"garbage: use greedy decoding or sampling (num_beams=1, no assisted, contrastive or custom decoding){advice}"
    )
