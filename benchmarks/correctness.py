"""The suite's `correctness` section: the kernels against float64 references (kernels/reference.py) on this
device, a few rows at the full vocabulary and a >65,535-row case, bf16 and fp32."""
from __future__ import annotations

from functools import partial

import torch

from benchmarks.cases import LossSettings, Sizes, make_linear_case, make_loss_case
from benchmarks.checks import compare, reference_outputs, rel_error, tolerances
from benchmarks.runners import Outputs, make_runner
from benchmarks.suite import Suite
from benchmarks.timing import free_memory

T = 0.7  # a temperature other than 1, so the 1/T factors of the value and the gradient are checked


def _logprobs(suite: Suite, case, label, dtype, tol):
    from r1_engine.kernels.logprobs import token_logprobs
    from r1_engine.kernels.reference import token_logprobs_ref

    with torch.no_grad():
        logp, ent = token_logprobs(case.logits, case.targets, T, return_entropy=True)
        ref_logp, ref_ent = token_logprobs_ref(case.logits.double(), case.targets, T)
    suite.check(f"token_logprobs, {label}", dtype, "logp", rel_error(logp, ref_logp), tol["value"])
    suite.check(f"token_logprobs, {label}", dtype, "entropy", rel_error(ent, ref_ent), tol["value"])


def _grpo(suite: Suite, case, label, dtype, tol):
    """Loss and dL/dlogits with and without inplace_backward, and exact zeros on masked tokens."""
    settings = LossSettings(temperature=T)
    ref = reference_outputs("grpo_loss", case, True, settings, float64=True)
    for impl in ("ours", "ours-inplace"):
        runner = make_runner("grpo_loss", impl, case, True, settings)
        runner.setup()
        out = runner.fn()
        errors = compare(out, ref)
        name = f"grpo_loss {impl}, {label}"
        suite.check(name, dtype, "loss", errors["value"], tol["value"])
        suite.check(name, dtype, "dL/dlogits", errors["grad0"], tol["grad"])
        masked = out.grads[0].detach()[case.mask == 0]
        suite.check(name, dtype, "max abs dL/dlogits on masked tokens",
                    float(masked.abs().max()) if masked.numel() else 0.0, 0.0)
        del out, runner


def _grpo_variants(suite: Suite, case, label, dtype, tol):
    """Entropy bonus (the gradient pass's entropy term), dual clip and token-mean vs the spec reference."""
    from r1_engine.kernels.logits_loss import grpo_loss
    from r1_engine.kernels.reference import grpo_loss_ref

    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.04, kl="k3", temperature=T,
              entropy_coef=0.01, aggregation="token-mean")
    x = case.logits.detach().requires_grad_(True)
    loss, _ = grpo_loss(x, case.targets, case.old_logp, case.ref_logp, case.adv_tokens, case.mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = case.logits.detach().double().requires_grad_(True)
    ref = grpo_loss_ref(x64, case.targets, case.old_logp.double(), case.ref_logp.double(),
                        case.adv_tokens.double(), case.mask.double(), **kw)
    (grad64,) = torch.autograd.grad(ref, x64)
    name = f"grpo_loss entropy bonus + dual clip + token-mean, {label}"
    suite.check(name, dtype, "loss", rel_error(loss, ref), tol["value"])
    suite.check(name, dtype, "dL/dlogits", rel_error(grad, grad64), tol["grad"])


def _linear(suite: Suite, sizes: Sizes, chunk: int, dtype):
    """linear_grpo_loss over 3 chunks of rows: loss, dL/dhidden, dL/dweight."""
    from r1_engine.kernels.linear_grpo import linear_grpo_loss

    case = make_linear_case(sizes, dtype, suite.device, seed=21, full_mask=False)
    s = suite.settings
    ref = reference_outputs("linear_grpo_loss", case, True, s, float64=True)
    hh = case.hidden.detach().requires_grad_(True)
    ww = case.weight.detach().requires_grad_(True)
    loss, _ = linear_grpo_loss(hh, ww, case.targets, case.old_logp, case.ref_logp, case.adv_tokens,
                               case.mask, eps_low=s.eps_low, eps_high=s.eps_high, beta=s.beta, kl="k3",
                               temperature=s.temperature, chunk_size=chunk)
    errors = compare(Outputs(loss.detach(), torch.autograd.grad(loss, (hh, ww))), ref)
    tol = tolerances("linear_grpo_loss", dtype)
    name = f"linear_grpo_loss, N={sizes.n_tokens} in chunks of {chunk}, V={sizes.vocab:,}, H={sizes.hidden:,}"
    suite.check(name, dtype, "loss", errors["value"], tol["value"])
    suite.check(name, dtype, "dL/dhidden", errors["grad0"], tol["grad"])
    suite.check(name, dtype, "dL/dweight", errors["grad1"], tol["grad"])


def correctness(suite: Suite):
    v, hid = suite.sizes.vocab, suite.sizes.hidden
    cases = [(f"few rows, V={v:,}", Sizes(2, 8, v, hid), False)]
    if suite.dry:
        cases.append(("many rows (dry run: 60 instead of 70,000)", Sizes(2, 30, 50, hid), True))
    else:
        cases.append((">65,535 rows (N=70,000, V=2,000)", Sizes(70, 1000, 2000, hid), True))
    for label, sizes, many in cases:
        for dtype in (torch.bfloat16, torch.float32):
            if suite.left() <= 0:
                return
            tol = tolerances("grpo_loss", dtype)
            case = make_loss_case(sizes, dtype, suite.device, seed=20, full_mask=False, temperature=T)
            args = (suite, case, label, dtype, tol)
            suite.guarded(f"token_logprobs, {label}", dtype, partial(_logprobs, *args))
            suite.guarded(f"grpo_loss, {label}", dtype, partial(_grpo, *args))
            if not many:
                suite.guarded(f"grpo_loss variants, {label}", dtype, partial(_grpo_variants, *args))
            args = case = None  # free the case before the next one
            free_memory(suite.device)

    lin_sizes, chunk = (Sizes(2, 20, v, hid), 16) if suite.dry else (Sizes(2, 300, v, hid), 256)
    for dtype in (torch.bfloat16, torch.float32):
        if suite.left() <= 0:
            return
        suite.guarded("linear_grpo_loss", dtype, partial(_linear, suite, lin_sizes, chunk, dtype))
