"""NVTX ranges and --train.profile-steps: a recording stand-in for torch.cuda.nvtx and the CUDA profiler API
watches a two-step run (2 micro-batches, 2 epochs, eval and a checkpoint each step where due) on the tiny model."""
import dataclasses
import json

import pytest
import torch

from r1_engine.kernels import nvtx as kernel_nvtx
from r1_engine.engine import profiling
from r1_engine.engine.config import check_ranges, parse_profile_steps
from r1_engine.engine.profiling import StepProfiler
from tests.engine._trainer_common import DATA, tiny_config, write_tiny_model


class Recorder:
    """torch.cuda.nvtx.range_push/range_pop and torch.cuda.profiler.start/stop, as one list of events."""

    def __init__(self):
        self.events: list[tuple] = []

    def range_push(self, name):
        self.events.append(("push", name))

    def range_pop(self):
        self.events.append(("pop",))

    def start(self):
        self.events.append(("start",))

    def stop(self):
        self.events.append(("stop",))


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", rec.range_push)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", rec.range_pop)
    monkeypatch.setattr(profiling, "_cuda_profiler_api", lambda: rec)
    kernel_nvtx.set_enabled(True)
    yield rec
    kernel_nvtx.set_enabled(None)


def tree(events):
    """[(name, children)] from push/pop events; asserts every range is closed and no pop comes unmatched."""
    root: list = []
    stack = [root]
    for event in events:
        if event[0] == "push":
            node = (event[1], [])
            stack[-1].append(node)
            stack.append(node[1])
        elif event[0] == "pop":
            assert len(stack) > 1, "a range popped that was never pushed"
            stack.pop()
    assert len(stack) == 1, f"{len(stack) - 1} range(s) left open"
    return root


def names(nodes):
    return [n for n, _ in nodes]


def child(nodes, name):
    (found,) = [c for n, c in nodes if n == name]
    return found


