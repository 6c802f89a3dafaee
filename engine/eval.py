"""Evaluation as the R1 paper reports it: k samples a question, pass@1 (mean over the k), unbiased pass@k, cons@k.

    local = sample_questions(generate_and_score, items, k, params, dp_rank=r, dp_size=D)
    results = gather_results(local, dp_group)                # every question, in item order, on every rank
    with EquivalenceJudge(num_workers=2, timeout_s=10) as judge:
        summary = summarize(results, judge)                  # {"pass@1": .., "pass@4": .., "cons@16": .., ...}

The trainer's held-out evaluation and recipes/eval.py both run this code.

Sampling (seeded, data-parallel): the work is the (question, sample) pairs, numbered question-major (pair
p = q * k + j), cut into fixed calls of `samples_per_call` consecutive pairs. Call c goes to DP rank c % D and is one
generate() of its pairs' prompts, one completion each, with seed `params.seed + c * samples_per_call` (its first
pair's number). Calls and seeds depend only on the pairs, never on D, so DP=N gives the same samples as DP=1, and
the work spreads over the ranks by sample, not by question: AIME's 30 questions x 16 samples are 8 calls, one per
GPU of 8 (32-question chunks left 7 of them idle). A question's samples may come from calls on several ranks:
`gather_results` puts them back in order.

Per sample: correctness (the accuracy reward), its final answer (the last boxed / <answer> candidate of the
answer region, normalised; None when there is none, it is empty or over MAX_ANSWER_CHARS), length in tokens,
truncation (hit the token budget), format reward and, when scored, language consistency.

cons@k: the k final answers are grouped into classes of the accuracy reward's equivalence. Identical normalised
strings share a class at no cost; each other distinct string is then compared only with the representatives of the
classes found so far (the class's first answer, held fixed as math-verify's `gold`), locally where no parse is
needed (integers, giant answers: accuracy.verdict_without_parsing) and the rest through `EquivalenceJudge` (a
reward worker pool: every call under the reward timeout; a timed-out comparison counts as "not equivalent"). It
joins the first class it is equivalent to. The majority class is the largest; a tie goes to the class whose first
member came first in sample order (deterministic: the sample order is fixed by the seed). A question counts as
solved when a member of the majority class was scored correct by the accuracy reward. Samples without an
extractable answer do not vote; a question where none has one is unsolved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1_engine.engine.rewards.accuracy import (
    MAX_ANSWER_CHARS,
    answers_equivalent,
    extract_final_answers,
    normalize_answer,
    verdict_without_parsing,
)
from r1_engine.engine.rewards.compose import RewardComposer, RewardSpec
from r1_engine.engine.rollout.base import SamplingParams
from r1_engine.engine.scoring import row_correct


@dataclass
class Sample:
    correct: bool
    answer: str | None  # normalised final answer, None when none could be extracted
    length: int  # completion tokens
    truncated: bool
    format: float
    language: float | None = None
    completion_digest: str | None = None  # blake2b-128 of the completion's token ids: what DP=N == DP=1 compares


@dataclass
class QuestionResult:
    index: int  # position in the evaluated list (results are returned in this order)
    source: str  # "file:row"
    reference: str | None
    samples: list[Sample]
    first_sample: int = 0  # the number of samples[0] among the question's k (a part of a question, see gather_results)

    @property
    def num_correct(self) -> int:
        return sum(s.correct for s in self.samples)


# --------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials; every factor is in [0, 1))."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be ints, got {n!r}, {c!r}, {k!r}")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if n < k:
        raise ValueError(f"pass_at_k: k={k} needs at least k samples per question, got n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_k_values(n: int) -> list[int]:
    """The k reported for n samples a question: every power of two up to n."""
    return [1 << e for e in range(n.bit_length()) if 1 << e <= n]


# --------------------------------------------------------------------------- answers and equivalence
def final_answer(completion: str) -> str | None:
    """The normalised final answer of a completion (its last candidate), or None when there is no usable one."""
    candidates = extract_final_answers(completion)
    if not candidates:
        return None
    answer = normalize_answer(candidates[-1])
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


def equivalence_component(pred: str, gold: str | None) -> float:
    """1.0 when `pred` is equivalent to `gold` under the accuracy reward's equivalence (a RewardSpec fn:
    module level, so the worker pool can pickle it)."""
    return 1.0 if answers_equivalent(gold or "", pred) else 0.0


Judge = Callable[[Sequence[tuple[str, str]]], list[bool]]


def inline_judge(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """(representative, candidate) pairs judged in this process (no timeout beyond math-verify's own)."""
    return [equivalence_component(cand, rep) == 1.0 for rep, cand in pairs]


class EquivalenceJudge:
    """Judges (representative, candidate) pairs in a reward worker pool, each under `timeout_s`
    (num_workers=0: inline, no timeout). A context manager; close() stops the workers."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0):
        self.composer = RewardComposer([RewardSpec("equivalent", equivalence_component, 1.0)],
                                       num_workers=num_workers, timeout_s=timeout_s)
        self.num_calls = self.num_timeouts = self.num_errors = 0

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        if not pairs:
            return []
        out = self.composer.score([cand for _, cand in pairs], [rep for rep, _ in pairs])
        self.num_calls += len(pairs)
        self.num_timeouts += out.num_timeouts
        self.num_errors += out.num_errors
        return [v == 1.0 for v in out.total]

    def close(self) -> None:
        self.composer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def equivalence_classes(answer_lists: Sequence[Sequence[str | None]], judge: Judge) -> list[list[list[int]]]:
    """For each question, its answers' classes as lists of sample indices, classes in order of first appearance.
    Distinct normalised strings are merged round by round over all questions at once (one judge call a round),
    each compared with the current class representatives only."""
    keys, classes = [], []  # keys[q]: distinct strings in first-appearance order -> their sample indices
    for answers in answer_lists:
        groups: dict[str, list[int]] = {}
        for i, answer in enumerate(answers):
            if answer is not None:
                groups.setdefault(answer, []).append(i)
        keys.append(list(groups.items()))
        classes.append([])  # [representative string, sample indices]
    for step in range(max((len(k) for k in keys), default=0)):
        pairs, owners = [], []
        verdicts: dict[tuple[int, int], bool] = {}
        for q, question_keys in enumerate(keys):
            if step >= len(question_keys):
                continue
            cand = question_keys[step][0]
            for c, (rep, _) in enumerate(classes[q]):
                cheap = verdict_without_parsing(rep, cand)
                if cheap is None:
                    pairs.append((rep, cand))
                    owners.append((q, c))
                else:
                    verdicts[(q, c)] = cheap
        verdicts.update(zip(owners, judge(pairs)))
        for q, question_keys in enumerate(keys):
            if step >= len(question_keys):
                continue
            cand, members = question_keys[step]
            match = next((c for c in range(len(classes[q])) if verdicts[(q, c)]), None)
            if match is None:
                classes[q].append([cand, list(members)])
            else:
                classes[q][match][1].extend(members)
    return [[sorted(members) for _, members in question] for question in classes]


def majority_correct(samples: Sequence[Sample], classes: Sequence[Sequence[int]], abstain: bool = False) -> bool:
    """cons@k of one question: is the majority class correct? The samples with no extractable answer are one class of
    their own ("no answer" is a vote, and never correct); abstain=True leaves them out of the vote instead (the
    lenient variant, reported as cons_abstain@k). Ties go to the class whose first member came first; the class is
    judged by that first member's correctness against the reference (its members are equivalent answers)."""
    votes = [list(members) for members in classes]
    silent = [i for i, s in enumerate(samples) if s.answer is None]
    if silent and not abstain:
        votes.append(silent)
    if not votes:
        return False
    best = max(votes, key=lambda members: (len(members), -members[0]))
    first = samples[best[0]]
    return first.answer is not None and bool(first.correct)


# --------------------------------------------------------------------------- per-dataset numbers
def _quantile(values: torch.Tensor, q: float) -> float:
    return torch.quantile(values, q).item()  # linear interpolation between order statistics


def _standard_error(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return (torch.tensor(values, dtype=torch.float64).std() / math.sqrt(len(values))).item()


def summarize(results: Sequence[QuestionResult], judge: Judge | None = None) -> dict[str, float]:
    """The dataset's numbers; cons@k only with a judge. Every question must have the same number of samples."""
    if not results:
        raise ValueError("summarize: no questions")
    n = len(results[0].samples)
    if n < 1 or any(len(r.samples) != n for r in results):
        raise ValueError("summarize: every question needs the same number (>= 1) of samples")
    samples = [s for r in results for s in r.samples]
    f64 = torch.float64
    out: dict[str, float] = {"questions": float(len(results)), "k": float(n)}
    for kk in pass_k_values(n):
        out[f"pass@{kk}"] = sum(pass_at_k(n, r.num_correct, kk) for r in results) / len(results)
    # standard errors over questions (the sample std of the per-question values / sqrt(questions)): the spread a
    # comparison of two models' numbers must clear before it says more than "within noise"
    out["se/pass@1"] = _standard_error([r.num_correct / n for r in results])
    if judge is not None:
        classes = equivalence_classes([[s.answer for s in r.samples] for r in results], judge)
        votes = [float(majority_correct(r.samples, c)) for r, c in zip(results, classes)]
        out[f"cons@{n}"] = sum(votes) / len(results)
        out[f"se/cons@{n}"] = _standard_error(votes)
        out[f"cons_abstain@{n}"] = sum(majority_correct(r.samples, c, abstain=True)
                                       for r, c in zip(results, classes)) / len(results)
    out["format_rate"] = torch.tensor([s.format for s in samples], dtype=f64).mean().item()
    languages = [s.language for s in samples if s.language is not None]
    if languages:
        out["language_rate"] = sum(languages) / len(languages)
    out["answer_rate"] = sum(s.answer is not None for s in samples) / len(samples)
    lengths = torch.tensor([s.length for s in samples], dtype=f64)
    out.update({"length/mean": lengths.mean().item(), "length/p50": _quantile(lengths, 0.5),
                "length/p90": _quantile(lengths, 0.9), "length/max": lengths.max().item(),
                "truncated_frac": sum(s.truncated for s in samples) / len(samples)})
    return out


# --------------------------------------------------------------------------- sampling
SAMPLES_PER_CALL = 64  # (question, sample) pairs a generate() call: AIME's 30 x 16 are 8 calls, one per GPU of 8


def completion_digest(ids: Sequence[int]) -> str:
    """A 128-bit fingerprint of a completion's token ids (equal digests: equal ids, short enough to gather)."""
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=16).hexdigest()


def sample_questions(generate_and_score, items: Sequence, k: int, params: SamplingParams, *, dp_rank: int = 0,
                     dp_size: int = 1, samples_per_call: int = SAMPLES_PER_CALL) -> list[QuestionResult]:
    """This DP rank's (question, sample) pairs, as parts of questions (see the module docstring: call c of
    `samples_per_call` pairs goes to rank c % dp_size with seed params.seed + c * samples_per_call); with
    dp_size 1 every question whole, in order. `items` are TokenizedPrompts; `generate_and_score(prompts, 1, params)`
    returns (RolloutBatch, RewardOutput with a "format" component, "accuracy" for reasoning rows and "code" for code
    rows, optionally "language"): engine.sampling.RolloutSampler. params.seed None is taken as 0 (evaluation is
    seeded). gather_results joins the parts of every rank."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"evaluation: k (samples per question) must be an integer >= 1, got {k!r}")
    if isinstance(samples_per_call, bool) or not isinstance(samples_per_call, int) or samples_per_call < 1:
        raise ValueError(f"evaluation: samples_per_call must be an integer >= 1, got {samples_per_call!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"evaluation: dp_rank {dp_rank} out of range for dp_size {dp_size}")
    base = params.seed or 0
    results: list[QuestionResult] = []
    total = len(items) * k
    for c, start in enumerate(range(0, total, samples_per_call)):
        if c % dp_size != dp_rank:
            continue
        pairs = range(start, min(start + samples_per_call, total))
        chunk = [items[p // k] for p in pairs]
        rollout, scores = generate_and_score(chunk, 1, dataclasses.replace(params, seed=base + start))
        fmt = scores.components["format"]
        language = scores.components.get("language")
        lengths, truncated = rollout.lengths.tolist(), rollout.truncated.tolist()
        for i, p in enumerate(pairs):
            q, j = divmod(p, k)
            sample = Sample(correct=row_correct(scores, i), answer=final_answer(rollout.completion_text[i]),
                            length=lengths[i], truncated=truncated[i], format=fmt[i],
                            language=None if language is None else language[i],
                            completion_digest=completion_digest(rollout.completion_ids[i]))
            last = results[-1] if results else None
            if last is not None and last.index == q and last.first_sample + len(last.samples) == j:
                last.samples.append(sample)  # the next sample of the same question
            else:
                item = items[q]
                results.append(QuestionResult(index=q, source=item.example.source, reference=item.example.answer,
                                              samples=[sample], first_sample=j))
    return results


def join_parts(parts: Sequence[QuestionResult]) -> list[QuestionResult]:
    """Parts of questions (any order) as whole questions in question order; a part must start where the
    previous part of its question ended (a ValueError names the question otherwise)."""
    out: list[QuestionResult] = []
    for part in sorted(parts, key=lambda r: (r.index, r.first_sample)):
        last = out[-1] if out else None
        if last is not None and last.index == part.index:
            if part.first_sample != len(last.samples):
                raise ValueError(f"gather_results: question {part.index} ({part.source}) has samples "
                                 f"0..{len(last.samples) - 1}, then a part starting at {part.first_sample}")
            last.samples.extend(part.samples)
        else:
            if part.first_sample != 0:
                raise ValueError(f"gather_results: question {part.index} ({part.source}) lacks its first "
                                 f"{part.first_sample} samples")
            out.append(dataclasses.replace(part, samples=list(part.samples)))
    return out


def gather_results(local: list[QuestionResult], group=None) -> list[QuestionResult]:
    """Every rank's parts of questions, on every rank of `group` (None or one rank: just `local`), joined into whole
    questions in question order, each question's samples in sample order."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return join_parts(local)
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    return join_parts([r for part in parts for r in part])


def results_to_json(results: Sequence[QuestionResult]) -> list[dict]:
    """Per-question records for eval.json."""
    return [{"index": r.index, "source": r.source, "reference": r.reference, "num_correct": r.num_correct,
             "correct": [s.correct for s in r.samples], "answers": [s.answer for s in r.samples],
             "lengths": [s.length for s in r.samples], "truncated": [s.truncated for s in r.samples],
             "format": [s.format for s in r.samples]}
            | ({"language": [s.language for s in r.samples]} if r.samples and r.samples[0].language is not None
               else {})
            for r in results]
