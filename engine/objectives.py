"""Every training objective as a loss function that `parallel.train_step` runs.

    metrics = train_step(model, optimizer, rows, policy_objective(cfg.loss, temperature), fused_lm_head=True)
    metrics = train_step(model, optimizer, pack_sequences(prompts, completions), sft_objective())   # SFT

An objective is `loss_fn(micro_batch, out) -> (loss, metrics)` (parallel.step.LossFn): it reads its per-token
vectors from the micro-batch's extras (engine.batch names them), calls one `kernels` op on the logits, or on
the hidden states and output weight when `out.fused` (the lm_head fused with the loss: no [tokens x vocab]
tensor), and divides by the step's global counts in `out` so the gradient does not depend on the split into
micro-batches and data-parallel ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1_engine.engine.batch import ADVANTAGES, LOGPROB_VECTORS, REF_LOGP
from r1_engine.kernels.linear_grpo import linear_policy_loss
from r1_engine.kernels.logits_loss import policy_loss
from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.parallel.rows import PackedRows
from r1_engine.parallel.step import LossFn, ModelOutput


def _run_kernel(mb: PackedRows, out: ModelOutput, config: PolicyLossConfig, temperature: float,
                vectors: dict[str, torch.Tensor | None]):
    """The one place where a micro-batch and a ModelOutput become a kernels call."""
    common = dict(config=config, temperature=temperature, mask=mb.loss_mask, seq_ids=mb.seq_ids,
                  num_sequences=out.num_sequences, num_tokens=out.num_tokens, tp_group=out.tp_group,
                  vocab_start=out.vocab_start, **vectors)
    if out.fused:
        return linear_policy_loss(out.hidden, out.weight, mb.targets, **common)
    # the logits are the output layer's fresh output, needed by nothing after the loss: the gradient pass
    # overwrites them instead of allocating a second [b, S, V/tp] buffer
    return policy_loss(out.logits, mb.targets, inplace_backward=True, **common)


def policy_objective(config: PolicyLossConfig, temperature: float = 1.0) -> LossFn:
    """The policy-loss family (GRPO, GSPO, CISPO, ... : config.name) on an RL batch (engine.batch.rl_rows):
    advantages, and old / reference / rollout log-probs where the loss needs them."""

    def loss_fn(mb: PackedRows, out: ModelOutput):
        if config.beta != 0.0 and REF_LOGP not in mb.extras:
            raise ValueError(f"loss.beta={config.beta} needs reference log-probs in the batch "
                             f"(engine.batch.with_logprobs(rows, ref_logp=...))")
        vectors = {name: mb.extras.get(name) for name in LOGPROB_VECTORS}
        return _run_kernel(mb, out, config, temperature, {"advantages": mb.extras[ADVANTAGES], **vectors})

    return loss_fn


# SFT as a member of the policy-loss family (GRPO_SPEC.md "The other objectives"): CISPO's loss_t = -sg(min(ratio,
# cap)) * A * logp with no old log-probs (ratio exactly 1, below any cap) and A = 1 is -logp; token-mean with the
# step's global token count gives -sum_t m_t logp_t / sum_t m_t. No KL, no entropy term, temperature 1.
_SFT_LOSS = PolicyLossConfig(name="cispo", aggregation="token-mean", beta=0.0, entropy_coef=0.0)


def sft_objective() -> LossFn:
    """Supervised fine-tuning: the mean negative log-likelihood of the loss positions (the completion tokens,
    engine.batch.pack_sequences) over the whole step, through the same kernels call as the policy losses, so the
    fused lm_head applies and no [tokens x vocab] tensor exists. train_step's "loss" is then the step's mean NLL;
    the metrics keep the entropy (the policy family's ratio / clip statistics are constant here)."""

    def loss_fn(mb: PackedRows, out: ModelOutput):
        # A = 1 on the loss positions: the loss mask itself (the kernels weight by the mask anyway)
        loss, metrics = _run_kernel(mb, out, _SFT_LOSS, 1.0, {"advantages": mb.loss_mask, "old_logp": None,
                                                              "ref_logp": None, "rollout_logp": None})
        return loss, {k: v for k, v in metrics.items() if k == "entropy"}

    return loss_fn


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model training (engine.reward_model_train): -mean log sigmoid(r_chosen - r_rejected) over preference
    pairs' scalar scores; logsigmoid keeps large margins of either sign finite."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"bradley_terry_loss: chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} "
                         f"scores differ in shape")
    return -F.logsigmoid(chosen - rejected).mean()
