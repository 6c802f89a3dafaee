"""recipes/r1.py: the four stages end to end (cut down), resume, --from-stage, and bad input as one line."""
import json
import shutil
from pathlib import Path

import pytest

from r1_engine.recipes.r1 import main
from tests.recipes.helpers import one_error_line

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "recipes" / "tiny" / "base"
# a few steps a stage: every stage runs, trains and is evaluated, in ~2 minutes on 2 cores
SHORT = ["--cold-start.train.epochs", "10", "--rejection.temperature", "0.6", "--sft.train.epochs", "1", "--reasoning-rl.train.steps", "2",
         "--all-scenario-rl.train.steps", "2", "--data.rejection-prompts", "24", "--eval.size", "16",
         "--eval.samples", "2", "--reward-model.epochs", "1", "--cold-start.train.no-progress",
         "--sft.train.no-progress", "--reasoning-rl.train.no-progress", "--all-scenario-rl.train.no-progress",
         "--reward-model.no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "run"
    with pytest.MonkeyPatch.context() as mp:  # conftest's function-scoped fixtures do not reach a module fixture
        mp.delenv("TRITON_INTERPRET", raising=False)  # the kernels' torch path, as a user's CPU run takes
        mp.delenv("R1_DEBUG", raising=False)
        report = main(["--out", str(out), *SHORT])
    return out, report


def test_every_stage_writes_its_model_and_the_table(run):
    out, report = run
    names = [row["name"] for row in report["rows"]]
    assert names == ["base", "1: cold start SFT", "2: reasoning RL", "2: reasoning RL, no language reward",
                     "3: rejection sampling + SFT", "4: all-scenario RL"]
    for n in range(1, 5):
        assert (out / f"stage_{n}" / "hf" / "config.json").is_file()
        assert json.loads((out / f"stage_{n}" / "stage.json").read_text())["stage"] == n
    # the readable format's markers are single special tokens of every stage's tokenizer, embeddings resized
    from r1_engine.engine.data import load_tokenizer
    from r1_engine.engine.readable import READABLE_TOKENS

    tok = load_tokenizer(out / "stage_4" / "hf")
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in READABLE_TOKENS)
    assert json.loads((out / "stage_4" / "hf" / "config.json").read_text())["vocab_size"] >= len(tok)
    # rejection sampling kept correct samples only, with their provenance
    rows = [json.loads(x) for x in (out / "stage_3" / "rejection.jsonl").read_text().splitlines()]
    assert rows and all(r["checkpoint"].endswith("stage_2/hf") and r["reward"] >= 1.0 for r in rows)
    # the general prompts were scored by the trained reward model in stage 4
    metrics = [json.loads(x) for x in (out / "stage_4" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/helpfulness" in m for m in metrics) and any("reward/accuracy" in m for m in metrics)
    table = (out / "results.md").read_text()
    assert "| 4: all-scenario RL |" in table and "RM helpfulness" in table
    assert (out / "results.png").stat().st_size > 10_000
    base, cold = report["rows"][0]["summary"], report["rows"][1]["summary"]
    # cold start teaches the format (the base model never saw the template or the readable format)
    assert base["format_rate"] < 0.3 and cold["format_rate"] > 0.8 and cold["pass@1"] > base["pass@1"] + 0.3, \
        (base, cold)


def test_rerun_skips_finished_stages(run, capsys):
    out, _ = run
    main(["--out", str(out), *SHORT])
    printed = capsys.readouterr().out
    assert all(f"stage {n} (" in printed and "done, skipped" in printed for n in range(1, 5))
    assert "=== stage" not in printed  # nothing was trained again


def test_until_stage_then_from_stage(run, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage_4", "checkpoints", "tensorboard"))
    main(["--out", str(copy), "--from-stage", "4", "--until-stage", "4", *SHORT])
    assert "=== stage 4" in capsys.readouterr().out and (copy / "stage_4" / "stage.json").is_file()


def test_from_stage_without_the_previous_model(capsys, tmp_path):
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--from-stage", "3"])
    assert line.startswith(f"error: stage 3 starts from stage 2's model, but {tmp_path / 'run' / 'stage_2' / 'hf'}")


def test_reward_model_dir_of_the_wrong_kind(capsys, tmp_path):
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--all-scenario-rl.reward.models",
                                          "helpfulness", str(BASE)])
    assert line.startswith(f"error: --all-scenario-rl.reward.models helpfulness {BASE}:") and "causal LM" in line
    assert not (tmp_path / "run").exists()


def test_a_stage_flag_out_of_range_names_the_stage(capsys, tmp_path):
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--cold-start.optim.lr", "0"])
    assert line.startswith("error: --cold-start.optim.lr=0.0: must be > 0")
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--reasoning-rl.loss.beta", "-1"])
    assert line.startswith("error: --reasoning-rl.loss.beta=-1.0: must be >= 0")


def test_missing_stage_data_file(capsys, tmp_path):
    missing = tmp_path / "cs.jsonl"
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--data.cold-start", str(missing)])
    assert line.startswith(f"error: --data.cold-start {missing}: does not exist")


def test_empty_rejection_sampling_result(run, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage_3", "stage_4", "checkpoints", "tensorboard"))
    # one new token a sample: no completion can be correct, so nothing is kept
    line = one_error_line(capsys, main, ["--out", str(copy), "--from-stage", "3", "--until-stage", "3",
                                         "--rejection.max-new-tokens", "1", *SHORT])
    assert line.startswith("error: ") and "stage_2/hf" in line and "truncated" in line, line  # cut at 1 token


def test_r1_world_data_files_regenerate_identically(tmp_path):
    from r1_engine.recipes.tiny.r1_world import R1_DATA_DIR, TASKS, helpful_rate, write_r1_data

    for path in write_r1_data(tmp_path):
        assert path.read_bytes() == (R1_DATA_DIR / path.name).read_bytes(), path.name
    rows = [json.loads(x) for x in (R1_DATA_DIR / "cold_start.jsonl").read_text().splitlines()]
    mixed = sum("检查" in r["completion"] for r in rows) / len(rows)
    assert 0.4 < mixed < 0.6  # half the chains of thought switch language, after the arithmetic
    helpful, curt = TASKS["Greet {n}."]
    assert helpful_rate(["Greet Vic.", "Greet Vic."], [helpful, curt]) == 0.5


def test_from_stage_3_needs_the_reasoning_prompts(capsys, tmp_path):
    """Stages 2, 3 and 4 all read --data.reasoning; --from-stage 3 without it was accepted and died in a TypeError."""
    sft = ROOT / "recipes" / "tiny" / "data" / "r1" / "general_sft.jsonl"
    line = one_error_line(capsys, main, ["--model", str(BASE), "--out", str(tmp_path / "run"), "--from-stage", "3",
                                         "--data.general-sft", str(sft)])
    assert line.startswith("error: --data.reasoning FILE is required for stage 3 (rejection sampling + SFT)"), line


def test_report_without_held_out_sets(tmp_path):
    """No --data.eval-*: every row's summary is empty; the report still ends with a table (and no picture) instead of
    crashing in plt.subplots(1, 0) on every rerun."""
    from r1_engine.recipes.r1 import data_files  # noqa: F401 - the recipe's modules import cleanly
    from r1_engine.recipes.r1_config import R1Config
    from r1_engine.recipes.r1_report import write_report

    rows = [{"name": "base", "summary": {}}, {"name": "1: cold start SFT", "summary": {}}]
    (tmp_path / "results.png").write_bytes(b"stale")
    table = write_report(rows, tmp_path, R1Config(), R1Config().data)
    assert table.splitlines()[2] == "| base |" and "No held-out numbers" in table
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "results.png").exists()


def test_r1_defaults_reward_language_and_refuse_an_empty_ablation(capsys, tmp_path):
    """R1's own defaults (a named model, no preset) are the paper's: the language reward is on in stage 2 (a plain
    GRPOConfig gave it weight 0, and --language-ablation compared two identical runs); an ablation with the weight
    at 0 is refused."""
    from r1_engine.recipes.r1 import resolve_config

    cfg, embedded = resolve_config(["--model", str(BASE), "--out", str(tmp_path / "run")])
    assert not embedded and cfg.reasoning_rl.reward.weights["language"] == 1.0
    assert cfg.all_scenario_rl.reward.weights["language"] == 1.0
    line = one_error_line(capsys, main, ["--model", str(BASE), "--out", str(tmp_path / "run"), "--language-ablation",
                                         "--reasoning-rl.reward.weights.language", "0"])
    assert line.startswith("error: --language-ablation compares stage 2 with and without the language reward"), line


def test_one_language_for_the_run(capsys, tmp_path):
    """--language zh reaches the stage-2/4 rewards, the rejection filter and the evaluation; a stage set to another
    language on its own is a conflict named by its flag."""
    from r1_engine.recipes.r1 import resolve_config

    cfg, _ = resolve_config(["--out", str(tmp_path / "run"), "--language", "zh"])
    assert {cfg.reasoning_rl.reward.language, cfg.all_scenario_rl.reward.language, cfg.rejection.language,
            cfg.eval.language} == {"zh"}
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--rejection.language", "zh"])
    assert line.startswith("error: --rejection.language zh differs from the run's --language en: set --language zh"), line
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--language", "fr"])
    assert line.startswith("error: --language fr: expected one of en, zh"), line


def test_every_data_key_option_is_used(tmp_path, capsys):
    """A user's files with their own field names: each stage reads its file with its section's keys (they were shown
    by --help and then ignored); the stage options the recipe sets itself are refused instead of replaced."""
    from r1_engine.recipes.r1 import data_files, resolve_config
    from r1_engine.recipes.r1_stages import Pipeline

    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    files = {"--data.cold-start": jsonl("cs.jsonl", [{"question": "1+1?", "response": "<|reasoning|>1+1=2"}]),
             "--data.reasoning": jsonl("math.jsonl", [{"problem": "2+2?", "solution": "4"}]),
             "--data.eval-reasoning": jsonl("aime.jsonl", [{"problem": "3+3?", "solution": "6"}]),
             "--data.general-sft": jsonl("chat.jsonl", [{"instruction": "Hi", "output": "Hello!"}]),
             "--data.general": jsonl("gen.jsonl", [{"instruction": "Bye"}]),
             "--data.eval-general": jsonl("gen_eval.jsonl", [{"instruction": "Thanks"}])}
    keys = ["--cold-start.data.prompt-key", "question", "--cold-start.data.completion-key", "response",
            "--reasoning-rl.data.prompt-key", "problem", "--reasoning-rl.data.answer-key", "solution",
            "--sft.data.prompt-key", "instruction", "--sft.data.completion-key", "output",
            "--all-scenario-rl.data.prompt-key", "instruction"]
    args = ["--model", str(BASE), "--out", str(tmp_path / "run"), *keys,
            *(x for flag, path in files.items() for x in (flag, path)),
            "--all-scenario-rl.reward.models", "helpfulness", str(BASE)]
    cfg, embedded = resolve_config(args)
    pipeline = Pipeline(cfg, data_files(cfg, embedded), BASE, ps=None)
    [cold] = pipeline.sft_examples(pipeline.data.cold_start, cfg.cold_start)
    assert (cold.prompt, cold.completion) == ("1+1?", "<|reasoning|>1+1=2")
    [chat] = pipeline.sft_examples(pipeline.data.general_sft, cfg.sft)
    assert (chat.prompt, chat.completion) == ("Hi", "Hello!")
    [math] = pipeline.reasoning_prompts()
    assert (math.prompt, math.answer) == ("2+2?", "4")
    [held_out] = pipeline.reasoning_prompts(pipeline.data.eval_reasoning)
    assert held_out.answer == "6"
    [general] = pipeline.general_prompts(pipeline.data.general)
    assert general.prompt == "Bye" and general.kind == "general"
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--cold-start.data.template", "chat"])
    assert line.startswith("error: --cold-start.data.template='chat': set by the recipe"), line
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "run"), "--reasoning-rl.model.tensor-parallel", "2"])
    assert line.startswith("error: --reasoning-rl.model.tensor-parallel=2: set by the recipe"), line
