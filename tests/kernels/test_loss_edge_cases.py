"""Edge cases of the loss family: each test builds inputs that take the branch in question, checks that it is
taken, and compares the loss and its gradients with the float64 references of kernels/reference.py."""
import math

import pytest
import torch

from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.kernels.logits_loss import grpo_loss, policy_loss
from r1_engine.kernels.linear_grpo import linear_grpo_loss, linear_policy_loss
from r1_engine.kernels.reference import MAX_LOG_RATIO, grpo_loss_ref, gspo_loss_ref, token_logprobs_ref
from tests.kernels.helpers import (TOL, assert_close, random_logits, reference_logits,
                                   run_both)

SUM_NORM = "seq-mean-token-sum-norm"


def rows_close(g, g_ref, rows, tol, what):
    """Gradients compared row by row: rows of ~1e8 next to rows of ~1 would hide any error in the small ones."""
    g, g_ref = g.reshape(-1, g.shape[-1]), g_ref.reshape(-1, g_ref.shape[-1])
    for r in rows:
        assert_close(g[r], g_ref[r], tol, f"{what} row {r}")


# -- 1. Dr. GRPO's L_max is a constant ----------------------------------------------------------------------------

def test_sum_norm_refuses_a_missing_max_len():
    logits, targets = random_logits(12, 31, torch.float32).view(3, 4, 31), torch.randint(0, 31, (3, 4))
    adv, mask = torch.randn(3, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="needs max_len"):
        grpo_loss(logits, targets, None, None, adv, mask, aggregation=SUM_NORM)
    hidden, weight = torch.randn(3, 4, 8), torch.randn(31, 8)
    with pytest.raises(ValueError, match="needs max_len"):
        linear_grpo_loss(hidden, weight, targets, None, None, adv, mask, aggregation=SUM_NORM)
    with pytest.raises(ValueError, match="needs max_len"):
        grpo_loss_ref(logits.double(), targets, None, None, adv.double(), mask.double(), aggregation=SUM_NORM)


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_sum_norm_is_split_invariant_across_micro_batches_of_different_longest_lengths(path):
    b, s, v, hdim, budget = 6, 15, 131, 24, 20
    lengths = torch.tensor([3, 2, 0, 14, 7, 11])  # micro-batch rows 0-2: longest 3; rows 3-5: longest 14
    mask = ((torch.arange(s) >= 1) & (torch.arange(s) <= lengths[:, None])).float()  # position 0: the prompt
    assert mask[:3].sum(1).max() != mask[3:].sum(1).max()
    hidden, weight = torch.randn(b, s, hdim), torch.randn(v, hdim) * hdim ** -0.5 * 2
    targets = torch.randint(0, v, (b, s))
    lp = token_logprobs_ref(hidden.double() @ weight.double().T, targets)[0]
    old, ref = (lp + 0.3 * torch.randn(b, s)).float(), (lp + 0.3 * torch.randn(b, s)).float()
    adv = torch.randn(b, 1).expand(b, s).contiguous()
    n_seq = int((lengths > 0).sum())
    kw = dict(beta=0.04, aggregation=SUM_NORM, max_len=budget, num_sequences=n_seq)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 3), slice(3, 6)):
        args = (targets[part], old[part], ref[part], adv[part], mask[part])
        if path == "logits":
            loss, _ = grpo_loss(h[part] @ w.T, *args, **kw)
        else:
            loss, _ = linear_grpo_loss(h[part], w, *args, chunk_size=7, **kw)
        total = total + loss
    total.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    full = grpo_loss_ref(h64 @ w64.T, targets, old.double(), ref.double(), adv.double(), mask.double(), **kw)
    full.backward()
    # by hand: every masked token weighs 1 / (G' L_max) whatever its micro-batch's longest sequence
    lp64 = token_logprobs_ref(hidden.double() @ weight.double().T, targets)[0]
    ratio = torch.exp(lp64 - old.double())
    surr = torch.min(ratio * adv.double(), ratio.clamp(0.8, 1.2) * adv.double())
    d = ref.double() - lp64
    by_hand = ((-surr + 0.04 * (torch.exp(d) - d - 1)) * mask).sum() / (n_seq * budget)
    assert_close(full.detach(), by_hand, 1e-12, "reference")
    assert_close(total, full, TOL[torch.float32], "loss")
    assert_close(h.grad, h64.grad, TOL[torch.float32], "dhidden")
    assert_close(w.grad, w64.grad, TOL[torch.float32], "dweight")


# -- 2. and 3. the bound on log-ratios ----------------------------------------------------------------------------

