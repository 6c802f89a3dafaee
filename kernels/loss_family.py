"""The policy-loss family on per-token vectors (step 2 of GRPO_SPEC.md's kernel split).

Every loss here is a function of length-N vectors (logp, entropy, old/ref/rollout log-probs,
advantages, mask, sequence ids); only logp and the entropy come from the [N, V] logits, through the
statistics pass in `logprobs.py`. Autograd over these vectors gives dL/dlogp_t and dL/dH_t, which
the gradient pass turns into dL/dz. So a new variant is a few lines of torch here, never a kernel.

A loss is *token-separable* when dL/dlogp_t depends on token t alone (GRPO, CISPO, the rollout
corrections): then `linear_grpo.py` can finish each chunk of tokens in one sweep. GSPO couples the
tokens of a sequence through its sequence ratio, so it needs all of a sequence's logp first.

Numerical bound (a decision GRPO_SPEC.md leaves open): every exp() of a log-ratio that carries a gradient (the
token ratio, GSPO's sequence ratio, k3's exp(ref - logp)) sees the log-ratio limited to +-20 in value, with the
gradient straight through: dL/dlogp is the spec's formula evaluated at the bounded ratio (e.g. -A * e^20 for a
token with A < 0 on the unclipped side at log-ratio 25), never 0 and never inf. A hard clamp would silently drop
exactly the tokens whose ratio exploded; no bound gives an inf loss at a gap above ~88 (fp32).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

LOSSES = ("grpo", "gspo", "gspo-token", "cispo")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# log-ratios are bounded to +-this before exp() (value only; see the module docstring)
_MAX_LOG_RATIO = 20.0
# each loss's own settings (GRPO_SPEC.md's loss family), used where a PolicyLossConfig field is left None;
# CISPO has no clip range (its cap is cispo_eps_max)
LOSS_DEFAULTS = {
    "grpo": dict(eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-mean"),
    "gspo": dict(eps_low=3e-4, eps_high=4e-4, aggregation="seq-mean-token-mean"),
    "gspo-token": dict(eps_low=3e-4, eps_high=4e-4, aggregation="seq-mean-token-mean"),
    "cispo": dict(eps_low=None, eps_high=None, aggregation="token-mean"),
}


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of the policy loss. eps_low, eps_high and aggregation left None take the chosen
    loss's own values (LOSS_DEFAULTS: grpo 0.2/0.2 seq-mean-token-mean as in DeepSeek-R1; gspo and gspo-token
    3e-4/4e-4 seq-mean-token-mean; cispo token-mean). They stay None in the config, so `--loss.name gspo` on a
    default config (CLI, YAML or dataclasses.replace) gets GSPO's values; `resolved()` fills them in."""

    name: Literal["grpo", "gspo", "gspo-token", "cispo"] = "grpo"
    """grpo: token ratio, clipped; gspo: sequence ratio (GSPO); gspo-token: GSPO's value with per-token
    gradients; cispo: clipped IS weight times logp, no token dropped."""
    eps_low: float | None = None
    """Lower clip range: ratio >= 1 - eps_low. None: the loss's own (grpo 0.2, gspo 3e-4; cispo has none)."""
    eps_high: float | None = None
    """Upper clip range: ratio <= 1 + eps_high (DAPO's clip-higher: 0.28). None: the loss's own (grpo 0.2,
    gspo 4e-4)."""
    dual_clip_c: float | None = None
    """Dual clip for A < 0: the loss is capped at c * |A| (e.g. 3.0; must be > 1)."""
    beta: float = 0.0
    """KL coefficient to the frozen reference policy (0 builds no reference model)."""
    kl: Literal["k1", "k2", "k3"] = "k3"
    """KL(pi || pi_ref) estimator per token, with log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2,
    k3 = r - 1 - log r (R1's choice)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * H (0: the entropy's gradient is never computed)."""
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] | None = None
    """How token losses become one number: mean over sequences of their token means (GRPO), mean over all
    tokens (DAPO), or sequence sums over a constant L_max (Dr. GRPO). None: the loss's own (token-mean for
    cispo, seq-mean-token-mean otherwise)."""
    max_len: int | None = None
    """L_max of seq-mean-token-sum-norm, a constant the kernels require (a training run's None: the generation
    budget, rollout.max_new_tokens)."""
    cispo_eps_max: float = 5.0
    """CISPO's cap on the stop-gradient IS weight."""
    tis_cap: float | None = None
    """Truncated importance sampling against the rollout engine's log-probs: loss_t *= min(exp(old - rollout), cap)."""
    token_mask_range: tuple[float, float] | None = None
    """Rollout correction: drop tokens whose exp(old - rollout) leaves [lo, hi]."""
    seq_mask_range: tuple[float, float] | None = None
    """Rollout correction: drop sequences whose geometric-mean ratio exp(mean(old - rollout)) leaves [lo, hi]."""

    def validate(self) -> None:
        """ValueError for a value outside its range. Run by every loss call (prepare_inputs), not at
        construction, so that a command-line parser building the config first can report the flag itself."""
        if self.name not in LOSSES:
            raise ValueError(f"PolicyLossConfig.name: unknown loss {self.name!r}; choose one of {LOSSES}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"PolicyLossConfig.aggregation: unknown {self.aggregation!r}; choose one of {AGGREGATIONS}")
        if self.kl not in KL_ESTIMATORS:
            raise ValueError(f"PolicyLossConfig.kl: unknown estimator {self.kl!r}; choose one of {KL_ESTIMATORS}")
        if any(e is not None and e < 0 for e in (self.eps_low, self.eps_high)):
            raise ValueError("PolicyLossConfig.eps_low/eps_high must be >= 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"PolicyLossConfig.dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"PolicyLossConfig.tis_cap must be > 0, got {self.tis_cap}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"PolicyLossConfig.max_len must be >= 1, got {self.max_len}")
        for name in ("token_mask_range", "seq_mask_range"):
            rng = getattr(self, name)
            if rng is not None and not (len(rng) == 2 and 0 <= rng[0] <= rng[1]):
                raise ValueError(f"PolicyLossConfig.{name} must be (lo, hi) with 0 <= lo <= hi, got {rng}")

    def resolved(self) -> "PolicyLossConfig":
        """This config with the loss's own eps_low / eps_high / aggregation where they are None."""
        fill = {k: v for k, v in LOSS_DEFAULTS[self.name].items() if v is not None and getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    @property
    def sequence_level(self) -> str | None:
        """What makes this loss read whole sequences (so it needs seq_ids or a [B, T] layout), or None."""
        aggregation = self.resolved().aggregation
        if aggregation != "token-mean":
            return f"aggregation={aggregation!r}"
        if self.name in ("gspo", "gspo-token"):
            return f"name={self.name!r}"
        return "seq_mask_range" if self.seq_mask_range is not None else None

    @property
    def token_separable(self) -> bool:
        # sequence masking averages a sequence's rollout ratios: it needs all of the sequence at once
        return self.name in ("grpo", "cispo") and self.seq_mask_range is None

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0


@dataclass
class LossInputs:
    """The per-token vectors a policy loss reads, flattened to [N] (fp32)."""

    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    seq_ids: torch.Tensor  # the caller's seq_ids renumbered 0, 1, ... in order (one number per run of equal ids)
    rollout_logp: torch.Tensor | None = None
    max_sequences: int = 1  # a bound on len(unique(seq_ids)) (the token count): buffers sized by it need no host sync

    def chunk(self, sl: slice) -> "LossInputs":
        pick = lambda t: None if t is None else t[sl]  # noqa: E731
        return LossInputs(pick(self.old_logp), pick(self.ref_logp), self.advantages[sl], self.mask[sl],
                          self.seq_ids[sl], pick(self.rollout_logp), self.max_sequences)


def prepare_inputs(shape: torch.Size, device, *, old_logp, ref_logp, advantages, mask, seq_ids=None,
                   rollout_logp=None, config: PolicyLossConfig | None = None) -> LossInputs:
    """Check the per-token vectors against the token shape (and `config`'s needs) and flatten them to fp32 [N]."""
    if config is not None:
        config.validate()
        config = config.resolved()
        if config.aggregation == "seq-mean-token-sum-norm" and config.max_len is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_len: Dr. GRPO's L_max is a constant "
                             "(the generation budget), not the longest sequence of the call")
        why = config.sequence_level
        if why is not None and seq_ids is None and len(shape) < 2:
            # a flattened [B, T] would silently become one sequence
            raise ValueError(f"{why} works on sequences, but the tokens come flat {tuple(shape)} without seq_ids: "
                             f"pass seq_ids (the sequence of each token) or a [B, T] layout (one sequence a row)")

    def vec(name, t, required=True):
        if t is None:
            if required:
                raise ValueError(f"{name} is required")
            return None
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected the token shape {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the logits on {device}")
        return t.reshape(-1).float()

    mask_f = vec("mask", mask)
    if seq_ids is None:
        # a 2-D [B, S] layout: each row is one sequence; a flat layout (token-level losses only): one sequence
        n = int(torch.Size(shape).numel())
        if len(shape) >= 2:
            seq_ids = torch.arange(shape[0], device=device).repeat_interleave(n // max(shape[0], 1))
        else:
            seq_ids = torch.zeros(n, dtype=torch.long, device=device)
    else:
        if seq_ids.shape != shape:
            raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)}, expected {tuple(shape)}")
        seq_ids = seq_ids.reshape(-1).to(device=device, dtype=torch.long)
    # a sequence's tokens are contiguous (a row of [B, S], or a packed segment): number the runs of equal
    # ids with a cumsum, on device, instead of torch.unique (a host sync on every loss call)
    n = seq_ids.numel()
    starts = torch.ones(n, dtype=torch.long, device=device)
    if n > 1:
        starts[1:] = (seq_ids[1:] != seq_ids[:-1]).long()
    dense_ids = torch.cumsum(starts, 0) - 1
    return LossInputs(vec("old_logp", old_logp, False), vec("ref_logp", ref_logp, False),
                      vec("advantages", advantages), mask_f, dense_ids, vec("rollout_logp", rollout_logp, False),
                      max_sequences=max(n, 1))


def aggregation_weights(inp: LossInputs, cfg: PolicyLossConfig, *, num_sequences=None, num_tokens=None) -> torch.Tensor:
    """w_t such that loss = sum_t w_t * loss_t. Global counts make the loss split-invariant."""
    cfg = cfg.resolved()
    m = inp.mask
    if cfg.aggregation == "token-mean":
        n_tok = num_tokens if num_tokens is not None else m.sum().clamp(min=1.0)
        return m / n_tok
    seq_len = torch.zeros(inp.max_sequences, device=m.device).index_add_(0, inp.seq_ids, m)
    n_seq = num_sequences if num_sequences is not None else (seq_len > 0).sum().clamp(min=1)
    if cfg.aggregation == "seq-mean-token-mean":
        return m / seq_len[inp.seq_ids].clamp(min=1.0) / n_seq
    if cfg.max_len is None:
        raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_len (L_max, the generation budget)")
    return m / (n_seq * cfg.max_len)


def _bounded(log_ratio):
    """log_ratio limited to +-_MAX_LOG_RATIO in value, its gradient unchanged (straight through)."""
    live = log_ratio - log_ratio.detach()  # 0, with d/dx = 1; where() keeps an infinite input's nan out
    return log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO) + torch.where(
        torch.isfinite(log_ratio), live, torch.zeros_like(live))


def _kl(logp, ref_logp, kind):
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    d = _bounded(ref_logp - logp)  # as the ratio: a gap above ~88 would make exp() inf
    return torch.exp(d) - d - 1


def _sequence_mean(values, inp: LossInputs):
    """Per-token value of mean over its sequence's masked tokens."""
    n = inp.max_sequences
    tot = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, inp.seq_ids, values * inp.mask)
    cnt = torch.zeros(n, device=values.device).index_add_(0, inp.seq_ids, inp.mask).clamp(min=1.0)
    return (tot / cnt)[inp.seq_ids]


