"""engine/eval.py: unbiased pass@k against brute-force enumeration, cons@k by answer equivalence (hand-made cases),
per-dataset numbers, seeded sampling, and DP=2 == DP=1 on a tiny random Qwen2."""
import itertools
from fractions import Fraction

import math

import pytest
import torch

from r1_engine.engine.eval import (
    EquivalenceJudge,
    QuestionResult,
    Sample,
    equivalence_classes,
    final_answer,
    gather_results,
    inline_judge,
    majority_correct,
    pass_at_k,
    pass_k_values,
    sample_questions,
    summarize,
)
from tests.engine._trainer_common import DATA, write_tiny_model
from tests.parallel.dist_utils import run_distributed


# --------------------------------------------------------------------------- pass@k
def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) holding a correct one, exactly, then float64."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    return float(Fraction(hits, len(subsets)))


def test_pass_at_k_matches_enumeration_of_all_subsets():
    checked = 0
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got, want = pass_at_k(n, c, k), _brute_pass_at_k(n, c, k)
                assert got == pytest.approx(want, abs=1e-12, rel=0), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 11))
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)  # pass@1 is the plain mean


def test_pass_at_k_is_stable_for_large_n():
    # C(1024, 512) overflows float64; the product form does not (reference: exact rationals)
    n, c, k = 1024, 3, 512
    want = 1 - Fraction(1)
    prod = Fraction(1)
    for i in range(n - c + 1, n + 1):
        prod *= 1 - Fraction(k, i)
    want = float(1 - prod)
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=4 needs at least k samples per question, got n=3"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    assert pass_k_values(16) == [1, 2, 4, 8, 16] and pass_k_values(6) == [1, 2, 4] and pass_k_values(1) == [1]


# --------------------------------------------------------------------------- cons@k
def _samples(answers, correct):
    return [Sample(correct=bool(c), answer=a, length=1, truncated=False, format=1.0) for a, c in zip(answers, correct)]


def _counting(judge):
    calls = []

    def counted(pairs):
        calls.extend(pairs)
        return judge(pairs)
    return counted, calls


