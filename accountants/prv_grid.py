"""Compose privacy random variables on one FFT grid, in float64 (Gopi, Lee & Wutschitz 2021).

The same algorithm as ``prv_accountant.PRVAccountant`` (its domain, its cell-centred,
mean-preserving discretisation, Fourier self-composition and ε search), arranged so that
every step is one vectorised pass:

- **Domain** (their Remark 5.6): half-width L ≥ max(ε_RDP(δ_err/4) of the composition,
  ε_RDP(δ_err/(8k)) of each single step, ε_err) + 3, widened to a 5-smooth FFT size;
  mesh h = ε_err / √(k/2 · ln(12/δ_err)) (Theorem 5.5) for k compositions in total.
  Grid points t_i = (i − half)·h, i = 0 … n − 1, n = 2·half + 2.
- **Discretisation**: cell i holds P[t_i − h/2 < Y ≤ t_i + h/2] of Y truncated to
  [t_0, t_{n−1}] (and to where its tails hold more than 1e-30) and renormalised; the CDF is evaluated once per cell edge (below the
  median) and the survival function once per edge above it, so no mass is a difference
  of two numbers close to 1. The grid is then shifted so its mean equals the truncated
  continuous mean (Theorem 5.5 needs a mean-preserving discretisation), computed by quadrature
  in the mechanism's own variable (``truncated_mean``; prv_accountant's quadrature of the CDF is
  off by ~1e-3 relative at σ = 0.3, which moves ε by T times that).
- **Composition**: the product of every PRV's transform to its count, one inverse FFT
  (circular, as prv_accountant's Fourier composer; the safe domain keeps wrapped mass
  below δ_err). A heterogeneous run costs one FFT per distinct (q, σ) plus one.
- **ε**: δ(ε) = Σ_{t_j ≥ ε} p_j (1 − e^{ε − t_j}) from two tail sums; the estimate solves
  δ(ε) = δ, and the bounds are ε(δ ∓ δ_err) ± ε_err (Theorem 5.5), with δ_err widened by the
  float64 round-off the FFT leaves (estimated from the pmf's negative entries); where that is
  not small against δ the grid refuses (and the caller falls back to a coarser grid or RDP).

Privacy assumption: each PRV is that of a (Poisson-subsampled) Gaussian mechanism with
no mass at infinity; the upper bound is a valid ε as long as L and h are as above.
``tests/accountants/test_prv_grid.py`` checks every number against prv_accountant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

import numpy as np
from .opacus_rdp import rdp as opacus_rdp
from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
from scipy.fft import irfft, next_fast_len, rfft
from scipy.signal import lfilter

from .prv_gaussian import GaussianPRV, PoissonSubsampledGaussianPRV

#: RDP orders for the safe domain. Any set gives a valid L (fewer orders only widen it); integer
#: orders cost opacus ~5× less than fractional ones
SAFE_DOMAIN_ORDERS = np.array([1.25, 1.5, 1.75] + list(range(2, 65)) + [80, 96, 128, 192, 256])

Pair = tuple[float, float]  # (sample rate q, noise multiplier σ); q = 1 means no subsampling


class PRVGridError(ValueError):
    """The discretisation cannot give a trustworthy ε (grid too coarse or δ too small for float64)."""


@dataclass(frozen=True)
class Grid:
    """Aligned grid t_i = (i − half)·mesh, i = 0 … size − 1, with the error budget it was built for."""

    mesh: float
    half: int
    eps_error: float
    delta_error: float

    @property
    def size(self) -> int:
        return 2 * self.half + 2

    @property
    def t_min(self) -> float:
        return -self.half * self.mesh

    @property
    def t_max(self) -> float:
        return (self.half + 1) * self.mesh


def mesh_size(total_steps: int, eps_error: float, delta_error: float) -> float:
    """h = ε_err / √(k/2 · ln(12/δ_err)) (Gopi et al. 2021, Theorem 5.5)."""
    return eps_error / math.sqrt(total_steps / 2 * math.log(12 / delta_error))


@lru_cache(maxsize=1024)
def _rdp_one_step(pair: Pair) -> np.ndarray:
    q, sigma = pair
    rdp = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=SAFE_DOMAIN_ORDERS),
                     dtype=float)
    rdp.setflags(write=False)
    return rdp


def _rdp_to_eps(rdp: np.ndarray, delta: float) -> float:
    """ε = min_α rdp(α) − ln(δα)/(α − 1) + ln(1 − 1/α) (Balle et al. 2020, Thm 21; as prv_accountant)."""
    a = SAFE_DOMAIN_ORDERS
    with np.errstate(invalid="ignore"):
        eps = rdp - np.log(delta * a) / (a - 1) + np.log1p(-1 / a)
    return float(np.nanmin(eps))


def safe_half_width(pairs: Sequence[Pair], counts: Sequence[int], eps_error: float, delta_error: float) -> float:
    """L of Remark 5.6 (Gopi et al. 2021), as prv_accountant's ``compute_safe_domain_size``."""
    total = sum(counts)
    rdps = [_rdp_one_step(p) for p in pairs]
    composed = sum(n * r for r, n in zip(rdps, counts))
    L = _rdp_to_eps(composed, delta_error / 4)
    for r in rdps:
        L = max(L, _rdp_to_eps(r, delta_error / 8 / total))
    return max(L, eps_error) + 3


