"""The SFT stage (cold start, and the rejection-sampling SFT of stage 3): next-token loss on the response
tokens only, over packed token-budget micro-batches, through the fused log-prob kernel, with the MoE bias
update after every step. Rows need `prompt` and a response column (`completion`, else `cot`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from r1pipe.training.fsdp import accumulating, backward, clip_grad_norm, placeholder_count
from r1pipe.training.packing import pack_sequences, placeholder_loss
from r1pipe.training.state import select_rows


def response_of(row: dict, where: str) -> str:
    for column in ("completion", "cot"):
        if isinstance(row.get(column), str) and row[column]:
            return row[column]
    raise ValueError(f"{where}: row has no non-empty 'completion' (or 'cot') column to train on; columns: {sorted(row)}")


def sft_step(session, rows, prompt_ids, response_ids, step: int) -> dict:
    rc, acc, wrapped = session.recipe, session.accelerator, session.wrapped
    chosen = select_rows(len(rows), rc.train.batch_size, step, rc.train.seed)[acc.process_index :: acc.num_processes]
    batches = pack_sequences([prompt_ids[i] for i in chosen], [response_ids[i] for i in chosen], rc.train.micro_batch_tokens)
    n_tokens = sum(len(response_ids[i]) for i in chosen)
    if acc.num_processes > 1:
        n_tokens = int(acc.reduce(torch.tensor(n_tokens, device=acc.device), reduction="sum").item())
    t0, total, loads = time.time(), 0.0, None
    pads = placeholder_count(acc, len(batches), session.sharded)  # a collective: before any forward
    for i, b in enumerate(batches):
        b = b.to(acc.device)
        # DDP all-reduces on the last micro-batch only (ranks may hold different numbers of them); ZeRO-3's
        # step boundary is the last backward of all, a placeholder's where this rank runs some
        with accumulating(acc, wrapped, last=i == len(batches) - 1 and not pads):
            logp = b.unpack(wrapped(b.input_ids, position_ids=b.position_ids, targets=b.targets))
            # token mean over the whole step (all micro-batches, all ranks; DDP averages over ranks)
            loss = -(logp * b.completion_mask).sum() * acc.num_processes / max(n_tokens, 1)
            balance = session.policy.balance_loss()
            if balance is not None:
                loss = loss + balance / len(batches)
            backward(acc, wrapped, loss)
        total += loss.item()
        step_loads = session.policy.expert_loads()
        loads = step_loads if loads is None else loads + step_loads
    # a rank without rows joins the others' all-reduce with zeros (DDP); FSDP2: as many forwards and
    # backwards as the rank with the most micro-batches (each is a collective)
    for j in range(pads):
        with accumulating(acc, wrapped, last=j == pads - 1):
            backward(acc, wrapped, placeholder_loss(wrapped, session.tokenizer.pad_token_id or 0, acc.device))
    if loads is None and acc.num_processes > 1:
        loads = session.policy.expert_loads() * 0  # and the expert-load all-reduce below
    grad_norm = clip_grad_norm(acc, wrapped.parameters(), rc.optim.max_grad_norm)
    if acc.num_processes > 1:  # the step's loss over all ranks; one rank's NaN skips the step everywhere
        total = acc.reduce(torch.tensor(total, dtype=torch.float64, device=acc.device), reduction="sum").item()
    skipped = not (math.isfinite(total) and torch.isfinite(torch.as_tensor(grad_norm)))
    if not skipped:
        session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    if loads is not None and loads.numel():
        if acc.num_processes > 1:
            loads = acc.reduce(loads, reduction="sum")
        session.policy.update_expert_bias(loads, rc.train.bias_update_speed)
    return {"loss": total / acc.num_processes, "grad_norm": float(grad_norm),
            "skipped_nonfinite": float(skipped), "lr": session.scheduler.get_last_lr()[0],
            "train_tokens_per_s": sum(b.num_tokens for b in batches) / max(time.time() - t0, 1e-9)}


def load_sft_rows(recipe) -> list[dict]:
    """The training rows plus any `data.mix` sources (R1 stage 3 adds non-reasoning data)."""
    from r1pipe.data.datasets import load_prompt_dataset

    rows = load_prompt_dataset(recipe.data.train).to_list()[: recipe.data.limit]
    for extra in recipe.data.mix:
        rows += load_prompt_dataset(extra["source"]).to_list()[: extra.get("limit")]
    return rows


def run(recipe, resume: bool = False, max_steps: int | None = None) -> Path:
    from r1pipe.data.datasets import format_prompt
    from r1pipe.training.session import open_session

    rows = load_sft_rows(recipe)
    epochs_steps = math.ceil(recipe.train.epochs * len(rows) / recipe.train.batch_size)
    session = open_session(recipe, resume, max_steps, total_steps=min(recipe.train.max_steps, epochs_steps))
    tok = session.tokenizer
    prompt_ids = [format_prompt(tok, r["prompt"]) for r in rows]
    response_ids = [tok(response_of(r, f"{recipe.data.train} row {i}"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    for i, r in enumerate(rows)]
    consecutive_bad = session.resumed_state.get("bad_steps", 0)  # a resume goes on counting
    for step in range(session.start_step, session.total_steps):
        session.wrapped.train()
        metrics = sft_step(session, rows, prompt_ids, response_ids, step)
        consecutive_bad = consecutive_bad + 1 if metrics["skipped_nonfinite"] else 0
        if consecutive_bad >= recipe.train.max_bad_steps:
            raise RuntimeError(f"SFT loss or gradient was NaN/inf for {consecutive_bad} steps in a row "
                               f"(train.max_bad_steps={recipe.train.max_bad_steps}); lower optim.lr or check the data")
        session.logger.log(step + 1, metrics)
        session.maybe_save(step + 1, stage_state={"bad_steps": consecutive_bad})
    return session.finish(stage_state={"bad_steps": consecutive_bad})
