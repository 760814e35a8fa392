"""dptrain epsilon / calibrate / report on the command line."""
from __future__ import annotations

import argparse
import json

import pytest

import accountants
import accountants.cli
from accountants import BudgetReport


def main(argv):
    parser = argparse.ArgumentParser(prog="dptrain")
    accountants.cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_epsilon_prints_a_plain_number(capsys):
    assert main(["epsilon", "--sigma", "0.8", "--sample-rate", "0.005", "--steps", "1000", "--delta", "1e-6"]) == 0
    out = capsys.readouterr().out.strip()
    assert float(out) == pytest.approx(2.0041, rel=0.01)


def test_epsilon_json_has_bounds(capsys):
    main(["epsilon", "--sigma", "0.8", "--sample-rate", "0.005", "--steps", "1000", "--delta", "1e-6", "--json"])
    data = json.loads(capsys.readouterr().out)
    lo, est, up = data["epsilon_bounds"]
    assert lo <= 2.0041 <= up and data["epsilon"] == pytest.approx(up)


def test_calibrate(capsys):
    main(["calibrate", "--eps", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "500", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"] <= 2.0
    assert accountants.epsilon(data["noise_multiplier"] * 0.99, 0.01, 500, 1e-5) > 2.0


def test_report_renders_text_and_plot(tmp_path, capsys):
    rep = BudgetReport(epsilon_spent=1.5, delta=1e-5, target_epsilon=2.0, noise_multiplier=1.2, sample_rate=0.02,
                       steps=200, planned_steps=250, accountant="prv", dataset_size=5000, max_grad_norm=1.0,
                       mechanism="dpsgd", epsilon_history=[(100, 1.0), (200, 1.5)])
    run = tmp_path / "run.json"
    rep.save(str(run))
    png = tmp_path / "plot.png"
    assert main(["report", str(run), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "1.5000" in out and "200 of 250" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_gdp_is_labelled_an_approximation(capsys):
    main(["epsilon", "--sigma", "0.8", "--sample-rate", "0.005", "--steps", "1000", "--delta", "1e-6",
          "--accountant", "gdp"])
    captured = capsys.readouterr()
    assert float(captured.out) == pytest.approx(1.3245, abs=2e-3)  # REFERENCE_VALUES.md row 3: optimistic
    assert "approximation" in captured.err
    main(["epsilon", "--sigma", "0.8", "--sample-rate", "0.005", "--steps", "1000", "--delta", "1e-6", "--json"])
    assert json.loads(capsys.readouterr().out)["guarantee"].startswith("upper bound")


@pytest.mark.parametrize("argv", [
    ["epsilon", "--sigma", "0", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"],
    ["epsilon", "--sigma", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"],
    ["calibrate", "--eps", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"],
    ["report", "/nonexistent/run.json"],
])
def test_bad_numbers_and_missing_files_are_usage_errors_not_tracebacks(argv, capsys):
    from dptrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"dptrain {argv[0]}: error:" in capsys.readouterr().err
