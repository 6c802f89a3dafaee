"""One forward-only pass (`logprobs`) and one optimizer step (`train_step`) over Megatron's pipeline
schedule, on a packed `TrainBatch`.

The batch
    `TrainBatch` holds [B, S] rows. Sequences (prompt + completion) are packed several to a row
    without padding between them; position ids restart at 0 for every sequence and attention is
    blocked across sequences. Position t of a row predicts `targets[t]` (the next token of the same
    sequence), and `loss_mask[t] = 1` exactly when that target is a completion token. Every
    per-token vector (advantages, old/ref/rollout log-probs) sits on the same positions.

How attention is blocked across packed sequences
    * local (CPU) layer spec: an explicit [b, 1, S, S] boolean mask, block-diagonal causal, in
      Megatron's convention (True = masked out). Megatron's RoPE ignores `position_ids` and rotates
      by the absolute position in the row; inside a block only relative offsets reach the scores,
      so this equals restarting positions per sequence (tests check packed == padded).
    * Transformer Engine spec (GPU): the micro-batch is flattened to one row [1, b*S] and passed
      with Megatron's `PackedSeqParams(qkv_format="thd", cu_seqlens...)`, so TE's fused attention
      and fused RoPE restart per sequence. NOT verified on a GPU in this repository yet.

Losses and normalisation
    `train_step` divides every loss by GLOBAL counts (tokens / sequences over all micro-batches and
    data-parallel ranks, all-reduced before the schedule) through `kernels.policy_loss` (kernels/logits_loss.py), so the sum
    of the per-micro-batch losses over all DP ranks is the full-batch loss. Megatron then divides
    each micro-batch loss by the number of micro-batches (2-tuple loss contract in
    schedules.forward_step_calc_loss) and Megatron DDP scales gradients by 1/dp before its sum
    all-reduce; we multiply the loss by num_microbatches * dp beforehand, so the gradient is exactly
    the single-process full-batch gradient.

Padded vocabulary columns (Megatron pads the vocab to split evenly over TP ranks) are already
set to a large negative logit by the output-layer hook of parallel.models.build_gpt_model, so the
vocab-parallel kernels see them with probability 0.

Layout contract for callers: every tensor- and pipeline-parallel rank of one data-parallel replica
passes the same batch; different DP replicas pass their own shard (`TrainBatch.shard`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

import kernels
from parallel.optim import optimizer_step
from parallel.state import nvtx_range

__all__ = ["TrainBatch", "logprobs", "train_step"]


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------

_OPTIONAL_VECTORS = ("old_logp", "ref_logp", "rollout_logp")


@dataclass
class TrainBatch:
    """Packed rows of sequences, every field [B, S] on the same positions.

    tokens        int64   input ids (pad_id on padding)
    position_ids  int64   0.. within each sequence (0 on padding)
    targets       int64   the next token of the same sequence, GLOBAL vocab ids (pad_id where masked)
    loss_mask     float32 1 where the target is a completion token
    advantages    float32 per-token advantage (0 where masked)
    seq_ids       int64   global index of the sequence a position belongs to; -1 on padding
    segment_ids   int64   index of the sequence within its row (0, 1, ...); -1 on padding
    old_logp, ref_logp, rollout_logp: float32 or None, log-probs of `targets` (0 where masked)
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    seq_ids: torch.Tensor
    segment_ids: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"TrainBatch.tokens must be [B, S], got shape {tuple(self.tokens.shape)}")
        for f in self._tensor_fields():
            value = getattr(self, f)
            if value is not None and value.shape != self.tokens.shape:
                raise ValueError(
                    f"TrainBatch.{f} has shape {tuple(value.shape)}, expected {tuple(self.tokens.shape)}"
                )

    # -- shape and plumbing ------------------------------------------------------------------

    @staticmethod
    def _tensor_fields() -> list[str]:
        return [f.name for f in dataclasses.fields(TrainBatch) if f.name != "pad_id"]

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def _map(self, fn) -> "TrainBatch":
        """A new batch with `fn` applied to every tensor field (None stays None)."""
        changes = {}
        for f in self._tensor_fields():
            value = getattr(self, f)
            changes[f] = None if value is None else fn(value)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "TrainBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def rows(self, index: torch.Tensor | slice | Sequence[int]) -> "TrainBatch":
        """The batch restricted to some rows."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._map(lambda t: t[index])

    def pad_rows(self, multiple: int) -> "TrainBatch":
        """Append empty rows (padding only, loss_mask 0) until the row count divides `multiple`."""
        if multiple < 1:
            raise ValueError(f"pad_rows: multiple must be >= 1, got {multiple}")
        missing = (-self.num_rows) % multiple
        if missing == 0:
            return self
        return TrainBatch.cat([self, TrainBatch.empty(missing, self.seq_len, pad_id=self.pad_id,
                                                      like=self)])

    @staticmethod
    def empty(num_rows: int, seq_len: int, *, pad_id: int = 0, like: "TrainBatch | None" = None
              ) -> "TrainBatch":
        """Rows of padding only (contribute nothing to any loss or count)."""
        device = like.device if like is not None else None
        shape = (num_rows, seq_len)
        zeros_f = lambda: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        minus1 = lambda: torch.full(shape, -1, dtype=torch.long, device=device)  # noqa: E731
        optional = {
            f: (zeros_f() if like is not None and getattr(like, f) is not None else None)
            for f in _OPTIONAL_VECTORS
        }
        return TrainBatch(
            tokens=torch.full(shape, pad_id, dtype=torch.long, device=device),
            position_ids=torch.zeros(shape, dtype=torch.long, device=device),
            targets=torch.full(shape, pad_id, dtype=torch.long, device=device),
            loss_mask=zeros_f(),
            advantages=zeros_f(),
            seq_ids=minus1(),
            segment_ids=minus1(),
            pad_id=pad_id,
            **optional,
        )

    @staticmethod
    def cat(batches: Sequence["TrainBatch"]) -> "TrainBatch":
        """Rows of several batches with the same sequence length, one after another."""
        if not batches:
            raise ValueError("TrainBatch.cat needs at least one batch")
        first = batches[0]
        for i, b in enumerate(batches):
            if b.seq_len != first.seq_len:
                raise ValueError(
                    f"TrainBatch.cat: batch {i} has seq_len {b.seq_len}, batch 0 has {first.seq_len}"
                )
        changes = {}
        for f in TrainBatch._tensor_fields():
            values = [getattr(b, f) for b in batches]
            present = [v is not None for v in values]
            if all(present):
                changes[f] = torch.cat(values, dim=0)
            elif not any(present):
                changes[f] = None
            else:
                raise ValueError(f"TrainBatch.cat: field {f} is set in some batches and None in others")
        return dataclasses.replace(first, **changes)

    def split(self, num_microbatches: int) -> list["TrainBatch"]:
        """`num_microbatches` batches of equal row count (pad first with `pad_rows` if needed)."""
        if num_microbatches < 1:
            raise ValueError(f"split: num_microbatches must be >= 1, got {num_microbatches}")
        if self.num_rows % num_microbatches != 0:
            raise ValueError(
                f"split: {self.num_rows} rows do not divide into {num_microbatches} micro-batches; "
                f"call pad_rows({num_microbatches}) first"
            )
        size = self.num_rows // num_microbatches
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(num_microbatches)]

    def shard(self, rank: int, world_size: int) -> "TrainBatch":
        """This data-parallel rank's rows: every `world_size`-th row starting at `rank` (packing
        sorts rows longest first, so striding balances work), padded with empty rows so that all
        ranks hold the same number of rows."""
        if not 0 <= rank < world_size:
            raise ValueError(f"shard: rank {rank} is outside [0, {world_size})")
        padded = self.pad_rows(world_size)
        return padded.rows(list(range(rank, padded.num_rows, world_size)))

    def with_logprobs(
        self,
        *,
        old_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
    ) -> "TrainBatch":
        """A copy with log-prob vectors set, e.g. `batch.with_logprobs(old_logp=logprobs(policy,
        batch), ref_logp=logprobs(reference, batch))`. Values are zeroed where loss_mask is 0."""
        changes = {}
        for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp),
                            ("rollout_logp", rollout_logp)):
            if value is None:
                continue
            if value.shape != self.tokens.shape:
                raise ValueError(
                    f"with_logprobs: {name} has shape {tuple(value.shape)}, batch is {tuple(self.tokens.shape)}"
                )
            value = value.detach().to(device=self.device, dtype=torch.float32)
            changes[name] = torch.where(self.loss_mask > 0, value, torch.zeros_like(value))
        return dataclasses.replace(self, **changes)

    # -- per-sequence views --------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences with at least one loss token (rows may hold several; padding rows hold none). A fully
        masked sequence (an empty or a masked completion) counts for nothing, as in kernels.policy_loss."""
        return int(torch.unique(self.seq_ids[(self.seq_ids >= 0) & (self.loss_mask > 0)]).numel())

    def completion_values(self, values: torch.Tensor) -> dict[int, torch.Tensor]:
        """{global sequence id: values at that sequence's completion tokens, in order}, for a [B, S]
        tensor aligned with this batch (e.g. the output of `logprobs`)."""
        if values.shape[:2] != self.tokens.shape:
            raise ValueError(
                f"completion_values: values have shape {tuple(values.shape)}, batch is {tuple(self.tokens.shape)}"
            )
        keep = self.loss_mask > 0
        ids = self.seq_ids[keep]
        flat = values[keep]
        out = {}
        for sid in torch.unique(ids).tolist():
            out[int(sid)] = flat[ids == sid]
        return out

    def scatter_completion_values(
        self, values: dict[int, Sequence[float]] | Sequence[Sequence[float]]
    ) -> torch.Tensor:
        """The inverse of `completion_values`: a float32 [B, S] tensor with `values[i][j]` at the
        position that predicts completion token j of global sequence i (0 elsewhere). `values` is
        indexed by global sequence id (a list over all sequences, or a dict); sequences of this
        batch must all be present, with one value per completion token."""
        out = torch.zeros(self.tokens.shape, dtype=torch.float32, device=self.device)
        keep = self.loss_mask > 0
        ids = self.seq_ids[keep]
        flat = torch.zeros(ids.shape, dtype=torch.float32, device=self.device)
        for sid in torch.unique(ids).tolist():
            where = ids == sid
            try:
                row = values[sid]
            except (KeyError, IndexError):
                raise ValueError(f"scatter_completion_values: no values for sequence {sid}") from None
            row = torch.as_tensor(row, dtype=torch.float32, device=self.device).reshape(-1)
            if row.numel() != int(where.sum()):
                raise ValueError(f"scatter_completion_values: sequence {sid} has {int(where.sum())} "
                                 f"completion tokens but {row.numel()} values")
            flat[where] = row
        out[keep] = flat
        return out

    # -- attention -------------------------------------------------------------------------------

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, S, S] bool, True = masked out (Megatron's convention): position i sees j iff
        j <= i and both lie in the same sequence of the row. Padding is its own block, so no row
        of scores is fully masked."""
        seg = self.segment_ids
        same = seg.unsqueeze(2) == seg.unsqueeze(1)  # [B, S, S]
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=self.device).tril()
        return ~(same & causal).unsqueeze(1)

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Boundaries of every block (sequences, and each row's trailing padding) when the rows are
        laid end to end: int32 [num_blocks + 1] and the longest block, for `thd` attention."""
        seg = self.segment_ids
        # a block starts at position 0 of each row and wherever the segment id changes
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        start_pos = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
        total = seg.numel()
        bounds = torch.cat([start_pos, torch.tensor([total], device=seg.device)]).to(torch.int32)
        max_len = int((bounds[1:] - bounds[:-1]).max().item()) if total > 0 else 0
        return bounds, max_len

    # -- building ----------------------------------------------------------------------------------

    @staticmethod
    def from_sequences(
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        advantages: Sequence[float] | Sequence[Sequence[float]],
        rollout_logp: Sequence[Sequence[float]] | None = None,
        train_on: Sequence[bool] | None = None,
        pack: bool = True,
        max_tokens_per_row: int | None = None,
        pad_to_multiple_of: int = 1,
        pad_id: int = 0,
    ) -> "TrainBatch":
        """Build the rows from token lists.

        advantages: one float per sequence (broadcast to its completion tokens) or one list per
            sequence with one float per completion token.
        rollout_logp: one list per sequence with the rollout engine's log-prob of each completion
            token (optional).
        train_on: one bool per sequence; False keeps the sequence in the rows but gives it no loss
            tokens (e.g. DAPO's masking of truncated completions). Default: every sequence.
        pack: several sequences per row (first-fit, longest first) up to `max_tokens_per_row`
            (default: the longest sequence); pack=False puts one sequence per row, right-padded.
        pad_to_multiple_of: round the row length up (e.g. to the TP size for sequence parallelism).
        """
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"from_sequences: {n} prompts but {len(completions)} completions")
        if len(advantages) != n:
            raise ValueError(f"from_sequences: {n} sequences but {len(advantages)} advantages")
        if train_on is not None and len(train_on) != n:
            raise ValueError(f"from_sequences: {n} sequences but {len(train_on)} train_on flags")
        if rollout_logp is not None and len(rollout_logp) != n:
            raise ValueError(f"from_sequences: {n} sequences but {len(rollout_logp)} rollout_logp rows")
        if n == 0:
            raise ValueError("from_sequences: no sequences")
        if pad_to_multiple_of < 1:
            raise ValueError(f"from_sequences: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")

        lengths = []
        for i in range(n):
            if len(prompts[i]) == 0:
                raise ValueError(f"from_sequences: prompt {i} is empty (the first completion token "
                                 "needs a position that predicts it)")
            num_completion = len(completions[i])
            adv = advantages[i]
            if _is_per_token(adv) and len(adv) != num_completion:
                raise ValueError(f"from_sequences: sequence {i} has {num_completion} completion tokens "
                                 f"but {len(adv)} advantages")
            if rollout_logp is not None and len(rollout_logp[i]) != num_completion:
                raise ValueError(f"from_sequences: sequence {i} has {num_completion} completion tokens "
                                 f"but {len(rollout_logp[i])} rollout_logp values")
            lengths.append(len(prompts[i]) + num_completion)

        longest = max(lengths)
        if pack:
            capacity = max_tokens_per_row if max_tokens_per_row is not None else longest
            if capacity < longest:
                i = lengths.index(longest)
                raise ValueError(f"from_sequences: sequence {i} has {longest} tokens, more than "
                                 f"max_tokens_per_row={capacity}")
            rows = _first_fit_decreasing(lengths, capacity)
        else:
            if max_tokens_per_row is not None and longest > max_tokens_per_row:
                i = lengths.index(longest)
                raise ValueError(f"from_sequences: sequence {i} has {longest} tokens, more than "
                                 f"max_tokens_per_row={max_tokens_per_row}")
            rows = [[i] for i in range(n)]
        seq_len = max(sum(lengths[i] for i in row) for row in rows)
        seq_len = math.ceil(seq_len / pad_to_multiple_of) * pad_to_multiple_of

        shape = (len(rows), seq_len)
        tokens = torch.full(shape, pad_id, dtype=torch.long)
        targets = torch.full(shape, pad_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.float32)
        adv_t = torch.zeros(shape, dtype=torch.float32)
        roll_t = torch.zeros(shape, dtype=torch.float32) if rollout_logp is not None else None
        seq_ids = torch.full(shape, -1, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)

        for r, row in enumerate(rows):
            offset = 0
            for segment, i in enumerate(row):
                prompt, completion = list(prompts[i]), list(completions[i])
                seq = torch.tensor(prompt + completion, dtype=torch.long)
                length, p, c = len(seq), len(prompt), len(completion)
                span = slice(offset, offset + length)
                tokens[r, span] = seq
                targets[r, offset:offset + length - 1] = seq[1:]
                position_ids[r, span] = torch.arange(length)
                seq_ids[r, span] = i
                segment_ids[r, span] = segment
                if c > 0 and (train_on is None or train_on[i]):
                    # completion token j sits at p + j and is predicted by position p + j - 1
                    pred = slice(offset + p - 1, offset + p - 1 + c)
                    loss_mask[r, pred] = 1.0
                    adv = advantages[i]
                    if _is_per_token(adv):
                        adv_t[r, pred] = torch.as_tensor(adv, dtype=torch.float32)
                    else:
                        adv_t[r, pred] = float(adv)
                    if roll_t is not None:
                        roll_t[r, pred] = torch.as_tensor(rollout_logp[i], dtype=torch.float32)
                offset += length
        return TrainBatch(
            tokens=tokens, position_ids=position_ids, targets=targets, loss_mask=loss_mask,
            advantages=adv_t, seq_ids=seq_ids, segment_ids=segment_ids, rollout_logp=roll_t,
            pad_id=pad_id,
        )