def test_equivalence_majority_beats_string_majority():
    answers = ["2", "1/2", "0.5", "\\frac{1}{2}", "2"]  # as strings "2" leads 2:1; as values 1/2 leads 3:2
    samples = _samples(answers, [0, 1, 1, 1, 0])  # reference 1/2
    judge, calls = _counting(inline_judge)
    [classes] = equivalence_classes([answers], judge)
    assert classes == [[0, 4], [1, 2, 3]]
    assert majority_correct(samples, classes)
    # the string majority would have voted "2": without equivalence the question counts as unsolved
    string_classes = [[0, 4], [1], [2], [3]]
    assert not majority_correct(samples, string_classes)
    # each new string meets the class representatives only ("2" twice and "1/2" once are never re-compared)
    assert calls == [("2", "1/2"), ("2", "0.5"), ("1/2", "0.5"), ("2", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}")]


def test_ties_go_to_the_class_that_appeared_first():
    for answers, correct, want in ((["3", "4", "4", "3"], [0, 1, 1, 0], False),
                                   (["4", "3", "3", "4"], [1, 0, 0, 1], True)):
        [classes] = equivalence_classes([answers], inline_judge)
        assert len(classes) == 2 and all(len(c) == 2 for c in classes)
        assert majority_correct(_samples(answers, correct), classes) is want


def test_all_wrong_and_no_extractable_answer():
    cases = [(["5", "5", "6"], [0, 0, 0]), ([None, None, None], [0, 0, 0]), ([None, "7", None], [0, 1, 0])]
    classes = equivalence_classes([a for a, _ in cases], inline_judge)
    assert classes == [[[0, 1], [2]], [], [[1]]]
    # "no answer" is a class of its own: two silent samples outvote one correct "7" (the abstaining variant lets it win)
    assert [majority_correct(_samples(a, c), cl) for (a, c), cl in zip(cases, classes)] == [False, False, False]
    assert [majority_correct(_samples(a, c), cl, abstain=True)
            for (a, c), cl in zip(cases, classes)] == [False, False, True]
    assert final_answer("<think>no box here</think> it is 4") is None
    assert final_answer("<think>x</think> <answer> 1{,}000 </answer>") == "1000"
    assert final_answer("\\boxed{}") is None


def test_grouping_compares_with_class_representatives_only():
    # 64 samples of 4 distinct strings in 2 classes: 4 comparisons, not 64^2
    distinct = ["1/2", "0.5", "x+1", "1+x"]
    answers = [distinct[i % 4] for i in range(64)]
    judge, calls = _counting(inline_judge)
    [classes] = equivalence_classes([answers], judge)
    assert [len(c) for c in classes] == [32, 32]
    assert len(calls) == 1 + 1 + 2
    integers = [str(i % 3) for i in range(64)] + ["+1", "01"]
    judge, calls = _counting(inline_judge)
    [classes] = equivalence_classes([integers], judge)
    assert calls == [] and [len(c) for c in classes] == [22, 23, 21]


def test_worker_pool_judge_agrees_with_inline():
    answers = [["2", "1/2", "0.5", "\\frac{1}{2}", "2"], ["x^2", "x*x", "3"]]
    with EquivalenceJudge(num_workers=1, timeout_s=30.0) as judge:
        pooled = equivalence_classes(answers, judge)
        assert judge.num_calls == 5 + 2 and judge.num_timeouts == 0
    assert pooled == equivalence_classes(answers, inline_judge) == [[[0, 4], [1, 2, 3]], [[0, 1], [2]]]


# --------------------------------------------------------------------------- per-dataset numbers
def test_no_answer_is_a_vote_of_its_own():
    """4 silent samples, 3 of the correct answer, 1 other: cons@8 counts the question unsolved ("no answer" leads
    4:3), the abstaining variant solved; a correct-judged sample in a wrong-judged class does not rescue it."""
    q = _samples([None, "5", None, "5", None, "5", None, "6"], [0, 1, 0, 1, 0, 1, 0, 0])
    out = summarize([QuestionResult(0, "f:1", "5", q)], inline_judge)
    assert out["cons@8"] == 0.0 and out["cons_abstain@8"] == 1.0
    q = _samples(["5", "5", "6"], [0, 1, 0])  # the class is judged by its first member
    [classes] = equivalence_classes([["5", "5", "6"]], inline_judge)
    assert not majority_correct(q, classes)


def test_summarize_against_hand_computed_numbers():
    q0 = _samples(["1/2", "0.5", "2", "2"], [1, 1, 0, 0])  # tie 2:2, "1/2" first -> solved
    q1 = _samples(["3", None, "4", "4"], [1, 0, 0, 0])  # majority "4" -> unsolved
    for s, (length, trunc, fmt) in zip(q0 + q1, [(10, 0, 1), (20, 0, 1), (30, 0, 0), (40, 1, 0),
                                                 (5, 0, 1), (50, 1, 0), (15, 0, 1), (25, 0, 1)]):
        s.length, s.truncated, s.format = length, bool(trunc), float(fmt)
    results = [QuestionResult(0, "f:1", "1/2", q0), QuestionResult(1, "f:2", "3", q1)]
    out = summarize(results, inline_judge)
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)  # C(2,2)/C(4,2), C(3,2)/C(4,2)
    assert out["pass@4"] == pytest.approx(1.0)
    assert out["cons@4"] == pytest.approx(0.5) and out["cons_abstain@4"] == pytest.approx(0.5)
    assert out["format_rate"] == pytest.approx(5 / 8) and out["truncated_frac"] == pytest.approx(2 / 8)
    assert out["answer_rate"] == pytest.approx(7 / 8)
    lengths = torch.tensor([10, 20, 30, 40, 5, 50, 15, 25], dtype=torch.float64)
    assert out["length/mean"] == pytest.approx(lengths.mean().item())
    assert out["length/p50"] == pytest.approx(22.5) and out["length/max"] == 50.0
    assert out["length/p90"] == pytest.approx(40 + 0.3 * 10)  # sorted [5..50]: position 0.9*7 = 6.3
    # standard errors over the 2 questions: per-question pass rates 0.5 and 0.25 -> std 0.1768 / sqrt(2)
    assert out["se/pass@1"] == pytest.approx(math.sqrt(((0.5 - 0.375) ** 2 + (0.25 - 0.375) ** 2) / 1) / math.sqrt(2))
    assert out["se/cons@4"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # votes 1, 0
    assert "cons@4" not in summarize(results)
    with pytest.raises(ValueError, match="same number"):
        summarize([results[0], QuestionResult(1, "f:2", "3", q1[:3])])


# --------------------------------------------------------------------------- sampling on a tiny model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_eval_model"))


def _run_eval(model_dir, k=3, questions=5, seed=11, dp_rank=0, dp_size=1, per_call=4, ids=None):
    """sample_questions on the tiny model; `ids` (a dict), when given, receives every completion's token ids by
    (question, sample), read off the calls' seeds (a call's seed is seed + its first pair's number q * k + j)."""
    from r1_engine.engine.data import PromptDataset, load_prompts, load_tokenizer
    from r1_engine.engine.rewards import build_reward_composer
    from r1_engine.engine.rollout.base import SamplingParams
    from r1_engine.engine.rollout.hf import HFRolloutEngine

    tok = load_tokenizer(model_dir)
    items = PromptDataset(load_prompts(DATA / "eval.jsonl")[:questions], tok).items
    engine = HFRolloutEngine(str(model_dir), tok, num_threads=1)
    with build_reward_composer({"accuracy": 1.0, "format": 0.0}, num_workers=0) as rewards:
        def generate_and_score(chunk, n, params):
            rollout = engine.generate([it.prompt_ids for it in chunk], n, params)
            if ids is not None:
                for row, completion in enumerate(rollout.completion_ids):
                    ids[divmod(params.seed - seed + row, k)] = list(completion)
            return rollout, rewards.score(rollout.completion_text, [it.example.answer for it in chunk for _ in range(n)])

        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=seed)
        local = sample_questions(generate_and_score, items, k, params, dp_rank=dp_rank, dp_size=dp_size,
                                 samples_per_call=per_call)
    return local


