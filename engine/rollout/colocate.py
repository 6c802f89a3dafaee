"""Colocated vLLM on every training rank: the rank/group plan, the prompt split and the gather of the results.

With more than one GPU, every training rank hosts its part of the rollout engine, in its own process and on its
own GPU (vLLM's `external_launcher` executor, as vLLM's torchrun example and TRL's colocate mode run it):

* vLLM's groups are laid out over the training world as ExternalDP x DP x PP x TP with TP fastest
  (vllm/distributed/parallel_state.py), so with vLLM's PP = DP = 1 its tensor-parallel groups are runs of
  `tp` consecutive ranks. Megatron's order tp-cp-ep-dp-pp makes its TP groups the same runs, so with vLLM's
  tensor_parallel_size = the trainer's TP, each Megatron TP group hosts one vLLM replica: world / tp replicas.
* The replica of (DP replica d, pipeline stage p) generates the p-th contiguous share of DP replica d's prompts
  (shares differ by at most one prompt); the TP ranks of a replica sample the same tokens (same seed,
  deterministic scheduling: vLLM's contract for this executor). The shares are then gathered over Megatron's
  pipeline group (the ranks of d with the same TP rank), so every rank of d holds d's whole RolloutBatch, in
  prompt order.
* Weights: `parallel.convert.export_hf_state` already hands every rank every full HF tensor (TP all-gather on
  the owning stage, broadcast over the pipeline group); each rank feeds them to its own vLLM worker, whose
  `load_weights` cuts its TP shard.
* Seeds: the call's seed plus the share's first prompt index x n, so the shares of one call (and the calls of
  the trainer's seed scheme) never reuse a seed; the same seed on the TP ranks of a replica.

Written against vLLM's sources (uniproc_executor.ExecutorWithExternalLauncher: RANK / LOCAL_RANK from the
environment, VLLM_ENABLE_V1_MULTIPROCESSING=0, free memory min-reduced over the world at start-up; the group
layout of parallel_state.initialize_model_parallel), never run: no vLLM on the machines this was written on.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from r1_engine.engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["ColocatePlan", "ColocatedRolloutEngine", "build_colocated_vllm", "concat_batches", "plan_colocated",
           "split_prompts"]


@dataclass(frozen=True)
class ColocatePlan:
    """Where one training rank sits in Megatron's grid (order tp-cp-ep-dp-pp) and which vLLM replica it hosts."""

    world_size: int
    rank: int
    tp_size: int
    pp_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def replica(self) -> int:
        """Index of this rank's vLLM replica: its run of tp consecutive ranks."""
        return self.rank // self.tp_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.tp_size

    @property
    def replica_ranks(self) -> list[int]:
        """The global ranks of this rank's vLLM replica (= its Megatron TP group)."""
        start = self.replica * self.tp_size
        return list(range(start, start + self.tp_size))

    @property
    def share_ranks(self) -> list[int]:
        """The ranks whose shares are gathered with this rank's (Megatron's pipeline group), in stage order."""
        return [self.tp_rank + self.tp_size * (self.dp_rank + self.dp_size * p) for p in range(self.pp_size)]


