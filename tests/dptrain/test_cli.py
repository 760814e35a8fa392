"""The ``dptrain`` command's own subcommand (demo); the others are tested with their packages."""
from __future__ import annotations

import json

import accountants
import dptrain.demo
from dptrain.cli import main
from dptrain.demo import DemoResult


def test_demo_json_with_save_keeps_stdout_pure_json(tmp_path, capsys, monkeypatch):
    """``dptrain demo --json --save X`` printed "budget report saved to …" after the JSON on stdout."""
    report = accountants.BudgetReport(epsilon_spent=2.99, delta=3e-4, target_epsilon=3.0, noise_multiplier=2.0,
                                      sample_rate=0.04, steps=330, planned_steps=330, accountant="prv",
                                      dataset_size=1437, max_grad_norm=1.0, mechanism="dpsgd")
    monkeypatch.setattr(dptrain.demo, "run_demo", lambda **kw: DemoResult(0.9, 0.95, report, 1.0))
    run = tmp_path / "run.json"
    assert main(["demo", "--json", "--no-audit", "--save", str(run)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["report"]["epsilon_spent"] == 2.99
    assert "saved to" in captured.err
    assert accountants.BudgetReport.load(str(run)) == report
