"""Two-digit additions: the embedded default's world.

Every problem is "What is a + b?" with a, b in 10..99. A worked completion adds the units, writes the
digit, carries, adds the tens, and answers in the R1 format:

    " <think>7+8=15, write 5 carry 1. 4+3+1=8.</think> <answer>85</answer>"

The pretraining corpus is deliberately imperfect, so that the base model leaves reinforcement learning
something to fix that the rule-based rewards can see:
- a systematic slip: in `slip_rate` of the problems whose units carry, the reasoning forgets the carry
  ("write 5. 4+3=7.") and the answer follows the wrong reasoning;
- broken tags: some documents never open <think>, some never close it (an unclosed think block hides
  the answer from the accuracy reward), some end in an untagged "so the answer is 85."; neither
  reward accepts any of these.
Each slip or break is a single token decision, so sampling at a lower temperature sharpens it only
mildly and the base model stays clearly improvable at the evaluation temperature.

The held-out split is a fixed, seeded set of 200 (a, b) pairs; neither they nor their swapped forms
(b, a) appear in the pretraining documents or the RL prompts.

Run `python -m r1_engine.recipes.tiny.corpus` to regenerate the shipped data files (identical bytes every time).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# The engine owns the template; the tiny tokenizer folds its fixed prefix into one token, so a change to
# its wording means pretraining the base again (tests/recipes/test_tiny.py checks the prompt tokens).
from r1_engine.engine.data import R1_ZERO_TEMPLATE

EOS_TOKEN = "<|endoftext|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

MIN_OPERAND = 10
MAX_OPERAND = 99

EVAL_SEED = 1_234
EVAL_SIZE = 200
TRAIN_SEED = 5_678
TRAIN_SIZE = 2_000
DATA_DIR = Path(__file__).resolve().parent / "data"

Style = Literal["tagged", "no_close_think", "untagged_answer", "no_think"]
STYLES: tuple[Style, ...] = ("tagged", "no_close_think", "untagged_answer", "no_think")


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for one question (str.replace, so braces in a question are safe)."""
    return R1_ZERO_TEMPLATE.replace("{prompt}", question)


@dataclass(frozen=True)
class CorpusConfig:
    """How imperfect the pretraining corpus is. With these rates the pretrained base (recipes/tiny/base)
    scores, on the held-out prompts (800 samples): pass@1 0.48 and format 0.56 at temperature 1.0,
    pass@1 0.60 and format 0.68 at temperature 0.6, and 1.00 / 1.00 greedy: it knows the procedure,
    it just does not always follow it."""

    slip_rate: float = 0.4  # of problems whose units carry: the reasoning forgets the carry
    no_think_rate: float = 0.05  # of all documents: no tags at all, "... so the answer is 85."
    no_close_think_rate: float = 0.14  # of tagged documents: "<think>...<answer>85</answer>"
    untagged_answer_rate: float = 0.28  # of tagged documents: "<think>... so the answer is 85."

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CorpusConfig.{name} must be in [0, 1], got {value}")
        if self.no_close_think_rate + self.untagged_answer_rate > 1.0:
            raise ValueError(
                "CorpusConfig.no_close_think_rate + untagged_answer_rate must be <= 1, got "
                f"{self.no_close_think_rate} + {self.untagged_answer_rate}"
            )


@dataclass(frozen=True)
class Document:
    """One pretraining document and the choices that produced it (kept for tests and diagnostics)."""

    a: int
    b: int
    slip: bool
    style: Style
    text: str


def _check_operands(a: int, b: int) -> None:
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, int) or not MIN_OPERAND <= value <= MAX_OPERAND:
            raise ValueError(f"operand {name}={value!r} must be an int in [{MIN_OPERAND}, {MAX_OPERAND}]")


def question(a: int, b: int) -> str:
    _check_operands(a, b)
    return f"What is {a} + {b}?"


def make_problem(a: int, b: int) -> dict[str, str]:
    """One prompt row: {"prompt": "What is 47 + 38?", "answer": "85"}."""
    return {"prompt": question(a, b), "answer": str(a + b)}


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def reasoning(a: int, b: int, slip: bool = False) -> tuple[str, int]:
    """The scratchpad and the sum it arrives at; with slip=True a carry is forgotten.

    Compact notation ("7+8=15") on purpose: a space before a digit costs a token of its own."""
    _check_operands(a, b)
    a_tens, a_units = divmod(a, 10)
    b_tens, b_units = divmod(b, 10)
    units = a_units + b_units
    if units >= 10 and not slip:
        units_step = f"{a_units}+{b_units}={units}, write {units % 10} carry 1."
        tens = a_tens + b_tens + 1
        tens_step = f"{a_tens}+{b_tens}+1={tens}."
    else:  # no carry to make, or the slip: the carry is silently dropped
        units_step = f"{a_units}+{b_units}={units}, write {units % 10}."
        tens = a_tens + b_tens
        tens_step = f"{a_tens}+{b_tens}={tens}."
    return f"{units_step} {tens_step}", tens * 10 + units % 10


