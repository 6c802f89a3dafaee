"""Plain-torch references of every formula in GRPO_SPEC.md.

Written straight from the spec (log_softmax, gather, ratio, clip, KL), with python loops where that
makes a formula obvious, so they share no code with the fused path they check. Call them with
float64 inputs for test references. They materialise [N, V] tensors: never use them at scale.

Decisions the spec leaves open, taken here as in the kernels (kernels/loss_family.py):
  * a log-ratio x = logp - old (GSPO: its sequence mean; k3: ref - logp) enters exp() bounded to [-20, 20],
    with d exp / dx = exp(bounded x): the spec's gradient at the bounded ratio (e.g. -A e^20), never 0 or inf;
  * seq-mean-token-sum-norm needs max_len (L_max, a constant), and the sequence-level aggregations need
    seq_ids or a 2-D [B, T] layout: a flat vector is never silently one sequence.
"""
from __future__ import annotations

import math

import torch

MAX_LOG_RATIO = 20.0


def bounded_exp(x):
    """exp(x) with x bounded to [-MAX_LOG_RATIO, MAX_LOG_RATIO] in value; the derivative is the value."""
    xb = x.detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(xb) * (1.0 + (x - x.detach()))


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """(logp_t, H_t) with logp_t = z_t[y_t]/T - logsumexp(z_t/T) and H_t = lse - sum_j p_j z_j/T."""
    u = logits / temperature
    logp_all = torch.log_softmax(u, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # p * u with p = 0 and u = -inf is 0, not nan (and so is its gradient)
    pu = p * torch.where(p > 0, u, torch.zeros_like(u))
    entropy = torch.logsumexp(u, dim=-1) - pu.sum(-1)
    return logp, entropy


def kl_ref(logp, ref_logp, kind: str):
    d = ref_logp - logp
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":  # exp(d) - d - 1 with d bounded as the ratio: d/dlogp = exp(d_bounded) - 1
        db = d.detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO) + (d - d.detach())
        return bounded_exp(d) - db - 1
    raise ValueError(kind)


