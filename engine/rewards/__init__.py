"""Rule-based rewards as in DeepSeek-R1-Zero (accuracy, format, language consistency), R1's code reward (the
program passes the row's tests in the sandboxed judge), and the composer that adds them up, weighted, in a pool of
worker processes with a per-sample timeout."""
from r1_engine.engine.rewards.accuracy import (
                                   accuracy_reward,
                                   answers_equivalent,
                                   extract_final_answers,
                                   normalize_answer,
)
from r1_engine.engine.rewards.code import (
                                   CodeJudge,
                                   CodeLimits,
                                   CodeTests,
                                   code_reward,
                                   make_code_judge,
)
from r1_engine.engine.rewards.compose import (
                                   REWARDS,
                                   RewardComposer,
                                   RewardOutput,
                                   RewardSpec,
                                   build_reward_composer,
                                   check_reward_weights,
)
from r1_engine.engine.rewards.format import format_reward
from r1_engine.engine.rewards.language import (
                                   chain_of_thought,
                                   count_words_by_language,
                                   language_consistency_reward,
)

__all__ = [
    "REWARDS",
    "CodeJudge",
    "CodeLimits",
    "CodeTests",
    "RewardComposer",
    "RewardOutput",
    "RewardSpec",
    "accuracy_reward",
    "answers_equivalent",
    "build_reward_composer",
    "chain_of_thought",
    "check_reward_weights",
    "code_reward",
    "count_words_by_language",
    "extract_final_answers",
    "format_reward",
    "language_consistency_reward",
    "make_code_judge",
    "normalize_answer",
]