def _dp_worker(model_dir):
    import torch.distributed as dist

    from r1_engine.parallel.state import init_parallel

    ps = init_parallel(1, 1, 0)
    ids = {}
    local = _run_eval(model_dir, dp_rank=ps.dp_rank, dp_size=ps.dp_size, ids=ids)
    results = gather_results(local, ps.dp_group)
    return ([(r.index, r.first_sample, len(r.samples)) for r in local], _fingerprint(results), ids,
            dist.get_world_size())


def _fingerprint(results):
    """Per question, per sample: the completion's token ids (their digest) and what was read off them."""
    return [(r.index, [(s.completion_digest, s.answer, s.length, s.format) for s in r.samples]) for r in results]


def test_same_seed_same_numbers_and_other_seed_other_samples(model_dir):
    from r1_engine.engine.eval import completion_digest

    ids_a, ids_b = {}, {}
    a, b = _run_eval(model_dir, ids=ids_a), _run_eval(model_dir, ids=ids_b)
    assert [r.index for r in a] == list(range(5)) and all(len(r.samples) == 3 and r.first_sample == 0 for r in a)
    assert ids_a == ids_b and sorted(ids_a) == [(q, j) for q in range(5) for j in range(3)]
    assert _fingerprint(a) == _fingerprint(b) and summarize(a) == summarize(b)
    assert [s.completion_digest for r in a for s in r.samples] == [completion_digest(ids_a[q, j])
                                                                   for q in range(5) for j in range(3)]
    assert len({tuple(v) for v in ids_a.values()}) > 10  # the samples differ: a real comparison below
    other = {}
    _run_eval(model_dir, seed=12, ids=other)
    assert other != ids_a
    # one rank's share: calls 0 and 2 of 4 pairs each (pairs 0-3 and 8-11), with the seeds DP=1 used for them
    share_ids = {}
    share = _run_eval(model_dir, dp_rank=0, dp_size=2, ids=share_ids)
    assert [(r.index, r.first_sample, len(r.samples)) for r in share] == [(0, 0, 3), (1, 0, 1), (2, 2, 1), (3, 0, 3)]
    assert share_ids == {pair: ids_a[pair] for pair in share_ids} and len(share_ids) == 8
    with pytest.raises(ValueError, match="k \\(samples per question\\) must be an integer >= 1, got 0"):
        _run_eval(model_dir, k=0)


def test_gather_joins_the_parts_of_a_question_in_sample_order():
    from r1_engine.engine.eval import join_parts

    def part(q, first, n):
        return QuestionResult(q, f"f:{q}", "1", [Sample(True, str(first + i), 1, False, 1.0) for i in range(n)],
                              first_sample=first)

    joined = gather_results([part(1, 1, 2), part(0, 0, 3), part(1, 0, 1)])
    assert [(r.index, r.first_sample, [s.answer for s in r.samples]) for r in joined] == [
        (0, 0, ["0", "1", "2"]), (1, 0, ["0", "1", "2"])]
    with pytest.raises(ValueError, match="question 1 .* lacks its first 1 samples"):
        join_parts([part(1, 1, 2)])
    with pytest.raises(ValueError, match="question 0 .* then a part starting at 3"):
        join_parts([part(0, 0, 2), part(0, 3, 1)])


