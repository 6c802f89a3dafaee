"""Run the tiny GRPO trainer with off-policy rollouts (max_staleness 1), killed with SIGKILL at a chosen point.

    python -m tests.engine._kill_driver MODEL_DIR OUT STEPS POINT COUNT

POINT names a method of engine.offpolicy.RolloutsAhead (submit: a draw is queued while the one before may still be
generating; take: a batch is handed to the step; publish: new weights go to the worker; rank_state: a checkpoint
waits for the batches in flight), or `none`. The process kills itself on the COUNT-th call: before it, or after it
returns with POINT suffixed by `+` (e.g. `take+`); suffixed by `!` it raises RuntimeError there instead (a crash:
the process must still exit, not wait for its rollout worker). Checkpoints every 2 steps; the run resumes from `OUT`
when there is a checkpoint there.
"""
import dataclasses
import os
import signal
import sys
from pathlib import Path

from r1_engine.engine.data import load_prompts
from r1_engine.engine.offpolicy import RolloutsAhead
from r1_engine.engine.trainer import GRPOTrainer
from tests.engine._trainer_common import DATA, tiny_config

METHODS = {"submit": "_submit", "take": "take", "publish": "publish", "rank_state": "rank_state"}


def arm(point: str, count: int) -> None:
    after, crash = point.endswith("+"), point.endswith("!")
    name = METHODS[point.rstrip("+!")]
    original = getattr(RolloutsAhead, name)
    calls = [0]

    def killed(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == count and crash:
            raise RuntimeError(f"injected crash in {name}")
        if calls[0] == count and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, *args, **kwargs)
        if calls[0] == count and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(RolloutsAhead, name, killed)


def main(model_dir: str, out: str, steps: str, point: str, count: str) -> None:
    if point != "none":
        arm(point, int(count))
    cfg = tiny_config(Path(out), steps=int(steps), save_every=2, eval_every=0)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, max_staleness=1, epochs_per_batch=1))
    trainer = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"))
    trainer.fit()
    trainer.finish(export=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
