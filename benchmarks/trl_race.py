"""A learning race on the embedded R1-Zero task: r1-engine's trainer vs TRL's GRPOTrainer, same base model, same
prompts, same settings, one after the other on the same machine (issue 27).

    python -m benchmarks.trl_race [--steps 60] [--out DIR] [--threads N] [--seed S] [--eval-questions Q]

1. ours: `python -m r1_engine.recipes.r1_zero --out DIR/ours --train.steps N ...` (the embedded default; its own
   before/after evaluation cut to a few questions), timed as a whole process and as its training loop (the sum of
   metrics.jsonl's time/step);
2. TRL: benchmarks/trl_race_trl.py in its own process (the settings mapping, the exact prompts and the learning-rate
   schedule are there), timed the same two ways (process; on_train_begin to each step's log);
3. both exported models and the base model sampled as a user would (benchmarks/trl_race_eval.py: from_pretrained +
   plain generate at the embedded default's eval temperature 0.6 / top_p 0.95, k samples a held-out question).

Both children get the same thread count (OMP_NUM_THREADS / MKL_NUM_THREADS, torch.set_num_threads; ours also
--rollout.num-threads). Writes DIR/race.jsonl (a row per method and step: wall seconds since training began,
reward, accuracy, format), DIR/race.png (both curves vs wall time and vs step), DIR/race.json (everything) and
DIR/race.md (the table it prints). The speed ratio is TRL's training wall time / ours to the same (last common)
step; > 1 means ours is faster. TRL is a bench extra: pip install -c constraints.txt trl (or -e '.[bench]').
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install -c constraints.txt trl  (or: pip install -c constraints.txt -e '.[bench]')"
OWN_EVAL_QUESTIONS = 16  # ours' built-in before/after evaluation, kept small: the race evaluates both alike


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # tests/conftest.py sets it; ours would then run its kernels in Triton's interpreter (1 step: 14 s -> 66 s)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_child(name: str, cmd: list[str], out: Path, threads: int) -> float:
    """Run one method's process (output to out/<name>.log); its wall seconds. Exits with the log's tail on failure."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        sys.exit(f"[{name}] failed (exit {rc}); the end of {log}:\n" + "\n".join(tail))
    print(f"[{name}] done in {seconds:.1f} s (log: {log})", flush=True)
    return seconds


def run_ours(args, out: Path) -> dict:
    d = out / "ours"
    cmd = [sys.executable, "-m", "r1_engine.recipes.r1_zero", "--out", str(d), "--train.steps", str(args.steps),
           "--train.eval-every", "0", "--train.seed", str(args.seed), "--rollout.num-threads", str(args.threads),
           "--train.eval-size", str(OWN_EVAL_QUESTIONS), "--train.eval-samples", "1", "--train.no-progress"]
    total = run_child("ours", cmd, out, args.threads)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, clock = [], 0.0
    for r in rows:
        if "time/step" in r:
            clock += r["time/step"]
            curve.append({"step": r["step"], "time_s": clock, "reward": r["reward/mean"],
                          "accuracy": r["reward/accuracy"], "format": r["reward/format"], "kl": r.get("train/kl"),
                          "length": r.get("response_length/mean"), "lr": r.get("optim/lr")})
    return {"total_s": total, "train_s": clock, "curve": curve, "hf": d / "hf"}


def run_trl(args, out: Path) -> dict:
    d = out / "trl"
    cmd = [sys.executable, "-m", "benchmarks.trl_race_trl", "--out", str(d), "--steps", str(args.steps),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    total = run_child("trl", cmd, out, args.threads)
    summary = json.loads((d / "summary.json").read_text())
    curve = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"total_s": total, "train_s": summary["train_s"], "curve": curve, "hf": d / "hf", "summary": summary}


def time_to_step(curve: list[dict], step: int) -> float:
    return next(r["time_s"] for r in curve if r["step"] >= step)