def completion(a: int, b: int, slip: bool = False, style: Style = "tagged") -> str:
    """The text the assistant writes after "Assistant:" (leading space included, no eos).

    Where the styles part ways (after "<think>"'s place, and after the last step) each is one
    token decision, so the base model's choice is a single coin that RL can bias."""
    steps, result = reasoning(a, b, slip)
    if style == "tagged":
        return f" <think>{steps}</think> <answer>{result}</answer>"
    if style == "no_close_think":
        return f" <think>{steps}<answer>{result}</answer>"
    if style == "untagged_answer":
        return f" <think>{steps} so the answer is {result}."
    if style == "no_think":
        return f" {steps} so the answer is {result}."
    raise ValueError(f"unknown completion style {style!r}; expected one of {STYLES}")


def _all_pairs() -> list[tuple[int, int]]:
    span = range(MIN_OPERAND, MAX_OPERAND + 1)
    return [(a, b) for a in span for b in span]


def eval_pairs() -> list[tuple[int, int]]:
    """The fixed held-out pairs (seeded, in a fixed order)."""
    return random.Random(EVAL_SEED).sample(_all_pairs(), EVAL_SIZE)


def train_pairs() -> list[tuple[int, int]]:
    """Every pair that may be trained on: not a held-out pair, nor a held-out pair swapped."""
    held_out = {frozenset(pair) for pair in eval_pairs()}
    return [pair for pair in _all_pairs() if frozenset(pair) not in held_out]


def eval_prompts() -> list[dict[str, str]]:
    return [make_problem(a, b) for a, b in eval_pairs()]


def rl_prompts(n: int, seed: int = TRAIN_SEED) -> list[dict[str, str]]:
    """n distinct training problems (no held-out pair), in a seeded order."""
    pool = train_pairs()
    if not 0 < n <= len(pool):
        raise ValueError(f"rl_prompts: n={n} must be in [1, {len(pool)}] (the non-held-out pairs)")
    return [make_problem(a, b) for a, b in random.Random(seed).sample(pool, n)]


def sample_documents(n: int, seed: int, config: CorpusConfig = CorpusConfig()) -> list[Document]:
    """n pretraining documents with their slips and styles (pairs drawn with replacement)."""
    if n < 0:
        raise ValueError(f"sample_documents: n={n} must be >= 0")
    rng = random.Random(seed)
    pool = train_pairs()
    documents = []
    for _ in range(n):
        a, b = rng.choice(pool)
        # Draw every coin for every document so the stream does not depend on the problem drawn.
        slip_coin, style_coin, end_coin = rng.random(), rng.random(), rng.random()
        slip = has_carry(a, b) and slip_coin < config.slip_rate
        if style_coin < config.no_think_rate:
            style: Style = "no_think"
        elif end_coin < config.no_close_think_rate:
            style = "no_close_think"
        elif end_coin < config.no_close_think_rate + config.untagged_answer_rate:
            style = "untagged_answer"
        else:
            style = "tagged"
        text = r1_zero_prompt(question(a, b)) + completion(a, b, slip, style) + EOS_TOKEN
        documents.append(Document(a=a, b=b, slip=slip, style=style, text=text))
    return documents


def pretraining_documents(n: int, seed: int, config: CorpusConfig = CorpusConfig()) -> list[str]:
    """n documents: R1-Zero prompt + completion + eos."""
    return [doc.text for doc in sample_documents(n, seed, config)]


def tokenizer_training_texts() -> list[str]:
    """Text that covers every word the tiny world uses, for training the tokenizer."""
    texts = [R1_ZERO_TEMPLATE, " 0 1 2 3 4 5 6 7 8 9", "0123456789"]  # every digit, with and without a space
    for a, b in ((47, 38), (23, 45), (99, 99)):
        texts.append(r1_zero_prompt(question(a, b)))
        texts.extend(completion(a, b, slip, style) for slip in (False, True) for style in STYLES)
    return texts


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data_files(out_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Write train.jsonl (RL prompts) and eval.jsonl (held-out prompts); identical on every run."""
    out_dir = Path(out_dir)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    write_jsonl(train_path, rl_prompts(TRAIN_SIZE, TRAIN_SEED))
    write_jsonl(eval_path, eval_prompts())
    return train_path, eval_path


if __name__ == "__main__":
    for path in write_data_files():
        print(f"wrote {path}")
