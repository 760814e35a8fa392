"""Empirical ε from a membership guess's error rates.

An (ε, δ)-DP mechanism forces every membership test to have
    FPR α and FNR β with  α + e^ε β ≥ 1 − δ  and  e^ε α + β ≥ 1 − δ,
so observed rates give ε(α, β) = log((1 − δ − max(α, β)) / min(α, β)) (after folding a
worse-than-random test below the diagonal; 0 where the numerator ≤ the denominator).

Two ways to turn counts into an interval for ε:
- frequentist: Clopper–Pearson intervals for α and β (each at level 1 − (1−c)/2) and the
  range of ε(α, β) over that rectangle (Jagielski et al. 2020; Nasr et al. 2021). ε is
  non-increasing in α and β below the anti-diagonal α + β = 1, non-decreasing above it and 0
  on it, so the maximum sits at a corner and the minimum at (α_hi, β_hi), at (α_lo, β_lo),
  or is 0 when the rectangle crosses the anti-diagonal (corners alone would overstate it);
- Bayesian (Zanella-Béguelin et al. 2023, 'Bayesian Estimation of Differential Privacy'):
  independent Beta(k + ½, n − k + ½) posteriors for α and β and the equal-tailed credible
  interval of the posterior of ε(α, β). The posterior CDF is a numerical integral, not
  Monte Carlo, so it is deterministic and accurate far into the tails: {ε(α, β) ≤ e} is the
  (e, δ) privacy region, for fixed α the band L(α) ≤ β ≤ U(α) with
      L = max(0, (1 − δ − α)e^{−e}, 1 − δ − e^e α),  U = min(1, 1 − (α − δ)e^{−e}, δ + e^e (1 − α)),
  so P[ε ≤ e] = E_α[F_β(U(α)) − F_β(L(α))], integrated over α in logit-quantile space.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import optimize, stats

METHODS = ("clopper-pearson", "bayesian")
# quadrature nodes for α: posterior quantiles u = expit(z), z evenly spaced, resolving tails to ~1e-13
_Z = np.linspace(-30.0, 30.0, 2001)
_U = 1.0 / (1.0 + np.exp(-_Z))
_W = _U * (1 - _U) * (_Z[1] - _Z[0])  # du = u(1 − u) dz


def eps_from_rates(alpha: np.ndarray | float, beta: np.ndarray | float, delta: float = 0.0) -> np.ndarray:
    """ε(α, β) = log((1 − δ − max)/min) after folding; 0 where that is ≤ 0 (vectorised)."""
    a, b = np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float)
    flip = a + b > 1  # worse than random: the opposite guess has rates (1 − α, 1 − β)
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    num = 1 - delta - hi
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(lo > 0, np.log(np.maximum(num, 1e-300) / np.where(lo > 0, lo, 1.0)), np.inf)
    eps = np.where(num <= 0, 0.0, eps)
    return np.maximum(eps, 0.0)


def _check(tp: int, fp: int, tn: int, fn: int, delta: float, confidence: float) -> None:
    for name, v in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)):
        if v < 0 or int(v) != v:
            raise ValueError(f"{name} must be a non-negative integer count, got {v}")
    if tp + fn == 0 or tn + fp == 0:
        raise ValueError("need at least one member (tp + fn > 0) and one non-member (tn + fp > 0)")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided binomial interval for a rate, k successes out of n."""
    lo, hi = _cp_arrays(np.asarray(k), np.asarray(n), confidence)
    return float(lo), float(hi)


