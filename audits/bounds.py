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
  or is 0 when the rectangle crosses the anti-diagonal (corners alone would overstate it).
  Exact: P[low > ε(α, β)] ≤ (1 − c)/2 for every α, β and n. This is the lower bound that
  refutes a claim;
- Bayesian (Zanella-Béguelin et al. 2023, 'Bayesian Estimation of Differential Privacy'):
  independent Jeffreys posteriors Beta(k + ½, n − k + ½) for α and β. The estimate is the
  posterior median of ε(α, β) and the high end its (1 + c)/2 posterior quantile, as in the paper.
  The low end is NOT the paper's (1 − c)/2 posterior quantile: ε(α, β) is a maximum of two
  log-ratios with a kink at α = β, and the posterior of a maximum sits above it (at α = β the
  quantile exceeds the true ε with probability τ(1 − log τ) ≈ 4.7τ, τ = (1 − c)/2, under a normal
  approximation), and with δ = 0 it has no mass at ε = 0. Instead the low end is the minimum
  of ε over the rectangle of one-sided Jeffreys credible bounds (α_hi, β_hi, or α_lo, β_lo above
  the anti-diagonal), each at posterior level 1 − τ/2: like Clopper–Pearson, no kink bias, and 0
  when the rectangle crosses the anti-diagonal. [low, high] still has posterior probability ≥ c.
  Jeffreys bounds are only approximately calibrated (Brown, Cai & DasGupta 2001): a
  per-rate bound under-covers up to ~2.3× its nominal tail when the count is 0–5 (its
  upper end at k = 0 is replaced by the exact 1 − (τ/2)^{1/n}, and the lower at k = n by
  (τ/2)^{1/n}). The Bayesian interval is therefore an estimate, not a guaranteed bound.
  The posterior CDF is a numerical integral, not Monte Carlo, so it is deterministic and
  accurate far into the tails: {ε(α, β) ≤ e} is the (e, δ) privacy region, for fixed α the
  band L(α) ≤ β ≤ U(α) with
      L = max(0, (1 − δ − α)e^{−e}, 1 − δ − e^e α),  U = min(1, 1 − (α − δ)e^{−e}, δ + e^e (1 − α)),
  so P[ε ≤ e] = E_α[F_β(U(α)) − F_β(L(α))], integrated over α in logit-quantile space by
  Gauss–Legendre panels whose ends include every kink of L and U and the α where L or U
  crosses a posterior quantile of β: the integrand is smooth on each panel (absolute error
  ≲ 1e-9 against a 4–8× finer rule, also when the band edge is steep, e^e ≫ 1).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import optimize, special, stats

METHODS = ("clopper-pearson", "bayesian")
# posterior quadrature: panels in z = logit(u), u = F_α(α), between z = ±_ZMAX (mass outside < 5e-16)
_ZMAX = 36.0
_Z_GRID = np.arange(-_ZMAX, _ZMAX + 0.5, 1.0)  # α's own quantiles (resolve its density)
_B_LEVELS = special.expit(np.arange(-_ZMAX, _ZMAX + 0.5, 2.0))  # β quantiles whose α-preimages split panels
_GL_X, _GL_W = np.polynomial.legendre.leggauss(10)


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


def _check_count(name: str, v: float, caller: str = "") -> None:
    """ValueError unless ``v`` is a non-negative integer (int or integral float; NaN and inf are not)."""
    try:
        ok = bool(math.isfinite(v) and v >= 0 and int(v) == v)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{caller}{name} must be a non-negative integer count, got {v!r}")


def _check_delta_confidence(delta: float, confidence: float, caller: str = "") -> None:
    """ValueError unless 0 ≤ δ < 1 and 0 < confidence < 1 (NaN fails both; ``caller`` prefixes the message)."""
    if not 0 <= delta < 1:
        raise ValueError(f"{caller}delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"{caller}confidence must be in (0, 1) (a fraction, e.g. 0.95), got {confidence}")


def _check(tp: int, fp: int, tn: int, fn: int, delta: float, confidence: float) -> None:
    for name, v in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)):
        _check_count(name, v)
    if tp + fn == 0 or tn + fp == 0:
        raise ValueError("need at least one member (tp + fn > 0) and one non-member (tn + fp > 0)")
    _check_delta_confidence(delta, confidence)


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided binomial interval for a rate, k successes out of n."""
    if not (n >= 1 and int(n) == n and 0 <= k <= n and int(k) == k):
        raise ValueError(f"clopper_pearson: need integer counts 0 <= k <= n with n >= 1, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"clopper_pearson: confidence must be in (0, 1), got {confidence}")
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


def _jeffreys_arrays(k: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised equal-tailed Jeffreys credible bounds, Beta(k + ½, n − k + ½) quantiles at τ and 1 − τ,
    τ = (1 − confidence)/2; at k = 0: [0, 1 − τ^{1/n}], at k = n: [τ^{1/n}, 1] (the exact ends there,
    where the Jeffreys quantile under-covers most; Brown, Cai & DasGupta 2001)."""
    tail = (1 - confidence) / 2
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k == n, tail ** (1 / n), special.betaincinv(k + 0.5, n - k + 0.5, tail))
        hi = np.where(k == 0, -np.expm1(np.log(tail) / n), special.betaincinv(k + 0.5, n - k + 0.5, 1 - tail))
    return np.where(k == 0, 0.0, lo), np.where(k == n, 1.0, hi)


def _rectangle_min(a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray,
                   delta: float) -> np.ndarray:
    """min of ε(α, β) over [a_lo, a_hi] × [b_lo, b_hi]: at (a_hi, b_hi) below the anti-diagonal,
    at (a_lo, b_lo) above it, 0 if the rectangle crosses it (see the module docstring)."""
    below = eps_from_rates(a_hi, b_hi, delta)
    above = eps_from_rates(a_lo, b_lo, delta)
    return np.where(a_hi + b_hi <= 1, below, np.where(a_lo + b_lo >= 1, above, 0.0))


