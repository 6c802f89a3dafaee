"""Every GPU check and benchmark in one call of the device tool (at most ~480 s), kernel targets first.

    python -m benchmarks.gpu_check --out $OUT                 # on the GPU machine (benchmarks/run_gpu.sh calls this)
    python -m benchmarks.gpu_check --dry-run --out DIR        # CPU: the same control flow on tiny sizes (CI)

Parts, in order, each a subprocess with its own time budget (cut to what is left of the whole budget):
  kernels       benchmarks.gpu_suite: roofline, correctness, benchmarks vs eager / Liger, launch sweep, targets
  kernel-tests  tests/kernels on CUDA (pytest with no plugins beyond the project's own: the image may lack them)
  step          benchmarks.gpu_step: Megatron bf16 parity and the 0.5B-shaped step time (needs megatron-core)
A part whose packages are missing is `skipped` with the reason; a part that fails or runs out of time is recorded
as such and the next one still runs. After every part `summary.json` and `summary.md` are rewritten in --out, so a
run cut short still leaves what it measured. Exit code: 0 when every part that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = "summary"


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]  # run with the current interpreter: [sys.executable, *argv]
    budget_s: float
    requires: tuple[str, ...] = ()  # importable modules; a part without them is skipped


def default_parts(out: Path, dry_run: bool) -> list[Part]:
    dry = ("--dry-run",) if dry_run else ()
    kernel_tests = ("-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                    "-p", "benchmarks.cuda_default_device", "-rfE", "-x")
    if dry_run:  # the interpreter is slow: one file is enough to check the plumbing
        kernel_tests = (*kernel_tests[:3], "tests/kernels/test_loss_edge_cases.py", *kernel_tests[3:])
        kernel_tests = tuple(a for a in kernel_tests if a != "tests/kernels")
    else:
        kernel_tests = (*kernel_tests, "-m", "not multiproc")  # gloo workers cannot take CUDA tensors
    return [
        Part("kernels", ("-m", "benchmarks.gpu_suite", "--out", str(out), "--budget-s", "200", *dry,
                         *(("--sections", "roofline,correctness") if dry_run else ())), 260, ("triton",)),
        Part("kernel-tests", kernel_tests, 120, ("pytest", "triton")),
        Part("step", ("-m", "benchmarks.gpu_step", "--out", str(out), *dry), 100, ("megatron.core",)),
    ]


def missing_modules(names) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def run_part(part: Part, budget_s: float, log_path: Path) -> dict:
    """One part as a subprocess; its output goes to log_path (and its tail into the record)."""
    missing = missing_modules(part.requires)
    if missing:
        return {"status": "skipped", "reason": f"not installed: {', '.join(missing)}", "wall_s": 0.0}
    if budget_s < 1:
        return {"status": "skipped", "reason": f"no time left ({budget_s:.0f} s of the budget)", "wall_s": 0.0}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *part.argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=budget_s)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the part and whatever it started
            proc.wait()
            code, status = None, "timeout"
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    return {"status": status, "exit_code": code, "wall_s": round(time.monotonic() - t0, 1), "budget_s": budget_s,
            "log": log_path.name, "tail": tail}


def write_summary(out: Path, meta: dict, records: dict) -> None:
    (out / f"{SUMMARY}.json").write_text(json.dumps({"meta": meta, "parts": records}, indent=1))
    lines = [f"# GPU check on {meta['device']} ({meta['date']}){' — DRY RUN' if meta['dry_run'] else ''}", "",
             f"python {meta['python']}, torch {meta['torch']}, budget {meta['budget_s']:.0f} s", "",
             "| part | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for name, r in records.items():
        note = r.get("reason") or (f"exit {r['exit_code']}, log {r['log']}" if "log" in r else "")
        lines.append(f"| {name} | {r['status']} | {r['wall_s']} | {r.get('budget_s', '')} | {note} |")
    (out / f"{SUMMARY}.md").write_text("\n".join(lines) + "\n")


def run_parts(parts: list[Part], out: Path, budget_s: float, meta: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    records: dict[str, dict] = {}
    for part in parts:
        left = budget_s - (time.monotonic() - start)
        records[part.name] = run_part(part, min(part.budget_s, left), out / f"{part.name}.log")
        r = records[part.name]
        print(f"gpu_check: {part.name}: {r['status']} ({r['wall_s']} s){' - ' + r['reason'] if 'reason' in r else ''}",
              flush=True)
        write_summary(out, meta, records)
    failed = [n for n, r in records.items() if r["status"] in ("failed", "timeout")]
    print(f"gpu_check: {len(records) - len(failed)} of {len(records)} parts passed or skipped"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def describe_machine(dry_run: bool, budget_s: float) -> dict:
    import datetime

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "date": datetime.date.today().isoformat(), "dry_run": dry_run, "budget_s": budget_s,
            "python": sys.version.split()[0], "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the control flow")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole call's budget (default 480)")
    ap.add_argument("--parts", default=None, help="comma-separated subset: kernels,kernel-tests,step")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run for the CPU check of the control flow", file=sys.stderr)
        return 2
    parts = default_parts(args.out, args.dry_run)
    if args.parts:
        wanted = args.parts.split(",")
        unknown = sorted(set(wanted) - {p.name for p in parts})
        if unknown:
            print(f"gpu_check: --parts: unknown {', '.join(unknown)} (known: kernels, kernel-tests, step)",
                  file=sys.stderr)
            return 2
        parts = [p for p in parts if p.name in wanted]
    return run_parts(parts, args.out, args.budget_s, describe_machine(args.dry_run, args.budget_s))


if __name__ == "__main__":
    sys.exit(main())
