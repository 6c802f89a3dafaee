"""What every timed implementation is checked against, and how agreement is measured.

References: kernels/reference.py (GRPO_SPEC.md's formulas) on float64 copies of the inputs wherever an [N, V]
float64 fits (CPU, the dry run, the device correctness checks); at benchmark sizes on the GPU, the eager fp32
trainer path (baselines.py) on the inputs as they are, with dL/dlogits kept on sampled token rows.
"""
from __future__ import annotations

import math

import torch

from benchmarks.baselines import eager_grpo_loss, eager_linear_grpo_loss, eager_token_logprobs
from benchmarks.cases import LossSettings
from benchmarks.runners import Outputs
from r1_engine.kernels.reference import grpo_loss_ref, token_logprobs_ref


def sample_rows(n_tokens: int, device, count: int = 1024) -> torch.Tensor:
    """Sorted token rows on which dL/dlogits is compared at full size (the [N, V] fp32 reference is ~10 GB)."""
    g = torch.Generator(device="cpu").manual_seed(2)
    return torch.randperm(n_tokens, generator=g)[:count].sort().values.to(device)


def _spec_grpo_loss(logits64, case, s: LossSettings):
    """grpo_loss_ref on float64: seq-mean-token-mean over the [B, L] rows (one sequence a row), k3 KL."""
    return grpo_loss_ref(logits64, case.targets, case.old_logp.double(), case.ref_logp.double(),
                         case.adv_tokens.double(), case.mask.double(), eps_low=s.eps_low, eps_high=s.eps_high,
                         beta=s.beta, kl="k3", temperature=s.temperature)


def reference_outputs(op: str, case, backward: bool, settings: LossSettings = LossSettings(), *,
                      float64: bool = True, rows: torch.Tensor | None = None) -> Outputs:
    """float64=True: the spec reference on float64 inputs (small sizes); else the eager fp32 trainer path.

    rows: keep only these token rows of dL/dlogits (a [N, V] reference is too large to hold at full size)."""
    leaf = (lambda t: t.detach().double().requires_grad_(backward)) if float64 else (
        lambda t: t.detach().requires_grad_(backward))
    s = settings
    if op == "linear_grpo_loss":
        h, w = leaf(case.hidden), leaf(case.weight)
        with torch.set_grad_enabled(backward):
            if float64:
                loss = _spec_grpo_loss(h @ w.t(), case, s)
            else:
                loss = eager_linear_grpo_loss(h, w, case.targets, case.old_logp, case.ref_logp, case.advantages,
                                              case.mask, s.eps_low, s.eps_high, s.beta, s.temperature)
        grads = tuple(g.float() for g in torch.autograd.grad(loss, (h, w))) if backward else ()
        return Outputs(loss.detach().float(), grads)
    x = leaf(case.logits)
    with torch.set_grad_enabled(backward):
        if op == "token_logprobs":
            value = (token_logprobs_ref(x, case.targets, s.temperature)[0] if float64
                     else eager_token_logprobs(x, case.targets, s.temperature))
            loss = (value * case.token_weights).sum()
        elif op == "grpo_loss":
            value = loss = _spec_grpo_loss(x, case, s) if float64 else eager_grpo_loss(
                x, case.targets, case.old_logp, case.ref_logp, case.advantages, case.mask, s.eps_low, s.eps_high,
                s.beta, s.temperature)
        else:
            raise ValueError(f"unknown op {op!r}")
    grads = ()
    if backward:
        (g,) = torch.autograd.grad(loss, x)
        g = g.reshape(-1, g.shape[-1])
        grads = ((g[rows] if rows is not None else g).float(),)
    return Outputs(value.detach().float(), grads)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """METHOD.md's ||out - ref|| / ||ref|| (a scalar: |out - ref| / max(1, |ref|)); inf on NaN/inf or a shape
    mismatch, so a broken output can never pass."""
    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    if a.numel() == 1:
        return float((a - e).abs().item() / max(1.0, abs(e.item())))
    denom = e.norm().item()
    return float((a - e).norm().item() / denom) if denom > 0 else float((a - e).norm().item())


def compare(out: Outputs, ref: Outputs, rows: torch.Tensor | None = None) -> dict[str, float]:
    """Relative errors of the value and each gradient (logits gradients restricted to `rows` if given)."""
    errors = {"value": rel_error(out.value.reshape(ref.value.shape) if out.value.numel() == ref.value.numel()
                                 else out.value, ref.value)}
    if len(out.grads) != len(ref.grads):
        errors["grads"] = math.inf
        return errors
    for i, (g, r) in enumerate(zip(out.grads, ref.grads)):
        if g.dim() == 3 and r.dim() == 2:  # dL/dlogits [B, L, V] against a reference of rows of [N, V]
            if rows is not None:  # index (sequence, position) pairs: no copy of a strided [B, L, V] view
                g = g[rows // g.shape[1], rows % g.shape[1]]
            else:
                g = g.reshape(-1, g.shape[-1])
        errors[f"grad{i}"] = rel_error(g, r)
    return errors


def tolerances(op: str, dtype: torch.dtype) -> dict[str, float]:
    """Allowed relative errors against the reference (METHOD.md: fp32 far under 1e-3, bf16 1e-3..1e-2).

    Logits ops: the value (logp or loss) is fp32 arithmetic on the same input numbers whatever the logits'
    dtype; a bf16/fp16 gradient carries one rounding. The linear op also rounds the logits to the input dtype
    (as the eager lm_head does) and accumulates dW over chunks, hence looser bounds."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if op == "linear_grpo_loss":
        return {"value": 1e-2 if low_precision else 1e-4, "grad": 3e-2 if low_precision else 1e-3}
    return {"value": 1e-4, "grad": 1e-2 if low_precision else 1e-4}


def check_passed(errors: dict[str, float], tol: dict[str, float]) -> bool:
    return all(err <= (tol["value"] if name == "value" else tol["grad"]) for name, err in errors.items())
