"""DIFF2 mechanism: declared event ↔ noise and clipping; calibration; noise scale; recursion."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import accountants
from accountants.events import GaussianEvent
from mechanisms.diff2 import Diff2Config, Diff2Mechanism, calibrate_diff2, diff2_event, diff2_mu


def test_event_matches_noise_and_clipping_by_hand():
    # R = 50 rounds, refresh every T = 8: refreshes at t = 0, 8, …, 48 → K1 = 7, K2 = 43
    cfg = Diff2Config(rounds=50, refresh_every=8, clip_grad=2.0, clip_diff=0.1, noise_grad=3.0, noise_diff=9.0)
    mech = Diff2Mechanism(cfg, seed=0)
    assert (cfg.refresh_rounds, cfg.diff_rounds) == (7, 43)
    # the std actually used is z·(the round's own threshold): C1, or r_t = C2·‖x_t − x_{t−1}‖
    assert mech.noise_std(0) == 3.0 * 2.0 and mech.noise_std(8) == 6.0
    assert mech.clip_threshold(1, distance=0.5) == pytest.approx(0.1 * 0.5, rel=1e-15)
    assert mech.noise_std(1, distance=0.5) == pytest.approx(9.0 * 0.1 * 0.5, rel=1e-15)
    with pytest.raises(ValueError, match="distance"):
        mech.noise_std(1)  # a difference round's radius depends on the step just taken
    # by hand: std/sensitivity per round, composed exactly as μ-GDP (Dong, Roth & Su, Cor. 3.3)
    mu = math.sqrt(7 * (2.0 / 6.0) ** 2 + 43 * (0.1 / 0.9) ** 2)
    assert diff2_mu(3.0, 9.0, 7, 43) == pytest.approx(mu, rel=1e-12)
    eps_hand = accountants.eps_from_gdp(mu, 1e-5)
    for acc, tol in (("pld", 1e-4), ("gdp", 1e-9)):
        assert accountants.epsilon_of_event(mech.run_event(), 1e-5, acc) == pytest.approx(eps_hand, rel=tol)
    # PRV reports its upper bound: above the exact value, within its 1 % grid error
    assert eps_hand <= accountants.epsilon_of_event(mech.run_event(), 1e-5, "prv") <= 1.01 * eps_hand
    assert mech.round_event(0) == GaussianEvent(3.0) and mech.round_event(5) == GaussianEvent(9.0)
    assert mech.run_event(9) == diff2_event(3.0, 9.0, 2, 7)


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_calibration_meets_target_with_the_stated_shares(eps):
    delta, rounds, t = 1e-5, 60, 6
    for share in (0.5, None):  # None: the default, 0.8 of μ² to the refreshes (the authors' code, u = 1.25)
        kw = {} if share is None else {"grad_share": share}
        z1, z2 = calibrate_diff2(eps, delta, rounds, t, accountant="pld", **kw)
        spent = accountants.epsilon_of_event(diff2_event(z1, z2, 10, 50), delta, "pld")
        assert eps * 0.99 <= spent <= eps
        s = 0.8 if share is None else share
        assert (10 / z1 ** 2) / s == pytest.approx((50 / z2 ** 2) / (1 - s), rel=1e-9)  # K1/z1² = s·μ²
    # T = 1 is DP-GD: same σ as the DP-SGD calibration at q = 1
    z_gd, _ = calibrate_diff2(eps, delta, rounds, 1, accountant="pld")
    assert z_gd == pytest.approx(accountants.calibrate_noise(eps, delta, 1.0, rounds, accountant="pld"), rel=0.01)


def test_noise_has_the_stated_std_on_both_round_types():
    cfg = Diff2Config(rounds=4, refresh_every=2, clip_grad=1.5, clip_diff=0.2, noise_grad=0.7, noise_diff=2.0)
    mech = Diff2Mechanism(cfg, seed=1)
    n = 40_000
    # refresh: z1·C1 = 1.05; difference at ‖x_1 − x_0‖ = 0.5: z2·C2·0.5 = 0.2
    for t, std in ((0, 1.05), (1, 0.2)):
        z = mech.noise([torch.zeros(n, dtype=torch.float64)], t, distance=0.5)[0]
        stat = float((z ** 2).sum()) / std ** 2  # χ²_n; two-sided, false-failure probability 1e-7 per round
        assert stats.chi2.ppf(0.5e-7, n) < stat < stats.chi2.isf(0.5e-7, n)
    # no step (x_1 = x_0): radius 0, every difference is 0 and nothing is added
    s = torch.arange(3.0)
    assert torch.equal(mech.noise([s], 1, distance=0.0)[0], s) and mech.noise_std(1, 0.0) == 0.0


def test_recursion_refreshes_and_accumulates_differences():
    cfg = Diff2Config(rounds=5, refresh_every=3, clip_grad=1.0, clip_diff=1.0, noise_grad=0.0, noise_diff=0.0)
    mech = Diff2Mechanism(cfg)
    seq = [torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([8.0]), torch.tensor([2.0])]
    out = [float(mech.update([s], t, n_units=2)[0]) for t, s in enumerate(seq)]
    assert out == [2.0, 3.0, 2.5, 4.0, 5.0]
    with pytest.raises(ValueError, match="planned"):
        mech.update([torch.zeros(1)], 5, 2)
    with pytest.raises(ValueError, match="no privacy event"):
        mech.run_event()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="refresh_every"):
        Diff2Config(10, 0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="clip_diff"):
        Diff2Config(10, 2, 1.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="grad_share"):
        calibrate_diff2(3.0, 1e-5, 10, 2, grad_share=1.0)