def plot(ours: dict, trl: dict, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, xlabel in ((axes[0], "time_s", "training wall time (s)"), (axes[1], "step", "step")):
        for name, run, color in (("r1-engine", ours, "tab:blue"), (label, trl, "tab:orange")):
            xs = [r[x] for r in run["curve"]]
            ax.plot(xs, [r["accuracy"] for r in run["curve"]], color=color, label=f"{name} accuracy")
            ax.plot(xs, [r["format"] for r in run["curve"]], color=color, ls="--", label=f"{name} format")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training batch mean (128 samples)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("GRPO on the embedded R1-Zero task: r1-engine vs TRL GRPOTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], step: int) -> str:
    head = ("| method | train wall (s) | total wall (s) | steps | held-out pass@1 | format rate | EOS rate | "
            f"speed: TRL wall / ours wall to step {step} (train, total) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        e = r["eval"]
        cells = [r["method"], f"{r['train_s']:.1f}" if r["train_s"] is not None else "-",
                 f"{r['total_s']:.1f}" if r["total_s"] is not None else "-", str(r["steps"]),
                 f"{e['pass@1']:.3f} ± {e['se/pass@1']:.3f}", f"{e['format_rate']:.3f}", f"{e['eos_rate']:.3f}",
                 r.get("ratio", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from r1_engine.recipes.tiny.settings import TINY_DEFAULT as D

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=D.train.steps)
    p.add_argument("--out", type=Path, default=Path("outputs/trl_race"))
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each method (default 1)")
    p.add_argument("--seed", type=int, default=D.train.seed)
    p.add_argument("--eval-questions", type=int, default=None, help="held-out questions evaluated (default: all)")
    p.add_argument("--eval-samples", type=int, default=4, help="k samples a held-out question (default 4)")
    args = p.parse_args(argv)
    try:
        importlib.import_module("trl")  # the child imports it again; here for one clear line when it cannot
    except ImportError as err:
        print(f"benchmarks.trl_race: TRL is not importable ({err}); install the bench extra: {INSTALL}",
              file=sys.stderr)
        return 2
    if args.steps < 1 or args.threads < 1 or args.eval_samples < 1 or (args.eval_questions or 1) < 1:
        print("benchmarks.trl_race: --steps, --threads, --eval-samples and --eval-questions must be >= 1",
              file=sys.stderr)
        return 2
    import torch

    from benchmarks.trl_race_eval import evaluate_hf
    from r1_engine.engine.data import load_prompts
    from r1_engine.recipes.tiny.corpus import DATA_DIR
    from r1_engine.recipes.tiny.pretrain import ensure_base_model

    out = args.out.resolve()
    for stale in (out / "ours", out / "trl"):  # a fresh race every time (ours would resume from its checkpoint)
        shutil.rmtree(stale, ignore_errors=True)
    ours, trl = run_ours(args, out), run_trl(args, out)
    label = f"TRL {trl['summary']['trl_version']} GRPOTrainer"

    torch.set_num_threads(args.threads)
    held_out = load_prompts(DATA_DIR / "eval.jsonl")[: args.eval_questions]
    settings = dict(k=args.eval_samples, temperature=D.train.eval_temperature, top_p=D.train.eval_top_p,
                    max_new_tokens=D.rollout.max_new_tokens, seed=args.seed + 7)
    evals = {}
    for name, model_dir in (("base", ensure_base_model()), ("ours", ours["hf"]), ("trl", trl["hf"])):
        t0 = time.perf_counter()
        evals[name] = evaluate_hf(model_dir, held_out, **settings)
        print(f"[eval] {name}: pass@1 {evals[name]['pass@1']:.3f}  format {evals[name]['format_rate']:.3f}  "
              f"EOS {evals[name]['eos_rate']:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    step = min(ours["curve"][-1]["step"], trl["curve"][-1]["step"])
    ratio_train = time_to_step(trl["curve"], step) / time_to_step(ours["curve"], step)
    ratio_total = trl["total_s"] / ours["total_s"]
    rows = [{"method": "base model (recipes/tiny/base)", "train_s": None, "total_s": None, "steps": 0,
             "eval": evals["base"]},
            {"method": "r1-engine (GRPO, seq-mean-token-mean)", "train_s": ours["train_s"], "total_s": ours["total_s"],
             "steps": ours["curve"][-1]["step"], "eval": evals["ours"],
             "ratio": f"**{ratio_train:.2f}x**, {ratio_total:.2f}x"},
            {"method": f"{label} (loss_type={trl['summary']['loss_type']!r})", "train_s": trl["train_s"],
             "total_s": trl["total_s"], "steps": trl["curve"][-1]["step"], "eval": evals["trl"],
             "ratio": "1.00x, 1.00x"}]
    md = table(rows, step)
    note = (f"\nHeld-out: {evals['ours']['questions']:.0f} questions x {args.eval_samples} samples, plain `generate` "
            f"(T={settings['temperature']}, top_p={settings['top_p']}, no top-k, max_new_tokens="
            f"{settings['max_new_tokens']}), scored by our rule rewards. {args.threads} thread(s) each. Train wall: "
            f"ours = sum of time/step (its metric writes and step-50 checkpoint fall outside), TRL = on_train_begin "
            f"to the last step's log; total = the whole process (start-up, model export; ours also its own "
            f"{OWN_EVAL_QUESTIONS}-question before/after evaluation).\n")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "race.jsonl", "w") as f:
        for method, run in (("ours", ours), ("trl", trl)):
            for r in run["curve"]:
                f.write(json.dumps({"method": method, **r}) + "\n")
    plot(ours, trl, label, out / "race.png")
    (out / "race.md").write_text(md + "\n" + note)
    record = {"steps": args.steps, "seed": args.seed, "threads": args.threads, "eval": evals, "eval_settings": settings,
              "ours": {k: ours[k] for k in ("total_s", "train_s")}, "trl": {k: trl[k] for k in ("total_s", "train_s")},
              "trl_summary": trl["summary"], "same_step": step, "speed_ratio_train": ratio_train,
              "speed_ratio_total": ratio_total}
    (out / "race.json").write_text(json.dumps(record, indent=1, default=str))
    print("\n" + md + "\n" + note)
    print(f"files: {out / 'race.jsonl'}  {out / 'race.png'}  {out / 'race.md'}  {out / 'race.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
