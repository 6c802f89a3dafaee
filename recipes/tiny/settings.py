"""The embedded default's training settings (measured on 2 CPU cores): recipes/r1_zero.py runs them, and
recipes/eval.py reads where that run goes and its generation budget (without importing the trainer)."""
from __future__ import annotations

import dataclasses

from r1_engine.engine.config import GRPOConfig
from r1_engine.kernels.loss_family import PolicyLossConfig

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


def tiny_distill():
    """The embedded default of recipes/distill.py, sized for 2 CPU cores: the R1-Zero run above is the teacher,
    recipes/tiny/student the student. On-policy distillation and the GRPO baseline share the trainer settings
    except what each method needs: distillation takes no reference KL (the teacher is the anchor), GRPO keeps
    the run above's beta and clip-higher. One torch thread, and the GRPO baseline's budget in CPU seconds: on a
    shared 2-core box the load changes between phases, and wall times with it (up to 4x, measured)."""
    from r1_engine.engine.model_eval import EvalSettings
    from r1_engine.engine.rejection import RejectionConfig
    from r1_engine.engine.sft_config import SFTConfig
    from r1_engine.recipes.distill_config import DistillConfig

    rl = dataclasses.replace(TINY_DEFAULT, loss=PolicyLossConfig(beta=0.001, eps_high=TINY_GRPO_EPS_HIGH),
                             train=dataclasses.replace(TINY_DEFAULT.train, steps=1000, eval_every=0))
    onpolicy = dataclasses.replace(rl, loss=PolicyLossConfig(beta=0.0, eps_high=TINY_GRPO_EPS_HIGH),
                                   train=dataclasses.replace(rl.train, steps=40))
    sft = SFTConfig()
    budget = TINY_DEFAULT.rollout.max_new_tokens
    return DistillConfig(
        out="outputs/distill_tiny", offline_prompts=400, threads=1, baseline_clock="cpu",
        rejection=RejectionConfig(samples_per_prompt=4, max_per_prompt=2, max_new_tokens=budget,
                                  stop_strings=TINY_DEFAULT.rollout.stop_strings),
        sft=dataclasses.replace(sft, optim=dataclasses.replace(sft.optim, lr=1e-3, warmup_steps=3),
                                train=dataclasses.replace(sft.train, epochs=2, batch_size=32)),
        onpolicy=onpolicy, rl=rl,
        eval=EvalSettings(samples=4, max_new_tokens=budget, template="r1-zero"),
    )

# `--model.preset tiny-moe`: the same settings on the DeepSeek-V3-shaped base (recipes/tiny/moe_base), run here
TINY_MOE_OUT = "outputs/r1_zero_tiny_moe"
