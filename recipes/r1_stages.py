"""The four stages of recipes/r1.py, each a short method over the engine's components, and the final table.

Layout of --out:
  stage_0/hf                 the base model with the readable format's two special tokens (embeddings resized)
  reward_models/<name>/      reward models trained here (stage 4 without --all-scenario-rl.reward.models)
  stage_N/                   the stage's run: checkpoints/, metrics.jsonl, curves.png, hf/, eval.json, stage.json
  stage_2_no_language/       stage 2 without the language reward (--language-ablation), for the table
  stage_3/rejection.jsonl    the rejection-sampled data (+ .summary.json)
  base_eval.json, results.{md,json,png}
stage.json is written last: a stage with one is done and is skipped by a rerun; one without resumes from its
run's latest checkpoint. Collective work (the trainers) runs on every rank; sampling, scoring, the reward model's
training and the evaluations run on rank 0 while the others wait at a barrier.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path

import torch.distributed as dist

from r1_engine.engine.data import load_prompts
from r1_engine.engine.run import on_main, rank_shares, wait_all


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Pipeline:
    def __init__(self, cfg, data, base: Path, ps, tiny: bool = False):
        self.cfg, self.data, self.base, self.ps, self.tiny = cfg, data, Path(base), ps, tiny
        self.out = Path(cfg.out)
        self._rm_dirs: dict[str, str] | None = None

    # ------------------------------------------------------------------------------------------ bookkeeping
    def dir(self, stage: int | str) -> Path:
        return self.out / f"stage_{stage}"

    def done(self, stage: int) -> bool:
        return (self.dir(stage) / "stage.json").is_file()

    def model_of(self, stage: int) -> Path:
        hf = self.dir(stage) / "hf"
        if not (hf / "config.json").is_file():
            raise ValueError(f"stage {stage + 1} starts from stage {stage}'s model, but {hf} holds none: run stage "
                             f"{stage} first (--from-stage {stage}), or put an HF checkpoint there")
        return hf

    def _solo_backend(self, backend: str) -> str:
        """The rollout backend of the work each rank does on its own share (evaluation, rejection sampling): vLLM
        inside a multi-rank torch.distributed job is collective (engine.rollout.colocate), so there the HF engine
        does it, one whole model a rank."""
        if backend == "vllm" and dist.is_initialized() and dist.get_world_size() > 1:
            if self.ps.is_main and not getattr(self, "_warned_solo", False):
                print("note: evaluation and rejection sampling run with the hf rollout backend on every rank, each "
                      "on its share (vllm is collective across the job's ranks)", flush=True)
                self._warned_solo = True
            return "hf"
        return backend

    def run(self) -> None:
        from r1_engine.recipes.r1_config import STAGES

        first = next((n for n in range(self.cfg.from_stage, self.cfg.until_stage + 1) if not self.done(n)), None)
        if first is not None and first > 1:
            self.model_of(first - 1)  # a clear error before anything is built or trained
        self.out.mkdir(parents=True, exist_ok=True)
        if self.data.general is not None or self.data.eval_general is not None:
            self.reward_models()  # first: every evaluation (the base model's too) scores the general prompts with it
        if not (self.out / "base_eval.json").is_file():
            base = self.evaluate(self.base)  # every rank samples its share; rank 0 has the report
            on_main(self.ps, lambda: _write_json(self.out / "base_eval.json",
                                              {"name": "base", "summary": base["summary"]}))
        for n in range(self.cfg.from_stage, self.cfg.until_stage + 1):
            if self.done(n):
                if self.ps.is_main:
                    print(f"stage {n} ({STAGES[n]}): done, skipped ({self.dir(n) / 'stage.json'})", flush=True)
                continue
            if self.ps.is_main:
                print(f"=== stage {n}: {STAGES[n]} -> {self.dir(n)}", flush=True)
            started = time.perf_counter()
            getattr(self, f"stage_{n}")()
            if self.ps.is_main:
                print(f"stage {n} ({STAGES[n]}) took {time.perf_counter() - started:.0f} s", flush=True)
            gc.collect()

    # ------------------------------------------------------------------------------------------ shared pieces
    def base_with_tokens(self) -> Path:
        """The base model with the readable format's special tokens (built once, deterministic)."""
        from r1_engine.engine.readable import add_readable_tokens

        hf = self.dir(0) / "hf"
        if not (hf / "config.json").is_file():
            on_main(self.ps, lambda: add_readable_tokens(self.base, hf))
        else:
            wait_all()
        return hf

    def reasoning_prompts(self, path: str | None = None):
        """The reasoning prompts (stages 2-4, and the held-out ones) with --reasoning-rl.data's field names."""
        d = self.cfg.reasoning_rl.data
        return load_prompts(path or self.data.reasoning, d.prompt_key, d.answer_key)

    def sft_examples(self, path: str, stage_config):
        """A user's SFT file with its stage's --<stage>.data.prompt-key / completion-key field names."""
        from r1_engine.engine.sft import load_sft_examples

        return load_sft_examples(path, stage_config.data.prompt_key, stage_config.data.completion_key)

    def general_prompts(self, path: str):
        """General prompts (no reference answer) with --all-scenario-rl.data.prompt-key's field name."""
        return load_prompts(path, self.cfg.all_scenario_rl.data.prompt_key, kind="general")

    def sft(self, stage: int, config, start: Path, examples) -> Path:
        from r1_engine.engine.sft import SFTTrainer

        config = dataclasses.replace(
            config, model=dataclasses.replace(self.cfg.model, path=str(start)),
            data=dataclasses.replace(config.data, template=self.data.template),
            train=dataclasses.replace(config.train, out=str(self.dir(stage))))
        trainer = SFTTrainer(config, start, examples)
        trainer.fit()
        return trainer.finish()

    def rl(self, out: Path, config, start: Path, examples) -> Path:
        from r1_engine.engine.trainer import GRPOTrainer

        config = dataclasses.replace(
            config, model=dataclasses.replace(self.cfg.model, path=str(start)),
            data=dataclasses.replace(config.data, template=self.data.template),
            train=dataclasses.replace(config.train, out=str(out)))
        trainer = GRPOTrainer(config, start, examples, ())
        trainer.fit()
        return trainer.finish()

    def reward_models(self) -> dict[str, str]:
        """name -> HF dir: the ones given, or one trained here on --data.preferences (rank 0; every rank calls)."""
        if self._rm_dirs is not None:
            return self._rm_dirs
        given = dict(self.cfg.all_scenario_rl.reward.models)
        if given or self.data.preferences is None:
            self._rm_dirs = given
            return given
        from r1_engine.engine.reward_model_train import load_preference_pairs, train_reward_model

        run_dir = self.out / "reward_models" / "helpfulness"
        rm_dir = run_dir / "hf"
        if not (rm_dir / "config.json").is_file():
            def train():
                from r1_engine.engine.data import apply_template, load_tokenizer

                # the reward model reads what the policy's rows hold: the templated prompt, then the response
                tokenizer = load_tokenizer(self.base_with_tokens_path())
                pairs = [dataclasses.replace(p, prompt=apply_template(p.prompt, self.data.template, tokenizer))
                         for p in load_preference_pairs(self.data.preferences)]
                held = max(1, len(pairs) // 8)  # a held-out eighth: the ranking accuracy printed below
                metrics = train_reward_model(self.base_with_tokens_path(), pairs[held:], run_dir, self.cfg.reward_model,
                                             eval_pairs=pairs[:held])
                print(f"reward model {rm_dir}: held-out pair accuracy {metrics.get('eval/accuracy_before', math.nan):.3f}"
                      f" -> {metrics.get('eval/accuracy', math.nan):.3f}", flush=True)
            self.base_with_tokens()
            on_main(self.ps, train)
        self._rm_dirs = {"helpfulness": str(rm_dir)}
        return self._rm_dirs

    def reward_model_scopes(self, dirs: dict[str, str]) -> dict[str, str]:
        """name -> the scope each reward model is scored on, in stage 4 and every evaluation alike: the one it was
        trained on when it was trained here (recorded beside its weights), else --all-scenario-rl.reward.model-scope,
        else "summary"; a setting that contradicts the record is a ValueError (engine.reward_model.resolve_scope)."""
        from r1_engine.engine.reward_model import resolve_scope

        given = self.cfg.all_scenario_rl.reward.model_scope
        return {name: resolve_scope(name, path, given.get(name)) for name, path in dirs.items()}

    def base_with_tokens_path(self) -> Path:
        return self.dir(0) / "hf"

    def evaluate(self, model_dir: Path) -> dict | None:
        """The held-out numbers of one checkpoint (engine.model_eval), on rank 0 (None on the others): every rank
        calls it and samples its share of the reasoning questions; rank 0 also the general prompts."""
        from r1_engine.engine.model_eval import ModelEvaluator
        from r1_engine.engine.reward_model import RewardModelSet, RewardModelSpec

        wait_all()  # the checkpoint is complete on disk (rank 0 writes its tokenizer files) before any rank reads it
        settings = dataclasses.replace(self.cfg.eval, template=self.data.template,
                                       backend=self._solo_backend(self.cfg.eval.backend))
        dirs = self._rm_dirs or {}
        scopes = self.reward_model_scopes(dirs)
        rms = [RewardModelSpec(name=k, path=v, scope=scopes[k]) for k, v in dirs.items()]
        metric = None
        if self.tiny:
            from r1_engine.recipes.tiny.r1_world import helpful_rate

            def metric(prompts, responses):
                return {"helpful_rate": helpful_rate(prompts, responses)}
        reward_models = RewardModelSet(rms) if rms and self.ps.is_main else None  # general prompts: rank 0
        reasoning = self.reasoning_prompts(self.data.eval_reasoning) if self.data.eval_reasoning else []
        general = self.general_prompts(self.data.eval_general) if self.data.eval_general else []
        try:
            with ModelEvaluator(settings, reward_models, metric) as evaluator:
                return evaluator.evaluate(model_dir, reasoning, general, **rank_shares(self.ps))
        finally:
            if reward_models is not None:
                reward_models.close()

    def finish(self, stage: int, hf: Path, extra: list[dict] = ()) -> None:
        """Evaluate the stage's model and mark the stage done (stage.json, written last)."""
        report = self.evaluate(hf)

        def write():
            _write_json(self.dir(stage) / "eval.json", report)
            from r1_engine.recipes.r1_config import STAGES

            record = {"stage": stage, "name": f"{stage}: {STAGES[stage]}", "model": str(hf),
                      "summary": report["summary"], "extra": list(extra)}
            _write_json(self.dir(stage) / "stage.json", record)
            print(f"stage {stage} ({STAGES[stage]}): " + ", ".join(f"{k} {v:.3f}" for k, v in report["summary"].items()),
                  flush=True)
        on_main(self.ps, write)

    # ------------------------------------------------------------------------------------------ the stages
    def stage_1(self) -> None:
        examples = self.sft_examples(self.data.cold_start, self.cfg.cold_start)
        self.finish(1, self.sft(1, self.cfg.cold_start, self.base_with_tokens(), examples))

    def stage_2(self) -> None:
        start, prompts = self.model_of(1), self.reasoning_prompts()
        hf = self.rl(self.dir(2), self.cfg.reasoning_rl, start, prompts)
        extra = []
        rl = self.cfg.reasoning_rl
        if self.cfg.language_ablation and rl.reward.weights.get("language", 0.0) != 0.0:
            weights = {**rl.reward.weights, "language": 0.0}
            ablation = dataclasses.replace(rl, reward=dataclasses.replace(rl.reward, weights=weights))
            hf_ablation = self.rl(self.dir("2_no_language"), ablation, start, prompts)
            report = self.evaluate(hf_ablation)
            if self.ps.is_main:
                extra.append({"name": "2: reasoning RL, no language reward", "model": str(hf_ablation),
                              "summary": report["summary"]})
        self.finish(2, hf, extra)

    def stage_3(self) -> None:
        from r1_engine.engine.sft import load_sft_examples

        rows = self.dir(3) / "rejection.jsonl"
        if not rows.is_file():
            self.dir(3).mkdir(parents=True, exist_ok=True)
            self.rejection_sample(self.model_of(2), rows)  # every rank its share of the prompts; rank 0 writes
            wait_all()
        # the rejection-sampled rows are the recipe's own (prompt / completion), the general ones the user's
        examples = load_sft_examples(rows) + self.sft_examples(self.data.general_sft, self.cfg.sft)
        self.finish(3, self.sft(3, self.cfg.sft, self.base_with_tokens(), examples))

    def rejection_sample(self, model_dir: Path, rows: Path) -> None:
        from r1_engine.engine.data import PromptDataset, load_tokenizer
        from r1_engine.engine.rejection import rejection_sample
        from r1_engine.engine.rollout import build_rollout_engine
        from r1_engine.engine.sampling import EVAL_WEIGHTS, build_sampler

        cfg = self.cfg
        prompts = self.reasoning_prompts()[:self.data.rejection_prompts]
        tokenizer = load_tokenizer(model_dir)
        items = PromptDataset(prompts, tokenizer, self.data.template).items
        import torch

        engine = build_rollout_engine(self._solo_backend(cfg.reasoning_rl.rollout.backend), model_dir, tokenizer,
                                      device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                      dtype=cfg.model.dtype, seed=cfg.rejection.seed, gpu_memory_utilization=0.5,
                                      num_threads=1)
        # stage 2's rule rewards (the format and language components feed the filter), scored as everywhere else
        reward = dataclasses.replace(cfg.reasoning_rl.reward, language=cfg.rejection.language, models={})
        with build_sampler(engine, reward, prompts, weights={**EVAL_WEIGHTS, **reward.weights}) as sampler:
            summary = rejection_sample(sampler, items, cfg.rejection, checkpoint=str(model_dir), out_path=rows,
                                       **rank_shares(self.ps))
        if self.ps.is_main:
            print(summary.table(), flush=True)

    def stage_4(self) -> None:
        rms = self.reward_models()
        rl = self.cfg.all_scenario_rl
        config = dataclasses.replace(rl, reward=dataclasses.replace(rl.reward, models=rms,
                                                                    model_scope=self.reward_model_scopes(rms)))
        reasoning = self.reasoning_prompts()
        general = self.general_prompts(self.data.general) if self.data.general else []
        f = self.data.general_fraction
        if general and f is not None and 0 < f < 1:  # repeat the general prompts to their share of the draws
            repeat = max(1, math.ceil(f / (1 - f) * len(reasoning) / len(general)))
            general = general * repeat
        self.finish(4, self.rl(self.dir(4), config, self.model_of(3), reasoning + general))

    # ------------------------------------------------------------------------------------------ the table
    def rows(self) -> list[dict]:
        rows = []
        base = self.out / "base_eval.json"
        if base.is_file():
            rows.append(json.loads(base.read_text()))
        for n in range(1, 5):
            path = self.dir(n) / "stage.json"
            if path.is_file():
                record = json.loads(path.read_text())
                rows.append(record)
                rows.extend(record.get("extra", []))
        return rows

    def report(self) -> str:
        from r1_engine.recipes.r1_report import write_report

        return write_report(self.rows(), self.out, self.cfg, self.data)
