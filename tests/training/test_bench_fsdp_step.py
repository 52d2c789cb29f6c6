"""scripts/bench_fsdp_step.py on the CPU (gloo) with the tiny V2 policy: the script runs end to end through
`accelerate launch` and its premise holds: the 2-process FSDP2 and ZeRO-3 runs shard the policy (each rank
holds half), and their losses, gradient norms and post-update log-probs equal the 1-process run's on the same
global batch, by a margin far below how far one update moves the log-probs (the scale a wrong step would show at)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_fsdp_step.py"


def _logprobs(out: Path, config: str, processes: int, key: str) -> torch.Tensor:
    parts = [torch.load(out / f"logprobs_{config}_rank{r}.pt")[key] for r in range(processes)]
    merged = {i: t for p in parts for i, t in p.items()}
    return torch.cat([merged[i] for i in sorted(merged)])


@pytest.mark.slow
def test_bench_fsdp_script_two_processes_equal_one(tmp_path):
    from tests.training.helpers import free_port

    configs = "1gpu,fsdp2x2,zero3x2" if importlib.util.find_spec("deepspeed") else "1gpu,fsdp2x2"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--configs", configs, "--seqs", "16",
                           "--group", "4", "--seq-len", "64", "--micro-tokens", "200", "--warmup", "1", "--steps", "1",
                           "--port", str(free_port()), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, *others = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in others] == configs.split(",")[1:]
    assert (one["config"], one["processes"], one["sharded"]) == ("1gpu", 1, False)
    moved = (_logprobs(tmp_path, "1gpu", 1, "after_one") - _logprobs(tmp_path, "1gpu", 1, "before")).abs().mean()
    assert moved > 0.01, "the update did not move the log-probs: the comparison below would prove nothing"
    for two in others:
        assert (two["processes"], two["sharded"]) == (2, True)
        assert one["tokens"] == two["tokens"] > 0
        assert abs(2 * two["rank0_parameters"] - two["parameters"]) <= two["parameters"] // 100
        for a, b in zip(one["steps"], two["steps"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-3, (two["config"], a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)  # bf16 weights and gradients
        apart = (_logprobs(tmp_path, two["config"], 2, "after_one") - _logprobs(tmp_path, "1gpu", 1, "after_one")).abs().mean()
        assert apart < 0.05 * moved, f"{two['config']} ends {apart:.4f} from 1 process; the update moved {moved:.4f}"
