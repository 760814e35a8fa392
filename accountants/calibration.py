"""Calibrate the noise multiplier σ to a target (ε, δ).

Returns σ with ε(σ) ≤ target, ε(σ) ≥ (1 − rtol)·target and ε(σ/(1 + rtol)) > target: the
smallest feasible σ to within ``rtol`` (default 1 %); ε decreases in σ. Few calls to the
requested accountant:

1. Start from the GDP-CLT σ (closed form; Dong, Roth & Su 2019, Corollary 4).
2. Find the root of a cheap stand-in by a safeguarded secant on (log σ, log ε), which
   converges in 3–6 calls for these smooth curves: for ``prv`` and ``pld`` the PRV
   accountant on a 5× coarser grid (``backends.prv_search_epsilon``), for ``rdp`` and
   ``gdp`` the accountant itself.
3. Finish on the requested accountant: step a little above σ̂ (by (1 + rtol)^{1/4}, less
   where ε is steep in σ) and check ε ≤ target there (one call; σ is raised while it fails); the stand-in, shifted by the gap it shows
   at that σ, confirms that σ/(1 + rtol) is infeasible (else the accountant is asked).
   If the stand-in misled, a bracketing search on the accountant itself takes over.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from scipy import optimize

from .backends import PRV_EPS_ERROR, prv_search_epsilon
from .composition import flatten, poisson_gaussian
from .epsilon import ACCOUNTANTS, check_delta, check_run, epsilon
from .gdp import delta_from_gdp, eps_from_gdp, gdp_mu

if TYPE_CHECKING:
    from .ledger import PrivacyLedger

_SIGMA_MAX = 1e4
_SIGMA_MIN = 1e-3

Fn = Callable[[float], float]


class UnreachableTargetError(ValueError):
    """No noise multiplier reaches the target (e.g. ε too small for this many steps)."""


def gdp_sigma(target_eps: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ whose CLT μ-GDP gives exactly ``target_eps`` at ``delta`` (an estimate, not a bound).

    μ solves δ(ε; μ) = δ; then μ = q√(T(e^{1/σ²} − 1)) ⇒ σ = 1/√(log(1 + μ²/(q²T))),
    or σ = √T/μ without subsampling.
    """
    hi = 1.0
    while delta_from_gdp(target_eps, hi) < delta:
        hi *= 2
        if hi > 1e8:
            return _SIGMA_MIN
    mu = optimize.brentq(lambda m: delta_from_gdp(target_eps, m) - delta, 1e-12, hi, xtol=1e-12)
    if sample_rate >= 1:
        return math.sqrt(steps) / mu
    return 1.0 / math.sqrt(math.log1p(mu * mu / (sample_rate * sample_rate * steps)))


def _gdp_slope(sigma: float, delta: float, sample_rate: float, steps: int) -> float:
    """d log ε / d log σ of the GDP-CLT ε at σ (a first guess of the accountant's slope)."""
    e1, e2 = (eps_from_gdp(gdp_mu(s, sample_rate, steps), delta) for s in (sigma, sigma * 1.01))
    if not (e1 > 0 and e2 > 0):
        return -1.0
    return min(max(math.log(e2 / e1) / math.log(1.01), -8.0), -0.3)


