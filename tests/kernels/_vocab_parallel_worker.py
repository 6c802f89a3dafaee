"""Worker for test_vocab_parallel: each rank holds a vocab shard and must reproduce the unsharded result."""
import torch.distributed as dist

import torch

from r1_engine.kernels.loss_family import PolicyLossConfig
from r1_engine.kernels.linear_grpo import linear_policy_loss
from r1_engine.kernels.logits_loss import policy_loss
from r1_engine.kernels.logprobs import token_logprobs


def run(case: dict):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    logits, targets, vec, cfg_kw, temperature = (case[k] for k in ("logits", "targets", "vec", "cfg", "temperature"))
    v = logits.shape[-1]
    per = v // world
    shard = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    out = {}
    logp, ent = token_logprobs(shard, targets, temperature, return_entropy=True, tp_group=group)
    (logp * vec["g"] + ent * vec["h"]).sum().backward()
    out["logp"], out["entropy"], out["grad_lp"] = logp.detach(), ent.detach(), shard.grad.clone()

    shard.grad = None
    cfg = PolicyLossConfig(**cfg_kw)
    loss, metrics = policy_loss(shard, targets, old_logp=vec["old"], ref_logp=vec["ref"], advantages=vec["adv"],
                                mask=vec["mask"], config=cfg, temperature=temperature, rollout_logp=vec["rollout"],
                                seq_ids=vec["seq"], tp_group=group)
    loss.backward()
    out["loss"], out["grad_loss"], out["metrics"] = loss.detach(), shard.grad.clone(), metrics

    hidden, weight = case["hidden"], case["weight"]
    h = hidden.clone().requires_grad_(True)
    w = weight[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    t2 = case["targets2"]
    lin, _ = linear_policy_loss(h, w, t2, old_logp=vec["old2"], ref_logp=vec["ref2"], advantages=vec["adv2"],
                                rollout_logp=vec["rollout2"], mask=vec["mask2"], config=cfg, temperature=temperature,
                                seq_ids=vec["seq2"], tp_group=group, chunk_size=5)
    lin.backward()
    out["lin_loss"], out["lin_gh"], out["lin_gw"] = lin.detach(), h.grad.clone(), w.grad.clone()
    dist.destroy_process_group()
    return out


def run_unequal(case: dict):
    """Shards of case["sizes"] rows with explicit vocab_start; counts the all_reduce calls of the kernels."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    start = sum(case["sizes"][:rank])
    shard = case["logits"][:, start:start + case["sizes"][rank]].clone().requires_grad_(True)
    targets, temperature = case["targets"], case["temperature"]
    calls, real = [], dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        logp = token_logprobs(shard, targets, temperature, tp_group=group, vocab_start=start)
        logp.sum().backward()
        cfg = PolicyLossConfig(aggregation="token-mean")
        adv, mask = torch.ones_like(logp), torch.ones_like(logp)
        policy_loss(shard.detach(), targets, old_logp=None, ref_logp=None, advantages=adv, mask=mask, config=cfg,
                    tp_group=group, vocab_start=start)
        out = {"logp": logp.detach(), "grad": shard.grad.clone()}
        for name, bad in (("bad_high", sum(case["sizes"])), ("bad_low", -1)):
            wrong = targets.clone()
            wrong[3] = bad
            try:
                token_logprobs(shard.detach(), wrong, temperature, tp_group=group, vocab_start=start)
                out[name] = None
            except ValueError as err:
                out[name] = str(err)
    finally:
        dist.all_reduce = real
    out["all_reduce_calls"] = len(calls)
    dist.destroy_process_group()
    return out
