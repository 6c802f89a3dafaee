"""grpo_loss and the policy-loss family against float64 references written straight from GRPO_SPEC.md."""
import pytest
import torch

from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.kernels.logits_loss import grpo_loss, policy_loss
from r1_engine.kernels.reference import (aggregate_ref, cispo_loss_ref, grpo_loss_ref, gspo_loss_ref, kl_ref,
                               token_logprobs_ref)
from tests.kernels.helpers import (TOL, assert_close, perturbed_vectors, random_logits,
                                   run_both)

B, S, V = 4, 9, 517  # four sequences of nine positions, an odd vocabulary


def make_batch(dtype=torch.float32, temperature=1.0, b=B, s=S, v=V):
    logits = random_logits(b * s, v, dtype, scale=2.0).view(b, s, v)
    targets = torch.randint(0, v, (b, s))
    old, ref, rollout = perturbed_vectors(logits.float(), targets, temperature)
    adv = torch.randn(b, 1).expand(b, s).contiguous()  # one advantage per sequence, both signs
    adv[0] = -adv[0].abs()
    adv[1] = adv[1].abs()
    mask = (torch.rand(b, s) > 0.25).float()
    mask[:, 0] = 0.0  # prompt position
    mask[min(2, b - 1)] = 0.0  # a fully masked sequence
    return logits, targets, old, ref, rollout, adv, mask


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_grpo_each_aggregation_and_kl(aggregation, kl):
    logits, targets, old, ref, _, adv, mask = make_batch(temperature=0.6)
    # max_len: a generation budget above the rows' length (only seq-mean-token-sum-norm reads it)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl=kl, temperature=0.6, aggregation=aggregation, max_len=S + 4)
    loss, loss_ref, g, g_ref, _ = run_both(
        logits, targets,
        lambda z: grpo_loss(z, targets, old, ref, adv, mask, **kw),
        lambda z: grpo_loss_ref(z, targets, old.double(), ref.double(), adv.double(), mask.double(), **kw))
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(g, g_ref, TOL[torch.float32], "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_grpo_dual_clip_entropy_tis(dtype, temperature):
    logits, targets, old, ref, rollout, adv, mask = make_batch(dtype, temperature)
    kw = dict(eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, beta=0.01, kl="k3", temperature=temperature,
              entropy_coef=0.01, tis_cap=2.0)
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets,
        lambda z: grpo_loss(z, targets, old, ref, adv, mask, rollout_logp=rollout, **kw),
        lambda z: grpo_loss_ref(z, targets, old.double(), ref.double(), adv.double(), mask.double(),
                                rollout_logp=rollout.double(), **kw))
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(g, g_ref, TOL[dtype], "dlogits")
    assert metrics["mismatch_abs"] > 0


def test_ratios_hit_every_branch_and_metrics_match():
    """Advantages of both signs with ratios on both sides of the clip; the metric fractions, by hand."""
    logits, targets, old, ref, rollout, adv, mask = make_batch(temperature=1.0, b=8, s=16)
    _, metrics = grpo_loss(logits, targets, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                           dual_clip_c=1.5, rollout_logp=rollout)
    lp, ent = token_logprobs_ref(logits.double(), targets, 1.0)
    ratio = torch.exp(lp - old.double())
    on = mask.bool()
    low = ((adv < 0) & (ratio < 0.8))[on].double().mean()
    high = ((adv > 0) & (ratio > 1.2))[on].double().mean()
    assert low > 0 and high > 0, "the test batch must exercise both clips"
    assert_close(metrics["clip_low"], low, 1e-6, "clip_low")
    assert_close(metrics["clip_high"], high, 1e-6, "clip_high")
    assert_close(metrics["ratio"], ratio[on].mean(), 1e-5, "ratio")
    assert_close(metrics["entropy"], ent[on].mean(), 1e-5, "entropy")
    assert_close(metrics["kl"], kl_ref(lp, ref.double(), "k3")[on].mean(), 1e-5, "kl")
    mm = torch.exp(old.double() - rollout.double())
    assert_close(metrics["mismatch_abs"], (mm - 1).abs()[on].mean(), 1e-5, "mismatch_abs")
    assert_close(metrics["mismatch_out"], ((mm < 0.5) | (mm > 2))[on].double().mean(), 1e-6, "mismatch_out")
    assert metrics["num_tokens"] == mask.sum()


