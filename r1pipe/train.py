"""Run one recipe stage: `accelerate launch -m r1pipe.train RECIPE.yaml [--output-dir D] [--max-steps N] [--resume]`
(or `r1pipe train ...` for one process). The recipe's `stage` picks the module in `r1pipe.stages`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a stage recipe YAML file")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set grpo.beta=0.01 (YAML-parsed)")


def run_stage(args: argparse.Namespace) -> Path:
    import yaml

    from r1pipe.recipe import load_recipe

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    recipe = load_recipe(args.recipe, overrides)
    if recipe.stage in ("grpo", "align"):
        from r1pipe.stages import grpo as stage
    elif recipe.stage == "sft":
        from r1pipe.stages import sft as stage
    else:
        from r1pipe.stages import reject as stage
    return stage.run(recipe, resume=args.resume, max_steps=args.max_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1pipe.train", description=__doc__)
    add_train_arguments(parser)
    final = run_stage(parser.parse_args(argv))
    print(f"final policy: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