def clopper_pearson_lower_bound(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray,
                                delta: float = 1e-5, confidence: float = 0.95) -> np.ndarray:
    """Lower end of the Clopper–Pearson ε interval, vectorised over count arrays (no checks).

    Minimum of ε(α, β) over the rate rectangle: at (α_hi, β_hi) below the anti-diagonal, at
    (α_lo, β_lo) above it, 0 if the rectangle crosses it (see the module docstring).
    """
    per_rate = 1 - (1 - confidence) / 2  # union bound over the two rates
    a_lo, a_hi = _cp_arrays(fp, np.add(fp, tn), per_rate)
    b_lo, b_hi = _cp_arrays(fn, np.add(fn, tp), per_rate)
    return _rectangle_min(a_lo, a_hi, b_lo, b_hi, delta)


def bayesian_lower_bound(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray,
                         delta: float = 1e-5, confidence: float = 0.95) -> np.ndarray:
    """Low end of the Bayesian ε interval, vectorised over count arrays (no checks): min of
    ε(α, β) over the rectangle of Jeffreys credible bounds, each rate at level 1 − (1 − c)/2
    (see the module docstring for why this, not the posterior quantile of ε)."""
    per_rate = 1 - (1 - confidence) / 2
    a_lo, a_hi = _jeffreys_arrays(fp, np.add(fp, tn), per_rate)
    b_lo, b_hi = _jeffreys_arrays(fn, np.add(fn, tp), per_rate)
    return _rectangle_min(a_lo, a_hi, b_lo, b_hi, delta)


def _posterior_cdf(tp: int, fp: int, tn: int, fn: int, delta: float) -> Callable[[float], float]:
    """e ↦ P[ε(α, β) ≤ e] under α ~ Beta(fp + ½, tn + ½), β ~ Beta(fn + ½, tp + ½), independent
    (0 for e < 0: ε ≥ 0). Gauss–Legendre panels in z = logit F_α(α), split where the band edges
    L(α), U(α) have a kink or cross a β quantile (module docstring)."""
    a1, a2, b1, b2 = fp + 0.5, tn + 0.5, fn + 0.5, tp + 0.5
    qb = special.betaincinv(b1, b2, _B_LEVELS)

    def alpha_at(z: np.ndarray) -> np.ndarray:  # F_α^{-1}(expit z), each tail from its own side
        return np.where(z <= 0, special.betaincinv(a1, a2, special.expit(np.minimum(z, 0))),
                        1 - special.betaincinv(a2, a1, special.expit(-np.maximum(z, 0))))

    def z_at(alpha: np.ndarray) -> np.ndarray:  # logit F_α(α)
        alpha = np.clip(alpha, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            return np.log(special.betainc(a1, a2, alpha)) - np.log(special.betaincc(a1, a2, alpha))

    def cdf(e: float) -> float:
        if e < 0:
            return 0.0
        if e == np.inf:
            return 1.0
        k = np.exp(e)
        c = (1 - delta) / (k + 1)  # where the two sloped pieces of L (and of U, mirrored) meet
        edges = np.concatenate([1 - delta - k * qb, (1 - delta - qb) / k, delta + k * (1 - qb), 1 - (qb - delta) / k,
                                [c, 1 - c, (1 - delta) / k, 1 - (1 - delta) / k, delta, 1 - delta]])
        z = np.unique(np.clip(np.concatenate([_Z_GRID, z_at(edges)]), -_ZMAX, _ZMAX))
        mid, half = (z[1:] + z[:-1]) / 2, (z[1:] - z[:-1]) / 2
        zn = (mid[:, None] + half[:, None] * _GL_X).ravel()
        w = (half[:, None] * _GL_W).ravel() * special.expit(zn) * special.expit(-zn)  # du = u(1 − u) dz
        alpha = alpha_at(zn)
        lo = np.maximum(np.maximum((1 - delta - alpha) / k, 1 - delta - k * alpha), 0.0)
        hi = np.minimum(np.minimum(1 - (alpha - delta) / k, delta + k * (1 - alpha)), 1.0)
        inside = np.where(hi > lo, special.betainc(b1, b2, hi) - special.betainc(b1, b2, np.minimum(lo, hi)), 0.0)
        return float(np.clip(np.sum(w * inside), 0.0, 1.0))

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
    for the Bayesian method (inside its interval). Clopper–Pearson's low end is an exact lower
    bound (P[low > ε] ≤ (1 − c)/2); the Bayesian interval is a credible interval, an estimate
    whose low end is only approximately calibrated (module docstring).
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
        cdf = _posterior_cdf(tp, fp, tn, fn, delta)
        low = float(bayesian_lower_bound(tp, fp, tn, fn, delta, confidence))
        return low, _quantile(cdf, 0.5), _quantile(cdf, 1 - (1 - confidence) / 2)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def epsilon_lower_bound(tp: int, fp: int, tn: int, fn: int, delta: float = 1e-5,
                        method: str = "clopper-pearson", confidence: float = 0.95) -> float:
    """Low end of the interval for ε (see :func:`epsilon_interval`); only Clopper–Pearson's is a
    guaranteed lower bound."""
    _check(tp, fp, tn, fn, delta, confidence)
    if method == "clopper-pearson":
        return float(clopper_pearson_lower_bound(tp, fp, tn, fn, delta, confidence))
    if method == "bayesian":
        return float(bayesian_lower_bound(tp, fp, tn, fn, delta, confidence))
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
