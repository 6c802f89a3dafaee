"""The implementations ours is compared with: the eager trainer path, torch.compile of it, Liger-Kernel.

eager: what a typical trainer does (TRL's selective log-softmax): upcast the logits to fp32, divide by T,
log_softmax over V, gather; then GRPO_SPEC.md's clipped surrogate + beta * k3 KL (kernels/reference.kl_ref) on
[B, L], mean over tokens then sequences; autograd for the backward. It runs on the inputs in their own dtype
(bf16 on the GPU), so the upcast and every [N, V] fp32 temporary a trainer pays for are timed and measured.
It does not call reference.grpo_loss_ref: that function also computes the entropy (four more [N, V] tensors,
kept alive by a zero-weighted term) and aggregates with a Python loop over tokens (a host sync per token on
CUDA), which would time and measure a different program. bench_kernels.py pins this path to grpo_loss_ref.
"""
from __future__ import annotations

import functools
import importlib.metadata
from types import SimpleNamespace
from typing import Callable

import torch

from r1_engine.kernels.reference import kl_ref


class Unavailable(Exception):
    """An implementation that cannot run here (library not importable, compile off on CPU, no such mode)."""


# ------------------------------------------------------------------------------- the eager trainer path


def eager_token_logprobs(logits, targets, temperature: float = 1.0):
    """TRL-style selective log-softmax: upcast to (at least) fp32, divide by T, log_softmax over V, gather."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, eps_low: float, eps_high: float,
                    beta: float, temperature: float):
    """GRPO as a trainer writes it on [B, L]: clipped surrogate + beta * k3 KL, mean over tokens then sequences.
    advantages: [B], one per sequence."""
    logp = eager_token_logprobs(logits, targets, temperature)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    loss_t = -surrogate + beta * kl_ref(logp, ref_logp, "k3")
    # every benchmark row has a token; clamp only keeps an empty row from dividing by zero
    return ((loss_t * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def eager_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, eps_low: float,
                           eps_high: float, beta: float, temperature: float):
    logits = hidden @ weight.t()
    return eager_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta,
                           temperature)


_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable, device: torch.device, allow_on_cpu: bool = False) -> Callable:
    """torch.compile(fn), one compiled object per function (so repeated runners reuse its graphs)."""
    if device.type != "cuda" and not allow_on_cpu:
        raise Unavailable("torch.compile reference runs on CUDA only (on CPU it costs minutes of C++ builds)")
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


# ------------------------------------------------------------------------------------------ Liger-Kernel


@functools.lru_cache(maxsize=None)
def liger_status() -> SimpleNamespace:
    """Liger-Kernel's GRPO entry points, or the reason it cannot be used here (ok=False)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:  # ImportError, or a triton/torch API mismatch inside liger
        return SimpleNamespace(ok=False, reason=f"liger-kernel not importable: {type(exc).__name__}: {exc}")
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return SimpleNamespace(ok=True, version=version, triton_grpo_loss=triton_grpo_loss,
                           selective_log_softmax=fused_selective_log_softmax,
                           FusedLinearGRPOLoss=LigerFusedLinearGRPOLoss)


def liger_api():
    """Liger's entry points; Unavailable when it cannot run here."""
    status = liger_status()
    if not status.ok:
        raise Unavailable(status.reason)
    return status


def liger_logits(case):
    """Liger's logits-based GRPO reads [B, L+1, V] (the trainer's logits before dropping the last position);
    the first L positions hold our logits, so every implementation sees the same numbers.
    Returns the buffer and the function that restores it (Liger's backward overwrites it in place)."""
    b, l, v = case.logits.shape
    buf = torch.empty(b, l + 1, v, dtype=case.logits.dtype, device=case.logits.device)

    def restore():
        buf[:, :l].copy_(case.logits)
        buf[:, l].copy_(case.logits[:, -1])

    restore()
    return buf, restore