def _is_per_token(value: Any) -> bool:
    """A per-token list/array/tensor of advantages rather than one number per sequence."""
    return hasattr(value, "__len__") and not (torch.is_tensor(value) and value.dim() == 0)


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack sequence indices into rows of at most `capacity` tokens (longest first; ties keep
    the input order so the layout is deterministic)."""
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


# ---------------------------------------------------------------------------------------------
# Model plumbing shared by logprobs and train_step
# ---------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _uses_te_attention(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "TEDotProductAttention" for m in _unwrap(model).modules())


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _tp_group_and_vocab_start(local_vocab: int) -> tuple[Any, int]:
    from megatron.core import parallel_state as mpu

    tp_size = mpu.get_tensor_model_parallel_world_size()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    group = mpu.get_tensor_model_parallel_group() if tp_size > 1 else None
    return group, tp_rank * local_vocab


def _model_forward(model: torch.nn.Module, mb: TrainBatch, use_thd: bool) -> torch.Tensor:
    """One micro-batch through this pipeline stage. On the last stage: logits [b, S, V/tp]."""
    if use_thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, max_len = mb.cu_seqlens()
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
        out = model(mb.tokens.reshape(1, -1), mb.position_ids.reshape(1, -1), None,
                    packed_seq_params=params)
        if out.dim() == 3 and out.shape[0] == 1 and mb.num_rows > 1:  # logits [1, b*S, V]
            out = out.reshape(mb.num_rows, mb.seq_len, -1)
        return out
    return model(mb.tokens, mb.position_ids, mb.attention_mask())


def _schedule_shape(mb: TrainBatch, use_thd: bool) -> tuple[int, int]:
    """(seq_length, micro_batch_size) of the activations sent between pipeline stages."""
    if use_thd:
        return mb.num_rows * mb.seq_len, 1
    return mb.seq_len, mb.num_rows


def _check_config(model: torch.nn.Module) -> Any:
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError("parallel.step does not support context parallelism (context_parallel_size != 1)")
    if getattr(config, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("parallel.step does not support the interleaved (virtual) pipeline schedule")
    return config


def _pipeline_last_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_last_rank()


def _micro_batches(batch: TrainBatch, num_microbatches: int | None, micro_batch_size: int | None
                   ) -> tuple[list[TrainBatch], int]:
    """Split into equal micro-batches (padding with empty rows); returns them and the real row count."""
    if (num_microbatches is None) == (micro_batch_size is None):
        raise ValueError("give exactly one of num_microbatches and micro_batch_size")
    if batch.num_rows == 0:
        raise ValueError("the batch has no rows (shard() gives every DP rank at least one)")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        num_microbatches = math.ceil(batch.num_rows / micro_batch_size)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if num_microbatches > batch.num_rows:
        num_microbatches = batch.num_rows
    padded = batch.pad_rows(num_microbatches)
    return padded.split(num_microbatches), batch.num_rows


@dataclass
class _NvtxTimer:
    name: str

    def start(self, barrier: bool = False) -> None:
        torch.cuda.nvtx.range_push(self.name)

    def stop(self, barrier: bool = False) -> None:
        torch.cuda.nvtx.range_pop()


class _NvtxTimers:
    """Megatron's `config.timers` hook turned into NVTX ranges, so the forward and backward
    computations inside the pipeline schedule show up as "forward" / "backward" in Nsight."""

    _RENAME = {"forward-compute": "forward", "backward-compute": "backward"}

    def __call__(self, name: str, log_level: int | None = None) -> _NvtxTimer:
        return _NvtxTimer(self._RENAME.get(name, name))


def _install_nvtx_timers(config: Any) -> None:
    if torch.cuda.is_available() and config.timers is None:
        config.timers = _NvtxTimers()


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    num_microbatches: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[t] | tokens[:t+1]) / T for every position, fp32 [B, S] (0 where loss_mask is 0),
    and the entropy [B, S] if asked; the same values on every rank of this DP replica.

    Runs Megatron's forward-only pipeline schedule; the last stage reduces its vocab shard with the
    vocab-parallel `kernels.token_logprobs` (the vocabulary is never gathered) and broadcasts the
    result over the pipeline group. Works on a Megatron-DDP-wrapped or a bare GPTModel. Give one of
    micro_batch_size / num_microbatches (default: one micro-batch)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if micro_batch_size is None and num_microbatches is None:
        num_microbatches = 1
    with nvtx_range("logprobs"):
        config = _check_config(model)
        _install_nvtx_timers(config)
        use_thd = _uses_te_attention(model)
        batch = batch.to(_model_device(model))
        micro, real_rows = _micro_batches(batch, num_microbatches, micro_batch_size)
        stream = iter(micro)

        def collect(mb: TrainBatch, output: torch.Tensor, non_loss_data: bool = True):
            tp_group, vocab_start = _tp_group_and_vocab_start(output.shape[-1])
            result = kernels.token_logprobs(
                output, mb.targets, temperature, return_entropy=return_entropy,
                tp_group=tp_group, vocab_start=vocab_start,
            )
            logp, entropy = result if return_entropy else (result, None)
            keep = mb.loss_mask > 0
            logp = torch.where(keep, logp.float(), torch.zeros_like(logp, dtype=torch.float32))
            if entropy is not None:
                entropy = torch.where(keep, entropy.float(), torch.zeros_like(logp))
            return logp, entropy

        def forward_step(data_iterator: Iterator[TrainBatch], model_chunk: torch.nn.Module):
            mb = next(data_iterator)
            return _model_forward(model_chunk, mb, use_thd), partial(collect, mb)

        seq_length, mbs = _schedule_shape(micro[0], use_thd)
        was_training = model.training
        model.eval()
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=stream, model=[model],
                num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=mbs,
                forward_only=True, collect_non_loss_data=True,
            )
        finally:
            model.train(was_training)

        from megatron.core import parallel_state as mpu

        shape = (len(micro) * micro[0].num_rows, batch.seq_len)
        device = batch.device
        if mpu.is_pipeline_last_stage():
            logp = torch.cat([o[0] for o in outputs], dim=0)
            entropy = torch.cat([o[1] for o in outputs], dim=0) if return_entropy else None
        else:
            logp = torch.empty(shape, dtype=torch.float32, device=device)
            entropy = torch.empty(shape, dtype=torch.float32, device=device) if return_entropy else None
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            group, src = mpu.get_pipeline_model_parallel_group(), _pipeline_last_rank()
            logp = logp.contiguous()
            dist.broadcast(logp, src=src, group=group)
            if entropy is not None:
                entropy = entropy.contiguous()
                dist.broadcast(entropy, src=src, group=group)
        logp = logp[:real_rows]
        if return_entropy:
            return logp, entropy[:real_rows]
        return logp


# ---------------------------------------------------------------------------------------------
# train_step
# ---------------------------------------------------------------------------------------------


def _global_counts(batch: TrainBatch) -> tuple[int, int]:
    """(completion tokens, sequences with at least one completion token) over all DP ranks."""
    from megatron.core import parallel_state as mpu

    keep = batch.loss_mask > 0
    counts = torch.tensor(
        [float(keep.sum().item()), float(torch.unique(batch.seq_ids[keep]).numel())],
        dtype=torch.float64, device=batch.device,
    )
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(counts, group=mpu.get_data_parallel_group())
    return int(counts[0].item()), int(counts[1].item())


def train_step(
    model: torch.nn.Module,
    optimizer: Any,
    batch: TrainBatch,
    loss_config: "kernels.PolicyLossConfig",
    *,
    temperature: float = 1.0,
    num_microbatches: int = 1,
    grad_clip: float | None = None,
    fused_lm_head: bool = False,
) -> dict[str, float]:
    """One optimizer step of the policy loss on this DP rank's `batch`.

    fused_lm_head: the last stage's output layer is bypassed and `kernels.linear_policy_loss` runs the
    lm_head matmul fused with the loss, chunked over tokens, so the [b, S, V/tp] logits never exist
    (padded vocabulary rows of the weight are left out instead of masked).

    `model` is the Megatron-DDP-wrapped stage (parallel.optim.wrap_for_training) and `optimizer`
    the one from parallel.optim.build_optimizer. The gradient is the full-batch gradient of the
    loss over all DP ranks' batches (global token / sequence denominators), whatever the split into
    micro-batches and ranks. `grad_clip` overrides the optimizer's clip for this step (0 = none).

    Returns (same on every rank): "loss" (the full-batch loss), "grad_norm" (before clipping),
    "num_tokens", "num_sequences", "update_successful", and every metric of kernels.policy_loss
    averaged over all completion tokens of the step."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not hasattr(model, "zero_grad_buffer"):
        raise ValueError("train_step needs the model returned by parallel.optim.wrap_for_training "
                         "(Megatron DistributedDataParallel)")
    config = _check_config(model)
    if config.calculate_per_token_loss:
        raise ValueError("train_step normalises the loss itself; build the model with "
                         "calculate_per_token_loss=False")
    if getattr(loss_config, "beta", 0.0) and batch.ref_logp is None:
        raise ValueError(f"loss_config.beta={loss_config.beta} needs batch.ref_logp "
                         "(set it with batch.with_logprobs(ref_logp=...))")
    _install_nvtx_timers(config)
    use_thd = _uses_te_attention(model)
    batch = batch.to(_model_device(model))
    dp_size = mpu.get_data_parallel_world_size()

    micro, _ = _micro_batches(batch, num_microbatches, None)
    num_mb = len(micro)
    total_tokens, total_sequences = _global_counts(batch)
    # Megatron divides each micro-batch loss by num_mb and DDP averages gradients over dp ranks;
    # our losses are already divided by global counts, so undo both.
    undo_megatron_scaling = float(num_mb * dp_size)

    bypass = _LMHeadBypass(model) if fused_lm_head else contextlib.nullcontext()

    def loss_func(mb: TrainBatch, output: torch.Tensor):
        if fused_lm_head:  # output: hidden states [b, S, h]
            weight, tp_group, vocab_start = bypass.vocab_weight()
            loss, metrics = kernels.linear_policy_loss(
                output, weight, mb.targets,
                old_logp=mb.old_logp, ref_logp=mb.ref_logp, advantages=mb.advantages,
                mask=mb.loss_mask, config=loss_config, temperature=temperature,
                rollout_logp=mb.rollout_logp, seq_ids=mb.seq_ids,
                num_sequences=max(total_sequences, 1), num_tokens=max(total_tokens, 1),
                tp_group=tp_group, vocab_start=vocab_start,
            )
            return _loss_report(mb, loss, metrics, output.device, undo_megatron_scaling)
        tp_group, vocab_start = _tp_group_and_vocab_start(output.shape[-1])
        loss, metrics = kernels.policy_loss(
            output, mb.targets,
            old_logp=mb.old_logp, ref_logp=mb.ref_logp, advantages=mb.advantages,
            mask=mb.loss_mask, config=loss_config, temperature=temperature,
            rollout_logp=mb.rollout_logp, seq_ids=mb.seq_ids,
            num_sequences=max(total_sequences, 1), num_tokens=max(total_tokens, 1),
            tp_group=tp_group, vocab_start=vocab_start,
            # the logits are the output layer's fresh output, needed by nothing after the loss: the
            # gradient pass overwrites them instead of allocating a second [b, S, V/tp] buffer
            inplace_backward=True,
        )
        return _loss_report(mb, loss, metrics, output.device, undo_megatron_scaling)

    def forward_step(data_iterator: Iterator[TrainBatch], model_chunk: torch.nn.Module):
        mb = next(data_iterator)
        return _model_forward(model_chunk, mb, use_thd), partial(loss_func, mb)

    model.zero_grad_buffer()
    optimizer.zero_grad()
    seq_length, mbs = _schedule_shape(micro[0], use_thd)
    with nvtx_range("forward_backward"), bypass:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=num_mb, seq_length=seq_length, micro_batch_size=mbs,
            forward_only=False,
        )

    if total_tokens == 0:
        # no loss token anywhere (e.g. every completion truncated and masked): the gradient is zero, and an
        # Adam step would still move the weights (momentum, weight decay), so there is no step at all
        update_successful, grad_norm = False, 0.0
    else:
        with nvtx_range("optimizer_step"):
            update_successful, grad_norm = optimizer_step(optimizer, grad_clip)

    result = _reduce_step_metrics(outputs)
    result["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    result["update_successful"] = float(bool(update_successful))
    result["num_sequences"] = float(total_sequences)
    return result


def _loss_report(mb: TrainBatch, loss, metrics, device, scale: float):
    report = {k: (v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device))
              for k, v in metrics.items()}
    report["loss"] = loss.detach().float()
    report["num_tokens"] = mb.loss_mask.sum().float()
    return loss * scale, report


