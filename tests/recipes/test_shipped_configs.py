"""The YAML configs shipped in recipes/configs resolve as written (every key known, every range valid), and a named
model gets a real run's defaults, not the tiny world's."""
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


@pytest.mark.parametrize("name, args", [
    ("r1_zero_qwen2.5_7b.yaml", ["--model", "/models/Qwen2.5-7B", "--data", "/d.jsonl", "--out", "/tmp/r1z"]),
    ("r1_qwen2.5_7b.yaml", ["--model", "/models/Qwen2.5-7B", "--out", "/tmp/r1"]),
    ("distill_qwen2.5_1.5b.yaml", ["--teacher", "/t", "--student", "/s", "--data", "/d", "--eval-data", "/e"]),
])
def test_shipped_config_resolves(name, args):
    from r1_engine.recipes import distill, r1, r1_zero

    recipe = {"r1_zero": r1_zero, "r1": r1, "distill": distill}[name.split("_qwen")[0]]
    cfg, embedded = recipe.resolve_config(["--config", str(CONFIGS / name), *args])
    assert not embedded


def test_a_named_model_gets_real_run_defaults():
    from r1_engine.recipes import r1, r1_zero

    cfg, embedded = r1_zero.resolve_config(["--model", "/models/x", "--data", "/d.jsonl", "--out", "/tmp/o"])
    assert not embedded and cfg.rollout.max_new_tokens == 8192 and cfg.train.save_every == 50
    assert cfg.rollout.stop_strings == ()
    cfg, _ = r1.resolve_config(["--model", "/models/x", "--out", "/tmp/o"])
    assert cfg.cold_start.data.max_tokens == 16384 and cfg.cold_start.train.save_every == 200
    assert cfg.rejection.max_new_tokens == 8192 and cfg.eval.max_new_tokens == 8192
    assert cfg.reasoning_rl.reward.weights["language"] == 1.0
