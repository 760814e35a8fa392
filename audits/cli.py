"""``dptrain audit``: audit a make_private run on digits with canaries."""
from __future__ import annotations

import argparse
import json

from accountants.report import json_safe  # noqa: F401  (re-exported: audits.cli.json_safe)


def _at_least(minimum: int, why: str):
    """argparse type: an integer ≥ ``minimum`` (else a usage error that says ``why``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} ({why}), got {value}")
        return value
    return parse


def _audit(args: argparse.Namespace) -> int:
    from .canary import quick_audit

    result = quick_audit(eps=args.eps, m=args.canaries, runs=args.runs, seed=args.seed, epochs=args.epochs,
                         progress=not args.json)
    print(json.dumps(json_safe(result.to_dict()), indent=2, allow_nan=False) if args.json else result.to_text())
    if args.plot:
        result.save_roc_plot(args.plot)
        if not args.json:
            print(f"ROC plot written to {args.plot}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    from accountants.cli import accept_negative_numbers

    p = accept_negative_numbers(
        sub.add_parser("audit", help="train make_private on digits with canaries; theoretical vs empirical ε"))
    p.add_argument("--eps", type=float, default=3.0, help="target ε of the audited run")
    p.add_argument("--canaries", type=_at_least(2, "the one-run audit guesses at least one canary each way"),
                   default=200, help="number of canaries m (≥ 2)")
    p.add_argument("--runs", type=_at_least(1, "one training run at least"), default=1,
                   help="training runs (>1 adds the many-runs intervals)")
    p.add_argument("--epochs", type=_at_least(1, "one epoch at least"), default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="ROC.png", help="write the attack's ROC curve")
    p.add_argument("--json", action="store_true",
                   help="print the result as strict JSON; an infinite or undefined ε is written as null")
    p.set_defaults(func=_audit)


if __name__ == "__main__":  # the subcommands belong to the `dptrain` command; run it
    import sys

    from dptrain.cli import main

    sys.exit(main())