def test_k3_at_a_log_ratio_gap_of_100_is_finite_and_matches_the_reference():
    b, s, v = 3, 7, 101
    logits = random_logits(b * s, v, torch.float32, scale=2.0).view(b, s, v)
    targets = torch.randint(0, v, (b, s))
    far = [(0, 2), (1, 4), (2, 6)]  # tokens the policy almost never picks, the reference model often
    for i, t in far:
        logits[i, t, targets[i, t]] = logits[i, t].max() - 110.0
    lp = token_logprobs_ref(logits.double(), targets)[0]
    assert all(lp[i, t] < -100 for i, t in far)
    old = (lp + 0.05 * torch.randn(b, s)).float()
    ref = (lp + 0.1 * torch.randn(b, s)).float()
    for i, t in far:
        ref[i, t] = float(lp[i, t] + 100.0)  # ref_logp - logp = 100: exp() is inf in fp32 without a bound
    adv, mask = torch.randn(b, 1).expand(b, s).contiguous(), torch.ones(b, s)
    mask[:, 0] = 0.0
    kw = dict(beta=0.04, kl="k3", aggregation="token-mean")
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets,
        lambda z: grpo_loss(z, targets, old, ref, adv, mask, return_token_stats=True, **kw),
        lambda z: grpo_loss_ref(z, targets, old.double(), ref.double(), adv.double(), mask.double(), **kw))
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # by hand: at the bound k3 = e^20 - 20 - 1, and dL/dlogp = (-A ratio + beta (1 - e^20)) / n_tokens (ratio ~ 1,
    # inside the clip)
    kl = metrics["per_token/kl"].view(b, s)
    bound = math.exp(MAX_LOG_RATIO)
    for i, t in far:
        assert_close(kl[i, t], torch.tensor(bound - MAX_LOG_RATIO - 1), 1e-6, "k3 at the bound")
        p = torch.softmax(logits[i, t].double(), -1)
        onehot = torch.nn.functional.one_hot(targets[i, t], v).double()
        ratio = torch.exp(lp[i, t] - old[i, t].double())
        assert 0.8 < ratio < 1.2
        dlogp = (-adv[i, t].double() * ratio + 0.04 * (1 - bound)) / mask.sum()
        assert_close(g_ref[i, t], dlogp * (onehot - p), 1e-9, "reference gradient")
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    rows_close(g, g_ref, range(b * s), TOL[torch.float32], "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_log_ratio_of_25_keeps_the_unclipped_gradient(dtype):
    """A < 0 on the unclipped side: the gradient is the spec's -A * ratio at the bounded ratio (-A e^20), not 0."""
    b, s, v = 4, 6, 97
    logits = random_logits(b * s, v, dtype, scale=2.0).view(b, s, v)
    targets = torch.randint(0, v, (b, s))
    lp = token_logprobs_ref(logits.double(), targets)[0]
    old = (lp + 0.1 * torch.randn(b, s)).float()
    adv = torch.tensor([-1.3, -0.7, 0.9, 1.1])[:, None].expand(b, s).contiguous()
    unclipped, clipped = [(0, 1), (0, 4), (1, 2)], (2, 3)  # A < 0, and A > 0 (clipped above: no gradient)
    for i, t in unclipped + [clipped]:
        old[i, t] = float(lp[i, t] - 25.0)
    mask = torch.ones(b, s)
    mask[:, 0] = 0.0
    kw = dict(eps_low=0.2, eps_high=0.28, aggregation="token-mean")
    loss, loss_ref, g, g_ref, _ = run_both(
        logits, targets, lambda z: grpo_loss(z, targets, old, None, adv, mask, **kw),
        lambda z: grpo_loss_ref(z, targets, old.double(), None, adv.double(), mask.double(), **kw))
    bound = math.exp(MAX_LOG_RATIO)
    for i, t in unclipped:  # by hand: dL/dlogp = -A e^20 / n_tokens
        p = torch.softmax(logits[i, t].double(), -1)
        onehot = torch.nn.functional.one_hot(targets[i, t], v).double()
        assert_close(g_ref[i, t], -adv[i, t].double() * bound / mask.sum() * (onehot - p), 1e-9, "reference")
        assert g[i, t].abs().max() > 1e6
    assert (g[clipped] == 0).all() and (g_ref[clipped] == 0).all()
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    rows_close(g, g_ref, range(b * s), TOL[dtype], "dlogits")


# -- 4. dual clip, binding on a known share of tokens --------------------------------------------------------------

RATIOS_NEG = (4.5, 6.0, 2.0, 0.5, 1.0)  # A < 0: beyond c = 3 (dual clip), unclipped, clipped low, inside
RATIOS_POS = (5.0, 0.5, 1.1)  # A > 0: clipped high, unclipped, inside


def dual_clip_inputs(lp, adv, mask):
    """old log-probs giving each token a planned ratio; returns (old, the dual-clip mask by construction)."""
    k = torch.arange(lp.numel()).view(lp.shape)
    r = torch.where(adv < 0, torch.tensor(RATIOS_NEG, dtype=torch.float64)[k % len(RATIOS_NEG)],
                    torch.tensor(RATIOS_POS, dtype=torch.float64)[k % len(RATIOS_POS)])
    return (lp - torch.log(r)).float(), (adv < 0) & (r > 3.0) & (mask > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_clip_binds_on_a_known_share_logits(dtype):
    b, s, v = 5, 11, 263
    logits = random_logits(b * s, v, dtype, scale=2.0).view(b, s, v)
    targets = torch.randint(0, v, (b, s))
    lp = token_logprobs_ref(logits.double(), targets, 0.8)[0]
    adv = torch.tensor([-1.4, 0.6, -0.3, 1.2, -2.0])[:, None].expand(b, s).contiguous()
    mask = (torch.rand(b, s) > 0.15).float()
    mask[:, 0] = 0.0
    old, dual = dual_clip_inputs(lp, adv, mask)
    ref = (lp + 0.2 * torch.randn(b, s)).float()
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.04, temperature=0.8)
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets, lambda z: grpo_loss(z, targets, old, ref, adv, mask, **kw),
        lambda z: grpo_loss_ref(z, targets, old.double(), ref.double(), adv.double(), mask.double(), **kw))
    assert dual.sum() > 0
    assert_close(metrics["clip_dual"], dual.sum() / mask.sum(), 1e-6, "clip_dual share")
    undual = grpo_loss_ref(logits.double(), targets, old.double(), ref.double(), adv.double(), mask.double(),
                           **{**kw, "dual_clip_c": None})
    assert (undual - loss_ref).abs() > 0.1  # the dual clip changes the loss
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(g, g_ref, TOL[dtype], "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_clip_binds_on_a_known_share_linear(dtype):
    n, hdim, v = 37, 32, 211
    hidden = torch.randn(n, hdim).to(dtype)
    weight = (torch.randn(v, hdim) * hdim ** -0.5 * 2).to(dtype)
    targets = torch.randint(0, v, (n,))
    seq_ids = torch.arange(n) // 8
    with torch.no_grad():
        lp = token_logprobs_ref(reference_logits(hidden.double(), weight.double(), dtype), targets)[0]
    adv = torch.tensor([-1.2, 0.8, -0.5, 1.5, -2.0])[seq_ids]
    mask = (torch.rand(n) > 0.15).float()
    old, dual = dual_clip_inputs(lp, adv, mask)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = linear_grpo_loss(h, w, targets, old, None, adv, mask, seq_ids=seq_ids, chunk_size=10, **kw)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss_ref = grpo_loss_ref(reference_logits(h64, w64, dtype), targets, old.double(), None, adv.double(),
                             mask.double(), seq_ids=seq_ids, **kw)
    loss_ref.backward()
    assert dual.sum() > 0
    assert_close(metrics["clip_dual"], dual.sum() / mask.sum(), 1e-6, "clip_dual share")
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(h.grad, h64.grad, TOL[dtype], "dhidden")
    assert_close(w.grad, w64.grad, TOL[dtype], "dweight")


# -- 5. each loss's own defaults ----------------------------------------------------------------------------------

def test_each_loss_gets_its_own_defaults_unless_set():
    assert (PolicyLossConfig().resolved().eps_low, PolicyLossConfig().resolved().eps_high) == (0.2, 0.2)
    gspo = PolicyLossConfig(name="gspo").resolved()
    assert (gspo.eps_low, gspo.eps_high, gspo.aggregation) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert PolicyLossConfig(name="cispo").resolved().aggregation == "token-mean"
    assert PolicyLossConfig(name="gspo", eps_low=0.1).resolved().eps_low == 0.1
    assert PolicyLossConfig(name="cispo", aggregation="seq-mean-token-mean").resolved().aggregation \
        == "seq-mean-token-mean"
    # and the kernels run them: GSPO with no eps given is GSPO's 3e-4 / 4e-4
    b, s, v = 3, 8, 53
    logits = random_logits(b * s, v, torch.float32, scale=2.0).view(b, s, v)
    targets = torch.randint(0, v, (b, s))
    lp = token_logprobs_ref(logits.double(), targets)[0]
    # sequence ratios e^1e-3, e^-1e-3, e^2e-3: beyond 1 + 4e-4 / 1 - 3e-4, inside 1 +- 0.2; rows 0 and 1 clipped
    old = (lp - torch.tensor([1e-3, -1e-3, 2e-3], dtype=torch.float64)[:, None]).float()
    adv, mask = torch.tensor([0.9, -1.1, 0.7])[:, None].expand(b, s).contiguous(), torch.ones(b, s)
    loss, _ = policy_loss(logits, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask,
                          config=PolicyLossConfig(name="gspo"))
    args = (logits.double(), targets, old.double(), adv.double(), mask.double())
    assert_close(loss, gspo_loss_ref(*args), TOL[torch.float32], "gspo loss")
    assert (gspo_loss_ref(*args, eps_low=0.2, eps_high=0.2) - gspo_loss_ref(*args)).abs() > 1e-4


# -- 6. sequence-level options need to know the sequences ---------------------------------------------------------

@pytest.mark.parametrize("cfg, what", [
    (PolicyLossConfig(), "aggregation='seq-mean-token-mean'"),
    (PolicyLossConfig(aggregation=SUM_NORM, max_len=9), "aggregation='seq-mean-token-sum-norm'"),
    (PolicyLossConfig(name="gspo", aggregation="token-mean"), "name='gspo'"),
    (PolicyLossConfig(aggregation="token-mean", seq_mask_range=(0.5, 2.0)), "seq_mask_range"),
])
def test_sequence_level_options_refuse_flat_tokens_without_seq_ids(cfg, what):
    n, v, hdim = 14, 29, 8
    logits, targets = random_logits(n, v, torch.float32), torch.randint(0, v, (n,))
    vec = dict(old_logp=torch.zeros(n), ref_logp=None, advantages=torch.randn(n), mask=torch.ones(n), config=cfg,
               rollout_logp=torch.zeros(n) - 0.1)
    hidden, weight = torch.randn(n, hdim), torch.randn(v, hdim)
    with pytest.raises(ValueError, match=f"{what} works on sequences.*pass seq_ids"):
        policy_loss(logits, targets, **vec)
    with pytest.raises(ValueError, match=f"{what} works on sequences.*pass seq_ids"):
        linear_policy_loss(hidden, weight, targets, **vec)
    # with seq_ids, or the same tokens as [B, T] rows, both paths run and agree
    seq_ids = torch.arange(n) // 7
    flat, _ = policy_loss(logits, targets, seq_ids=seq_ids, **vec)
    rows = {k: (t.view(2, 7) if isinstance(t, torch.Tensor) else t) for k, t in vec.items()}
    shaped, _ = policy_loss(logits.view(2, 7, v), targets.view(2, 7), **rows)
    assert_close(flat, shaped, 1e-6, "seq_ids vs [B, T]")


def test_token_level_losses_accept_flat_tokens():
    n, v = 14, 29
    logits, targets = random_logits(n, v, torch.float32), torch.randint(0, v, (n,))
    old, adv, mask = torch.randn(n) - 3, torch.randn(n), (torch.rand(n) > 0.2).float()
    for cfg in (PolicyLossConfig(aggregation="token-mean"), PolicyLossConfig(name="cispo")):
        loss, _ = policy_loss(logits, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask, config=cfg)
        assert torch.isfinite(loss)
    loss, _ = policy_loss(logits, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask,
                          config=PolicyLossConfig(aggregation="token-mean"))
    ref = grpo_loss_ref(logits.double(), targets, old.double(), None, adv.double(), mask.double(),
                        aggregation="token-mean")
    assert_close(loss, ref, TOL[torch.float32], "token-mean, flat")


@pytest.mark.parametrize("bad, message", [(dict(tis_cap=0.0), "tis_cap must be > 0"),
                                          (dict(dual_clip_c=1.0), "dual_clip_c must be > 1"),
                                          (dict(eps_low=-0.1), "eps_low/eps_high must be >= 0")])
def test_out_of_range_config_is_refused_by_the_loss_call(bad, message):
    """A config is checked when a loss runs (a CLI parser builds it first and names the flag itself)."""
    config = PolicyLossConfig(**bad)  # constructing is allowed
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    vec = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message):
        policy_loss(logits, targets, old_logp=vec, ref_logp=None, advantages=vec, mask=torch.ones(2, 3),
                    config=config, rollout_logp=vec)
