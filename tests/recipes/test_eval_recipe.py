"""recipes/eval.py: bad input is one line with exit 2 (before any model is built), run directories resolve to
their hf/ export, other field names and boxed solutions work, and a tiny end-to-end run writes its files."""
import json
import shutil
from pathlib import Path

import pytest

from tests.recipes.helpers import one_error_line
from r1_engine.recipes.eval import expand_args, main, resolve_model

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "recipes" / "tiny" / "base"
EVAL = str(ROOT / "recipes" / "tiny" / "data" / "eval.jsonl")


def _one_error_line(capsys, argv) -> str:
    return one_error_line(capsys, main, argv)


def _copy_model(tmp_path, drop):
    model = tmp_path / "model"
    shutil.copytree(BASE, model)
    for pattern in drop:
        for f in model.glob(pattern):
            f.unlink()
    return model


def test_short_forms_expand():
    assert expand_args(["--model", "a", "--data", "x.jsonl", "y.parquet", "--model=b", "--data.template", "none",
                        "--k", "4"]) == ["--data.paths", "x.jsonl", "y.parquet", "--data.template", "none", "--k", "4",
                                         "--models", "a", "b"]


def test_k_below_one(capsys, tmp_path):
    line = _one_error_line(capsys, ["--model", str(BASE), "--data", EVAL, "--k", "0", "--out", str(tmp_path)])
    assert line.startswith("error: --k=0: must be >= 1")


def test_model_without_weights(capsys, tmp_path):
    model = _copy_model(tmp_path, ["*.safetensors"])
    line = _one_error_line(capsys, ["--model", str(model), "--data", EVAL, "--out", str(tmp_path / "o")])
    assert line.startswith(f"error: --model {model}: no weights in it")


def test_model_without_tokenizer(capsys, tmp_path):
    model = _copy_model(tmp_path, ["tokenizer*.json", "special_tokens_map.json"])
    line = _one_error_line(capsys, ["--model", str(model), "--data", EVAL, "--out", str(tmp_path / "o")])
    assert line.startswith(f"error: --model {model}: no tokenizer files in it")


def test_data_row_without_answer_field(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    line = _one_error_line(capsys, ["--model", str(BASE), "--data", str(data), "--out", str(tmp_path / "o")])
    assert line.startswith(f"error: {data}, line 2: field 'answer' is missing")


def test_missing_data_and_missing_data_flag(capsys, tmp_path):
    line = _one_error_line(capsys, ["--model", str(BASE), "--data", str(tmp_path / "no.jsonl")])
    assert line.startswith(f"error: --data {tmp_path / 'no.jsonl'}: does not exist")
    line = _one_error_line(capsys, ["--model", str(BASE)])
    assert line.startswith("error: --data FILE [FILE ...] (.jsonl or .parquet) is required with --model")


def test_run_directory_resolves_to_its_hf_export(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="a run directory without an hf/ export"):
        resolve_model(run)
    shutil.copytree(BASE, run / "hf")
    assert resolve_model(run) == run / "hf"
    assert resolve_model(BASE) == BASE


def test_end_to_end_with_other_field_names_and_boxed_solutions(tmp_path):
    # the tiny model answers "What is a + b?" questions; references here are worked solutions with a box
    rows = [json.loads(line) for line in Path(EVAL).read_text().splitlines()[:3]]
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"problem": r["prompt"], "solution": f"We add: \\boxed{{{r['answer']}}}."})
                            + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["--model", str(BASE), "--model", str(BASE), "--data", str(data), EVAL, "--data.prompt-key", "problem",
            "--data.answer-key", "solution", "--k", "2", "--data.limit", "3", "--rollout.max-new-tokens", "40",
            "--reward.num-workers", "0", "--out", str(out)]
    with pytest.raises(ValueError, match="eval.jsonl, line 1: missing field 'problem'"):
        main(argv)  # the second dataset has the default field names: named, not silently mis-read
    report = main(argv[:6] + argv[7:])
    saved = json.loads((out / "eval.json").read_text())
    assert (out / "eval.md").read_text().startswith("# Evaluation") and (out / "eval.png").stat().st_size > 0
    first, second = f"{BASE} #1", f"{BASE} #2"  # the same model twice: side by side, told apart, same numbers
    summary = saved["models"][first]["datasets"]["other"]["summary"]
    assert summary == report[first]["datasets"]["other"]["summary"] == report[second]["datasets"]["other"]["summary"]
    questions = saved["models"][first]["datasets"]["other"]["questions"]
    assert len(questions) == 3 and all(len(q["correct"]) == 2 for q in questions)
    # pass@1 is the mean correctness of the samples; the boxed solutions were used as references
    assert summary["pass@1"] == pytest.approx(sum(sum(q["correct"]) for q in questions) / 6)
    assert summary["pass@1"] > 0, "the tiny base model solves some additions: the boxed references were not read"
    assert set(summary) >= {"pass@1", "pass@2", "cons@2", "format_rate", "length/p90", "truncated_frac"}
