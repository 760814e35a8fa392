"""Heterogeneous composition in the ledger equals composing the recorded events."""
from __future__ import annotations

import json

import pytest

import accountants
from accountants import (ComposedEvent, GaussianEvent, PoissonSampledEvent, PrivacyLedger,
                         SelfComposedEvent, event_from_dict, event_to_dict)


def ps(q, s):
    return PoissonSampledEvent(q, GaussianEvent(s))


def test_homogeneous_ledger_equals_closed_form():
    led = PrivacyLedger()
    for _ in range(200):
        led.record(ps(0.01, 1.0))
    assert led.steps == 200 and len(led.entries) == 1
    for acc in ("prv", "rdp", "gdp"):
        assert led.epsilon(1e-5, acc) == pytest.approx(accountants.epsilon(1.0, 0.01, 200, 1e-5, acc))


@pytest.mark.parametrize("acc", ["prv", "rdp", "gdp"])
def test_heterogeneous_ledger_equals_composition_of_events(acc):
    led = PrivacyLedger()
    schedule = [(0.02, 1.2)] * 50 + [(0.02, 0.9)] * 30 + [(0.05, 1.5)] * 20 + [(0.02, 1.2)] * 10
    for q, s in schedule:
        led.record(ps(q, s))
    assert led.steps == 110 and len(led.entries) == 4
    composed = ComposedEvent((SelfComposedEvent(ps(0.02, 1.2), 60), SelfComposedEvent(ps(0.02, 0.9), 30),
                              SelfComposedEvent(ps(0.05, 1.5), 20)))
    assert led.epsilon(1e-5, acc) == pytest.approx(accountants.epsilon_of_event(composed, 1e-5, acc), rel=1e-9)
    # heterogeneous lies between the all-low-noise and all-high-noise runs
    assert accountants.epsilon(1.5, 0.02, 110, 1e-5, acc) < led.epsilon(1e-5, acc)
    assert led.epsilon(1e-5, acc) < accountants.epsilon(0.9, 0.05, 110, 1e-5, acc)


def test_epsilon_if_and_state_dict_round_trip():
    led = PrivacyLedger()
    led.record(ps(0.1, 1.0), count=5)
    nxt = led.epsilon_if(ps(0.1, 1.0), 1e-5)
    assert nxt == pytest.approx(accountants.epsilon(1.0, 0.1, 6, 1e-5))
    state = json.loads(json.dumps(led.state_dict()))
    other = PrivacyLedger()
    other.load_state_dict(state)
    assert other.steps == 5 and other.epsilon(1e-5) == led.epsilon(1e-5)


def test_events_round_trip_and_validate():
    e = ComposedEvent((SelfComposedEvent(ps(0.1, 1.0), 3), GaussianEvent(2.0)))
    assert event_from_dict(json.loads(json.dumps(event_to_dict(e)))) == e
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampledEvent(0.0, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianEvent(0.0)


def test_fractional_counts_and_bad_delta_are_refused_and_numpy_scalars_serialise():
    import numpy as np

    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match="whole number"):
        ledger.record(GaussianEvent(1.0), 2.7)  # was stored as 2
    with pytest.raises(ValueError, match="delta"):
        ledger.epsilon(5.0)  # was 0.0 on an empty ledger
    ledger.record(SelfComposedEvent(ps(np.float64(0.01), np.float32(1.0)), np.int64(3)), np.int64(2))
    again = PrivacyLedger()
    again.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5) > 0


def test_a_ledger_extends_the_ledgers_it_continues():
    a, b = PrivacyLedger(), PrivacyLedger()
    a.record(ps(0.1, 1.0), 3)
    b.record(ps(0.1, 1.0), 5)
    assert b.extends(a) and not a.extends(b) and a.extends(PrivacyLedger())
    b.record(ps(0.1, 2.0))
    assert b.extends(a)
    a.record(ps(0.1, 2.0))
    assert not b.extends(a)  # a: 3 steps at σ 1 then σ 2; b: 5 steps at σ 1 then σ 2


@pytest.mark.parametrize("count", [2.7, -1, "3", None])
def test_load_state_dict_refuses_a_count_that_is_not_whole(count):
    """A count of 2.7 in a (corrupted) checkpoint was truncated to 2: the ledger undercounted the releases."""
    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match="count"):
        ledger.load_state_dict({"entries": [[{"type": "GaussianEvent", "noise_multiplier": 1.0}, count]]})
    ledger.load_state_dict({"entries": [[{"type": "GaussianEvent", "noise_multiplier": 1.0}, 3.0]]})
    assert ledger.steps == 3 and isinstance(ledger.entries[0][1], int)
