"""`r1pipe` command line: one sub-command per job, each a thin wrapper over a module that does the work."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from r1pipe.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1pipe", description="DeepSeek-R1 post-training for DeepSeekMoE/MLA policies")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded tiny R1 pipeline on the CPU")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
