"""parallel/step.py: logprobs / train_step over Megatron's pipeline schedule under TP, PP, TP x PP and DP
against a float64 Hugging Face reference and against each other (workers in tests/parallel/_step_workers.py).

The distributed tests share one spawn per world size (1, 2, 4 processes); each spawn runs several
layouts in turn on the same process group. Every layout is compared with the float64 HF model
(log-probs, entropy, loss, grad norm, and the update of every weight, exported to HF names) and
with the one-process packed run at fp32 round-off. Adam's first step with lr = eps makes the
update a smooth, invertible function of the clipped gradient, so weights check gradients."""
from __future__ import annotations

import pytest
import torch

# ---------------------------------------------------------------------------------------------
# logprobs / train_step on a tiny Qwen2 against a float64 Hugging Face reference
# ---------------------------------------------------------------------------------------------

TEMPERATURE = 0.7
LOSS = dict(name="grpo", eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", entropy_coef=0.01, tis_cap=2.0)
SEQ_MEAN, TOKEN_MEAN = "seq-mean-token-mean", "token-mean"
LR, ADAM_EPS = 0.5, 0.5  # with Adam's first step, delta = -lr * g / (|g| + eps): smooth in the gradient
# fp32 weights reach ~0.7 (ulp 6e-8): a weight change carries a few ulps of round-off, while the
# updates themselves are ~1e-2, so a wrong scale, sign or missing micro-batch is far outside this.
WEIGHT_ATOL = 5e-7
PROMPT_LENGTHS = [5, 3, 6, 2, 4, 3, 2]
COMPLETION_LENGTHS = [7, 4, 2, 6, 0, 5, 3]  # one empty completion: it counts in no denominator
MAX_TOKENS_PER_ROW = 16  # packs the 7 sequences into 4 rows, several starting mid-row

# (tp, pp, pack, num_microbatches, aggregation); run one spawn per world size
REFERENCE = (1, 1, True, 1, SEQ_MEAN)
# the lm_head fused with the loss (kernels.linear_policy_loss); at TP=2 the last shard has fewer real rows
FUSED1, FUSED2 = (1, 1, True, 2, SEQ_MEAN, True), (2, 1, True, 2, SEQ_MEAN, True)
WORLD1 = [REFERENCE, (1, 1, True, 3, SEQ_MEAN), (1, 1, False, 2, SEQ_MEAN), (1, 1, True, 2, TOKEN_MEAN), FUSED1]
WORLD2 = [(2, 1, True, 2, SEQ_MEAN), (1, 2, True, 2, SEQ_MEAN), (1, 1, True, 2, SEQ_MEAN), (1, 1, True, 2, TOKEN_MEAN)]
WORLD4 = [(2, 2, True, 2, SEQ_MEAN)]


def _hf_per_sequence(model, prompts, completions):
    """float64 HF logits at the positions predicting each completion token, one sequence at a time."""
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0]
        p, c = len(prompt), len(completion)
        out.append((logits[p - 1 : p - 1 + c], torch.tensor(completion, dtype=torch.long)))
    return out


