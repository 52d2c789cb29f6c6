"""scripts/bench_grpo_step.py on the CPU with the tiny V2 policy: the script runs end to end, and its premise
holds: r1pipe's GRPO step (packed, the stage's `update_policy`) and TRL's GRPOTrainer loss path on
transformers' model compute the same first-step gradient norm and old log-probs on the same batch; and the
r1pipe-lowmem row (reference offload + gradient checkpointing) computes r1pipe's step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_grpo_step.py"


@pytest.mark.slow
def test_bench_script_r1pipe_and_trl_agree(tmp_path):
    pytest.importorskip("trl")
    common = ["--tiny", "--seqs", "8", "--group", "4", "--seq-len", "48", "--micro-tokens", "128",
              "--trl-micro-seqs", "4", "--warmup", "0", "--steps", "1", "--rollout", "0", "--out", str(tmp_path)]
    results = {}
    for impl in ("r1pipe", "trl", "r1pipe-lowmem"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--impl", impl, *common], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results[impl] = json.loads(line[len("RESULT "):])
    ours, trl = results["r1pipe"], results["trl"]
    assert ours["tokens"] == trl["tokens"] > 0
    assert ours["first_grad_norm"] > 0
    # bf16 weights on both sides: agreement within bf16 rounding of a norm
    assert abs(ours["first_grad_norm"] - trl["first_grad_norm"]) <= 0.02 * trl["first_grad_norm"]
    a, b = torch.load(tmp_path / "old_logps_r1pipe.pt"), torch.load(tmp_path / "old_logps_trl.pt")
    assert a.shape == b.shape
    assert (a - b).abs().max() < 0.1 and (a - b).abs().mean() < 0.02
    # the memory options (reference offload + gradient checkpointing) change where tensors live, not the step
    low = results["r1pipe-lowmem"]
    assert low["first_grad_norm"] == pytest.approx(ours["first_grad_norm"], rel=1e-3)
    assert low["ref_vs_policy_max_diff"] < 0.1  # the offloaded reference is the policy before its first update
    assert torch.equal(torch.load(tmp_path / "old_logps_r1pipe-lowmem.pt"), a)
