"""Command line: ``python -m minivlmoe SUBCOMMAND`` (or the ``minivlmoe`` script).

Subcommands
-----------
gradcheck   finite-difference check of every op, one row per (op, argument).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np

# Every module with differentiable ops provides ``gradcheck_cases(rng) -> [GradcheckCase]``.
# Listed in reading order (README.md).
GRADCHECK_MODULES = [
    "sparse_linear",
    "gelu",
]


def _available_modules():
    """Import the op modules in GRADCHECK_MODULES (skipping none: a missing one is a bug)."""
    return [importlib.import_module(f"minivlmoe.{name}") for name in GRADCHECK_MODULES]


def cmd_gradcheck(args):
    from .gradcheck import check_case

    rng = np.random.default_rng(args.seed)
    header = f"{'op':<44} {'argument':<22} {'shape':<16} {'max rel err':>11} {'checked':>7}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for module in _available_modules():
        for case in module.gradcheck_cases(rng):
            if args.only and args.only not in case.op:
                continue
            for row in check_case(case, rng):
                failures += not row.passed
                print(f"{row.op:<44} {row.argument:<22} {str(row.shape):<16} "
                      f"{row.max_rel_error:>11.2e} {row.checked:>7}  "
                      f"{'pass' if row.passed else 'FAIL'}", flush=True)
    print(f"\n{'all rows passed' if not failures else f'{failures} row(s) FAILED'} "
          f"(tolerance per op, default 1e-6; see minivlmoe/gradcheck.py)")
    return 1 if failures else 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minivlmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("gradcheck", help="finite-difference check of every op's backward")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--only", default=None, help="only ops whose name contains this text")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
