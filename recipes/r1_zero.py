"""DeepSeek-R1-Zero: pure RL from a base model, with accuracy and format rewards only.

    torchrun --nproc_per_node=8 recipes/r1_zero.py --model HF_DIR --data prompts.jsonl --out runs/r1z \
        --model.tensor-parallel 2 --loss.beta 0.001 --rollout.backend vllm
    python recipes/r1_zero.py                      # the embedded default: a tiny world on a CPU laptop

With no model given, the run uses the embedded default: a ~1M-parameter Qwen2 pretrained by
recipes/tiny on two-digit additions whose reasoning often forgets the carry and whose tags are
sometimes missing. GRPO with the rule rewards must fix both; the run prints held-out pass@1 and
format rate before and after, and writes metrics.jsonl, TensorBoard logs and curves.png to --out.
"""
from __future__ import annotations

import dataclasses
import sys

import torch.distributed as dist

from r1_engine.engine.cli import resolve_recipe_config, spread_over_ranks
from r1_engine.engine.config import GRPOConfig, check_ranges, run_cli
from r1_engine.engine.data import load_prompts
from r1_engine.engine.preflight import check_model_dir, check_out_dir, check_prompt_file
from r1_engine.parallel.state import init_parallel
from r1_engine.recipes.tiny.settings import TINY_DEFAULT, TINY_GRPO_EPS_HIGH, TINY_MOE_OUT

# `--model DIR --data FILE --out DIR --eval-data FILE`: short forms of --model.path, --data.path, --train.out,
# --data.eval-path
ALIASES = {"--model": "--model.path", "--data": "--data.path", "--out": "--train.out", "--eval-data": "--data.eval-path"}
HELP = ("R1-Zero: GRPO from a base model with accuracy + format rewards. Without a model (--model DIR, or "
        "model.path in the YAML) the embedded tiny world runs, and the defaults shown here are its settings. "
        "Short forms: --model DIR, --data FILE, --out DIR, --eval-data FILE.")


def resolve_config(argv: list[str] | None = None) -> tuple[GRPOConfig, bool]:
    """(config, embedded): YAML over the defaults, the command line over both (engine.cli.resolve_recipe_config).
    The defaults are the tiny world's unless a model is named, on the command line or in the YAML."""
    resolved = resolve_recipe_config(GRPOConfig, argv, preset=lambda: TINY_DEFAULT, description=HELP,
                                     aliases=ALIASES)
    cfg, embedded = resolved.config, resolved.embedded
    moe = cfg.model.preset == "tiny-moe"
    if embedded and moe and cfg.train.out == TINY_DEFAULT.train.out:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=TINY_MOE_OUT))
    # `torchrun --nproc_per_node=2 recipes/r1_zero.py`: the tiny model is split over every rank (TP); the tiny MoE
    # model's experts are (EP, data-parallel ranks each with their own prompts)
    cfg = spread_over_ranks(dataclasses.replace(resolved, config=cfg), "expert_parallel" if moe else "tensor_parallel")
    if embedded and cfg.loss.name == "grpo" and cfg.loss.eps_high is None:
        # the tiny world's GRPO clips higher (DAPO); `--loss.name gspo` keeps GSPO's own 3e-4 / 4e-4
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, eps_high=TINY_GRPO_EPS_HIGH))
    check_ranges(cfg)
    return cfg, embedded


def check_paths(cfg: GRPOConfig) -> None:
    """The files and directories the run reads and writes, checked before anything is built (a ValueError naming
    the flag and the path)."""
    for flag, path in (("--data", cfg.data.path), ("--eval-data", cfg.data.eval_path)):
        if path is not None:
            check_prompt_file(flag, path)
    if cfg.model.path is not None:
        check_model_dir("--model", cfg.model.path)
    check_out_dir("--out", cfg.train.out)


def main(argv: list[str] | None = None):
    cfg, embedded = resolve_config(argv)
    check_paths(cfg)
    from r1_engine.engine.trainer import (
        GRPOTrainer,  # here: a config mistake is reported without importing Megatron
    )

    ps = init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.train.seed,
                       expert_parallel=cfg.model.expert_parallel)

    if embedded:
        from r1_engine.recipes.tiny.corpus import DATA_DIR
        from r1_engine.recipes.tiny.pretrain import ensure_base_model
        from r1_engine.recipes.tiny.pretrain_moe import ensure_moe_base_model

        ensure = ensure_moe_base_model if cfg.model.preset == "tiny-moe" else ensure_base_model
        if ps.is_main:
            ensure()  # the committed checkpoint, or pretrain it (~7 minutes on 2 cores; the MoE one ~8)
        dist.barrier()
        model_dir = ensure()
        train_path = cfg.data.path or DATA_DIR / "train.jsonl"
        eval_path = cfg.data.eval_path or DATA_DIR / "eval.jsonl"
    else:
        model_dir, train_path, eval_path = cfg.model.path, cfg.data.path, cfg.data.eval_path
        if train_path is None:
            raise ValueError("--data FILE.jsonl|.parquet is required with --model")
    train = load_prompts(train_path, cfg.data.prompt_key, cfg.data.answer_key)
    held_out = load_prompts(eval_path, cfg.data.prompt_key, cfg.data.answer_key) if eval_path else []

    trainer = GRPOTrainer(cfg, model_dir, train, held_out)
    start = trainer.step
    logged = {r["step"]: r for r in trainer.logger.read()} if trainer.logger is not None else {}

    def logged_eval(step: int) -> dict:
        return {k: v for k, v in logged.get(step, {}).items() if k.startswith("eval/")}

    if start >= cfg.train.steps:  # a finished run: report its scores, train and write nothing new
        trainer.close()
        if ps.is_main:
            print(f"{trainer.out} is already at step {start} of train.steps={cfg.train.steps}: nothing to train "
                  f"(raise --train.steps to continue)")
        return logged_eval(0), logged_eval(start)
    # "before" is the base model's score: measured at step 0, read back from the log when resuming
    before = logged_eval(0) if start > 0 else trainer.evaluate()
    if ps.is_main and before and start == 0:
        trainer.logger.log(0, before)
    trainer.fit()
    after = trainer.evaluate()
    if ps.is_main:
        trainer.logger.log(trainer.step, after)
        if before and after:
            print(f"held-out pass@1 {before['eval/pass@1']:.3f} -> {after['eval/pass@1']:.3f}   "
                  f"format rate {before['eval/format_rate']:.3f} -> {after['eval/format_rate']:.3f}")
    path = trainer.finish(export=cfg.train.export_hf)  # the last checkpoint is written by fit()
    if path is not None and ps.is_main:
        print(f"HF checkpoint: {path}")
    if ps.is_main:
        print(f"metrics: {trainer.out / 'metrics.jsonl'}   curves: {trainer.out / 'curves.png'}")
    return before, after


def cli() -> None:
    """The console command (pyproject's [project.scripts]): exit 2 with one line on a config or data mistake."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
