"""Checks that run before any model is built: a config or data mistake found here costs a second and prints one
line; found later it would cost a model load, or hang ranks that wait in a collective for one that failed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r1_engine.engine.config import GRPOConfig
from r1_engine.engine.data import TOKENIZER_FILES, load_tokenizer
from r1_engine.parallel import models


def check_prompt_file(flag: str, path: str | Path) -> None:
    """A prompt file the user named: it must be a file (load_prompts checks what is in it)."""
    if not Path(path).is_file():
        what = "is a directory, not a prompt file" if Path(path).is_dir() else "does not exist"
        raise ValueError(f"{flag} {path}: {what} (a .jsonl or .parquet file of prompts is needed)")


def check_model_dir(flag: str, path: str | Path, need_weights: bool = False) -> None:
    """An HF model directory the user named: a directory with config.json, tokenizer files and (need_weights)
    weight files, each missing piece named in one line. Whether the tokenizer loads and round-trips is
    load_tokenizer's and PromptDataset's check."""
    model = Path(path)
    if not model.is_dir():
        what = "is a file, not a directory" if model.exists() else "does not exist"
        raise ValueError(f"{flag} {model}: {what} (an HF model directory with config.json is needed)")
    if not (model / "config.json").is_file():
        raise ValueError(f"{flag} {model}: no config.json in it (an HF model directory is needed)")
    if need_weights and not any(any(model.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ValueError(f"{flag} {model}: no weights in it (looked for {', '.join(WEIGHT_FILES)})")
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{flag} {model}: no tokenizer files in it (looked for {', '.join(TOKENIZER_FILES)})")


def check_out_dir(flag: str, path: str | Path) -> None:
    """An output directory: it, or the first of its parents that exists, must be a directory."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "exists" if p == out else f"is inside {p}, which exists"
                raise ValueError(f"{flag} {out}: {where} and is not a directory ({flag} names a directory)")
            return


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def check_layout(cfg: GRPOConfig, dp: int) -> None:
    """Settings that would otherwise fail on one rank while the others wait in a collective."""
    r, a = cfg.rollout, cfg.algo
    if r.prompts_per_step % dp:
        raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the "
                         f"data-parallel size {dp}")
    if r.prompts_per_step // dp * r.group_size < a.mini_batches:
        raise ValueError(f"algo.mini_batches={a.mini_batches} exceeds the {r.prompts_per_step // dp * r.group_size} "
                         f"completions each data-parallel rank gets per step")
    if a.max_tokens_per_row is not None and cfg.data.max_prompt_tokens + r.max_new_tokens > a.max_tokens_per_row:
        raise ValueError(f"algo.max_tokens_per_row={a.max_tokens_per_row} is shorter than the longest sequence: "
                         f"data.max_prompt_tokens + rollout.max_new_tokens = "
                         f"{cfg.data.max_prompt_tokens + r.max_new_tokens}")


def check_lengths(cfg: GRPOConfig, info: models.ModelInfo, longest_prompt: int, model_dir: Path) -> None:
    """The longest prompt plus the generation budget must fit the model's positions."""
    if longest_prompt + cfg.rollout.max_new_tokens > info.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest_prompt} tokens) + rollout.max_new_tokens "
                         f"({cfg.rollout.max_new_tokens}) exceeds the model's max_position_embeddings "
                         f"({info.max_position_embeddings}, {Path(model_dir) / 'config.json'}): lower "
                         f"rollout.max_new_tokens or data.max_prompt_tokens")


def check_teacher(cfg: GRPOConfig, path: str, tokenizer: Any, student_dir: Path, student: models.ModelInfo,
                  longest_prompt: int) -> Path:
    """The teacher scores the student's token ids: it must exist, share the student's tokenizer, cover every id
    the student can sample, and fit the longest prompt + generation budget. Returns its directory."""
    teacher_dir = Path(path)
    if not (teacher_dir / "config.json").is_file():
        raise ValueError(f"algo.teacher: {teacher_dir} has no config.json (an HF model directory is needed)")
    if load_tokenizer(teacher_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"algo.teacher: the tokenizer of {teacher_dir} differs from the student's "
                         f"({student_dir}); on-policy distillation scores the student's token ids with the "
                         f"teacher, so both need one tokenizer")
    info = models.parse_hf_config(teacher_dir / "config.json", cfg.model.tensor_parallel)
    if info.vocab_size < student.vocab_size:
        raise ValueError(f"algo.teacher: {teacher_dir} has vocab_size {info.vocab_size}, fewer than the "
                         f"student's {student.vocab_size}: the student can sample ids the teacher cannot score")
    need = longest_prompt + cfg.rollout.max_new_tokens
    if need > info.max_position_embeddings:
        raise ValueError(f"algo.teacher: {teacher_dir} has max_position_embeddings {info.max_position_embeddings}"
                         f", shorter than the longest prompt + rollout.max_new_tokens ({need})")
    return teacher_dir
