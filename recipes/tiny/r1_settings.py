"""The embedded default of recipes/r1.py: the four stages on the tiny world (recipes/tiny/r1_world.py), sized for
2 CPU cores. Only what differs from each component's defaults is set here."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

from r1_engine.engine.config import GRPOConfig
from r1_engine.engine.model_eval import EvalSettings
from r1_engine.engine.rejection import RejectionConfig
from r1_engine.engine.reward_model_train import RewardModelTrainConfig
from r1_engine.engine.sft_config import SFTConfig
from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.recipes.tiny.r1_world import R1_TEMPLATE
from r1_engine.recipes.tiny.settings import TINY_GRPO_EPS_HIGH

MAX_NEW_TOKENS = 48  # a readable-format completion is ~35 tokens (a language-mixed one ~40)


def _sft(lr: float, epochs: int) -> SFTConfig:
    base = SFTConfig()
    return replace(base, optim=replace(base.optim, lr=lr, warmup_steps=5, min_lr_ratio=0.1),
                   train=replace(base.train, epochs=epochs, batch_size=32))


def _rl(steps: int, weights: dict[str, float], beta: float = 0.001) -> GRPOConfig:
    base = GRPOConfig()
    return replace(
        base,
        rollout=replace(base.rollout, prompts_per_step=16, group_size=8, max_new_tokens=MAX_NEW_TOKENS,
                        stop_strings=()),  # the readable format ends with the eos, not a closing tag
        reward=replace(base.reward, weights=weights),
        loss=PolicyLossConfig(beta=beta, eps_high=TINY_GRPO_EPS_HIGH),
        optim=replace(base.optim, lr=1e-4, warmup_steps=3),
        train=replace(base.train, steps=steps, eval_size=None),
    )


def tiny_r1():
    from r1_engine.recipes.r1_config import R1Config, R1Data

    return R1Config(
        data=R1Data(template=R1_TEMPLATE, rejection_prompts=400, general_fraction=0.25),
        out="outputs/r1_tiny",
        language_ablation=True,
        cold_start=_sft(lr=2e-3, epochs=10),
        # R1's stage 2: accuracy + format + language consistency, summed
        reasoning_rl=_rl(40, {"accuracy": 1.0, "format": 0.5, "language": 1.0}),
        rejection=RejectionConfig(samples_per_prompt=4, max_per_prompt=2, max_new_tokens=MAX_NEW_TOKENS),
        sft=_sft(lr=2e-3, epochs=8),
        reward_model=dataclasses.replace(RewardModelTrainConfig(), lr=1e-3, epochs=6),
        # stage 4 keeps a real KL to the stage-3 model (its reference): at 0.001 the policy over-optimised the
        # 540-pair reward model (its score rose while exact helpful answers fell 0.458 -> 0.347); at 0.05 they rose
        # to 0.833 with the same score gain (one seed, benchmarks/results/cpu-2core-embedded-defaults-2026-12-08.md)
        all_scenario_rl=_rl(30, {"accuracy": 1.0, "format": 0.5, "language": 1.0, "helpfulness": 1.0}, beta=0.05),
        eval=EvalSettings(samples=4, max_new_tokens=MAX_NEW_TOKENS, template=R1_TEMPLATE),
    )
