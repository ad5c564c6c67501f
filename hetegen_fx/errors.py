"""Errors raised by hetegen_fx. Each message says what went wrong and what to do."""


class HetegenError(RuntimeError):
    """Base class of every error hetegen_fx raises on purpose."""


class CaptureError(HetegenError):
    """No frontend could turn the model into an FX graph."""


class BudgetError(HetegenError):
    """The GPU memory budget cannot hold the minimum working set."""


class ConfigError(HetegenError, ValueError):
    """An option is unknown or has a bad value."""


class UnsupportedModelError(HetegenError):
    """The model has weights hetegen_fx cannot split (e.g. integer weights)."""
