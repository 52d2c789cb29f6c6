"""Recipes are data validated up front: every shipped recipe loads, bad keys are named with a suggestion,
and the real-model recipes run end to end with --dry-run on a tiny stand-in of their model family."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1pipe.pipeline import plan_pipeline
from r1pipe.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PIPELINES = sorted(p.parent for p in RECIPES.glob("*/pipeline.yaml"))


def test_every_recipe_is_valid(tmp_path):
    assert {p.name for p in PIPELINES} >= {"tiny_r1", "tiny_r1_zero", "deepseek_v2_lite", "deepseek_v3"}
    for pipeline in PIPELINES:
        plan = plan_pipeline(pipeline, tmp_path / pipeline.name)
        assert plan, pipeline
    assert load_recipe(RECIPES / "tiny" / "grpo.yaml").grpo.num_generations == 8


def test_published_r1_settings_in_real_recipes():
    for family in ("deepseek_v2_lite", "deepseek_v3"):
        recipe = load_recipe(RECIPES / family / "grpo.yaml")
        assert (recipe.rollout.temperature, recipe.grpo.num_generations, recipe.grpo.beta, recipe.optim.lr) == (1.0, 16, 0.001, 3e-6)


@pytest.mark.parametrize("text, message", [
    ("stage: grpo\ngrpo:\n  betta: 0.1\n", "unknown key 'betta'; did you mean 'beta'"),
    ("stage: grpo\nrollout:\n  engine: vlm\n", "did you mean 'vllm'"),
    ("stage: grpo\ntrain:\n  max_steps: ten\n", "max_steps: expected int"),
    ("stage: grpo\nrewards:\n  - {name: acuracy}\n", "acuracy"),
])
def test_bad_recipe_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


@pytest.mark.vllm
def test_v2_lite_pipeline_dry_run(tmp_path):
    """Every stage of the DeepSeek-V2-Lite recipe (SFT, GRPO with vLLM, rejection sampling, SFT on its
    output, alignment RL) builds and takes one step on a tiny deepseek_v2 stand-in."""
    subprocess.run([sys.executable, "-m", "r1pipe.cli", "pipeline", str(RECIPES / "deepseek_v2_lite"),
                    "--output-dir", str(tmp_path), "--dry-run"], check=True)
    out = tmp_path / "dry-run"
    for stage in ("sft", "grpo", "reject_sft", "align"):
        config = json.loads((out / stage / "final" / "config.json").read_text())
        assert config["model_type"] == "deepseek_v2", stage
        assert len((out / stage / "metrics.jsonl").read_text().splitlines()) == 1, stage
    assert (out / "reject" / "samples.jsonl").read_text().strip()  # reject_sft trained on these


@pytest.mark.vllm
def test_v3_grpo_stage_dry_run(tmp_path):
    subprocess.run([sys.executable, "-m", "r1pipe.train", str(RECIPES / "deepseek_v3" / "grpo.yaml"), "--dry-run",
                    "--output-dir", str(tmp_path)], check=True)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["topk_method"] == "noaux_tc"
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and "reward/mean" in row and "logprob_mismatch_max" in row
