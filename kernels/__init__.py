"""Fused GRPO kernels: token log-probs, the policy-loss family and lm_head-fused forms.

Plain tensors in, plain tensors out (and an optional torch.distributed group for vocab-parallel
tensor parallelism). Nothing here knows Megatron, the trainer or a config file.
"""
from .logits_loss import grpo_loss, policy_loss
from .linear_grpo import linear_grpo_loss, linear_policy_loss
from .logprobs import token_logprobs
from .loss_family import (AGGREGATIONS, KL_ESTIMATORS, LOSSES, PolicyLossConfig, compute_policy_loss,
                          distillation_advantages)

__all__ = [
    "token_logprobs", "grpo_loss", "policy_loss", "linear_grpo_loss", "linear_policy_loss", "PolicyLossConfig",
    "compute_policy_loss", "distillation_advantages", "LOSSES", "AGGREGATIONS", "KL_ESTIMATORS",
]
