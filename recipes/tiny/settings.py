"""The embedded default's training settings (measured on 2 CPU cores): recipes/r1_zero.py runs them, and
recipes/eval.py reads where that run goes and its generation budget (without importing the trainer)."""
from __future__ import annotations

import dataclasses

from engine.config import GRPOConfig
from kernels import PolicyLossConfig

# 16 prompts x 8 samples a step
TINY_DEFAULT = dataclasses.replace(
    GRPOConfig(),
    rollout=dataclasses.replace(GRPOConfig().rollout, prompts_per_step=16, group_size=8, max_new_tokens=40),
    loss=PolicyLossConfig(beta=0.001),  # clip ranges: each loss's own (GRPO: TINY_GRPO_EPS_HIGH below)
    optim=dataclasses.replace(GRPOConfig().optim, lr=1e-4, warmup_steps=3),
    train=dataclasses.replace(GRPOConfig().train, steps=60, out="outputs/r1_zero_tiny", eval_samples=2, eval_every=20,
                              eval_temperature=0.6, eval_top_p=0.95),
)
TINY_GRPO_EPS_HIGH = 0.28