def _cp_arrays(k: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised Clopper–Pearson bounds (0 at k = 0, 1 at k = n)."""
    tail = (1 - confidence) / 2
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore"):
        lo = np.where(k == 0, 0.0, stats.beta.ppf(tail, np.maximum(k, 1), n - k + 1))
        hi = np.where(k == n, 1.0, stats.beta.ppf(1 - tail, k + 1, np.maximum(n - k, 1)))
    return lo, hi


def clopper_pearson_lower_bound(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray,
                                delta: float = 1e-5, confidence: float = 0.95) -> np.ndarray:
    """Lower end of the Clopper–Pearson ε interval, vectorised over count arrays (no checks).

    Minimum of ε(α, β) over the rate rectangle: at (α_hi, β_hi) below the anti-diagonal, at
    (α_lo, β_lo) above it, 0 if the rectangle crosses it (see the module docstring).
    """
    per_rate = 1 - (1 - confidence) / 2  # union bound over the two rates
    a_lo, a_hi = _cp_arrays(fp, np.add(fp, tn), per_rate)
    b_lo, b_hi = _cp_arrays(fn, np.add(fn, tp), per_rate)
    below = eps_from_rates(a_hi, b_hi, delta)
    above = eps_from_rates(a_lo, b_lo, delta)
    return np.where(a_hi + b_hi <= 1, below, np.where(a_lo + b_lo >= 1, above, 0.0))


def _posterior_cdf(tp: int, fp: int, tn: int, fn: int, delta: float) -> Callable[[float], float]:
    """e ↦ P[ε(α, β) ≤ e] under α ~ Beta(fp + ½, tn + ½), β ~ Beta(fn + ½, tp + ½), independent."""
    alpha = stats.beta.ppf(_U, fp + 0.5, tn + 0.5)
    beta_cdf = stats.beta(fn + 0.5, tp + 0.5).cdf

    def cdf(e: float) -> float:
        k = np.exp(e)
        lo = np.maximum(np.maximum((1 - delta - alpha) / k, 1 - delta - k * alpha), 0.0)
        hi = np.minimum(np.minimum(1 - (alpha - delta) / k, delta + k * (1 - alpha)), 1.0)
        inside = np.where(hi > lo, beta_cdf(hi) - beta_cdf(np.minimum(lo, hi)), 0.0)
        return float(np.clip(np.sum(_W * inside) / np.sum(_W), 0.0, 1.0))

    return cdf


def bayesian_posterior_cdf(e: float, tp: int, fp: int, tn: int, fn: int, delta: float = 1e-5) -> float:
    """Posterior probability that ε(α, β) ≤ e (Jeffreys-style posteriors, see the module docstring)."""
    _check(tp, fp, tn, fn, delta, 0.5)
    return _posterior_cdf(tp, fp, tn, fn, delta)(e)


def _quantile(cdf: Callable[[float], float], p: float) -> float:
    """Smallest e ≥ 0 with cdf(e) ≥ p (cdf non-decreasing)."""
    if cdf(0.0) >= p:
        return 0.0
    hi = 1.0
    while cdf(hi) < p:
        hi *= 2
        if hi > 1e3:
            return float("inf")
    return float(optimize.brentq(lambda e: cdf(e) - p, 0.0, hi, xtol=1e-7))


def epsilon_interval(tp: int, fp: int, tn: int, fn: int, delta: float = 1e-5,
                     method: str = "clopper-pearson", confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, estimate, high) for ε from membership-guess counts.

    tp / fn: members guessed in / out; tn / fp: non-members guessed out / in. The estimate is the
    plug-in ε(fp/n_out, fn/n_in) for Clopper–Pearson (∞ when a count is 0) and the posterior median
    for the Bayesian method (always inside its interval).
    """
    _check(tp, fp, tn, fn, delta, confidence)
    n_out, n_in = fp + tn, tp + fn
    if method == "clopper-pearson":
        per_rate = 1 - (1 - confidence) / 2  # union bound over the two rates
        a_lo, a_hi = clopper_pearson(fp, n_out, per_rate)
        b_lo, b_hi = clopper_pearson(fn, n_in, per_rate)
        corners = eps_from_rates(np.array([a_lo, a_lo, a_hi, a_hi]), np.array([b_lo, b_hi, b_lo, b_hi]), delta)
        low = float(clopper_pearson_lower_bound(tp, fp, tn, fn, delta, confidence))
        return low, float(eps_from_rates(fp / n_out, fn / n_in, delta)), float(corners.max())
    if method == "bayesian":
        tail = (1 - confidence) / 2
        cdf = _posterior_cdf(tp, fp, tn, fn, delta)
        return _quantile(cdf, tail), _quantile(cdf, 0.5), _quantile(cdf, 1 - tail)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def epsilon_lower_bound(tp: int, fp: int, tn: int, fn: int, delta: float = 1e-5,
                        method: str = "clopper-pearson", confidence: float = 0.95) -> float:
    """Lower end of the two-sided interval for ε (see :func:`epsilon_interval`)."""
    return epsilon_interval(tp, fp, tn, fn, delta, method, confidence)[0]
