"""From token lists to packed rows, and the RL batch on top of them.

    rows = pack_sequences(prompts, completions, max_tokens_per_row=...)        # any objective (RL, SFT, ...)
    rows = rl_rows(prompts, completions, advantages, rollout_logp=..., ...)   # + the RL per-token vectors
    rows = with_logprobs(rows, ref_logp=parallel.logprobs(reference, rows))

Sequences (prompt + completion) are packed several to a row, first-fit over lengths sorted longest first, with
no padding between them; positions restart at 0 for every sequence and attention is blocked across sequences
(parallel.rows). Loss positions are the completion tokens: completion token j of a sequence with a p-token
prompt sits at p + j and is predicted by position p + j - 1.

The RL per-token vectors ride in `PackedRows.extras` under the names the objectives read:
advantages (one number per sequence broadcast to its completion tokens, or one per token), and the old,
reference and rollout log-probs, all 0 outside the loss positions. A MoE rollout's recorded routing rides as
routed_experts, int32 [B, S, layers, k]: at every position the experts the rollout engine chose for that input
token (the trainer's routing replay forces them).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from r1_engine.parallel.rows import PackedRows

ADVANTAGES, OLD_LOGP, REF_LOGP, ROLLOUT_LOGP = "advantages", "old_logp", "ref_logp", "rollout_logp"
ROUTED_EXPERTS = "routed_experts"  # the name parallel.moe's routing replay reads
LOGPROB_VECTORS = (OLD_LOGP, REF_LOGP, ROLLOUT_LOGP)  # log-probs of the sampled tokens under other policies


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices bin-packed into rows of at most `capacity` tokens (longest first; ties keep the input
    order, so the layout is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                   train_on: Sequence[bool] | None = None, pack: bool = True, max_tokens_per_row: int | None = None,
                   pad_to_multiple_of: int = 1, pad_id: int = 0) -> PackedRows:
    """Rows of prompt + completion sequences; sequence i gets seq id i, its completion tokens are its loss positions.

    train_on: one bool per sequence; False keeps it in the rows with no loss position (e.g. DAPO's masking of
        truncated completions). pack=False: one sequence per row, right-padded. max_tokens_per_row: the packing
        capacity (default: the longest sequence). pad_to_multiple_of: round the row length up."""
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"pack_sequences: {n} prompts but {len(completions)} completions")
    if train_on is not None and len(train_on) != n:
        raise ValueError(f"pack_sequences: {n} sequences but {len(train_on)} train_on flags")
    if n == 0:
        raise ValueError("pack_sequences: no sequences")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pack_sequences: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"pack_sequences: prompt {i} is empty (the first completion token needs a position "
                             f"that predicts it)")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    longest = max(lengths)
    capacity = max_tokens_per_row if max_tokens_per_row is not None else longest
    if capacity < longest:
        i = lengths.index(longest)
        raise ValueError(f"pack_sequences: sequence {i} has {longest} tokens, more than "
                         f"max_tokens_per_row={capacity}")
    layout = _first_fit_decreasing(lengths, capacity) if pack else [[i] for i in range(n)]
    seq_len = max(sum(lengths[i] for i in row) for row in layout)
    seq_len = math.ceil(seq_len / pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(layout), seq_len)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(layout):
        offset = 0
        for i in row:
            seq = torch.tensor(list(prompts[i]) + list(completions[i]), dtype=torch.long)
            length, p, c = len(seq), len(prompts[i]), len(completions[i])
            tokens[r, offset:offset + length] = seq
            targets[r, offset:offset + length - 1] = seq[1:]
            position_ids[r, offset:offset + length] = torch.arange(length)
            seq_ids[r, offset:offset + length] = i
            if c > 0 and (train_on is None or train_on[i]):
                loss_mask[r, offset + p - 1:offset + p - 1 + c] = 1.0
            offset += length
    return PackedRows(tokens=tokens, position_ids=position_ids, targets=targets, loss_mask=loss_mask,
                      seq_ids=seq_ids, pad_id=pad_id)


def per_sequence_to_tokens(rows: PackedRows, values: torch.Tensor) -> torch.Tensor:
    """float32 [B, S]: values[i] at every loss position of sequence i, 0 elsewhere (a gather: no Python loop)."""
    values = torch.as_tensor(values, dtype=torch.float32).to(rows.device).reshape(-1)
    picked = values[rows.seq_ids.clamp(min=0)]
    return torch.where(rows.loss_mask > 0, picked, torch.zeros_like(picked))


def routed_experts_rows(rows: PackedRows, routed_experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """int32 [B, S, L, k]: record i ([P_i + C_i - 1, L, k], RolloutBatch.routed_experts) at sequence i's
    positions; its last token (never fed to the rollout model, and predicting nothing) repeats the previous
    position's experts, padding gets experts 0..k-1 (distinct valid ids; no loss reads them)."""
    lengths = torch.bincount(rows.seq_ids[rows.seq_ids >= 0], minlength=len(routed_experts)).tolist()
    per_token = None
    for i, (record, length) in enumerate(zip(routed_experts, lengths)):
        if not torch.is_tensor(record) or record.dim() != 3 or record.is_floating_point():
            got = f"shape {tuple(record.shape)} ({record.dtype})" if torch.is_tensor(record) else type(record).__name__
            raise ValueError(f"rl_rows: sequence {i} has routed_experts of {got}, expected an integer tensor "
                             f"[positions, layers, k]")
        if record.shape[0] != length - 1:
            raise ValueError(f"rl_rows: sequence {i} has routed_experts for {record.shape[0]} positions, expected "
                             f"{length - 1} (its {length} prompt + completion tokens less the last)")
        if per_token is not None and tuple(record.shape[1:]) != per_token:
            raise ValueError(f"rl_rows: sequence {i} has routed_experts of [layers, k] = {list(record.shape[1:])}, "
                             f"sequence 0 has {list(per_token)}")
        per_token = tuple(record.shape[1:])
    layers, k = per_token
    distinct = torch.arange(k, dtype=torch.int32, device=rows.device)
    out = distinct.expand(*rows.tokens.shape, layers, k).clone()
    # every position of every sequence, grouped by sequence id in position order (stable sort of the flat ids)
    flat_ids = rows.seq_ids.reshape(-1)
    positions = torch.nonzero(flat_ids >= 0).reshape(-1)
    positions = positions[torch.argsort(flat_ids[positions], stable=True)]
    records = [r.to(device=rows.device, dtype=torch.int32) for r in routed_experts]
    filled = [torch.cat([r, r[-1:] if r.shape[0] else distinct.expand(1, layers, k)]) for r in records]
    out.view(-1, layers, k)[positions] = torch.cat(filled)
    return out