@pytest.fixture(scope="module")
def problem(tiny_qwen2_dir):
    """The batch, perturbed old/ref/rollout log-probs, and the float64 HF reference: log-probs,
    entropy, and for each aggregation the loss, the gradient and its norm."""
    from transformers import AutoModelForCausalLM

    from r1_engine.kernels.reference import grpo_loss_ref, token_logprobs_ref

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64, attn_implementation="eager")
    gen = torch.Generator().manual_seed(1234)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    completions = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in COMPLETION_LENGTHS]
    advantages = torch.randn(len(prompts), generator=gen, dtype=torch.float64)

    with torch.no_grad():
        pieces = _hf_per_sequence(hf, prompts, completions)
    logp = [token_logprobs_ref(z, y, TEMPERATURE)[0] for z, y in pieces]
    entropy = [token_logprobs_ref(z, y, TEMPERATURE)[1] for z, y in pieces]

    def jitter(values, scale):
        return [v + scale * (2 * torch.rand(v.shape, generator=gen, dtype=torch.float64) - 1) for v in values]

    old = jitter(logp, 0.4)  # ratios in [0.67, 1.49]: both clip edges and the inside occur
    ref = jitter(logp, 0.2)
    rollout = jitter(old, 0.15)

    def reference(aggregation):
        hf.zero_grad(set_to_none=True)
        pieces = _hf_per_sequence(hf, prompts, completions)
        lengths = [len(y) for _, y in pieces]
        seq_ids = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(lengths))
        loss = grpo_loss_ref(
            torch.cat([z for z, _ in pieces]), torch.cat([y for _, y in pieces]), torch.cat(old), torch.cat(ref),
            advantages[seq_ids], torch.ones(sum(lengths), dtype=torch.float64),
            eps_low=LOSS["eps_low"], eps_high=LOSS["eps_high"], beta=LOSS["beta"], kl=LOSS["kl"],
            temperature=TEMPERATURE, entropy_coef=LOSS["entropy_coef"], rollout_logp=torch.cat(rollout),
            tis_cap=LOSS["tis_cap"], aggregation=aggregation, seq_ids=seq_ids,
        )
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in hf.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values())).item()
        return {"loss": loss.item(), "grads": grads, "grad_norm": norm}

    refs = {SEQ_MEAN: reference(SEQ_MEAN), TOKEN_MEAN: reference(TOKEN_MEAN)}
    clip = 0.5 * refs[SEQ_MEAN]["grad_norm"]  # the clip is active in every run
    spec = dict(
        prompts=prompts, completions=completions, advantages=advantages.tolist(),
        old_logp=[v.tolist() for v in old], ref_logp=[v.tolist() for v in ref],
        rollout_logp=[v.tolist() for v in rollout], max_tokens_per_row=MAX_TOKENS_PER_ROW,
        temperature=TEMPERATURE, export_names=None, lr=LR, adam_eps=ADAM_EPS, grad_clip=clip, loss=LOSS,
    )
    # the clip is active on both sides: ratio below 1 - eps_low with A < 0, above 1 + eps_high with A > 0
    ratio = torch.exp(torch.cat(logp) - torch.cat(old))
    adv = torch.cat([torch.full((n,), float(a)) for n, a in zip(COMPLETION_LENGTHS, advantages)]).double()
    assert ((ratio < 1 - LOSS["eps_low"]) & (adv < 0)).any() and ((ratio > 1 + LOSS["eps_high"]) & (adv > 0)).any()
    return dict(spec=spec, logp=logp, entropy=entropy, refs=refs, clip=clip)


def _spawn(tiny_qwen2_dir, problem, world_size, layouts):
    from tests.parallel._step_workers import layouts_worker
    from tests.parallel.dist_utils import run_distributed

    per_rank = run_distributed(layouts_worker, world_size, str(tiny_qwen2_dir), problem["spec"], layouts)
    # every rank of every layout reports the same metrics and (DP replicas in sync) the same weights
    for rank_results in per_rank[1:]:
        for mine, first in zip(rank_results, per_rank[0]):
            assert mine["metrics"] == pytest.approx(first["metrics"], rel=1e-12), mine["layout"]
            for name, delta in first["delta"].items():
                torch.testing.assert_close(mine["delta"][name], delta, rtol=0, atol=0, msg=_named(name))
    return {layout: result for layout, result in zip(layouts, per_rank[0])}


@pytest.fixture(scope="module")
def world1(tiny_qwen2_dir, problem):
    return _spawn(tiny_qwen2_dir, problem, 1, WORLD1)


@pytest.fixture(scope="module")
def world2(tiny_qwen2_dir, problem):
    return _spawn(tiny_qwen2_dir, problem, 2, WORLD2 + [FUSED2])


@pytest.fixture(scope="module")
def world4(tiny_qwen2_dir, problem):
    return _spawn(tiny_qwen2_dir, problem, 4, WORLD4)


def _expected_delta(grad: torch.Tensor, clip: float, norm: float) -> torch.Tensor:
    """AdamW's first step (bias-corrected, no weight decay) on the clipped gradient."""
    g = grad * min(1.0, clip / (norm + 1e-6))
    return -LR * g / (g.abs() + ADAM_EPS)


def _named(what: str):
    """assert_close message: what failed, then torch's own account of the mismatch."""
    return lambda default: f"{what}: {default}"


def _assert_sequences_close(got: dict, want: list, atol: float, what: str):
    nonempty = [i for i, v in enumerate(want) if len(v) > 0]
    assert sorted(got) == nonempty, what
    for i in nonempty:
        torch.testing.assert_close(got[i].double(), want[i].double(), rtol=0, atol=atol, msg=_named(f"{what}, sequence {i}"))


