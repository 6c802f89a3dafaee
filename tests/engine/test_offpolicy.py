"""One-step off-policy rollouts (--algo.max-staleness K, engine.offpolicy + engine.rollout.worker).

- the worker generates with exactly the weights version a request names (checked against in-process engines);
- the trainer's first async step equals the synchronous one (same weights, same seeds), the next ones train on
  batches of the previous weights (staleness 1, TIS on), and the run still learns;
- kill -9 at points before, during and after a rollout in flight, and mid-checkpoint: the resumed run logs the
  same rows as the run that was not interrupted, each step once;
- DP = 2 and TP = 2 under torchrun.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine._trainer_common import DATA, run_trainer, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _items(model_dir, n=3):
    from r1_engine.engine.data import PromptDataset, load_prompts, load_tokenizer

    tok = load_tokenizer(model_dir)
    return PromptDataset(load_prompts(DATA / "train.jsonl")[:n], tok, "r1-zero", 256).items


def test_worker_generates_with_the_version_each_request_names(model_dir):
    from r1_engine.engine.config import RewardConfig
    from r1_engine.engine.data import load_tokenizer
    from r1_engine.engine.rollout.base import SamplingParams
    from r1_engine.engine.rollout.hf import HFRolloutEngine
    from r1_engine.engine.rollout.worker import RolloutWorker, WorkerSpec
    from r1_engine.engine.sampling import plan_scoring

    reward = RewardConfig(num_workers=0)
    items = _items(model_dir)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=7)
    base = HFRolloutEngine(str(model_dir), load_tokenizer(model_dir), num_threads=1)
    expected0 = base.generate([it.prompt_ids for it in items], 2, params)
    torch.manual_seed(3)
    moved = {name: p.detach() + 0.5 * torch.randn_like(p) for name, p in base.model.named_parameters()}
    base.update_weights(moved.items())
    expected1 = base.generate([it.prompt_ids for it in items], 2, params)
    assert expected0.completion_ids != expected1.completion_ids  # the two versions sample differently
    moved_again = {name: p + 0.5 * torch.randn_like(p) for name, p in moved.items()}
    base.update_weights(moved_again.items())
    expected2 = base.generate([it.prompt_ids for it in items], 2, params)
    assert expected2.completion_ids not in (expected0.completion_ids, expected1.completion_ids)

    with RolloutWorker(WorkerSpec(str(model_dir), reward, plan_scoring(reward, []), num_threads=1)) as worker:
        first = worker.submit(items, 2, params, version=0)  # queued before the new weights are published
        worker.publish(moved.items(), version=1)
        second = worker.submit(items, 2, params, version=1)
        got0, rewards0 = worker.result(first)
        got1, _ = worker.result(second)
        assert got0.completion_ids == expected0.completion_ids
        assert got1.completion_ids == expected1.completion_ids
        for a, b in zip(got1.rollout_logp, expected1.rollout_logp):
            torch.testing.assert_close(a, b)
        assert len(rewards0.total) == 6 and set(rewards0.components) >= {"accuracy", "format"}
        worker.publish(moved_again.items(), version=2)  # in place, into the buffers the worker already holds
        got2, _ = worker.result(worker.submit(items, 2, params, version=2))
        assert got2.completion_ids == expected2.completion_ids
        bad = worker.submit(items, 2, SamplingParams(max_new_tokens=500, seed=1), version=1)  # past the positions
        with pytest.raises(RuntimeError, match=f"rollout request {bad} failed.*max_position_embeddings"):
            worker.result(bad)
        worker._process.kill()
        with pytest.raises(RuntimeError, match="rollout worker .* died"):
            worker.result(worker.submit(items, 2, params, version=1))


def test_async_first_step_is_the_synchronous_one_then_trains_one_step_behind(model_dir, tmp_path):
    sync = run_trainer(str(model_dir), str(tmp_path / "sync"), steps=3, algo={"epochs_per_batch": 1})
    ahead = run_trainer(str(model_dir), str(tmp_path / "async"), steps=3,
                        algo={"epochs_per_batch": 1, "max_staleness": 1})
    assert [m["async/staleness"] for m in ahead] == [0.0, 1.0, 1.0]
    first_sync, first_async = sync[0], ahead[0]
    for k in ("reward/mean", "response_length/mean", "train/loss", "train/kl", "train/grad_norm"):
        assert math.isclose(first_sync[k], first_async[k], rel_tol=1e-6, abs_tol=1e-7), k
    # step 2 trains on draw 1, sampled with the base weights, not those after step 1: the rollout log-probs are one
    # update away from the policy's (synchronous: equal up to numerics), and the TIS weights act
    assert sync[1]["train/mismatch_abs"] < 1e-5 < 1e-3 < ahead[1]["train/mismatch_abs"]
    assert sync[1]["train/correction_weight"] == 1.0 != ahead[1]["train/correction_weight"]


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the trainer's CPU path is plain torch; the interpreter would only slow it
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # this process's own group
        env.pop(name, None)
    return env


def _driver(model_dir, out, point="none", count=0):
    env = _env()
    return subprocess.run([sys.executable, "-m", "tests.engine._kill_driver", str(model_dir), str(out), "6", point,
                           str(count)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _driver(model_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    return rows


@pytest.mark.parametrize("point,count", [
    ("submit", 3),  # step 2 queues draw 2 while draw 1 may still be generating: killed with a rollout in flight
    ("rank_state", 2),  # the checkpoint of step 4 waits for draw 4: killed mid-checkpoint, resumed from step 2
    pytest.param("take+", 3, marks=pytest.mark.slow),  # right after step 3 took its batch (draw 3 done)
    pytest.param("publish", 4, marks=pytest.mark.slow),  # after step 4's update, before its weights reach the worker
    ("take!", 4),  # an exception in step 4: the process exits (its worker stopped at exit), the rerun resumes
])
def test_kill_9_and_resume_logs_the_uninterrupted_rows(model_dir, uninterrupted, tmp_path, point, count):
    out = tmp_path / "run"
    killed = _driver(model_dir, out, point, count)  # (one left waiting for its worker: the timeout)
    if point.endswith("!"):
        assert killed.returncode == 1 and "injected crash in take" in killed.stderr, killed.stderr[-3000:]
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _driver(model_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # none dropped, none twice
    for a, b in zip(uninterrupted, rows):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7), (point, a["step"], k, a[k], b[k])


def _torchrun(out: Path, nproc: int, *flags: str, eval_size: int = 4) -> list[dict]:
    env = _env()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(ROOT / "recipes" / "r1_zero.py"), "--out", str(out), "--train.steps", "3",
                           "--train.eval-every", "0", "--train.eval-size", str(eval_size),
                           "--rollout.prompts-per-step", "4", "--rollout.max-new-tokens", "24", "--train.no-progress",
                           *flags],
                          capture_output=True, text=True, cwd=out.parent, env=env, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [r for r in _rows(out / "metrics.jsonl") if "reward/mean" in r]


@pytest.mark.multiproc
def test_tensor_parallel_2_under_torchrun_matches_one_process(tmp_path):
    one = _torchrun(tmp_path / "tp1", 1, "--algo.max-staleness", "1")
    two = _torchrun(tmp_path / "tp2", 2, "--algo.max-staleness", "1")  # the embedded world: TP = 2
    assert [r["async/staleness"] for r in two] == [0.0, 1.0, 1.0]
    for a, b in zip(one, two):
        for k in ("reward/mean", "response_length/mean", "train/loss", "train/kl", "train/grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (a["step"], k, a[k], b[k])


@pytest.mark.multiproc
def test_data_parallel_2_under_torchrun(tmp_path):
    layout = ("--model.tensor-parallel", "1")  # two replicas, each with its worker and half of the prompts
    sync = _torchrun(tmp_path / "sync", 2, *layout, eval_size=1)  # one held-out question for two replicas
    ahead = _torchrun(tmp_path / "async", 2, *layout, "--algo.max-staleness", "1")
    assert [r["async/staleness"] for r in ahead] == [0.0, 1.0, 1.0]
    for k in ("reward/mean", "response_length/mean", "train/loss", "train/grad_norm"):  # draw 0 on both: equal
        assert math.isclose(sync[0][k], ahead[0][k], rel_tol=1e-6, abs_tol=1e-7), k
    assert ahead[-1]["train/num_sequences"] == sync[-1]["train/num_sequences"]
