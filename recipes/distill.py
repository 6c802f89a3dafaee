"""Distillation into a smaller model, offline and on-policy, against RL on the same student (DeepSeek-R1's last
finding: distilling a strong reasoner beats RL on the small model; GRPO_SPEC.md, "The other objectives").

    python recipes/distill.py --teacher HF_DIR --student HF_DIR --data prompts.jsonl --eval-data held_out.jsonl \
        [--mode offline|onpolicy|both] --out runs/distill
    torchrun --nproc_per_node=8 recipes/distill.py ... --model.tensor-parallel 2 --teacher-backend hf
    python recipes/distill.py                  # the embedded tiny world: R1-Zero teacher, a smaller student

  offline    the teacher samples k completions a prompt, rejection sampling keeps the correct, formatted, readable
             ones (engine.rejection), and the student is SFT-ed on them (engine.sft); tokenizers may differ;
  onpolicy   the student samples, the teacher scores every token, advantage -(logp_student - logp_teacher) in the
             GRPO surrogate (the trainer's algo.teacher); one tokenizer for both;
  both       each from the same student;
and the baseline: GRPO with the rule rewards from the same student for the distillation's time (wall, or with
--baseline-clock cpu this process's CPU time: the tiny world's, on a shared machine). Every model is
evaluated on the held-out prompts (engine.model_eval: pass@1 over k samples, cons@k), the teacher too; the table
(results.md/json/png in --out) has each phase's cost: wall and CPU time, tokens the teacher generated or scored, the
tokens the student generated and trained on. A rerun skips finished phases (--out/<phase>/phase.json).

Teacher layout: --teacher-backend megatron (default) builds the teacher with the student's parallel layout (its heads
must split over --model.tensor-parallel); --teacher-backend hf scores with an unsharded transformers model on each
replica's first rank, so the teacher and the student may differ in TP size (the teacher must fit one device;
--teacher-offload keeps it on the CPU between uses). A teacher sharded over a TP group of its own is not built.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from r1_engine.engine.cli import resolve_recipe_config, spread_over_ranks
from r1_engine.engine.config import check_ranges, run_cli
from r1_engine.engine.preflight import check_model_dir, check_out_dir, check_prompt_file
from r1_engine.engine.sft_config import check_sft_ranges
from r1_engine.recipes.distill_config import DistillConfig

HELP = ("Distillation (offline: SFT on the teacher's rejection-sampled samples; onpolicy: the teacher scores the "
        "student's samples) against GRPO on the same student for the same time (--baseline-clock). Without --teacher "
        "and --student the embedded tiny world runs, and the defaults shown here are its settings.")


def check_phase_sections(cfg: DistillConfig, default: DistillConfig) -> None:
    """A phase section's options that the recipe sets itself are refused when given (they would be replaced
    silently). --data and --eval-data are read with --onpolicy.data.prompt-key / answer-key in every phase, so the
    GRPO baseline's must agree; the offline SFT reads the recipe's own rejection-sampled rows."""
    from r1_engine.engine.cli import refuse_recipe_owned

    owner = "--student and --model.* for the model and its layout, --data / --eval-data, --template, --out"
    refuse_recipe_owned("sft", cfg.sft, default.sft, ("model", "data.path", "data.template", "data.prompt_key",
                                                      "data.completion_key", "train.out"), owner)
    for section in ("onpolicy", "rl"):
        refuse_recipe_owned(section, getattr(cfg, section), getattr(default, section),
                            ("model", "data.path", "data.eval_path", "data.template", "train.out"), owner)
    for key in ("prompt_key", "answer_key"):
        if getattr(cfg.rl.data, key) not in (getattr(default.rl.data, key), getattr(cfg.onpolicy.data, key)):
            raise ValueError(f"--rl.data.{key.replace('_', '-')}={getattr(cfg.rl.data, key)!r}: every phase reads "
                             f"--data with --onpolicy.data.{key.replace('_', '-')}; give it there")


def resolve_config(argv: list[str] | None = None) -> tuple[DistillConfig, bool]:
    from r1_engine.recipes.tiny.settings import tiny_distill

    resolved = resolve_recipe_config(DistillConfig, argv, preset=tiny_distill, description=HELP,
                                     named_by=("teacher", "student"))
    cfg, embedded, default = resolved.config, resolved.embedded, resolved.default
    if not embedded and (cfg.teacher is None or cfg.student is None or cfg.data is None or cfg.eval_data is None):
        missing = [f"--{k.replace('_', '-')}" for k in ("teacher", "student", "data", "eval_data") if getattr(cfg, k) is None]
        raise ValueError(f"{' and '.join(missing)} required (without --teacher and --student the embedded tiny world "
                         f"runs)")
    # `torchrun --nproc_per_node=2 recipes/distill.py`: the tiny student is split over every rank (TP)
    cfg = spread_over_ranks(dataclasses.replace(resolved, config=cfg))
    check_phase_sections(cfg, default)
    _checked("sft", check_sft_ranges, cfg.sft)
    for section in ("onpolicy", "rl"):
        _checked(section, check_ranges, getattr(cfg, section))
    if cfg.baseline_seconds is not None and not cfg.baseline_seconds > 0:
        raise ValueError(f"--baseline-seconds={cfg.baseline_seconds}: must be > 0")
    if cfg.teacher_offload and cfg.teacher_backend != "hf":
        raise ValueError("--teacher-offload needs --teacher-backend hf (the megatron teacher stays on the device)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads={cfg.threads}: must be >= 1 (or None: torch's default)")
    if cfg.offline_prompts is not None and cfg.offline_prompts < 1:
        raise ValueError(f"--offline-prompts={cfg.offline_prompts}: must be >= 1 (or None: all)")
    return cfg, embedded


def _checked(section: str, check, config) -> None:
    """A phase's own range check, its flag named as this recipe spells it (--optim.lr -> --sft.optim.lr)."""
    try:
        check(config)
    except ValueError as err:
        raise ValueError(str(err).replace("--", f"--{section}.", 1)) from None


