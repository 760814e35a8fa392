"""Budget reports: text, JSON round trip."""
from __future__ import annotations

import json

import pytest

import accountants
from accountants import BudgetReport


def _report():
    return BudgetReport(epsilon_spent=2.99, delta=1e-5, target_epsilon=3.0, noise_multiplier=1.1,
                        sample_rate=0.01, steps=100, planned_steps=100, accountant="prv", dataset_size=1000,
                        max_grad_norm=1.0, mechanism="dpsgd", epsilon_bounds=(2.9, 2.95, 2.99),
                        epsilon_history=[(50, 2.0), (100, 2.99)])


def test_text_names_every_quantity():
    text = _report().to_text()
    for word in ("ε spent", "2.9900", "δ", "1e-05", "σ", "1.1000", "q", "0.01", "steps", "100 of 100", "prv",
                 "μ-GDP", "add or remove one example", "N is public"):
        assert word in text, word


def test_json_round_trip(tmp_path):
    r = _report()
    path = tmp_path / "run.json"
    r.save(str(path))
    assert BudgetReport.load(str(path)) == r
    assert r.to_dict()["gdp_mu"] > 0


def test_gdp_report_warns_that_it_is_an_approximation():
    r = _report()
    assert "approximation" not in r.to_text()
    r.accountant = "gdp"
    assert "approximation" in r.to_text()


def test_a_report_of_mixed_segments_states_each_and_composes_mu_over_all():
    """After a re-attach the report showed only the last plan's σ and q, and μ-GDP from them (1.84 for a
    ledger of μ 0.94)."""
    from accountants.backends import gdp_mu_of
    from accountants.composition import flatten

    ledger = accountants.PrivacyLedger()
    ledger.record(accountants.PoissonSampledEvent(0.1, accountants.GaussianEvent(1.2)), 10)
    ledger.record(accountants.PoissonSampledEvent(0.5, accountants.GaussianEvent(1.18)), 3)
    segments = ledger.segments()
    assert segments == [(1, 10, 1.2, 0.1), (11, 13, 1.18, 0.5)]
    r = BudgetReport(epsilon_spent=2.0, delta=1e-5, target_epsilon=3.0, noise_multiplier=1.18, sample_rate=0.5,
                     steps=13, planned_steps=4, accountant="prv", dataset_size=200, max_grad_norm=1.0,
                     mechanism="dpsgd", segments=segments)
    assert r.mixed and r.gdp_mu == pytest.approx(gdp_mu_of(flatten(ledger.composed())), rel=1e-12)
    text = r.to_text()
    assert "mixed" in text and "steps 1–10: σ 1.2000, q 0.1" in text and "steps 11–13: σ 1.1800, q 0.5" in text
    assert BudgetReport.from_dict(json.loads(r.to_json())) == r


def _plotted_run_curve(report, tmp_path, monkeypatch):
    """The (α, β) data of the plot's "this run" line (None if it has none)."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    report.save_plot(str(tmp_path / "plot.png"))
    lines = [ln for ln in figures[0].axes[0].get_lines() if ln.get_label().startswith("this run")]
    return (lines[0].get_xdata(), lines[0].get_ydata()) if lines else None


def test_the_plot_of_an_adaptive_run_draws_the_composition_of_its_sigma_schedule(tmp_path, monkeypatch):
    """An adaptive run (a σ schedule, no segments) was drawn as T steps at the plan's σ: σ = 1 for 500 steps at
    0.7 and 500 at 3.0, a curve above the run's own lower bound (it overstated privacy)."""
    import numpy as np

    from accountants import ComposedEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent

    r = BudgetReport(epsilon_spent=0.0, delta=1e-5, target_epsilon=3.0, noise_multiplier=1.0, sample_rate=0.01,
                     steps=1000, planned_steps=1000, accountant="prv", dataset_size=10000, max_grad_norm=1.0,
                     mechanism="dpsgd", noise_schedule=[(1, 500, 0.7), (501, 1000, 3.0)])
    actual = ComposedEvent(tuple(SelfComposedEvent(PoissonSampledEvent(0.01, GaussianEvent(s)), 500)
                                 for s in (0.7, 3.0)))
    curve = _plotted_run_curve(r, tmp_path, monkeypatch)
    assert curve is not None
    alphas, betas = curve
    _, expected = accountants.tradeoff_of_event(actual, alphas)
    _, plan = accountants.tradeoff_curve(1.0, 0.01, 1000, alphas)
    np.testing.assert_allclose(betas, expected, atol=1e-9)
    assert np.max(plan - betas) > 0.03  # the plan's σ on every step is visibly more private


def test_mu_and_plot_of_a_matrix_factorization_run_come_from_the_ledger_events(tmp_path, monkeypatch):
    """An MF ledger (the whole run's Gaussian at step 0, no-ops after) has no segments: the report took it for
    T = 100 DP-SGD steps at σ_eff = 5 and gave μ = 2.0, where the run's μ is 1/5 = 0.2."""
    import numpy as np

    from accountants.backends import gdp_mu_of
    from accountants.composition import flatten

    ledger = accountants.PrivacyLedger()
    ledger.record(accountants.GaussianEvent(5.0))
    ledger.record(accountants.NoOpEvent(), 99)
    assert ledger.segments() == []
    r = BudgetReport(epsilon_spent=ledger.epsilon(1e-5), delta=1e-5, target_epsilon=None, noise_multiplier=5.0,
                     sample_rate=1.0, steps=100, planned_steps=100, accountant="prv", dataset_size=None,
                     max_grad_norm=1.0, mechanism="multi-epoch-mf",
                     composition=[[q, s, n] for (q, s), n in flatten(ledger.composed())])
    assert r.gdp_mu == pytest.approx(0.2, rel=1e-12)
    assert r.gdp_mu == pytest.approx(gdp_mu_of(flatten(ledger.composed())), rel=1e-12)
    assert "0.2000" in r.to_text()
    alphas, betas = _plotted_run_curve(r, tmp_path, monkeypatch)
    np.testing.assert_allclose(betas, accountants.tradeoff_of_event(ledger.composed(), alphas)[1], atol=1e-9)
    assert BudgetReport.from_dict(json.loads(r.to_json())) == r


@pytest.mark.parametrize("accountant", accountants.ACCOUNTANTS)
def test_the_json_report_says_whether_its_epsilon_is_a_guarantee(accountant):
    """A gdp report's JSON gave epsilon_spent with no sign that it is a CLT approximation, not a bound."""
    from accountants.cli import GUARANTEE

    r = _report()
    r.accountant = accountant
    data = json.loads(r.to_json())
    assert data["guarantee"] == GUARANTEE[accountant]
    assert ("not a bound" in data["guarantee"]) == (accountant == "gdp")
    assert BudgetReport.from_dict(data) == r
