"""Group-relative advantages from outcome rewards (GRPO_SPEC.md, "Advantages"), plus DAPO's reward-side extras.

Rewards arrive flattened in prompt-major order, [num_groups * G] (completion i belongs to group i // G,
the layout of RolloutBatch), or already as [num_groups, G]. The result has the input's shape.

Which standard deviation: the unbiased one (Bessel's correction, divisor G - 1), i.e. torch.std's
default, which is what TRL's GRPOTrainer and verl's compute_grpo_outcome_advantage use. Pass
unbiased=False for the population std (divisor G). Computation is in float64, so groups whose rewards
are all equal give exactly 0 (they are also forced to 0, so no rounding residue survives).
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "none", "batch")
ESTIMATORS = ("grpo", "rloo")


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[num_groups, G] float64 view of the rewards, with checks."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not have group_size={group_size} columns")
    elif rewards.dim() == 1:
        if rewards.numel() % group_size != 0:
            raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of {group_size}")
    else:
        raise ValueError(f"rewards must be 1-D [num_groups*G] or 2-D [num_groups, G], got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError("rewards are empty")
    grouped = rewards.detach().to(torch.float64).reshape(-1, group_size)
    if not torch.isfinite(grouped).all():
        bad = (~torch.isfinite(grouped.reshape(-1))).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain NaN/inf at completion indices {bad[:10]}")
    return grouped


def group_advantages(
    rewards: Tensor, group_size: int, scale: str | None = None, eps: float = 1e-6, estimator: str = "grpo",
    unbiased: bool = True,
) -> Tensor:
    """Per-completion advantages.

    estimator="grpo": A_i = (r_i - mean_group) / (std + eps), where std depends on `scale`:
        "group" (GRPO, the default for grpo): std of the completion's own group;
        "batch": std of all rewards in the batch (the mean stays per group);
        "none"  (Dr. GRPO, the default for rloo): no division, A_i = r_i - mean_group.
    estimator="rloo": A_i = r_i - mean_{j != i} r_j  (= G/(G-1) * (r_i - mean_group)); with an explicit
        scale of "group"/"batch" it is divided by (std + eps) like GRPO.
    Groups whose rewards are all equal get exactly 0. Returns the input's shape, in the input's float
    dtype (float32 for integer/bool rewards).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    if scale is None:
        scale = "group" if estimator == "grpo" else "none"
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {SCALES}")
    grouped = _as_groups(rewards, group_size)

    mean = grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        advantages = grouped - mean
    else:
        if group_size < 2:
            raise ValueError("RLOO needs group_size >= 2 (the baseline is the mean of the other samples)")
        leave_one_out_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - leave_one_out_mean

    correction = 1 if unbiased else 0
    if scale == "group":
        # A group of one has no spread; its advantage is 0 below, so the NaN std is never used.
        std = grouped.std(dim=1, keepdim=True, correction=correction) if group_size > 1 else torch.zeros_like(mean)
        advantages = advantages / (std + eps)
    elif scale == "batch":
        std = grouped.std(correction=correction) if grouped.numel() > 1 else grouped.new_zeros(())
        advantages = advantages / (std + eps)

    uniform = grouped.amax(dim=1) == grouped.amin(dim=1)
    advantages[uniform] = 0.0

    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.reshape(rewards.shape).to(out_dtype)


def filter_uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: bool mask [num_groups], True for groups to keep (rewards not all equal).
    A group whose rewards are all equal has zero advantage and contributes no policy gradient."""
    grouped = _as_groups(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def overlong_penalty(lengths: Tensor | list[int], max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (added to the reward), with L_max = max_len, L_c = cache_len:
        0                               if L <= L_max - L_c
        ((L_max - L_c) - L) / L_c       if L_max - L_c < L <= L_max   (linear from 0 down to -1)
        -1                              if L > L_max
    Returns float32 [num_completions]."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if (lengths < 0).any():
        raise ValueError("overlong_penalty: negative completion length")
    soft_start = max_len - cache_len
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), (soft_start - lengths) / cache_len)
    penalty = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
    return penalty.to(torch.float32)
