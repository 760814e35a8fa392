"""One-run audit (Steinke, Nasr & Jagielski 2023) against REFERENCE_VALUES.md."""
from __future__ import annotations

import math

import numpy as np
import pytest

from audits import abstaining_guesses, one_run_audit, one_run_epsilon, one_run_p_value


@pytest.mark.parametrize("m,r,v,delta,want", [(1000, 1000, 1000, 0, 5.8091), (1000, 1000, 1000, 1e-5, 5.7823),
                                              (1000, 100, 90, 0, 1.6308), (10000, 1000, 900, 1e-5, 2.0152)])
def test_reference_table(m, r, v, delta, want):
    assert one_run_epsilon(m, r, v, delta) == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("r", [100, 1000])
def test_all_correct_cannot_pass_the_ceiling(r):
    q = 0.05 ** (1 / r)
    assert one_run_epsilon(r, r, r) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_random_guessing_gives_zero():
    assert one_run_epsilon(1000, 1000, 500) == 0.0


def test_abstaining_guesser_and_audit():
    scores = np.arange(10.0)
    g = abstaining_guesses(scores, 2, 3)
    assert list(g) == [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1]
    # a perfect separator on 1000 canaries gives a clearly positive ε̂; a useless one gives 0
    included = np.random.default_rng(0).random(1000) < 0.5
    good = one_run_audit(included.astype(float) + 0.01 * np.arange(1000) / 1000, included)
    bad = one_run_audit(np.random.default_rng(1).random(1000), included)
    assert good["epsilon"] > 2.0 and bad["epsilon"] < 0.5


@pytest.mark.parametrize("m", [2, 3, 7, 199])
def test_odd_canary_counts_keep_the_guesses_within_m(m):
    # k = round(frac·m/2) rounded half to even gave 2k = m + 1 for guess fraction 1 and m ≡ 3 (mod 4)
    included = np.arange(m) % 2 == 0
    res = one_run_audit(included + 0.001 * np.arange(m), included)
    assert 2 * res["k"] <= m and res["r"] <= m and res["v"] <= res["r"]


def test_bad_one_run_inputs_are_named():
    with pytest.raises(ValueError, match="at least 2 canaries"):
        one_run_audit(np.array([1.0]), np.array([True]))
    with pytest.raises(ValueError, match="same length"):
        one_run_audit(np.zeros(4), np.ones(1, bool))


@pytest.mark.parametrize("kwargs,match", [(dict(delta=math.nan), "delta must be in \\[0, 1\\)"),
                                          (dict(delta=-1e-3), "delta must be in \\[0, 1\\)"),
                                          (dict(delta=1.0), "delta must be in \\[0, 1\\)"),
                                          (dict(confidence=-1), "confidence must be in \\(0, 1\\)"),
                                          (dict(confidence=0.0), "confidence must be in \\(0, 1\\)"),
                                          (dict(confidence=1.0), "confidence must be in \\(0, 1\\)"),
                                          (dict(confidence=95), "confidence must be in \\(0, 1\\)"),
                                          (dict(confidence=math.nan), "confidence must be in \\(0, 1\\)")])
def test_bad_delta_or_confidence_is_refused(kwargs, match):
    # a NaN or negative δ was read as δ = 0 (the largest ε̂); confidence −1 gave inf, 0 gave 64, 95 gave 0
    with pytest.raises(ValueError, match="one_run_epsilon: " + match):
        one_run_epsilon(1000, 1000, 1000, **kwargs)
    included = np.arange(20) % 2 == 0
    with pytest.raises(ValueError, match="one_run_audit: " + match):
        one_run_audit(included + 0.01 * np.arange(20), included, **kwargs)
    if "delta" in kwargs:
        with pytest.raises(ValueError, match="one_run_p_value: " + match):
            one_run_p_value(1.0, 1000, 1000, 1000, **kwargs)


@pytest.mark.parametrize("m,r,v,name", [(10.5, 4, 2, "m"), (10, 4.5, 2, "r"), (10, 4, 1.5, "v"), (10, 4, -1, "v"),
                                        (math.nan, 4, 2, "m"), (10, math.inf, 2, "r")])
def test_counts_must_be_non_negative_integers(m, r, v, name):
    with pytest.raises(ValueError, match=f"one_run_epsilon: {name} must be a non-negative integer"):
        one_run_epsilon(m, r, v)
    with pytest.raises(ValueError, match=f"one_run_p_value: {name} must be a non-negative integer"):
        one_run_p_value(1.0, m, r, v)


def test_counts_must_be_ordered():
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_epsilon(10, 4, 5)
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_p_value(1.0, 3, 4, 2)
    assert one_run_epsilon(10.0, 4.0, 4.0) == one_run_epsilon(10, 4, 4)  # integral floats are counts


def test_plus_minus_one_inclusion_bits_are_refused_with_the_conversion():
    # S ∈ {−1, +1}^m as in Steinke et al. was cast to bool: every canary "included", every −1 guess wrong, ε̂ = 0
    rng = np.random.default_rng(0)
    s = np.where(rng.random(200) < 0.5, 1, -1)
    scores = s + rng.normal(0, 0.1, 200)
    with pytest.raises(ValueError, match=r"included looks like the ±1 convention.*`included > 0`"):
        one_run_audit(scores, s)
    with pytest.raises(ValueError, match="included must be booleans or 0 / 1"):
        one_run_audit(scores, s * 2)
    res = one_run_audit(scores, s > 0)
    assert res["epsilon"] > 2.0
    assert one_run_audit(scores, (s > 0).astype(int)) == res  # 0 / 1 is the same as bool


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused(bad):
    # NaN sorted last, i.e. as the most member-like canary: a diverged model gave a number with no warning
    included = np.arange(10) % 2 == 0
    scores = np.arange(10.0)
    scores[[3, 7]] = bad
    with pytest.raises(ValueError, match=r"one_run_audit: 2 of 10 scores are not finite .* indices \[3, 7\]"):
        one_run_audit(scores, included)
    with pytest.raises(ValueError, match="one_run_audit: 10 of 10 scores are not finite"):
        one_run_audit(np.full(10, np.nan), np.ones(10, bool))
    with pytest.raises(ValueError, match="abstaining_guesses: 2 of 10 scores are not finite"):
        abstaining_guesses(scores, 1, 1)
