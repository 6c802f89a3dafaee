"""engine.run, the one run skeleton: fit's stop condition, a checkpoint at the end written once, finish, and rank-0
work whose error reaches every rank (the R1 recipe's helper left the others waiting until the collective timeout)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from r1_engine.engine.run import TrainingRun, on_main
from tests.parallel.dist_utils import run_distributed


class CountingRun(TrainingRun):
    """The skeleton around a trainer that only counts: no model, the saves and exports recorded."""

    def __init__(self, total_steps=5, save_every=0):
        self.cfg = SimpleNamespace(train=SimpleNamespace(save_every=save_every, keep_checkpoints=1, progress=False))
        self.ps = SimpleNamespace(is_main=True)
        self.total_steps, self.step, self.logger = total_steps, 0, None
        self.events: list[tuple] = []

    def train_one_step(self):
        self.step += 1
        self.events.append(("step", self.step))
        return {"loss": 1.0 / self.step}

    def after_step(self, metrics):
        metrics["seen"] = 1.0

    def save(self):
        self.events.append(("save", self.step))
        self._saved_at = self.step

    def export_hf(self, out_dir=None):
        self.events.append(("export", self.step))
        return "hf"

    def close(self):
        self.events.append(("close",))


def test_fit_saves_the_last_step_once_and_finish_does_not_save_again():
    run = CountingRun(total_steps=4, save_every=2)
    history = run.fit()
    assert [m["seen"] for m in history] == [1.0] * 4  # after_step's additions are logged with the step
    assert run.finish() == "hf"
    assert run.events == [("step", 1), ("step", 2), ("save", 2), ("step", 3), ("step", 4), ("save", 4),
                          ("export", 4), ("close",)]


def test_a_stop_condition_ends_the_loop_and_saves_where_it_stopped():
    run = CountingRun(total_steps=10)
    run.fit(stop=lambda trainer: trainer.step >= 3)
    assert run.events == [("step", 1), ("step", 2), ("step", 3), ("save", 3)]
    run.fit(stop_after=5)  # a second call continues from there
    assert run.events[-3:] == [("step", 4), ("step", 5), ("save", 5)]
    assert run.finish(export=False) is None and run.events[-1] == ("close",)


def test_on_main_in_one_process():
    assert on_main(None, lambda: 7) == 7
    with pytest.raises(ValueError, match="bad row"):
        on_main(SimpleNamespace(is_main=True), lambda: (_ for _ in ()).throw(ValueError("bad row")))


def _on_main_worker(kind: str):
    import torch.distributed as dist

    from r1_engine.engine.run import on_main
    from r1_engine.parallel.state import init_parallel

    ps = init_parallel(1, 1)

    def work():
        if kind == "user":
            raise ValueError("data.jsonl:3: missing field 'answer'")
        if kind == "crash":
            raise KeyError("boom")
        return {"rank": dist.get_rank()}

    try:
        return ("ok", on_main(ps, work))
    except Exception as err:  # noqa: BLE001 - what each rank saw is the result
        return (type(err).__name__, str(err))


@pytest.mark.multiproc
def test_on_main_gives_every_rank_the_result_or_the_error():
    assert run_distributed(_on_main_worker, 2, "ok") == [("ok", {"rank": 0}), ("ok", {"rank": 0})]
    assert run_distributed(_on_main_worker, 2, "user") == [("ValueError", "data.jsonl:3: missing field 'answer'")] * 2
    crash = run_distributed(_on_main_worker, 2, "crash")
    assert crash[0] == ("KeyError", "'boom'") and crash[1] == ("RuntimeError", "rank 0 failed: KeyError('boom')")
