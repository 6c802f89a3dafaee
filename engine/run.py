"""The one run skeleton every trainer uses: the GRPO trainer (engine.trainer), SFT (engine.sft), the reward model's
Bradley-Terry trainer (engine.reward_model_train) and, through a stop condition, the distillation's time-budgeted GRPO
baseline.

    trainer = GRPOTrainer(cfg, model_dir, prompts)   # set-up: resumes from out/checkpoints/latest (config checked)
    trainer.fit(stop=None)                           # steps until the last one or stop(trainer) says so; saves at the
                                                     # end (and every train.save_every steps)
    hf_dir = trainer.finish()                        # save if unsaved, export out/hf, curves.png, close

A trainer provides `train_one_step()`, `trainer_state()` and the attributes total_steps, cfg (its .train section
has save_every, keep_checkpoints, progress), ps, out, step, policy, optimizer, logger, model_dir and tokenizer_dir;
it may override the hooks `before_step`, `after_step(metrics)`, `end_step`, `end_fit` and
`progress_postfix(metrics)`.
Also here: the one learning-rate schedule (warm-up, then constant or cosine) and `on_main`, rank-0 work whose result
or user error reaches every rank (no rank left waiting in a collective until its timeout).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from r1_engine.engine.checkpoint import save_checkpoint
from r1_engine.parallel import convert


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`: a linear warm-up over warmup_steps
    (step k gets lr * (k + 1) / warmup_steps), then `constant` (lr) or `cosine` (from lr down to lr * min_lr_ratio
    at the last step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"learning-rate schedule {schedule!r}: expected constant or cosine")
    decay_steps = total_steps - warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 0.0
    low = lr * min_lr_ratio
    return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))


def on_main(ps: Any, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 while the other ranks wait (over parallel.state.wait_group: no 30-minute collective timeout,
    rank 0 may work alone for hours); its result, or its user error (engine.config.USER_ERRORS, as one line),
    reaches every rank. Any other error on rank 0 is raised there, and the other ranks are told so."""
    from r1_engine.engine.config import USER_ERRORS

    from r1_engine.parallel.state import wait_group

    multi = dist.is_initialized() and dist.get_world_size() > 1
    group = wait_group() if multi else None  # the others wait without the default 30-minute collective timeout
    result = error = None
    if ps is None or ps.is_main:
        try:
            result = fn()
        except USER_ERRORS as err:
            if not multi:
                raise
            error = ("user", str(err))
        except BaseException as err:
            if not multi:
                raise
            box = [(None, ("crash", f"rank 0 failed: {err!r}"))]
            dist.broadcast_object_list(box, src=0, group=group)
            raise
    if multi:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0, group=group)
        result, error = box[0]
        if error is not None:
            kind, message = error
            raise ValueError(message) if kind == "user" else RuntimeError(message)
    return result


def wait_all() -> None:
    """Every rank here before any goes on; one rank may have worked alone, so the wait has no 30-minute collective
    timeout (parallel.state.wait_group). Nothing to wait for in a one-process job."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from r1_engine.parallel.state import wait_group

        dist.barrier(group=wait_group())


def rank_shares(ps: Any) -> dict[str, Any]:
    """dp_rank / dp_size / group for work every rank of a job shares, each rank a replica of its own with the whole
    model (the recipes' evaluations and rejection sampling): its share by global rank, gathered over the wait group
    (parallel.state.wait_group: no 30-minute collective timeout; None in a one-process job)."""
    from r1_engine.parallel.state import wait_group

    return {"dp_rank": ps.rank, "dp_size": ps.world_size, "group": wait_group()}


class TrainingRun:
    label = "train"  # the progress bar's name
    curves: dict = {}  # the metrics drawn into curves.png (MetricsLogger.plot_logged)

    total_steps: int  # set by the trainer: the step fit() runs to

    # ------------------------------------------------------------------------------------------ hooks
    def train_one_step(self) -> dict[str, float]:
        raise NotImplementedError

    def trainer_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def rank_state(self) -> Any:
        """This rank's own data for its checkpoint file (None: nothing; the GRPO trainer's rollouts generated ahead)."""
        return None

    def before_step(self) -> None:
        """Called before each step (the GRPO trainer starts its profiler range)."""

    def after_step(self, metrics: dict[str, float]) -> None:
        """Called after each step, before it is logged (the GRPO trainer adds its periodic evaluation)."""

    def end_step(self) -> None:
        """Called at the end of each step, after its checkpoint (the GRPO trainer ends its profiler range)."""

    def end_fit(self) -> None:
        """Called when fit() stops stepping."""

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {}

    def train_settings(self) -> Any:
        """save_every, keep_checkpoints, progress: the trainer's cfg.train (a flat config overrides this)."""
        return self.cfg.train

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self, on_step: Callable | None = None, stop: Callable[[TrainingRun], bool] | None = None,
            stop_after: int | None = None) -> list[dict[str, float]]:
        """Train up to the last step (or global step `stop_after`), or until stop(self) is true before a step
        (every rank must get the same answer: stop is collective if it needs to be). on_step(self, metrics) runs
        after each step; a checkpoint is written every train.save_every steps and when stopping. Returns the
        metrics of the steps run."""
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        history: list[dict[str, float]] = []
        progress = None
        settings = self.train_settings()
        if self.ps.is_main and settings.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc=self.label, dynamic_ncols=True)
        try:
            while self.step < end:
                if stop is not None and stop(self):
                    break
                self.before_step()
                metrics = self.train_one_step()
                self.after_step(metrics)
                history.append(metrics)
                if self.logger is not None:
                    self.logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(**self.progress_postfix(metrics))
                if on_step is not None:
                    on_step(self, metrics)
                if settings.save_every and self.step % settings.save_every == 0:
                    self.save()
                self.end_step()
        finally:
            self.end_fit()
            if progress is not None:
                progress.close()
        if self.step > 0 and getattr(self, "_saved_at", None) != self.step:
            self.save()
        return history

    # ------------------------------------------------------------------------------------------ state and output
    def save(self) -> Path:
        """Checkpoint the model, optimizer, RNG and trainer_state() (collective)."""
        path = save_checkpoint(self.out, self.step, model=self.policy, optimizer=self.optimizer,
                               trainer_state=self.trainer_state(), keep=self.cfg.train.keep_checkpoints,
                               rank_state=self.rank_state())
        self._saved_at = self.step
        return path

    def export_hf(self, out_dir: str | Path | None = None) -> Path:
        """An HF checkpoint of the current weights (collective): safetensors, config.json and the tokenizer files
        copied byte for byte from tokenizer_dir. Default out_dir: out/hf."""
        out_dir = Path(out_dir) if out_dir is not None else self.out / "hf"
        convert.save_hf_checkpoint(self.policy, out_dir, self.model_dir / "config.json",
                                   tokenizer_dir=self.tokenizer_dir)
        return out_dir

    def finish(self, export: bool = True) -> Path | None:
        """The end of a run: a checkpoint of the last step if none was written, the HF export (unless export is
        False), curves.png, and the trainer closed. Returns the HF dir (None without export)."""
        if self.step > 0 and getattr(self, "_saved_at", None) != self.step:
            self.save()
        hf = self.export_hf() if export else None
        self.close()
        return hf

    def close(self) -> None:
        """Draw curves.png and close the metrics files."""
        if self.logger is not None:
            self.logger.plot_logged(self.curves)
            self.logger.close()
