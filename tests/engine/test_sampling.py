"""engine.sampling, the one sampler: every caller (trainer, evaluation, rejection sampling) scores a row by its kind.
Before it, the evaluation and rejection sampling judged every row with the accuracy rule, so a code prompt (tests, no
answer) was scored as a math answer and failed after generation."""
import json

import pytest
import torch

from r1_engine.engine.config import RewardConfig
from r1_engine.engine.data import PromptDataset, load_prompts
from r1_engine.engine.eval import sample_questions, summarize
from r1_engine.engine.rejection import RejectionConfig, rejection_sample
from r1_engine.engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from r1_engine.engine.sampling import EVAL_WEIGHTS, build_sampler, plan_scoring
from r1_engine.engine.sandbox import get_sandbox
from r1_engine.recipes.tiny.pretrain import BASE_DIR

SANDBOX = get_sandbox()
needs_sandbox = pytest.mark.skipif(not SANDBOX.contained, reason=f"no sandbox here: {SANDBOX.detail}")

MATH_RIGHT = " <think>2+2=4</think> <answer>4</answer>"
MATH_WRONG = " <think>2+2=5</think> <answer>5</answer>"
CODE_RIGHT = " <think>double</think> <answer>```python\nprint(int(input()) * 2)\n```</answer>"
CODE_WRONG = " <think>zero</think> <answer>```python\nprint(0)\n```</answer>"


class ScriptedEngine(RolloutEngine):
    """Returns, for prompt p, the scripted completions of p (cycled over the n samples)."""

    def __init__(self, script):
        self.script = script  # prompt text fragment -> completions

    def generate(self, prompt_ids, n, params):
        texts, seen = [], {}  # the j-th row of a prompt in this call gets its j-th scripted completion (cycled)
        for ids in prompt_ids:
            key = next(k for k in self.script if k in self.decode(ids))
            for _ in range(n):
                j = seen[key] = seen.get(key, -1) + 1
                texts.append(self.script[key][j % len(self.script[key])])
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids for _ in range(n)],
                            completion_ids=[[1, 2] for _ in texts], completion_text=texts,
                            rollout_logp=[torch.zeros(2) for _ in texts], finish_reason=["stop"] * len(texts),
                            group_size=n)

    def update_weights(self, named_tensors):
        raise NotImplementedError


@pytest.fixture()
def rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n"
                    + json.dumps({"prompt": "Double n.", "tests": [{"stdin": "1\n", "stdout": "2\n"},
                                                                   {"stdin": "5\n", "stdout": "10\n"}]}) + "\n")
    return load_prompts(path)


@needs_sandbox
def test_evaluation_scores_a_code_row_by_its_tests(rows):
    from r1_engine.engine.data import load_tokenizer

    tokenizer = load_tokenizer(BASE_DIR)
    items = PromptDataset(rows, tokenizer, "none").items
    engine = ScriptedEngine({"2+2?": [MATH_RIGHT, MATH_WRONG], "Double n.": [CODE_RIGHT, CODE_RIGHT, CODE_WRONG]})
    engine.decode = tokenizer.decode
    reward = RewardConfig(weights=dict(EVAL_WEIGHTS), num_workers=0)
    with build_sampler(engine, reward, rows, weights=EVAL_WEIGHTS) as sampler:
        results = sample_questions(sampler, items, 3, SamplingParams(seed=0))
        assert sampler.generated_tokens == 2 * 6
    math_row, code_row = results
    assert [s.correct for s in math_row.samples] == [True, False, True]
    assert [s.correct for s in code_row.samples] == [True, True, False]  # the judge ran the programs
    assert summarize(results)["pass@1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


@needs_sandbox
def test_rejection_sampling_keeps_code_rows_that_pass(rows, tmp_path):
    from r1_engine.engine.data import load_tokenizer

    tokenizer = load_tokenizer(BASE_DIR)
    items = PromptDataset(rows, tokenizer, "none").items
    engine = ScriptedEngine({"2+2?": [MATH_RIGHT, MATH_WRONG], "Double n.": [CODE_WRONG, CODE_RIGHT]})
    engine.decode = tokenizer.decode
    reward = RewardConfig(weights=dict(EVAL_WEIGHTS), num_workers=0)
    with build_sampler(engine, reward, rows, weights=EVAL_WEIGHTS) as sampler:
        summary = rejection_sample(sampler, items, RejectionConfig(samples_per_prompt=2, max_per_prompt=2),
                                   checkpoint="ckpt", out_path=tmp_path / "rs.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert [k["completion"] for k in kept] == [MATH_RIGHT, CODE_RIGHT]
    assert summary.drop_reasons["incorrect"] == 2


def test_general_rows_without_a_reward_model_are_refused_before_sampling(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    with pytest.raises(ValueError, match="general.jsonl:1: a general prompt .* no reward model"):
        plan_scoring(RewardConfig(), load_prompts(path, kind="general"), weights=EVAL_WEIGHTS)
