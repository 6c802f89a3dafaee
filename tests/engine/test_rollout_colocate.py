"""engine.rollout.colocate on CPU: the rank/group plan against Megatron's own rank generator and vLLM's group
layout rule, the prompt split, and a whole world of colocated engines (threads standing in for ranks, fake local
engines recording which rank generated what) checked for who generates which prompts with which seed, and for
the gathered batches every rank gets back."""
import threading
from collections import defaultdict

import pytest
import torch

from r1_engine.engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from r1_engine.engine.rollout.colocate import (
    ColocatedRolloutEngine,
    concat_batches,
    plan_colocated,
    split_prompts,
)

LAYOUTS = [(1, 1, 1), (1, 1, 4), (2, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 2, 2), (4, 2, 1), (1, 4, 2),
           (2, 3, 2)]  # (tp, pp, dp)


def _megatron_groups(tp, pp, dp, kind):
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    return gen.get_ranks(kind)


def _vllm_tp_groups(world, tp):
    """vLLM's rule (parallel_state.initialize_model_parallel): ranks laid out as ExternalDP x DP x PP x PCP x TP,
    TP fastest; with vLLM's DP = PP = PCP = 1 its TP groups are rows of the [-1, tp] view."""
    return torch.arange(world).reshape(-1, 1, 1, 1, tp).view(-1, tp).tolist()


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_plan_matches_megatron_and_vllm_groups(tp, pp, dp):
    world = tp * pp * dp
    plans = [plan_colocated(world, rank, tp, pp) for rank in range(world)]
    megatron_tp = _megatron_groups(tp, pp, dp, "tp")
    megatron_pp = _megatron_groups(tp, pp, dp, "pp")
    megatron_dp = _megatron_groups(tp, pp, dp, "dp")
    assert sorted({tuple(p.replica_ranks) for p in plans}) == sorted(map(tuple, megatron_tp)) \
        == sorted(map(tuple, _vllm_tp_groups(world, tp)))
    for plan in plans:
        r = plan.rank
        assert plan.replica_ranks in megatron_tp and r in plan.replica_ranks
        assert plan.share_ranks in megatron_pp and plan.share_ranks[plan.pp_rank] == r  # stage order
        (dp_group,) = [g for g in megatron_dp if r in g]
        assert dp_group.index(r) == plan.dp_rank
        assert plan.tp_rank == plan.replica_ranks.index(r)
    assert {p.replica for p in plans} == set(range(plans[0].num_replicas)) and plans[0].num_replicas == dp * pp


def test_plan_refuses_layouts_that_do_not_divide():
    with pytest.raises(ValueError, match="world size 6 is not a multiple of tensor_parallel \\* pipeline_parallel = 4"):
        plan_colocated(6, 0, 2, 2)
    with pytest.raises(ValueError, match="rank 4 is outside"):
        plan_colocated(4, 4, 2, 1)


@pytest.mark.parametrize("num_prompts,num_shares,expected", [
    (7, 3, [(0, 3), (3, 5), (5, 7)]), (6, 3, [(0, 2), (2, 4), (4, 6)]), (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
    (5, 1, [(0, 5)])])
def test_split_prompts(num_prompts, num_shares, expected):
    assert split_prompts(num_prompts, num_shares) == expected


class RecordingEngine(RolloutEngine):
    """Rank `rank`'s local engine: completion j of prompt p is [p[0], rank-independent token]; records its calls."""

    def __init__(self, rank, log):
        self.rank, self.log = rank, log

    def generate(self, prompt_ids, n, params):
        self.log.append(("generate", self.rank, [p[0] for p in prompt_ids], params.seed))
        ids = [[p[0], (params.seed or 0) + i * n + j] for i, p in enumerate(prompt_ids) for j in range(n)]
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids for _ in range(n)], completion_ids=ids,
                            completion_text=[str(c) for c in ids], rollout_logp=[torch.zeros(2) for _ in ids],
                            finish_reason=["length"] * len(ids), group_size=n)

    def update_weights(self, named_tensors):
        self.log.append(("update_weights", self.rank, [name for name, _ in named_tensors]))

    def sleep(self):
        self.log.append(("sleep", self.rank))

    def wake(self):
        self.log.append(("wake", self.rank))


class FailingEngine(RecordingEngine):
    def generate(self, prompt_ids, n, params):
        raise RuntimeError("CUDA out of memory (fake)")


