"""TRL 1.16's GRPOTrainer loss code, driven without its Trainer machinery: the oracle of the GRPO tests
(tests/grpo/conftest.py) and the baseline of scripts/bench_grpo_step.py. Imports trl only when called.

`grpo_trainer_skeleton` is `object.__new__(GRPOTrainer)` with the attributes `GRPOTrainer.__init__` derives from
its config and that `compute_loss` / `_compute_loss` / `_get_per_token_logps_and_entropies` read
(trl 1.16 grpo_trainer.py); `SingleProcessAccelerator` answers the accelerate calls they make, for one process.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch


class SingleProcessAccelerator:
    """The accelerate calls of TRL's loss path, for one process (where they are identities).

    A stand-in instead of `accelerate.Accelerator()`, whose process-wide singleton state would leak into other
    tests of a pytest session. `autocast_device` ("cuda"/"cpu") turns on bf16 autocast, as TRL's `bf16=True`.
    """

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def __init__(self, autocast_device: str | None = None):
        self.autocast_device = autocast_device

    def autocast(self):
        if self.autocast_device is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast_device, dtype=torch.bfloat16)

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def unwrap_model(self, model):
        return model


def grpo_trainer_skeleton(args, accelerator, model, ref_model=None, vllm_importance_sampling: bool = False):
    """A GRPOTrainer whose loss code runs as in training, built from a `GRPOConfig` without a Trainer."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
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
    trainer.aux_loss_enabled = False  # no MoE router-logit aux loss: r1pipe balances with the bias instead
    trainer.use_vllm = vllm_importance_sampling
    trainer.vllm_importance_sampling_correction = vllm_importance_sampling
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.accelerator = accelerator
    trainer.model, trainer.ref_model, trainer.temperature = model, ref_model, args.temperature
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer
