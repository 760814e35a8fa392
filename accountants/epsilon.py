"""ε of DP-SGD runs and of arbitrary composed events, with input checks."""
from __future__ import annotations

import math
import numbers

from .backends import gdp_epsilon, pld_epsilon, prv_bounds, rdp_epsilon
from .composition import flatten, poisson_gaussian
from .events import DpEvent, is_rate

ACCOUNTANTS = ("prv", "pld", "rdp", "gdp")


def check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and not isinstance(delta, bool) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}; a typical choice is 1/N^1.1 for N records")


def check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
    if not is_rate(sample_rate):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate} (expected batch size / N)")
    if not (isinstance(steps, numbers.Real) and math.isfinite(steps)) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")


def epsilon_of_event(event: DpEvent, delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` of ``event`` (any composition of Gaussian / Poisson-sampled events).

    ``prv`` returns the PRV accountant's upper bound (the guarantee we claim).
    """
    check_delta(delta)
    flat = flatten(event)
    if accountant == "prv":
        return prv_bounds(flat, float(delta))[2]
    if accountant == "rdp":
        return rdp_epsilon(flat, float(delta))
    if accountant == "pld":
        return pld_epsilon(flat, float(delta))
    if accountant == "gdp":
        return gdp_epsilon(flat, float(delta))
    raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")


def epsilon_bounds(event: DpEvent, delta: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε from the PRV accountant."""
    check_delta(delta)
    return prv_bounds(flatten(event), float(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "prv") -> float:
    """ε spent by ``steps`` Poisson-sampled Gaussian steps (DP-SGD) at ``delta``."""
    check_run(noise_multiplier, sample_rate, steps)
    return epsilon_of_event(poisson_gaussian(noise_multiplier, sample_rate, steps), delta, accountant)
