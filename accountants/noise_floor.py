"""The smallest noise the rest of a run may use: what keeps an adaptive run inside its budget.

A controller that chooses σ_t step by step (RLDP) may spend budget early, but never more than
the total. Before step t, with the steps so far recorded in a ledger and R steps left,

    σ_floor = min { σ ∈ grid : ε(ledger ∘ PoissonSampled(q, Gaussian(σ))^R; δ) ≤ ε_target }.

Any σ_t ≥ σ_floor keeps the plan feasible: the remaining R − 1 steps can still run at
σ_floor, since subsampled Gaussian steps with more noise are dominated by those with less
(adaptive composition preserves the order). The floor is searched on a geometric grid
σ_ref · 2^(k/8) so that the ledger holds few distinct events (accounting stays fast).
"""
from __future__ import annotations

import math

from .events import GaussianEvent, PoissonSampledEvent
from .ledger import PrivacyLedger

#: grid resolution: consecutive noise levels differ by 2^(1/8) ≈ 9 %
LEVELS_PER_OCTAVE = 8


def noise_level(reference: float, k: int) -> float:
    """Grid level k: σ_ref · 2^(k/8)."""
    return float(reference * 2.0 ** (k / LEVELS_PER_OCTAVE))


def level_at_least(reference: float, sigma: float) -> int:
    """Smallest grid index whose level is ≥ ``sigma`` (rounding noise up is always safe)."""
    k = math.ceil(LEVELS_PER_OCTAVE * math.log2(sigma / reference) - 1e-9)
    while noise_level(reference, k) < sigma:
        k += 1
    return k


def noise_floor(ledger: PrivacyLedger, sample_rate: float, remaining: int, delta: float, target_eps: float,
                reference: float, accountant: str = "prv", k_min: int = -24, k_max: int = 48) -> int | None:
    """Grid index of σ_floor for the ``remaining`` steps after ``ledger``; None if no grid level fits.

    Bisection over k ∈ [k_min, k_max] (ε decreases in σ); every returned level is verified with
    ``accountant`` itself, so the guarantee is that accountant's.
    """
    if remaining < 1:
        raise ValueError(f"noise_floor: remaining must be >= 1, got {remaining}")

    def fits(k: int) -> bool:
        event = PoissonSampledEvent(sample_rate, GaussianEvent(noise_level(reference, k)))
        return ledger.epsilon_if(event, delta, accountant=accountant, count=remaining) <= target_eps

    if not fits(k_max):
        return None
    if fits(k_min):
        return k_min
    lo, hi = k_min, k_max  # fits(lo) false, fits(hi) true
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
