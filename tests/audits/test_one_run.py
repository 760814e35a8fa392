"""One-run audit (Steinke, Nasr & Jagielski 2023) against REFERENCE_VALUES.md."""
from __future__ import annotations

import math

import numpy as np
import pytest

from audits import abstaining_guesses, one_run_audit, one_run_epsilon


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
