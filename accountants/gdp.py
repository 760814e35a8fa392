"""Gaussian differential privacy (Dong, Roth & Su 2019, 'Gaussian Differential Privacy').

- μ-GDP ⇔ trade-off curve G_μ(α) = Φ(Φ⁻¹(1−α) − μ)  (their eq. 2.3).
- μ-GDP ⇒ (ε, δ(ε))-DP with δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)  (Corollary 2.13).
- Poisson-subsampled Gaussian, T steps, rate q, noise σ: the CLT (Theorem 3.4 / Corollary 4)
  gives μ = q·√(T(e^{1/σ²} − 1)); an approximation, typically optimistic for small T.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from .events import is_rate, whole_count


def gdp_mu(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """CLT μ of T Poisson-sampled Gaussian steps: μ = q·√(T(e^{1/σ²} − 1)).

    With ``sample_rate == 1`` (no subsampling) the composition is exact: μ = √T / σ.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"gdp_mu: noise_multiplier must be > 0, got {noise_multiplier}")
    if not is_rate(sample_rate):
        raise ValueError(f"gdp_mu: sample_rate must be in (0, 1], got {sample_rate}")
    steps = whole_count(steps, "gdp_mu: steps")
    if sample_rate == 1:
        return math.sqrt(steps) / noise_multiplier
    return sample_rate * math.sqrt(steps * expm1_or_inf(1.0 / noise_multiplier ** 2))


def expm1_or_inf(x: float) -> float:
    """e^x − 1, or inf where it overflows a float (x > 709.78: σ < 0.0375 in μ's e^{1/σ²})."""
    return math.expm1(x) if x < 709.0 else math.inf


def delta_from_gdp(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    if math.isnan(mu) or math.isnan(eps):
        raise ValueError(f"delta_from_gdp: eps and mu must be numbers, got eps={eps}, mu={mu}")
    if mu <= 0 or eps == math.inf:
        return 0.0
    if mu == math.inf:
        return 1.0
    # log-space for the second term avoids inf·0 at large ε
    a = stats.norm.cdf(-eps / mu + mu / 2)
    b = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
    return float(max(a - b, 0.0))


def eps_from_gdp(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε; μ) ≤ δ."""
    if not 0 < delta < 1:
        raise ValueError(f"eps_from_gdp: delta must be in (0, 1), got {delta}")
    if math.isnan(mu):
        raise ValueError("eps_from_gdp: mu is NaN")
    if math.isinf(mu):
        return math.inf  # δ(ε) = 1 for every ε
    if mu <= 0 or delta_from_gdp(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while delta_from_gdp(hi, mu) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: delta_from_gdp(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gaussian_tradeoff(alpha: np.ndarray | float, mu: float) -> np.ndarray:
    """G_μ(α) = Φ(Φ⁻¹(1 − α) − μ): the smallest type-II error at type-I error α."""
    alpha = np.asarray(alpha, dtype=float)
    return stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu)
