"""Quantile adaptive clipping (Andrew et al. 2021): combined noise multiplier, noised count, convergence."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from mechanisms.adaptive_clipping import (NoisedStatistic, QuantileClipController, combined_noise_multiplier,
                                          geometric_clip_update, gradient_noise_multiplier, noised_mean_loss,
                                          noised_unclipped_fraction)


def test_combined_noise_multiplier_is_andrew_et_al_theorem_1():
    # Andrew et al. 2021, Thm 1: z = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) for one centred count of sensitivity ½
    sigma_b = 3.0
    z = 1.1
    sigma_delta = gradient_noise_multiplier(z, [NoisedStatistic(0.5, sigma_b)])
    assert sigma_delta == pytest.approx((z ** -2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
    assert combined_noise_multiplier(sigma_delta, [NoisedStatistic(0.5, sigma_b)]) == pytest.approx(z, rel=1e-12)
    assert sigma_delta > z  # the gradient pays for the count


def test_statistics_that_use_the_whole_budget_are_refused():
    with pytest.raises(ValueError, match="leaving nothing for the gradient"):
        gradient_noise_multiplier(2.0, [NoisedStatistic(0.5, 0.25)])
    with pytest.raises(ValueError, match="without noise"):
        NoisedStatistic(0.5, 0.0)


def test_geometric_update_direction():
    assert geometric_clip_update(1.0, 0.2, 0.5, 0.2) == pytest.approx(math.exp(0.06))  # too few unclipped: grow
    assert geometric_clip_update(1.0, 0.9, 0.5, 0.2) < 1.0


def test_noised_fraction_is_unbiased_with_the_stated_noise():
    # 40 000 releases of the same count: the mean is the true fraction and the std is std/n̄.
    # Both checks have false-failure probability < 1e-7 (normal mean, chi-square variance).
    g = torch.Generator().manual_seed(0)
    n, std, reps = 50, 2.5, 40_000
    f = noised_unclipped_fraction(torch.full((reps,), 30), batch_size=n, expected_batch_size=n, std=std, generator=g)
    se = std / n / math.sqrt(reps)
    assert abs(float(f.mean()) - 0.6) < 5.5 * se
    chi = (reps - 1) * float(f.var()) / (std / n) ** 2
    assert stats.chi2.ppf(0.5e-7, reps - 1) < chi < stats.chi2.isf(0.5e-7, reps - 1)


def test_noised_loss_is_clamped_to_its_bound():
    g = torch.Generator().manual_seed(0)
    losses = torch.tensor([0.5, 1e9, float("nan"), -3.0])
    # clamp → [0.5, B, B, 0]; with tiny noise the mean is (0.5 + 2B)/4
    assert noised_mean_loss(losses, 2.0, 4, 1e-9, g) == pytest.approx((0.5 + 4.0) / 4, abs=1e-6)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_quantile_clipping_converges_to_the_target_quantile(target):
    """Norms |N(0, 4)|, Poisson batches of ~100, count noise n̄/20, η = 0.2 (the paper's defaults).

    log C behaves like an OU process with per-step noise ≈ η·0.07 and restoring rate ≈ 0.1, so
    its stationary std is ≈ 0.03 and the mean of the last 1000 steps has std < 0.01; the
    tolerance (±0.05 in quantile ≈ ±0.1 in log C) is > 10 such std: false failure < 1e-6.
    """
    g = torch.Generator().manual_seed(1)
    n_bar = 100
    ctl = QuantileClipController(initial_clip=0.01, target_quantile=target, count_noise_std=n_bar / 20, seed=2)
    logs = []
    for t in range(1500):
        b = int(torch.poisson(torch.tensor(float(n_bar)), generator=g))
        norms = 2 * torch.randn(b, generator=g).abs()
        f = ctl.release(int((norms <= ctl.clip).sum()), b, n_bar)
        ctl.update(f)
        if t >= 500:
            logs.append(math.log(ctl.clip))
    clip = math.exp(sum(logs) / len(logs))
    reached = 2 * stats.norm.cdf(clip / 2) - 1  # P(|N(0,4)| ≤ C)
    assert abs(reached - target) < 0.05, (clip, reached)


def test_controller_state_round_trips():
    a = QuantileClipController(1.0, 0.5, count_noise_std=2.0, seed=3)
    a.update(a.release(10, 20, 20))
    b = QuantileClipController(5.0, 0.7, count_noise_std=1.0, seed=9)
    b.load_state_dict(a.state_dict())
    assert b.clip == a.clip and b.target_quantile == 0.5
    assert b.release(7, 20, 20) == a.release(7, 20, 20)


@pytest.mark.parametrize("kwargs", [dict(initial_clip=0.0), dict(initial_clip=1.0, target_quantile=1.0),
                                    dict(initial_clip=1.0, learning_rate=0.0)])
def test_bad_controller_settings(kwargs):
    with pytest.raises(ValueError, match="QuantileClipController"):
        QuantileClipController(**kwargs)
