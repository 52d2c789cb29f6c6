"""Padding-free micro-batches: sequences are packed into one row with position ids restarting per
sequence (the policy's attention never crosses them), and micro-batches are formed by a token budget
rather than a fixed count, so long and short completions mix.

`pack_sequences` returns `PackedBatch`es; `PackedBatch.unpack` turns per-position values of the packed
row back into the [n_seqs, max_completion_len] layout the GRPO loss takes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    targets: torch.Tensor  # [1, L]: next token on completion positions, IGNORE elsewhere
    gather_index: torch.Tensor  # [n, Tc]: packed position predicting completion token j of sequence i
    completion_mask: torch.Tensor  # [n, Tc] float: 1 on real completion tokens
    seq_index: torch.Tensor  # [n]: index of each sequence in the caller's list

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def unpack(self, per_position: torch.Tensor) -> torch.Tensor:
        """[1, L] (or [L]) values at packed positions -> [n, Tc], zero where the mask is 0."""
        flat = per_position.reshape(-1)
        return flat[self.gather_index] * self.completion_mask

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.targets,
                                                     self.gather_index, self.completion_mask, self.seq_index)))


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], token_budget: int) -> list[PackedBatch]:
    """Greedy first-fit in the given order: each micro-batch holds at most `token_budget` tokens (a single
    longer sequence gets a micro-batch of its own). Sequences with an empty completion are skipped."""
    batches, current, used = [], [], 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not c:
            continue
        n = len(p) + len(c)
        if current and used + n > token_budget:
            batches.append(_build(current, prompts, completions))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(_build(current, prompts, completions))
    return batches


def _build(indices, prompts, completions) -> PackedBatch:
    ids, pos, tgt, spans = [], [], [], []
    for i in indices:
        p, c = prompts[i], completions[i]
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt; a completion needs at least one token to condition on")
        seq = list(p) + list(c)
        start = len(ids)
        ids.extend(seq)
        pos.extend(range(len(seq)))
        # position t predicts token t+1; completion token j sits at len(p)+j, predicted from len(p)+j-1
        tgt.extend([IGNORE] * (len(p) - 1) + list(c) + [IGNORE])
        spans.append((start + len(p) - 1, len(c)))
    width = max(n for _, n in spans)
    gather = torch.zeros(len(indices), width, dtype=torch.long)
    mask = torch.zeros(len(indices), width)
    for row, (first, n) in enumerate(spans):
        gather[row, :n] = torch.arange(first, first + n)
        mask[row, :n] = 1.0
    return PackedBatch(
        input_ids=torch.tensor([ids]),
        position_ids=torch.tensor([pos]),
        targets=torch.tensor([tgt]),
        gather_index=gather,
        completion_mask=mask,
        seq_index=torch.tensor(indices),
    )


def placeholder_batch(pad_token_id: int = 0) -> PackedBatch:
    """One token predicting one token: what a data-parallel rank without sequences runs forward and
    backward (times 0), so it still joins the gradient all-reduce the other ranks start."""
    return pack_sequences([[pad_token_id]], [[pad_token_id]], 2)[0]


def placeholder_loss(model, pad_token_id: int, device) -> torch.Tensor:
    """A zero loss through `model` on the placeholder batch: backpropagated, it joins the gradient
    collectives (DDP all-reduce, FSDP2 reduce-scatter) of ranks that have more micro-batches."""
    b = placeholder_batch(pad_token_id).to(device)
    return model(b.input_ids, position_ids=b.position_ids, targets=b.targets).sum() * 0.0
