"""The ``dptrain`` command line: demo, epsilon, calibrate, report, audit."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(eps=args.eps, epochs=args.epochs, seed=args.seed, audit=not args.no_audit)
    print(result.to_json() if args.json else result.to_text())
    if args.save:
        result.report.save(args.save)
        # on stderr: with --json, stdout holds the JSON only
        print(f"budget report saved to {args.save} (render it: dptrain report {args.save})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import accountants.cli
    import audits.cli

    parser = argparse.ArgumentParser(prog="dptrain", description="Differentially private training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = accountants.cli.accept_negative_numbers(
        sub.add_parser("demo", help="train a private classifier on digits (ε=3), report budget and audit"))
    demo.add_argument("--eps", type=float, default=3.0)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-audit", action="store_true", help="skip the membership-inference audit")
    demo.add_argument("--save", metavar="RUN.json", help="write the budget report as JSON")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=_demo)
    accountants.cli.add_subcommands(sub)
    audits.cli.add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad numbers (σ ≤ 0, δ ∉ (0, 1), …) or a missing file: a usage error
        parser.exit(2, f"dptrain {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
