"""Pretrain the embedded default's base model: a ~0.8M-parameter Qwen2 on two-digit additions, on CPU.

    python -m r1_engine.recipes.tiny.pretrain --out DIR      # tokenizer + pretraining (~6 min on 2 idle cores), HF model dir
    python -m r1_engine.recipes.tiny.pretrain --check DIR    # sample the held-out prompts: pass@1 and format rate
    python -m r1_engine.recipes.tiny.pretrain --student      # recipes/distill.py's smaller student (~3 min on 2 cores)

`ensure_base_model()` returns the committed checkpoint (recipes/tiny/base/) when it matches the current
settings, and otherwise rebuilds it there. Pretraining is a fixed number of steps from a seed, so the
same settings give the same loss curve (1 or 2 threads alike, on our machine).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from r1_engine.recipes.tiny.corpus import (
    CorpusConfig,
    eval_pairs,
    has_carry,
    make_problem,
    pretraining_documents,
    r1_zero_prompt,
    reasoning,
)
from r1_engine.recipes.tiny.tokenizer import build_tokenizer

BASE_DIR = Path(__file__).resolve().parent / "base"
META_FILE = "pretrain_meta.json"
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class ModelShape:
    """The Qwen2 architecture of the tiny base (vocab size comes from the tokenizer)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the checkpoint. Any change here makes ensure_base_model rebuild."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2  # torch.set_num_threads; on a busy machine 1 is faster (same weights either way)
    model: ModelShape = field(default_factory=ModelShape)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def build_model(shape: ModelShape, vocab_size: int, eos_token_id: int, seed: int):
    """A randomly initialised Qwen2ForCausalLM (fp32); the init depends only on the seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=round_up(vocab_size, VOCAB_MULTIPLE),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _batch(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding; the real eos is a target)."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def pretrain(config: PretrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Build the tokenizer, pretrain the model and save both to out_dir (written atomically).

    Returns the run summary (also saved as pretrain_meta.json): losses per step, time, parameters."""
    return with_threads(config.threads, lambda: _pretrain(config, Path(out_dir), progress))


def with_threads(threads: int, fn):
    """fn() with torch using `threads` intra-op threads, restored afterwards."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous_threads)


@dataclass
class PretrainRun:
    """What the dense loop here and the MoE one (pretrain_moe.py) share: the staging directory, the tokenizer as
    consumers load it, the model, the tokenized corpus and the optimizer."""

    staging: Path
    tokenizer: Any
    model: torch.nn.Module
    token_ids: list[list[int]]
    optimizer: torch.optim.Optimizer
    began: float


def start_run(config: PretrainConfig, out_dir: Path, build) -> PretrainRun:
    """A fresh staging directory beside out_dir with the tokenizer, `build(vocab_size, eos_token_id)`'s model
    (its config.json saved first), the corpus tokenized as consumers will and AdamW (no decay on vectors)."""
    from transformers import AutoTokenizer

    began = time.perf_counter()
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)

    tokenizer = build_tokenizer(staging)
    model = build(len(tokenizer), tokenizer.eos_token_id)
    # Train with the tokenizer exactly as consumers will load it: next to the model's config.json,
    # AutoTokenizer picks the tokenizer class that config names (see tokenizer.py).
    model.config.save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)

    documents = pretraining_documents(config.steps * config.batch_size, seed=config.seed, config=config.corpus)
    token_ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    longest = max(len(ids) for ids in token_ids)
    if longest > config.model.max_position_embeddings:
        raise ValueError(f"a document has {longest} tokens, more than max_position_embeddings")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    return PretrainRun(staging, tokenizer, model, token_ids, optimizer, began)


def train_step(run: PretrainRun, config: PretrainConfig, step: int, before_forward=None) -> float:
    """One optimizer step on the step's slice of the corpus; `before_forward(attention_mask)` sees the batch."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    rows = run.token_ids[step * config.batch_size : (step + 1) * config.batch_size]
    input_ids, attention_mask, labels = _batch(rows, run.tokenizer.pad_token_id)
    if before_forward is not None:
        before_forward(attention_mask)
    loss = run.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    return loss.item()


