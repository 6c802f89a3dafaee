"""lm_head fused with the policy loss, chunked over tokens: the [N, V] logits never exist at once.

For each chunk of C tokens: logits_c = hidden_c @ W^T (the input dtype, e.g. bf16, [C, V(/tp)]),
the statistics pass, the loss on the chunk's [C] vectors, the gradient pass written in place over
logits_c, then dhidden_c = dlogits_c @ W and dW += dlogits_c^T @ hidden_c. So peak extra memory is
O(C x V) and the matmul work is the bare lm_head's forward + backward (three GEMMs of N x V x H; two with a
frozen weight or frozen hidden states: the gradient nothing needs is never computed).
That one-sweep order needs dL/dlogp_t from token t alone, which holds for token-separable losses
(GRPO, CISPO, the rollout corrections) once the aggregation weights are fixed from the mask. GSPO
couples a sequence's tokens through its ratio, so it takes two sweeps: statistics for every chunk,
the loss on all vectors, then the logits are recomputed chunk by chunk for the gradient pass.

Gradients are computed inside forward (the loss is the final scalar); backward only scales the
[N, H] and [V, H] results by grad_output, in place (so one backward per call). Under vocab-parallel TP
the weight is a vocab shard, the
chunk statistics are all-gathered across the group, dW stays local, and dhidden (a partial sum over
the shard's vocabulary) is all-reduced once at the end, as Megatron's column-parallel backward does.
dW is accumulated with addmm in the weight's dtype (fp32 accumulate inside each GEMM).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .logprobs import (grad_torch, grad_triton, stats_torch, stats_triton, use_triton, combine_stats,
                       owned_targets, validate_targets)
from .loss_family import (MetricSums, PolicyLossConfig, aggregation_weights, prepare_inputs, token_losses)
from .nvtx import nvtx_range

# bytes of one chunk's logits: small enough to stay << N x V, large enough for fast GEMMs. A GPU keeps the logits
# of 1,765 bf16 rows at V = 151,936; a CPU (its passes add ~2 blocks of 16 MB, kernels/logprobs.py) 441 fp32 rows:
# at N = 4,096, H = 896, fp32 the op's peak extra memory, dW included, measured 820 MiB, 0.115x the eager path's
CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 256 << 20}


def default_chunk_size(n_tokens: int, vocab: int, element_size: int = 2, budget_bytes: int = CHUNK_BYTES["cuda"]
                       ) -> int:
    """Tokens a chunk: the fewest equal chunks whose [C, vocab] logits (element_size bytes each) fit the budget."""
    chunks = max(1, math.ceil(n_tokens * vocab * element_size / budget_bytes))
    return max(1, math.ceil(n_tokens / chunks))


def _chunk_loss(logp, entropy, inp, cfg, w, acc: MetricSums):
    """Loss of one chunk, with (dL/dlogp, dL/dH) from autograd on its [C] vectors."""
    with nvtx_range("loss"):
        return _chunk_loss_grads(logp, entropy, inp, cfg, w, acc)


def _chunk_loss_grads(logp, entropy, inp, cfg, w, acc: MetricSums):
    logp = logp.detach().requires_grad_(True)
    entropy = entropy.detach().requires_grad_(cfg.needs_entropy_grad)
    with torch.enable_grad():
        loss_t, stats = token_losses(logp, entropy, inp, cfg)
        loss = (loss_t * w).sum()
        wrt = [logp, entropy] if cfg.needs_entropy_grad else [logp]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    acc.add(stats, inp.mask)
    g = grads[0] if grads[0] is not None else torch.zeros_like(logp)
    h = grads[1] if cfg.needs_entropy_grad else None
    return loss.detach(), g.detach().contiguous(), None if h is None else h.detach().contiguous()


class LinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, targets, inputs, config, temperature, num_sequences, num_tokens,
                tp_group, vocab_start, chunk_size, metrics_out: dict):
        n, v_local = hidden2d.shape[0], weight.shape[0]
        inv_temp = 1.0 / float(temperature)
        triton_ok = use_triton(hidden2d)
        stats_fn = stats_triton if triton_ok else stats_torch
        grad_fn = grad_triton if triton_ok else grad_torch
        budget = CHUNK_BYTES["cuda" if hidden2d.is_cuda else "cpu"]
        chunk = chunk_size or default_chunk_size(n, v_local, hidden2d.element_size(), budget)
        # a frozen lm_head (or frozen hidden states) gets no gradient GEMM: 2 of the 3 GEMMs of N x V x H
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_dh or need_dw
        # no memsets: every chunk writes its rows of dhidden, and the first chunk writes dW (mm, then addmm)
        grad_hidden = grad_weight = None
        if need_dh:
            grad_hidden = torch.empty_like(hidden2d) if n else torch.zeros_like(hidden2d)
        if need_dw:
            grad_weight = torch.empty_like(weight) if n else torch.zeros_like(weight)
        w = aggregation_weights(inputs, config, num_sequences=num_sequences, num_tokens=num_tokens)
        acc = MetricSums()
        loss = hidden2d.new_zeros((), dtype=torch.float32)

        def logits_of(sl):
            if v_local % 16 == 0:
                return hidden2d[sl] @ weight.t()
            # a vocabulary shard that is not a multiple of 16 (real rows of a padded vocab): rows of a wider
            # buffer keep every row 16-byte aligned, so the passes' full blocks stay vector loads/stores
            buf = torch.empty(sl.stop - sl.start, -(-v_local // 64) * 64, dtype=hidden2d.dtype, device=hidden2d.device)
            return torch.mm(hidden2d[sl], weight.t(), out=buf[:, :v_local])

        def backprop_chunk(sl, logits_c, lse_parts, ent, g, h):
            with nvtx_range("gradient"):  # the gradient pass and the dhidden / dW GEMMs
                backprop_chunk_(sl, logits_c, lse_parts, ent, g, h)

        def backprop_chunk_(sl, logits_c, lse_parts, ent, g, h):
            grad_fn(logits_c, logits_c, targets[sl], lse_parts, ent, g, h, vocab_start, inv_temp)  # in place
            if need_dh:
                torch.mm(logits_c, weight, out=grad_hidden[sl])
            if not need_dw:
                return
            if sl.start == 0:  # the first chunk writes dW, the others accumulate
                torch.mm(logits_c.t(), hidden2d[sl], out=grad_weight)
            else:
                grad_weight.addmm_(logits_c.t(), hidden2d[sl])

        def stats_of(sl, logits_c):
            owned = owned_targets(targets[sl], vocab_start, v_local) if tp_group is not None else None
            with nvtx_range("statistics"):
                return combine_stats(stats_fn(logits_c, targets[sl], vocab_start, inv_temp), tp_group, owned)

        slices = [slice(a, min(n, a + chunk)) for a in range(0, n, chunk)]
        if config.token_separable:
            for sl in slices:
                with nvtx_range("lm_head_chunk"):
                    logits_c = logits_of(sl)
                    logp, ent, lse_parts = stats_of(sl, logits_c)
                    loss_c, g, h = _chunk_loss(logp, ent, inputs.chunk(sl), config, w[sl], acc)
                    loss += loss_c
                    if need_grad:
                        backprop_chunk(sl, logits_c, lse_parts, ent, g, h)
                    del logits_c
        else:
            parts = []
            for sl in slices:  # sweep 1: statistics only
                with nvtx_range("lm_head_chunk"):
                    parts.append(stats_of(sl, logits_of(sl)))
            logp, ent, lse_parts = (torch.cat(p, dim=-1) for p in zip(*parts))
            loss, g, h = _chunk_loss(logp, ent, inputs, config, w, acc)
            if need_grad:
                for sl in slices:  # sweep 2: recompute the logits for the gradient pass
                    with nvtx_range("lm_head_chunk"):
                        backprop_chunk(sl, logits_of(sl), lse_parts[:, sl], ent[sl], g[sl],
                                       None if h is None else h[sl])
        if need_dh and tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(grad_hidden, group=tp_group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        metrics_out.update(acc.means())
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("linear_policy_loss: a second backward through the same call is not supported "
                               "(its gradients are scaled in place); call the loss again instead")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # scaled in place: a copy of dW ([V, H], ~1 GB at 7B) would be the largest allocation of the op
        gh = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_output.to(grad_weight.dtype)) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, old_logp, ref_logp,
                       advantages, mask, config: PolicyLossConfig, temperature: float = 1.0, rollout_logp=None,
                       seq_ids=None, num_sequences=None, num_tokens=None, tp_group=None, vocab_start=None,
                       chunk_size: int | None = None):
    """The policy loss of `hidden @ weight.T` without materialising the logits. hidden [..., H], weight [V(/tp), H].

    Returns (loss, metrics) like `policy_loss`; gradients flow to hidden and weight, and only to those that
    require one (a frozen weight costs no dW GEMM)."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match: "
                         f"expected hidden [..., H] and weight [V, H]")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
                         f"must share dtype and device")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    config = config.resolved()
    shape = hidden.shape[:-1]
    targets1d, vocab_start = validate_targets(targets, shape, weight.shape[0], hidden.device, tp_group, vocab_start)
    inputs = prepare_inputs(shape, hidden.device, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                            mask=mask, seq_ids=seq_ids, rollout_logp=rollout_logp, config=config)
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    metrics: dict = {}
    loss = LinearPolicyLossFunction.apply(hidden2d, weight, targets1d, inputs, config, float(temperature),
                                          num_sequences, num_tokens, tp_group, vocab_start, chunk_size, metrics)
    return loss, metrics


def linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2,
                     dual_clip_c=None, beta=0.0, kl="k3", temperature=1.0, entropy_coef=0.0, rollout_logp=None,
                     tis_cap=None, aggregation="seq-mean-token-mean", max_len=None, seq_ids=None, num_sequences=None,
                     num_tokens=None, tp_group=None, vocab_start=None, chunk_size=None):
    """`grpo_loss` of `hidden @ weight.T`, chunked over tokens (see the module docstring)."""
    config = PolicyLossConfig(name="grpo", eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, beta=beta,
                              kl=kl, entropy_coef=entropy_coef, aggregation=aggregation, max_len=max_len,
                              tis_cap=tis_cap)
    return linear_policy_loss(hidden, weight, targets, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                              mask=mask, config=config, temperature=temperature, rollout_logp=rollout_logp,
                              seq_ids=seq_ids, num_sequences=num_sequences, num_tokens=num_tokens, tp_group=tp_group,
                              vocab_start=vocab_start, chunk_size=chunk_size)