def test_two_step_run_ranges_and_capture(recorder, tmp_path):
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    model_dir = write_tiny_model(tmp_path / "model")
    cfg = tiny_config(tmp_path / "run", steps=2, save_every=1, eval_every=1, profile_steps="2:2",
                      torch_profiler=True)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, num_microbatches=2, fused_lm_head=True))
    trainer = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"), load_prompts(DATA / "eval.jsonl"))
    recorder.events.clear()  # what building the trainer pushed (nothing is expected) is not part of a step
    try:
        trainer.fit()
    finally:
        trainer.close()
    events = recorder.events
    top = tree(events)
    assert names(top) == ["step 1", "step 2"]
    mb = 2  # micro-batches per forward_only / forward_backward
    for step, (_, phases) in enumerate(top, start=1):
        # eval_every=1 evaluates after every step but the last; save_every=1 checkpoints every step
        expected = ["rollout", "advantages", "logprobs", "train", "weight_sync"] + (["eval"] if step == 1 else [])
        assert names(phases) == expected + ["checkpoint"], step
        assert names(child(phases, "rollout")) == ["rewards"]
        assert child(phases, "advantages") == [] and child(phases, "weight_sync") == []
        # beta > 0: reference log-probs; 2 epochs: old log-probs; one mini-batch
        logprobs = child(phases, "logprobs")
        assert names(logprobs) == ["ref_logprobs", "old_logprobs"]
        for _, inner in logprobs:
            (forward_only,) = [c for n, c in inner if n == "forward_only"]
            assert names(inner) == ["forward_only"]
            assert names(forward_only) == ["forward"] * mb
            assert all(names(c) == ["statistics"] for _, c in forward_only)
        train = child(phases, "train")
        assert names(train) == ["forward_backward", "optimizer_step"] * 2  # 2 epochs x 1 mini-batch
        for name, fb in train:
            if name != "forward_backward":
                continue
            # Megatron's gradient all-reduces after the last backward (the rest keep Megatron's timer names)
            assert [n for n in names(fb) if n in ("forward", "backward")] == ["forward", "backward"] * mb
            assert names(fb).count("grad_sync") == 1 and names(fb).index("grad_sync") > names(fb).index("backward")
            for n, c in fb:
                if n == "forward":  # the fused lm_head: chunks of statistics, loss, gradient inside forward
                    assert names(c) and set(names(c)) == {"lm_head_chunk"}
                    assert all(names(chunk) == ["statistics", "loss", "gradient"] for _, chunk in c)
        if step == 1:
            assert "rewards" in names(child(phases, "eval"))
    # the profiler API starts right after step 2 opens and stops right before it closes, once
    assert events.count(("start",)) == events.count(("stop",)) == 1
    start, stop = events.index(("start",)), events.index(("stop",))
    assert events[start - 1] == ("push", "step 2") and events[stop + 1:] == [("pop",)]
    traces = list((tmp_path / "run" / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["trace_steps2-2_rank0.json"]
    assert json.loads(traces[0].read_text())["traceEvents"]


def test_profiler_starts_only_on_the_ranks_asked_for(recorder):
    for rank, ranks, expected in ((0, (), 1), (1, (), 1), (1, (0,), 0), (3, (1, 3), 1)):
        recorder.events.clear()
        p = StepProfiler((2, 3), rank=rank, ranks=ranks)
        for step in range(1, 5):
            p.begin(step)
            recorder.events.append(("work", step))
            p.end(step)
        p.close()
        assert recorder.events.count(("start",)) == recorder.events.count(("stop",)) == expected, (rank, ranks)
        if expected:  # before step 2's work, after step 3's
            assert recorder.events.index(("start",)) == recorder.events.index(("work", 2)) - 1
            assert recorder.events.index(("stop",)) == recorder.events.index(("work", 3)) + 1


def test_a_resumed_run_inside_the_range_captures_once(recorder):
    p = StepProfiler((2, 4))
    for step in (3, 4, 5):  # resumed after step 2
        p.begin(step)
        recorder.events.append(("work", step))
        p.end(step)
    assert recorder.events.count(("start",)) == recorder.events.count(("stop",)) == 1
    assert recorder.events.index(("start",)) < recorder.events.index(("work", 3))
    assert recorder.events.index(("work", 4)) < recorder.events.index(("stop",)) < recorder.events.index(("work", 5))


def test_capture_cut_short_is_stopped_by_close(recorder):
    p = StepProfiler((2, 9))
    for step in (1, 2):
        p.begin(step)
        p.end(step)
    assert recorder.events.count(("stop",)) == 0
    p.close()
    assert recorder.events.count(("start",)) == recorder.events.count(("stop",)) == 1
    tree(recorder.events)


def test_ranges_cost_nothing_when_off(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name))
    kernel_nvtx.set_enabled(False)
    try:
        with kernel_nvtx.nvtx_range("statistics"):
            pass
        StepProfiler(None).begin(1)
    finally:
        kernel_nvtx.set_enabled(None)
    assert calls == []


@pytest.mark.parametrize("text,expected", [(None, None), ("", None), ("3:4", (3, 4)), ("1:1", (1, 1))])
def test_profile_steps_parse(text, expected):
    assert parse_profile_steps(text) == expected


@pytest.mark.parametrize("bad", ["0:2", "3:2", "2", "a:b", "1:2:3", "-1:2", ":"])
def test_bad_profile_steps_get_one_line(bad, tmp_path):
    cfg = tiny_config(tmp_path, profile_steps=bad)
    with pytest.raises(ValueError) as err:
        check_ranges(cfg)
    message = str(err.value)
    assert message.startswith(f"--train.profile-steps={bad!r}: must be A:B") and "\n" not in message


def test_bad_profile_ranks(tmp_path):
    with pytest.raises(ValueError, match=r"^--train.profile-ranks=\(-1,\): must be global ranks >= 0"):
        check_ranges(tiny_config(tmp_path, profile_ranks=(-1,)))
