"""Where a GRPO step of the embedded default goes: phases (the trainer's own timers) and the CPU ops under them.

    python -m benchmarks.step_profile [--steps 6] [--warmup 3] [--out FILE.md] [recipe flags, e.g. --algo.max-staleness 1]

Runs the embedded default (recipes/r1_zero.py's world) for warmup + steps steps; the last `steps` are recorded by
torch.profiler. Prints (and writes with --out) two tables: seconds per step of each phase, and the ops' self CPU
time per step by kind (matmuls, attention, the rest of aten, and what is left of the step's wall time outside any
aten op: Python, module calls, autograd bookkeeping). Thread counts are the recipe's own (OMP_NUM_THREADS
changes them); the profiler adds its own cost per op, so compare runs of this script with each other.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

PHASES = ("rollout", "advantages", "logprobs", "train", "weight_sync")
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax"),
}


def _kind(name: str) -> str:
    for kind, names in KINDS.items():
        if name in names:
            return kind
    return "other aten" if name.startswith("aten::") else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    parser.add_argument("--run-dir", default="outputs/step_profile")
    args, recipe_flags = parser.parse_known_args(argv)

    import shutil

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer
    from r1_engine.recipes.r1_zero import resolve_config
    from r1_engine.recipes.tiny.corpus import DATA_DIR
    from r1_engine.recipes.tiny.pretrain import ensure_base_model

    shutil.rmtree(args.run_dir, ignore_errors=True)
    cfg, embedded = resolve_config(["--out", args.run_dir, "--train.steps", str(args.warmup + args.steps),
                                    "--train.eval-every", "0", "--train.no-progress", "--train.save-every", "0",
                                    "--train.no-export-hf", *recipe_flags])
    if not embedded:
        sys.exit("step_profile: the embedded default only (no --model)")
    trainer = GRPOTrainer(cfg, ensure_base_model(), load_prompts(DATA_DIR / "train.jsonl"))
    trainer.fit(stop_after=args.warmup)
    ops: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        history = trainer.fit(stop_after=args.warmup + args.steps)
        wall = time.perf_counter() - start
    for event in prof.key_averages():
        kind = _kind(event.key)
        if kind:
            ops[kind] += event.self_cpu_time_total / 1e6
    trainer.close()
    n = len(history)
    phases = {p: sum(m.get(f"time/{p}", 0.0) for m in history) / n for p in PHASES}
    step = wall / n  # with the profiler's own cost: compare runs of this script, not with metrics.jsonl

    lines = [f"`python -m benchmarks.step_profile {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
             f"{torch.__version__}; {n} steps after {args.warmup} warm-up steps)", "",
             "| phase | s / step | share |", "|---|---:|---:|"]
    total = sum(phases.values())
    for p, s in phases.items():
        lines.append(f"| {p} | {s:.3f} | {s / total:.0%} |")
    lines.append(f"| **step (phase timers)** | **{total:.3f}** | |")
    lines += ["", "| CPU time by kind (profiled, main process) | s / step | share of the profiled step |",
              "|---|---:|---:|"]
    outside = (wall - sum(ops.values())) / n
    for kind in ("matmul", "attention", "other aten"):
        lines.append(f"| {kind} | {ops[kind] / n:.3f} | {ops[kind] / n / step:.0%} |")
    lines.append(f"| outside aten ops (Python, modules, autograd, waiting) | {max(outside, 0):.3f} | "
                 f"{max(outside, 0) / step:.0%} |")
    lines.append(f"| **profiled step** | **{step:.3f}** | |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"phases": phases, "ops": {k: v / n for k, v in
                                                                                       ops.items()},
                                                             "profiled_step": step}, indent=1))


if __name__ == "__main__":
    main()
