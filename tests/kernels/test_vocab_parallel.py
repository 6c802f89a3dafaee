"""Vocab-parallel forms on 2 and 3 gloo processes: the sharded result equals the unsharded one."""
import pytest
import torch

from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.kernels.linear_grpo import linear_policy_loss
from r1_engine.kernels.logits_loss import policy_loss
from r1_engine.kernels.logprobs import token_logprobs
from tests.kernels.helpers import TOL, assert_close, perturbed_vectors
from tests.parallel.dist_utils import run_distributed


def make_case(world: int, name: str):
    n, per, hdim = 13, 67, 24
    v = per * world  # Megatron's layout: equal shards
    temperature = 0.7
    logits = torch.randn(n, v) * 3
    logits[0, : per + 3] = float("-inf")  # a whole shard of -inf on rank 0 (and more)
    targets = torch.randint(0, v, (n,))
    targets[0], targets[1], targets[2] = v - 2, 0, v - 1  # row 0 aims at a finite logit
    old, ref, rollout = perturbed_vectors(logits, targets, temperature)
    hidden, weight = torch.randn(11, hdim), torch.randn(v, hdim) * 0.3
    targets2 = torch.randint(0, v, (11,))
    old2, ref2, rollout2 = perturbed_vectors(hidden @ weight.T, targets2, temperature)
    vec = dict(g=torch.randn(n), h=torch.randn(n), old=old, ref=ref, rollout=rollout, adv=torch.randn(n),
               mask=(torch.rand(n) > 0.2).float(), old2=old2, ref2=ref2, adv2=torch.randn(11),
               mask2=(torch.rand(11) > 0.2).float(), rollout2=rollout2, seq=torch.arange(n) // 5,
               seq2=torch.arange(11) // 4)
    cfg = dict(name=name, beta=0.04, entropy_coef=0.01, tis_cap=2.0 if name == "grpo" else None,
               eps_low=0.2 if name == "grpo" else 3e-4, eps_high=0.28 if name == "grpo" else 4e-4)
    if name != "grpo":
        vec["rollout"] = vec["rollout2"] = None
    return dict(logits=logits, targets=targets, vec=vec, cfg=cfg, temperature=temperature, hidden=hidden,
                weight=weight, targets2=targets2)


@pytest.mark.multiproc
@pytest.mark.parametrize("world,name", [(2, "grpo"), (3, "grpo"), (2, "gspo")])
def test_sharded_equals_unsharded(world, name):
    case = make_case(world, name)
    from tests.kernels import _vocab_parallel_worker as worker

    results = run_distributed(worker.run, world, case)
    logits, targets, vec, temperature = case["logits"], case["targets"], case["vec"], case["temperature"]
    cfg = PolicyLossConfig(**case["cfg"])
    # unsharded, same kernels
    z = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(z, targets, temperature, return_entropy=True)
    (logp * vec["g"] + ent * vec["h"]).sum().backward()
    grad_lp = z.grad.clone()
    z.grad = None
    loss, metrics = policy_loss(z, targets, old_logp=vec["old"], ref_logp=vec["ref"], advantages=vec["adv"],
                                mask=vec["mask"], config=cfg, temperature=temperature, rollout_logp=vec["rollout"],
                                seq_ids=vec["seq"])
    loss.backward()
    h = case["hidden"].clone().requires_grad_(True)
    w = case["weight"].clone().requires_grad_(True)
    lin, _ = linear_policy_loss(h, w, case["targets2"], old_logp=vec["old2"], ref_logp=vec["ref2"],
                                advantages=vec["adv2"], mask=vec["mask2"], config=cfg, temperature=temperature,
                                rollout_logp=vec["rollout2"], seq_ids=vec["seq2"])
    lin.backward()
    tol = TOL[torch.float32]
    for r in results:  # every rank holds the full per-token vectors and the same loss
        assert_close(r["logp"], logp, tol, "logp")
        assert_close(r["entropy"], ent, tol, "entropy")
        assert_close(r["loss"], loss, tol, "loss")
        assert_close(r["lin_loss"], lin, tol, "linear loss")
        assert_close(r["lin_gh"], h.grad, tol, "linear dhidden")
        for k in metrics:
            assert_close(r["metrics"][k], metrics[k], 1e-5, k)
    assert_close(torch.cat([r["grad_lp"] for r in results], -1), grad_lp, tol, "dlogits (logp+entropy)")
    assert_close(torch.cat([r["grad_loss"] for r in results], -1), z.grad, tol, "dlogits (loss)")
    assert_close(torch.cat([r["lin_gw"] for r in results], 0), w.grad, tol, "linear dweight")


@pytest.mark.multiproc
def test_unequal_shards_check_targets_without_a_collective_of_their_own():
    """Shards of unequal size (padding rows left out) with explicit vocab_start: the range check of the targets
    rides on the statistics' all-gather (no all_reduce, no host sync on CUDA), and an id outside every shard is
    refused on every rank."""
    from tests.kernels import _vocab_parallel_worker as worker

    sizes, n, temperature = (40, 27), 9, 0.9
    v = sum(sizes)
    logits = torch.randn(n, v) * 2
    targets = torch.randint(0, v, (n,))
    targets[0], targets[1] = v - 1, sizes[0]  # the last id, and the first id of the short shard
    results = run_distributed(worker.run_unequal, 2, dict(logits=logits, targets=targets, sizes=sizes,
                                                           temperature=temperature))
    z = logits.clone().requires_grad_(True)
    logp = token_logprobs(z, targets, temperature)
    logp.sum().backward()
    for r in results:
        assert r["all_reduce_calls"] == 0, "the loss paths must not add a collective per call"
        assert_close(r["logp"], logp, TOL[torch.float32], "logp")
        assert r["bad_high"] and "out of range" in r["bad_high"] and r["bad_low"] and "out of range" in r["bad_low"]
    assert_close(torch.cat([r["grad"] for r in results], -1), z.grad, TOL[torch.float32], "dlogits")