def make_grid(half_width: float, total_steps: int, eps_error: float, delta_error: float) -> Grid:
    """The aligned grid covering [−half_width, half_width] whose size has a fast FFT (even, 5-smooth).

    A wider domain than Remark 5.6 asks for stays safe, so the size is rounded up.
    """
    mesh = mesh_size(total_steps, eps_error, delta_error)
    half = math.ceil(half_width / mesh) + 1
    size = next_fast_len(2 * half + 2, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return Grid(mesh=mesh, half=size // 2 - 1, eps_error=eps_error, delta_error=delta_error)


def make_prv(pair: Pair) -> GaussianPRV | PoissonSubsampledGaussianPRV:
    q, sigma = pair
    return GaussianPRV(sigma) if q >= 1 else PoissonSubsampledGaussianPRV(q, sigma)


def discretise(pair: Pair, grid: Grid) -> tuple[np.ndarray, float]:
    """(pmf on the grid, mean shift) of the PRV of ``pair`` truncated to the grid.

    Cell i is (e_i, e_{i+1}] with e_0 = t_min, e_i = t_i − h/2, e_n = t_max. Only the cells
    between the PRV's ``support()`` ends are kept (each tail beyond holds ≤ 1e-30): the PRV
    is truncated there and renormalised, which moves δ(ε) of a k-fold composition by at most
    2k·1e-30 — far below δ_err. Raises :class:`PRVGridError` if the grid is too coarse for a
    mean-preserving shift (< h/2).
    """
    prv = make_prv(pair)
    n, h = grid.size, grid.mesh
    lo, hi = prv.support()
    # edge j sits at (j − half − ½)·h; keep the edges from the last one ≤ lo to the first one ≥ hi
    first = min(max(math.floor(lo / h + grid.half + 0.5), 0), n - 1)
    last = max(min(math.ceil(hi / h + grid.half + 0.5), n), first + 1)
    edges = (np.arange(first, last + 1, dtype=np.float64) - (grid.half + 0.5)) * h
    if first == 0:
        edges[0] = grid.t_min
    if last == n:
        edges[-1] = grid.t_max
    k = int(np.searchsorted(edges, prv.median(), side="right"))  # edges[:k] ≤ median < edges[k:]
    if not 0 < k < len(edges):
        raise PRVGridError(f"PRV of (q, σ) = {pair}: its median lies outside the grid [{grid.t_min}, {grid.t_max}]")
    low, high = prv.cdf(edges[:k]), prv.sf(edges[k:])
    masses = np.empty(len(edges) - 1)
    masses[:k - 1] = np.diff(low)
    masses[k - 1] = (1.0 - low[-1]) - high[0]
    masses[k:] = high[:-1] - high[1:]
    np.maximum(masses, 0.0, out=masses)
    masses /= (1.0 - low[0]) - high[-1]  # the truncated PRV: renormalised mass inside the grid
    pmf = np.zeros(n)
    pmf[first:last] = masses
    mean_c = (prv.truncated_mean(float(edges[0]), float(edges[-1])) if hasattr(prv, "truncated_mean")
              else PrivacyRandomVariableTruncated(prv, float(edges[0]), float(edges[-1])).mean())
    mean_d = float(np.dot((np.arange(first, last) - grid.half) * h, masses))
    shift = mean_c - mean_d
    if not abs(shift) < h / 2:
        raise PRVGridError(f"PRV of (q, σ) = {pair}: discrete mean differs from the continuous one by {shift:.3g} "
                           f"≥ h/2 = {h / 2:.3g}; use a coarser ε error or a wider grid")
    return pmf, shift


@dataclass(frozen=True)
class ComposedPRV:
    """The composed PRV on ``grid``: pmf[j] is the mass at t_j = (j − half)·mesh + shift."""

    pmf: np.ndarray
    shift: float
    grid: Grid

    def ts(self) -> np.ndarray:
        return (np.arange(self.grid.size) - self.grid.half) * self.grid.mesh + self.shift

    def _tail_sums(self, t_from: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_j, Σ_{i≥j} p_i, Σ_{i≥j} p_i e^{t_j − t_i}) for the points t_j ≥ ``t_from``.

        The last sum is e^{t_j} times the tail sum of p_i e^{−t_i}, formed without e^{±t} (which
        overflows for |t| > 709, i.e. for runs with ε in the hundreds): on the uniform grid it is
        the contracting recursion s_j = p_j + e^{−h} s_{j+1}, run from the top down.
        """
        t = self.ts()
        start = int(np.searchsorted(t, t_from))
        t, p = t[start:], self.pmf[start:]
        d1 = np.cumsum(p[::-1])[::-1]
        s = lfilter([1.0], [1.0, -math.exp(-self.grid.mesh)], p[::-1])[::-1]
        return t, d1, s

    @cached_property
    def _upper_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tail sums from t = −ε_err − 2h up: all that ε ≥ −ε_err needs."""
        return self._tail_sums(-self.grid.eps_error - 2 * self.grid.mesh)

    def delta(self, eps: np.ndarray | float) -> np.ndarray:
        """δ(ε) = Σ_{t_j ≥ ε} p_j (1 − e^{ε − t_j}) (prv_accountant's delta estimate), vectorised over ε."""
        eps = np.asarray(eps, dtype=float)
        t, d1, s = self._upper_tables
        if np.min(eps) <= t[0]:
            t, d1, s = self._tail_sums(float(np.min(eps)) - self.grid.mesh)
        i = np.searchsorted(t, eps)
        t, d1, s = np.append(t, np.inf), np.append(d1, 0.0), np.append(s, 0.0)
        return np.maximum(d1[i] - np.exp(eps - t[i]) * s[i], 0.0)  # ε ≤ t_i: no overflow

    def epsilon_at(self, delta: float) -> float:
        """The ε solving δ(ε) = ``delta`` on this grid (prv_accountant's ``find_epsilon``).

        ε below −ε_err − 2h (where the tail sums start) is returned as that point: ε ≤ 0 up to the error.
        """
        t, d1, s = self._upper_tables
        neg_delta = s - d1  # −δ(t_j), non-decreasing in j
        i = int(np.searchsorted(neg_delta, -delta, side="left"))
        if i >= len(t):
            raise PRVGridError(f"δ={delta:g} is below what the grid resolves")
        if i == 0:
            return float(t[0])
        # on (t_{i−1}, t_i]: δ(ε) = d1_i − e^{ε − t_i} s_i
        return float(t[i] + math.log((d1[i] - delta) / s[i]))

    @cached_property
    def roundoff(self) -> float:
        """Bound on the float64 round-off in any δ(ε) of this pmf: 4·Σ_j max(−p_j, 0).

        The FFT leaves noise of ~1e-17–1e-16 per point (the transform's rounding, raised to the
        power k), symmetric around the true mass: where the true mass is ~0 it shows as negative
        entries, so 2·Σ max(−p_j, 0) estimates Σ_j |noise_j|, and a δ(ε) (a tail sum with weights
        in [0, 1] on both of its terms) moves by at most twice that. Theorem 5.5's δ_err assumes
        exact arithmetic; this is added to it. ~1e-13–1e-11 here: negligible for δ ≥ 1e-8.
        """
        return 4.0 * float(np.maximum(-self.pmf, 0.0).sum())

    def epsilon(self, delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) ε at ``delta``: ε(δ + δ_e) − ε_err, ε(δ), ε(δ − δ_e) + ε_err,
        δ_e = δ_err + round-off (Thm 5.5 with the float64 round-off added)."""
        g = self.grid
        delta_error = g.delta_error + self.roundoff
        # prv_accountant's own guard (long-double sums) and ours: the round-off must stay small against δ
        if delta_error >= delta / 2 or np.finfo(np.longdouble).eps * g.size > delta - delta_error:
            raise PRVGridError(f"δ={delta:g} is too small for a float64 grid of {g.size} points "
                               f"(round-off {self.roundoff:.2g})")
        return (self.epsilon_at(delta + delta_error) - g.eps_error, self.epsilon_at(delta),
                self.epsilon_at(delta - delta_error) + g.eps_error)


def _power(f: np.ndarray, count: int) -> np.ndarray:
    """f**count, with the entries whose power underflows (|f|^count < e^−700) set to 0 without computing them."""
    with np.errstate(divide="ignore"):
        keep = count * 0.5 * np.log(f.real ** 2 + f.imag ** 2) > -700.0
    out = np.zeros_like(f)
    out[keep] = f[keep] ** count
    return out


def compose(pairs: Sequence[Pair], counts: Sequence[int], grid: Grid) -> ComposedPRV:
    """Adaptive composition of counts[k] copies of each PRV: one FFT per PRV, one inverse FFT."""
    total = int(sum(counts))
    spectrum = None
    shift = 0.0
    for pair, count in zip(pairs, counts):
        pmf, s = discretise(pair, grid)
        f = _power(rfft(pmf), int(count))
        spectrum = f if spectrum is None else spectrum * f
        shift += count * s
    pmf = irfft(spectrum, n=grid.size)
    # index k of the circular sum of `total` indices is the point k − (total − 1)·half (mod n)
    roll = (total - 1) + (grid.size // 2 if total % 2 == 0 else 0)
    return ComposedPRV(np.roll(pmf, roll), shift, grid)
