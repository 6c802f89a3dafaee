"""Worker for test_vocab_parallel: each rank holds a vocab shard and must reproduce the unsharded result."""
import torch.distributed as dist

from kernels import PolicyLossConfig, linear_policy_loss, policy_loss, token_logprobs



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
                                tp_group=group)
    loss.backward()
    out["loss"], out["grad_loss"], out["metrics"] = loss.detach(), shard.grad.clone(), metrics

    hidden, weight = case["hidden"], case["weight"]
    h = hidden.clone().requires_grad_(True)
    w = weight[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    t2 = case["targets2"]
    lin, _ = linear_policy_loss(h, w, t2, old_logp=vec["old2"], ref_logp=vec["ref2"], advantages=vec["adv2"], rollout_logp=vec["rollout2"],
                                mask=vec["mask2"], config=cfg, temperature=temperature, tp_group=group, chunk_size=5)
    lin.backward()
    out["lin_loss"], out["lin_gh"], out["lin_gw"] = lin.detach(), h.grad.clone(), w.grad.clone()
    dist.destroy_process_group()
    return out