def _sequences(mask, seq_ids):
    """List of (sequence id, [positions]) for sequences with at least one masked token."""
    if seq_ids is None:  # a [B, S] layout: one sequence a row
        if mask.dim() < 2:
            raise ValueError("a flat token vector needs seq_ids for a sequence-level formula")
        rows = mask.shape[0]
        seq_ids = torch.arange(rows).repeat_interleave(mask.numel() // rows)
    mask = mask.reshape(-1)
    seq_ids = seq_ids.reshape(-1)
    out = {}
    for pos in range(mask.numel()):
        if mask[pos] != 0:
            out.setdefault(int(seq_ids[pos]), []).append(pos)
    return list(out.items())


def aggregate_ref(loss_t, mask, seq_ids, aggregation, num_sequences=None, num_tokens=None, max_len=None):
    """The three aggregations of GRPO_SPEC.md, summed the long way over sequences."""
    if aggregation == "token-mean":
        mask = mask.reshape(-1).to(loss_t.dtype)
        n_tok = num_tokens if num_tokens is not None else mask.sum()
        return (loss_t.reshape(-1) * mask).sum() / n_tok
    seqs = _sequences(mask, seq_ids)
    loss_t, mask = loss_t.reshape(-1), mask.reshape(-1).to(loss_t.dtype)
    n_seq = num_sequences if num_sequences is not None else len(seqs)
    if aggregation == "seq-mean-token-mean":
        total = loss_t.new_zeros(())
        for _, pos in seqs:
            idx = torch.tensor(pos)
            total = total + (loss_t[idx] * mask[idx]).sum() / mask[idx].sum()
        return total / n_seq
    if aggregation == "seq-mean-token-sum-norm":  # L_max: the generation budget, a constant
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len")
        return (loss_t * mask).sum() / (n_seq * max_len)
    raise ValueError(aggregation)


def grpo_loss_ref(logits, targets, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2,
                  dual_clip_c=None, beta=0.0, kl="k3", temperature=1.0, entropy_coef=0.0, rollout_logp=None,
                  tis_cap=None, token_mask_range=None, seq_mask_range=None, aggregation="seq-mean-token-mean",
                  seq_ids=None, num_sequences=None, num_tokens=None, max_len=None):
    """GRPO_SPEC.md's clipped surrogate + KL - entropy bonus, with the rollout corrections (TIS, token and
    sequence masking on exp(old - rollout)), aggregated. Returns the loss."""
    logp, ent = token_logprobs_ref(logits, targets, temperature)
    old = logp.detach() if old_logp is None else old_logp
    ratio = bounded_exp(logp - old)
    surr = torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    if dual_clip_c is not None:
        surr = torch.where(advantages < 0, torch.max(surr, dual_clip_c * advantages), surr)
    loss_t = -surr - entropy_coef * ent
    if beta != 0.0:
        loss_t = loss_t + beta * kl_ref(logp, ref_logp, kl)
    if tis_cap is not None:
        loss_t = loss_t * torch.clamp(torch.exp(old - rollout_logp), max=tis_cap).detach()
    if token_mask_range is not None:
        w = torch.exp(old - rollout_logp).detach()
        loss_t = loss_t * ((w >= token_mask_range[0]) & (w <= token_mask_range[1]))
    if seq_mask_range is not None:  # the geometric-mean ratio over each sequence's masked tokens
        keep = torch.ones(mask.numel(), dtype=loss_t.dtype)
        d = (old - rollout_logp).detach().reshape(-1)
        for _, pos in _sequences(mask, seq_ids):
            r = math.exp(sum(float(d[p]) for p in pos) / len(pos))
            if not seq_mask_range[0] <= r <= seq_mask_range[1]:
                keep[torch.tensor(pos)] = 0.0
        loss_t = loss_t * keep.view(loss_t.shape)
    return aggregate_ref(loss_t, mask, seq_ids, aggregation, num_sequences, num_tokens, max_len)


def gspo_loss_ref(logits, targets, old_logp, advantages, mask, *, eps_low=3e-4, eps_high=4e-4, temperature=1.0,
                  seq_ids=None, token_level=False, num_sequences=None):
    """GSPO: sequence ratio s_i = exp(mean_t(logp - old)); clipped surrogate on s_i; seq-mean-token-mean.

    token_level=True is GSPO-token: s_it = sg(s_i) * exp(logp_t - sg(logp_t)) per token."""
    logp, _ = token_logprobs_ref(logits, targets, temperature)
    seqs = _sequences(mask, seq_ids)
    logp, old, adv, m = logp.reshape(-1), old_logp.reshape(-1), advantages.reshape(-1), mask.reshape(-1)
    total = logp.new_zeros(())
    for _, pos in seqs:
        idx = torch.tensor(pos)
        s = bounded_exp(((logp[idx] - old[idx]) * m[idx]).sum() / m[idx].sum())
        a = adv[idx][0]
        if token_level:
            s_t = s.detach() * torch.exp(logp[idx] - logp[idx].detach())
            surr_t = torch.min(s_t * adv[idx], torch.clamp(s_t, 1 - eps_low, 1 + eps_high) * adv[idx])
            total = total + (-(surr_t * m[idx]).sum() / m[idx].sum())
        else:
            total = total - torch.min(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
    n = num_sequences if num_sequences is not None else len(seqs)
    return total / n


def cispo_loss_ref(logits, targets, old_logp, advantages, mask, *, eps_max=5.0, temperature=1.0, num_tokens=None):
    """CISPO: loss_t = -sg(min(ratio_t, eps_max)) * A * logp_t, token-mean."""
    logp, _ = token_logprobs_ref(logits, targets, temperature)
    ratio = torch.exp(logp - old_logp).detach()
    loss_t = -torch.clamp(ratio, max=eps_max) * advantages * logp
    n = num_tokens if num_tokens is not None else mask.sum()
    return (loss_t * mask).sum() / n


def group_advantages_ref(rewards, group_size: int, scale: str = "group", eps: float = 1e-6):
    """A_i = (r_i - mean_group) / (std_group + eps), the long way, one group at a time."""
    out = []
    flat = [float(r) for r in rewards]
    batch_std = torch.tensor(flat, dtype=torch.float64).std().item() if scale == "batch" else None
    for g in range(0, len(flat), group_size):
        grp = flat[g:g + group_size]
        mean = sum(grp) / len(grp)
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (len(grp) - 1))
        for r in grp:
            if scale == "none":
                out.append(r - mean)
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append((r - mean) / (std + eps))
    return torch.tensor(out, dtype=torch.float64)


def reverse_kl_distill_ref(logits, targets, teacher_logp, mask, *, temperature=1.0, seq_ids=None,
                           aggregation="token-mean", num_sequences=None, num_tokens=None):
    """Sample-based reverse KL(student || teacher) on the student's own tokens, written as a surrogate whose
    value is the KL estimate mean_t(logp_t - teacher_t) and whose gradient is (logp_t - teacher_t) grad logp_t:
        loss_t = sg(logp_t - teacher_t) * exp(logp_t - sg(logp_t))."""
    logp, _ = token_logprobs_ref(logits, targets, temperature)
    d = (logp - teacher_logp).detach()
    loss_t = d * torch.exp(logp - logp.detach())
    return aggregate_ref(loss_t, mask, seq_ids, aggregation, num_sequences, num_tokens)
