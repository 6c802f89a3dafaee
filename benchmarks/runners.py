"""Every implementation compared, wrapped in a `Runner` that the suite times and checks.

`setup()` runs untimed before each call (it restores inputs that an in-place backward overwrote) and `fn()` is
the timed call, returning `Outputs` (the value and the gradients) so that each implementation can be checked
against a reference (checks.py).

Implementations, for each op (token_logprobs, grpo_loss, linear_grpo_loss):
  ours          kernels.* (Triton statistics pass + loss on [N] vectors + gradient pass in backward)
  ours-inplace  the same with inplace_backward=True (the gradient overwrites the logits' storage)
  eager         the trainer path of py (fp32 selective log-softmax, GRPO on [B, L], autograd)
  compiled      torch.compile of `eager`
  liger         Liger-Kernel's GRPO loss (liger_kernel.transformers.grpo_loss.triton_grpo_loss on logits,
                liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on hidden x lm_head), when importable
  matmul        (linear only) the bare lm_head matmul forward + backward: the floor of any fused lm_head loss
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.baselines import (Unavailable, compiled, eager_grpo_loss, eager_linear_grpo_loss,
                                  eager_token_logprobs, liger_api, liger_logits)
from benchmarks.cases import LinearCase, LossCase, LossSettings

OPS = ("token_logprobs", "grpo_loss", "linear_grpo_loss")
LOGITS_IMPLS = ("ours", "ours-inplace", "eager", "compiled", "liger")
LINEAR_IMPLS = ("ours", "eager", "compiled", "liger", "matmul")


@dataclass
class Outputs:
    value: torch.Tensor  # logp [B, L] for token_logprobs, else the scalar loss
    grads: tuple = ()  # (dL/dlogits,) or (dL/dhidden, dL/dweight); empty for forward-only calls


def _noop():
    return None


@dataclass
class Runner:
    fn: Callable[[], Outputs]  # the timed call
    setup: Callable[[], None] = _noop  # untimed, before every call
    checkable: bool = True  # False for baselines that compute something else (the bare matmul)


def _autograd_runner(base: torch.Tensor, compute: Callable, backward: bool, clobbers: bool,
                     loss_of: Callable) -> Runner:
    """Runner for an op on one input tensor: forward under no_grad, or forward + autograd.grad of loss_of(out).

    autograd.grad (not .backward) so no .grad accumulation copies the gradient: what is timed and measured is
    producing dL/dinput. `clobbers`: the op writes the gradient into its input; work on a copy restored by setup."""
    work = base.clone() if clobbers else base

    def fn():
        if not backward:
            with torch.no_grad():
                return Outputs(compute(work))
        x = work.detach().requires_grad_(True)
        out = compute(x)
        (grad,) = torch.autograd.grad(loss_of(out), x)
        return Outputs(out.detach(), (grad,))

    def restore():  # returns None: pytest-benchmark treats a setup's return value as call arguments
        work.copy_(base)

    return Runner(fn=fn, setup=restore if clobbers else _noop)


def _token_logprobs_runner(impl, case: LossCase, backward, s: LossSettings, allow_compile_on_cpu) -> Runner:
    targets, t = case.targets, s.temperature
    if impl in ("ours", "ours-inplace"):
        from r1_engine.kernels.logprobs import token_logprobs

        inplace = impl == "ours-inplace"
        if inplace and not backward:
            raise Unavailable("inplace_backward only changes the backward")

        def compute(x):
            return token_logprobs(x, targets, t, inplace_backward=inplace)
    elif impl == "eager":
        def compute(x):
            return eager_token_logprobs(x, targets, t)
    elif impl == "compiled":
        f = compiled(eager_token_logprobs, case.logits.device, allow_compile_on_cpu)

        def compute(x):
            return f(x, targets, t)
    elif impl == "liger":
        if backward:
            raise Unavailable("Liger has no standalone token log-prob op with a backward (only inside its GRPO loss)")
        liger = liger_api()
        buf, _ = liger_logits(case)

        def fn():
            with torch.no_grad():
                return Outputs(liger.selective_log_softmax(buf, targets, t))

        return Runner(fn=fn)
    else:
        raise Unavailable(f"no implementation {impl!r} of token_logprobs")
    weights = case.token_weights
    return _autograd_runner(case.logits, compute, backward, clobbers=impl == "ours-inplace",
                            loss_of=lambda logp: (logp * weights).sum())


def _grpo_loss_runner(impl, case: LossCase, backward, s: LossSettings, allow_compile_on_cpu) -> Runner:
    args = (case.targets, case.old_logp, case.ref_logp)
    if impl in ("ours", "ours-inplace"):
        from r1_engine.kernels.logits_loss import grpo_loss

        inplace = impl == "ours-inplace"
        if inplace and not backward:
            raise Unavailable("inplace_backward only changes the backward")

        def compute(x):
            loss, _ = grpo_loss(x, *args, case.adv_tokens, case.mask, eps_low=s.eps_low, eps_high=s.eps_high,
                                beta=s.beta, kl="k3", temperature=s.temperature, inplace_backward=inplace)
            return loss
    elif impl in ("eager", "compiled"):
        f = eager_grpo_loss if impl == "eager" else compiled(eager_grpo_loss, case.logits.device,
                                                             allow_compile_on_cpu)

        def compute(x):
            return f(x, *args, case.advantages, case.mask, s.eps_low, s.eps_high, s.beta, s.temperature)
    elif impl == "liger":
        liger = liger_api()
        buf, restore = liger_logits(case)
        l = case.logits.shape[1]

        def call(x):
            # Liger's default inplace=True: its backward writes dL/dlogits over the logits, so setup restores them
            loss, _ = liger.triton_grpo_loss(x, case.old_logp, case.ref_logp, case.targets, case.advantages,
                                             completion_mask=case.mask, temperature=s.temperature, beta=s.beta,
                                             eps_low=s.eps_low, eps_high=s.eps_high, inplace=True,
                                             loss_type="grpo", reduce=True)
            return loss

        def fn():
            if not backward:
                with torch.no_grad():
                    return Outputs(call(buf))
            x = buf.detach().requires_grad_(True)
            loss = call(x)
            (grad,) = torch.autograd.grad(loss, x)
            return Outputs(loss.detach(), (grad[:, :l],))

        return Runner(fn=fn, setup=restore if backward else _noop)
    else:
        raise Unavailable(f"no implementation {impl!r} of grpo_loss")
    return _autograd_runner(case.logits, compute, backward, clobbers=impl == "ours-inplace", loss_of=lambda v: v)


def _linear_runner(impl, case: LinearCase, backward, s: LossSettings, allow_compile_on_cpu) -> Runner:
    device = case.hidden.device
    if impl == "ours":
        from r1_engine.kernels.linear_grpo import linear_grpo_loss

        def compute(h, w):
            loss, _ = linear_grpo_loss(h, w, case.targets, case.old_logp, case.ref_logp, case.adv_tokens, case.mask,
                                       eps_low=s.eps_low, eps_high=s.eps_high, beta=s.beta, kl="k3",
                                       temperature=s.temperature)
            return loss
    elif impl in ("eager", "compiled"):
        f = eager_linear_grpo_loss if impl == "eager" else compiled(eager_linear_grpo_loss, device,
                                                                    allow_compile_on_cpu)

        def compute(h, w):
            return f(h, w, case.targets, case.old_logp, case.ref_logp, case.advantages, case.mask, s.eps_low,
                     s.eps_high, s.beta, s.temperature)
    elif impl == "liger":
        liger = liger_api()
        # Liger's defaults as users run them: torch.compile of the loss math (CUDA), one sequence per chunk
        module = liger.FusedLinearGRPOLoss(beta=s.beta, compiled=device.type == "cuda", use_ref_model=True,
                                           epsilon_low=s.eps_low, epsilon_high=s.eps_high, loss_type="grpo",
                                           temperature=s.temperature)

        def compute(h, w):
            loss, _ = module(h, w, case.targets, case.mask, case.advantages, ref_per_token_logps=case.ref_logp,
                             old_per_token_logps=case.old_logp)
            return loss
    elif impl == "matmul":
        if not backward:
            raise Unavailable("the matmul baseline is timed forward + backward")
        b, l, _ = case.hidden.shape
        g = torch.Generator(device=device).manual_seed(1)
        grad_logits = torch.randn(b, l, case.weight.shape[0], generator=g, device=device, dtype=case.hidden.dtype)

        def fn():
            h = case.hidden.detach().requires_grad_(True)
            w = case.weight.detach().requires_grad_(True)
            logits = h @ w.t()
            grads = torch.autograd.grad(logits, (h, w), grad_logits)
            return Outputs(logits.new_zeros(()), grads)

        return Runner(fn=fn, checkable=False)
    else:
        raise Unavailable(f"no implementation {impl!r} of linear_grpo_loss")

    def fn():
        h = case.hidden.detach().requires_grad_(backward)
        w = case.weight.detach().requires_grad_(backward)
        if not backward:
            with torch.no_grad():
                return Outputs(compute(h, w))
        loss = compute(h, w)
        return Outputs(loss.detach(), torch.autograd.grad(loss, (h, w)))

    return Runner(fn=fn)


def make_runner(op: str, impl: str, case, backward: bool, settings: LossSettings = LossSettings(), *,
                allow_compile_on_cpu: bool = False) -> Runner:
    """The runner of `impl` for `op`; raises Unavailable when it cannot run here."""
    if op == "token_logprobs":
        return _token_logprobs_runner(impl, case, backward, settings, allow_compile_on_cpu)
    if op == "grpo_loss":
        return _grpo_loss_runner(impl, case, backward, settings, allow_compile_on_cpu)
    if op == "linear_grpo_loss":
        return _linear_runner(impl, case, backward, settings, allow_compile_on_cpu)
    raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
