"""engine.metrics: jsonl content, resume semantics, the curves PNG, TensorBoard files and the phase timer."""
import json
import math
import sys
import time

import pytest
import torch

from r1_engine.engine.metrics import MetricsLogger, PhaseTimer, read_metrics


def test_jsonl_lines_are_written_and_flushed_each_step(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    logger.log(1, {"reward/mean": 0.25, "loss": torch.tensor(1.5), "tokens": 128})
    # Flushed: readable from the file before close().
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "reward/mean": 0.25, "loss": 1.5, "tokens": 128.0}]
    logger.log(2, {"reward/mean": 0.5, "loss": float("nan")})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[1]["reward/mean"] == 0.5 and math.isnan(records[1]["loss"])


def test_bad_metrics_are_refused(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(0, {"step": 1.0})
        with pytest.raises(ValueError, match="'acc' must be a number, got str"):
            logger.log(0, {"acc": "high"})
        with pytest.raises(ValueError, match="'v' is a tensor of shape \\(2,\\)"):
            logger.log(0, {"v": torch.zeros(2)})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resumed_run_appends_and_later_steps_win(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as first:
        for step in range(1, 4):
            first.log(step, {"x": float(step)})
    # Resume from a checkpoint at step 2: steps 3.. are logged again with new values.
    with MetricsLogger(tmp_path, use_tensorboard=False) as second:
        second.log(3, {"x": 30.0})
        second.log(4, {"x": 40.0})
        assert [(r["step"], r["x"]) for r in second.read()] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_plot_writes_a_png_grid(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        for step in range(10):
            logger.log(step, {"a": step ** 0.5, "b": -step, "c": 1.0, "d": step % 3})
        path = logger.plot()
        assert path == tmp_path / "curves.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        subset = logger.plot(tmp_path / "sub" / "ab.png", keys=["a", "b"])
        assert subset.is_file()
        with pytest.raises(ValueError, match="no metric named \\['zzz'\\]"):
            logger.plot(keys=["zzz"])


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward/mean": 0.25})
        logger.log(2, {"reward/mean": 0.75})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [(s.step, s.value) for s in scalars] == [(1, 0.25), (2, 0.75)]


def test_missing_tensorboard_warns_once_and_keeps_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(UserWarning, match="TensorBoard logging disabled"):
        logger = MetricsLogger(tmp_path)
    logger.log(1, {"x": 1.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": 1.0}


def test_phase_timer_accumulates_and_resets():
    timer = PhaseTimer()
    with timer("rollout"):
        time.sleep(0.02)
    with timer("rollout"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError):
        with timer("train"):
            raise RuntimeError("boom")  # time is still charged to the phase
    metrics = timer.metrics()
    assert set(metrics) == {"time/rollout", "time/train"}
    assert 0.04 <= metrics["time/rollout"] < 1.0 and metrics["time/train"] >= 0
    timer.reset()
    assert timer.metrics() == {}


def test_truncate_after_drops_later_steps_in_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as crashed:
        crashed.log(0, {"eval/pass@1": 0.1})  # the "before" score: must survive
        for step in range(1, 6):
            crashed.log(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x"')  # the line a crash cut short
    # a resume from the checkpoint at step 3 redoes steps 4..
    with MetricsLogger(tmp_path) as resumed:
        assert resumed.truncate_after(3) == 3
        resumed.log(4, {"x": 40.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("x")) for r in lines] == [(0, None), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [s.step for s in events.Scalars("eval/pass@1")] == [0]


def test_truncate_after_refuses_a_corrupt_line_in_the_middle(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\nnot json\n{"step": 2, "x": 2.0}\n')
    with MetricsLogger(tmp_path, use_tensorboard=False) as logger:
        with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record"):
            logger.truncate_after(1)