@pytest.mark.multiproc
def test_two_data_parallel_ranks_give_the_single_rank_results(model_dir):
    """DP=2 and DP=1 give every (question, sample) the same completion token ids: question 1's samples come from
    both ranks (pairs 0-3 and 8-11 on rank 0, 4-7 and 12-14 on rank 1)."""
    ids = {}
    single = _fingerprint(_run_eval(model_dir, ids=ids))
    (own0, all0, ids0, w0), (own1, all1, ids1, w1) = run_distributed(_dp_worker, 2, str(model_dir))
    assert w0 == w1 == 2
    assert own0 == [(0, 0, 3), (1, 0, 1), (2, 2, 1), (3, 0, 3)] and own1 == [(1, 1, 2), (2, 0, 2), (4, 0, 3)]
    assert all0 == all1 == single
    assert {**ids0, **ids1} == ids and not set(ids0) & set(ids1)  # the token ids themselves, pair by pair


def test_trainer_evaluate_runs_this_code(model_dir, tmp_path):
    """GRPOTrainer.evaluate: pass@1 = the mean accuracy reward of the held-out samples, format rate their mean
    format reward, pass@k for the powers of two up to train.eval_samples (recomputed here from the samples)."""
    import dataclasses

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer
    from tests.engine._trainer_common import tiny_config

    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_samples=4, eval_size=3))
    t = GRPOTrainer(cfg, model_dir, load_prompts(DATA / "train.jsonl"), load_prompts(DATA / "eval.jsonl"))
    seen = []
    real = t.generate_and_score

    def recording(items, n, params):
        seen.append(real(items, n, params))
        out = seen[-1]
        # scripted correctness, so pass@k is not trivially 0 for a random model: question q has q correct samples
        # (the call holds one row per (question, sample) pair, n = 1)
        questions, acc = {}, []
        for it in items:
            q = questions.setdefault(it.example.index, len(questions))
            acc.append(float(sum(x.example.index == it.example.index for x in items[:len(acc)]) < q))
        return out[0], dataclasses.replace(out[1], components={**out[1].components, "accuracy": acc})

    t.generate_and_score = recording
    try:
        got = t.evaluate()
    finally:
        t.close()
    assert len(seen) == 1
    fmt = seen[0][1].components["format"]
    assert got["eval/pass@1"] == pytest.approx((0 + 1 + 2) / 12)
    assert got["eval/pass@2"] == pytest.approx((0 + pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 3)
    assert got["eval/pass@2"] == pytest.approx((0 + 0.5 + 5 / 6) / 3)
    assert got["eval/pass@4"] == pytest.approx(2 / 3)
    assert got["eval/format_rate"] == pytest.approx(sum(fmt) / len(fmt))
    assert got["eval/length/mean"] == pytest.approx(seen[0][0].lengths.double().mean().item())


def _model_eval_rank(model_dir: str):
    import torch.distributed as dist

    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.model_eval import EvalSettings, ModelEvaluator

    dist.init_process_group("gloo")
    settings = EvalSettings(samples=3, max_new_tokens=12, size=5, template="r1-zero", num_workers=0,
                            dtype="float32", samples_per_call=4)
    with ModelEvaluator(settings) as evaluator:
        return evaluator.evaluate(model_dir, load_prompts(DATA / "eval.jsonl")[:5], dp_rank=dist.get_rank(),
                                  dp_size=2)


@pytest.mark.multiproc
def test_model_evaluator_over_two_ranks_reports_the_single_process_numbers(model_dir):
    """The R1 recipe's per-stage evaluation on every rank: rank 0 gets the report one process would write."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.model_eval import EvalSettings, ModelEvaluator

    settings = EvalSettings(samples=3, max_new_tokens=12, size=5, template="r1-zero", num_workers=0,
                            dtype="float32", samples_per_call=4)
    with ModelEvaluator(settings) as evaluator:
        single = evaluator.evaluate(str(model_dir), load_prompts(DATA / "eval.jsonl")[:5])
    rank0, rank1 = run_distributed(_model_eval_rank, 2, str(model_dir))
    assert rank1 is None and rank0["summary"] == single["summary"] and rank0["questions"] == single["questions"]
    assert len(single["questions"]) == 5
