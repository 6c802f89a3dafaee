"""Supervised fine-tuning of the Megatron model (R1's cold start, rejection-sampled data, offline distillation).

    trainer = SFTTrainer(config, model_dir, load_sft_examples("sft.jsonl"))
    trainer.fit()                      # saves a checkpoint when it stops; a rerun with the same out resumes
    hf_dir = trainer.finish()          # out/hf: safetensors + config + the tokenizer files; curves.png

Each example is the templated prompt (engine.data.apply_template) followed by the completion and the eos token,
tokenised separately and concatenated (so the boundary is exactly where the data puts it); the loss is the mean
negative log-likelihood of the completion tokens and the eos over the whole step (engine.objectives.sft_objective:
the policy loss with A = 1 and no ratio, through the same fused kernels). Examples longer than data.max_tokens
are skipped and counted, never truncated.

Epoch e visits the examples in the order torch.randperm seeded with (seed, e), cut into batches of
train.batch_size sequences (the last batch of an epoch may be smaller); each data-parallel rank packs every
dp-th sequence of the batch. The order and the batches depend only on (seed, epoch, step), so a checkpoint holds
just the step and a resumed run continues the same run exactly. Learning rate (engine.run.learning_rate): linear
warm-up, then by default a cosine to lr * min_lr_ratio on the last step. The loop, checkpoints and the end of the
run are the one run skeleton's (engine.run.TrainingRun).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from r1_engine.engine.batch import pack_sequences
from r1_engine.engine.checkpoint import latest_checkpoint, load_checkpoint
from r1_engine.engine.config import to_dict
from r1_engine.engine.data import (
    ROUND_TRIP_PROMPTS,
    read_jsonl,
    read_parquet,
    apply_template,
    check_tokenizer_fits,
    check_tokenizer_round_trip,
    encode_text,
    load_tokenizer,
    required_strings,
)
from r1_engine.engine.metrics import MetricsLogger
from r1_engine.engine.objectives import sft_objective
from r1_engine.engine.run import TrainingRun, learning_rate
from r1_engine.engine.sft_config import (
    SFTConfig,
    SFTDataConfig,
    SFTTrainConfig,
    check_sft_ranges,
)
from r1_engine.parallel import convert, models
from r1_engine.parallel import state as pstate
from r1_engine.parallel.optim import build_optimizer, set_learning_rate, wrap_for_training
from r1_engine.parallel.rows import PackedRows
from r1_engine.parallel.step import logprobs, train_step

__all__ = ["SFTExample", "load_sft_examples", "TokenizedExample", "tokenize_sft_examples",
           "SFTTrainer", "SFTConfig", "SFTDataConfig", "SFTTrainConfig", "check_sft_ranges"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CURVES = ("train/loss", "optim/lr", "train/grad_norm", "throughput/tokens_per_s")


@dataclass(frozen=True)
class SFTExample:
    """One training example; source: "file:row" of its origin."""

    prompt: str
    completion: str
    source: str


def _row_to_example(record: Any, where: str, source: str, prompt_key: str, completion_key: str) -> SFTExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object per row, got {type(record).__name__}")
    prompt, completion = required_strings(record, (prompt_key, completion_key), where)
    return SFTExample(prompt=prompt, completion=completion, source=source)


def load_sft_examples(path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion"
                      ) -> list[SFTExample]:
    """Read and validate an SFT file (.jsonl, or .parquet): a non-empty string `prompt_key` and `completion_key`
    in every row (blank jsonl lines are skipped). ValueError naming the file, line (row) and field of the first bad
    row; an empty file is an error too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, row_word = read_jsonl(path), "line"
    elif suffix == ".parquet":
        rows, row_word = read_parquet(path, [prompt_key, completion_key]), "row"
    else:
        raise ValueError(f"{path}: unsupported SFT file type {suffix!r}; expected .jsonl or .parquet")
    examples = [_row_to_example(record, f"{path}, {row_word} {row}", f"{path}:{row}", prompt_key, completion_key)
                for row, record in rows]
    if not examples:
        raise ValueError(f"{path}: no examples in file")
    return examples


