"""One module per pipeline stage (sft, grpo, reject, align); each exposes `run(recipe, ...)`."""
