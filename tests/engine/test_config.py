"""Typed config: YAML defaults, command-line overrides, errors that name the bad key."""
from pathlib import Path

import pytest

from r1_engine.engine.config import GRPOConfig, load_config, load_yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "r1_zero_qwen2.5_7b.yaml"


def test_example_yaml_loads_with_types():
    cfg = load_yaml(GRPOConfig, EXAMPLE)
    assert cfg.model.tensor_parallel == 2 and cfg.model.dtype == "bfloat16"
    assert cfg.loss.eps_high == 0.28 and cfg.loss.aggregation == "token-mean"
    assert cfg.optim.lr == 1e-6 and cfg.reward.weights == {"accuracy": 1.0, "format": 0.5}
    assert cfg.rollout.stop_strings == ()  # untouched default: completions end with the EOS the policy samples


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
    from r1_engine.engine.config import run_cli

    def main():
        raise ValueError("prompts.jsonl:3: missing field 'answer'")

    monkeypatch.delenv("R1_DEBUG", raising=False)
    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert "error: prompts.jsonl:3: missing field 'answer'" in err and "Traceback" not in err
    monkeypatch.setenv("R1_DEBUG", "1")
    with pytest.raises(ValueError):
        run_cli(main)


def _with(cfg, key, value):
    import copy
    import dataclasses

    section, name = key.split(".")
    if section == "loss":  # past PolicyLossConfig's own checks (kernels/): check_ranges is tested by itself
        loss = copy.copy(cfg.loss)
        object.__setattr__(loss, name, value)
        return dataclasses.replace(cfg, loss=loss)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def test_defaults_and_the_example_are_in_range():
    from r1_engine.engine.config import check_ranges

    check_ranges(GRPOConfig())
    check_ranges(load_yaml(GRPOConfig, EXAMPLE))
    # limits that are legal: greedy evaluation, an entropy penalty, no clipping, the whole budget as L_c
    for key, value in (("train.eval_temperature", 0.0), ("loss.entropy_coef", -0.01), ("optim.grad_clip", 0.0),
                       ("reward.overlong_buffer", 256), ("reward.num_workers", 0), ("rollout.top_k", -1),
                       ("loss.token_mask_range", (0.5, 1.0)), ("train.steps", 0), ("loss.eps_low", None),
                       ("loss.eps_low", 0.0)):
        check_ranges(_with(GRPOConfig(), key, value))


