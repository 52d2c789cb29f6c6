"""Fixture `trl_oracle`: drive TRL 1.16 GRPOTrainer's own loss code (`compute_loss` -> `_compute_loss`).

Used by tests/grpo/test_trl_oracle.py to compare `r1pipe.grpo.clipped_policy_loss` with TRL
(spec section 2 oracle). The trainer is a skeleton: `object.__new__(GRPOTrainer)` with only the
attributes `_compute_loss` reads, and `_get_per_token_logps_and_entropies` returns our tensors.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest
import torch


def trl_loss_and_grads(
    trl_args: dict,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    num_items_in_batch: float | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Run TRL's GRPOTrainer.compute_loss; return (loss, d loss/d logp, d loss/d entropies, metrics).

    `trl_args` are GRPOConfig fields (loss_type, beta, epsilon, epsilon_high, delta, ...).
    `importance_sampling_ratio` turns on TRL's vLLM IS correction with those precomputed weights.
    """
    from trl import GRPOConfig

    from r1pipe.grpo.trl_reference import SingleProcessAccelerator, grpo_trainer_skeleton

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, report_to="none", use_cpu=True, **trl_args)
    trainer = grpo_trainer_skeleton(args, SingleProcessAccelerator(), SimpleNamespace(training=True),
                                    vllm_importance_sampling=importance_sampling_ratio is not None)

    logp = logp.detach().clone().requires_grad_(True)
    ent = None
    if entropies is not None:
        ent = entropies.detach().clone().requires_grad_(trainer._entropy_bonus_enabled)
    fake_entropies = ent if ent is not None else torch.zeros_like(logp)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, fake_entropies, None)

    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch)),
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    if importance_sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio

    loss = trainer.compute_loss(None, inputs)
    wrt = [logp] + ([ent] if ent is not None and ent.requires_grad else [])
    grads = torch.autograd.grad(loss, wrt)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads[0], (grads[1] if len(grads) > 1 else None), metrics


@pytest.fixture(scope="session")
def trl_oracle():
    """`trl_loss_and_grads`, after skipping where TRL is absent (the GPU machine has no trl)."""
    pytest.importorskip("trl")
    return trl_loss_and_grads
