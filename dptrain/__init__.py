"""dptrain: differentially private training for PyTorch.

``priv = dptrain.make_private(model, eps=3)`` → ``priv.attach(dataset, ...)`` →
``priv.step(x, y)`` / ``priv.fit()`` → ``priv.report()``.

Names are imported on first use (PEP 562), so that ``import dptrain.cli`` — the ``dptrain``
command — does not load torch before a subcommand needs it.
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name → the submodule that defines it
_EXPORTS = {
    "ClippedBatch": "clipping", "ClippingConfig": "clipping", "clip_and_sum": "clipping",
    "clipped_sum": "clipping", "clip_factors": "clipping",
    "per_sample_grads": "engine", "trainable_parameters": "engine",
    "BudgetExceededError": "errors", "PrivacyConfigError": "errors", "PrivacyError": "errors",
    "UnsupportedModuleError": "errors",
    "DPOptimizer": "optimizer",
    "PrivateTraining": "private", "default_delta": "privacy_config", "make_private": "private",
    "PoissonLoader": "sampling", "PoissonSampler": "sampling",
    "find_problems": "validation", "fix": "validation", "validate": "validation",
}

__all__ = [
    "make_private", "PrivateTraining", "default_delta", "per_sample_grads", "trainable_parameters",
    "clip_and_sum", "clipped_sum", "clip_factors", "ClippingConfig", "ClippedBatch", "DPOptimizer",
    "PoissonSampler", "PoissonLoader", "validate", "fix", "find_problems",
    "PrivacyError", "BudgetExceededError", "PrivacyConfigError", "UnsupportedModuleError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name from its submodule, or a submodule (``dptrain.diff2``) on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'dptrain' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
