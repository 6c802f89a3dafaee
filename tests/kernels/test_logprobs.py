"""token_logprobs (statistics + gradient passes) against the float64 reference, on fresh random inputs."""
import pytest
import torch

from r1_engine.kernels.logprobs import token_logprobs
from r1_engine.kernels.reference import token_logprobs_ref

from tests.kernels.helpers import TOL, assert_close, poisoned_allocations, random_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(logits, targets, temperature, rel, inplace=False):
    n = logits.shape[0]
    z = logits.clone().requires_grad_(True)
    with poisoned_allocations():
        logp, ent = token_logprobs(z, targets, temperature, return_entropy=True, inplace_backward=inplace)
    z64 = logits.double().requires_grad_(True)  # the same (rounded) inputs, exact arithmetic
    logp_ref, ent_ref = token_logprobs_ref(z64, targets, temperature)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, logp_ref, rel, "logp")
    assert_close(ent, ent_ref, rel, "entropy")
    g, h = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    with poisoned_allocations():
        (logp * g.float() + ent * h.float()).sum().backward()
    (logp_ref * g + ent_ref * h).sum().backward()
    assert z.grad.dtype == logits.dtype
    assert_close(z.grad, z64.grad, rel, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 7), (37, 1003), (19, 4099), (6, 4096)])  # tail block only (x2), full blocks + tail, full blocks only
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_matches_reference(dtype, n, v, temperature):
    logits = random_logits(n, v, dtype)
    targets = torch.randint(0, v, (n,))
    _check(logits, targets, temperature, TOL[dtype])


def test_large_vocabulary_qwen_size():
    v = 151_936
    logits = random_logits(3, v, torch.bfloat16, scale=2.0)
    targets = torch.tensor([0, v - 1, 12345])
    _check(logits, targets, 0.6, TOL[torch.bfloat16])


def test_extreme_logits_and_minus_inf():
    n, v = 6, 513
    logits = random_logits(n, v, torch.float32)
    logits[0, :5] = 1e4
    logits[1, 7] = -1e4
    logits[2, 100:300] = float("-inf")  # masked-out vocabulary entries
    logits[3, :] = -1e4
    logits[3, 11] = 1e4
    logits[4, :256] = float("-inf")  # a whole block of -inf before any finite value
    targets = torch.tensor([2, 7, 5, 11, 400, 3])
    _check(logits, targets, 0.6, TOL[torch.float32])
    _check(logits, targets, 1.0, TOL[torch.float32])


def test_inplace_backward_equals_out_of_place():
    logits = random_logits(23, 777, torch.bfloat16)
    targets = torch.randint(0, 777, (23,))
    grads = []
    for inplace in (False, True):
        z = logits.clone().requires_grad_(True)
        y = z * 1  # a non-leaf, like the lm_head output
        logp, ent = token_logprobs(y, targets, 0.8, return_entropy=True, inplace_backward=inplace)
        (logp.sum() + 0.1 * ent.sum()).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_leading_dims_and_zero_grad_rows():
    logits = random_logits(2 * 9, 301, torch.float32).view(2, 9, 301)
    targets = torch.randint(0, 301, (2, 9))
    z = logits.clone().requires_grad_(True)
    logp = token_logprobs(z, targets)
    assert logp.shape == (2, 9)
    mask = torch.zeros(2, 9)
    mask[0, 3:] = 1.0  # rows with zero upstream gradient take the no-read path
    (logp * mask).sum().backward()
    z64 = logits.double().requires_grad_(True)
    ref, _ = token_logprobs_ref(z64, targets, 1.0)
    (ref * mask.double()).sum().backward()
    assert_close(z.grad, z64.grad, TOL[torch.float32], "dlogits")
    assert (z.grad[1] == 0).all()


@pytest.mark.slow
def test_more_than_65535_rows():
    n, v = 70_000, 17
    logits = random_logits(n, v, torch.float32)
    targets = torch.randint(0, v, (n,))
    _check(logits, targets, 1.0, TOL[torch.float32])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 10), torch.randint(0, 10, (5,))), "does not match"),
        (lambda: (torch.randn(4, 10), torch.randint(0, 10, (4,)).float()), "token ids"),
        (lambda: (torch.randint(0, 3, (4, 10)), torch.randint(0, 10, (4,))), "dtype"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, 1, 10, 2])), "out of range"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, -1, 3, 2])), "out of range"),
        (lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long, device="meta")), "on meta"),
    ],
)
def test_bad_input_raises_clear_error(make, match):
    logits, targets = make()
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, targets)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("stats,grad", [((16, 1), (32, 2)), ((512, 4), (64, 1))])
def test_any_launch_configuration_gives_the_same_result(stats, grad):
    """The tuner (benchmarks/gpu_suite.py `tune`) swaps BLOCK_V/num_warps: every pair must stay exact,
    including blocks that do not divide V and a -inf block straddling a block edge."""
    from r1_engine.kernels import logprobs

    logits = random_logits(9, 1003, torch.float32)
    logits[2, 10:40] = float("-inf")
    targets = torch.randint(0, 1003, (9,))
    targets[2] = 500  # a sampled token never has a -inf logit (a random one would give logp = -inf: a flaky test)
    saved = logprobs.set_launch("stats", *stats), logprobs.set_launch("grad", *grad)
    try:
        assert logprobs._launch("stats", 1003) == stats and logprobs._launch("grad", 1003) == grad
        _check(logits, targets, 0.7, TOL[torch.float32])
    finally:
        logprobs.set_launch("stats", *saved[0])
        logprobs.set_launch("grad", *saved[1])


@pytest.mark.parametrize("spec,match", [("stats=8192", "cannot parse"), ("forward=1024x4", "unknown pass"),
                                        ("grad=1000x4", "power-of-two"), ("grad=1024x3", "num_warps")])
def test_bad_launch_override_names_the_problem(spec, match):
    from r1_engine.kernels.logprobs import _parse_launch

    with pytest.raises(ValueError, match=match):
        _parse_launch(spec)
    assert _parse_launch(" stats=2048x16 , grad=4096x8") == {"stats": (2048, 16), "grad": (4096, 8)}
