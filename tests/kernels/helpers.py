"""Shared test helpers for the kernel tests: fresh random inputs and tolerance checks."""
from __future__ import annotations

import contextlib

import torch

from r1_engine.kernels.reference import token_logprobs_ref

# METHOD.md tolerances: fp32 far under 1e-4 relative; bf16/fp16 <= 1e-2 (relative to the tensor's scale)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""):
    """max |a - e| <= rel * max(1, max |e|), and no NaN/inf anywhere in `actual`."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result"
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:.1e} x scale {scale:.3g}"


def random_logits(n: int, v: int, dtype, scale: float = 3.0, generator=None):
    return (torch.randn(n, v, generator=generator) * scale).to(dtype)


def perturbed_vectors(logits, targets, temperature, noise=0.3, generator=None):
    """old/ref/rollout log-probs near the current ones so ratios fall on both sides of the clip."""
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits.double(), targets, temperature)
    lp = lp.float()
    shape = lp.shape

    def near():
        return lp + noise * torch.randn(shape, generator=generator)

    return near(), near(), near()


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty / empty_like return NaN-filled tensors, so an unwritten output element shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(-(2 ** 30))
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def reference_logits(hidden64: torch.Tensor, weight64: torch.Tensor, dtype) -> torch.Tensor:
    """float64 logits hidden @ weight.T for the references of the lm_head-fused op. With bf16 inputs the fused op
    multiplies in bf16, so the values are the bf16 product's (rounded by the matmul) while the gradient is the
    float64 product's: the float64 loss of the logits the op really sees."""
    z = hidden64 @ weight64.T
    if dtype == torch.float32:
        return z
    rounded = (hidden64.detach().to(dtype) @ weight64.detach().to(dtype).T).double()
    return z + (rounded - z).detach()


def away_from_bounds(old: torch.Tensor, logp: torch.Tensor, bounds, margin: float = 0.06) -> torch.Tensor:
    """old log-probs moved so that no ratio exp(logp - old) lies within `margin` (in log) of a clip bound: with
    rounded (bf16) logits a ratio on a bound could fall on either side in the op and in the reference."""
    import math

    for b in bounds:
        near = ((logp.double() - old.double()) - math.log(b)).abs() < margin
        old = torch.where(near, old - 2 * margin, old)
    return old


def run_both(logits, targets, ours, ref):
    """(loss, loss_ref, dlogits, dlogits_ref, metrics) of our op (under poisoned allocations) and a float64
    reference on the same logits."""
    z = logits.clone().requires_grad_(True)
    with poisoned_allocations():
        loss, metrics = ours(z)
        loss.backward()
    z64 = logits.double().requires_grad_(True)
    loss_ref = ref(z64)
    loss_ref.backward()
    return loss, loss_ref, z.grad, z64.grad, metrics
