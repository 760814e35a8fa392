"""Budget reports: text, JSON round trip."""
from __future__ import annotations

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
