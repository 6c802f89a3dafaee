"""Rejection sampling (engine/rejection.py): the filters on hand-made samples (every drop reason, their order,
dedupe, the per-prompt limit), and rejection_sample with a scripted generate_and_score (no model) scored by the
real rule rewards."""
import json
from collections import Counter

import pytest
import torch

from r1_engine.engine.data import PromptExample, TokenizedPrompt
from r1_engine.engine.readable import readable_completion
from r1_engine.engine.rejection import DROP_REASONS, RejectionConfig, RejectionSummary, filter_samples, rejection_sample
from r1_engine.engine.rewards import build_reward_composer
from r1_engine.engine.rollout.base import RolloutBatch

GOOD = readable_completion("4+4=8.", " So \\boxed{8}.")
GOOD_2 = readable_completion("4 and 4 is 8.", " \\boxed{8}")


def scores(n, accuracy=None, fmt=None, language=None):
    return {"accuracy": accuracy or [1.0] * n, "format": fmt or [1.0] * n, "language": language or [1.0] * n}


def test_each_reason_is_the_first_failing_rule_in_order():
    cfg = RejectionConfig(max_per_prompt=2, max_paragraph_chars=20)
    long_cot = readable_completion("x" * 21, " \\boxed{8}")
    code_cot = readable_completion("```\n8\n```", " \\boxed{8}")
    completions = [
        GOOD,  # kept
        "wrong and badly formatted",  # accuracy 0 and format 0: incorrect
        "no layout",  # format 0 and language 0.5: format
        long_cot,  # language 0.5 and a long paragraph: mixed_language
        readable_completion("x" * 21 + "```", " \\boxed{8}"),  # a long paragraph and a fence: long_paragraph
        code_cot,  # code_block
        GOOD,  # duplicate of the kept one
        GOOD_2,  # kept (second)
        readable_completion("other", " \\boxed{8}"),  # over_limit
        GOOD_2,  # a duplicate beyond the limit counts as duplicate
        readable_completion("cut", " \\boxed{8}"),  # correct and well formed, but it hit the budget: truncated
    ]
    kept, reasons = filter_samples(
        completions,
        scores(11, accuracy=[1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], fmt=[1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
               language=[1, 1, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1]),
        cfg, truncated=[False] * 10 + [True])
    assert kept == [0, 7]
    assert reasons == Counter({"truncated": 1, "incorrect": 1, "format": 1, "mixed_language": 1, "long_paragraph": 1,
                               "code_block": 1, "duplicate": 2, "over_limit": 1})
    assert set(reasons) == set(DROP_REASONS)


def test_paragraphs_are_split_on_blank_lines_and_only_the_chain_of_thought_counts():
    cfg = RejectionConfig(max_per_prompt=10, max_paragraph_chars=10)
    at_limit = readable_completion("a" * 10 + "\n\n" + "b" * 10 + "\n \t\n" + "c" * 10, " \\boxed{8}")
    one_newline = readable_completion("a" * 6 + "\n" + "b" * 6, " \\boxed{8}")  # one paragraph of 13 chars
    padded = readable_completion("\n\n   " + "a" * 10 + "   \n\n", " \\boxed{8}")  # stripped: 10 chars
    long_summary = readable_completion("short", " " + "s" * 50 + " ``` \\boxed{8}")  # the summary is no CoT
    tags = "<think>" + "t" * 11 + "</think><answer>8</answer>"  # R1-Zero layout: the think block is the CoT
    bare = "``` 8"  # no layout: the whole completion is the CoT
    completions = [at_limit, one_newline, padded, long_summary, tags, bare]
    kept, reasons = filter_samples(completions, scores(6), cfg)
    assert kept == [0, 2, 3]
    assert reasons == Counter({"long_paragraph": 2, "code_block": 1})


def test_format_filter_can_be_off_and_missing_components_are_computed():
    bad_format = "The answer is \\boxed{8}."
    mixed = readable_completion("english 中文", " \\boxed{8}")
    cfg = RejectionConfig(max_per_prompt=5)
    # No "format" / "language" given: the rules are applied here (format 0 and language 1/2 for these two).
    kept, reasons = filter_samples([bad_format, mixed, GOOD], {"accuracy": [1.0, 1.0, 1.0]}, cfg)
    assert kept == [2] and reasons == Counter({"format": 1, "mixed_language": 1})
    kept, reasons = filter_samples([bad_format, mixed, GOOD], {"accuracy": [1.0, 1.0, 1.0]},
                                   RejectionConfig(max_per_prompt=5, require_format=False))
    assert kept == [0, 2] and reasons == Counter({"mixed_language": 1})
    chinese = readable_completion("四加四等于八", " \\boxed{8}")
    kept, reasons = filter_samples([mixed, chinese, GOOD], {"accuracy": [1.0, 1.0, 1.0]},
                                   RejectionConfig(max_per_prompt=5, language="zh"))
    assert kept == [1, 2] and reasons == Counter({"mixed_language": 1})  # GOOD's CoT has no words: consistent
    with pytest.raises(ValueError, match="'accuracy'"):
        filter_samples([GOOD], {"format": [1.0]}, cfg)
    with pytest.raises(ValueError, match="'format' has 2 values for 1"):
        filter_samples([GOOD], {"accuracy": [1.0], "format": [1.0, 1.0]}, cfg)


@pytest.mark.parametrize("field, value", [("samples_per_prompt", 0), ("max_per_prompt", 0), ("language", "fr"),
                                          ("max_paragraph_chars", 0), ("top_p", 0.0), ("temperature", -1.0)])
def test_config_is_checked(field, value):
    with pytest.raises(ValueError, match=field):
        RejectionConfig(**{field: value})


# --------------------------------------------------------------------------- rejection_sample
def items(answers):
    return [TokenizedPrompt(PromptExample(prompt=f"{a}-4+4?", answer=a, index=i, source=f"p.jsonl:{i + 1}"),
                            text=f"Q {i}", prompt_ids=[1, 2, i + 3]) for i, a in enumerate(answers)]


class ScriptedGenerator:
    """generate_and_score's shape: completion j of a prompt answers `answer + offset[j]`; the real rule rewards."""

    def __init__(self, offsets):
        self.offsets = offsets
        self.calls = []
        self.composer = build_reward_composer({"accuracy": 1.0, "format": 0.5, "language": 0.0}, num_workers=0)

    def __call__(self, chunk, n, params):
        self.calls.append((len(chunk), n, params))
        texts, ids = [], []
        for item in chunk:
            for j in range(n):
                texts.append(readable_completion(f"try {j}", f" \\boxed{{{int(item.example.answer) + self.offsets[j]}}}"))
                ids.append(list(range(5 + j)))
        batch = RolloutBatch(prompt_ids=[it.prompt_ids for it in chunk for _ in range(n)], completion_ids=ids,
                             completion_text=texts, rollout_logp=[torch.zeros(len(x)) for x in ids],
                             finish_reason=["stop"] * len(ids), group_size=n)
        return batch, self.composer.score(texts, [it.example.answer for it in chunk for _ in range(n)])


def test_rejection_sample_writes_the_dataset_and_its_summary(tmp_path):
    cfg = RejectionConfig(samples_per_prompt=4, max_per_prompt=2, seed=5, temperature=0.7, top_p=0.9,
                          max_new_tokens=64)
    generate = ScriptedGenerator(offsets=[0, 1, 0, 0])  # samples 0, 2, 3 correct; 3 is over the limit
    prompts = items(["8", "9", "10"])
    out = tmp_path / "data" / "rs.jsonl"
    summary = rejection_sample(generate, prompts, cfg, checkpoint="runs/r1/hf", out_path=out, prompts_per_call=2)

    # chunks of 2 prompts; seeds seed + first prompt * k; the sampling settings as configured
    assert [(c, n) for c, n, _ in generate.calls] == [(2, 4), (1, 4)]
    assert [p.seed for _, _, p in generate.calls] == [5, 5 + 2 * 4]
    params = generate.calls[0][2]
    assert (params.temperature, params.top_p, params.max_new_tokens, params.stop_strings) == (0.7, 0.9, 64, ())

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for q, answer in enumerate(["8", "9", "10"]):
        mine = rows[2 * q:2 * q + 2]
        assert [r["completion"] for r in mine] == [readable_completion(f"try {j}", f" \\boxed{{{answer}}}")
                                                   for j in (0, 2)]
        for row, j in zip(mine, (0, 2)):
            assert row == {"prompt": f"{answer}-4+4?", "completion": row["completion"], "answer": answer,
                           "prompt_id": f"p.jsonl:{q + 1}", "checkpoint": "runs/r1/hf", "reward": 1.5,
                           "length": 5 + j}
    assert summary == RejectionSummary(prompts=3, samples=12, kept=6, prompts_with_kept=3,
                                       drop_reasons={r: {"incorrect": 3, "over_limit": 3}.get(r, 0)
                                                     for r in DROP_REASONS})
    record = json.loads((tmp_path / "data" / "rs.jsonl.summary.json").read_text())
    assert record["kept"] == 6 and record["drop_reasons"]["incorrect"] == 3
    assert record["checkpoint"] == "runs/r1/hf" and record["config"]["max_per_prompt"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["rs.jsonl", "rs.jsonl.summary.json"]  # no tmp left

    table = summary.table()
    assert table.splitlines()[:2] == ["| | count | share |", "|---|---|---|"]
    assert "| kept | 6 | 50.0% |" in table and "| dropped: incorrect | 3 | 25.0% |" in table
    assert "| prompts with a kept sample | 3 | 100.0% |" in table


def test_rejection_sample_with_nothing_kept_names_the_checkpoint_and_reasons(tmp_path):
    out = tmp_path / "rs.jsonl"
    with pytest.raises(ValueError, match=r"from ckpt/step_9: no sample kept of 8 \(2 prompts x 4\); dropped: "
                                         r"incorrect 8"):
        rejection_sample(ScriptedGenerator(offsets=[1, 2, 3, 4]), items(["1", "2"]), RejectionConfig(),
                         checkpoint="ckpt/step_9", out_path=out)
    assert not any(tmp_path.iterdir())


def test_rejection_sample_needs_reference_answers(tmp_path):
    prompts = items(["1", "2"])
    prompts[1] = TokenizedPrompt(PromptExample("q", None, 1, "p.jsonl:2"), "q", [1])
    with pytest.raises(ValueError, match="p.jsonl:2 has no reference answer"):
        rejection_sample(ScriptedGenerator([0] * 4), prompts, RejectionConfig(), checkpoint="c",
                         out_path=tmp_path / "rs.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        rejection_sample(ScriptedGenerator([0] * 4), [], RejectionConfig(), checkpoint="c",
                         out_path=tmp_path / "rs.jsonl")


def test_language_share_threshold_keeps_a_chain_with_a_few_variables():
    """A Chinese chain of thought naming x and y scores 0.75 (6 Chinese words, 2 Latin): kept at the default
    threshold, where a share of exactly 1.0 used to be required; a chain half in English is still dropped."""
    variables = readable_completion("设x再加y等于八", " \\boxed{8}")
    half = readable_completion("四加四 equals eight", " \\boxed{8}")
    cfg = RejectionConfig(max_per_prompt=5, language="zh")
    assert cfg.min_language_share == 0.75
    kept, reasons = filter_samples([variables, half], {"accuracy": [1.0, 1.0]}, cfg)
    assert kept == [0] and reasons == Counter({"mixed_language": 1})
    kept, _ = filter_samples([variables, half], {"accuracy": [1.0, 1.0]},
                             RejectionConfig(max_per_prompt=5, language="zh", min_language_share=1.0))
    assert kept == []
    with pytest.raises(ValueError, match="min_language_share must be in"):
        RejectionConfig(min_language_share=1.5)


def _rejection_rank(out_dir: str):
    """One of two gloo ranks: rejection sampling of 5 prompts, 2 a call (calls 0 and 2 here on rank 0, 1 on rank 1)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cfg = RejectionConfig(samples_per_prompt=4, max_per_prompt=2, seed=5, max_new_tokens=64)
    generate = ScriptedGenerator(offsets=[0, 1, 0, 0])
    summary = rejection_sample(generate, items(["8", "9", "10", "11", "12"]), cfg, checkpoint="ckpt",
                               out_path=f"{out_dir}/rs.jsonl", prompts_per_call=2, dp_rank=dist.get_rank(), dp_size=2)
    return summary, [(size, params.seed) for size, _, params in generate.calls]


@pytest.mark.multiproc
def test_rejection_sample_over_two_ranks_writes_what_one_process_writes(tmp_path):
    from tests.parallel.dist_utils import run_distributed

    cfg = RejectionConfig(samples_per_prompt=4, max_per_prompt=2, seed=5, max_new_tokens=64)
    one = rejection_sample(ScriptedGenerator(offsets=[0, 1, 0, 0]), items(["8", "9", "10", "11", "12"]), cfg,
                           checkpoint="ckpt", out_path=tmp_path / "one" / "rs.jsonl", prompts_per_call=2)
    (s0, calls0), (s1, calls1) = run_distributed(_rejection_rank, 2, str(tmp_path / "two"))
    assert s0 == s1 == one and one.kept == 10
    assert calls0 == [(2, 5), (1, 5 + 4 * 4)] and calls1 == [(2, 5 + 2 * 4)]  # the seeds one process uses
    assert (tmp_path / "two" / "rs.jsonl").read_text() == (tmp_path / "one" / "rs.jsonl").read_text()