def test_on_policy_without_old_logp():
    logits, targets, _, ref, _, adv, mask = make_batch()
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets,
        lambda z: grpo_loss(z, targets, None, ref, adv, mask, beta=0.02),
        lambda z: grpo_loss_ref(z, targets, None, ref.double(), adv.double(), mask.double(), beta=0.02))
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(g, g_ref, TOL[torch.float32], "dlogits")
    assert_close(metrics["ratio"], torch.tensor(1.0), 1e-6, "ratio")


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_split_invariance_with_global_denominators(aggregation):
    """Micro-batches (or DP ranks) with global counts sum to the full-batch loss and gradient."""
    logits, targets, old, ref, _, adv, mask = make_batch(b=6, s=7)
    n_seq = int((mask.sum(1) > 0).sum())
    n_tok = mask.sum()
    kw = dict(beta=0.04, aggregation=aggregation, max_len=7)
    z_full = logits.clone().requires_grad_(True)
    full, _ = grpo_loss(z_full, targets, old, ref, adv, mask, **kw)
    full.backward()
    z = logits.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 2), slice(2, 6)):
        loss, _ = grpo_loss(z[part], targets[part], old[part], ref[part], adv[part], mask[part],
                            num_sequences=n_seq, num_tokens=n_tok, **kw)
        total = total + loss
    total.backward()
    assert_close(total, full, 1e-6, "loss")
    assert_close(z.grad, z_full.grad, 1e-6, "dlogits")


def test_packed_rows_with_seq_ids_equal_padded():
    """Two sequences packed into one row with seq_ids give the padded [B, S] result."""
    logits, targets, old, ref, _, adv, mask = make_batch(b=2, s=6)
    mask[:, 0] = 0
    mask[1] = 1
    mask[1, 0] = 0
    padded, _ = grpo_loss(logits, targets, old, ref, adv, mask, beta=0.04)
    flat = lambda t: t.reshape(1, 12, *t.shape[2:])  # noqa: E731
    seq_ids = torch.tensor([[0] * 6 + [1] * 6])
    packed, _ = grpo_loss(flat(logits), flat(targets), flat(old), flat(ref), flat(adv), flat(mask),
                          beta=0.04, seq_ids=seq_ids)
    assert_close(packed, padded, 1e-6, "packed loss")


@pytest.mark.parametrize("name", ["gspo", "gspo-token"])
def test_gspo(name):
    logits, targets, old, _, _, adv, mask = make_batch(temperature=0.7)
    old = old * 0 + token_logprobs_ref(logits.double(), targets, 0.7)[0].float() + 2e-4 * torch.randn(B, S)
    cfg = PolicyLossConfig(name=name, eps_low=3e-4, eps_high=4e-4)
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets,
        lambda z: policy_loss(z, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask, config=cfg,
                              temperature=0.7),
        lambda z: gspo_loss_ref(z, targets, old.double(), adv.double(), mask.double(), eps_low=3e-4,
                                eps_high=4e-4, temperature=0.7, token_level=name == "gspo-token"))
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(g, g_ref, TOL[torch.float32], "dlogits")
    assert "seq_ratio" in metrics


def test_cispo():
    logits, targets, old, _, _, adv, mask = make_batch()
    old = old - 2.0 * (torch.rand(B, S) > 0.7)  # some ratios far above eps_max
    cfg = PolicyLossConfig(name="cispo", cispo_eps_max=5.0, aggregation="token-mean")
    loss, loss_ref, g, g_ref, metrics = run_both(
        logits, targets,
        lambda z: policy_loss(z, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask, config=cfg),
        lambda z: cispo_loss_ref(z, targets, old.double(), adv.double(), mask.double(), eps_max=5.0))
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(g, g_ref, TOL[torch.float32], "dlogits")
    assert metrics["clip_high"] > 0


