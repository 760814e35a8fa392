"""``dptrain audit`` argument checks and strict JSON output (no training: quick_audit is replaced)."""
from __future__ import annotations

import argparse
import json

import pytest

import audits.canary
import audits.cli
from audits.canary import AuditResult


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dptrain")
    audits.cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("m", ["0", "1", "-3", "ten"])
def test_too_few_canaries_is_a_usage_error(m, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["audit", "--canaries", m])
    assert exc.value.code == 2 and "--canaries" in capsys.readouterr().err
    assert parse(["audit", "--canaries", "2"]).canaries == 2


def test_json_writes_infinite_estimates_as_null(monkeypatch, capsys):
    result = AuditResult(1.0, 1e-5, {"epsilon": 0.0, "r": 2, "v": 1, "m": 2, "k": 1, "confidence": 0.95},
                         intervals={"clopper-pearson": (0.0, float("inf"), float("inf"))}, canaries=2)
    monkeypatch.setattr(audits.canary, "quick_audit", lambda **kwargs: result)
    args = parse(["audit", "--json", "--canaries", "2"])
    assert args.func(args) == 0

    def reject(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    out = json.loads(capsys.readouterr().out, parse_constant=reject)
    assert out["intervals"]["clopper-pearson"] == [0.0, None, None]
