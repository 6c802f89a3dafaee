"""The GRPO trainer's sampling side: this rank's share of each prompt batch, generated and scored on the
model-parallel group's first rank and broadcast to the group; DAPO's dynamic sampling; off-policy draws
(engine.offpolicy) when max_staleness > 0.

A mixin of engine.trainer.GRPOTrainer: it reads the trainer's cfg, ps, sampler, draws, step, is_leader,
rollout_engine, rollout_sampler and ahead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from r1_engine.engine.advantages import filter_uniform_groups, overlong_penalty
from r1_engine.engine.rollout.base import RolloutBatch, SamplingParams


class RolloutDraws:
    def _mp_broadcast(self, payload):
        """Leader -> the other ranks of its model-parallel group (pickled: a few MB at most)."""
        group = self.ps.model_parallel_group
        if dist.get_world_size(group) == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def sampling_params(self, *, seed: int, eval_mode: bool = False) -> SamplingParams:
        r, t = self.cfg.rollout, self.cfg.train
        return SamplingParams(temperature=t.eval_temperature if eval_mode else r.temperature,
                              top_p=t.eval_top_p if eval_mode else r.top_p, top_k=-1 if eval_mode else r.top_k,
                              max_new_tokens=r.max_new_tokens, stop_strings=self.stop_strings, seed=seed)

    def generate_and_score(self, items, n: int, params: SamplingParams):
        """(RolloutBatch, RewardOutput) for `items` (TokenizedPrompt), identical on the model-parallel group."""
        payload = None
        if self.is_leader or getattr(self.rollout_engine, "collective", False):  # colocated: every rank generates
            try:
                if self.is_leader:
                    payload = self.rollout_sampler.generate_and_score(items, n, params)
                else:  # a colocated vLLM's other ranks take part in the generation; the leader scores
                    self.rollout_engine.generate([it.prompt_ids for it in items], n, params)
            except Exception as err:  # tell the other ranks, or they would wait in the broadcast forever
                payload = err
        payload = self._mp_broadcast(payload)
        if isinstance(payload, Exception):
            raise RuntimeError(f"rollout/reward failed on the model-parallel group's first rank: {payload!r}") \
                from (payload if self.is_leader else None)
        return payload

    def _next_draw(self):
        """This rank's share of the next prompt batch, with its sampling settings: (prompts, G, params)."""
        cfg, ps, G = self.cfg, self.ps, self.cfg.rollout.group_size
        prompts = self.sampler.next_batch()[ps.dp_rank::ps.dp_size]
        # exact on resume; strided so vLLM's per-sample seeds (seed + i*n + j) never overlap across draws/ranks
        seed = cfg.train.seed * 1_000_003 + (self.draws * ps.dp_size + ps.dp_rank) * len(prompts) * G
        self.draws += 1
        return prompts, G, self.sampling_params(seed=seed)

    def _draw(self):
        """One sampling round: this rank's share of the next prompt batch, G completions each, rewards. Off-policy
        (max_staleness K): the batch drawn and generated K steps ahead, and the next draws submitted."""
        cfg = self.cfg
        if self.ahead is not None:
            rollout, scores, staleness = self.ahead.take(self.step, self.draws, self._next_draw)
            self._staleness = staleness
        else:
            rollout, scores = self.generate_and_score(*self._next_draw())
        self._generated_tokens += int(rollout.lengths.sum())
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        if cfg.reward.overlong_buffer:  # DAPO's soft overlong punishment, added to the rule rewards
            rewards += overlong_penalty(rollout.lengths, cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer).double()
        return rollout, scores, rewards

    def _dynamic_sampling(self, rollout: RolloutBatch, rewards: torch.Tensor):
        """DAPO: keep the groups whose rewards differ and draw more prompts until every DP rank has its
        share of groups, for at most algo.max_sampling_rounds rounds. A rank still short then fills up
        with dropped groups (zero advantage: only their KL/entropy terms act), so ranks keep equal shapes."""
        cfg, ps, G = self.cfg, self.ps, self.cfg.rollout.group_size
        need, kept, dropped, rounds = rollout.num_groups, [], [], 0
        while True:
            rounds += 1
            keep = filter_uniform_groups(rewards, G)
            for g in range(rollout.num_groups):
                (kept if keep[g] else dropped).append((rollout, rewards, g))
            short = torch.tensor([max(0, need - len(kept))], dtype=torch.long, device=self.device)
            if ps.dp_size > 1:  # every DP rank draws as long as any rank is short: the sampler stays in step
                dist.all_reduce(short, op=dist.ReduceOp.MAX, group=ps.dp_group)
            if int(short) == 0 or rounds >= cfg.algo.max_sampling_rounds:
                break
            rollout, _, rewards = self._draw()
        chosen = (kept + dropped)[:need]
        merged = RolloutBatch.from_groups([(r, g) for r, _, g in chosen])
        merged_rewards = torch.cat([rw[g * G:(g + 1) * G] for _, rw, g in chosen])
        return merged, merged_rewards, {"dynamic_sampling/rounds": float(rounds),
                                        "dynamic_sampling/filler_groups": float(max(0, need - len(kept)))}