def test_rollout_token_and_sequence_masking():
    logits, targets, old, _, rollout, adv, mask = make_batch(b=6, s=8)
    rollout[1] = old[1] - 1.5  # sequence 1 drifts far from the trainer: its geometric-mean ratio > 2
    cfg = PolicyLossConfig(token_mask_range=(0.5, 2.0), seq_mask_range=(0.5, 2.0))
    z = logits.clone().requires_grad_(True)
    loss, _ = policy_loss(z, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask, config=cfg,
                          rollout_logp=rollout)
    loss.backward()
    # reference: the plain GRPO surrogate with the dropped tokens weighted 0, same denominators
    r = torch.exp(old.double() - rollout.double())
    keep = ((r >= 0.5) & (r <= 2.0)).double()
    for i in range(6):
        on = mask[i].bool()
        if on.any() and not (0.5 <= torch.exp((old[i] - rollout[i]).double()[on].mean()) <= 2.0):
            keep[i] = 0
    assert keep[1].sum() == 0 and keep.sum() > 0
    z64 = logits.double().requires_grad_(True)
    lp, _ = token_logprobs_ref(z64, targets, 1.0)
    ratio = torch.exp(lp - old.double())
    surr = torch.min(ratio * adv.double(), ratio.clamp(0.8, 1.2) * adv.double())
    ref_loss = aggregate_ref(-surr * keep, mask.double(), None, "seq-mean-token-mean")  # [B, S]: a sequence a row
    ref_loss.backward()
    assert_close(loss, ref_loss, TOL[torch.float32], "loss")
    assert_close(z.grad, z64.grad, TOL[torch.float32], "dlogits")
    # the reference's own masking options (used by test_linear_grpo) give the hand-built result
    ref_opts = grpo_loss_ref(logits.double(), targets, old.double(), None, adv.double(), mask.double(),
                             rollout_logp=rollout.double(), token_mask_range=(0.5, 2.0), seq_mask_range=(0.5, 2.0))
    assert_close(ref_opts, ref_loss.detach(), 1e-12, "reference masking options")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl="k4"), "estimator"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(dual_clip_c=0.5), "dual_clip_c"),
        (dict(tis_cap=2.0), "rollout_logp"),
        (dict(beta=0.1, ref=None), "ref_logp"),
        (dict(tis_cap=0.0), "tis_cap"),
        (dict(max_len=0), "max_len"),
        (dict(aggregation="seq-mean-token-sum-norm"), "needs max_len"),
    ],
)
def test_bad_config_raises(kwargs, match):
    logits, targets, old, ref, _, adv, mask = make_batch()
    ref = kwargs.pop("ref", ref)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logits, targets, old, ref, adv, mask, **kwargs)


def test_bad_vector_shape_raises():
    logits, targets, old, ref, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logits, targets, old, ref, adv[:, :3], mask)
    with pytest.raises(ValueError, match="mask is on"):
        grpo_loss(logits, targets, old, ref, adv, mask.to("meta"))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_on_policy_distillation_is_the_sample_based_reverse_kl(aggregation, temperature):
    """A_t = -(logp_student - logp_teacher) in the surrogate (on-policy, no KL term) has the value and the
    gradient of the reverse KL(student || teacher) on the student's tokens."""
    from r1_engine.kernels.loss_family import distillation_advantages
    from r1_engine.kernels.reference import reverse_kl_distill_ref

    logits, targets, _, teacher, _, _, mask = make_batch(temperature=temperature)
    student = token_logprobs_ref(logits.double(), targets, temperature)[0].float()
    adv = distillation_advantages(student, teacher, mask)
    assert_close(adv, torch.where(mask > 0, teacher - student, torch.zeros_like(adv)), 1e-6, "advantages")
    loss, loss_ref, g, g_ref, _ = run_both(
        logits, targets,
        lambda z: grpo_loss(z, targets, None, None, adv, mask, temperature=temperature, aggregation=aggregation),
        lambda z: reverse_kl_distill_ref(z, targets, teacher.double(), mask.double(), temperature=temperature,
                                         aggregation=aggregation))
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(g, g_ref, TOL[torch.float32], "dlogits")
    with pytest.raises(ValueError, match="one shape"):
        distillation_advantages(student, teacher[:, :3], mask)
