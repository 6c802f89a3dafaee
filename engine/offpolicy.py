"""One-step (K-step) off-policy rollouts: the rollouts of the next K steps are generated while this step trains.

With --algo.max-staleness K > 0 the GRPO trainer keeps the prompt draws of steps step+1 .. step+K submitted to a
rollout worker process (engine.rollout.worker), each generated with the weights published when it was submitted:
step n trains on a batch sampled by the policy of step n - K at the oldest (its staleness, logged as
async/staleness). The loss treats the rollout policy as the behaviour policy (decoupled PPO): the clipped ratio is
taken against the policy's own log-probs at train time (old_logp), and the rollout-correction weight of the loss
family (TIS: min(exp(old_logp - rollout_logp), C)) corrects for the older sampling policy; train/mismatch_abs
reports how far apart the two are.

Lossless resume: a checkpoint waits for the rollouts in flight and stores them (their draw, seed, weights version,
tokens, log-probs and rewards) with the prompt sampler's position after them; a resumed run trains on exactly those
batches and draws the next prompts where the uninterrupted run would have, so its metrics rows are the same ones.
The pending draws (draw, version) are the same on every rank (trainer.json); the generated batches live only on
each model-parallel group's first rank, which holds the worker, and go into that rank's checkpoint file.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from r1_engine.engine.rewards.compose import RewardOutput
from r1_engine.engine.rollout.base import RolloutBatch


@dataclass
class PendingDraw:
    draw: int  # which prompt batch (the trainer's draw counter): fixes the prompts and the seed
    version: int  # the weights it is generated with: the policy after `version` steps
    ticket: int | None = None  # the worker's request (model-parallel leader, while in flight)
    scored: tuple[RolloutBatch, RewardOutput] | None = None  # leader: generated, not yet trained on


def _plain_rollout(scored: tuple[RolloutBatch, RewardOutput]) -> dict[str, Any]:
    """Tensors, lists and strings only (checkpoints are read with torch.load(weights_only=True))."""
    rollout, rewards = scored
    return {"rollout": {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)},
            "rewards": dataclasses.asdict(rewards)}


def _from_plain(blob: dict[str, Any]) -> tuple[RolloutBatch, RewardOutput]:
    return RolloutBatch(**blob["rollout"]), RewardOutput(**blob["rewards"])


class RolloutsAhead:
    """The pending draws of a run with max_staleness K (see the module docstring).

    submit_draw() -> (items, n, params): the trainer draws the next prompt batch (advancing its sampler and draw
    counter on every rank) and says how to sample it. worker: the rollout worker on the model-parallel leader, None
    elsewhere. broadcast(payload): the leader's payload on every rank of its model-parallel group."""

    def __init__(self, max_staleness: int, worker: Any, broadcast: Callable[[Any], Any]):
        self.max_staleness = max_staleness
        self.worker = worker
        self.broadcast = broadcast
        self.pending: deque[PendingDraw] = deque()
        self.version = 0  # the weights published last

    def publish(self, named_tensors, version: int) -> None:
        """New weights for the requests submitted from now on (every rank iterates the stream: it is collective)."""
        if self.worker is not None:
            self.worker.publish(named_tensors, version)
        else:
            for _ in named_tensors:
                pass
        self.version = version

    def take(self, step: int, draws: int, submit_draw: Callable[[], tuple]) -> tuple[RolloutBatch, RewardOutput, int]:
        """The batch step `step` (0-based) trains on, with its staleness; first the draws up to step + K are
        submitted (`draws`: how many prompt batches were drawn so far)."""
        while draws <= step + self.max_staleness:
            self._submit(draws, *submit_draw())
            draws += 1
        head = self.pending.popleft()
        payload = None
        if self.worker is not None:
            try:
                payload = head.scored if head.scored is not None else self.worker.result(head.ticket)
            except Exception as err:  # the other ranks of the group must not wait in the broadcast forever
                payload = err
        payload = self.broadcast(payload)
        if isinstance(payload, Exception):
            raise RuntimeError(f"rollout failed on the model-parallel group's first rank: {payload!r}")
        rollout, rewards = payload
        return rollout, rewards, step - head.version

    def _submit(self, draw: int, items, n: int, params) -> None:
        ticket = self.worker.submit(items, n, params, self.version) if self.worker is not None else None
        self.pending.append(PendingDraw(draw, self.version, ticket))

    # ------------------------------------------------------------------------------------------ checkpoints
    def state(self) -> list[dict[str, int]]:
        """The pending draws, for trainer.json (the same on every rank)."""
        return [{"draw": p.draw, "version": p.version} for p in self.pending]

    def rank_state(self) -> list[dict[str, Any]] | None:
        """The leader's generated batches, for its checkpoint file: waits for the ones in flight."""
        if self.worker is None:
            return None
        for p in self.pending:
            if p.scored is None:
                p.scored, p.ticket = self.worker.result(p.ticket), None
        return [_plain_rollout(p.scored) for p in self.pending]

    def load(self, state: list[dict[str, int]], rank_state: list[dict[str, Any]] | None, where: str) -> None:
        self.pending.clear()
        if self.worker is not None and len(rank_state or []) != len(state):
            raise ValueError(f"{where}: the checkpoint names {len(state)} pending rollout batch(es) but this rank's "
                             f"file holds {len(rank_state or [])}: written by another layout or incomplete")
        for i, p in enumerate(state):
            scored = _from_plain(rank_state[i]) if self.worker is not None else None
            self.pending.append(PendingDraw(int(p["draw"]), int(p["version"]), None, scored))

