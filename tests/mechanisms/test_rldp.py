"""RLDP controller: what it sees is private or public, its statistics are paid for, its state round-trips."""
from __future__ import annotations

import math

import pytest
import torch

from mechanisms.adaptive_clipping import combined_noise_multiplier
from mechanisms.rldp import PrivateSignals, PublicState, RLDPController, RLDPSettings

GROUPS = {"a.weight": 0.5, "a.bias": 0.2, "b.weight": 0.4}


def _controller(seed=0, **kw):
    return RLDPController(GROUPS, reference_noise=1.2, planned_steps=100, expected_batch_size=40.0,
                          settings=RLDPSettings(interval=3, **kw), seed=seed)


def test_gradient_noise_and_statistics_are_one_mechanism_of_the_step_sigma():
    ctl = _controller()
    for sigma in (0.7, 1.2, 3.0):
        stats = ctl.statistics(sigma)
        assert combined_noise_multiplier(ctl.gradient_noise(sigma), stats) == pytest.approx(sigma, rel=1e-12)
        # G centred indicators of ½ each: L2 sensitivity √G/2
        assert stats[0].sensitivity == pytest.approx(math.sqrt(len(GROUPS)) / 2)


def test_observation_depends_on_the_data_only_through_the_noised_release():
    """One example's gradient norm changes; on the same side of its threshold the released
    signals (hence the observation and every later action) are bit-identical; across the
    threshold they move by exactly 1/n̄ in that group's fraction, nothing else."""
    losses = torch.tensor([0.3, 1.2, 0.7, 2.0])
    base = {"a.weight": 2, "a.bias": 3, "b.weight": 1}
    a, b, c = _controller(seed=5), _controller(seed=5), _controller(seed=5)
    sa = a.release(base, 4, losses, 1.2)
    sb = b.release(dict(base), 4, losses.clone(), 1.2)  # same counts: a different norm, same side of C
    sc = c.release({**base, "a.bias": 2}, 4, losses, 1.2)  # one example now clipped in group a.bias
    assert sa == sb
    pub = PublicState(0.1, 0.9)
    assert torch.equal(a.observation([sa], pub), b.observation([sb], pub))
    diff = [x - y for x, y in zip(sa.unclipped_fraction, sc.unclipped_fraction)]
    assert diff[1] == pytest.approx(1 / 40.0) and diff[0] == diff[2] == 0
    assert sa.mean_loss == sc.mean_loss


def test_released_statistics_carry_noise_of_the_stated_scale():
    # 5 000 releases of fixed counts: sample std of a fraction = std/n̄ within a 1e-7 chi-square band
    from scipy import stats as st

    ctl, reps = _controller(seed=1), 5_000
    counts_stat, _ = ctl.statistics(1.2)
    xs = torch.tensor([ctl.release({"a.weight": 20, "a.bias": 20, "b.weight": 20}, 40,
                                   torch.zeros(40), 1.2).unclipped_fraction[0] for _ in range(reps)])
    chi = (reps - 1) * float(xs.double().var()) / (counts_stat.std / 40.0) ** 2
    assert st.chi2.ppf(0.5e-7, reps - 1) < chi < st.chi2.isf(0.5e-7, reps - 1)


def test_policy_acts_every_interval_and_moves_thresholds_toward_quantiles():
    ctl = _controller()
    before = dict(ctl.thresholds)
    for t in range(3):
        ctl.observe(PrivateSignals((0.0, 1.0, 0.5), 1.0 - 0.1 * t), 1.2, PublicState(0.01 * t, 1 - 0.01 * t))
    assert ctl.decisions == 1
    assert ctl.thresholds["a.weight"] > before["a.weight"]  # nothing unclipped: grow
    assert ctl.thresholds["a.bias"] < before["a.bias"]      # everything unclipped: shrink
    lo, hi = ctl.settings.quantile_range
    assert all(lo <= q <= hi for q in ctl.target_quantiles)
    r = ctl.settings.noise_range
    assert 1.2 / r <= ctl.requested_noise() <= 1.2 * r


def test_controller_state_round_trips():
    a = _controller(seed=2)
    for t in range(7):
        a.observe(a.release({"a.weight": 5, "a.bias": 9, "b.weight": 30}, 40, torch.rand(40), 1.2), 1.2,
                  PublicState(t / 100, 1 - t / 100))
    b = _controller(seed=77)
    b.load_state_dict(a.state_dict())
    assert b.thresholds == a.thresholds and b.requested_noise() == a.requested_noise()
    for ctl in (a, b):
        for t in range(2):
            ctl.observe(ctl.release({"a.weight": 5, "a.bias": 9, "b.weight": 30}, 40, torch.ones(40), 1.2), 1.2,
                        PublicState(0.5, 0.5))
    assert b.thresholds == a.thresholds and b.requested_noise() == a.requested_noise()


@pytest.mark.parametrize("kw", [dict(interval=0), dict(statistics_share=1.0), dict(quantile_range=(0.9, 0.2)),
                                dict(noise_range=0.5)])
def test_bad_settings(kw):
    with pytest.raises(ValueError, match="RLDPSettings"):
        RLDPSettings(**kw)


def test_statistics_noise_uses_every_bit_of_the_seed():
    """The noise on the clip fractions and the loss came from a generator seeded through torch's manual_seed
    (32 bits kept): seeds equal in their low 32 bits gave the same noise, and 2^32 trials recovered it."""

    a = RLDPController({"w": 1.0}, 1.0, 100, 10.0, seed=1)
    b = RLDPController({"w": 1.0}, 1.0, 100, 10.0, seed=1 + 2 ** 32)
    c = RLDPController({"w": 1.0}, 1.0, 100, 10.0, seed=1)
    draw = lambda ctl: torch.randn(8, generator=ctl.generator, dtype=torch.float64)  # noqa: E731
    first = draw(a)
    assert not torch.equal(first, draw(b))
    assert torch.equal(first, draw(c))
