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