class _LMHeadBypass:
    """While active, the last stage's output layer returns its input (the final hidden states) and
    records the weight it would have multiplied them by (its own, or the tied embedding), so the loss
    can run lm_head + loss fused. Its forward hooks (the vocab-padding mask) are set aside meanwhile."""

    def __init__(self, model: torch.nn.Module):
        core = _unwrap(model)
        self.layer = core.output_layer if getattr(core, "post_process", False) else None
        self.info = getattr(core, "model_info", None)
        self.weight = None

    def __enter__(self):
        if self.layer is not None:
            self._hooks = dict(self.layer._forward_hooks)
            self.layer._forward_hooks.clear()

            def forward(input_, weight=None, runtime_gather_output=None, **_):
                self.weight = self.layer.weight if weight is None else weight
                return input_, None

            self.layer.forward = forward
        return self

    def __exit__(self, *exc):
        if self.layer is not None:
            del self.layer.forward  # the class's forward again
            self.layer._forward_hooks.update(self._hooks)
        return False

    def vocab_weight(self):
        """(this rank's weight rows of real vocabulary entries, tp group, their first global id)."""
        from megatron.core import parallel_state as mpu

        tp = mpu.get_tensor_model_parallel_world_size()
        rank = mpu.get_tensor_model_parallel_rank()
        local = self.weight.shape[0]
        start = rank * local
        valid = min(local, self.info.vocab_size - start) if self.info is not None else local
        if valid < 1:
            raise ValueError(f"fused_lm_head: tensor-parallel rank {rank} holds only vocabulary padding "
                             f"(vocab {self.info.vocab_size}, {local} rows a rank); use fewer TP ranks")
        group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
        return self.weight[:valid], group, start


def _reduce_step_metrics(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the loss and token-weight the metrics over micro-batches and DP ranks (last pipeline
    stage), then share the result with the other stages."""
    from megatron.core import parallel_state as mpu

    result: dict[str, float] | None = None
    if mpu.is_pipeline_last_stage():
        keys = sorted(k for k in outputs[0] if k not in ("loss", "num_tokens"))
        rows = []
        for out in outputs:
            n = out["num_tokens"].double()
            # a micro-batch of padding rows has no tokens (and NaN means): weight 0, value 0
            means = [torch.where(n > 0, out[k].double().mean() * n, torch.zeros_like(n)) for k in keys]
            rows.append(torch.stack([out["loss"].double(), n, *means]))
        sums = torch.stack(rows).sum(dim=0)  # one device tensor: a single sync below
        if mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(sums, group=mpu.get_data_parallel_group())
        sums = sums.cpu()
        total = float(sums[1])
        result = {"loss": float(sums[0]), "num_tokens": total}
        for j, k in enumerate(keys):
            result[k] = float(sums[2 + j]) / total if total > 0 else 0.0
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=_pipeline_last_rank(),
                                   group=mpu.get_pipeline_model_parallel_group())
        result = box[0]
    return result
