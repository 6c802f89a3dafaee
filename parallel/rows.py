"""Packed rows: the model-only batch that `parallel.step` runs.

    PackedRows   [B, S] rows of token sequences, several sequences packed to a row without padding between them

Position t of a row predicts `targets[t]` (the next token of the same sequence); `loss_mask[t] = 1` where that
target is trained on. `seq_ids[t]` is the index of the sequence position t belongs to (-1 on padding): it is THE
name for "which sequence" everywhere (attention blocks, the kernels' sequence-level aggregations, per-sequence
values). Any other per-token tensor the caller needs (an objective's per-token weights, log-probs of other models, ...)
rides in `extras`: carried through `to`, `rows`, `split`, `shard` and padding (rows or columns) without being
interpreted here.
Building rows from token lists (packing) is the caller's business (engine.batch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["PackedRows"]

_CORE = ("tokens", "position_ids", "targets", "loss_mask", "seq_ids")


@dataclass
class PackedRows:
    """tokens int64 (pad_id on padding), position_ids int64 (restart at 0 per sequence), targets int64 (global
    vocabulary ids; pad_id where not trained), loss_mask float32, seq_ids int64 (-1 on padding): all [B, S].
    extras: name -> [B, S, ...] tensor (per-token vectors; trailing dims for per-token records such as a MoE
    rollout's routed experts [B, S, layers, k]), 0 on padding rows added by `pad_rows`."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    seq_ids: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"PackedRows.tokens must be [B, S], got shape {tuple(self.tokens.shape)}")
        for name, value in self._tensors().items():
            if value.shape[:2] != self.tokens.shape or (name in _CORE and value.dim() != 2):
                raise ValueError(f"PackedRows.{name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.tokens.shape)}")

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**{f: getattr(self, f) for f in _CORE}, **{f"extras[{k!r}]": v for k, v in self.extras.items()}}

    # -- shape and plumbing ----------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def map(self, fn) -> "PackedRows":
        """A new PackedRows with `fn` applied to every tensor (core fields and extras)."""
        return dataclasses.replace(self, **{f: fn(getattr(self, f)) for f in _CORE},
                                   extras={k: fn(v) for k, v in self.extras.items()})

    def with_extras(self, **tensors: torch.Tensor | None) -> "PackedRows":
        """A copy with these extras set (None removes one)."""
        extras = dict(self.extras)
        for name, value in tensors.items():
            if value is None:
                extras.pop(name, None)
            else:
                extras[name] = value
        return dataclasses.replace(self, extras=extras)

    def to(self, device: torch.device | str) -> "PackedRows":
        return self.map(lambda t: t.to(device, non_blocking=True))

    def rows(self, index: torch.Tensor | slice | Sequence[int]) -> "PackedRows":
        """The rows selected by `index`."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self.map(lambda t: t[index])

    @staticmethod
    def empty(num_rows: int, seq_len: int, *, pad_id: int = 0, like: "PackedRows | None" = None) -> "PackedRows":
        """Rows of padding only (no loss token), with zero extras of `like`'s names and dtypes."""
        device = like.device if like is not None else None
        shape = (num_rows, seq_len)
        extras = {k: torch.zeros(shape + tuple(v.shape[2:]), dtype=v.dtype, device=device)
                  for k, v in (like.extras if like else {}).items()}
        return PackedRows(
            tokens=torch.full(shape, pad_id, dtype=torch.long, device=device),
            position_ids=torch.zeros(shape, dtype=torch.long, device=device),
            targets=torch.full(shape, pad_id, dtype=torch.long, device=device),
            loss_mask=torch.zeros(shape, dtype=torch.float32, device=device),
            seq_ids=torch.full(shape, -1, dtype=torch.long, device=device),
            extras=extras, pad_id=pad_id)

    @staticmethod
    def cat(parts: Sequence["PackedRows"]) -> "PackedRows":
        """Rows of several PackedRows with one sequence length and the same extras, one after another."""
        if not parts:
            raise ValueError("PackedRows.cat needs at least one part")
        first = parts[0]
        for i, p in enumerate(parts):
            if p.seq_len != first.seq_len:
                raise ValueError(f"PackedRows.cat: part {i} has seq_len {p.seq_len}, part 0 has {first.seq_len}")
            if set(p.extras) != set(first.extras):
                raise ValueError(f"PackedRows.cat: part {i} has extras {sorted(p.extras)}, part 0 has "
                                 f"{sorted(first.extras)}")
        return dataclasses.replace(
            first, **{f: torch.cat([getattr(p, f) for p in parts]) for f in _CORE},
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras})

    def pad_rows(self, multiple: int) -> "PackedRows":
        """Append padding rows until the row count divides `multiple`."""
        if multiple < 1:
            raise ValueError(f"pad_rows: multiple must be >= 1, got {multiple}")
        missing = (-self.num_rows) % multiple
        if missing == 0:
            return self
        return PackedRows.cat([self, PackedRows.empty(missing, self.seq_len, pad_id=self.pad_id, like=self)])

    def pad_columns(self, multiple: int) -> "PackedRows":
        """Append padding positions to every row until the row length divides `multiple` (seq id -1, no loss, 0 in
        extras): after a row's last position, so causal attention keeps them out of every real position."""
        if multiple < 1:
            raise ValueError(f"pad_columns: multiple must be >= 1, got {multiple}")
        missing = (-self.seq_len) % multiple
        if missing == 0:
            return self
        tail = PackedRows.empty(self.num_rows, missing, pad_id=self.pad_id, like=self)
        return dataclasses.replace(
            self, **{f: torch.cat([getattr(self, f), getattr(tail, f)], dim=1) for f in _CORE},
            extras={k: torch.cat([v, tail.extras[k]], dim=1) for k, v in self.extras.items()})

    def split(self, num_microbatches: int) -> list["PackedRows"]:
        """`num_microbatches` parts of equal row count (pad first with `pad_rows` if needed)."""
        if num_microbatches < 1:
            raise ValueError(f"split: num_microbatches must be >= 1, got {num_microbatches}")
        if self.num_rows % num_microbatches != 0:
            raise ValueError(f"split: {self.num_rows} rows do not divide into {num_microbatches} micro-batches; "
                             f"call pad_rows({num_microbatches}) first")
        size = self.num_rows // num_microbatches
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(num_microbatches)]

    def shard(self, rank: int, world_size: int) -> "PackedRows":
        """This data-parallel rank's rows: every `world_size`-th row from `rank` (packing puts the longest rows
        first, so striding balances work), padded so that every rank holds the same number of rows."""
        if not 0 <= rank < world_size:
            raise ValueError(f"shard: rank {rank} is outside [0, {world_size})")
        padded = self.pad_rows(world_size)
        return padded.rows(list(range(rank, padded.num_rows, world_size)))

    # -- per-sequence views ----------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences with at least one loss token (a fully masked sequence counts for nothing, as in the kernels'
        sequence-level aggregations). Host sync: not for the hot path."""
        return int(torch.unique(self.seq_ids[(self.seq_ids >= 0) & (self.loss_mask > 0)]).numel())

    def completion_values(self, values: torch.Tensor) -> dict[int, torch.Tensor]:
        """{sequence id: values at that sequence's loss positions, in order} for a [B, S] tensor on these rows."""
        if values.shape[:2] != self.tokens.shape:
            raise ValueError(f"completion_values: values have shape {tuple(values.shape)}, rows are "
                             f"{tuple(self.tokens.shape)}")
        keep = self.loss_mask > 0
        ids, flat = self.seq_ids[keep], values[keep]
        return {int(sid): flat[ids == sid] for sid in torch.unique(ids).tolist()}

    def scatter_completion_values(self, values: dict[int, Sequence[float]] | Sequence[Sequence[float]]
                                  ) -> torch.Tensor:
        """The inverse of `completion_values`: float32 [B, S] with values[i][j] at loss position j of sequence i (0
        elsewhere). `values` is indexed by sequence id; every sequence with loss positions needs one value each."""
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
                raise ValueError(f"scatter_completion_values: sequence {sid} has {int(where.sum())} completion "
                                 f"tokens but {row.numel()} values")
            flat[where] = row
        out[keep] = flat
        return out

    # -- attention -------------------------------------------------------------------------------

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, S, S] bool, True = masked out (Megatron's convention): position i sees j iff j <= i and both
        belong to the same sequence. A row's trailing padding (seq id -1) is one block of its own, so no row of
        scores is fully masked."""
        same = self.seq_ids.unsqueeze(2) == self.seq_ids.unsqueeze(1)  # [B, S, S]
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=self.device).tril()
        return ~(same & causal).unsqueeze(1)

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Boundaries of every block (sequences, and each row's trailing padding) with the rows laid end to end:
        int32 [num_blocks + 1] and the longest block, for `thd` attention."""
        ids = self.seq_ids
        starts = torch.ones_like(ids, dtype=torch.bool)  # a block starts at each row's start and at each change
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        start_pos = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
        total = ids.numel()
        bounds = torch.cat([start_pos, torch.tensor([total], device=ids.device)]).to(torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max().item()) if total > 0 else 0
        return bounds, longest
