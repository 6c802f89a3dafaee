"""Synchronous vs one-step off-policy rollouts on the embedded default, side by side, over seeds.

    python -m benchmarks.offpolicy_race [--seeds 1234 1235 1236] [--staleness 0 1] [--out DIR] [recipe flags]

Each (seed, K) runs `python -m r1_engine.recipes.r1_zero --train.seed S --algo.max-staleness K` in its own process,
one after the other (never two at once: they would share the cores). Prints, and writes to DIR/offpolicy_race.md, one
row per run (whole-process wall time, the training loop's time from metrics.jsonl, held-out pass@1 before and after)
and one row per K with the mean and spread over seeds and the speed ratio to K = 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_one(out: Path, seed: int, staleness: int, flags: list[str]) -> dict:
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)  # the trainer's CPU path is plain torch
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "r1_engine.recipes.r1_zero", "--out", str(out), "--train.seed",
                           str(seed), "--algo.max-staleness", str(staleness), "--train.no-progress", *flags],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"offpolicy_race: seed {seed} K={staleness} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    found = re.search(r"held-out pass@1 ([\d.]+) -> ([\d.]+)", done.stdout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "K": staleness, "wall_s": wall, "loop_s": sum(r.get("time/step", 0.0) for r in rows),
            "before": float(found.group(1)), "after": float(found.group(2))}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("outputs/offpolicy_race"))
    args, flags = parser.parse_known_args(argv)
    results = []
    for seed in args.seeds:
        for k in args.staleness:  # interleaved: a drift in the machine's load hits both alike
            result = run_one(args.out / f"seed{seed}_K{k}", seed, k, flags)
            print(f"seed {seed} K={k}: {result['wall_s']:.1f} s wall, loop {result['loop_s']:.1f} s, "
                  f"pass@1 {result['before']:.3f} -> {result['after']:.3f}", flush=True)
            results.append(result)
    lines = ["| K (max staleness) | seed | wall (s) | train loop (s) | held-out pass@1 before -> after |",
             "|---|---|---:|---:|---|"]
    lines += [f"| {r['K']} | {r['seed']} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['before']:.3f} -> "
              f"{r['after']:.3f} |" for r in results]
    lines += ["", "| K | wall (s) | train loop (s) | speed vs K=0 (loop) | held-out pass@1 after |",
              "|---|---:|---:|---:|---|"]
    base = statistics.fmean(r["loop_s"] for r in results if r["K"] == args.staleness[0])
    for k in args.staleness:
        mine = [r for r in results if r["K"] == k]
        loop = statistics.fmean(r["loop_s"] for r in mine)
        lines.append(f"| {k} | {_spread([r['wall_s'] for r in mine])} | {_spread([r['loop_s'] for r in mine])} | "
                     f"{base / loop:.2f}x | {_spread([r['after'] for r in mine])} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offpolicy_race.md").write_text(text + "\n")
    (args.out / "offpolicy_race.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
