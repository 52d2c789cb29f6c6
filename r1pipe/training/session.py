"""What every training stage opens and closes the same way: the accelerator, the policy (fresh, from a
checkpoint, or from the latest resumable checkpoint), optimizer and schedule, the metrics logger, periodic
atomic checkpoints and the final policy in `output_dir/final`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1pipe.training import fsdp, zero3
from r1pipe.training.metrics import MetricsLogger
from r1pipe.training.optim import build_optimizer
from r1pipe.training.setup import load_policy_for, tokenizer_for
from r1pipe.training.state import latest_checkpoint, load_trainer_state, save_train_state


@dataclass
class TrainSession:
    recipe: object
    accelerator: object
    policy: torch.nn.Module  # unwrapped
    wrapped: torch.nn.Module  # what accelerate returned (DDP/FSDP or the policy itself)
    tokenizer: object
    optimizer: object
    scheduler: object
    start_step: int
    total_steps: int
    checkpoint: Path | None  # the checkpoint resumed from
    logger: MetricsLogger
    out_dir: Path
    resumed_state: dict = field(default_factory=dict)  # the stage_state saved with `checkpoint` ({} fresh)
    sharded: bool = False  # FSDP2 (r1pipe.training.fsdp): policy, reference and optimizer state sharded

    def maybe_save(self, step: int, reference=None, stage_state: dict | None = None) -> None:
        every = self.recipe.train.save_every
        if every and step % every == 0 and step < self.total_steps:
            policy, optimizer, reference = self._full_state(reference)
            if self.accelerator.is_main_process:
                save_train_state(self.out_dir, step, policy, optimizer, self.scheduler, reference, self.tokenizer,
                                 stage_state=stage_state)
            self.accelerator.wait_for_everyone()

    def finish(self, reference=None, stage_state: dict | None = None) -> Path:
        self.logger.close()
        final = self.out_dir / "final"
        policy, optimizer, reference = self._full_state(reference)
        if self.accelerator.is_main_process:
            save_train_state(self.out_dir, self.total_steps, policy, optimizer, self.scheduler, reference, self.tokenizer,
                             stage_state=stage_state)
            policy.save_pretrained(final, tokenizer=self.tokenizer)
        self.accelerator.wait_for_everyone()
        return final

    def _full_state(self, reference):
        """(policy, optimizer, reference) as a checkpoint saves them: sharded ones gathered on every rank (a
        collective) and kept on the main process, as plain copies on the CPU in the unsharded layout."""
        if not self.sharded:
            return self.policy, self.optimizer, reference
        keep = self.accelerator.is_main_process
        return (fsdp.unsharded_copy(self.policy, "cpu", keep), fsdp.gathered_optimizer(self.optimizer, keep),
                fsdp.unsharded_copy(reference, "cpu", keep) if reference is not None else None)


def open_session(recipe, resume: bool, max_steps: int | None, total_steps: int | None = None) -> TrainSession:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    out_dir = Path(recipe.output_dir)
    # No buffer broadcast in DDP forwards: ranks run different numbers of micro-batches, and the buffers
    # (balancing bias, updated from all-reduced loads; rope tables; last loads) agree or are per-rank.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.manual_seed(recipe.train.seed)
    total = max_steps if max_steps is not None else (total_steps or recipe.train.max_steps)
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        recipe.model.path, recipe.model.init = str(ckpt / "policy"), None
    partitioned = zero3.requested(recipe, accelerator.num_processes)  # DeepSpeed ZeRO-3
    fsdp_sharded = not partitioned and fsdp.requested(recipe, accelerator.num_processes)
    sharded = partitioned or fsdp_sharded
    if sharded:  # rank 0 alone reads the weights (into host memory); every rank receives its own shards from it,
        # before the optimizer is built: it steps the sharded parameters
        full, tokenizer = (load_policy_for(recipe.model, recipe.train.seed, device="cpu") if accelerator.is_main_process
                           else (None, tokenizer_for(recipe.model)))
        policy = zero3.partition_from_rank0(full) if partitioned else fsdp.shard_from_rank0(full, accelerator.device)
        del full
    else:
        policy, tokenizer = load_policy_for(recipe.model, recipe.train.seed, device=accelerator.device)
    optimizer, scheduler = build_optimizer(policy.parameters(), recipe.optim, total,
                                           device=accelerator.device if partitioned else None)
    if partitioned:  # the engine partitions the weights and steps AdamW on float32 partitions of them
        engine = zero3.partition(policy, optimizer, recipe.optim.max_grad_norm)
        optimizer = zero3.EngineStep(engine, optimizer)
    resumed = ({"step": 0, "stage_state": {}} if ckpt is None else
               load_trainer_state(ckpt, fsdp.sharding_loader(optimizer) if sharded else optimizer, scheduler))
    start = resumed["step"]
    if sharded:  # accelerate neither wraps the model (DDP) nor the optimizer: the same path on CPU and GPU
        wrapped = engine if partitioned else policy
        if accelerator.is_main_process:
            local, total_params = fsdp.parameter_counts(policy)
            print(f"{'ZeRO-3: policy partitioned' if partitioned else 'FSDP2: policy sharded'} over "
                  f"{accelerator.num_processes} processes; rank 0 holds {local:,} of {total_params:,} parameters", flush=True)
    elif zero3.launcher_asks():  # one process of a DeepSpeed launch: nothing to partition, and accelerate's own
        wrapped = policy  # DeepSpeed wrapping would step and clip at every micro-batch beneath r1pipe's step
    else:
        wrapped, optimizer = accelerator.prepare(policy, optimizer)
    logger = MetricsLogger(out_dir, total, start_step=start, enabled=accelerator.is_main_process,
                           run_name=recipe.name or recipe.stage)
    return TrainSession(recipe, accelerator, policy, wrapped, tokenizer, optimizer, scheduler, start, total, ckpt, logger, out_dir,
                        resumed["stage_state"], sharded)
