"""benchmarks/trl_race.py end to end at the smallest size (one step each, a few held-out questions, ~30 s on 2 cores):
both methods train, export, are evaluated with plain `generate`, and the race writes its curves, plot and table.
Skipped where TRL (a bench extra) is not installed; without it the race exits 2 with the install line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_race_without_trl_exits_2_with_the_install_line(monkeypatch, capsys):
    from benchmarks import trl_race

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    assert trl_race.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -c constraints.txt trl" in err[0]


@pytest.mark.timeout(300)
def test_one_step_race_writes_curves_plot_and_table(tmp_path):
    pytest.importorskip("trl", reason="TRL is a bench extra: pip install -c constraints.txt trl")
    cmd = [sys.executable, "-m", "benchmarks.trl_race", "--steps", "1", "--eval-questions", "4", "--eval-samples", "2",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "race.jsonl").read_text().splitlines()]
    assert {(r["method"], r["step"]) for r in rows} == {("ours", 1), ("trl", 1)}
    assert all(r["time_s"] > 0 and 0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 for r in rows)
    assert (tmp_path / "race.png").stat().st_size > 0
    record = json.loads((tmp_path / "race.json").read_text())
    assert set(record["eval"]) == {"base", "ours", "trl"} and record["trl_summary"]["loss_type"] == "grpo"
    for e in record["eval"].values():
        assert e["questions"] == 4 and e["k"] == 2 and 0 <= e["pass@1"] <= 1 and 0 <= e["eos_rate"] <= 1
    assert record["speed_ratio_train"] > 0 and record["trl"]["train_s"] > 0 and record["ours"]["train_s"] > 0
    assert "| r1-engine" in run.stdout and "| TRL " in run.stdout and "held-out pass@1" in run.stdout
    for d in ("ours/hf", "trl/hf"):
        assert (tmp_path / d / "config.json").is_file() and (tmp_path / d / "tokenizer.json").is_file()
