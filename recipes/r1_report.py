"""The table recipes/r1.py ends with: one row per stage (and the base model, and stage 2 without the language
reward when it ran), as markdown (results.md), JSON (results.json) and a PNG (results.png)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# (summary key or prefix, column header)
COLUMNS = (("pass@1", "pass@1"), ("cons@", "cons@{k}"), ("format_rate", "format"), ("language_rate", "language"),
           ("length/mean", "length"), ("rm/", "RM {name}"), ("helpful_rate", "helpful"))


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(summary key, header) for every key some row has, in COLUMNS order."""
    keys = list(dict.fromkeys(k for row in rows for k in row["summary"]))
    out = []
    for prefix, header in COLUMNS:
        for key in keys:
            if key == prefix or (prefix.endswith(("@", "/")) and key.startswith(prefix)):
                suffix = key[len(prefix):]
                out.append((key, header.format(k=suffix, name=suffix)))
    return out


def markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(["model", *(h for _, h in columns)]) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row["summary"].get(key)
            cells.append("–" if value is None else f"{value:.1f}" if key.startswith("length") else f"{value:.3f}")
        lines.append("| " + " | ".join([row["name"], *cells]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(k, h) for k, h in _columns(rows) if not k.startswith("length")]
    if not columns:  # no held-out set was given: nothing to draw (the table says so)
        return
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    names = [row["name"].split(":")[0] if ":" in row["name"] else row["name"] for row in rows]
    names = [n + ("*" if "no language" in row["name"] else "") for n, row in zip(names, rows)]
    for ax, (key, header) in zip(axes[0], columns):
        values = [row["summary"].get(key, float("nan")) for row in rows]
        ax.bar(range(len(rows)), values, color=["#999" if n == "base" else "#3a7" if "*" in n else "#36c"
                                                  for n in names])
        ax.set_xticks(range(len(rows)), names)
        ax.set_title(header)
        if not key.startswith("rm/"):
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("R1 pipeline, held-out sets after each stage (2*: stage 2 without the language reward)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, cfg, data) -> str:
    e = cfg.eval
    settings = (f"k={e.samples} samples a prompt, temperature {e.temperature}, top-p {e.top_p}, max {e.max_new_tokens} "
                f"new tokens, seed {e.seed}; reasoning: {data.eval_reasoning}; general: {data.eval_general}")
    table = markdown_table(rows)
    if not _columns(rows):
        table += ("\n\nNo held-out numbers: give --data.eval-reasoning and/or --data.eval-general to evaluate each "
                  "stage.")
    (out / "results.md").write_text(f"# R1 pipeline\n\n{settings}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows}, indent=1))
    (out / "results.png").unlink(missing_ok=True)  # a stale picture from an earlier run with eval sets
    plot(rows, out / "results.png")
    return table
