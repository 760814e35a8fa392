"""ROC summaries and LiRA scoring on synthetic data."""
from __future__ import annotations

import numpy as np
import pytest

from audits import best_threshold, counts_at_threshold, epsilon_lower_bound, lira_scores, logit_confidence, roc
from audits.attacks import _fit


def test_roc_perfect_and_random():
    r = roc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0], bool))
    assert r.auc == pytest.approx(1.0) and r.tpr_at(0.0) == 1.0
    rng = np.random.default_rng(0)
    s, m = rng.random(20000), rng.random(20000) < 0.5
    assert roc(s, m).auc == pytest.approx(0.5, abs=0.02)


def test_counts_at_threshold():
    assert counts_at_threshold(np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 1, 0, 0], bool), 0.5) == (1, 1, 1, 1)


def test_lira_beats_a_global_threshold_when_examples_differ():
    # examples have very different baseline confidences; membership adds +1 to φ.
    rng = np.random.default_rng(0)
    e, shadows = 2000, 16
    base = rng.normal(0, 3, e)
    member = rng.random(e) < 0.5
    target = base + member * 1.0 + rng.normal(0, 0.3, e)
    out_phi = base + rng.normal(0, 0.3, (shadows, e))
    in_phi = base + 1.0 + rng.normal(0, 0.3, (shadows, e))
    online = roc(lira_scores(target, out_phi, in_phi), member)
    offline = roc(lira_scores(target, out_phi), member)
    global_thr = roc(target, member)
    assert online.auc > 0.95 and offline.auc > 0.9 and global_thr.auc < 0.7
    assert online.tpr_at(0.01) > global_thr.tpr_at(0.01)


def test_logit_confidence():
    assert logit_confidence(np.array([0.5]))[0] == pytest.approx(0.0)
    assert np.isfinite(logit_confidence(np.array([0.0, 1.0]))).all()


def test_lira_needs_two_shadow_models():
    with pytest.raises(ValueError, match="at least 2 shadow"):
        lira_scores(np.zeros(3), np.zeros((1, 3)))


def test_lira_scores_are_finite_when_an_example_has_no_in_or_out_shadow():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(4, 6))
    member = np.zeros((4, 6), bool)
    member[:, 0] = True  # example 0: every shadow has it (no OUT fit)
    member[:2, 1:] = True  # example 5 onwards: mixed; example 0 IN only
    member[:, 5] = False  # example 5: no IN fit
    scores = lira_scores(rng.normal(size=6), np.where(member, np.nan, phi), np.where(member, phi, np.nan))
    assert np.isfinite(scores).all()


def test_best_threshold_maximises_the_lower_bound():
    # vectorised search == brute force over every distinct score (ties included)
    rng = np.random.default_rng(4)
    member = rng.random(300) < 0.5
    scores = np.round(rng.normal(member * 1.5, 1.0), 1)
    t = best_threshold(scores, member, delta=1e-5)
    lows = {float(c): epsilon_lower_bound(*counts_at_threshold(scores, member, c), delta=1e-5)
            for c in np.unique(scores)}
    assert lows[t] == pytest.approx(max(lows.values()), abs=1e-12) and max(lows.values()) > 0


def test_per_example_variance_falls_back_below_two_samples():
    # example 0 has no IN sample, example 1 one: neither has a spread, so both get the median of the
    # others' standard deviations (an all-NaN column used to give sd = 0, floored to min_std)
    rng = np.random.default_rng(0)
    inn = rng.normal(2, 1, (8, 6))
    inn[:, 0] = np.nan
    inn[1:, 1] = np.nan
    mu, sd = _fit(inn, 1e-3, False)
    assert np.isnan(mu[0]) and mu[1] == inn[0, 1]
    assert sd[0] == sd[1] == pytest.approx(np.median(np.nanstd(inn[:, 2:], axis=0)))
    assert sd[2:] == pytest.approx(np.nanstd(inn[:, 2:], axis=0))


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="same length"):
        roc(np.arange(3.0), [1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="same length"):
        counts_at_threshold(np.arange(4.0), [True], 2.0)
    with pytest.raises(ValueError, match="same E examples"):
        lira_scores(np.zeros(3), np.zeros((4, 5)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="same E examples"):
        lira_scores(np.zeros(5), np.zeros((4, 5)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="both members and non-members"):
        best_threshold([], [])


def test_plus_minus_one_labels_are_refused():
    # ±1 labels were cast to bool: all members, so counts_at_threshold gave tn = fp = 0 and roc raised
    # "need both members and non-members"; now the ±1 form is named with its conversion
    scores, labels = np.arange(6.0), np.array([1, -1, 1, -1, 1, -1])
    for f in (lambda: roc(scores, labels), lambda: counts_at_threshold(scores, labels, 2.0),
              lambda: best_threshold(scores, labels)):
        with pytest.raises(ValueError, match=r"is_member looks like the ±1 convention.*`is_member > 0`"):
            f()
    with pytest.raises(ValueError, match="is_member must be booleans or 0 / 1"):
        roc(scores, [0, 1, 2, 0, 1, 0])
    assert counts_at_threshold(scores, labels > 0, 2.0) == counts_at_threshold(scores, (labels > 0).astype(int), 2.0)


def test_non_finite_scores_are_refused():
    labels = np.arange(6) % 2 == 0
    for bad in (np.nan, np.inf):
        scores = np.arange(6.0)
        scores[1] = bad
        for name, f in (("roc", roc), ("best_threshold", best_threshold),
                        ("counts_at_threshold", lambda s, y: counts_at_threshold(s, y, 2.0))):
            with pytest.raises(ValueError, match=rf"{name}: 1 of 6 scores are not finite .* indices \[1\]"):
                f(scores, labels)
