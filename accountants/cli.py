"""``dptrain epsilon``, ``dptrain calibrate`` and ``dptrain report`` subcommands."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .calibration import calibrate_noise
from .epsilon import ACCOUNTANTS, epsilon, epsilon_bounds
from .composition import poisson_gaussian
from .gdp import gdp_mu
from .report import BudgetReport, json_safe


#: what the ε of each accountant is: a bound that holds, or an approximation
GUARANTEE = {"prv": "upper bound (PRV, Gopi et al. 2021, with its error bound)",
             "pld": "upper bound (PLD, pessimistic discretisation)",
             "rdp": "upper bound (RDP conversion)",
             "gdp": "approximation (GDP central limit theorem), not a bound; optimistic for few steps"}


def _note_approximation(accountant: str) -> None:
    if accountant == "gdp":
        print("note: the gdp accountant's ε is a CLT approximation, not a guarantee; use prv for a bound",
              file=sys.stderr)


#: argparse takes "-1e-5" for an option (its negative-number pattern has no exponent), so "--delta -1e-5" failed
#: with "expected one argument" instead of naming the bad value; this pattern also matches exponents
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def accept_negative_numbers(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``p`` read "-1e-5" as a value (then refused with a message naming it), not as an unknown option;
    for parsers with no option that looks like a number."""
    p._negative_number_matcher = _NEGATIVE_NUMBER
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    accept_negative_numbers(p)
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = batch / N")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    p.add_argument("--json", action="store_true", help="print JSON")


def _epsilon(args: argparse.Namespace) -> int:
    eps = epsilon(args.sigma, args.sample_rate, args.steps, args.delta, accountant=args.accountant)
    out = {"epsilon": eps, "delta": args.delta, "noise_multiplier": args.sigma, "sample_rate": args.sample_rate,
           "steps": args.steps, "accountant": args.accountant,
           "gdp_mu": gdp_mu(args.sigma, args.sample_rate, args.steps)}
    if args.accountant == "prv":
        out["epsilon_bounds"] = list(epsilon_bounds(poisson_gaussian(args.sigma, args.sample_rate, args.steps),
                                                    args.delta))
    out["guarantee"] = GUARANTEE[args.accountant]
    if args.json:  # strict JSON: an infinite μ or ε (σ tiny) is written as null
        print(json.dumps(json_safe(out), allow_nan=False))
    else:
        print(f"{eps:.6g}")
        _note_approximation(args.accountant)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    sigma = calibrate_noise(args.eps, args.delta, args.sample_rate, args.steps, accountant=args.accountant)
    if args.json:
        print(json.dumps(json_safe({"noise_multiplier": sigma, "target_epsilon": args.eps, "delta": args.delta,
                          "sample_rate": args.sample_rate, "steps": args.steps, "accountant": args.accountant,
                          "epsilon": epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant),
                          "guarantee": GUARANTEE[args.accountant]}), allow_nan=False))
    else:
        print(f"{sigma:.6g}")
        _note_approximation(args.accountant)
    return 0


def _report(args: argparse.Namespace) -> int:
    report = BudgetReport.load(args.run)
    print(report.to_json() if args.json else report.to_text())
    if args.plot:
        report.save_plot(args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epsilon", help="ε spent by DP-SGD with noise σ, rate q, T steps, at δ")
    p.add_argument("--sigma", type=float, required=True, help="noise multiplier σ")
    _run_args(p)
    p.set_defaults(func=_epsilon)

    p = sub.add_parser("calibrate", help="smallest noise multiplier σ meeting a target ε")
    p.add_argument("--eps", type=float, required=True, help="target ε")
    _run_args(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("report", help="render a saved budget report (RUN.json)")
    p.add_argument("run", metavar="RUN.json")
    p.add_argument("--plot", metavar="OUT.png", help="write the trade-off / ε-over-steps plot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_report)


if __name__ == "__main__":  # the subcommands belong to the `dptrain` command; run it
    import sys

    from dptrain.cli import main

    sys.exit(main())