def _solve(fn: Fn, target: float, sigma0: float, slope0: float, tol: float) -> tuple[float, float]:
    """(σ, slope) with fn(σ) ≈ target for decreasing fn, and d log fn / d log σ there.

    Secant steps on (log σ, log fn) from σ0 (initial slope ``slope0``), at most ×4 at a time
    until the root is bracketed, then kept strictly inside the bracket (bisection when a
    step would leave it). Stops when |log(fn/target)| ≤ tol or the bracket is narrower than
    tol. Raises :class:`UnreachableTargetError` if fn(σ_max) > target.
    """
    x_min, x_max = math.log(_SIGMA_MIN), math.log(_SIGMA_MAX)

    def y(x: float) -> float:
        return math.log(max(fn(math.exp(x)), target * 1e-12) / target)

    x = min(max(math.log(sigma0), x_min), x_max)
    yx = y(x)
    lo: tuple[float, float] | None = None  # infeasible side (y > 0)
    hi: tuple[float, float] | None = None  # feasible side (y ≤ 0)
    slope = min(slope0, -0.1)
    for _ in range(100):
        if yx > 0:
            lo = (x, yx)
        else:
            hi = (x, yx)
        if abs(yx) <= tol:
            return math.exp(x), slope
        if lo is not None and hi is not None:
            if hi[0] - lo[0] <= tol:
                return math.exp(hi[0]), slope
            new = x - yx / slope
            if not lo[0] < new < hi[0]:
                new = 0.5 * (lo[0] + hi[0])
        else:
            new = x + min(max(-yx / slope, -math.log(4.0)), math.log(4.0))
            if new >= x_max:
                if x >= x_max:
                    raise UnreachableTargetError(f"ε={target} is not reachable with σ ≤ {_SIGMA_MAX:g}")
                new = x_max
            if new <= x_min:
                if x <= x_min:
                    return math.exp(x), slope  # feasible at the smallest σ we consider
                new = x_min
        y_new = y(new)
        if new != x and (y_new - yx) / (new - x) < 0:
            slope = (y_new - yx) / (new - x)
        x, yx = new, y_new
    return (math.exp(hi[0]) if hi is not None else math.exp(x)), slope


def _search(f: Fn, target: float, lo: float, hi: float, rtol: float) -> float:
    """Bracketing search on f itself, for f(lo) > target ≥ f(hi): a σ ≤ hi with f(σ) ≤ target,
    f(σ) ≥ (1 − rtol)·target and f(σ/(1 + rtol)) > target (regula falsi, Illinois, on log σ)."""
    flo, fhi = f(lo) - target, f(hi) - target
    side = 0
    for _ in range(200):
        if hi / lo <= 1 + rtol and (fhi >= -rtol * target or hi / lo <= 1 + 1e-6):
            return hi
        a, b = math.log(lo), math.log(hi)
        x = b - fhi * (b - a) / (fhi - flo) if fhi != flo else 0.5 * (a + b)
        margin = 0.05 * (b - a)
        x = min(max(x, a + margin), b - margin)
        mid = math.exp(x)
        fm = f(mid) - target
        if fm > 0:
            lo, flo = mid, fm
            if side == -1:
                fhi /= 2
            side = -1
        else:
            hi, fhi = mid, fm
            if side == 1:
                flo /= 2
            side = 1
    return hi


def _finish(f: Fn, target: float, sigma_hat: float, slope: float, rtol: float) -> float:
    """σ near ``sigma_hat`` meeting the three conditions of :func:`calibrate_noise` for f.

    ``slope`` (d log ε / d log σ near σ̂, from the stand-in) predicts ε(σ/(1 + rtol)); only
    when that prediction is within rtol/10 of the target is f asked there.
    """
    # a margin above σ̂ that covers the stand-in's error (~3e-4 in ε) yet keeps ε(σ) ≥ (1 − rtol/2)·target
    up = math.exp(min(math.log1p(rtol) / 4, 0.4 * rtol / -slope))
    lo, sigma = None, min(sigma_hat * up, _SIGMA_MAX)
    eps = f(sigma)
    step = up
    while eps > target:  # the stand-in was optimistic here: raise σ geometrically
        if sigma >= _SIGMA_MAX:
            raise UnreachableTargetError(f"ε={target} is not reachable with σ ≤ {_SIGMA_MAX:g}")
        lo, sigma, step = sigma, min(sigma * step, _SIGMA_MAX), step * step
        eps = f(sigma)
    below = sigma / (1 + rtol)
    if eps >= (1 - rtol) * target:
        if lo is not None and lo >= below:
            return sigma  # σ/(1 + rtol) ≤ lo, which is infeasible
        if below < _SIGMA_MIN or eps * (1 + rtol) ** -slope > target * (1 + rtol / 10):
            return sigma
        if f(below) > target:
            return sigma
    # the stand-in misled (or ε is very steep in σ): bracket on f itself and search
    if lo is None:
        lo = below
        while f(lo) <= target and lo > _SIGMA_MIN:
            sigma, lo = lo, max(lo / 2, _SIGMA_MIN)
        if f(lo) <= target:
            return lo
    return _search(f, target, lo, sigma, rtol)


