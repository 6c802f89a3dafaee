"""The GRPO trainer's per-step record: what a step collected, and the metrics it logs (DP-reduced)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1_engine.engine.rewards import RewardOutput
from r1_engine.engine.rollout import RolloutBatch
from r1_engine.parallel.rows import PackedRows


@dataclass
class CollectedStep:
    """What one step trains on: the first sampling round (what the step's metrics describe), the packed
    mini-batches (with dynamic sampling, from the kept groups) and the step's extra metrics."""

    rollout: RolloutBatch
    scores: RewardOutput
    rewards: torch.Tensor
    minis: list[PackedRows]
    metrics: dict[str, float]


def step_metrics(step: CollectedStep, updates: list[dict[str, float]], lr: float, seconds: float, *,
                 timings: dict[str, float], generated_tokens: int, ps) -> dict[str, float]:
    """One step's logged metrics, averaged over the data-parallel replicas (the same dict on every rank): rewards
    and their components (each over the rows of its kind), lengths, the train steps' means, timings, throughput
    and the step's extra metrics."""
    rollout, scores, rewards = step.rollout, step.scores, step.rewards
    lengths = rollout.lengths.double()
    m: dict[str, float] = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/truncated_frac": rollout.truncated.double().mean().item(),
        "reward/errors": float(scores.num_errors),
        "reward/timeouts": float(scores.num_timeouts),
        "optim/lr": lr,
    }
    counts = {}  # a component's mean is over the rows of its kind (NaN elsewhere): sums and counts, DP-reduced
    for name, values in scores.components.items():
        kept = [v for v in values if not math.isnan(v)]
        m[f"reward/{name}"], counts[f"reward/{name}"] = sum(kept), float(len(kept))
    for key in updates[0]:
        m[f"train/{key}"] = sum(u[key] for u in updates) / len(updates)
    m.update(timings)
    m["time/step"] = seconds
    tokens = sum(len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids))
    m["throughput/tokens_per_s"] = tokens * ps.dp_size / max(seconds, 1e-9)
    m["throughput/rollout_tokens_per_s"] = generated_tokens / max(m.get("time/rollout", 1e-9), 1e-9)
    m.update(step.metrics)  # the same keys on every rank (they follow the config)
    keys, count_keys = sorted(m), sorted(counts)
    if ps.dp_size > 1:  # a rank may have drawn rows of one kind only (reasoning, no general): the union of the keys,
        everyone = [None] * ps.dp_size  # a component a rank lacks counts 0 rows there
        dist.all_gather_object(everyone, (keys, count_keys), group=ps.dp_group)
        keys = sorted({k for ks, _ in everyone for k in ks})
        count_keys = sorted({k for _, cs in everyone for k in cs})
        m = {k: m.get(k, 0.0) for k in keys}
        counts = {k: counts.get(k, 0.0) for k in count_keys}
    t = torch.tensor([m[k] for k in keys] + [counts[k] for k in count_keys], dtype=torch.float64)
    if ps.dp_size > 1:  # average over data-parallel replicas
        t = t.to(ps.device)
        dist.all_reduce(t, group=ps.dp_group)
        t = t.cpu()
    values = dict(zip(keys, (t[:len(keys)] / ps.dp_size).tolist()))
    for k, c in zip(count_keys, t[len(keys):].tolist()):
        if c > 0:
            values[k] = values[k] * ps.dp_size / c
        else:
            del values[k]  # no row of this kind in the step
    for short, key in (("accuracy", "reward/accuracy"), ("format_rate", "reward/format")):
        if key in values:  # over the reasoning rows
            values[short] = values[key]
    return values
