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


def test_r1_zero_reads_the_data_keys_it_shows(tmp_path):
    """--data.prompt-key / --data.answer-key reach the loader: a file with other field names loads (it would fail
    on a missing 'prompt' field otherwise); zero steps, so nothing is trained."""
    import json

    from r1_engine.recipes.r1_zero import main

    base = CONFIGS.parents[0] / "tiny" / "base"
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+{a}", "solution": str(2 * a)}) + "\n" for a in range(10, 20)))
    before, after = main(["--model", str(base), "--data", str(data), "--data.prompt-key", "problem",
                          "--data.answer-key", "solution", "--out", str(tmp_path / "run"), "--train.steps", "0",
                          "--train.no-export-hf", "--rollout.max-new-tokens", "40", "--reward.num-workers", "0"])
    assert before == {} and after == {}
