"""pytest-benchmark microbenchmarks of the fused kernels against the eager trainer path, torch.compile and Liger.

    pytest benchmarks -q                                   # CI (--benchmark-disable): one call each, checked
    pytest benchmarks --benchmark-enable -p no:cacheprovider --benchmark-columns=median,min,max   # timings

For each op (token_logprobs, grpo_loss: forward and forward + backward; linear_grpo_loss: forward + backward)
and each implementation (see harness.py), the benchmark body runs the op and the test asserts that its
result (value and gradients) agrees with a reference within the dtype's tolerance, so the CI pass (one call,
no timing) is a correctness check of every path, Liger's and torch.compile's included when they run.

Sizes: tiny on CPU (N=64, V=1000, H=64; the kernels run in Triton's interpreter), realistic on CUDA (N=16,384,
V=151,936, H=3,584, bf16), or R1_BENCH_SIZES="B,L,V,H". References: float64 eager on CPU; on CUDA the fp32
eager trainer path (a float64 [N, V] does not fit), with dL/dlogits compared on 1,024 sampled rows.
pytest-benchmark times with the host clock, so each CUDA call ends with a synchronize; gpu_suite.py is the
place for CUDA-event timings, bandwidth and memory.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import LINEAR_IMPLS, LOGITS_IMPLS, LossSettings, Sizes
from kernels.reference import grpo_loss_ref, token_logprobs_ref

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
    return harness.GPU_SIZES if ON_CUDA else harness.CPU_SIZES


SIZES = _sizes()
# float64 references while they fit easily; beyond that the fp32 trainer path on sampled rows
FLOAT64_REF = SIZES.n_tokens * SIZES.vocab <= 4_000_000
ROUNDS, WARMUP = (10, 2) if ON_CUDA else (3, 1)


@pytest.fixture(scope="module")
def loss_case():
    case = harness.make_loss_case(SIZES, DTYPE, DEVICE, seed=0)
    yield case
    harness.free_memory(DEVICE)


@pytest.fixture(scope="module")
def linear_case():
    case = harness.make_linear_case(SIZES, DTYPE, DEVICE, seed=1)
    yield case
    harness.free_memory(DEVICE)


@pytest.fixture(scope="module")
def sample_rows():
    n = SIZES.n_tokens
    if FLOAT64_REF:
        return None
    g = torch.Generator(device="cpu").manual_seed(2)
    return torch.randperm(n, generator=g)[:1024].sort().values.to(DEVICE)


_REFERENCES: dict = {}


def _reference(op, case, backward, rows):
    key = (op, backward, id(case))
    if key not in _REFERENCES:
        _REFERENCES.clear()  # one reference alive at a time: at CUDA sizes they are large
        harness.free_memory(DEVICE)
        _REFERENCES[key] = harness.reference_outputs(op, case, backward, SETTINGS, float64=FLOAT64_REF, rows=rows)
    return _REFERENCES[key]


def _run(benchmark, op, impl, case, backward, rows):
    try:
        runner = harness.make_runner(op, impl, case, backward, SETTINGS)
    except harness.Unavailable as exc:
        pytest.skip(str(exc))

    def call():
        out = runner.fn()
        harness._sync(DEVICE)  # host-clock timing must wait for the device
        return out

    out = benchmark.pedantic(call, setup=runner.setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    if not runner.checkable:
        return
    ref = _reference(op, case, backward, rows)
    errors = harness.compare(out, ref, rows)
    tol = harness.tolerances(op, case.logits.dtype if hasattr(case, "logits") else case.hidden.dtype)
    benchmark.extra_info.update({f"rel_err_{k}": v for k, v in errors.items()})
    assert harness.check_passed(errors, tol), f"{op}/{impl}: relative errors {errors} exceed {tol}"
    if backward:  # a gradient was produced for every input
        assert len(out.grads) == len(ref.grads) > 0


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", LOGITS_IMPLS)
def test_token_logprobs(benchmark, loss_case, sample_rows, impl, mode):
    benchmark.group = f"token_logprobs {mode}"
    _run(benchmark, "token_logprobs", impl, loss_case, mode == "fwd+bwd", sample_rows)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", LOGITS_IMPLS)
def test_grpo_loss(benchmark, loss_case, sample_rows, impl, mode):
    benchmark.group = f"grpo_loss {mode}"
    _run(benchmark, "grpo_loss", impl, loss_case, mode == "fwd+bwd", sample_rows)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_grpo_loss(benchmark, linear_case, impl):
    benchmark.group = "linear_grpo_loss fwd+bwd"
    _run(benchmark, "linear_grpo_loss", impl, linear_case, True, None)


@pytest.fixture(scope="module")
def small_case():
    return harness.make_loss_case(harness.CPU_SIZES, DTYPE, DEVICE, seed=3, full_mask=False, temperature=0.7)


def test_bench_reference_matches_spec_reference(small_case):
    """The eager formula used as the benchmarks' reference agrees with kernels/reference.py (GRPO_SPEC.md)."""
    s = LossSettings(temperature=0.7)
    loss_case = small_case
    logits64 = loss_case.logits.double()
    logp, _ = token_logprobs_ref(logits64, loss_case.targets, s.temperature)
    ours = harness.eager_token_logprobs(logits64, loss_case.targets, s.temperature)
    assert torch.allclose(ours, logp, rtol=0, atol=1e-12)
    x1 = logits64.clone().requires_grad_(True)
    x2 = logits64.clone().requires_grad_(True)
    expected = grpo_loss_ref(x1, loss_case.targets, loss_case.old_logp.double(), loss_case.ref_logp.double(),
                             loss_case.adv_tokens.double(), loss_case.mask.double(), eps_low=s.eps_low,
                             eps_high=s.eps_high, beta=s.beta, kl="k3", temperature=s.temperature)
    got = harness.eager_grpo_loss(x2, loss_case.targets, loss_case.old_logp, loss_case.ref_logp,
                                  loss_case.advantages, loss_case.mask, s.eps_low, s.eps_high, s.beta, s.temperature)
    assert abs(got.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    expected.backward()
    got.backward()
    assert torch.allclose(x2.grad, x1.grad, rtol=0, atol=1e-12)


def test_check_rejects_wrong_results(small_case):
    """The agreement check used above can fail: a perturbed gradient, a NaN or a missing gradient is caught."""
    loss_case = small_case
    ref = harness.reference_outputs("grpo_loss", loss_case, True, SETTINGS, float64=True)
    tol = harness.tolerances("grpo_loss", DTYPE)
    good = harness.Outputs(ref.value.clone(), (ref.grads[0].clone().view(loss_case.logits.shape),))
    assert harness.check_passed(harness.compare(good, ref), tol)
    bad = harness.Outputs(ref.value.clone(), (ref.grads[0].view(loss_case.logits.shape) * 1.05,))
    assert not harness.check_passed(harness.compare(bad, ref), tol)
    nan = harness.Outputs(ref.value * float("nan"), good.grads)
    assert not harness.check_passed(harness.compare(nan, ref), tol)
    assert not harness.check_passed(harness.compare(harness.Outputs(ref.value), ref), tol)
