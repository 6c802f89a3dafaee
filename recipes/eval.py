"""Evaluate models as the R1 paper reports them: pass@1 over k samples, unbiased pass@k, cons@k (majority vote).

    python recipes/eval.py --model HF_DIR_OR_RUN_DIR [--model OTHER] --data a.jsonl b.parquet --k 16 --out DIR
    torchrun --nproc_per_node=8 recipes/eval.py --model ... --rollout.backend vllm     # data-parallel
    python recipes/eval.py                    # the embedded default: the tiny base model (and its R1-Zero run)

Prints a table per dataset (one row a model), writes eval.json (summaries and per-question samples), eval.md and
eval.png (pass@k against k, response lengths) to --out. A run directory of recipes/r1_zero.py is read through
its hf/ export. Other field names: --data.prompt-key problem --data.answer-key solution (a worked solution's
last \\boxed{} is the reference). The numbers come from engine/eval.py, the code the trainer's evaluation runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from r1_engine.engine.cli import resolve_recipe_config
from r1_engine.engine.config import RolloutConfig, device_dtype, run_cli
from r1_engine.engine.data import TEMPLATES, load_prompts
from r1_engine.engine.preflight import check_model_dir, check_out_dir, check_prompt_file
from r1_engine.recipes.tiny.settings import TINY_DEFAULT

TINY_RUN = Path(TINY_DEFAULT.train.out)  # where recipes/r1_zero.py's embedded default writes its run


@dataclass
class EvalData:
    paths: tuple[str, ...] = ()
    """Datasets (.jsonl / .parquet); short form: --data a.jsonl b.parquet. None given: the tiny held-out set."""
    prompt_key: str = "prompt"
    """Field holding the question (e.g. question, problem)."""
    answer_key: str = "answer"
    """Field holding the reference (e.g. solution, ground_truth; a worked solution's last \\boxed{} counts)."""
    template: str = "r1-zero"
    """r1-zero | chat | none | a custom string with {prompt}."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped (counted and warned about)."""
    limit: int | None = None
    """Evaluate only the first N questions of each dataset."""


@dataclass
class EvalRollout:
    backend: Literal["hf", "vllm"] = "hf"
    temperature: float = 0.6
    """The paper's evaluation temperature (0: greedy)."""
    top_p: float = 0.95
    max_new_tokens: int | None = None
    """Generation budget (None: the embedded default's, else engine.config.GENERATION_BUDGET, 8,192)."""
    stop_strings: tuple[str, ...] = ()
    """Default none, as a user serving the model samples it: a completion ends at its EOS (the trainer's default too;
    a stop string would hide a model that does not stop)."""
    samples_per_call: int = 64
    """(question, sample) pairs per generate() call, spread over the data-parallel ranks; fixed calls with fixed
    seeds keep the results independent of the DP size (engine.eval.sample_questions)."""
    dtype: Literal["float32", "bfloat16"] = field(default_factory=lambda: device_dtype())
    num_threads: int | None = 1
    """CPU threads for the hf backend."""
    gpu_memory_utilization: float = 0.5


@dataclass
class EvalReward:
    num_workers: int = 2
    """Worker processes for the accuracy reward and cons@k's equivalence checks (0: in this process)."""
    timeout_s: float = 10.0
    """Per-sample reward and per-comparison equivalence timeout."""
    language: str = "en"
    """Target language of the language-consistency rate."""


@dataclass
class EvalConfig:
    models: tuple[str, ...] = ()
    """HF model directories or run directories (their hf/ export); short form: --model DIR, repeatable."""
    data: EvalData = field(default_factory=EvalData)
    rollout: EvalRollout = field(default_factory=EvalRollout)
    reward: EvalReward = field(default_factory=EvalReward)
    k: int = 16
    """Samples per question (pass@k for every power of two up to k, cons@k over all k)."""
    seed: int = 1234
    out: str = "outputs/eval"
    """Directory for eval.json, eval.md and eval.png."""


HELP = ("Evaluate models: pass@1 over k samples, unbiased pass@k, cons@k. Short forms: --model DIR (repeatable), "
        "--data FILE [FILE ...]. Without --model: the embedded tiny base model and, if present, its R1-Zero run.")


def expand_args(args: list[str]) -> list[str]:
    """--model A --model B -> --models A B;  --data X Y -> --data.paths X Y (--data.template etc. untouched)."""
    models, out, i = [], [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in ("--model", "--data"):
            values = [value] if eq else []
            i += 1
            while not eq and i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            if not values:
                raise ValueError(f"{flag} needs a value")
            if flag == "--model":
                models += values
            else:
                out += ["--data.paths", *values]
            continue
        out.append(args[i])
        i += 1
    return out + (["--models", *models] if models else [])


def resolve_config(argv: list[str] | None = None) -> tuple[EvalConfig, bool]:
    resolved = resolve_recipe_config(EvalConfig, expand_args(list(sys.argv[1:] if argv is None else argv)),
                                     preset=EvalConfig, description=HELP, named_by=("models",))
    cfg, embedded = resolved.config, not resolved.config.models
    if cfg.rollout.max_new_tokens is None:
        budget = (TINY_DEFAULT.rollout if embedded else RolloutConfig()).max_new_tokens
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=budget))
    r, d = cfg.rollout, cfg.data
    checks = [("--k", cfg.k, cfg.k >= 1, ">= 1 (samples per question)"),
              ("--rollout.temperature", r.temperature, r.temperature >= 0, ">= 0 (0: greedy)"),
              ("--k", cfg.k, r.temperature != 0 or cfg.k == 1,
               "1 with --rollout.temperature 0 (greedy decoding has one answer; vLLM refuses n > 1 without sampling)"),
              ("--rollout.top-p", r.top_p, 0 < r.top_p <= 1, "in (0, 1]"),
              ("--rollout.max-new-tokens", r.max_new_tokens, r.max_new_tokens >= 1, ">= 1"),
              ("--rollout.samples-per-call", r.samples_per_call, r.samples_per_call >= 1, ">= 1"),
              ("--data.max-prompt-tokens", d.max_prompt_tokens, d.max_prompt_tokens >= 1, ">= 1"),
              ("--data.limit", d.limit, d.limit is None or d.limit >= 1, ">= 1 (or None: all)"),
              ("--reward.num-workers", cfg.reward.num_workers, cfg.reward.num_workers >= 0, ">= 0"),
              ("--reward.timeout-s", cfg.reward.timeout_s, cfg.reward.timeout_s > 0, "> 0 seconds")]
    for flag, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{flag}={value!r}: must be {rule}")
    if d.template not in TEMPLATES and "{prompt}" not in d.template:
        raise ValueError(f"--data.template {d.template!r}: expected one of {TEMPLATES} or a string with {{prompt}}")
    if not embedded and not d.paths:
        raise ValueError("--data FILE [FILE ...] (.jsonl or .parquet) is required with --model")
    return cfg, embedded


