"""RolloutScorer: rule rewards on reasoning rows, reward models on general rows, NaN where a component does not
apply; checked against hand-computed totals."""
import math

import pytest

from r1_engine.engine.rewards import build_reward_composer
from r1_engine.engine.scoring import RolloutScorer, check_reward_models, nanmean


class FakeRewardModels:
    """Scores a response by its length (a stand-in for an HF reward model: the scorer only routes rows)."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses, questions=None):
        self.calls.append((list(prompts), list(responses)) + (() if questions is None else (list(questions),)))
        return {"helpfulness": [float(len(r)) for r in responses], "harmlessness": [-1.0 for _ in responses]}

    def close(self):
        pass


GOOD = " <think>7+8=15.</think> <answer>15</answer>"
BAD = " <think>7+8=14.</think> <answer>14</answer>"


def test_mixed_batch_routes_rows_and_weights():
    rules = build_reward_composer({"accuracy": 1.0, "format": 0.5}, num_workers=0)
    rms = FakeRewardModels()
    scorer = RolloutScorer(rules, rms, {"helpfulness": 0.5, "harmlessness": 2.0})
    kinds = ["reasoning", "general", "reasoning", "general"]
    prompts = ["q1", "Greet Ann.", "q2", "Thank Bob."]
    completions = [GOOD, "Hello Ann!", BAD, "Thanks."]
    out = scorer.score(kinds, prompts, completions, ["15", None, "15", None])
    assert out.total == [1.5, 0.5 * 10 - 2.0, 0.5, 0.5 * 7 - 2.0]
    assert rms.calls == [(["Greet Ann.", "Thank Bob."], ["Hello Ann!", "Thanks."])]  # only the general rows
    acc = out.components["accuracy"]
    assert acc[0] == 1.0 and acc[2] == 0.0 and math.isnan(acc[1]) and math.isnan(acc[3])
    help_ = out.components["helpfulness"]
    assert math.isnan(help_[0]) and help_[1] == 10.0
    assert nanmean(acc) == 0.5 and nanmean(help_) == 8.5


def test_reasoning_only_is_the_rule_composer_unchanged():
    rules = build_reward_composer({"accuracy": 1.0, "format": 0.5}, num_workers=0)
    out = RolloutScorer(rules).score(["reasoning"] * 2, ["a", "b"], [GOOD, BAD], ["15", "15"])
    assert out.total == [1.5, 0.5] and set(out.components) == {"accuracy", "format"}


def test_general_rows_without_a_reward_model_are_an_error():
    rules = build_reward_composer({"accuracy": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match="reward.models"):
        RolloutScorer(rules).score(["general"], ["Greet Ann."], ["Hi."], [None])
    with pytest.raises(ValueError, match="unknown row kind"):
        RolloutScorer(rules).score(["chat"], ["x"], ["y"], [None])


def test_check_reward_models_names_the_file_row(tmp_path):
    from r1_engine.engine.data import load_prompts

    path = tmp_path / "general.jsonl"
    path.write_text('{"prompt": "Greet Ann."}\n')
    examples = load_prompts(path, kind="general")
    assert examples[0].kind == "general" and examples[0].answer is None
    with pytest.raises(ValueError, match=r"general\.jsonl:1.*--reward.models"):
        check_reward_models({}, examples)


def test_reward_model_scores_are_normalised_within_each_group():
    """normalization="group" (RewardConfig.model_normalization's default): each model's scores z-scored over the
    group_size consecutive rows of one prompt before weighting; the components keep the raw scores."""
    from r1_engine.engine.config import RewardConfig
    from r1_engine.engine.sampling import build_scorer, plan_scoring
    from r1_engine.engine.scoring import NORM_EPS, group_zscore

    rules = build_reward_composer({"accuracy": 1.0, "format": 0.5}, num_workers=0)
    rms = FakeRewardModels()
    scorer = RolloutScorer(rules, rms, {"helpfulness": 0.5, "harmlessness": 2.0}, normalization="group")
    kinds = ["reasoning", "reasoning", "general", "general", "general", "general"]
    completions = [GOOD, BAD, "Hello Ann!", "Hi", "Thanks.", "Thanks!"]  # helpfulness: 10, 2 | 7, 7
    out = scorer.score(kinds, ["q", "q", "g1", "g1", "g2", "g2"], completions, ["15", "15", None, None, None, None],
                       questions=["Q", "Q", "G1", "G1", "G2", "G2"], group_size=2)
    one = 4.0 / (4.0 + NORM_EPS)
    assert out.total[:2] == [1.5, 0.5]  # rule rows as before
    assert out.total[2:] == pytest.approx([0.5 * one, -0.5 * one, 0.0, 0.0])  # harmlessness: equal, 0
    assert out.components["helpfulness"][2:] == [10.0, 2.0, 7.0, 7.0]  # raw
    # questions reach the reward models with the general rows only
    assert rms.calls == [(["g1", "g1", "g2", "g2"], completions[2:], ["G1", "G1", "G2", "G2"])]
    # group_size 1 (evaluation): nothing to normalise against, raw scores
    single = scorer.score(["general"], ["g"], ["Hello"], [None])
    assert single.total == [0.5 * 5 - 2.0]
    with pytest.raises(ValueError, match="not whole groups of 4"):
        scorer.score(kinds, ["q"] * 6, completions, [None] * 6, group_size=4)
    assert group_zscore([1.0, 3.0, 5.0, 5.0], [0, 0, 1, 1]) == pytest.approx([-1.0, 1.0, 0.0, 0.0], abs=1e-5)
    # the config's default, carried by build_scorer
    assert RewardConfig().model_normalization == "group"
    reward = RewardConfig(num_workers=0)
    assert build_scorer(reward, plan_scoring(reward, [])).normalization == "group"
    none = RewardConfig(num_workers=0, model_normalization="none")
    assert build_scorer(none, plan_scoring(none, [])).normalization == "none"
