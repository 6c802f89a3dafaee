"""The kernels' torch path (CPU tensors outside the Triton interpreter: how a CPU run and cpu_bench.py execute them)
against the float64 references, in blocks of a few rows, and the chunk size chosen from a byte budget."""
import pytest
import torch

from r1_engine.kernels import linear_grpo, logprobs
from r1_engine.kernels.linear_grpo import linear_grpo_loss
from r1_engine.kernels.logprobs import token_logprobs
from r1_engine.kernels.reference import grpo_loss_ref, token_logprobs_ref
from tests.kernels.helpers import TOL, assert_close, away_from_bounds, reference_logits
from tests.kernels.test_linear_grpo import grads_of, make


@pytest.fixture
def torch_path(monkeypatch):
    """No interpreter (the torch path runs) and blocks of 3 rows (10 and 29 tokens do not divide into them)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v = 64
    monkeypatch.setattr(logprobs, "_TORCH_BLOCK_BYTES", 3 * 4 * v)
    assert logprobs._torch_rows(v) == 3 and not logprobs.use_triton(torch.zeros(1))
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_torch_path_matches_reference(torch_path, dtype):
    v = torch_path
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(10, v, generator=g)).to(dtype)
    logits[:, -5:] = float("-inf")  # padded vocabulary columns: p = 0 there, a gradient of exactly 0
    logits[3, 7] = -1e4  # exp underflows to 0 without being -inf
    targets = torch.randint(0, v - 5, (10,), generator=g)
    wl, we = torch.randn(10, generator=g), torch.randn(10, generator=g)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, targets, 0.7, return_entropy=True)
    ((logp * wl).sum() + (ent * we).sum()).backward()
    x64 = logits.double().requires_grad_(True)
    logp_ref, ent_ref = token_logprobs_ref(x64, targets, 0.7)
    ((logp_ref * wl.double()).sum() + (ent_ref * we.double()).sum()).backward()
    assert_close(logp, logp_ref, TOL[dtype], "logp")
    assert_close(ent, ent_ref, TOL[dtype], "entropy")
    assert_close(x.grad, x64.grad, TOL[dtype], "dL/dlogits")
    assert torch.all(x.grad[:, -5:] == 0)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_linear_grpo_torch_path_matches_reference(torch_path, monkeypatch, chunk_size):
    hidden, weight, targets, old, ref, rollout, adv, mask, seq_ids = make(torch.float32, 0.7)
    # a budget of 6 rows of fp32 logits: the default chunking cuts the 29 tokens into 5 chunks of 6
    monkeypatch.setitem(linear_grpo.CHUNK_BYTES, "cpu", 6 * weight.shape[0] * 4)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.04, "temperature": 0.7, "entropy_coef": 0.01,
          "dual_clip_c": 3.0, "tis_cap": 2.0}
    with torch.no_grad():
        lp = token_logprobs_ref(reference_logits(hidden.double(), weight.double(), torch.float32), targets, 0.7)[0]
    old = away_from_bounds(old, lp, (0.8, 1.28, 3.0))
    loss, gh, gw = grads_of(lambda h, w: linear_grpo_loss(h, w, targets, old, ref, adv, mask, rollout_logp=rollout,
                                                          seq_ids=seq_ids, chunk_size=chunk_size, **kw),
                            hidden, weight)
    loss_ref, gh_ref, gw_ref = grads_of(
        lambda h, w: grpo_loss_ref(h @ w.T, targets, old.double(), ref.double(), adv.double(), mask.double(),
                                   rollout_logp=rollout.double(), seq_ids=seq_ids, **kw),
        hidden.double(), weight.double())
    tol = TOL[torch.float32]
    assert_close(loss, loss_ref, tol, "loss")
    assert_close(gh, gh_ref, tol, "dhidden")
    assert_close(gw, gw_ref, tol, "dweight")


def test_default_chunk_size_from_a_byte_budget():
    # the CPU case: N = 4,096, V = 151,936 fp32 under 256 MiB -> 10 chunks of 410 tokens (243 MB of logits)
    assert linear_grpo.default_chunk_size(4096, 151_936, 4, 256 << 20) == 410
    # a GPU's 512 MiB of bf16 logits at N = 16,384: 10 chunks of 1,639 tokens
    assert linear_grpo.default_chunk_size(16_384, 151_936, 2, 512 << 20) == 1639
    assert linear_grpo.default_chunk_size(10, 100, 4, 1 << 30) == 10  # everything fits: one chunk
    assert linear_grpo.default_chunk_size(10, 100, 4, 1) == 1  # a budget below one row: one row a chunk