def resolve_model(path: str | Path) -> Path:
    """The HF directory to load: `path` itself, or a run directory's hf/ export; a ValueError naming the problem."""
    model = Path(path)
    if model.is_dir() and not (model / "config.json").is_file():
        if (model / "hf" / "config.json").is_file():
            model = model / "hf"
        elif (model / "checkpoints").is_dir() or (model / "metrics.jsonl").is_file():
            raise ValueError(f"--model {model}: a run directory without an hf/ export (runs write it at the end "
                             f"unless --train.no-export-hf)")
    check_model_dir("--model", model, need_weights=True)
    return model


def models_and_data(cfg: EvalConfig, embedded: bool):
    """[(name, HF dir)], [(name, path)]; the embedded default's base model is pretrained if missing."""
    if embedded:
        from r1_engine.recipes.tiny.pretrain import ensure_base_model

        models = [("tiny-base", ensure_base_model())]
        if (TINY_RUN / "hf" / "config.json").is_file():
            models.append(("tiny-r1-zero", resolve_model(TINY_RUN)))
    else:
        models = [(path if cfg.models.count(path) == 1 else f"{path} #{i + 1}", resolve_model(path))
                  for i, path in enumerate(cfg.models)]
    paths = list(cfg.data.paths)
    if not paths:
        from r1_engine.recipes.tiny.corpus import DATA_DIR

        paths = [str(DATA_DIR / "eval.jsonl")]
    for path in paths:
        check_prompt_file("--data", path)
    stems = [Path(p).stem for p in paths]
    names = [stem if stems.count(stem) == 1 else p for stem, p in zip(stems, paths)]
    return models, list(zip(names, paths))


