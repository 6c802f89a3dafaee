"""Bad input to recipes/r1_zero.py: one line naming the flag, file or field, exit code 2, no traceback, and
before any model is built."""
import os
import shutil
import subprocess
import sys
from pathlib import Path


from tests.recipes.helpers import one_error_line
from r1_engine.recipes.r1_zero import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
TRAIN = str(TINY / "data" / "train.jsonl")


def _one_error_line(capsys, argv) -> str:
    return one_error_line(capsys, main, argv)


def test_negative_kl_coefficient(capsys, tmp_path):
    line = _one_error_line(capsys, ["--out", str(tmp_path / "run"), "--loss.beta", "-0.5"])
    assert line.startswith("error: --loss.beta=-0.5: must be >= 0")


def test_group_size_zero_names_the_group_size(capsys, tmp_path):
    line = _one_error_line(capsys, ["--out", str(tmp_path / "run"), "--rollout.group-size", "0"])
    assert line.startswith("error: --rollout.group-size=0: must be >= 1") and "mini_batches" not in line


def test_missing_data_file(capsys, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    line = _one_error_line(capsys, ["--model", str(TINY / "base"), "--data", str(missing), "--out", str(tmp_path)])
    assert line.startswith(f"error: --data {missing}: does not exist")


def test_missing_model_directory(capsys, tmp_path):
    missing = tmp_path / "no_model"
    line = _one_error_line(capsys, ["--model", str(missing), "--data", TRAIN, "--out", str(tmp_path / "run")])
    assert line.startswith(f"error: --model {missing}: does not exist")


def test_model_directory_without_config_json_is_reported_as_such(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY / "base", model)
    (model / "config.json").unlink()  # the tokenizer files are still there
    line = _one_error_line(capsys, ["--model", str(model), "--data", TRAIN, "--out", str(tmp_path / "run")])
    assert line.startswith(f"error: --model {model}: no config.json") and "tokenizer" not in line


def test_model_directory_without_tokenizer_files(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY / "base", model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    line = _one_error_line(capsys, ["--model", str(model), "--data", TRAIN, "--out", str(tmp_path / "run")])
    assert line.startswith(f"error: --model {model}: no tokenizer files")


def test_out_naming_an_existing_file(capsys, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    line = _one_error_line(capsys, ["--out", str(existing)])
    assert line.startswith(f"error: --out {existing}: exists and is not a directory")
    line = _one_error_line(capsys, ["--out", str(existing / "run")])
    assert line.startswith(f"error: --out {existing / 'run'}: is inside {existing}")
    assert existing.read_text() == "keep me\n"


def test_the_script_itself_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": ""}
    env.pop("R1_DEBUG", None)
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "r1_zero.py"), "--out", str(tmp_path / "run"),
                          "--loss.beta", "-0.5"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: --loss.beta=-0.5: must be >= 0 (a negative KL coefficient rewards moving away from the reference "
        "policy) [R1_DEBUG=1 shows the traceback]"]
    assert not (tmp_path / "run").exists()  # nothing was built or written
