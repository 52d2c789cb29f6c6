"""`r1pipe` command line: one sub-command per job, each a thin wrapper over a module that does the work."""
from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from r1pipe.demo import run_demo

    return run_demo(args.out)


def _train(args: argparse.Namespace) -> int:
    from r1pipe.train import run_stage

    print(f"final policy: {run_stage(args)}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from r1pipe.pipeline import run_pipeline

    for r in run_pipeline(args.recipe_dir, args.output_dir, dry_run=args.dry_run):
        took = "skipped (done)" if r["skipped"] else f"{r['wall_s']:.0f} s"
        print(f"{r['name']:>12}: {took} -> {r['output']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1pipe", description="DeepSeek-R1 post-training for DeepSeekMoE/MLA policies")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded tiny R1 pipeline on the CPU")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)

    from r1pipe.evaluate import add_eval_parser
    from r1pipe.reject_sample import add_reject_parser
    from r1pipe.train import add_train_arguments

    add_eval_parser(sub)
    add_reject_parser(sub)

    train = sub.add_parser("train", help="run one stage recipe in this process (accelerate launch -m r1pipe.train for many)")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    pipe = sub.add_parser("pipeline", help="run a recipe directory's stages in order, skipping finished ones")
    pipe.add_argument("recipe_dir")
    pipe.add_argument("--output-dir", help="override pipeline.yaml's output_dir")
    pipe.add_argument("--dry-run", action="store_true", help="one tiny step per stage")
    pipe.set_defaults(func=_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # r1pipe reads local files only; a hub lookup would hang offline
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
