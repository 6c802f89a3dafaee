"""pytest-benchmark microbenchmarks of the fused kernels against the eager trainer path, torch.compile and Liger.

    pytest benchmarks -q                                   # CI (--benchmark-disable): one call each, checked
    pytest benchmarks --benchmark-enable -p no:cacheprovider --benchmark-columns=median,min,max   # timings

For each op (token_logprobs, grpo_loss: forward and forward + backward; linear_grpo_loss: forward + backward)
and each implementation (see runners.py), the benchmark body runs the op and the test asserts that its
result (value and gradients) agrees with a reference within the dtype's tolerance, so the CI pass (one call,
no timing) is a correctness check of every path, Liger's and torch.compile's included when they run.

Sizes: tiny on CPU (N=64, V=1000, H=64; the kernels run in Triton's interpreter), realistic on CUDA (N=16,384,
V=151,936, H=3,584, bf16), or R1_BENCH_SIZES="B,L,V,H". References: kernels/reference.py in float64 on CPU;
on CUDA the fp32 eager trainer path (a float64 [N, V] does not fit), with dL/dlogits compared on 1,024 sampled
rows.
pytest-benchmark times with the host clock, so each CUDA call ends with a synchronize; gpu_suite.py is the
place for CUDA-event timings, bandwidth and memory.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.baselines import Unavailable, eager_grpo_loss, eager_token_logprobs
from benchmarks.cases import CPU_SIZES, GPU_SIZES, LossSettings, Sizes, input_dtype, make_linear_case, make_loss_case
from benchmarks.checks import check_passed, compare, reference_outputs, rel_error, sample_rows, tolerances
from benchmarks.runners import LINEAR_IMPLS, LOGITS_IMPLS, Outputs, make_runner
from benchmarks.timing import free_memory, sync
from r1_engine.kernels.reference import grpo_loss_ref, token_logprobs_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16
SETTINGS = LossSettings()


def _sizes() -> Sizes:
    env = os.environ.get("R1_BENCH_SIZES")
    if env:
        try:
            b, l, v, h = (int(x) for x in env.split(","))
        except ValueError as exc:
            raise ValueError(f"R1_BENCH_SIZES must be 'B,L,V,H' integers, got {env!r}") from exc
        return Sizes(b, l, v, h)
    return GPU_SIZES if ON_CUDA else CPU_SIZES


SIZES = _sizes()
# float64 references while they fit easily; beyond that the fp32 trainer path on sampled rows
FLOAT64_REF = SIZES.n_tokens * SIZES.vocab <= 4_000_000
ROUNDS, WARMUP = (10, 2) if ON_CUDA else (3, 1)


@pytest.fixture(scope="module")
def loss_case():
    case = make_loss_case(SIZES, DTYPE, DEVICE, seed=0)
    yield case
    free_memory(DEVICE)


@pytest.fixture(scope="module")
def linear_case():
    case = make_linear_case(SIZES, DTYPE, DEVICE, seed=1)
    yield case
    free_memory(DEVICE)


@pytest.fixture(scope="module")
def grad_rows():
    return None if FLOAT64_REF else sample_rows(SIZES.n_tokens, DEVICE)


_REFERENCES: dict = {}


def _reference(op, case, backward, rows):
    key = (op, backward, id(case))
    if key not in _REFERENCES:
        _REFERENCES.clear()  # one reference alive at a time: at CUDA sizes they are large
        free_memory(DEVICE)
        _REFERENCES[key] = reference_outputs(op, case, backward, SETTINGS, float64=FLOAT64_REF, rows=rows)
    return _REFERENCES[key]


def _run(benchmark, op, impl, case, backward, rows):
    try:
        runner = make_runner(op, impl, case, backward, SETTINGS)
    except Unavailable as exc:
        pytest.skip(str(exc))

    def call():
        out = runner.fn()
        sync(DEVICE)  # host-clock timing must wait for the device
        return out

    out = benchmark.pedantic(call, setup=runner.setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    if not runner.checkable:
        return
    ref = _reference(op, case, backward, rows)
    errors = compare(out, ref, rows)
    tol = tolerances(op, input_dtype(case))
    benchmark.extra_info.update({f"rel_err_{k}": v for k, v in errors.items()})
    assert check_passed(errors, tol), f"{op}/{impl}: relative errors {errors} exceed {tol}"
    if backward:  # a gradient was produced for every input
        assert len(out.grads) == len(ref.grads) > 0


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", LOGITS_IMPLS)
def test_token_logprobs(benchmark, loss_case, grad_rows, impl, mode):
    benchmark.group = f"token_logprobs {mode}"
    _run(benchmark, "token_logprobs", impl, loss_case, mode == "fwd+bwd", grad_rows)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", LOGITS_IMPLS)
def test_grpo_loss(benchmark, loss_case, grad_rows, impl, mode):
    benchmark.group = f"grpo_loss {mode}"
    _run(benchmark, "grpo_loss", impl, loss_case, mode == "fwd+bwd", grad_rows)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_grpo_loss(benchmark, linear_case, impl):
    benchmark.group = "linear_grpo_loss fwd+bwd"
    _run(benchmark, "linear_grpo_loss", impl, linear_case, True, None)


@pytest.fixture(scope="module")
def small_case():
    return make_loss_case(CPU_SIZES, DTYPE, DEVICE, seed=3, full_mask=False, temperature=0.7)


def _spec_loss(x, case, s):
    return grpo_loss_ref(x, case.targets, case.old_logp.to(x.dtype), case.ref_logp.to(x.dtype),
                         case.adv_tokens.to(x.dtype), case.mask.to(x.dtype), eps_low=s.eps_low, eps_high=s.eps_high,
                         beta=s.beta, kl="k3", temperature=s.temperature)


def test_eager_baseline_matches_spec_reference(small_case):
    """The eager baseline (the trainer path, timed) computes kernels/reference.py's GRPO (GRPO_SPEC.md): equal
    to 1e-12 on float64 inputs, and on bf16 inputs (as timed) equal to the spec run on their fp32 upcast."""
    s = LossSettings(temperature=0.7)
    case = small_case
    logits64 = case.logits.double()
    logp, _ = token_logprobs_ref(logits64, case.targets, s.temperature)
    assert torch.allclose(eager_token_logprobs(logits64, case.targets, s.temperature), logp, rtol=0, atol=1e-12)
    for dtype, spec_dtype, tol, grad_tol in ((torch.float64, torch.float64, 1e-10, 1e-12),
                                             (torch.bfloat16, torch.float32, 1e-6, 1e-4)):
        x_spec = case.logits.detach().to(spec_dtype).requires_grad_(True)
        x = case.logits.detach().to(dtype).requires_grad_(True)
        expected = _spec_loss(x_spec, case, s)
        got = eager_grpo_loss(x, case.targets, case.old_logp, case.ref_logp, case.advantages, case.mask,
                              s.eps_low, s.eps_high, s.beta, s.temperature)
        assert got.dtype == spec_dtype  # the upcast happens inside the baseline, as in a trainer
        assert abs(got.item() - expected.item()) <= tol * max(1.0, abs(expected.item())), dtype
        (g,), (g_spec,) = torch.autograd.grad(got, x), torch.autograd.grad(expected, x_spec)
        assert g.dtype == dtype
        # bf16: the baseline's gradient is the spec's rounded to bf16 (a rare 1-ulp difference at a rounding tie)
        assert rel_error(g, g_spec.to(dtype)) <= grad_tol, dtype


def test_check_rejects_wrong_results(small_case):
    """The agreement check used above can fail: a perturbed gradient, a NaN or a missing gradient is caught."""
    loss_case = small_case
    ref = reference_outputs("grpo_loss", loss_case, True, SETTINGS, float64=True)
    tol = tolerances("grpo_loss", DTYPE)
    good = Outputs(ref.value.clone(), (ref.grads[0].clone().view(loss_case.logits.shape),))
    assert check_passed(compare(good, ref), tol)
    bad = Outputs(ref.value.clone(), (ref.grads[0].view(loss_case.logits.shape) * 1.05,))
    assert not check_passed(compare(bad, ref), tol)
    nan = Outputs(ref.value * float("nan"), good.grads)
    assert not check_passed(compare(nan, ref), tol)
    assert not check_passed(compare(Outputs(ref.value), ref), tol)
