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


def test_epsilon_json_is_strict_json_with_null_for_an_infinite_mu(capsys):
    """σ = 0.01 at q = 0.5 gives μ-GDP = inf, which was printed as the non-JSON token Infinity."""
    main(["epsilon", "--sigma", "0.01", "--sample-rate", "0.5", "--steps", "1000", "--delta", "1e-5", "--json"])
    out = capsys.readouterr().out
    data = json.loads(out, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert data["gdp_mu"] is None and data["epsilon"] > 1e6


def test_report_json_is_strict_json_and_loads_back(tmp_path):
    rep = BudgetReport(epsilon_spent=float("inf"), delta=1e-5, target_epsilon=None, noise_multiplier=0.01,
                       sample_rate=0.5, steps=1000, planned_steps=None, accountant="prv", dataset_size=None,
                       max_grad_norm=1.0, mechanism="dpsgd", epsilon_bounds=(0.0, float("inf"), float("inf")))
    text = rep.to_json()
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert data["gdp_mu"] is None and data["epsilon_spent"] is None
    run = tmp_path / "run.json"
    rep.save(str(run))
    assert BudgetReport.load(str(run)) == rep


@pytest.mark.parametrize("content, says", [
    (b'{"a": 1}', "missing: epsilon_spent"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b"garbage", "is not JSON"),
    (b"\x80\x02\x8a\nPK\x03\x04 binary", "not UTF-8"),
    (b'{"epsilon_spent": 0.1, "delta": 1e-5, "target_epsilon": 3, "noise_multiplier": 1.0, "sample_rate": 0.1,'
     b' "steps": "x", "planned_steps": 330, "accountant": "prv", "dataset_size": 100, "max_grad_norm": 1.0,'
     b' "mechanism": "dpsgd"}', "'steps' must be an integer"),
])
def test_report_of_a_file_that_is_not_a_report_is_a_one_line_error_naming_the_file(tmp_path, capsys, content, says):
    from dptrain.cli import main

    run = tmp_path / "wrong.json"
    run.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dptrain report: error: {run}") and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [
    ["epsilon", "--sigma", "1", "--sample-rate", "0.01", "--steps", "100", "--delta", "-1e-5"],
    ["epsilon", "--sigma", "-1E2", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"],
    ["calibrate", "--eps", "-3e0", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"],
])
def test_a_negative_number_in_exponent_notation_is_refused_by_value(argv, capsys):
    """argparse took "-1e-5" for an option: "argument --delta: expected one argument"."""
    from dptrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "must be" in err, err
