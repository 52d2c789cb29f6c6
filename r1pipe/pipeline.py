"""`r1pipe pipeline recipes/<name>/`: run a recipe directory's stages in order (its `pipeline.yaml` lists
them), each in its own process (`python -m r1pipe.train <stage>.yaml`, the same entry `accelerate launch`
uses). A finished stage (`<out>/<stage>/DONE`) is skipped; an interrupted one resumes from its latest
checkpoint. Stage files refer to earlier stages' outputs as `stage:<name>`: a training stage's
`<out>/<name>/final`, a reject stage's `<out>/<name>/samples.jsonl`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from r1pipe.recipe import RecipeError, build, load_recipe


@dataclass
class PipelineSpec:
    name: str = "pipeline"
    output_dir: str = "runs/pipeline"
    stages: list = field(default_factory=list)  # stage file names (without .yaml), in order
    accelerate_args: list = field(default_factory=list)  # e.g. ["--num_processes", "2"]; empty: plain python


def load_pipeline(recipe_dir: str | Path) -> tuple[PipelineSpec, Path]:
    recipe_dir = Path(recipe_dir)
    spec_file = recipe_dir / "pipeline.yaml"
    if not spec_file.is_file():
        raise RecipeError(f"{recipe_dir}: no pipeline.yaml listing the stages to run")
    spec = build(PipelineSpec, yaml.safe_load(spec_file.read_text()) or {}, str(spec_file))
    for stage in spec.stages:
        if not (recipe_dir / f"{stage}.yaml").is_file():
            raise RecipeError(f"{spec_file}: stage {stage!r} has no file {recipe_dir / (stage + '.yaml')}")
    return spec, recipe_dir


def stage_output(out: Path, stage: str, kind: str) -> Path:
    return out / stage / ("samples.jsonl" if kind == "reject" else "final")


def resolve_references(recipe_file: Path, out: Path, kinds: dict[str, str]) -> dict[str, str]:
    """--set overrides that replace `stage:<name>` values with that stage's output path."""
    raw = yaml.safe_load(recipe_file.read_text()) or {}
    overrides = {}

    def visit(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{prefix}{k}.")
        elif isinstance(node, str) and node.startswith("stage:"):
            name = node.split(":", 1)[1]
            if name not in kinds:
                raise RecipeError(f"{recipe_file}: {prefix[:-1]}={node!r} names no earlier stage (have {sorted(kinds)})")
            overrides[prefix[:-1]] = str(stage_output(out, name, kinds[name]))

    visit(raw, "")
    return overrides


def plan_pipeline(recipe_dir: str | Path, out: Path) -> list[tuple[str, Path, dict, object]]:
    """[(stage, recipe file, --set overrides, validated recipe)]: every stage is checked before any runs."""
    spec, recipe_dir = load_pipeline(recipe_dir)
    kinds, plan = {}, []
    for stage in spec.stages:
        recipe_file = recipe_dir / f"{stage}.yaml"
        overrides = {**resolve_references(recipe_file, out, kinds), "output_dir": str(out / stage)}
        recipe = load_recipe(recipe_file, overrides)
        kinds[stage] = recipe.stage
        plan.append((stage, recipe_file, overrides, recipe))
    return plan


def run_pipeline(recipe_dir: str | Path, output_dir: str | None = None, dry_run: bool = False) -> list[dict]:
    """Run (or skip / resume) every stage; returns [{"name", "wall_s", "output", "skipped"}]."""
    spec, _ = load_pipeline(recipe_dir)
    out = Path(output_dir or spec.output_dir)
    if dry_run:
        out = out / "dry-run"  # its DONE markers must never make a real run skip a stage
    results = []
    for stage, recipe_file, overrides, recipe in plan_pipeline(recipe_dir, out):
        stage_dir = out / stage
        done = stage_dir / "DONE"
        if done.is_file():
            results.append({"name": stage, "skipped": True, **json.loads(done.read_text())})
            print(f"[pipeline] {stage}: done before, skipped")
            continue
        resume = (stage_dir / "checkpoints" / "latest").is_file()
        cmd = _stage_command(spec, recipe_file, overrides, resume, dry_run)
        print(f"[pipeline] {stage}: {'resuming' if resume else 'starting'} ({recipe.stage})", flush=True)
        start = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        record = {"wall_s": round(time.time() - start, 1), "output": str(stage_output(out, stage, recipe.stage)),
                  "stage": recipe.stage}
        done.write_text(json.dumps(record) + "\n")
        results.append({"name": stage, "skipped": False, **record})
    return results


def _stage_command(spec, recipe_file, overrides, resume, dry_run) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *spec.accelerate_args] if spec.accelerate_args else [sys.executable]
    cmd = [*launcher, "-m", "r1pipe.train", str(recipe_file)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if resume:
        cmd.append("--resume")
    if dry_run:
        cmd.append("--dry-run")
    return cmd
