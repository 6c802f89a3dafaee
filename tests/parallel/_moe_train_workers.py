"""Spawned workers for tests/parallel/test_moe_train_rules.py (importable by the child processes)."""
from __future__ import annotations

import torch


def recompute_replay_worker(hf_dir: str) -> str:
    """PP = 2 with full activation recompute: train_step on replayed rows must raise before the schedule, on both
    stages; returns the message (or fails the rank)."""
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.moe import ROUTED_EXPERTS
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.state import init_parallel
    from r1_engine.parallel.step import train_step
    from tests.parallel.test_moe_train_rules import _rows

    init_parallel(tensor_parallel=1, pipeline_parallel=2)
    model = build_gpt_model(hf_dir, config_overrides=dict(recompute_granularity="full", recompute_method="uniform",
                                                          recompute_num_layers=1))
    load_hf_checkpoint(model, hf_dir)
    ddp = wrap_for_training(model)
    optimizer = build_optimizer(ddp, lr=1e-3)
    rows = _rows(8)
    b, s = rows.tokens.shape
    routed = torch.arange(4).expand(b, s, 3, 4).contiguous()  # any valid experts: the refusal comes first
    try:
        train_step(ddp, optimizer, rows.with_extras(**{ROUTED_EXPERTS: routed}), lambda mb, out: (None, {}),
                   num_microbatches=2)
    except ValueError as err:
        return str(err)
    raise AssertionError("train_step accepted routing replay with recompute under PP = 2")


def _flat_state(obj, prefix=""):
    """Every tensor (and number) of a nested optimizer state dict, by its path."""
    out = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flat_state(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(_flat_state(value, f"{prefix}/{i}"))
    elif torch.is_tensor(obj):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def ep_checkpoint_worker(hf_dir: str, out: str) -> dict:
    """EP = 2 on 4 ranks (DP = 4; the experts' optimizer on expert-DP groups of 2): one step, a checkpoint through
    engine.checkpoint, a fresh model and optimizer resumed from it; returns both optimizers' every tensor, the
    weights, and a second step's weights from the original and from the resumed run."""
    from r1_engine.engine.checkpoint import load_checkpoint, save_checkpoint
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.state import init_parallel
    from r1_engine.parallel.step import train_step
    from tests.parallel.test_moe_train_rules import _loss, _rows

    state = init_parallel(tensor_parallel=1, pipeline_parallel=1, expert_parallel=2)

    def fresh():
        model = build_gpt_model(hf_dir)
        load_hf_checkpoint(model, hf_dir)
        ddp = wrap_for_training(model)
        return model, ddp, build_optimizer(ddp, lr=1e-2, weight_decay=0.1, grad_clip=1.0)

    first = _rows(9).shard(state.dp_rank, state.dp_size)
    second = _rows(10).shard(state.dp_rank, state.dp_size)
    model, ddp, optimizer = fresh()
    train_step(ddp, optimizer, first, _loss, num_microbatches=1)
    save_checkpoint(out, 1, model=ddp, optimizer=optimizer, trainer_state={"step": 1})
    saved = _flat_state(optimizer.state_dict())
    resumed_model, resumed_ddp, resumed_optimizer = fresh()
    load_checkpoint(f"{out}/checkpoints/step_000001", model=resumed_ddp, optimizer=resumed_optimizer)
    loaded = _flat_state(resumed_optimizer.state_dict())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    resumed_weights = {n: p.detach().clone() for n, p in resumed_model.named_parameters()}
    expert_parts = [p for p in getattr(optimizer, "chained_optimizers", [optimizer])
                    if any(g.get("is_expert_parallel", False) for g in p.param_groups)]
    train_step(ddp, optimizer, second, _loss, num_microbatches=1)
    train_step(resumed_ddp, resumed_optimizer, second, _loss, num_microbatches=1)
    return {"saved": saved, "loaded": loaded, "weights": weights, "resumed_weights": resumed_weights,
            "after": {n: p.detach().clone() for n, p in model.named_parameters()},
            "resumed_after": {n: p.detach().clone() for n, p in resumed_model.named_parameters()},
            "expert_state_tensors": sum(len(p.state) for p in expert_parts), "rank": state.rank}


class DistributedOptimizer:
    """A stand-in for one part of Megatron's ChainedOptimizer of DistributedOptimizers (which need CUDA): its
    state is gathered on its DP group's rank 0 and scattered back from there, like Megatron's."""

    def __init__(self, group, expert: bool, tag: str):
        import torch.distributed as dist

        self.data_parallel_group = group
        self.param_groups = [{"is_expert_parallel": expert, "params": []}]
        self.tag = tag
        self.mine = torch.tensor([float(dist.get_rank())])
        self.loaded = None

    def get_parameter_state_dp_zero(self):
        import torch.distributed as dist

        pieces = [None] * self.data_parallel_group.size()
        dist.all_gather_object(pieces, self.mine, group=self.data_parallel_group)
        return {"tag": self.tag, "shards": torch.cat(pieces)} if self.data_parallel_group.rank() == 0 else None

    def load_parameter_state_from_dp_zero(self, state):
        import torch.distributed as dist

        box = [state]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.data_parallel_group, 0),
                                   group=self.data_parallel_group)
        self.loaded = box[0]


class _Chained:
    def __init__(self, parts):
        self.chained_optimizers = parts


def sharded_names_worker(out: str) -> dict:
    """Who writes which DistributedOptimizer state file with EP = 2 on 4 ranks, and what each part reads back."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from r1_engine.parallel.optim import load_sharded_optimizer_state, save_sharded_optimizer_state
    from r1_engine.parallel.state import init_parallel

    init_parallel(tensor_parallel=1, pipeline_parallel=1, expert_parallel=2)
    dense_group = mpu.get_data_parallel_group(with_context_parallel=True)
    expert_group = mpu.get_expert_data_parallel_group()
    ep = mpu.get_expert_model_parallel_rank()
    optimizer = _Chained([DistributedOptimizer(dense_group, False, "dense"),
                          DistributedOptimizer(expert_group, True, f"experts ep{ep}")])
    written = save_sharded_optimizer_state(optimizer, out)
    dist.barrier()
    load_sharded_optimizer_state(optimizer, out)
    return {"written": [p.name for p in written], "loaded": [p.loaded for p in optimizer.chained_optimizers],
            "groups": [dist.get_process_group_ranks(g) for g in (dense_group, expert_group)],
            "ep": ep}
