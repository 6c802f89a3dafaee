"""Shared pieces of the kernel benchmarks: inputs, the implementations compared, references, timing, byte counts.

Used by `bench_kernels.py` (pytest-benchmark; a one-shot correctness pass in CI) and `gpu_suite.py` (the one-call
GPU suite). Every implementation is wrapped in a `Runner`: `setup()` runs untimed before each call (it restores
inputs that an in-place backward overwrote) and `fn()` is the timed call, returning `Outputs` (the value and the
gradients) so that each implementation can be checked against a reference.

Implementations compared, for each op (token_logprobs, grpo_loss, linear_grpo_loss):
  ours          kernels.* (Triton statistics pass + loss on [N] vectors + gradient pass in backward)
  ours-inplace  the same with inplace_backward=True (the gradient overwrites the logits' storage)
  eager         what a typical trainer does (TRL's selective log-softmax): upcast the logits to fp32,
                log_softmax over V, gather, the GRPO formula on [B, L], autograd for the backward
  compiled      torch.compile of `eager`
  liger         Liger-Kernel's GRPO loss (liger_kernel.transformers.grpo_loss.triton_grpo_loss on logits,
                liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on hidden x lm_head), when importable
  matmul        (linear only) the bare lm_head matmul forward + backward: the floor of any fused lm_head loss
"""
from __future__ import annotations

import functools
import gc
import importlib.metadata
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

OPS = ("token_logprobs", "grpo_loss", "linear_grpo_loss")
LOGITS_IMPLS = ("ours", "ours-inplace", "eager", "compiled", "liger")
LINEAR_IMPLS = ("ours", "eager", "compiled", "liger", "matmul")


class Unavailable(Exception):
    """An implementation that cannot run here (library not importable, compile off on CPU, no such mode)."""


@dataclass(frozen=True)
class Sizes:
    batch: int  # sequences B
    seq_len: int  # tokens per sequence L
    vocab: int  # V
    hidden: int  # H (lm_head input width)

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq_len


# CI on CPU (Triton interpreter): tiny. GPU: 16K tokens, Qwen2.5-7B's vocabulary and hidden size.
CPU_SIZES = Sizes(batch=4, seq_len=16, vocab=1000, hidden=64)
GPU_SIZES = Sizes(batch=16, seq_len=1024, vocab=151_936, hidden=3_584)


@dataclass(frozen=True)
class LossSettings:
    """GRPO hyper-parameters shared by every implementation (k3 KL, seq-mean-token-mean)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.04
    temperature: float = 1.0


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


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class LossCase:
    """Inputs of a loss on logits, in the [B, L] layout every implementation accepts."""

    logits: torch.Tensor  # [B, L, V]
    targets: torch.Tensor  # [B, L] int64
    old_logp: torch.Tensor  # [B, L] fp32
    ref_logp: torch.Tensor  # [B, L] fp32
    advantages: torch.Tensor  # [B] fp32 (one per sequence)
    mask: torch.Tensor  # [B, L] fp32, every row has at least one token
    token_weights: torch.Tensor  # [B, L] fp32: dL/dlogp of the token_logprobs backward benchmark
    adv_tokens: torch.Tensor = field(init=False)  # [B, L] the advantages broadcast to tokens

    def __post_init__(self):
        self.adv_tokens = self.advantages[:, None].expand_as(self.mask).contiguous()

    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(self.logits.shape)


@dataclass
class LinearCase:
    """Inputs of a loss on hidden @ weight.T."""

    hidden: torch.Tensor  # [B, L, H]
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    adv_tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.adv_tokens = self.advantages[:, None].expand_as(self.mask).contiguous()


def _mask(batch, seq_len, full, generator, device):
    if full:
        return torch.ones(batch, seq_len, device=device)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator, device=device)
    return (torch.arange(seq_len, device=device)[None, :] < lengths[:, None]).float()


@torch.no_grad()
def _eager_logp_rows(logits_of_rows: Callable, n_rows: int, targets1d, temperature, chunk_rows=1024):
    """Eager fp32 log-probs computed a block of rows at a time (bounded memory), for the old/ref vectors."""
    out = torch.empty(n_rows, dtype=torch.float32, device=targets1d.device)
    for a in range(0, n_rows, chunk_rows):
        b = min(n_rows, a + chunk_rows)
        out[a:b] = eager_token_logprobs(logits_of_rows(a, b), targets1d[a:b], temperature)
    return out


def _near(logp, noise, generator):
    # old/ref log-probs near the current ones: ratios fall on both sides of the clip range
    return (logp + noise * torch.randn(logp.shape, generator=generator, device=logp.device)).contiguous()


def make_loss_case(sizes: Sizes, dtype, device, *, seed=0, full_mask=True, scale=3.0, temperature=1.0) -> LossCase:
    """Fresh random logits (never zeros: they time faster and hide unwritten outputs) and matching vectors."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    b, l, v = sizes.batch, sizes.seq_len, sizes.vocab
    logits = torch.randn(b, l, v, generator=g, device=device, dtype=dtype).mul_(scale)
    targets = torch.randint(0, v, (b, l), generator=g, device=device)
    flat = logits.view(-1, v)
    logp = _eager_logp_rows(lambda a, c: flat[a:c], b * l, targets.view(-1), temperature).view(b, l)
    return LossCase(logits=logits, targets=targets, old_logp=_near(logp, 0.2, g), ref_logp=_near(logp, 0.2, g),
                    advantages=torch.randn(b, generator=g, device=device), mask=_mask(b, l, full_mask, g, device),
                    token_weights=torch.randn(b, l, generator=g, device=device))


