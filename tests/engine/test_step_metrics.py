"""engine.step_metrics under data parallelism: ranks whose rows are of different kinds (one drew only reasoning
prompts, the other general ones, as R1's stage 4 does) have different reward components; the reduction takes
their union instead of a collective of mismatched sizes (found by the foreign run, tests/recipes)."""
import math

import pytest
import torch

from tests.parallel.dist_utils import run_distributed


def _worker():
    import torch.distributed as dist

    from r1_engine.engine.rewards.compose import RewardOutput
    from r1_engine.engine.rollout.base import RolloutBatch
    from r1_engine.engine.step_metrics import CollectedStep, step_metrics
    from r1_engine.parallel.state import init_parallel

    ps = init_parallel(1, 1)
    rank = dist.get_rank()
    nan = float("nan")
    if rank == 0:  # two reasoning rows
        components = {"accuracy": [1.0, 0.0], "format": [1.0, 1.0]}
    else:  # two general rows: the rules' components are NaN, a reward model's are not
        components = {"accuracy": [nan, nan], "format": [nan, nan], "helpfulness": [0.5, 1.5]}
    rollout = RolloutBatch(prompt_ids=[[1], [1]], completion_ids=[[2, 3], [2]], completion_text=["a", "b"],
                           rollout_logp=[torch.zeros(2), torch.zeros(1)], finish_reason=["stop", "stop"], group_size=2)
    scores = RewardOutput(total=[1.0, 0.0], components=components)
    step = CollectedStep(rollout, scores, torch.tensor([1.0, 0.0], dtype=torch.float64), [], {})
    return step_metrics(step, [{"loss": float(rank)}], 1e-6, 1.0, timings={}, generated_tokens=3, ps=ps)


@pytest.mark.multiproc
def test_components_of_different_kinds_reduce_over_ranks():
    first, second = run_distributed(_worker, 2)
    assert first == second
    assert first["reward/accuracy"] == pytest.approx(0.5)  # over rank 0's two reasoning rows only
    assert first["reward/helpfulness"] == pytest.approx(1.0)  # over rank 1's two general rows only
    assert first["train/loss"] == pytest.approx(0.5) and not math.isnan(first["reward/format"])
