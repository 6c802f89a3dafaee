"""The tiny world, extended for the four stages of recipes/r1.py (the R1-Zero world is recipes/tiny/corpus.py).

Reasoning: the same two-digit additions, now written in R1's readable format,

    "<|reasoning|>7+8=15, write 5 carry 1. 4+3+1=8.<|summary|>\\boxed{85}"

- cold_start.jsonl: a few hundred such samples for stage 1. They teach the format, not the arithmetic: their
  reasoning forgets the carry as often as the base model's pretraining corpus does (so reasoning RL has something
  to fix), and in `mixed_rate` of them the chain of thought switches language ("写" for "write", a second script
  the tokenizer encodes byte by byte), which the language-consistency reward of stage 2 has to fix.
General (non-reasoning) prompts: greet, thank, say goodbye to a name. Each has a helpful answer and a curt one:

    "Greet Ann."  ->  "Hello, nice to meet you!"   (chosen)   vs   "Hi."   (rejected)

- general_sft.jsonl: the non-reasoning SFT data of stage 3, helpful and curt answers half and half (the stage-3
  model answers either way, leaving the reward model of stage 4 something to move);
- preferences.jsonl: chosen/rejected pairs for the tiny reward model (curt, off-topic and garbled answers, and
  reasoning text where an answer should be, are rejected);
- general_train.jsonl / general_eval.jsonl: prompts (no reference answer) for stage 4 and for evaluation, on
  disjoint names.
Reasoning prompts and the held-out reasoning set are R1-Zero's (data/train.jsonl, data/eval.jsonl).

`python -m r1_engine.recipes.tiny.r1_world` rewrites data/r1/ (identical bytes every time).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from r1_engine.recipes.tiny.corpus import (
    DATA_DIR,
    has_carry,
    question,
    reasoning,
    train_pairs,
    write_jsonl,
)

R1_DATA_DIR = DATA_DIR / "r1"
# the R1 stages' prompt template: a plain dialogue (the R1-Zero template asks for <think> tags, the readable
# format replaces them)
R1_TEMPLATE = "User: {prompt} Assistant:"
COLD_START_SEED = 11
COLD_START_SIZE = 400
GENERAL_SEED = 13

NAMES = ("Ann", "Bob", "Eve", "Max", "Kim", "Sam", "Lee", "Tom", "Amy", "Joe", "Ada", "Ben", "Cal", "Dan", "Eli",
         "Fay", "Gus", "Hal", "Ian", "Jan", "Kay", "Liv", "Mia", "Ned", "Oli", "Pam", "Ray", "Sue", "Ted", "Uma")
EVAL_NAMES = ("Vic", "Wes", "Xia", "Yul", "Zoe", "Rob")
# prompt (a name filled in) -> (helpful answer, curt answer); the answers name no one, so a 1M-parameter model learns
# them from a few examples and the stage-4 reward model has one decision to move (helpful or curt)
TASKS = {
    "Greet {n}.": ("Hello, nice to meet you!", "Hi."),
    "Thank {n}.": ("Thank you so much!", "Thanks."),
    "Say goodbye to {n}.": ("Goodbye, see you soon!", "Bye."),
}


@dataclass(frozen=True)
class R1WorldConfig:
    slip_rate: float = 0.4  # of carrying problems: the cold-start reasoning forgets the carry (as pretraining did)
    mixed_rate: float = 0.5  # of cold-start samples: the chain of thought mixes in a second script
    # (as often as not: nothing but the language reward prefers one language)


def readable_reasoning(a: int, b: int, slip: bool, mixed: bool) -> tuple[str, int]:
    """The chain of thought and the sum it arrives at. It ends by checking the sum, in English or (mixed) in Chinese:
    the language switch comes after the arithmetic, so it costs no accuracy and only the language reward tells the
    two apart."""
    steps, result = reasoning(a, b, slip)
    return steps + (" 检查." if mixed else " check."), result


def readable_sample(a: int, b: int, slip: bool = False, mixed: bool = False) -> str:
    from r1_engine.engine.readable import readable_completion

    steps, result = readable_reasoning(a, b, slip, mixed)
    return readable_completion(steps, f"\\boxed{{{result}}}")


def cold_start_rows(n: int = COLD_START_SIZE, seed: int = COLD_START_SEED,
                    config: R1WorldConfig = R1WorldConfig()) -> list[dict]:
    rng = random.Random(seed)
    pool = train_pairs()
    rows = []
    for _ in range(n):
        a, b = rng.choice(pool)
        slip_coin, mixed_coin = rng.random(), rng.random()
        slip = has_carry(a, b) and slip_coin < config.slip_rate
        rows.append({"prompt": question(a, b), "completion": readable_sample(a, b, slip, mixed_coin < config.mixed_rate),
                     "answer": str(a + b)})
    return rows


def general_prompts(names=NAMES) -> list[dict]:
    return [{"prompt": task.format(n=name)} for name in names for task in TASKS]


def general_sft_rows(seed: int = GENERAL_SEED) -> list[dict]:
    """Every training prompt twice: once answered helpfully, once curtly (shuffled)."""
    rows = [{"prompt": task.format(n=name), "completion": answer}
            for name in NAMES for task, answers in TASKS.items() for answer in answers]
    random.Random(seed).shuffle(rows)
    return rows


def _garbled(text: str, rng: random.Random, rate: float) -> str:
    """The text with a share `rate` of its letters replaced (at least one): what a policy sampling at temperature 1
    writes now and then, and what it would drift to if the reward model paid for it."""
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    hit = set(rng.sample(letters, max(1, round(rate * len(letters)))))
    return "".join(rng.choice([x for x in "aeiouyhmnst" if x != c]) if i in hit else c for i, c in enumerate(text))


def preference_rows(seed: int = GENERAL_SEED) -> list[dict]:
    """chosen = the helpful answer; rejected = the curt one, another task's helpful answer (off topic), a chain of
    thought where an answer should be, or the helpful answer with 5%, 20% or 50% of its letters garbled: the reward
    model pays for a helpful answer to this prompt, spelled right, not for anything long."""
    rng = random.Random(seed + 1)
    pool = train_pairs()
    helpful = [h for h, _ in TASKS.values()]
    rows = []
    for name in NAMES:
        for task, (good, curt) in TASKS.items():
            a, b = rng.choice(pool)
            off_topic = rng.choice([h for h in helpful if h != good])
            garbled = [_garbled(good, rng, rate) for rate in (0.05, 0.2, 0.5)]
            for rejected in (curt, off_topic, readable_sample(a, b), *garbled):
                rows.append({"prompt": task.format(n=name), "chosen": good, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def helpful_rate(prompts: list[str], responses: list[str]) -> float:
    """Share of responses that are exactly the helpful answer to their prompt (a check on the reward model)."""
    lookup = {task.format(n=n): helpful for n in NAMES + EVAL_NAMES for task, (helpful, _) in TASKS.items()}
    hits = [lookup.get(p.strip()) == r.strip() for p, r in zip(prompts, responses)]
    return sum(hits) / max(1, len(hits))


def write_r1_data(out_dir: Path = R1_DATA_DIR) -> list[Path]:
    files = {
        "cold_start.jsonl": cold_start_rows(),
        "general_sft.jsonl": general_sft_rows(),
        "preferences.jsonl": preference_rows(),
        "general_train.jsonl": general_prompts(NAMES),
        "general_eval.jsonl": general_prompts(EVAL_NAMES),
    }
    paths = []
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
        paths.append(out_dir / name)
    return paths


if __name__ == "__main__":
    for path in write_r1_data():
        print(f"wrote {path}")
