"""DeepSeek-R1, the four stages as one command (GRPO_SPEC.md, "The R1 pipeline"):

  1. cold start      SFT of the base model on long chains of thought in the readable format
                     (<|reasoning|>...<|summary|>..., two new special tokens, embeddings resized);
  2. reasoning RL    GRPO with accuracy + format + language-consistency rewards;
  3. rejection SFT   k samples a reasoning prompt from the stage-2 model, the correct and clean ones kept, plus
                     non-reasoning SFT data: SFT of the *base* model on the union;
  4. all-scenario RL GRPO on reasoning prompts (rule rewards) and general prompts (reward models) in one batch.

    torchrun --nproc_per_node=8 recipes/r1.py --model /models/Qwen2.5-7B --out runs/r1 --data.cold-start cs.jsonl \
        --data.reasoning math.jsonl --data.general-sft chat_sft.jsonl --data.general chat.jsonl \
        --all-scenario-rl.reward.models helpfulness /models/rm-helpful --model.tensor-parallel 2
    python recipes/r1.py                              # the embedded tiny world: all four stages on a CPU laptop

Each stage writes its run (checkpoints, metrics, curves) and an HF checkpoint to --out/stage_N, is evaluated on the
same held-out sets, and records that in --out/stage_N/stage.json; a rerun skips finished stages and resumes the
interrupted one. --from-stage N starts at stage N (stage N-1's model must be there), --until-stage N stops after it.
The run ends with one table (results.md, results.png) of every stage's numbers.
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
from r1_engine.recipes.r1_config import STAGES, R1Config, R1Data

HELP = ("DeepSeek-R1's four stages. Without a model (--model DIR, or model.path in the YAML) the embedded tiny world "
        "runs, and the defaults shown here are its settings. Each stage's model, data and out are set by the recipe.")


def resolve_config(argv: list[str] | None = None) -> tuple[R1Config, bool]:
    from r1_engine.recipes.tiny.r1_settings import tiny_r1

    resolved = resolve_recipe_config(R1Config, argv, preset=tiny_r1, description=HELP,
                                     aliases={"--model": "--model.path"})
    # `torchrun --nproc_per_node=2 recipes/r1.py`: the tiny model is split over every rank (TP)
    cfg, embedded, default = spread_over_ranks(resolved), resolved.embedded, resolved.default
    if not 1 <= cfg.from_stage <= cfg.until_stage <= 4:
        raise ValueError(f"--from-stage {cfg.from_stage} --until-stage {cfg.until_stage}: need 1 <= from <= until <= 4")
    cfg = with_run_language(cfg)
    check_stage_sections(cfg, default)
    if cfg.language_ablation and cfg.reasoning_rl.reward.weights.get("language", 0.0) == 0.0:
        raise ValueError("--language-ablation compares stage 2 with and without the language reward, but "
                         "--reasoning-rl.reward.weights gives language 0: the two runs would be the same")
    for section in ("cold_start", "sft"):
        _checked(section, check_sft_ranges, getattr(cfg, section))
    trained_scope_checked(cfg)
    for section in ("reasoning_rl", "all_scenario_rl"):
        config = getattr(cfg, section)
        if section == "all_scenario_rl" and not config.reward.models:  # the scope of the model trained here: above
            config = dataclasses.replace(config, reward=dataclasses.replace(config.reward, model_scope={}))
        _checked(section, check_ranges, config)
    return cfg, embedded


def trained_scope_checked(cfg: R1Config) -> None:
    """One scope per reward model: the one trained here (no --all-scenario-rl.reward.models) is trained on
    --reward-model.scope and scored on it in stage 4 and every evaluation (it records it beside its weights);
    --all-scenario-rl.reward.model-scope may name it ("helpfulness") only with that same scope."""
    scopes = cfg.all_scenario_rl.reward.model_scope
    if cfg.all_scenario_rl.reward.models or not scopes:
        return
    for name, scope in scopes.items():
        if name != "helpfulness":
            raise ValueError(f"--all-scenario-rl.reward.model-scope {name}={scope}: without "
                             f"--all-scenario-rl.reward.models the one reward model is the one trained here, "
                             f"'helpfulness'")
        if scope != cfg.reward_model.scope:
            raise ValueError(f"--all-scenario-rl.reward.model-scope helpfulness={scope} contradicts "
                             f"--reward-model.scope {cfg.reward_model.scope}, the scope the reward model is trained "
                             f"on here and scored on everywhere: set --reward-model.scope {scope} alone")


def check_stage_sections(cfg: R1Config, default: R1Config) -> None:
    """The options of a stage section that the recipe sets itself are refused when given (they would be replaced
    silently); the data field names are used where the stage reads a file: --cold-start.data.* for
    --data.cold-start, --sft.data.* for --data.general-sft, --reasoning-rl.data.* for --data.reasoning and
    --data.eval-reasoning (every stage that reads them), --all-scenario-rl.data.prompt-key for --data.general and
    --data.eval-general."""
    from r1_engine.engine.cli import refuse_recipe_owned

    owner = "--model for the base and its layout, --data.* for the files, --data.template, --out"
    for section in ("cold_start", "sft"):
        refuse_recipe_owned(section, getattr(cfg, section), getattr(default, section),
                            ("model", "data.path", "data.template", "train.out"), owner)
    for section in ("reasoning_rl", "all_scenario_rl"):
        refuse_recipe_owned(section, getattr(cfg, section), getattr(default, section),
                            ("model", "data.path", "data.eval_path", "data.template", "train.out"), owner)
    refuse_recipe_owned("all_scenario_rl", cfg.all_scenario_rl, default.all_scenario_rl, ("data.answer_key",),
                        "stage 4 reads --data.reasoning with --reasoning-rl.data.prompt-key / answer-key")


def with_run_language(cfg: R1Config) -> R1Config:
    """--language set once for the run: every stage's own language setting takes it. A stage setting given
    explicitly to another language (it differs from both the run's and the default) is a conflict, not a choice:
    a Chinese chain of thought rewarded in stage 2 would be dropped as mixed by an English rejection filter."""
    from r1_engine.engine.rewards.language import SUPPORTED_LANGUAGES

    if cfg.language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"--language {cfg.language}: expected one of {', '.join(SUPPORTED_LANGUAGES)}")
    uses = {"--reasoning-rl.reward.language": cfg.reasoning_rl.reward.language,
            "--all-scenario-rl.reward.language": cfg.all_scenario_rl.reward.language,
            "--rejection.language": cfg.rejection.language, "--eval.language": cfg.eval.language}
    for flag, value in uses.items():
        if value not in ("en", cfg.language):
            raise ValueError(f"{flag} {value} differs from the run's --language {cfg.language}: set --language "
                             f"{value} once for every stage")
    replace = dataclasses.replace
    return replace(
        cfg,
        reasoning_rl=replace(cfg.reasoning_rl, reward=replace(cfg.reasoning_rl.reward, language=cfg.language)),
        all_scenario_rl=replace(cfg.all_scenario_rl,
                                reward=replace(cfg.all_scenario_rl.reward, language=cfg.language)),
        rejection=replace(cfg.rejection, language=cfg.language), eval=replace(cfg.eval, language=cfg.language))


def _checked(section: str, check, config) -> None:
    """A stage's own range check, its flag named as this recipe spells it (--optim.lr -> --cold-start.optim.lr)."""
    try:
        check(config)
    except ValueError as err:
        raise ValueError(str(err).replace("--", f"--{section.replace('_', '-')}.", 1)) from None


def data_files(cfg: R1Config, embedded: bool) -> R1Data:
    """The data files of the run (the tiny world's where none is given), checked to exist."""
    d = cfg.data
    if embedded:
        from r1_engine.recipes.tiny.corpus import DATA_DIR
        from r1_engine.recipes.tiny.r1_world import R1_DATA_DIR

        tiny = {"cold_start": R1_DATA_DIR / "cold_start.jsonl", "reasoning": DATA_DIR / "train.jsonl",
                "general_sft": R1_DATA_DIR / "general_sft.jsonl", "general": R1_DATA_DIR / "general_train.jsonl",
                "preferences": R1_DATA_DIR / "preferences.jsonl", "eval_reasoning": DATA_DIR / "eval.jsonl",
                "eval_general": R1_DATA_DIR / "general_eval.jsonl"}
        d = dataclasses.replace(d, **{k: getattr(d, k) or str(v) for k, v in tiny.items()})
    # the stages that read each file: reasoning prompts feed RL (2), rejection sampling (3) and all-scenario RL (4)
    needed = {"cold_start": (1,), "reasoning": (2, 3, 4), "general_sft": (3,)}
    for key, stages in needed.items():
        stage = next((s for s in stages if cfg.from_stage <= s <= cfg.until_stage), None)
        if getattr(d, key) is None and stage is not None:
            raise ValueError(f"--data.{key.replace('_', '-')} FILE is required for stage {stage} ({STAGES[stage]})")
    if cfg.until_stage >= 4 and d.general is not None and not cfg.all_scenario_rl.reward.models and d.preferences is None:
        raise ValueError("stage 4 scores --data.general with reward models: give --all-scenario-rl.reward.models "
                         "NAME HF_DIR, or --data.preferences FILE to train one")
    for key in ("cold_start", "reasoning", "general_sft", "general", "preferences", "eval_reasoning", "eval_general"):
        if getattr(d, key) is not None:
            check_prompt_file(f"--data.{key.replace('_', '-')}", getattr(d, key))
    return d


def main(argv: list[str] | None = None):
    cfg, embedded = resolve_config(argv)
    if cfg.model.path is not None:
        check_model_dir("--model", cfg.model.path)
    check_out_dir("--out", cfg.out)
    data = data_files(cfg, embedded)
    if cfg.until_stage >= 4:
        from r1_engine.engine.reward_model import check_reward_model_dir, resolve_scope

        for name, path in cfg.all_scenario_rl.reward.models.items():
            check_reward_model_dir(f"--all-scenario-rl.reward.models {name}", path)
            resolve_scope(name, path, cfg.all_scenario_rl.reward.model_scope.get(name))  # agrees with its record
    from transformers.utils import logging as hf_logging

    from r1_engine.parallel.state import init_parallel
    from r1_engine.recipes.r1_stages import Pipeline

    hf_logging.disable_progress_bar()  # every stage loads a few checkpoints: their bars would bury the stages' own

    ps = init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.reasoning_rl.train.seed)
    if embedded:
        import torch.distributed as dist

        from r1_engine.recipes.tiny.pretrain import ensure_base_model

        if ps.is_main:
            ensure_base_model()  # the committed checkpoint, or pretrain it (~7 minutes on 2 cores)
        dist.barrier()
        base = ensure_base_model()
    else:
        base = Path(cfg.model.path)
    pipeline = Pipeline(cfg, data, base, ps, tiny=embedded)
    pipeline.run()
    if ps.is_main:
        table = pipeline.report()
        print(f"\n{table}\nwrote {Path(cfg.out) / 'results.md'}, {Path(cfg.out) / 'results.png'}", flush=True)
    return json.loads((Path(cfg.out) / "results.json").read_text()) if ps.is_main else None


def cli() -> None:
    """The console command (pyproject's [project.scripts]): exit 2 with one line on a config or data mistake."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
