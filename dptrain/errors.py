"""Errors raised by dptrain. Each one names the object, the value and the fix."""
from __future__ import annotations

from typing import Any, Callable


class PrivacyError(Exception):
    """Base class: something would break the privacy guarantee that was asked for."""


class BudgetExceededError(PrivacyError):
    """The next step would spend more than the target ε."""


class UnsupportedModuleError(PrivacyError, ValueError):
    """A module mixes examples (BatchNorm, …) or cannot give per-example gradients."""


class PrivacyConfigError(PrivacyError, ValueError):
    """An invalid privacy parameter (ε ≤ 0, δ ∉ (0, 1), empty dataset, …)."""


def refuse_step_over_budget(ledger: Any, event: Any, delta: float, accountant: str, target: float,
                            next_step: int, spent: Callable[[], float]) -> None:
    """Raise :class:`BudgetExceededError` if recording ``event`` would take ε(δ) past ``target``.

    ``ledger.epsilon_if(event, delta, accountant=...)`` is the ε after the step; ``spent()`` the ε so far.
    """
    eps_next = ledger.epsilon_if(event, delta, accountant=accountant)
    if eps_next > target:
        raise BudgetExceededError(
            f"step {next_step} would spend ε={eps_next:.4g} > target ε={target} (δ={delta:.3g}); "
            f"training stops here. Spent so far: ε={spent():.4g}.")