def check_inputs(cfg: DistillConfig) -> None:
    """The named files and directories, and for on-policy distillation that the teacher can score the student's
    token ids; one line each, before anything is built."""
    check_out_dir("--out", cfg.out)
    for flag, model in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        check_model_dir(flag, model, need_weights=True)
    for flag, data in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        check_prompt_file(flag, data)
    if cfg.mode != "offline":
        check_teacher_for_onpolicy(cfg)


def check_teacher_for_onpolicy(cfg: DistillConfig) -> None:
    from r1_engine.engine.data import load_tokenizer
    from r1_engine.parallel import models

    if load_tokenizer(cfg.teacher).get_vocab() != load_tokenizer(cfg.student).get_vocab():
        raise ValueError(f"--teacher {cfg.teacher}: its tokenizer differs from the student's ({cfg.student}); "
                         f"--mode {cfg.mode} scores the student's token ids with the teacher, so both need one "
                         f"tokenizer (--mode offline distils across tokenizers: the student learns the teacher's text)")
    tp = cfg.model.tensor_parallel if cfg.teacher_backend == "megatron" else 1
    try:
        teacher = models.parse_hf_config(Path(cfg.teacher) / "config.json", tp)
    except ValueError as err:
        hint = " (--teacher-backend hf scores with an unsharded teacher)" if tp > 1 else ""
        raise ValueError(f"--teacher {cfg.teacher}: {err}{hint}") from None
    student = models.parse_hf_config(Path(cfg.student) / "config.json")
    if teacher.vocab_size < student.vocab_size:
        raise ValueError(f"--teacher {cfg.teacher}: vocab_size {teacher.vocab_size} is smaller than the student's "
                         f"{student.vocab_size}: the student can sample ids the teacher cannot score")


def embedded_models(ps) -> tuple[Path, Path]:
    """The tiny world's teacher (recipes/r1_zero.py's embedded run, trained now if absent; collective) and student
    (recipes/tiny/student, pretrained now if absent)."""
    import torch.distributed as dist

    from r1_engine.recipes.tiny.pretrain import ensure_student_model
    from r1_engine.recipes.tiny.settings import TINY_DEFAULT

    teacher = Path(TINY_DEFAULT.train.out) / "hf"
    if not (teacher / "model.safetensors").is_file():
        from r1_engine.recipes import r1_zero

        if ps.is_main:
            print(f"[tiny] no teacher in {teacher}: training recipes/r1_zero.py's embedded default first", flush=True)
        r1_zero.main([])
    if ps.is_main:
        ensure_student_model()
    dist.barrier()
    return teacher, ensure_student_model()


def main(argv: list[str] | None = None):
    cfg, embedded = resolve_config(argv)
    if embedded:
        from r1_engine.recipes.tiny.corpus import DATA_DIR

        cfg = dataclasses.replace(cfg, data=cfg.data or str(DATA_DIR / "train.jsonl"),
                                  eval_data=cfg.eval_data or str(DATA_DIR / "eval.jsonl"))
        check_out_dir("--out", cfg.out)
    else:
        check_inputs(cfg)
    import torch

    threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        return run(cfg, embedded)
    finally:
        torch.set_num_threads(threads)


def run(cfg: DistillConfig, embedded: bool):
    """Every phase, the evaluations and the table (inputs checked); the results.json of rank 0."""
    from transformers.utils import logging as hf_logging

    from r1_engine.parallel.state import init_parallel
    from r1_engine.recipes.distill_phases import Distillation

    hf_logging.disable_progress_bar()  # every phase loads a few checkpoints: their bars would bury the phases' own
    ps = init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.rl.train.seed)
    if embedded:
        teacher, student = embedded_models(ps)
        cfg = dataclasses.replace(cfg, teacher=str(teacher), student=str(student))
        ps = init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.rl.train.seed)
        check_inputs(cfg)
    distillation = Distillation(cfg, Path(cfg.teacher), Path(cfg.student), ps)
    distillation.run()
    if ps.is_main:
        table = distillation.report()
        out = Path(cfg.out)
        print(f"\n{table}\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}", flush=True)
    return json.loads((Path(cfg.out) / "results.json").read_text()) if ps.is_main else None


def cli() -> None:
    """The console command (pyproject's [project.scripts]): exit 2 with one line on a config or data mistake."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
