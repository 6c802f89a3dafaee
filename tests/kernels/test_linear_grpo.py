"""linear_grpo_loss / linear_policy_loss (lm_head fused, chunked over tokens) against the float64 reference."""
import pytest
import torch

from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.kernels.linear_grpo import linear_grpo_loss, linear_policy_loss
from torch.utils.flop_counter import FlopCounterMode

from r1_engine.kernels.reference import grpo_loss_ref, gspo_loss_ref, token_logprobs_ref
from tests.kernels.helpers import TOL, assert_close, away_from_bounds, perturbed_vectors, reference_logits

N, H, V = 29, 48, 389


def make(dtype=torch.float32, temperature=1.0):
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * H ** -0.5 * 2).to(dtype)
    targets = torch.randint(0, V, (N,))
    old, ref, rollout = perturbed_vectors((hidden.double() @ weight.double().T).float(), targets, temperature)
    adv = torch.randn(N)
    mask = (torch.rand(N) > 0.2).float()
    seq_ids = torch.arange(N) // 7  # five sequences of up to seven tokens
    return hidden, weight, targets, old, ref, rollout, adv, mask, seq_ids


def grads_of(fn, hidden, weight):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(h, w)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 8, 5])
def test_linear_grpo_matches_reference(dtype, chunk_size):
    hidden, weight, targets, old, ref, rollout, adv, mask, seq_ids = make(dtype, 0.7)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, temperature=0.7, entropy_coef=0.01, dual_clip_c=3.0,
              tis_cap=2.0)
    # bf16 logits are rounded by the matmul itself and the clip is not smooth: the reference takes the rounded
    # product's values, and no ratio sits on a clip bound (the two could round it to different sides)
    with torch.no_grad():
        lp = token_logprobs_ref(reference_logits(hidden.double(), weight.double(), dtype), targets, 0.7)[0]
    old = away_from_bounds(old, lp, (0.8, 1.28, 3.0))
    loss, gh, gw = grads_of(lambda h, w: linear_grpo_loss(h, w, targets, old, ref, adv, mask, rollout_logp=rollout,
                                                          seq_ids=seq_ids, chunk_size=chunk_size, **kw),
                            hidden, weight)
    loss_ref, gh_ref, gw_ref = grads_of(
        lambda h, w: grpo_loss_ref(reference_logits(h, w, dtype), targets, old.double(), ref.double(), adv.double(),
                                   mask.double(), rollout_logp=rollout.double(), seq_ids=seq_ids, **kw),
        hidden.double(), weight.double())
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(gh, gh_ref, TOL[dtype], "dhidden")
    assert_close(gw, gw_ref, TOL[dtype], "dweight")


def test_linear_gspo_two_sweeps_matches_reference():
    hidden, weight, targets, old, _, _, adv, mask, seq_ids = make()
    with torch.no_grad():
        lp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    old = lp.float() + 2e-4 * torch.randn(N)
    adv = adv[seq_ids // 1 * 0 + seq_ids]  # constant within a sequence
    cfg = PolicyLossConfig(name="gspo", eps_low=3e-4, eps_high=4e-4)
    loss, gh, gw = grads_of(lambda h, w: linear_policy_loss(h, w, targets, old_logp=old, ref_logp=None,
                                                            advantages=adv, mask=mask, config=cfg, seq_ids=seq_ids,
                                                            chunk_size=6), hidden, weight)
    loss_ref, gh_ref, gw_ref = grads_of(
        lambda h, w: gspo_loss_ref(h @ w.T, targets, old.double(), adv.double(), mask.double(), seq_ids=seq_ids,
                                   eps_low=3e-4, eps_high=4e-4), hidden.double(), weight.double())
    assert_close(loss, loss_ref, TOL[torch.float32], "loss")
    assert_close(gh, gh_ref, TOL[torch.float32], "dhidden")
    assert_close(gw, gw_ref, TOL[torch.float32], "dweight")


def test_metrics_match_unfused():
    from r1_engine.kernels.logits_loss import grpo_loss

    hidden, weight, targets, old, ref, rollout, adv, mask, seq_ids = make()
    _, fused = linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask, beta=0.04, rollout_logp=rollout,
                                seq_ids=seq_ids, chunk_size=4)
    _, plain = grpo_loss(hidden @ weight.T, targets, old, ref, adv, mask, beta=0.04, rollout_logp=rollout,
                         seq_ids=seq_ids)
    assert fused.keys() == plain.keys()
    for k in plain:
        assert_close(fused[k], plain[k], 1e-5, k)