def finish_run(run: PretrainRun, config: PretrainConfig, out_dir: Path, losses: list[float], seconds: float,
               **extra) -> dict:
    """Save the model beside its tokenizer with the run summary (`extra` after the common fields), then move the
    staging directory onto out_dir."""
    model, tokenizer, staging = run.model, run.tokenizer, run.staging
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging)
    summary = {
        "config": _config_dict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
        "train_seconds": round(seconds, 1),  # the optimisation loop
        "total_seconds": round(time.perf_counter() - run.began, 1),  # with tokenizer, corpus and saving
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),  # mean of the last 50 steps
        **extra,
        "losses": losses,
    }
    on_disk = dict(summary, losses=[round(x, 6) for x in losses])
    (staging / META_FILE).write_text(json.dumps(on_disk, indent=1) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return summary


def _pretrain(config: PretrainConfig, out_dir: Path, progress: bool) -> dict:
    run = start_run(config, out_dir, lambda vocab, eos: build_model(config.model, vocab, eos, config.seed))
    run.model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        losses.append(train_step(run, config, step))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(step, config):.2e}")
    return finish_run(run, config, out_dir, losses, time.perf_counter() - start)


def _config_dict(config: PretrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _identity(config_dict: dict) -> dict:
    """The settings that decide the weights. The thread count does not (1 and 2 threads gave bit-identical
    losses on our machine), so a checkpoint trained with either is valid."""
    return {key: value for key, value in config_dict.items() if key != "threads"}


def is_valid_base_model(model_dir: str | Path, config: PretrainConfig = PretrainConfig()) -> bool:
    """The directory holds a complete checkpoint pretrained with exactly these settings."""
    model_dir = Path(model_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", META_FILE)
    if not all((model_dir / name).is_file() for name in needed):
        return False
    try:
        meta = json.loads((model_dir / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(meta.get("config"), dict) and _identity(meta["config"]) == _identity(_config_dict(config))


def ensure_base_model(cache_dir: str | Path = BASE_DIR, config: PretrainConfig = PretrainConfig()) -> Path:
    """The tiny base model's directory: the committed/cached one if it is valid, else pretrained there now."""
    cache_dir = Path(cache_dir)
    if not is_valid_base_model(cache_dir, config):
        print(f"[tiny] no valid base model in {cache_dir}; pretraining one (about 6 minutes on 2 idle cores)")
        pretrain(config, cache_dir)
    return cache_dir


# --------------------------------------------------------------------------- the distillation student
STUDENT_DIR = Path(__file__).resolve().parent / "student"
STUDENT_CONFIG = PretrainConfig(
    steps=1000, threads=1,
    model=ModelShape(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256))
"""recipes/distill.py's student: ~0.35M parameters (the base has ~0.8M), same tokenizer and corpus, half the
pretraining steps; the same seed makes it reproducible (about 3 minutes on 2 cores; one thread: on a busy machine two
threads waiting on each other are ten times slower)."""


def ensure_student_model(cache_dir: str | Path = STUDENT_DIR, config: PretrainConfig = STUDENT_CONFIG) -> Path:
    """The distillation student's directory: the committed/cached one if it is valid, else pretrained there now."""
    cache_dir = Path(cache_dir)
    if not is_valid_base_model(cache_dir, config):
        print(f"[tiny] no valid student model in {cache_dir}; pretraining one (about 3 minutes on 2 idle cores)")
        pretrain(config, cache_dir)
    return cache_dir


# --------------------------------------------------------------------------- diagnostic
@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    temperature: float,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 256,
) -> list[str]:
    """Sample one completion per prompt (KV cache, stop at eos; temperature 0 is greedy).

    Prompts are batched by token length, so no padding is needed. Ids past the tokenizer's vocabulary
    (the model's vocabulary is rounded up) are never sampled."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    # transformers 5 renamed past_key_values -> cache; a wrong name would be swallowed by **kwargs
    # and every step would see only its own token.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    completions = [""] * len(prompts)
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk])
            out = model(input_ids=input_ids, use_cache=True)
            cache, logits = _cache_of(out), out.logits[:, -1, :]
            finished = torch.zeros(len(chunk), dtype=torch.bool)
            generated = []
            for _ in range(max_new_tokens):
                logits = logits.float()
                logits[:, len(tokenizer) :] = -math.inf
                if temperature == 0:
                    next_ids = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                next_ids = torch.where(finished, torch.full_like(next_ids, eos), next_ids)
                generated.append(next_ids)
                finished |= next_ids == eos
                if finished.all():
                    break
                out = model(input_ids=next_ids[:, None], use_cache=True, **{cache_arg: cache})
                cache, logits = _cache_of(out), out.logits[:, -1, :]
            rows = torch.stack(generated, dim=1).tolist()
            for i, row in zip(chunk, rows):
                if eos in row:
                    row = row[: row.index(eos)]
                completions[i] = tokenizer.decode(row, skip_special_tokens=False)
    return completions


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def evaluate_base(
    model_dir: str | Path = BASE_DIR,
    n: int = 200,
    temperature: float = 1.0,
    samples_per_prompt: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    threads: int = 1,
) -> dict:
    """pass@1 and format rate of the model on the first n held-out prompts, with the engine's rewards.

    Also reports how often a carry problem's reasoning makes the carry (the right procedure), whatever
    the tags, so one can see the base model knows the procedure but does not always use it.
    One thread by default: decoding a tiny model gains little from two, and on a busy machine two
    threads waiting on each other are ten times slower."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _evaluate_base(Path(model_dir), n, temperature, samples_per_prompt, seed, max_new_tokens)
    finally:
        torch.set_num_threads(previous_threads)


def _evaluate_base(
    model_dir: Path, n: int, temperature: float, samples_per_prompt: int, seed: int, max_new_tokens: int
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1_engine.engine.rewards import accuracy_reward, format_reward

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    pairs = [pair for pair in eval_pairs()[:n] for _ in range(samples_per_prompt)]
    rows = [make_problem(a, b) for a, b in pairs]
    completions = sample_completions(
        model, tokenizer, [r1_zero_prompt(p["prompt"]) for p in rows], temperature, max_new_tokens, seed
    )
    accuracy = [accuracy_reward(c, p["answer"]) for c, p in zip(completions, rows)]
    formats = [format_reward(c) for c in completions]
    carry_made = carry_total = 0
    for (a, b), text in zip(pairs, completions):
        if has_carry(a, b):
            carry_total += 1
            carry_made += reasoning(a, b, slip=False)[0] in text
    return {
        "temperature": temperature,
        "samples": len(rows),
        "pass_at_1": sum(accuracy) / len(rows),
        "format_rate": sum(formats) / len(rows),
        "pass_given_format": sum(a * f for a, f in zip(accuracy, formats)) / max(1.0, sum(formats)),
        "carry_procedure_rate": carry_made / max(1, carry_total),
        "endings": dict(Counter(_ending(c) for c in completions)),
        "examples": completions[:4],
    }


def _ending(completion: str) -> str:
    if "</think>" in completion and "<answer>" in completion:
        return "tagged"
    if "<answer>" in completion:
        return "no_close_think"
    if "so the answer is" in completion:
        return "untagged_answer"
    return "other"


def main(
    out: Path = BASE_DIR,
    check: Path | None = None,
    temperatures: tuple[float, ...] = (1.0, 0.6),
    config: PretrainConfig = PretrainConfig(),
    student: bool = False,
) -> None:
    """Pretrain into OUT, or with --check DIR only evaluate the model in DIR. --student: the distillation
    student (STUDENT_CONFIG) into recipes/tiny/student instead."""
    if student:
        out = STUDENT_DIR if out == BASE_DIR else out
        config = STUDENT_CONFIG if config == PretrainConfig() else config
    if check is None:
        summary = pretrain(config, out)
        print(
            f"saved {out}: {summary['parameters']:,} parameters, final loss {summary['final_loss']:.4f}, "
            f"{summary['train_seconds']:.0f} s"
        )
        check = out
    for temperature in temperatures:
        print(json.dumps(evaluate_base(check, temperature=temperature), indent=1))


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