def plan_colocated(world_size: int, rank: int, tp_size: int, pp_size: int) -> ColocatePlan:
    """The plan of `rank`; ValueError when the layout does not divide the world."""
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"colocated vLLM: tensor_parallel={tp_size} and pipeline_parallel={pp_size} must be >= 1")
    if world_size < 1 or world_size % (tp_size * pp_size) != 0:
        raise ValueError(f"colocated vLLM: world size {world_size} is not a multiple of tensor_parallel * "
                         f"pipeline_parallel = {tp_size * pp_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"colocated vLLM: rank {rank} is outside [0, {world_size})")
    return ColocatePlan(world_size, rank, tp_size, pp_size)


def split_prompts(num_prompts: int, num_shares: int) -> list[tuple[int, int]]:
    """`num_shares` contiguous [start, stop) shares of `num_prompts` prompts, sizes differing by at most one (the
    first ones larger); a share may be empty when there are fewer prompts than shares."""
    if num_shares < 1:
        raise ValueError(f"split_prompts: num_shares must be >= 1, got {num_shares}")
    base, extra = divmod(num_prompts, num_shares)
    bounds, start = [], 0
    for i in range(num_shares):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def concat_batches(parts: Sequence[RolloutBatch], group_size: int) -> RolloutBatch:
    """The batches one after another (whole groups, prompt-major order kept); routed_experts stays None unless every
    part carries it."""
    fields = {name: [] for name in ("prompt_ids", "completion_ids", "completion_text", "rollout_logp",
                                    "finish_reason")}
    routed = [part.routed_experts is not None for part in parts]
    if any(routed) and not all(routed):
        raise RuntimeError("colocated vLLM: some shares carry routed_experts and others do not")
    if routed and all(routed):
        fields["routed_experts"] = []
    for part in parts:
        if part.group_size != group_size:
            raise RuntimeError(f"colocated vLLM: a share has group size {part.group_size}, expected {group_size}")
        for name, values in fields.items():
            values.extend(getattr(part, name))
    return RolloutBatch(**fields, group_size=group_size)


def _all_gather_objects(group: Any) -> Callable[[Any], list[Any]]:
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    return gather


class ColocatedRolloutEngine(RolloutEngine):
    """This rank's part of a colocated rollout engine. Every rank of the training world calls generate(),
    update_weights(), sleep() and wake() together (`collective` tells the trainer so); generate() returns the
    whole RolloutBatch of this rank's DP replica.

    local: this rank's engine (a VLLMRolloutEngine built with the external_launcher executor). gather: object ->
    list of every share's object in stage order over `plan.share_ranks` (default: all_gather_object over `group`,
    Megatron's pipeline group; injectable for tests)."""

    collective = True

    def __init__(self, local: RolloutEngine, plan: ColocatePlan, *, group: Any = None,
                 gather: Callable[[Any], list[Any]] | None = None):
        self.local = local
        self.plan = plan
        if gather is None:
            gather = (lambda obj: [obj]) if plan.pp_size == 1 else _all_gather_objects(group)
        self._gather = gather

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> RolloutBatch:
        start, stop = split_prompts(len(prompt_ids), self.plan.pp_size)[self.plan.pp_rank]
        mine: RolloutBatch | Exception | None = None
        if stop > start:
            seed = None if params.seed is None else params.seed + start * n
            try:
                mine = self.local.generate(prompt_ids[start:stop], n, dataclasses.replace(params, seed=seed))
            except Exception as err:  # noqa: BLE001  (every share must reach the gather, or the stages hang)
                mine = err
        shares = self._gather(mine)
        if len(shares) != self.plan.pp_size:
            raise RuntimeError(f"colocated vLLM: gathered {len(shares)} shares, expected {self.plan.pp_size}")
        for stage, share in enumerate(shares):
            if isinstance(share, Exception):  # a failed generation, not a type error
                message = f"colocated vLLM: generation failed on pipeline stage {stage}'s replica: {share!r}"
                raise RuntimeError(message) from (share if stage == self.plan.pp_rank else None)  # noqa: TRY004
        return concat_batches([s for s in shares if s is not None], n)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.local.update_weights(named_tensors)

    def sleep(self) -> None:
        self.local.sleep()

    def wake(self) -> None:
        self.local.wake()


def build_colocated_vllm(model_dir: str | Path, tokenizer: Any, *, dtype: str, seed: int,
                         gpu_memory_utilization: float, record_routing: bool = False,
                         max_model_len: int | None = None) -> ColocatedRolloutEngine:
    """This rank's part of a colocated vLLM for the initialised Megatron layout (parallel.state): to be called on
    every rank of the world together (vLLM's start-up reduces over the world). vLLM's TP = the trainer's TP.
    record_routing: VLLMRolloutEngine's (each completion's routed experts, for routing replay)."""
    import os

    import torch.distributed as dist
    from r1_engine.parallel.state import get_parallel_state

    from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

    ps = get_parallel_state()  # the trainer's layout (parallel.state initialises no context parallelism)
    plan = plan_colocated(dist.get_world_size(), dist.get_rank(), ps.tp_size, ps.pp_size)
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"colocated vLLM on {plan.world_size} ranks needs the torchrun environment "
                             f"({name} is not set): launch with torchrun")
    if torch.cuda.is_available():  # one share on every rank (the smallest free memory decides): equal KV caches
        from r1_engine.engine.rollout.vllm import memory_share

        share = torch.tensor([memory_share(gpu_memory_utilization, *torch.cuda.mem_get_info())],
                             dtype=torch.float64, device="cuda")
        dist.all_reduce(share, op=dist.ReduceOp.MIN)
        gpu_memory_utilization = float(share)
    local = VLLMRolloutEngine(
        str(model_dir), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, tokenizer=tokenizer,
        max_model_len=max_model_len,
        tensor_parallel_size=plan.tp_size, distributed_executor_backend="external_launcher",
        # the same seed on the TP ranks of a replica (vLLM requires it), another one per replica
        seed=seed + plan.replica, record_routing=record_routing)
    return ColocatedRolloutEngine(local, plan, group=ps.pp_group)
