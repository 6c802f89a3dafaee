"""The table recipes/distill.py ends with: the student before, after each distillation, after GRPO for the same wall
time, and the teacher, with each phase's cost, as markdown (results.md), JSON (results.json) and a PNG
(results.png: scores per model, and pass@1 against wall time)."""
from __future__ import annotations

import dataclasses
import math
import json
from pathlib import Path

ROW_NAMES = {"offline": "offline distillation", "onpolicy": "on-policy distillation", "rl": "GRPO, same time"}
CLOCKS = {"wall": "wall time", "cpu": "CPU time"}
COST_COLUMNS = (("wall_s", "wall s"), ("cpu_s", "CPU s"), ("teacher_tokens_generated", "teacher tokens generated"),
                ("teacher_tokens_scored", "teacher tokens scored"), ("student_tokens_generated", "student tokens generated"),
                ("student_tokens_trained", "student tokens trained"))


def row_name(row: dict) -> str:
    if row.get("phase") == "rl":
        return f"GRPO, same {CLOCKS[row['cost'].get('budget_clock', 'wall')]}"
    return ROW_NAMES.get(row.get("phase"), row["name"])


def _score_columns(rows: list[dict]) -> list[tuple[str, str]]:
    keys = list(dict.fromkeys(k for row in rows for k in row["summary"]))
    cons = [k for k in keys if k.startswith("cons@")]
    out = [("pass@1", "pass@1"), *((k, k) for k in cons[:1]), ("format_rate", "format"), ("length/mean", "length")]
    return [(k, h) for k, h in out if k in keys]


def markdown_table(rows: list[dict]) -> str:
    scores = _score_columns(rows)
    header = [h for _, h in scores] + [h for _, h in COST_COLUMNS]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row in rows:
        cells = []
        for key, _ in scores:
            value, se = row["summary"].get(key), row["summary"].get(f"se/{key}")
            cell = "–" if value is None else f"{value:.1f}" if key.startswith("length") else f"{value:.3f}"
            if value is not None and se is not None and not math.isnan(se):
                cell += f" ± {se:.3f}"  # one standard error over the held-out questions
            cells.append(cell)
        cost = row.get("cost", {})
        for key, _ in COST_COLUMNS:
            value = cost.get(key)
            cells.append("–" if value is None else f"{value:.0f}" if key.endswith("_s") else f"{value:,}")
        lines.append(f"| {row_name(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(mine: float, theirs: float, se_mine: float | None, se_theirs: float | None) -> str:
    """"holds" / "does not hold" only when the difference exceeds twice its standard error (the two evaluations'
    standard errors over questions, independent); otherwise "within noise", with that margin."""
    if se_mine is None or se_theirs is None or math.isnan(se_mine) or math.isnan(se_theirs):
        return ("holds" if mine >= theirs else "does not hold") + ", no spread known"
    margin = 2 * math.hypot(se_mine, se_theirs)
    if abs(mine - theirs) <= margin:
        return f"within noise: |difference| {abs(mine - theirs):.3f} <= 2 SE {margin:.3f}"
    return f"{'holds' if mine > theirs else 'does not hold'}: |difference| > 2 SE {margin:.3f}"


def verdict(rows: list[dict]) -> list[str]:
    """Per distillation phase: does it match or beat GRPO given the same time on the student (pass@1, cons@k)?"""
    by_phase = {row.get("phase"): row for row in rows}
    rl = by_phase.get("rl")
    if rl is None:
        return []
    lines = []
    for phase in ("offline", "onpolicy"):
        row = by_phase.get(phase)
        if row is None:
            continue
        parts = []
        for key, _ in _score_columns([row, rl])[:2]:
            mine, theirs = row["summary"].get(key), rl["summary"].get(key)
            if mine is not None and theirs is not None:
                parts.append(f"{key} {mine:.3f} vs {theirs:.3f} "
                             f"({compare(mine, theirs, row['summary'].get('se/' + key), rl['summary'].get('se/' + key))})")
        clock = "CPU s" if rl["cost"].get("budget_clock") == "cpu" else "s"
        lines.append(f"{ROW_NAMES[phase]} >= GRPO at {rl['cost'].get('budget_s', 0):.0f} {clock}: " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [(k, h) for k, h in _score_columns(rows) if k in ("pass@1",) or k.startswith("cons@")]
    names = [row_name(row) for row in rows]
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(scores))
    for j, (key, header) in enumerate(scores):
        bars.bar([i + j * width for i in range(len(rows))], [r["summary"].get(key, float("nan")) for r in rows],
                 width, label=header)
    bars.set_xticks([i + width * (len(scores) - 1) / 2 for i in range(len(rows))], names, rotation=20, ha="right",
                    fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.grid(axis="y", alpha=0.3)
    bars.legend(loc="lower right")
    bars.set_title("held-out scores")
    student = next((r for r in rows if "phase" not in r and r["name"].startswith("student")), None)
    clock = next((r["cost"].get("budget_clock", "wall") for r in rows if r.get("phase") == "rl"), "wall")
    for row in rows:
        if "phase" in row:
            spent = row["cost"][f"{clock}_s"]
            xs = [0.0, spent] if student else [spent]
            ys = ([student["summary"]["pass@1"]] if student else []) + [row["summary"].get("pass@1", float("nan"))]
            curve.plot(xs, ys, marker="o", label=row_name(row))
    curve.set_xlabel(f"{CLOCKS[clock]} of the phase (s)")
    curve.set_ylabel("held-out pass@1")
    curve.set_ylim(0, 1.05)
    curve.grid(alpha=0.3)
    curve.legend(loc="lower right", fontsize=8)
    curve.set_title("per unit of compute")
    fig.suptitle("distillation vs RL on the student")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, cfg) -> str:
    e = cfg.eval
    settings = (f"k={e.samples} samples a question, temperature {e.temperature}, top-p {e.top_p}, max {e.max_new_tokens} "
                f"new tokens, seed {e.seed}; held-out: {cfg.eval_data}; teacher {cfg.teacher}, student {cfg.student}")
    table = markdown_table(rows)
    lines = verdict(rows)
    text = f"# Distillation vs RL on the student\n\n{settings}\n\n{table}\n" + "".join(f"\n- {x}" for x in lines)
    (out / "results.md").write_text(text + ("\n" if lines else ""))
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows,
                                                  "verdict": lines}, indent=1))
    plot(rows, out / "results.png")
    return table + "".join(f"\n{x}" for x in lines)
