"""Fixture `trl_oracle`: drive TRL 1.16 GRPOTrainer's own loss code (`compute_loss` -> `_compute_loss`).

Used by tests/grpo/test_trl_oracle.py to compare `r1pipe.grpo.clipped_policy_loss` with TRL
(spec section 2 oracle). The trainer is a skeleton: `object.__new__(GRPOTrainer)` with only the
attributes `_compute_loss` reads, and `_get_per_token_logps_and_entropies` returns our tensors.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


class SingleProcessAccelerator:
    """The accelerate calls `_compute_loss` makes, for one process (where they are identities).

    A stand-in instead of `accelerate.Accelerator()`, whose process-wide singleton state would leak
    into other tests of the same pytest session.
    """

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


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
    from trl.trainer.grpo_trainer import GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, report_to="none", use_cpu=True, **trl_args)
    trainer = object.__new__(GRPOTrainer)
    # What GRPOTrainer.__init__ derives from args and _compute_loss reads (trl 1.16 grpo_trainer.py).
    trainer.args = args
    trainer.loss_type = args.loss_type
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.max_completion_length = args.max_completion_length
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer.aux_loss_enabled = False  # no MoE router logits in this skeleton
    trainer.use_vllm = importance_sampling_ratio is not None
    trainer.vllm_importance_sampling_correction = importance_sampling_ratio is not None
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.accelerator = SingleProcessAccelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

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