@dataclass(frozen=True)
class TokenizedExample:
    """prompt_ids: the templated prompt; completion_ids: the completion's tokens and the eos (the loss positions)."""

    example: SFTExample
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def tokenize_sft_examples(examples: Sequence[SFTExample], tokenizer: Any, template: str = "r1-zero",
                          max_tokens: int | None = None) -> tuple[list[TokenizedExample], int]:
    """(the examples of at most `max_tokens` tokens, how many were longer and skipped). The first
    ROUND_TRIP_PROMPTS templated prompts and completions must come back from decode(encode(text))
    (engine.data.check_tokenizer_round_trip); the tokenizer needs an eos token (the model learns to stop)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not isinstance(eos, int):
        raise ValueError(f"{where}: the tokenizer has no eos token; SFT appends it to every completion so that "
                         f"the model learns to stop")
    add_special_tokens = template != "chat"  # a chat template writes the BOS/special tokens into the text
    kept, skipped, checked = [], 0, []
    for example in examples:
        text = apply_template(example.prompt, template, tokenizer)
        if len(checked) < 2 * ROUND_TRIP_PROMPTS:
            checked += [(text, example.source), (example.completion, example.source)]
        item = TokenizedExample(example, encode_text(tokenizer, text, add_special_tokens=add_special_tokens),
                                encode_text(tokenizer, example.completion, add_special_tokens=False) + [eos])
        if max_tokens is not None and len(item) > max_tokens:
            skipped += 1
            continue
        kept.append(item)
    check_tokenizer_round_trip(tokenizer, [t for t, _ in checked], where, sources=[s for _, s in checked])
    source = examples[0].source.rsplit(":", 1)[0] if examples else "<no examples>"
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} of {len(examples)} examples longer than "
                      f"data.max_tokens={max_tokens}", stacklevel=2)
    if not kept:
        raise ValueError(f"{source}: no examples left (all {len(examples)} longer than data.max_tokens="
                         f"{max_tokens} tokens)" if examples else "SFT: no examples")
    return kept, skipped


def _fingerprint(items: Sequence[TokenizedExample]) -> str:
    """sha256 of every example's token ids: a resumed run must train on the same tokens."""
    digest = hashlib.sha256()
    for item in items:
        for ids in (item.prompt_ids, item.completion_ids):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


