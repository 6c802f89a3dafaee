"""Each loss's own clip range and aggregation from the command line and YAML: `--loss.name gspo` alone is GSPO
with its 3e-4 / 4e-4, `--loss.name cispo` is token-mean, and a value the user sets is kept."""
import pytest

from r1_engine.engine.config import GRPOConfig, load_config
from r1_engine.recipes.r1_zero import TINY_GRPO_EPS_HIGH, resolve_config

MODEL = ["--model", "/models/x", "--data", "/d.jsonl"]  # a named model: the at-scale defaults (no path is read)
GRPO, SEQ = ("grpo", 0.2, 0.2, "seq-mean-token-mean"), "seq-mean-token-mean"
CASES = [
    ([], GRPO),
    (["--loss.name", "gspo"], ("gspo", 3e-4, 4e-4, SEQ)),
    (["--loss.name", "gspo-token"], ("gspo-token", 3e-4, 4e-4, SEQ)),
    (["--loss.name", "cispo"], ("cispo", None, None, "token-mean")),
    (["--loss.name", "gspo", "--loss.eps-low", "0.1"], ("gspo", 0.1, 4e-4, SEQ)),
    (["--loss.name", "cispo", "--loss.aggregation", SEQ], ("cispo", None, None, SEQ)),
    (["--loss.aggregation", "token-mean", "--loss.eps-high", "0.28"], ("grpo", 0.2, 0.28, "token-mean")),
]


def settings(cfg):
    loss = cfg.loss.resolved()
    return loss.name, loss.eps_low, loss.eps_high, loss.aggregation


@pytest.mark.parametrize("argv, expected", CASES)
def test_each_loss_gets_its_own_defaults_from_the_command_line(argv, expected):
    assert settings(load_config(GRPOConfig, argv)) == expected
    cfg, embedded = resolve_config(MODEL + argv)
    assert not embedded and settings(cfg) == expected


@pytest.mark.parametrize("argv, expected", [
    ([], ("grpo", 0.2, TINY_GRPO_EPS_HIGH, SEQ)),  # the tiny world's GRPO clips higher
    (["--loss.name", "gspo"], ("gspo", 3e-4, 4e-4, SEQ)),  # ... which GSPO does not inherit
    (["--loss.name", "cispo"], ("cispo", None, None, "token-mean")),
    (["--loss.eps-high", "0.3"], ("grpo", 0.2, 0.3, SEQ)),
    (["--loss.name", "gspo", "--loss.eps-high", "0.01"], ("gspo", 3e-4, 0.01, SEQ)),
])
def test_the_embedded_default_keeps_them_too(argv, expected):
    cfg, embedded = resolve_config(argv)
    assert embedded and settings(cfg) == expected and cfg.loss.beta == 0.001


def test_yaml_over_a_default_keeps_them(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("loss:\n  name: gspo\n  beta: 0.01\n")
    for argv in (["--config", str(y)], ["--config", str(y)] + MODEL):
        cfg, _ = resolve_config(argv)
        assert settings(cfg) == ("gspo", 3e-4, 4e-4, SEQ) and cfg.loss.beta == 0.01
    y.write_text("loss:\n  name: cispo\n  aggregation: seq-mean-token-sum-norm\n  max_len: 64\n")
    assert settings(load_config(GRPOConfig, ["--config", str(y)])) == ("cispo", None, None, "seq-mean-token-sum-norm")
