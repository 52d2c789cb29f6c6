"""Run one recipe stage: `accelerate launch -m r1pipe.train RECIPE.yaml [--output-dir D] [--max-steps N] [--resume]`
(or `r1pipe train ...` for one process). The recipe's `stage` picks the module in `r1pipe.stages`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a stage recipe YAML file")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    parser.add_argument("--dry-run", action="store_true",
                        help="build everything and take one step on a tiny stand-in of the recipe's model family")
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
    if args.dry_run:
        recipe = dry_run_recipe(recipe)
        args.max_steps = 1
        if "output_dir" not in overrides:  # never leave a dry run's files where the real run writes
            recipe.output_dir = str(Path(recipe.output_dir) / "dry-run")
    if recipe.stage in ("grpo", "align"):
        from r1pipe.stages import grpo as stage
    elif recipe.stage == "sft":
        from r1pipe.stages import sft as stage
    else:
        from r1pipe.stages import reject as stage
    return stage.run(recipe, resume=args.resume, max_steps=args.max_steps)


def dry_run_recipe(recipe):
    """The same recipe on a tiny model of the same family, small batches (the caller caps it at one step)."""
    from r1pipe.model import DeepSeekConfig

    family = recipe.model.family
    path = Path(recipe.model.path) if recipe.model.path else None
    if path is not None and (path / "config.json").is_file():
        family = DeepSeekConfig.from_file(path).model_type
        if DeepSeekConfig.from_file(path).hidden_size <= 256:  # already a tiny model (an earlier dry-run stage)
            family = None
    if family is not None or path is None:
        recipe.model.init = "tiny_v2" if family == "deepseek_v2" else "tiny"
        recipe.model.path = None
    recipe.model.dtype = "float32"
    recipe.train.prompts_per_step = min(recipe.train.prompts_per_step, 2)
    recipe.train.batch_size = min(recipe.train.batch_size, 4)
    recipe.train.micro_batch_tokens = min(recipe.train.micro_batch_tokens, 2048)
    recipe.grpo.num_generations = min(recipe.grpo.num_generations, 4)
    recipe.rollout.max_tokens = min(recipe.rollout.max_tokens, 16)
    recipe.rollout.max_model_len = 256
    recipe.data.limit = 64
    # the stand-in runs on the embedded task unless the recipe's data is already on disk
    if not Path(recipe.data.train).exists():
        recipe.data.train = "tiny_arith:train?n=64"
    recipe.data.mix = [m for m in recipe.data.mix if Path(m["source"]).exists()]
    if not Path(recipe.reject.prompts).exists():
        recipe.reject.prompts = "tiny_arith:train?n=64"
    recipe.reject.limit, recipe.reject.n = 2, min(recipe.reject.n, 2)
    # an untrained stand-in is never correct and rarely finishes: keep its samples so the next SFT has data
    recipe.reject.keep, recipe.reject.keep_truncated = "all", True
    return recipe


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # r1pipe reads local files only; a hub lookup would hang offline
    parser = argparse.ArgumentParser(prog="python -m r1pipe.train", description=__doc__)
    add_train_arguments(parser)
    final = run_stage(parser.parse_args(argv))
    print(f"final policy: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