@pytest.mark.parametrize("key,value,flag", [
    ("loss.beta", -0.5, "--loss.beta=-0.5: must be >= 0"),
    ("loss.beta", float("nan"), "--loss.beta=nan: must be >= 0"),
    ("loss.eps_low", 1.0, "--loss.eps-low=1.0: must be in [0, 1)"),
    ("loss.eps_high", -0.1, "--loss.eps-high=-0.1"),
    ("loss.dual_clip_c", 1.0, "--loss.dual-clip-c=1.0: must be > 1"),
    ("loss.cispo_eps_max", 0.0, "--loss.cispo-eps-max=0.0"),
    ("loss.tis_cap", 0.0, "--loss.tis-cap=0.0"),
    ("loss.entropy_coef", float("inf"), "--loss.entropy-coef=inf: must be finite"),
    ("loss.max_len", 0, "--loss.max-len=0"),
    ("loss.seq_mask_range", (1.5, 2.0), "--loss.seq-mask-range=(1.5, 2.0): must be (lo, hi) with 0 <= lo <= 1 <= hi"),
    ("loss.token_mask_range", (0.0, 0.9), "--loss.token-mask-range=(0.0, 0.9)"),
    ("rollout.group_size", 0, "--rollout.group-size=0: must be >= 1"),
    ("rollout.prompts_per_step", 0, "--rollout.prompts-per-step=0"),
    ("rollout.temperature", 0.0, "--rollout.temperature=0.0: must be > 0"),
    ("rollout.top_p", 1.5, "--rollout.top-p=1.5: must be in (0, 1]"),
    ("rollout.top_p", 0.0, "--rollout.top-p=0.0"),
    ("rollout.top_k", 0, "--rollout.top-k=0: must be -1"),
    ("rollout.max_new_tokens", 0, "--rollout.max-new-tokens=0"),
    ("rollout.stop_strings", ("",), "--rollout.stop-strings"),
    ("rollout.gpu_memory_utilization", 1.5, "--rollout.gpu-memory-utilization=1.5"),
    ("rollout.num_threads", 0, "--rollout.num-threads=0"),
    ("reward.timeout_s", 0.0, "--reward.timeout-s=0.0: must be > 0"),
    ("reward.num_workers", -1, "--reward.num-workers=-1"),
    ("reward.overlong_buffer", 9000, "--reward.overlong-buffer=9000: must be None/0 (off) or 1..--rollout.max-new"),
    ("reward.weights", {"accuracy": float("nan")}, "--reward.weights="),
    ("optim.lr", 0.0, "--optim.lr=0.0: must be > 0"),
    ("optim.lr", -1e-6, "--optim.lr=-1e-06"),
    ("optim.weight_decay", -0.1, "--optim.weight-decay=-0.1"),
    ("optim.grad_clip", -1.0, "--optim.grad-clip=-1.0"),
    ("optim.warmup_steps", -1, "--optim.warmup-steps=-1"),
    ("optim.betas", (0.9, 1.0), "--optim.betas=(0.9, 1.0): must be two numbers in [0, 1)"),
    ("algo.mini_batches", 0, "--algo.mini-batches=0"),
    ("algo.epochs_per_batch", 0, "--algo.epochs-per-batch=0"),
    ("algo.num_microbatches", 0, "--algo.num-microbatches=0"),
    ("algo.max_sampling_rounds", 0, "--algo.max-sampling-rounds=0"),
    ("algo.max_tokens_per_row", 0, "--algo.max-tokens-per-row=0"),
    ("data.max_prompt_tokens", 0, "--data.max-prompt-tokens=0"),
    ("model.tensor_parallel", 0, "--model.tensor-parallel=0"),
    ("train.steps", -1, "--train.steps=-1"),
    ("train.seed", -1, "--train.seed=-1"),
    ("train.save_every", -1, "--train.save-every=-1"),
    ("train.eval_every", -2, "--train.eval-every=-2"),
    ("train.eval_samples", 0, "--train.eval-samples=0"),
    ("train.eval_temperature", -0.1, "--train.eval-temperature=-0.1"),
    ("train.eval_top_p", 0.0, "--train.eval-top-p=0.0"),
    ("train.eval_size", 0, "--train.eval-size=0"),
    ("train.keep_checkpoints", 0, "--train.keep-checkpoints=0: must be >= 1"),
])
def test_out_of_range_values_name_their_flag(key, value, flag):
    from r1_engine.engine.config import check_ranges

    with pytest.raises(ValueError) as err:
        check_ranges(_with(GRPOConfig(), key, value))
    assert str(err.value).startswith(flag), str(err.value)


def test_rloo_needs_two_samples_a_group():
    import dataclasses

    from r1_engine.engine.config import check_ranges

    cfg = _with(GRPOConfig(), "rollout.group_size", 1)
    check_ranges(cfg)  # GRPO (and distillation) accept a group of one
    with pytest.raises(ValueError, match="--rollout.group-size=1: must be >= 2 with --algo.estimator rloo"):
        check_ranges(dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, estimator="rloo")))


def test_teacher_refuses_reward_filters_and_shaping():
    """On-policy distillation's advantages come from the teacher: dynamic sampling (a filter on reward spread) and
    the overlong buffer (a reward shaping) would act on numbers the loss never sees."""
    from r1_engine.engine.config import check_ranges

    student = _with(GRPOConfig(), "algo.teacher", "teacher/hf")
    check_ranges(student)
    check_ranges(_with(GRPOConfig(), "algo.dynamic_sampling", True))  # fine without a teacher
    with pytest.raises(ValueError, match=r"^--algo.dynamic-sampling=True: must be off with --algo.teacher"):
        check_ranges(_with(student, "algo.dynamic_sampling", True))
    with pytest.raises(ValueError, match=r"^--reward.overlong-buffer=8: must be None/0 with --algo.teacher"):
        check_ranges(_with(student, "reward.overlong_buffer", 8))
