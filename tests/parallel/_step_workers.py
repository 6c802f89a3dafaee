"""Spawned workers for tests/parallel/test_step.py (must be importable by the child processes).

`layouts_worker(hf_dir, spec, layouts)` runs, for each (tp, pp, pack, num_microbatches, aggregation)
in turn on
the same process group: load the HF checkpoint into this layout, log-probs + entropy of the batch,
one train_step, the weights' change exported to HF names, and the log-probs after the step. Every
per-token result is returned per global sequence id (gathered over DP), so layouts that pack and
shard the batch differently compare directly.
"""
from __future__ import annotations


import torch
import torch.distributed as dist


def _per_sequence(batch, values: torch.Tensor, dp_group) -> dict[int, torch.Tensor]:
    """{sequence id: values at its completion tokens}, merged over the DP ranks."""
    local = {k: v.detach().cpu() for k, v in batch.completion_values(values).items()}
    if dist.get_world_size(dp_group) == 1:
        return local
    pieces = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(pieces, local, group=dp_group)
    merged: dict[int, torch.Tensor] = {}
    for piece in pieces:
        merged.update(piece)
    return merged


def _hf_state(model, names) -> dict[str, torch.Tensor]:
    from r1_engine.parallel.convert import export_hf_state

    return {k: v.detach().double().cpu().clone() for k, v in export_hf_state(model)
            if names is None or k in names}


def _run_layout(hf_dir: str, spec: dict, tp: int, pp: int, pack: bool, num_microbatches: int,
                aggregation: str, fused_lm_head: bool = False, ep: int = 1) -> dict:
    from r1_engine.kernels.loss_family import PolicyLossConfig
    from r1_engine.engine.batch import rl_rows, with_logprobs
    from r1_engine.engine.objectives import policy_objective
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.state import init_parallel
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.step import logprobs, train_step

    state = init_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
    dp_group = state.dp_group
    batch = rl_rows(spec["prompts"], spec["completions"], torch.as_tensor(spec["advantages"]),
                    rollout_logp=spec["rollout_logp"], pack=pack, max_tokens_per_row=spec["max_tokens_per_row"])
    local = batch.shard(state.dp_rank, state.dp_size)
    local = with_logprobs(local, old_logp=local.scatter_completion_values(spec["old_logp"]),
                          ref_logp=local.scatter_completion_values(spec["ref_logp"]))

    model = build_gpt_model(hf_dir)
    load_hf_checkpoint(model, hf_dir)
    temperature = spec["temperature"]
    logp, entropy = logprobs(model, local, temperature=temperature, micro_batch_size=1, return_entropy=True)
    out = {
        "logp": _per_sequence(local, logp, dp_group),
        "entropy": _per_sequence(local, entropy, dp_group),
    }

    names = spec["export_names"]
    before = _hf_state(model, names)
    ddp = wrap_for_training(model)
    optimizer = build_optimizer(ddp, lr=spec["lr"], eps=spec["adam_eps"], weight_decay=0.0,
                                grad_clip=spec["grad_clip"])
    config = PolicyLossConfig(**spec["loss"], aggregation=aggregation)
    out["metrics"] = train_step(ddp, optimizer, local, policy_objective(config, temperature),
                                num_microbatches=num_microbatches, fused_lm_head=fused_lm_head)
    after = _hf_state(model, names)
    out["delta"] = {k: after[k] - before[k] for k in before}
    out["logp_after"] = _per_sequence(local, logprobs(ddp, local, temperature=temperature, num_microbatches=2),
                                      dp_group)
    out["layout"] = dict(tp=tp, pp=pp, dp=state.dp_size, pack=pack, num_microbatches=num_microbatches,
                         aggregation=aggregation, rank=state.rank, ep=ep)
    return out


def layouts_worker(hf_dir: str, spec: dict, layouts: list[tuple]) -> list[dict]:
    return [_run_layout(hf_dir, spec, *layout) for layout in layouts]