def _correction_weight(old, inp: LossInputs, cfg: PolicyLossConfig):
    """Off-policy correction from rollout_logp: TIS weight times token/sequence masks (no gradient)."""
    if inp.rollout_logp is None:
        if cfg.tis_cap is not None or cfg.token_mask_range is not None or cfg.seq_mask_range is not None:
            raise ValueError("rollout_logp is required for tis_cap / token_mask_range / seq_mask_range")
        return None
    log_w = (old - inp.rollout_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    w = torch.ones_like(log_w)
    if cfg.tis_cap is not None:
        w = w * torch.exp(log_w).clamp(max=cfg.tis_cap)
    if cfg.token_mask_range is not None:
        lo, hi = cfg.token_mask_range
        r = torch.exp(log_w)
        w = w * ((r >= lo) & (r <= hi)).float()
    if cfg.seq_mask_range is not None:
        lo, hi = cfg.seq_mask_range
        r = torch.exp(_sequence_mean(log_w, inp))
        w = w * ((r >= lo) & (r <= hi)).float()
    return w


def token_losses(logp: torch.Tensor, entropy: torch.Tensor | None, inp: LossInputs, cfg: PolicyLossConfig):
    """loss_t for every token (before aggregation), and detached per-token metric vectors."""
    cfg = cfg.resolved()
    old = logp.detach() if inp.old_logp is None else inp.old_logp
    adv = inp.advantages
    ratio = torch.exp(_bounded(logp - old))
    stats = {"ratio": ratio.detach()}

    if cfg.name == "cispo":
        loss_t = -ratio.detach().clamp(max=cfg.cispo_eps_max) * adv * logp
        stats["clip_high"] = (ratio.detach() > cfg.cispo_eps_max).float()
    else:
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        if cfg.name in ("gspo", "gspo-token"):
            s = torch.exp(_bounded(_sequence_mean(logp - old, inp)))
            if cfg.name == "gspo-token":  # same value, each token carries its own gradient
                s = s.detach() * torch.exp(logp - logp.detach())
            ratio = s
            adv = _sequence_mean(adv, inp) if cfg.name == "gspo" else adv
            stats["seq_ratio"] = s.detach()
        surr1 = ratio * adv
        surr2 = ratio.clamp(lo, hi) * adv
        surr = torch.minimum(surr1, surr2)
        r = ratio.detach()
        stats["clip_low"] = ((adv < 0) & (r < lo)).float()
        stats["clip_high"] = ((adv > 0) & (r > hi)).float()
        if cfg.dual_clip_c is not None:
            floor = cfg.dual_clip_c * adv
            stats["clip_dual"] = ((adv < 0) & (surr.detach() < floor)).float()
            surr = torch.where(adv < 0, torch.maximum(surr, floor), surr)
        loss_t = -surr

    if cfg.beta != 0.0:
        if inp.ref_logp is None:
            raise ValueError("ref_logp is required when beta != 0")
        kl_t = _kl(logp, inp.ref_logp, cfg.kl)
        loss_t = loss_t + cfg.beta * kl_t
        stats["kl"] = kl_t.detach()
    elif inp.ref_logp is not None:
        stats["kl"] = _kl(logp.detach(), inp.ref_logp, cfg.kl)
    if entropy is not None:
        if cfg.entropy_coef != 0.0:
            loss_t = loss_t - cfg.entropy_coef * entropy
        stats["entropy"] = entropy.detach()

    correction = _correction_weight(old, inp, cfg)
    if correction is not None:
        loss_t = loss_t * correction
        mismatch = torch.exp((old - inp.rollout_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).detach()
        stats["mismatch_abs"] = (mismatch - 1).abs()
        stats["mismatch_out"] = ((mismatch < 0.5) | (mismatch > 2.0)).float()
        stats["correction_weight"] = correction.detach()
    return loss_t, stats


def distillation_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor):
    """On-policy distillation (GRPO_SPEC.md): the student samples, the teacher scores the same tokens, and
    A_t = -(logp_student_t - logp_teacher_t), stop-gradient, 0 where masked. In the clipped surrogate at
    ratio 1 this is the sample-based reverse KL(student || teacher): value mean_t(logp_s - logp_t),
    gradient E[(logp_s - logp_t) grad logp_s]."""
    if student_logp.shape != teacher_logp.shape or mask.shape != student_logp.shape:
        raise ValueError(f"distillation_advantages: student {tuple(student_logp.shape)}, teacher "
                         f"{tuple(teacher_logp.shape)} and mask {tuple(mask.shape)} must have one shape")
    adv = (teacher_logp.detach().float() - student_logp.detach().float())
    return torch.where(mask > 0, adv, torch.zeros_like(adv))


class MetricSums:
    """Masked sums of per-token metric vectors, accumulated over chunks; means at the end."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = None

    def add(self, stats: dict[str, torch.Tensor], mask: torch.Tensor):
        for k, v in stats.items():
            s = (v * mask).sum()
            self.sums[k] = self.sums[k] + s if k in self.sums else s
        c = mask.sum()
        self.count = c if self.count is None else self.count + c

    def means(self) -> dict[str, torch.Tensor]:
        denom = self.count.clamp(min=1.0)
        out = {k: (v / denom).detach() for k, v in self.sums.items()}
        out["num_tokens"] = self.count.detach()
        return out


def compute_policy_loss(logp, entropy, inp: LossInputs, cfg: PolicyLossConfig, *, num_sequences=None,
                        num_tokens=None, return_token_stats=False):
    """Aggregate loss from per-token vectors. Returns (loss, metrics); differentiable in logp/entropy."""
    cfg = cfg.resolved()
    loss_t, stats = token_losses(logp, entropy, inp, cfg)
    w = aggregation_weights(inp, cfg, num_sequences=num_sequences, num_tokens=num_tokens)
    loss = (loss_t * w).sum()
    acc = MetricSums()
    acc.add(stats, inp.mask)
    metrics = acc.means()
    if return_token_stats:
        metrics.update({f"per_token/{k}": v for k, v in stats.items()})
    return loss, metrics