def _columns(summary: dict) -> list[tuple[str, str]]:
    keys = [k for k in summary if k.startswith(("pass@", "cons@"))]
    keys += [k for k in ("format_rate", "answer_rate", "length/mean", "length/p50", "length/p90", "length/max",
                         "truncated_frac") if k in summary]
    return [(k, f"{summary[k]:.0f}" if k.startswith("length/") else f"{summary[k]:.3f}") for k in keys]


def markdown_tables(report: dict) -> str:
    """One table per dataset, one row per model."""
    blocks = []
    datasets = list(dict.fromkeys(ds for m in report.values() for ds in m["datasets"]))
    for ds in datasets:
        rows = [(name, m["datasets"][ds]["summary"]) for name, m in report.items() if ds in m["datasets"]]
        header = ["model", "questions"] + [k for k, _ in _columns(rows[0][1])]
        lines = [f"### {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, summary in rows:
            lines.append("| " + " | ".join([name, f"{summary['questions']:.0f}"] + [v for _, v in _columns(summary)])
                         + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in report.items():
        for ds, entry in m["datasets"].items():
            ks = sorted(int(k[5:]) for k in entry["summary"] if k.startswith("pass@"))
            left.plot(ks, [entry["summary"][f"pass@{k}"] for k in ks], marker="o", label=f"{name} / {ds}")
            lengths = [n for q in entry["questions"] for n in q["lengths"]]
            right.hist(lengths, bins=30, alpha=0.5, label=f"{name} / {ds}")
    left.set_xscale("log", base=2)
    left.set(xlabel="k", ylabel="pass@k (unbiased)", ylim=(0, 1.02), title="pass@k")
    right.set(xlabel="response length (tokens)", ylabel="samples", title="response lengths")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg, embedded = resolve_config(argv)
    models, datasets = models_and_data(cfg, embedded)
    examples = {name: load_prompts(path, cfg.data.prompt_key, cfg.data.answer_key) for name, path in datasets}
    out = Path(cfg.out)
    check_out_dir("--out", out)

    import torch

    from r1_engine.engine.data import check_tokenizer_fits, load_tokenizer
    from r1_engine.engine.model_eval import EvalSettings, ModelEvaluator

    dp_rank, dp_size, group, device = 0, 1, None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every rank is a data-parallel replica
        from r1_engine.parallel.state import init_parallel

        ps = init_parallel(1, 1, cfg.seed)
        dp_rank, dp_size, group, device = ps.dp_rank, ps.dp_size, ps.dp_group, ps.device
    is_main = dp_rank == 0
    r, d = cfg.rollout, cfg.data
    # the evaluator the R1 and distillation recipes use, with this recipe's settings
    settings = EvalSettings(samples=cfg.k, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                            size=d.limit, template=d.template, language=cfg.reward.language, backend=r.backend,
                            dtype=r.dtype, seed=cfg.seed, num_workers=cfg.reward.num_workers,
                            timeout_s=cfg.reward.timeout_s, stop_strings=tuple(r.stop_strings),
                            max_prompt_tokens=d.max_prompt_tokens, samples_per_call=r.samples_per_call,
                            gpu_memory_utilization=r.gpu_memory_utilization, num_threads=r.num_threads)
    report: dict = {}
    with ModelEvaluator(settings) as evaluator:
        for name, model_dir in models:
            vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
            if isinstance(vocab, int):
                check_tokenizer_fits(load_tokenizer(model_dir), vocab, model_dir)
            datasets = evaluator.evaluate_datasets(model_dir, examples, dp_rank=dp_rank, dp_size=dp_size, group=group,
                                                   device=device)
            report[name] = {"path": str(model_dir), "datasets": datasets}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        tables = markdown_tables(report)
        described = (f"k={cfg.k} samples a question, temperature {r.temperature}, top-p {r.top_p}, "
                     f"max {r.max_new_tokens} new tokens, seed {cfg.seed}, template {cfg.data.template}")
        (out / "eval.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "models": report}, indent=1))
        (out / "eval.md").write_text(f"# Evaluation\n\n{described}\n\n{tables}")
        plot(report, out / "eval.png")
        print(f"{described}\n\n{tables}\nwrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}", flush=True)
    return report


def cli() -> None:
    """The console command (pyproject's [project.scripts]): exit 2 with one line on a config or data mistake."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
