"""Typed config: YAML defaults, command-line overrides, errors that name the bad key."""
from pathlib import Path

import pytest

from engine.config import GRPOConfig, load_config, load_yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "r1_zero_qwen2.5_7b.yaml"


def test_example_yaml_loads_with_types():
    cfg = load_yaml(GRPOConfig, EXAMPLE)
    assert cfg.model.tensor_parallel == 2 and cfg.model.dtype == "bfloat16"
    assert cfg.loss.eps_high == 0.28 and cfg.loss.aggregation == "token-mean"
    assert cfg.optim.lr == 1e-6 and cfg.reward.weights == {"accuracy": 1.0, "format": 0.5}
    assert cfg.rollout.stop_strings == ("</answer>",)  # untouched default


def test_command_line_overrides_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("loss:\n  beta: 0.04\nrollout:\n  group_size: 4\n")
    cfg = load_config(GRPOConfig, ["--config", str(y), "--loss.beta", "0.001", "--train.steps", "7"])
    assert cfg.loss.beta == 0.001 and cfg.rollout.group_size == 4 and cfg.train.steps == 7


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("loss:\n  betta: 0.04\n")
    with pytest.raises(ValueError, match=r"bad.yaml.loss: unknown key\(s\) \['betta'\]"):
        load_yaml(GRPOConfig, y)


def test_invalid_loss_value_is_named(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("loss:\n  aggregation: mean\n")
    with pytest.raises(ValueError, match="aggregation"):
        load_yaml(GRPOConfig, y)


def test_missing_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config(GRPOConfig, ["--config", "/nonexistent.yaml"])


@pytest.mark.parametrize("yaml_text,match", [
    ("rollout:\n  stop_strings: '</answer>'\n", r"rollout.stop_strings: expected a list"),
    ("rollout:\n  group_size: four\n", r"rollout.group_size: 'four' is not a valid int"),
    ("rollout:\n  group_size: 4.5\n", r"rollout.group_size: 4.5 is not a valid int"),
    ("train:\n  resume: 'yes'\n", r"train.resume: 'yes' is not a valid bool"),
    ("model:\n  dtype: fp16\n", r"model.dtype: 'fp16' is not one of \['float32', 'bfloat16'\]"),
    ("loss:\n  token_mask_range: [0.5]\n", r"loss.token_mask_range"),
    ("reward:\n  weights: {accuracy: high}\n", r"reward.weights.accuracy: 'high' is not a valid float"),
    ("rollout:\n  group_sise: 4\n", r"unknown key\(s\) \['group_sise'\] \('group_sise': did you mean 'group_size'\?\)"),
    ("- a\n- b\n", r"expected a mapping of sections"),
])
def test_wrong_yaml_types_are_named_before_anything_runs(tmp_path, yaml_text, match):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ValueError, match=match):
        load_config(GRPOConfig, ["--config", str(y)])


def test_yaml_values_are_typed_and_overlay_the_given_default(tmp_path):
    import dataclasses

    y = tmp_path / "c.yaml"
    # YAML reads 1e-6 (no dot) as a string; a float field takes it as the number
    y.write_text("optim:\n  lr: 1e-6\nrollout:\n  stop_strings: ['</answer>', \"\\n\\n\"]\n"
                 "loss:\n  token_mask_range: [0.5, 2]\n")
    base = GRPOConfig()
    default = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=60),
                                  rollout=dataclasses.replace(base.rollout, max_new_tokens=40))
    cfg = load_config(GRPOConfig, [f"--config={y}", "--train.eval-every", "5"], default=default)
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.stop_strings == ("</answer>", "\n\n") and cfg.loss.token_mask_range == (0.5, 2.0)
    # keys the YAML does not set keep the given default, not the dataclass's
    assert cfg.train.steps == 60 and cfg.rollout.max_new_tokens == 40 and cfg.train.eval_every == 5


def test_run_cli_prints_one_line_and_exits_2(capsys, monkeypatch):
    from engine.config import run_cli

    def main():
        raise ValueError("prompts.jsonl:3: missing field 'answer'")

    monkeypatch.delenv("R1_DEBUG", raising=False)
    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert "error: prompts.jsonl:3: missing field 'answer'" in err and "Traceback" not in err
    monkeypatch.setenv("R1_DEBUG", "1")
    with pytest.raises(ValueError):
        run_cli(main)