def make_linear_case(sizes: Sizes, dtype, device, *, seed=0, full_mask=True, scale=3.0,
                     temperature=1.0) -> LinearCase:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    b, l, v, h = sizes.batch, sizes.seq_len, sizes.vocab, sizes.hidden
    hidden = torch.randn(b, l, h, generator=g, device=device, dtype=dtype)
    # logits = hidden @ weight.T then have standard deviation ~ scale
    weight = torch.randn(v, h, generator=g, device=device, dtype=dtype).mul_(scale / math.sqrt(h))
    targets = torch.randint(0, v, (b, l), generator=g, device=device)
    flat = hidden.view(-1, h)
    logp = _eager_logp_rows(lambda a, c: flat[a:c] @ weight.t(), b * l, targets.view(-1), temperature).view(b, l)
    return LinearCase(hidden=hidden, weight=weight, targets=targets, old_logp=_near(logp, 0.2, g),
                      ref_logp=_near(logp, 0.2, g), advantages=torch.randn(b, generator=g, device=device),
                      mask=_mask(b, l, full_mask, g, device))


# ------------------------------------------------------------------------------- the eager trainer path


def eager_token_logprobs(logits, targets, temperature: float = 1.0):
    """TRL-style selective log-softmax: upcast to (at least) fp32, divide by T, log_softmax over V, gather."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, eps_low: float, eps_high: float,
                    beta: float, temperature: float):
    """GRPO as a trainer writes it on [B, L]: clipped surrogate + beta * k3 KL, mean over tokens then sequences."""
    logp = eager_token_logprobs(logits, targets, temperature)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    loss_t = -surrogate + beta * kl
    return ((loss_t * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def eager_linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, eps_low: float,
                           eps_high: float, beta: float, temperature: float):
    logits = hidden @ weight.t()
    return eager_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta,
                           temperature)


_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable, device: torch.device, allow_on_cpu: bool = False) -> Callable:
    """torch.compile(fn), one compiled object per function (so repeated runners reuse its graphs)."""
    if device.type != "cuda" and not allow_on_cpu:
        raise Unavailable("torch.compile reference runs on CUDA only (on CPU it costs minutes of C++ builds)")
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


# ------------------------------------------------------------------------------------------ Liger-Kernel


@functools.lru_cache(maxsize=None)
def liger_status() -> SimpleNamespace:
    """Liger-Kernel's GRPO entry points, or the reason it cannot be used here (ok=False)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:  # ImportError, or a triton/torch API mismatch inside liger
        return SimpleNamespace(ok=False, reason=f"liger-kernel not importable: {type(exc).__name__}: {exc}")
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return SimpleNamespace(ok=True, version=version, triton_grpo_loss=triton_grpo_loss,
                           selective_log_softmax=fused_selective_log_softmax,
                           FusedLinearGRPOLoss=LigerFusedLinearGRPOLoss)


def _liger():
    status = liger_status()
    if not status.ok:
        raise Unavailable(status.reason)
    return status


def _liger_logits(case: LossCase):
    """Liger's logits-based GRPO reads [B, L+1, V] (the trainer's logits before dropping the last position);
    the first L positions hold our logits, so every implementation sees the same numbers."""
    b, l, v = case.logits.shape
    buf = torch.empty(b, l + 1, v, dtype=case.logits.dtype, device=case.logits.device)

    def restore():
        buf[:, :l].copy_(case.logits)
        buf[:, l].copy_(case.logits[:, -1])

    restore()
    return buf, restore


