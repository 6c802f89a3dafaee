"""The GRPO loss (and its family) on logits: statistics pass -> loss on [N] vectors -> gradient pass.

Design choice (GRPO_SPEC.md lets the gradient pass run in forward, precomputed, or in backward):
we run it in backward. Both cost the same three passes over the logits in HBM (read in forward;
read + write in backward), but computing dL/dz in backward
  * folds the incoming grad_output into the per-token scales g_t, h_t (autograd does it on [N]
    vectors), so there is no fourth scaling pass and no host sync to test "grad_output == 1"
    (Megatron's schedule scales every micro-batch loss, so that test would usually fail anyway);
  * keeps forward-only calls (old/ref log-probs, evaluation, metrics) at one pass;
  * keeps memory flat with `inplace_backward=True`: the gradient overwrites the logits' buffer,
    exactly where a precomputed gradient would have been stored.
The loss itself is `loss_family.compute_policy_loss`, plain torch on [N] vectors, so GSPO, CISPO and
the rollout corrections run on the same two kernels.
"""
from __future__ import annotations

import torch

from .logprobs import token_logprobs
from .loss_family import PolicyLossConfig, compute_policy_loss, prepare_inputs
from .nvtx import nvtx_range


def policy_loss(logits: torch.Tensor, targets: torch.Tensor, *, old_logp, ref_logp, advantages, mask,
                config: PolicyLossConfig, temperature: float = 1.0, rollout_logp=None, seq_ids=None,
                num_sequences=None, num_tokens=None, tp_group=None, vocab_start=None,
                inplace_backward: bool = False, return_token_stats: bool = False):
    """Any loss of the family on logits [..., V(/tp)]; the per-token vectors have the logits' leading shape.

    `num_sequences` / `num_tokens` are global denominators (over data-parallel ranks and micro-batches):
    with them the loss is this shard's contribution, and summing over shards gives the full-batch loss.
    Returns (loss, metrics): metrics are token means over this call's masked tokens plus "num_tokens".
    seq_ids: which sequence each token belongs to; a sequence's tokens must be contiguous (a row of a
    [B, S] layout, or one packed segment of a row). None: each row of a 2-D layout is a sequence; a flat
    [N] layout without seq_ids is refused for sequence-level losses and aggregations (config.sequence_level).
    """
    config = config.resolved()
    shape = logits.shape[:-1]
    inputs = prepare_inputs(shape, logits.device, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                            mask=mask, seq_ids=seq_ids, rollout_logp=rollout_logp, config=config)
    logp, entropy = token_logprobs(logits, targets, temperature, return_entropy=True, tp_group=tp_group,
                                   vocab_start=vocab_start, inplace_backward=inplace_backward)
    if not config.needs_entropy_grad:
        entropy = entropy.detach()  # no entropy term in the gradient pass: it skips that work
    with nvtx_range("loss"):
        return compute_policy_loss(logp.reshape(-1), entropy.reshape(-1), inputs, config,
                                   num_sequences=num_sequences, num_tokens=num_tokens,
                                   return_token_stats=return_token_stats)


def grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2,
              dual_clip_c: float | None = None, beta: float = 0.0, kl: str = "k3", temperature: float = 1.0,
              entropy_coef: float = 0.0, rollout_logp=None, tis_cap: float | None = None,
              aggregation: str = "seq-mean-token-mean", max_len: int | None = None, seq_ids=None,
              num_sequences=None, num_tokens=None, tp_group=None, vocab_start=None, inplace_backward: bool = False,
              return_token_stats: bool = False):
    """GRPO_SPEC.md's clipped surrogate with KL to the reference (k1/k2/k3), dual clip, entropy bonus and TIS.

    old_logp=None means on-policy (ratio = exp(logp - sg(logp)) = 1 with the policy gradient).
    Returns (loss, metrics) with metrics: ratio, clip_low, clip_high (clip_dual), kl, entropy, and
    mismatch_abs / mismatch_out when rollout_logp is given.
    """
    config = PolicyLossConfig(name="grpo", eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, beta=beta,
                              kl=kl, entropy_coef=entropy_coef, aggregation=aggregation, max_len=max_len,
                              tis_cap=tis_cap)
    return policy_loss(logits, targets, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, mask=mask,
                       config=config, temperature=temperature, rollout_logp=rollout_logp, seq_ids=seq_ids,
                       num_sequences=num_sequences, num_tokens=num_tokens, tp_group=tp_group,
                       vocab_start=vocab_start, inplace_backward=inplace_backward,
                       return_token_stats=return_token_stats)