def _assert_matches_hf(result, problem, aggregation):
    """fp32 Megatron vs float64 HF: log-probs, entropy, loss, grad norm, every weight's update."""
    ref = problem["refs"][aggregation]
    _assert_sequences_close(result["logp"], problem["logp"], 2e-5, "logp")
    _assert_sequences_close(result["entropy"], problem["entropy"], 2e-5, "entropy")
    metrics = result["metrics"]
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert metrics["num_tokens"] == sum(COMPLETION_LENGTHS)
    assert metrics["num_sequences"] == sum(1 for n in COMPLETION_LENGTHS if n > 0)
    assert set(result["delta"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        want = _expected_delta(grad, problem["clip"], ref["grad_norm"])
        torch.testing.assert_close(result["delta"][name], want, rtol=1e-4, atol=WEIGHT_ATOL, msg=_named(name))


def _assert_same_run(got, want):
    """Two layouts of the same computation agree to fp32 round-off."""
    for key in ("logp", "entropy", "logp_after"):
        assert sorted(got[key]) == sorted(want[key])
        for i in want[key]:
            # log-probs reach |logp| ~ 10 (fp32 ulp 1e-6) and logp_after carries the weight deltas' own
            # round-off (rtol 1e-5 below): an absolute 1e-5 alone sat at ~15 ulps, inside the noise of a reordering
            torch.testing.assert_close(got[key][i], want[key][i], rtol=2e-6, atol=1e-5, msg=_named(f"{key} {i}"))
    for key in ("loss", "grad_norm", "num_tokens", "num_sequences", "ratio", "kl", "entropy", "clip_low", "clip_high"):
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5, abs=1e-7), key
    for name, delta in want["delta"].items():
        torch.testing.assert_close(got["delta"][name], delta, rtol=1e-5, atol=WEIGHT_ATOL, msg=_named(name))


@pytest.mark.multiproc
def test_reference_layout_matches_float64_hf(world1, problem):
    result = world1[REFERENCE]
    _assert_matches_hf(result, problem, SEQ_MEAN)
    metrics = result["metrics"]
    # clipping happened on both sides (token means over the 27 completion tokens)
    assert 0 < metrics["clip_low"] < 1 and 0 < metrics["clip_high"] < 1
    assert metrics["update_successful"] == 1.0


@pytest.mark.multiproc
def test_token_mean_matches_float64_hf(world1, problem):
    _assert_matches_hf(world1[(1, 1, True, 2, TOKEN_MEAN)], problem, TOKEN_MEAN)


@pytest.mark.multiproc
def test_microbatch_count_does_not_change_the_step(world1):
    # 4 rows in 3 micro-batches: one padded with an empty row
    _assert_same_run(world1[(1, 1, True, 3, SEQ_MEAN)], world1[REFERENCE])


@pytest.mark.multiproc
def test_packed_equals_padded(world1):
    _assert_same_run(world1[(1, 1, False, 2, SEQ_MEAN)], world1[REFERENCE])


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", WORLD2, ids=["tp2", "pp2", "dp2", "dp2-token-mean"])
def test_two_process_layouts_match_one_process(world1, world2, problem, layout):
    aggregation = layout[-1]
    want = world1[REFERENCE] if aggregation == SEQ_MEAN else world1[(1, 1, True, 2, TOKEN_MEAN)]
    _assert_same_run(world2[layout], want)
    _assert_matches_hf(world2[layout], problem, aggregation)


# four processes on the 2-core test machine: ~25 s alone, ~55 s under load; worth it in CI
@pytest.mark.multiproc
def test_tp2_pp2_matches_one_process(world1, world4, problem):
    _assert_same_run(world4[WORLD4[0]], world1[REFERENCE])
    _assert_matches_hf(world4[WORLD4[0]], problem, SEQ_MEAN)


@pytest.mark.multiproc
@pytest.mark.parametrize("which", ["tp1", "tp2"])
def test_fused_lm_head_matches_unfused(world1, world2, problem, which):
    got = world1[FUSED1] if which == "tp1" else world2[FUSED2]
    _assert_same_run(got, world1[REFERENCE])
    _assert_matches_hf(got, problem, SEQ_MEAN)