class ThreadGather:
    """all_gather_object over each plan's share group, for ranks run as threads."""

    def __init__(self, plans):
        self.barriers = {tuple(p.share_ranks): threading.Barrier(len(p.share_ranks)) for p in plans}
        self.slots = defaultdict(dict)

    def for_rank(self, plan):
        key = tuple(plan.share_ranks)

        def gather(obj):
            self.slots[key][plan.rank] = obj
            self.barriers[key].wait(timeout=10)
            out = [self.slots[key][r] for r in plan.share_ranks]
            self.barriers[key].wait(timeout=10)
            return out

        return gather


def _run_world(tp, pp, dp, prompts_of_replica, n, params, fail_rank=None):
    """Every rank's ColocatedRolloutEngine.generate on its DP replica's prompts, concurrently: (results, log)."""
    world = tp * pp * dp
    plans = [plan_colocated(world, rank, tp, pp) for rank in range(world)]
    log, gather, results, errors = [], ThreadGather(plans), {}, {}

    def run(plan):
        local = (FailingEngine if plan.rank == fail_rank else RecordingEngine)(plan.rank, log)
        engine = ColocatedRolloutEngine(local, plan, gather=gather.for_rank(plan))
        try:
            results[plan.rank] = engine.generate(prompts_of_replica[plan.dp_rank], n, params)
        except Exception as err:  # noqa: BLE001  (recorded for the assertions)
            errors[plan.rank] = err

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return plans, results, errors, log


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (2, 2, 2), (1, 3, 1), (2, 3, 2)])
def test_every_replica_generates_its_share_and_every_rank_gets_its_dp_batch(tp, pp, dp):
    n = 2
    prompts = {d: [[100 * d + i] for i in range(5)] for d in range(dp)}
    params = SamplingParams(temperature=0.7, max_new_tokens=4, seed=1000)
    plans, results, errors, log = _run_world(tp, pp, dp, prompts, n, params)
    assert not errors
    generated = defaultdict(list)  # prompt -> ranks that generated it
    for _, rank, firsts, seed in log:
        plan = plans[rank]
        start, stop = split_prompts(5, pp)[plan.pp_rank]
        assert firsts == [p[0] for p in prompts[plan.dp_rank][start:stop]]
        assert seed == 1000 + start * n  # the share's offset in the call's seed range
        for f in firsts:
            generated[f].append(rank)
    # each prompt was generated by exactly the TP ranks of one replica: the one of its DP replica and share
    for d in range(dp):
        for i in range(5):
            (stage,) = [s for s, (a, b) in enumerate(split_prompts(5, pp)) if a <= i < b]
            (replica,) = {p.replica for p in plans if p.dp_rank == d and p.pp_rank == stage}
            assert sorted(generated[100 * d + i]) == [p.rank for p in plans if p.replica == replica]
    # every rank holds its DP replica's whole batch, in prompt order, the same on all its ranks
    for plan in plans:
        batch = results[plan.rank]
        assert batch.group_size == n and batch.num_completions == 5 * n
        assert [p[0] for p in batch.prompt_ids] == [p[0] for p in prompts[plan.dp_rank] for _ in range(n)]
        assert [c[1] for c in batch.completion_ids] == list(range(1000, 1000 + 5 * n))  # one seed range, no reuse
        assert batch.completion_ids == results[plans[plan.replica_ranks[0]].rank].completion_ids


def test_fewer_prompts_than_stages():
    _, results, errors, log = _run_world(1, 4, 1, {0: [[7], [8]]}, 3, SamplingParams(seed=5))
    assert not errors
    assert sorted(rank for _, rank, _, _ in log) == [0, 1]  # stages 2 and 3 have an empty share: no call
    assert all([p[0] for p in r.prompt_ids] == [7] * 3 + [8] * 3 for r in results.values())


def test_a_failed_share_fails_every_rank_of_the_group():
    _, results, errors, _ = _run_world(1, 2, 1, {0: [[1], [2]]}, 1, SamplingParams(seed=0), fail_rank=1)
    assert set(errors) == {0, 1} and not results
    assert "pipeline stage 1's replica" in str(errors[0]) and "out of memory" in str(errors[0])


def test_weights_sleep_and_wake_go_to_the_local_engine():
    log = []
    engine = ColocatedRolloutEngine(RecordingEngine(3, log), plan_colocated(4, 3, 2, 1))
    assert engine.collective
    engine.sleep()
    engine.update_weights(iter([("w", torch.zeros(1))]))
    engine.wake()
    assert log == [("sleep", 3), ("update_weights", 3, ["w"]), ("wake", 3)]


def test_concat_checks_group_sizes():
    one = RecordingEngine(0, []).generate([[1]], 2, SamplingParams(seed=0))
    with pytest.raises(RuntimeError, match="group size 2, expected 3"):
        concat_batches([one], 3)
