"""benchmarks/gpu_check.py, the one-call GPU driver, without a GPU: its control flow (a missing package, a failing
part, a part past its budget, a budget used up) and the real parts' dry run, as CI can check them."""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import Part, run_parts

REPO = Path(__file__).resolve().parents[2]
META = {"device": "test", "date": "today", "dry_run": True, "budget_s": 0, "python": "3", "torch": "t"}


def test_parts_fail_skip_and_time_out_without_stopping_the_run(tmp_path):
    parts = [
        Part("ok", ("-c", "print('measured')"), 30),
        Part("missing", ("-c", "print('never')"), 30, requires=("no_such_module_r1",)),
        Part("fails", ("-c", "raise SystemExit(3)"), 30),
        Part("slow", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 3),
        Part("after", ("-c", "print('late')"), 30),
    ]
    code = run_parts(parts, tmp_path, budget_s=12, meta={**META, "budget_s": 12})
    assert code == 1  # a failed part and a timeout
    parts_done = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert parts_done["ok"]["status"] == "passed" and parts_done["ok"]["tail"] == ["measured"]
    assert parts_done["missing"] == {"status": "skipped", "reason": "not installed: no_such_module_r1", "wall_s": 0.0}
    assert parts_done["fails"]["status"] == "failed" and parts_done["fails"]["exit_code"] == 3
    assert parts_done["slow"]["status"] == "timeout" and parts_done["slow"]["tail"] == ["started"]
    assert 2.5 < parts_done["slow"]["wall_s"] < 10
    # what is left of the 12 s budget after the 3 s timeout is still given to the next part
    assert parts_done["after"]["status"] == "passed"
    md = (tmp_path / "summary.md").read_text()
    assert "| slow | timeout |" in md and "| missing | skipped |" in md


def test_a_used_up_budget_skips_the_rest(tmp_path):
    parts = [Part("slow", ("-c", "import time; time.sleep(60)"), 30), Part("next", ("-c", "pass"), 30)]
    code = run_parts(parts, tmp_path, budget_s=3, meta=META)
    done = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert code == 1 and done["slow"]["status"] == "timeout"
    assert done["next"]["status"] == "skipped" and done["next"]["reason"].startswith("no time left")


def test_summary_is_written_after_each_part(tmp_path):
    """A call killed mid-way (the device tool's limit) still leaves the parts measured before it."""
    probe = ("import json, pathlib; p = pathlib.Path(r'%s') / 'summary.json'; "
             "print(sorted(json.loads(p.read_text())['parts']))") % tmp_path
    parts = [Part("first", ("-c", "pass"), 30), Part("second", ("-c", probe), 30)]
    assert run_parts(parts, tmp_path, budget_s=60, meta=META) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["parts"]["second"]["tail"] == ["['first']"]


def test_real_parts_dry_run(tmp_path):
    """The three parts as the GPU call runs them, on CPU with tiny sizes (~40 s): each passes and leaves its files."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert {name: r["status"] for name, r in done.items()} == {"kernels": "passed", "kernel-tests": "passed",
                                                                "step": "passed"}
    assert list(tmp_path.glob("gpu-step-*.json")) and list(tmp_path.glob("cpu-dry-run-*.json"))


def test_unknown_part_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path),
                          "--parts", "kernels,nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "gpu_check: --parts: unknown nope (known: kernels, kernel-tests, step)"
