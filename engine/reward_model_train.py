"""Train a reward model on preference pairs with the Bradley-Terry loss (GRPO_SPEC.md, "The other objectives").

    pairs = load_preference_pairs("prefs.jsonl")          # {"prompt", "chosen", "rejected"} per line
    result = train_reward_model("models/base", pairs, "runs/rm_helpful", RewardModelTrainConfig(scope="summary"))
    # runs/rm_helpful/metrics.jsonl, curves.png, and runs/rm_helpful/hf/: the reward model RewardModelSpec reads
    # (hf/r1_reward.json records its scope: every RewardModelSpec of it scores that scope)

The model is `AutoModelForSequenceClassification` (num_labels 1) initialised from a causal-LM HF directory: the
backbone's weights come from it, the score head is new (drawn from the seed). Training is plain torch in one
process, on the CPU or one GPU: the reward models of this pipeline are small, and the texts of a pair are scored
exactly as RewardModelScorer will score them (engine.reward_model: same text, same tokens, same read-out token).
Deterministic from the seed: the head's initialisation and each epoch's order of the pairs.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from r1_engine.engine.data import read_jsonl, load_tokenizer, required_strings
from r1_engine.engine.metrics import MetricsLogger
from r1_engine.engine.objectives import bradley_terry_loss
from r1_engine.engine.preflight import check_model_dir
from r1_engine.engine.run import TrainingRun, learning_rate
from r1_engine.engine.reward_model import (
    SCOPES,
    default_max_length,
    encode_reward_text,
    forward_scores,
    resolve_pad_id,
    reward_text,
    set_pad_id,
    write_record,
)
from r1_engine.parallel.convert import copy_tokenizer_files

NEW_HEAD_MODULES = ("score", "classifier")  # what transformers' *ForSequenceClassification heads are called
HF_SUBDIR = "hf"  # out_dir/hf holds the trained reward model, as the GRPO trainer's out/hf holds the policy


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: `chosen` is the better response to `prompt`. source: "file:line" of its origin."""

    prompt: str
    chosen: str
    rejected: str
    source: str