def test_bad_shapes_raise():
    hidden, weight, targets, old, ref, _, adv, mask, _ = make()
    with pytest.raises(ValueError, match="do not match"):
        linear_grpo_loss(hidden[:, :5], weight, targets, old, ref, adv, mask)
    with pytest.raises(ValueError, match="share dtype"):
        linear_grpo_loss(hidden.double(), weight, targets, old, ref, adv, mask)
    with pytest.raises(ValueError, match="out of range"):
        linear_grpo_loss(hidden, weight, targets + V, old, ref, adv, mask)


def test_sequence_masking_spans_chunks():
    """Sequence masking averages over a whole sequence: a chunk boundary inside a sequence must not matter."""
    hidden, weight, targets, old, _, rollout, adv, mask, seq_ids = make()
    rollout[7:14] = old[7:14] - 1.2  # sequence 1 drifts: its geometric-mean ratio leaves [0.5, 2]
    on = mask[7:14].bool()
    assert on.any() and torch.exp((old[7:14] - rollout[7:14]).double()[on].mean()) > 2.0
    cfg = PolicyLossConfig(seq_mask_range=(0.5, 2.0), token_mask_range=(0.4, 2.5))
    assert not cfg.token_separable
    fused, gh, gw = grads_of(lambda h, w: linear_policy_loss(
        h, w, targets, old_logp=old, ref_logp=None, advantages=adv, mask=mask, config=cfg, rollout_logp=rollout,
        seq_ids=seq_ids, chunk_size=5), hidden, weight)
    plain, gh_ref, gw_ref = grads_of(lambda h, w: grpo_loss_ref(
        h @ w.T, targets, old.double(), None, adv.double(), mask.double(), rollout_logp=rollout.double(),
        seq_mask_range=(0.5, 2.0), token_mask_range=(0.4, 2.5), seq_ids=seq_ids), hidden.double(), weight.double())
    # the masking changes the result: without it the loss differs
    unmasked = grpo_loss_ref(hidden.double() @ weight.double().T, targets, old.double(), None, adv.double(),
                             mask.double(), seq_ids=seq_ids)
    assert (unmasked - plain).abs() > 1e-3
    assert_close(fused, plain, TOL[torch.float32], "loss")
    assert_close(gh, gh_ref, TOL[torch.float32], "dhidden")
    assert_close(gw, gw_ref, TOL[torch.float32], "dweight")


def test_grad_output_scales_in_place_and_a_second_backward_is_refused():
    hidden, weight, targets, old, ref, rollout, adv, mask, seq_ids = make(torch.float32)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, seq_ids=seq_ids, chunk_size=8)
    _, gh, gw = grads_of(lambda h, w: linear_grpo_loss(h, w, targets, old, ref, adv, mask, **kw)[0] * -2.5,
                         hidden, weight)
    _, gh_ref, gw_ref = grads_of(
        lambda h, w: grpo_loss_ref(h @ w.T, targets, old.double(), ref.double(), adv.double(), mask.double(),
                                   beta=0.04, eps_high=0.28, seq_ids=seq_ids) * -2.5,
        hidden.double(), weight.double())
    assert_close(gh, gh_ref, TOL[torch.float32], "dhidden")
    assert_close(gw, gw_ref, TOL[torch.float32], "dweight")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, w, targets, old, ref, adv, mask, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("trainable", ["both", "hidden", "weight"])
def test_a_frozen_input_gets_no_gradient_gemm(trainable):
    """A frozen lm_head (or frozen hidden states) costs no gradient GEMM: counted FLOPs, one chunk (one mm each)."""
    hidden, weight, targets, old, ref, _, adv, mask, seq_ids = make(torch.float32)
    h = hidden.clone().requires_grad_(trainable in ("both", "hidden"))
    w = weight.clone().requires_grad_(trainable in ("both", "weight"))
    with FlopCounterMode(display=False) as flops:
        loss, _ = linear_grpo_loss(h, w, targets, old, ref, adv, mask, beta=0.04, seq_ids=seq_ids, chunk_size=N)
        loss.backward()
    gemm = 2 * N * H * V
    assert flops.get_total_flops() == (3 if trainable == "both" else 2) * gemm
    _, gh_ref, gw_ref = grads_of(
        lambda h, w: grpo_loss_ref(h @ w.T, targets, old.double(), ref.double(), adv.double(), mask.double(),
                                   beta=0.04, seq_ids=seq_ids), hidden.double(), weight.double())
    if h.requires_grad:
        assert_close(h.grad, gh_ref, TOL[torch.float32], "dhidden")
    if w.requires_grad:
        assert_close(w.grad, gw_ref, TOL[torch.float32], "dweight")
    assert (h.grad is None) != h.requires_grad and (w.grad is None) != w.requires_grad