class SFTTrainer(TrainingRun):
    """Supervised fine-tuning on the run skeleton (engine.run.TrainingRun: fit, save, finish)."""

    label = "SFT"
    curves = CURVES

    def __init__(self, config: SFTConfig, model_dir: str | Path, examples: Sequence[SFTExample],
                 tokenizer_dir: str | Path | None = None):
        check_sft_ranges(config)
        self.cfg = cfg = config
        self.model_dir = Path(model_dir)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else self.model_dir
        self.ps = pstate.init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, cfg.train.seed,
                                       expert_parallel=cfg.model.expert_parallel)
        self.device = self.ps.device
        info = models.parse_hf_config(self.model_dir / "config.json", cfg.model.tensor_parallel,
                                      cfg.model.expert_parallel)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        check_tokenizer_fits(self.tokenizer, info.vocab_size, self.tokenizer_dir)
        if cfg.train.batch_size < self.ps.dp_size:
            raise ValueError(f"--train.batch-size={cfg.train.batch_size}: must be >= the data-parallel size "
                             f"{self.ps.dp_size} (every rank trains on its share of each batch)")
        self.items, self.num_skipped_too_long = self.tokenize(examples)
        self.data_sha256 = _fingerprint(self.items)
        longest = max(len(it) for it in self.items)
        if longest > info.max_position_embeddings:
            raise ValueError(f"--data.max-tokens={cfg.data.max_tokens}: an example has {longest} tokens, more than "
                             f"the model's max_position_embeddings ({info.max_position_embeddings}, "
                             f"{self.model_dir / 'config.json'}); lower --data.max-tokens")
        row = cfg.train.max_tokens_per_row
        if row is not None and row < longest:
            raise ValueError(f"--train.max-tokens-per-row={row}: shorter than the longest example ({longest} "
                             f"tokens); raise it or lower --data.max-tokens")
        self.steps_per_epoch = math.ceil(len(self.items) / cfg.train.batch_size)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.out = Path(cfg.train.out)
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None and not cfg.train.resume:
            raise ValueError(f"{self.out} already holds a run (checkpoint {ckpt.name}); with --train.no-resume "
                             f"nothing is overwritten: choose another --train.out, or drop --train.no-resume to "
                             f"continue it")
        if ckpt is not None:  # before the model is built: a mismatch costs a second
            self._check_resumable(ckpt, json.loads((ckpt / "trainer.json").read_text()))

        policy = models.build_gpt_model(self.model_dir / "config.json", dtype=_DTYPES[cfg.model.dtype],
                                        fp8=cfg.model.fp8, moe_bias_update_rate=cfg.model.moe_bias_update_rate,
                                        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff)
        convert.load_hf_checkpoint(policy, self.model_dir)
        self.policy = wrap_for_training(policy)
        o = cfg.optim
        self.optimizer = build_optimizer(self.policy, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                         grad_clip=o.grad_clip)
        self.warmup_steps = o.warmup_steps or math.ceil(o.warmup_ratio * self.total_steps)
        self.step = 0
        self._saved_at: int | None = None
        self._orders: dict[int, list[int]] = {}
        self.logger = MetricsLogger(self.out) if self.ps.is_main else None
        if ckpt is not None:
            self._resume(ckpt)
            if self.ps.is_main:
                print(f"resumed {self.out} from {ckpt.name} at step {self.step} of {self.total_steps}", flush=True)
        if self.logger is not None:  # rows logged after the checkpoint (a crash) are redone: one row per step
            dropped = self.logger.truncate_after(self.step if ckpt is not None else -1)
            if dropped:
                print(f"{self.logger.path}: dropped {dropped} line(s) logged after the checkpoint", flush=True)

    # ------------------------------------------------------------------------------------------ data
    def tokenize(self, examples: Sequence[SFTExample]) -> tuple[list[TokenizedExample], int]:
        """`examples` as this run trains on them (template, eos, data.max_tokens); see tokenize_sft_examples."""
        d = self.cfg.data
        return tokenize_sft_examples(examples, self.tokenizer, d.template, d.max_tokens)

    def epoch_order(self, epoch: int) -> list[int]:
        """The example order of `epoch`: a function of (seed, epoch) only."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.items), generator=generator).tolist()}
        return self._orders[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """The examples of optimizer step `step` (0-based) over all data-parallel ranks."""
        epoch, k = divmod(step, self.steps_per_epoch)
        size = self.cfg.train.batch_size
        return self.epoch_order(epoch)[k * size:(k + 1) * size]

    def _rows(self, items: Sequence[TokenizedExample]) -> PackedRows:
        """Packed rows of `items` (this rank's share), or one padding row when the share is empty (the last batch
        of an epoch may hold fewer sequences than there are data-parallel ranks)."""
        if not items:
            return PackedRows.empty(1, 2)
        return pack_sequences([it.prompt_ids for it in items], [it.completion_ids for it in items], pack=True,
                              max_tokens_per_row=self.cfg.train.max_tokens_per_row)

    # ------------------------------------------------------------------------------------------ training
    def train_one_step(self) -> dict[str, float]:
        cfg, ps = self.cfg, self.ps
        t0 = time.perf_counter()
        indices = self.batch_indices(self.step)
        rows = self._rows([self.items[i] for i in indices[ps.dp_rank::ps.dp_size]])
        o = cfg.optim
        lr = learning_rate(self.step, self.total_steps, o.lr, self.warmup_steps, o.schedule, o.min_lr_ratio)
        set_learning_rate(self.optimizer, lr)
        result = train_step(self.policy, self.optimizer, rows, sft_objective(),
                            num_microbatches=cfg.train.num_microbatches, fused_lm_head=cfg.train.fused_lm_head)
        self.step += 1
        seconds = time.perf_counter() - t0
        tokens = sum(len(self.items[i]) for i in indices)  # the whole batch, every rank
        metrics = {"train/loss": result["loss"], "train/grad_norm": result["grad_norm"],
                   "train/num_tokens": result["num_tokens"], "train/num_sequences": result["num_sequences"],
                   "optim/lr": lr, "epoch": self.step / self.steps_per_epoch, "time/step": seconds,
                   "throughput/tokens_per_s": tokens / max(seconds, 1e-9)}
        if "entropy" in result:
            metrics["train/entropy"] = result["entropy"]
        return metrics

    @torch.no_grad()
    def evaluate_loss(self, examples: Sequence[SFTExample]) -> float:
        """Mean negative log-likelihood per completion token (eos included) of `examples` under the current
        weights, templated and filtered like the training data; the same on every rank (collective)."""
        items, _ = self.tokenize(examples)
        ps, size = self.ps, self.cfg.train.batch_size
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of -logp, loss tokens
        for start in range(0, len(items), size):
            share = items[start:start + size][ps.dp_rank::ps.dp_size]
            if not share:
                continue
            rows = self._rows(share).to(self.device)
            logp = logprobs(self.policy, rows, num_microbatches=self.cfg.train.num_microbatches)
            total += torch.stack([-(logp.double() * rows.loss_mask).sum(), rows.loss_mask.double().sum()])
        if ps.dp_size > 1:
            dist.all_reduce(total, group=ps.dp_group)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        epoch, position = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": position, "total_steps": self.total_steps,
                "num_examples": len(self.items), "data_sha256": self.data_sha256, "config": to_dict(self.cfg)}

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """ValueError unless the checkpoint's run is this one: batch size, seed, epochs and the tokenised examples."""
        saved = state.get("config", {})
        for section, key in (("train", "batch_size"), ("train", "seed"), ("train", "epochs")):
            then, now = saved.get(section, {}).get(key), getattr(getattr(self.cfg, section), key)
            if then is not None and then != now:
                raise ValueError(f"{path}: checkpoint was written with {section}.{key}={then}, this run has {now}; "
                                 f"resuming would not continue the same run (use a new --train.out)")
        if state.get("num_examples", len(self.items)) != len(self.items):
            raise ValueError(f"{path}: checkpoint was trained on {state['num_examples']} examples, this run has "
                             f"{len(self.items)} (after data.max_tokens); resuming would not continue the same run "
                             f"(use a new --train.out)")
        if state.get("data_sha256", self.data_sha256) != self.data_sha256:
            raise ValueError(f"{path}: checkpoint was trained on other examples (same count, other tokens: data "
                             f"file, data.template or tokenizer changed); resuming would not continue the same run "
                             f"(use a new --train.out)")

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.policy, optimizer=self.optimizer)  # checked before the build
        self.step = self._saved_at = int(state["step"])

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}", "lr": f"{metrics['optim/lr']:.1e}"}
