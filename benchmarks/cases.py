"""Benchmark sizes, GRPO settings and random inputs, in the [B, L] layout every implementation accepts.

The old/ref log-prob vectors are the spec's log-probs (kernels/reference.py) of the case's own logits plus
noise, computed a block of rows at a time so that no [N, V] fp32 tensor exists at benchmark sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from r1_engine.kernels.reference import token_logprobs_ref


@dataclass(frozen=True)
class Sizes:
    batch: int  # sequences B
    seq_len: int  # tokens per sequence L
    vocab: int  # V
    hidden: int  # H (lm_head input width)

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq_len


# CI on CPU (Triton interpreter): tiny. GPU: 16K tokens, Qwen2.5-7B's vocabulary and hidden size.
CPU_SIZES = Sizes(batch=4, seq_len=16, vocab=1000, hidden=64)
GPU_SIZES = Sizes(batch=16, seq_len=1024, vocab=151_936, hidden=3_584)


@dataclass(frozen=True)
class LossSettings:
    """GRPO hyper-parameters shared by every implementation (k3 KL, seq-mean-token-mean)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.04
    temperature: float = 1.0


@dataclass
class LossCase:
    """Inputs of a loss on logits, in the [B, L] layout every implementation accepts."""

    logits: torch.Tensor  # [B, L, V]
    targets: torch.Tensor  # [B, L] int64
    old_logp: torch.Tensor  # [B, L] fp32
    ref_logp: torch.Tensor  # [B, L] fp32
    advantages: torch.Tensor  # [B] fp32 (one per sequence)
    mask: torch.Tensor  # [B, L] fp32, every row has at least one token
    token_weights: torch.Tensor  # [B, L] fp32: dL/dlogp of the token_logprobs backward benchmark
    adv_tokens: torch.Tensor = field(init=False)  # [B, L] the advantages broadcast to tokens

    def __post_init__(self):
        self.adv_tokens = self.advantages[:, None].expand_as(self.mask).contiguous()

    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(self.logits.shape)


@dataclass
class LinearCase:
    """Inputs of a loss on hidden @ weight.T."""

    hidden: torch.Tensor  # [B, L, H]
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    adv_tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.adv_tokens = self.advantages[:, None].expand_as(self.mask).contiguous()


def input_dtype(case) -> torch.dtype:
    return case.hidden.dtype if isinstance(case, LinearCase) else case.logits.dtype


def _mask(batch, seq_len, full, generator, device):
    if full:
        return torch.ones(batch, seq_len, device=device)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator, device=device)
    return (torch.arange(seq_len, device=device)[None, :] < lengths[:, None]).float()


@torch.no_grad()
def logp_rows(logits_of_rows: Callable, n_rows: int, targets1d, temperature, chunk_rows=1024):
    """fp32 log-probs of logits_of_rows(a, b) (rows a..b-1 in any float dtype), a block of rows at a time:
    bounded memory, where one [N, V] fp32 tensor would be ~10 GB at benchmark sizes. Upcast first: the spec
    reference computes in its input's dtype, and bf16 log-probs would carry bf16 rounding."""
    out = torch.empty(n_rows, dtype=torch.float32, device=targets1d.device)
    for a in range(0, n_rows, chunk_rows):
        b = min(n_rows, a + chunk_rows)
        rows = logits_of_rows(a, b)
        out[a:b] = token_logprobs_ref(rows.to(torch.promote_types(rows.dtype, torch.float32)), targets1d[a:b],
                                      temperature)[0]
    return out


def _near(logp, noise, generator):
    # old/ref log-probs near the current ones: ratios fall on both sides of the clip range
    return (logp + noise * torch.randn(logp.shape, generator=generator, device=logp.device)).contiguous()


def make_loss_case(sizes: Sizes, dtype, device, *, seed=0, full_mask=True, scale=3.0, temperature=1.0) -> LossCase:
    """Fresh random logits (never zeros: they time faster and hide unwritten outputs) and matching vectors."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    b, l, v = sizes.batch, sizes.seq_len, sizes.vocab
    logits = torch.randn(b, l, v, generator=g, device=device, dtype=dtype).mul_(scale)
    targets = torch.randint(0, v, (b, l), generator=g, device=device)
    flat = logits.view(-1, v)
    logp = logp_rows(lambda a, c: flat[a:c], b * l, targets.view(-1), temperature).view(b, l)
    return LossCase(logits=logits, targets=targets, old_logp=_near(logp, 0.2, g), ref_logp=_near(logp, 0.2, g),
                    advantages=torch.randn(b, generator=g, device=device), mask=_mask(b, l, full_mask, g, device),
                    token_weights=torch.randn(b, l, generator=g, device=device))


def make_linear_case(sizes: Sizes, dtype, device, *, seed=0, full_mask=True, scale=3.0,
                     temperature=1.0) -> LinearCase:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    b, l, v, h = sizes.batch, sizes.seq_len, sizes.vocab, sizes.hidden
    hidden = torch.randn(b, l, h, generator=g, device=device, dtype=dtype)
    # logits = hidden @ weight.T then have standard deviation ~ scale
    weight = torch.randn(v, h, generator=g, device=device, dtype=dtype).mul_(scale / math.sqrt(h))
    targets = torch.randint(0, v, (b, l), generator=g, device=device)
    flat = hidden.view(-1, h)
    logp = logp_rows(lambda a, c: flat[a:c] @ weight.t(), b * l, targets.view(-1), temperature).view(b, l)
    return LinearCase(hidden=hidden, weight=weight, targets=targets, old_logp=_near(logp, 0.2, g),
                      ref_logp=_near(logp, 0.2, g), advantages=torch.randn(b, generator=g, device=device),
                      mask=_mask(b, l, full_mask, g, device))
