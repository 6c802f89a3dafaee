"""The phases of recipes/distill.py, each a short method over the engine's components, and their cost accounting.

Layout of --out:
  offline/rejection.jsonl    the teacher's kept samples (+ .summary.json), offline/sampling.json (its cost)
  offline/                   the student's SFT run on them: checkpoints/, metrics.jsonl, curves.png, hf/
  onpolicy/                  on-policy distillation: the GRPO trainer's run with the teacher's advantages
  rl/                        the GRPO baseline (rule rewards), stopped at the distillation's wall (or CPU) time
  <phase>/phase.json         written last: the phase's held-out numbers and its cost; a rerun skips the phase
  student_eval.json, teacher_eval.json, results.{md,json,png}
Cost of a phase: wall time (setup, sampling, training, export; not the evaluation) and this process's CPU time
(rank 0's: on a shared machine two phases' wall times may see different loads, their CPU times much less so), tokens
the teacher generated (offline) or scored (on-policy: every token the student sampled), and tokens the student
generated and trained on (loss tokens), counted from the runs' metrics.jsonl (a resumed run's earlier steps too). Collective work (the trainers) runs on every rank; sampling and evaluation run on rank 0 while the
others wait, and an error there reaches every rank as the same one-line error.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from r1_engine.engine.data import load_prompts
from r1_engine.engine.run import on_main, rank_shares, wait_all
from r1_engine.recipes.distill_config import PHASES


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Distillation:
    def __init__(self, cfg, teacher: Path, student: Path, ps):
        self.cfg, self.teacher, self.student, self.ps = cfg, Path(teacher), Path(student), ps
        self.out = Path(cfg.out)

    # ------------------------------------------------------------------------------------------ bookkeeping
    def phases(self) -> list[str]:
        mode = self.cfg.mode
        names = ["offline"] * (mode in ("offline", "both")) + ["onpolicy"] * (mode in ("onpolicy", "both"))
        return names + ["rl"] * self.cfg.baseline

    def record(self, phase: str) -> dict | None:
        path = self.out / phase / "phase.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def logged(self, phase: str) -> list[dict]:
        """The rows of a phase's metrics.jsonl (rank 0, which writes it; [] elsewhere)."""
        path = self.out / phase / "metrics.jsonl"
        if not (self.ps.is_main and path.is_file()):
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _multi(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for phase in self.phases():
            if self.record(phase) is not None:
                if self.ps.is_main:
                    print(f"{phase} ({PHASES[phase]}): done, skipped ({self.out / phase / 'phase.json'})", flush=True)
                continue
            if self.ps.is_main:
                print(f"=== {phase}: {PHASES[phase]} -> {self.out / phase}", flush=True)
            started, cpu = time.perf_counter(), time.process_time()
            hf, cost = getattr(self, phase)()
            cost.setdefault("wall_s", round(time.perf_counter() - started, 1))
            cost.setdefault("cpu_s", round(time.process_time() - cpu, 1))
            self.finish(phase, hf, cost)
            gc.collect()
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            path = self.out / f"{name}_eval.json"
            if not path.is_file():
                summary = self.evaluate(model)  # every rank its share; the summary on rank 0
                on_main(self.ps, lambda path=path, name=name, model=model, summary=summary: _write_json(
                    path, {"name": name, "model": str(model), "summary": summary}))

    # ------------------------------------------------------------------------------------------ shared pieces
    def prompts(self, path: str | None = None):
        """--data (or --eval-data) with --onpolicy.data.prompt-key / answer-key's field names (every phase's)."""
        d = self.cfg.onpolicy.data
        return load_prompts(path or self.cfg.data, d.prompt_key, d.answer_key)

    def _placed(self, config, out: Path, start: Path):
        """A component config with this run's layout, template, start model and out dir."""
        data = dataclasses.replace(config.data, template=self.cfg.template)
        return dataclasses.replace(config, model=dataclasses.replace(self.cfg.model, path=str(start)), data=data,
                                   train=dataclasses.replace(config.train, out=str(out)))

    def evaluate(self, model_dir: Path) -> dict | None:
        """The held-out numbers of one checkpoint (engine.model_eval: pass@1 over k, cons@k) on rank 0, None on the
        others: every rank calls it and samples its share of the (question, sample) pairs, with the whole model."""
        from r1_engine.engine.model_eval import ModelEvaluator

        wait_all()  # the checkpoint is complete on disk before any rank reads it
        settings = dataclasses.replace(self.cfg.eval, template=self.cfg.template)
        with ModelEvaluator(settings) as evaluator:
            report = evaluator.evaluate(model_dir, self.prompts(self.cfg.eval_data), **rank_shares(self.ps))
        return report["summary"] if report is not None else None

    def finish(self, phase: str, hf: Path, cost: dict) -> None:
        """Evaluate the phase's model and mark the phase done (phase.json, written last)."""
        summary = self.evaluate(hf)

        def write():
            _write_json(self.out / phase / "phase.json", {"phase": phase, "name": PHASES[phase], "model": str(hf),
                                                          "summary": summary, "cost": cost})
            print(f"{phase}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()) + "   cost: "
                  + ", ".join(f"{k} {v}" for k, v in cost.items()), flush=True)
        on_main(self.ps, write)

    # ------------------------------------------------------------------------------------------ offline
    def offline(self) -> tuple[Path, dict]:
        from r1_engine.engine.sft import SFTTrainer, load_sft_examples

        rows, cost_file = self.out / "offline" / "rejection.jsonl", self.out / "offline" / "sampling.json"
        if not (rows.is_file() and cost_file.is_file()):
            on_main(self.ps, lambda: self.rejection_sample(rows, cost_file))
        else:
            wait_all()
        started, cpu = time.perf_counter(), time.process_time()
        examples = load_sft_examples(rows)
        config = self._placed(self.cfg.sft, self.out / "offline", self.student)
        trainer = SFTTrainer(config, self.student, examples)
        loss_before = trainer.evaluate_loss(examples)
        trainer.fit()
        loss_after = trainer.evaluate_loss(examples)
        hf = trainer.finish()
        sampling = json.loads(cost_file.read_text())
        sft_s, sft_cpu = time.perf_counter() - started, time.process_time() - cpu
        trained = sum(m.get("train/num_tokens", 0.0) for m in self.logged("offline"))
        return hf, {"teacher_tokens_generated": sampling["teacher_tokens_generated"], "teacher_tokens_scored": 0,
                    "student_tokens_generated": 0, "student_tokens_trained": int(trained), "steps": trainer.step,
                    "examples": len(examples), "sampling_s": sampling["seconds"], "sft_s": round(sft_s, 1),
                    "wall_s": round(sampling["seconds"] + sft_s, 1), "cpu_s": round(sampling["cpu_s"] + sft_cpu, 1),
                    "sft_loss_before": round(loss_before, 4), "sft_loss_after": round(loss_after, 4)}

    def rejection_sample(self, rows: Path, cost_file: Path) -> None:
        """Rank 0: the teacher's k samples a prompt, filtered by the rule rewards (engine.rejection)."""
        from r1_engine.engine.data import PromptDataset, load_tokenizer
        from r1_engine.engine.rejection import rejection_sample
        from r1_engine.engine.rollout import build_rollout_engine
        from r1_engine.engine.sampling import EVAL_WEIGHTS, build_sampler

        cfg, started, cpu = self.cfg, time.perf_counter(), time.process_time()
        prompts = self.prompts()[:cfg.offline_prompts]
        tokenizer = load_tokenizer(self.teacher)  # the teacher reads its prompts with its own tokenizer
        items = PromptDataset(prompts, tokenizer, cfg.template, cfg.onpolicy.data.max_prompt_tokens).items
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        engine = build_rollout_engine(cfg.onpolicy.rollout.backend, self.teacher, tokenizer, device=device,
                                      dtype=cfg.model.dtype, seed=cfg.rejection.seed, gpu_memory_utilization=0.5,
                                      num_threads=cfg.onpolicy.rollout.num_threads)
        reward = dataclasses.replace(cfg.onpolicy.reward, language=cfg.rejection.language, models={})
        with build_sampler(engine, reward, prompts, weights=EVAL_WEIGHTS) as sampler:
            try:
                summary = rejection_sample(sampler, items, cfg.rejection, checkpoint=str(self.teacher),
                                           out_path=rows)
            except ValueError as err:
                if "no sample kept" not in str(err):
                    raise
                raise ValueError(f"--teacher {self.teacher} gave no sample to distil, nothing trained: {err}") from None
        print(summary.table(), flush=True)
        _write_json(cost_file, {"seconds": round(time.perf_counter() - started, 1),
                                "cpu_s": round(time.process_time() - cpu, 1),
                                "teacher_tokens_generated": sampler.generated_tokens, "kept": summary.kept,
                                "samples": summary.samples})

    # ------------------------------------------------------------------------------------------ the RL trainers
    def _grpo_trainer(self, config, phase: str):
        from r1_engine.engine.trainer import GRPOTrainer

        config = self._placed(config, self.out / phase, self.student)
        prompts = self.prompts()
        if phase != "onpolicy":
            return GRPOTrainer(config, self.student, prompts)
        if self.cfg.teacher_backend == "hf":
            from r1_engine.engine.teacher import HFTeacherTrainer

            return HFTeacherTrainer(config, self.student, prompts, teacher_dir=self.teacher,
                                    offload=self.cfg.teacher_offload)
        config = dataclasses.replace(config, algo=dataclasses.replace(config.algo, teacher=str(self.teacher)))
        return GRPOTrainer(config, self.student, prompts)

    def _rl_cost(self, trainer, phase: str) -> dict:
        """Tokens of the run's logged steps."""
        c = trainer.cfg
        per_step = c.rollout.prompts_per_step * c.rollout.group_size
        updates = c.algo.epochs_per_batch * c.algo.mini_batches
        steps = [m for m in self.logged(phase) if "response_length/mean" in m]
        generated = round(sum(m["response_length/mean"] * per_step for m in steps))
        trained = round(sum(m.get("train/num_tokens", 0.0) * updates for m in steps))
        return {"teacher_tokens_generated": 0, "teacher_tokens_scored": generated if phase == "onpolicy" else 0,
                "student_tokens_generated": generated, "student_tokens_trained": trained, "steps": trainer.step}

    def _export(self, trainer, phase: str) -> tuple[Path, dict]:
        hf = trainer.finish()
        return hf, self._rl_cost(trainer, phase)

    def onpolicy(self) -> tuple[Path, dict]:
        trainer = self._grpo_trainer(self.cfg.onpolicy, "onpolicy")
        trainer.fit()
        return self._export(trainer, "onpolicy")

    def rl_budget(self) -> float:
        """The GRPO baseline's budget: --baseline-seconds, or the longest distillation phase's time on the clock."""
        if self.cfg.baseline_seconds is not None:
            return self.cfg.baseline_seconds
        key = "cpu_s" if self.cfg.baseline_clock == "cpu" else "wall_s"
        spent = [r["cost"][key] for r in map(self.record, ("offline", "onpolicy")) if r is not None]
        if not spent:
            raise ValueError("the GRPO baseline runs for the distillation's time, but no distillation phase has run "
                             "in --out: give --baseline-seconds")
        return max(spent)

    def budget_stop(self, clock, started: float, budget: float):
        """The GRPO baseline's stop condition for the run skeleton: stop before a step unless the run would end
        nearer the budget with it than without it (half the last step's time); rank 0's clock decides for every
        rank."""
        last = {"start": None, "seconds": 0.0}

        def stop(trainer) -> bool:
            now = clock()
            if last["start"] is not None:
                last["seconds"] = now - last["start"]
            last["start"] = now
            go = torch.tensor([float(now - started + last["seconds"] / 2 <= budget)], device=self.ps.device)
            if self._multi():
                dist.broadcast(go, src=0)
            return not go.item()
        return stop

    def rl(self) -> tuple[Path, dict]:
        """GRPO from the student until the budget (counted from here, as each phase's cost) is spent: a step is
        started while the run would end nearer the budget with it than without it."""
        clock = time.process_time if self.cfg.baseline_clock == "cpu" else time.perf_counter
        budget, started = self.rl_budget(), clock()
        trainer = self._grpo_trainer(self.cfg.rl, "rl")
        trainer.fit(stop=self.budget_stop(clock, started, budget))
        hf, cost = self._export(trainer, "rl")
        cost["budget_s"], cost["budget_clock"] = budget, self.cfg.baseline_clock
        return hf, cost

    # ------------------------------------------------------------------------------------------ the table
    def rows(self) -> list[dict]:
        rows = []
        student = self.out / "student_eval.json"
        if student.is_file():
            rows.append(dict(json.loads(student.read_text()), name="student (before)"))
        for phase in ("offline", "onpolicy", "rl"):
            record = self.record(phase)
            if record is not None:
                rows.append(record)
        teacher = self.out / "teacher_eval.json"
        if teacher.is_file():
            rows.append(dict(json.loads(teacher.read_text()), name="teacher"))
        return rows

    def report(self) -> str:
        from r1_engine.recipes.distill_report import write_report

        return write_report(self.rows(), self.out, self.cfg)
