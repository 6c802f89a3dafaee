"""Resuming the GRPO trainer (tiny random Qwen2): the same metrics as an uninterrupted run, one metrics row per
step after a crash past the last checkpoint, and the last k checkpoints kept."""
import math

import pytest

from tests.engine._trainer_common import DATA, run_trainer, tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_resume_gives_the_same_metrics(model_dir, tmp_path):
    full = run_trainer(str(model_dir), str(tmp_path / "full"), steps=4)
    first = run_trainer(str(model_dir), str(tmp_path / "split"), steps=2)
    rest = run_trainer(str(model_dir), str(tmp_path / "split"), steps=4, resume=True)
    assert len(rest) == 2
    for a, b in zip(full, first + rest):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7), (k, a[k], b[k])
    assert any(m["train/grad_norm"] > 0 for m in full)


def test_resume_after_a_crash_logs_each_step_once_and_keeps_k_checkpoints(model_dir, tmp_path):
    import dataclasses
    import json

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    prompts = load_prompts(DATA / "train.jsonl")
    crashed = GRPOTrainer(tiny_config(out, steps=3, save_every=2), model_dir, prompts)
    crashed.logger.log(0, {"eval/pass@1": 0.25})  # the base model's score, as the recipe logs it
    class Crash(Exception):
        pass

    def crash_after_step_3(trainer, metrics):
        if trainer.step == 3:
            raise Crash

    with pytest.raises(Crash):  # steps 1-3 logged, a checkpoint at step 2 only: then the crash (no final save)
        crashed.fit(on_step=crash_after_step_3)
    crashed.close()
    cfg = tiny_config(out, steps=4, save_every=2)
    resumed = GRPOTrainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_checkpoints=1)),
                          model_dir, prompts)
    assert resumed.step == 2
    resumed.fit()
    resumed.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "eval/pass@1" in rows[0]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("reward/mean")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000004"]