# ------------------------------------------------------------------------------------------------ runners


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
        from kernels import token_logprobs

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
        liger = _liger()
        buf, _ = _liger_logits(case)

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
        from kernels import grpo_loss

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
        liger = _liger()
        buf, restore = _liger_logits(case)
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
        from kernels import linear_grpo_loss

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
        liger = _liger()
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


# --------------------------------------------------------------------------------- references and checks


def reference_outputs(op: str, case, backward: bool, settings: LossSettings = LossSettings(), *,
                      float64: bool = True, rows: torch.Tensor | None = None) -> Outputs:
    """The eager formula, in float64 on upcast inputs (small sizes) or as the fp32 trainer path (large ones).

    rows: keep only these token rows of dL/dlogits (a [N, V] reference is too large to hold at full size)."""
    upcast = (lambda t: t.detach().double()) if float64 else (lambda t: t.detach())
    s = settings
    if op == "linear_grpo_loss":
        h = upcast(case.hidden).requires_grad_(backward)
        w = upcast(case.weight).requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            loss = eager_linear_grpo_loss(h, w, case.targets, case.old_logp, case.ref_logp, case.advantages,
                                          case.mask, s.eps_low, s.eps_high, s.beta, s.temperature)
        grads = tuple(g.float() for g in torch.autograd.grad(loss, (h, w))) if backward else ()
        return Outputs(loss.detach().float(), grads)
    x = upcast(case.logits).requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        if op == "token_logprobs":
            value = eager_token_logprobs(x, case.targets, s.temperature)
            loss = (value * case.token_weights).sum()
        elif op == "grpo_loss":
            value = loss = eager_grpo_loss(x, case.targets, case.old_logp, case.ref_logp, case.advantages, case.mask,
                                           s.eps_low, s.eps_high, s.beta, s.temperature)
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


# ---------------------------------------------------------------------------------------- timing, memory


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    clock: str  # "cuda-events" or "wall"


def measure(runner: Runner, device, *, warmup: int = 2, min_reps: int = 5, max_reps: int = 30,
            target_s: float = 1.0) -> Timing:
    """Median time of runner.fn() over reps; runner.setup() before each call, outside the timed region.

    CUDA: events around each call (METHOD.md). CPU: wall clock after the call returns. The rep count is set
    from the last warm-up so that a measurement takes about target_s."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    last = 0.0
    for _ in range(max(1, warmup)):
        runner.setup()
        _sync(device)
        t0 = time.perf_counter()
        runner.fn()
        _sync(device)
        last = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(last, 1e-6))))
    times = []
    for _ in range(reps):
        runner.setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(device)
            start.record()
            runner.fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            runner.fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(median_ms=times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1]
                                                                                 + times[len(times) // 2]),
                  min_ms=times[0], max_ms=times[-1], reps=reps, clock="cuda-events" if cuda else "wall")


def peak_extra_memory(runner: Runner, device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it (outputs included)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    runner.setup()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = runner.fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- byte counts


def counted_bytes(op: str, backward: bool, sizes: Sizes, dtype: torch.dtype) -> tuple[int, str]:
    """Bytes the op must move through device memory under the three-pass design, and the formula.

    Forward: read the logits once (N*V*b) plus the per-token vectors. Forward + backward: + read the logits
    again and write dL/dlogits (2*N*V*b) plus the per-token vectors of the gradient pass. So fwd+bwd counts
    3*N*V*b: a kernel at 100% of the copy roofline under this count does exactly three passes.
    Per-token vectors: targets int64 (8 B); token_logprobs writes logp (4 B); grpo_loss reads old_logp, ref_logp,
    advantages, mask (16 B); the gradient pass reads targets, the row max and log-sum, entropy, dL/dlogp (24 B)."""
    n, v = sizes.n_tokens, sizes.vocab
    b = torch.finfo(dtype).bits // 8
    small_fwd = n * (8 + 4) if op == "token_logprobs" else n * (8 + 16)
    if not backward:
        return n * v * b + small_fwd, f"N*V*{b} + N*{small_fwd // n}"
    small = small_fwd + n * 24
    return 3 * n * v * b + small, f"3*N*V*{b} + N*{small // n}"


def linear_flops(sizes: Sizes) -> int:
    """lm_head forward + backward: three GEMMs of N x V x H (logits, dhidden, dweight)."""
    return 6 * sizes.n_tokens * sizes.vocab * sizes.hidden


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