def load_preference_pairs(path: str | Path, prompt_key: str = "prompt", chosen_key: str = "chosen",
                          rejected_key: str = "rejected") -> list[PreferencePair]:
    """Read a .jsonl file of preference pairs; each field a non-empty string. ValueError naming the file, line and
    field for the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: unsupported preference file type {path.suffix!r}; expected .jsonl")
    pairs = []
    for line, record in read_jsonl(path):
        where = f"{path}, line {line}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
        values = required_strings(record, (prompt_key, chosen_key, rejected_key), where)
        pairs.append(PreferencePair(*values, source=f"{path}:{line}"))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in file")
    return pairs


@dataclass(frozen=True)
class RewardModelTrainConfig:
    """lr: AdamW's, after `warmup_steps` of linear warmup (then constant, as in the GRPO trainer); batch_size:
    pairs per optimizer step; scope: what of a response the model reads ("summary" or "response", as the
    RewardModelSpec that will use it); max_length: tokens per text (default: the model's max_position_embeddings;
    longer texts keep their end); grad_clip: max global gradient norm (None: no clipping)."""

    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    scope: Literal["summary", "response"] = "summary"
    max_length: int | None = None
    progress: bool = True
    grad_clip: float | None = 1.0


def _check_config(cfg: RewardModelTrainConfig) -> None:
    problems = {
        "lr": not cfg.lr > 0, "epochs": cfg.epochs < 1, "batch_size": cfg.batch_size < 1,
        "weight_decay": not cfg.weight_decay >= 0, "warmup_steps": cfg.warmup_steps < 0,
        "scope": cfg.scope not in SCOPES, "max_length": cfg.max_length is not None and cfg.max_length < 1,
        "grad_clip": cfg.grad_clip is not None and not cfg.grad_clip > 0,
    }
    for name, bad in problems.items():
        if bad:
            raise ValueError(f"reward model training: {name}={getattr(cfg, name)!r} is out of range")


def _pair_metrics(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Bradley-Terry loss, accuracy (chosen scored strictly higher) and mean margin of a batch of encoded pairs."""
    scores = forward_scores(model, [c for c, _ in rows] + [r for _, r in rows], pad_id, device)
    chosen, rejected = scores[:len(rows)], scores[len(rows):]
    margin = chosen - rejected
    return {"loss": bradley_terry_loss(chosen, rejected), "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean()}


@torch.no_grad()
def _evaluate(model, rows, pad_id: int, device, batch_size: int) -> dict[str, float]:
    model.eval()
    totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for name, value in _pair_metrics(model, chunk, pad_id, device).items():
            totals[name] += value.item() * len(chunk)
    model.train()
    return {f"eval/{name}": total / len(rows) for name, total in totals.items()}


def _save_atomically(model, base_dir: Path, final: Path, scope: str) -> None:
    """Write the HF directory beside `final` (with the record of its scope and input format: every use of the model
    reads it, engine.reward_model.RECORD_FILE), then swap it in: a crash leaves `final` as it was."""
    staging, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    copy_tokenizer_files(base_dir, staging)
    write_record(staging, scope, "text")  # trained on reward_text: the prompt followed by the scored text
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def train_reward_model(base_dir: str | Path, pairs: Sequence[PreferencePair], out_dir: str | Path,
                       cfg: RewardModelTrainConfig = RewardModelTrainConfig(),
                       eval_pairs: Sequence[PreferencePair] = (), device: str | torch.device = "cpu") -> dict:
    """Train a reward model from the causal LM (or reward model) in `base_dir` on `pairs`; write
    out_dir/metrics.jsonl (a rerun starts it afresh), out_dir/curves.png and out_dir/hf (atomically: save_pretrained
    plus the base's tokenizer files byte for byte). Returns the last epoch's "train/loss" and "train/accuracy",
    "steps", "num_truncated", and with eval_pairs "eval/loss", "eval/accuracy" (share of pairs ranked right) and
    "eval/margin" after training ("eval/accuracy_before" before it)."""
    began = time.perf_counter()
    trainer = RewardModelTrainer(base_dir, pairs, out_dir, cfg, eval_pairs, device)
    try:
        trainer.fit()
        trainer.finish()
    finally:
        trainer.close()
    return {**trainer.result, "steps": trainer.step, "num_truncated": trainer.num_truncated,
            "train/seconds": time.perf_counter() - began}


class RewardModelTrainer(TrainingRun):
    """Bradley-Terry training of a sequence-classification head (and the whole model) on preference pairs, on the
    run skeleton (engine.run.TrainingRun: the loop, the progress bar, the metrics). An HF model on one process;
    the run keeps no resumable checkpoint (a rerun starts afresh) and ends with out_dir/hf."""

    label = "reward model"

    def __init__(self, base_dir, pairs: Sequence[PreferencePair], out_dir, cfg: RewardModelTrainConfig,
                 eval_pairs: Sequence[PreferencePair] = (), device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        _check_config(cfg)
        self.cfg, self.base_dir, self.out = cfg, Path(base_dir), Path(out_dir)
        check_model_dir("base_dir", self.base_dir, need_weights=True)
        if not pairs:
            raise ValueError("train_reward_model: no preference pairs")
        self.device = torch.device(device)
        tokenizer = load_tokenizer(self.base_dir)
        torch.manual_seed(cfg.seed)  # the new score head's initialisation
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report calls the new head "MISSING"; other missing weights raise
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.base_dir, num_labels=1, dtype=torch.float32, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] not in NEW_HEAD_MODULES)
        if missing:
            raise ValueError(f"base_dir {self.base_dir}: its weights lack {len(missing)} tensors of "
                             f"{type(model).__name__} ({', '.join(missing[:3])}, ...): not a checkpoint of this "
                             f"architecture")
        self.policy = model.to(self.device).train()
        self.pad_id = resolve_pad_id(model.config, tokenizer)
        set_pad_id(model, self.pad_id)
        max_length = cfg.max_length if cfg.max_length is not None else default_max_length(model.config)
        self.num_truncated = 0

        def encode(pair_list: Sequence[PreferencePair]) -> list[tuple[list[int], list[int]]]:
            rows = []
            for pair in pair_list:
                encoded = []
                for response in (pair.chosen, pair.rejected):
                    try:
                        ids, truncated = encode_reward_text(tokenizer, reward_text(pair.prompt, response, cfg.scope),
                                                            self.pad_id, max_length)
                    except ValueError as err:
                        raise ValueError(f"{pair.source}: {err}") from None
                    self.num_truncated += truncated
                    encoded.append(ids)
                rows.append((encoded[0], encoded[1]))
            return rows

        self.train_rows, self.eval_rows = encode(pairs), encode(eval_pairs)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out)
        self.logger.truncate_after(-1)  # a rerun into the same out_dir replaces the run, metrics and model alike
        self.ps = SimpleNamespace(is_main=True)
        self.step = 0
        self.steps_per_epoch = -(-len(self.train_rows) // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.result: dict[str, float] = {}
        self._order: list[int] = []
        self._epoch_sums = [0.0, 0.0]
        if self.eval_rows:
            before = _evaluate(model, self.eval_rows, self.pad_id, self.device, cfg.batch_size)
            self.logger.log(0, before)
            self.result["eval/accuracy_before"] = before["eval/accuracy"]

    def train_settings(self) -> SimpleNamespace:
        return SimpleNamespace(save_every=0, keep_checkpoints=1, progress=self.cfg.progress)

    def train_one_step(self) -> dict[str, float]:
        cfg = self.cfg
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if position == 0:  # each epoch its own order, from (seed, epoch)
            self._order = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + epoch)).tolist()
            self._epoch_sums = [0.0, 0.0]
        start = position * cfg.batch_size
        chunk = [self.train_rows[i] for i in self._order[start:start + cfg.batch_size]]
        lr = learning_rate(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, "constant")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = _pair_metrics(self.policy, chunk, self.pad_id, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        metrics["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.step += 1
        logged = {f"train/{name}": value.item() for name, value in metrics.items()}
        self._epoch_sums[0] += logged["train/loss"] * len(chunk)
        self._epoch_sums[1] += logged["train/accuracy"] * len(chunk)
        return {**logged, "train/lr": lr, "train/grad_norm": grad_norm.item()}

    def after_step(self, metrics: dict[str, float]) -> None:
        if self.step % self.steps_per_epoch:
            return
        n = len(self.train_rows)  # an epoch ends: its means, and the held-out pairs
        self.result.update({"train/loss": self._epoch_sums[0] / n, "train/accuracy": self._epoch_sums[1] / n})
        if self.eval_rows:
            evaluated = _evaluate(self.policy, self.eval_rows, self.pad_id, self.device, self.cfg.batch_size)
            metrics.update(evaluated)
            self.result.update(evaluated)

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}"}

    def save(self) -> None:
        self._saved_at = self.step  # no resumable checkpoint: the HF model is written by finish()

    def export_hf(self, out_dir: str | Path | None = None) -> Path:
        self.policy.eval()
        _save_atomically(self.policy, self.base_dir, self.out / HF_SUBDIR, self.cfg.scope)
        return self.out / HF_SUBDIR

    def close(self) -> None:
        if self.logger is not None:
            self.logger.plot()
            self.logger.close()
            self.logger = None