def calibrate_noise(target_eps: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", rtol: float = 0.01) -> float:
    """Smallest σ (within ``rtol``) such that ``epsilon(σ, q, T, δ, accountant) <= target_eps``.

    Also ε(σ) ≥ (1 − rtol)·target_eps, so ``epsilon(calibrate_noise(ε)) ∈ [(1 − rtol)ε, ε]``.
    """
    if not (target_eps > 0 and math.isfinite(target_eps)):
        raise ValueError(f"calibrate_noise: target_eps must be a positive finite number, got {target_eps}")
    check_delta(delta)
    check_run(1.0, sample_rate, steps)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    if not 0 < rtol < 0.5:
        raise ValueError(f"calibrate_noise: rtol must be in (0, 0.5), got {rtol}")

    def f(sigma: float) -> float:
        return epsilon(sigma, sample_rate, steps, delta, accountant=accountant)

    if accountant in ("prv", "pld"):
        upper = accountant == "prv"

        def stand_in(sigma: float) -> float:
            return prv_search_epsilon(flatten(poisson_gaussian(sigma, sample_rate, steps)), float(delta), upper)
    else:
        stand_in = f
    sigma0 = gdp_sigma(target_eps, delta, sample_rate, steps)
    try:
        sigma_hat, slope = _solve(stand_in, target_eps, sigma0, _gdp_slope(sigma0, delta, sample_rate, steps),
                                  rtol / 20)
        return _finish(f, target_eps, sigma_hat, slope, rtol)
    except UnreachableTargetError:
        floor = (f" The PRV accountant's upper bound is its estimate + {PRV_EPS_ERROR:g} (its ε error), so targets "
                 f"near or below {PRV_EPS_ERROR:g} need another accountant (accountant='pld')."
                 if accountant == "prv" and target_eps <= 2 * PRV_EPS_ERROR else "")
        raise UnreachableTargetError(
            f"calibrate_noise: ε={target_eps} at δ={delta:g} is not reachable with σ ≤ {_SIGMA_MAX:g} "
            f"for q={sample_rate:g}, T={steps} ({accountant} accountant); raise ε, lower the steps or the "
            f"sampling rate.{floor}") from None


def calibrate_noise_after(spent: "PrivacyLedger", target_eps: float, delta: float, sample_rate: float, steps: int,
                          accountant: str = "prv", rtol: float = 0.01) -> float:
    """Smallest σ (within ``rtol``) such that the steps already in ``spent`` followed by ``steps`` Poisson-sampled
    Gaussian steps (σ, q) spend at most ``target_eps``: the budget that is left, for a plan that continues a run.

    ε(σ) = ε(spent ∘ PoissonGaussian(σ, q)^T) decreases in σ towards ε(spent); σ is searched on that composed
    event with the same guarantees as :func:`calibrate_noise` (ε(σ) ≤ target, ε(σ) ≥ (1 − rtol)·target or σ at
    the plan-alone value, ε(σ/(1 + rtol)) > target). Raises :class:`UnreachableTargetError` when even
    σ = 10⁴ would pass the target (the budget is spent).
    """
    check_delta(delta)
    check_run(1.0, sample_rate, steps)
    alone = calibrate_noise(target_eps, delta, sample_rate, steps, accountant=accountant, rtol=rtol)
    if not spent.entries:
        return alone

    def f(sigma: float) -> float:
        return spent.epsilon_if(poisson_gaussian(sigma, sample_rate, 1), delta, accountant=accountant, count=steps)

    if f(alone) <= target_eps:  # what was spent is negligible next to the plan's rounding
        return alone
    lo, hi = alone, alone * 2.0
    while f(hi) > target_eps:
        if hi >= _SIGMA_MAX:
            raise UnreachableTargetError(
                f"calibrate_noise_after: {spent.steps} steps already spend ε={spent.epsilon(delta, accountant):.4g} "
                f"of the target ε={target_eps:g} at δ={delta:g}; no σ ≤ {_SIGMA_MAX:g} fits {steps} more steps at "
                f"q={sample_rate:g} in what is left")
        lo, hi = hi, min(hi * 4.0, _SIGMA_MAX)
    return _search(f, target_eps, lo, hi, rtol)
