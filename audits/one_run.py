"""One-run auditing (Steinke, Nasr & Jagielski 2023, 'Privacy Auditing with One (1) Training Run').

m canaries, each included independently with probability ½ in a single training run.
The auditor guesses inclusion for r of them (abstaining on the rest); v guesses are right.
For an (ε, δ)-DP run (their Theorem 5.2 / Prop. 5.7, with q = e^ε/(1 + e^ε)):
    P[v correct] ≤ p(ε) = P[Bin(r, q) ≥ v] + 2mδ · max_{1≤i≤v} (1/i)·P[v − i ≤ Bin(r, q) < v],
so ε̂ = the largest ε with p(ε) < 1 − confidence is a lower bound on ε at that confidence.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from .attacks import _finite_scores, _membership_labels
from .bounds import _check_count, _check_delta_confidence


def _check_counts(m: int, r: int, v: int, caller: str) -> None:
    """ValueError unless m, r, v are non-negative integers with v ≤ r ≤ m."""
    for name, value in (("m", m), ("r", r), ("v", v)):
        _check_count(name, value, caller)
    if not v <= r <= m:
        raise ValueError(f"{caller}need 0 <= v <= r <= m (v correct of r guesses on m canaries), "
                         f"got m={m}, r={r}, v={v}")


def one_run_p_value(eps: float, m: int, r: int, v: int, delta: float = 0.0) -> float:
    """p(ε): probability that an (ε, δ)-DP run lets r guesses have ≥ v correct.

    m, r, v: non-negative integers with v ≤ r ≤ m; 0 ≤ δ < 1 (else a ValueError)."""
    _check_counts(m, r, v, "one_run_p_value: ")
    _check_delta_confidence(delta, 0.5, "one_run_p_value: ")
    return _p_value(eps, m, r, v, delta)


def _p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """:func:`one_run_p_value` without the input checks."""
    q = 1.0 / (1.0 + math.exp(-eps))
    p = float(stats.binom.sf(v - 1, r, q))
    if delta > 0 and v > 0:
        cdf = stats.binom.cdf(np.arange(-1, v), r, q)  # cdf[j + 1] = P[Bin ≤ j]
        i = np.arange(1, v + 1)
        window = cdf[v] - cdf[v - i]  # P[v − i ≤ Bin < v] = F(v−1) − F(v−i−1)
        p += 2 * m * delta * float(np.max(window / i))
    return min(p, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """ε̂: largest ε with p(ε) < 1 − confidence (0 if even ε = 0 is not rejected).

    m, r, v: non-negative integers with v ≤ r ≤ m; 0 ≤ δ < 1 and 0 < confidence < 1, a fraction
    (else a ValueError)."""
    _check_counts(m, r, v, "one_run_epsilon: ")
    _check_delta_confidence(delta, confidence, "one_run_epsilon: ")
    level = 1 - confidence
    f = lambda e: _p_value(e, m, r, v, delta) - level  # noqa: E731  increasing in ε
    if r == 0 or f(0.0) >= 0:
        return 0.0
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
        if hi > 200:
            return math.inf
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-10))


def abstaining_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Guess +1 (included) for the k₊ highest scores, −1 for the k₋ lowest, 0 (abstain) else."""
    scores = _finite_scores(scores, "abstaining_guesses")
    if k_plus + k_minus > scores.size:
        raise ValueError(f"abstaining_guesses: k_plus + k_minus = {k_plus + k_minus} > {scores.size} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=int)
    if k_minus:
        guesses[order[:k_minus]] = -1
    if k_plus:
        guesses[order[scores.size - k_plus:]] = 1
    return guesses


def one_run_audit(scores: np.ndarray, included: np.ndarray, delta: float = 0.0, confidence: float = 0.95,
                  guess_fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    """ε̂ from one run: higher score = more likely included; ``included`` the true bits.

    ``scores`` must be finite; ``included`` booleans or 0 / 1 (for the paper's ±1 form pass
    ``included > 0``); otherwise a ValueError.

    k (guesses on each side) is chosen over ``guess_fractions`` after seeing the result, so
    the confidence level is split over the grid (union bound): each k is tested at
    1 − (1 − confidence)/len(grid), which keeps the overall statement at ``confidence``.
    k = max(1, ⌊frac·m/2⌋), so 2k ≤ m guesses (rounding up would exceed m when m is odd).
    """
    scores, included = np.asarray(scores, float), np.asarray(included)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError("one_run_audit: scores and included must be 1-D arrays of the same length (one per "
                         f"canary), got shapes {scores.shape} and {included.shape}")
    scores, included = _finite_scores(scores, "one_run_audit"), _membership_labels(included, "included",
                                                                                     "one_run_audit")
    if scores.size < 2:
        raise ValueError(f"one_run_audit: need at least 2 canaries (one guess on each side), got {scores.size}; "
                         "use more canaries")
    _check_delta_confidence(delta, confidence, "one_run_audit: ")
    if not guess_fractions or not all(0 < f <= 1 for f in guess_fractions):
        raise ValueError(f"one_run_audit: guess_fractions must be a non-empty tuple in (0, 1], got {guess_fractions}")
    m = scores.size
    per_k = 1 - (1 - confidence) / len(guess_fractions)
    best: dict | None = None
    for frac in guess_fractions:
        k = max(1, math.floor(frac * m / 2))
        g = abstaining_guesses(scores, k, k)
        r = int(np.count_nonzero(g))
        v = int(np.sum((g == 1) & included) + np.sum((g == -1) & ~included))
        eps = one_run_epsilon(m, r, v, delta, per_k)
        if best is None or eps > best["epsilon"]:
            best = {"epsilon": eps, "r": r, "v": v, "m": m, "k": k, "confidence": confidence}
    assert best is not None
    return best