def rl_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
            advantages: torch.Tensor | Sequence[float] | Sequence[Sequence[float]] | None, *,
            rollout_logp: Sequence[Sequence[float]] | None = None,
            routed_experts: Sequence[torch.Tensor] | None = None, **packing) -> PackedRows:
    """Packed rows with the RL vectors: `advantages` is a [num_sequences] tensor (one value per sequence, broadcast
    to its completion tokens), one list per sequence with a value per completion token, or None when the caller
    derives per-token advantages from the packed rows themselves (distillation: from the teacher's log-probs);
    `rollout_logp` one list per sequence (the rollout engine's log-prob of each completion token);
    `routed_experts` one [P + C - 1, L, k] record per sequence (RolloutBatch.routed_experts), into the rows as
    ROUTED_EXPERTS (`routed_experts_rows`). `packing`: pack_sequences' options."""
    n = len(prompts)
    per_token = advantages is not None and not torch.is_tensor(advantages) and n > 0 \
        and hasattr(advantages[0], "__len__")
    if advantages is not None and len(advantages) != n:
        raise ValueError(f"rl_rows: {n} sequences but {len(advantages)} advantages")
    for name, per_seq in (("advantages", advantages if per_token else None), ("rollout_logp", rollout_logp)):
        if per_seq is None:
            continue
        if len(per_seq) != n:
            raise ValueError(f"rl_rows: {n} sequences but {len(per_seq)} {name} rows")
        for i, (c, v) in enumerate(zip(completions, per_seq)):
            if len(v) != len(c):
                raise ValueError(f"rl_rows: sequence {i} has {len(c)} completion tokens but {len(v)} {name}")
    if routed_experts is not None and len(routed_experts) != n:
        raise ValueError(f"rl_rows: {n} sequences but {len(routed_experts)} routed_experts records")
    rows = pack_sequences(prompts, completions, **packing)
    if routed_experts is not None:
        rows = rows.with_extras(**{ROUTED_EXPERTS: routed_experts_rows(rows, routed_experts)})
    if per_token:
        rows = rows.with_extras(**{ADVANTAGES: rows.scatter_completion_values(dict(enumerate(advantages)))})
    elif advantages is not None:
        rows = rows.with_extras(**{ADVANTAGES: per_sequence_to_tokens(rows, advantages)})
    if rollout_logp is not None:
        rows = rows.with_extras(**{ROLLOUT_LOGP: rows.scatter_completion_values(dict(enumerate(rollout_logp)))})
    return rows


def with_logprobs(rows: PackedRows, **vectors: torch.Tensor | None) -> PackedRows:
    """A copy with RL log-prob vectors set (old_logp=, ref_logp=, rollout_logp=), detached, fp32, 0 where not
    trained on; e.g. `with_logprobs(rows, ref_logp=parallel.logprobs(reference, rows))`."""
    changes = {}
    for name, value in vectors.items():
        if name not in LOGPROB_VECTORS:
            raise ValueError(f"with_logprobs: unknown vector {name!r}; expected old_logp, ref_logp or rollout_logp")
        if value is None:
            continue
        if value.shape != rows.tokens.shape:
            raise ValueError(f"with_logprobs: {name} has shape {tuple(value.shape)}, rows are "
                             f"{tuple(rows.tokens.shape)}")
        value = value.detach().to(device=rows.device, dtype=torch.float32)
        changes[name] = torch.where(rows.loss_mask > 0, value, torch.zeros_like(value))
    return rows.with_extras(**changes)
