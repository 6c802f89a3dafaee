"""Reward models: scores against transformers' own sequence-classification forward one text at a time (texts and
summaries written out by hand here), the Bradley-Terry loss against float64 arithmetic, and training on pairs that
differ learnably, checked through the saved directory."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from r1_engine.engine.data import encode_text, load_tokenizer
from r1_engine.engine.reward_model import RewardModelScorer, RewardModelSet, RewardModelSpec, check_reward_model_dir
from r1_engine.engine.objectives import bradley_terry_loss
from r1_engine.engine.reward_model_train import (
    PreferencePair,
    RewardModelTrainConfig,
    load_preference_pairs,
    train_reward_model,
)
from tests.engine._trainer_common import write_tiny_model

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def reward_dir(base, tmp_path_factory) -> Path:
    """A reward model with a large random head (scores spread over several units), config without a pad id."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    assert model.config.pad_token_id is None
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    return out


def hf_score(model_dir: Path, text: str) -> float:
    """transformers' forward on one unpadded text: no pad id configured, so the head reads the last token."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.pad_token_id is None
    ids = encode_text(load_tokenizer(model_dir), text)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


# --------------------------------------------------------------------------- the loss
def test_bradley_terry_loss_matches_float64_and_survives_large_margins():
    chosen = torch.tensor([0.5, -2.0, 3.0, 1000.0, -1000.0, 40.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 3.0, -1000.0, 1000.0, -60.0])

    def minus_log_sigmoid(d: float) -> float:  # float64, stable on both sides
        return math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))

    margins = [c - r for c, r in zip(chosen.tolist(), rejected.tolist())]
    expected = sum(minus_log_sigmoid(d) for d in margins) / len(margins)
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert 2000 / 6 < loss.item() < 2010 / 6  # the -2000 margin dominates, and nothing overflowed
    loss.backward()

    def sigmoid_of_minus(d: float) -> float:
        return math.exp(-d) / (1 + math.exp(-d)) if d >= 0 else 1 / (1 + math.exp(d))

    expected_grad = [-sigmoid_of_minus(d) / len(margins) for d in margins]  # d loss / d r_chosen
    assert chosen.grad.tolist() == pytest.approx(expected_grad, abs=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


# --------------------------------------------------------------------------- scoring
PROMPT = "User: 12+35=?. Assistant:"
READABLE = "<think>2+5=7. 1+3=4.</think> so the answer is 47."


def test_scope_summary_and_response_match_hf_one_text_at_a_time(reward_dir):
    summary = RewardModelScorer(RewardModelSpec("helpful", str(reward_dir)))
    response = RewardModelScorer(RewardModelSpec("harmless", str(reward_dir), scope="response"))
    with_marker = "<think>1+1=3</think> wrong <|summary|> 2+2=4"
    got_summary = summary.score([PROMPT, PROMPT], [READABLE, with_marker])
    got_response = response.score([PROMPT], [READABLE])
    assert got_summary[0] == pytest.approx(hf_score(reward_dir, PROMPT + " so the answer is 47."), abs=1e-5)
    assert got_summary[1] == pytest.approx(hf_score(reward_dir, PROMPT + " 2+2=4"), abs=1e-5)
    assert got_response[0] == pytest.approx(hf_score(reward_dir, PROMPT + READABLE), abs=1e-5)
    assert abs(got_summary[0] - got_response[0]) > 1e-2  # the scopes really read different texts


def test_batched_scores_equal_one_at_a_time_and_a_trailing_eos_is_not_read(reward_dir):
    responses = ["1", " so the answer is 4.", "<think>7+8=15, write 5 carry 1.</think> <answer>85</answer>",
                 "<think>9</think> 9" + EOS, "22", "<think>4+3+1=8. 7+8=15</think> so the answer is 815." + EOS,
                 "3+4=7"]
    spec = RewardModelSpec("r", str(reward_dir), scope="response")
    batched = RewardModelScorer(spec, batch_size=3).score([PROMPT] * len(responses), responses)
    single = RewardModelScorer(spec, batch_size=1)
    one_by_one = [single.score([PROMPT], [r])[0] for r in responses]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    reference = [hf_score(reward_dir, PROMPT + r.removesuffix(EOS)) for r in responses]
    assert batched == pytest.approx(reference, abs=1e-5)
    # reading the score at the eos itself would give another number: the stripping above is what made them agree
    assert abs(hf_score(reward_dir, PROMPT + responses[3]) - batched[3]) > 1e-3
    single.close()
    with pytest.raises(RuntimeError, match="after close"):
        single.score([PROMPT], ["1"])


def test_long_texts_keep_their_last_tokens(reward_dir):
    tokenizer = load_tokenizer(reward_dir)
    ids, short = encode_text(tokenizer, PROMPT + READABLE), encode_text(tokenizer, PROMPT + "1")
    limit = len(short)
    assert len(ids) > limit
    scorer = RewardModelScorer(RewardModelSpec("r", str(reward_dir), scope="response"), max_length=limit)
    got = scorer.score([PROMPT, PROMPT], [READABLE, "1"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in (ids[-limit:], short)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert scorer.num_truncated == 1  # only the long one


def test_reward_model_set_weights_the_scores(reward_dir):
    specs = [RewardModelSpec("helpful", str(reward_dir), weight=0.5),
             RewardModelSpec("harmless", str(reward_dir), weight=-2.0, scope="response")]
    with RewardModelSet(specs) as models:
        scores = models.score([PROMPT, PROMPT], [READABLE, "1"])
        assert sorted(scores) == ["harmless", "helpful"]
        summary_scores = RewardModelScorer(specs[0]).score([PROMPT, PROMPT], [READABLE, "1"])
        assert scores["helpful"] == pytest.approx(summary_scores, abs=1e-6)
        total = models.weighted_total(scores)
        expected = [0.5 * h - 2.0 * r for h, r in zip(scores["helpful"], scores["harmless"])]
        assert total == pytest.approx(expected, abs=1e-6)
        with pytest.raises(ValueError, match="no scores for"):
            models.weighted_total({"helpful": [1.0, 2.0]})
    with pytest.raises(ValueError, match="duplicate"):
        RewardModelSet([specs[0], specs[0]])
    with pytest.raises(ValueError, match="scope"):
        RewardModelSpec("x", str(reward_dir), scope="summaries")


def test_check_reward_model_dir_names_the_flag_and_the_problem(base, reward_dir, tmp_path):
    check_reward_model_dir("--reward-model", reward_dir)  # fine
    two_labels = tmp_path / "two_labels"
    shutil.copytree(reward_dir, two_labels)
    config = json.loads((two_labels / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (two_labels / "config.json").write_text(json.dumps(config))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    run_dir = tmp_path / "run"
    shutil.copytree(reward_dir, run_dir / "hf")
    cases = [(base, "causal LM"), (tmp_path / "missing", "does not exist"), (no_config, "no config.json"),
             (two_labels, "num_labels 2"), (run_dir, "run directory keeps its model in")]
    for path, why in cases:
        with pytest.raises(ValueError) as err:
            check_reward_model_dir("--reward-model", path)
        message = str(err.value)
        assert message.startswith(f"--reward-model {path}") and why in message and "\n" not in message, message
    with pytest.raises(ValueError, match="causal LM"):
        RewardModelScorer(RewardModelSpec("policy", str(base)))


# --------------------------------------------------------------------------- preference data
def test_load_preference_pairs_and_its_errors(tmp_path):
    good = tmp_path / "prefs.jsonl"
    good.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"q": "p2", "chosen": "c", "rejected": "d"}\n')
    with pytest.raises(ValueError, match=rf"{good}, line 3: missing field 'prompt'"):
        load_preference_pairs(good)
    cases = [('{"prompt": "p", "chosen": 3, "rejected": "b"}', "line 1: field 'chosen' must be a string"),
             ('{"prompt": "p", "chosen": "a", "rejected": " "}', "line 1: field 'rejected' is empty"),
             ('{"prompt": "p", "chosen": "a"', "line 1: invalid JSON"), ("[1]", "line 1: expected a JSON object")]
    for row, why in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(row + "\n")
        with pytest.raises(ValueError, match=f"{bad}, {why}"):
            load_preference_pairs(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c", "rejected": "d"}\n')
    assert load_preference_pairs(ok) == [PreferencePair("p", "a", "b", f"{ok}:1"), PreferencePair("q", "c", "d", f"{ok}:2")]
    with pytest.raises(FileNotFoundError):
        load_preference_pairs(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- training
def addition_pairs(start: int, count: int) -> list[PreferencePair]:
    """chosen puts the answer in <answer> tags, rejected leaves it bare: learnable from the summary's last tokens."""
    pairs = []
    for k in range(start, start + count):
        a, b = 10 + k % 89, 3 + (7 * k) % 61
        think = f"<think>{a}+{b}={a + b}</think>"
        pairs.append(PreferencePair(f"User: {a}+{b}=?. Assistant:", f"{think} <answer>{a + b}</answer>",
                                    f"{think} so the answer is {a + b}", source=f"synthetic:{k}"))
    return pairs


def test_train_reward_model_learns_the_preference_and_saves_what_it_learned(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, held_out = addition_pairs(0, 64), addition_pairs(500, 32)
    cfg = RewardModelTrainConfig(lr=3e-3, epochs=4, batch_size=16, seed=2, progress=False)
    result = train_reward_model(base, train, tmp_path / "rm", cfg, eval_pairs=held_out)
    assert result["steps"] == 16 and result["eval/accuracy"] > 0.9 and result["eval/accuracy_before"] < 0.5
    assert result["train/loss"] < math.log(2)
    hf_dir = tmp_path / "rm" / "hf"
    check_reward_model_dir("--reward-model", hf_dir)
    assert (hf_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 17))

    # The saved model, read by transformers one text at a time, ranks and separates the pairs as training measured.
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer = load_tokenizer(hf_dir)

    def score(text: str) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([encode_text(tokenizer, text)])).logits[0, 0].item()

    margins = [score(p.prompt + p.chosen.split("</think>")[-1]) - score(p.prompt + p.rejected.split("</think>")[-1])
               for p in held_out]
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(result["eval/accuracy"])
    assert sum(margins) / len(margins) == pytest.approx(result["eval/margin"], abs=1e-4)
    scorer = RewardModelScorer(RewardModelSpec("helpful", str(hf_dir)))
    chosen = scorer.score([p.prompt for p in held_out], [p.chosen for p in held_out])
    rejected = scorer.score([p.prompt for p in held_out], [p.rejected for p in held_out])
    assert [c - r for c, r in zip(chosen, rejected)] == pytest.approx(margins, abs=1e-4)

    # Deterministic from the seed: a second run (one epoch, into the same out dir) is the first one's first epoch.
    again = train_reward_model(base, train, tmp_path / "rm", RewardModelTrainConfig(
        lr=3e-3, epochs=1, batch_size=16, seed=2, progress=False))
    def train_rows(rows):  # an epoch's held-out numbers share its last step's row
        return [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows if "train/loss" in r]

    first_epoch = train_rows(records)[:4]
    rerun = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert train_rows(rerun) == first_epoch and again["steps"] == 4


# --------------------------------------------------------------------------- one scope per reward model (issue 26.3)
def test_a_trained_reward_model_is_scored_on_the_scope_it_was_trained_on(base, tmp_path):
    from r1_engine.engine.config import RewardConfig
    from r1_engine.engine.reward_model import RECORD_FILE, read_record
    from r1_engine.engine.scoring import build_reward_models, check_reward_models

    cfg = RewardModelTrainConfig(lr=1e-3, epochs=1, batch_size=8, seed=0, scope="response", progress=False)
    train_reward_model(base, addition_pairs(0, 8), tmp_path / "rm", cfg)
    hf_dir = tmp_path / "rm" / "hf"
    assert read_record(hf_dir) == {"scope": "response", "input_format": "text"}
    assert RewardModelSpec("helpful", str(hf_dir)).scope == "response"  # no setting: the recorded scope
    assert RewardModelSpec("helpful", str(hf_dir), scope="response").scope == "response"
    with pytest.raises(ValueError, match=rf"trained on scope 'response' \(recorded in {hf_dir / RECORD_FILE}\) but "
                                         r"reward.model_scope gives helpful='summary'"):
        RewardModelSpec("helpful", str(hf_dir), scope="summary")
    # stage 4's RL (RewardConfig.model_scope unset) scores what training read: the whole response
    models = build_reward_models(RewardConfig(models={"helpful": str(hf_dir)}), "cpu", torch.float32)
    assert [s.scope for s in models.specs] == ["response"]
    responses = [READABLE, "<think>9</think> <|summary|> 9"]
    got = models.score([PROMPT] * 2, responses)["helpful"]
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval(), load_tokenizer(hf_dir)
    with torch.no_grad():  # one unpadded text at a time (none holds the pad id)
        expected = [model(input_ids=torch.tensor([encode_text(tokenizer, PROMPT + r)])).logits[0, 0].item()
                    for r in responses]
    assert got == pytest.approx(expected, abs=1e-5)
    models.close()
    with pytest.raises(ValueError, match="trained on scope 'response'"):
        check_reward_models({"helpful": str(hf_dir)}, [], {"helpful": "summary"})
    # a model without a record (off the shelf): the scope given, else summary
    assert RewardModelSpec("x", str(base)).scope == "summary"
    assert RewardModelSpec("x", str(base), scope="response").scope == "response"


def test_r1_scores_its_trained_reward_model_on_the_trained_scope(reward_dir, tmp_path, capsys):
    """recipes/r1: stage 4 and the evaluations read the recorded scope; a contradicting setting is one error."""
    from r1_engine.engine.reward_model import write_record
    from r1_engine.recipes.r1 import main, resolve_config
    from r1_engine.recipes.r1_stages import Pipeline
    from tests.recipes.helpers import one_error_line

    given = tmp_path / "given_rm"  # a reward model trained elsewhere by this engine, given with --...reward.models
    shutil.copytree(reward_dir, given)
    write_record(given, "response")
    line = one_error_line(capsys, main, ["--out", str(tmp_path / "out"), "--all-scenario-rl.reward.models",
                                         "harmless", str(given), "--all-scenario-rl.reward.model-scope", "harmless",
                                         "summary"])
    assert "was trained on scope 'response'" in line and not (tmp_path / "out").exists()

    rm = tmp_path / "rm_hf"
    rm.mkdir()
    write_record(rm, "response")
    cfg, _ = resolve_config(["--out", str(tmp_path / "run"), "--reward-model.scope", "response"])
    assert Pipeline(cfg, None, tmp_path, None).reward_model_scopes({"helpfulness": str(rm)}) == {
        "helpfulness": "response"}
    # naming the trained model's scope is allowed when it agrees, and one clear error when it does not
    cfg, _ = resolve_config(["--out", str(tmp_path / "run"), "--reward-model.scope", "response",
                             "--all-scenario-rl.reward.model-scope", "helpfulness", "response"])
    with pytest.raises(ValueError, match=r"--all-scenario-rl.reward.model-scope helpfulness=summary contradicts "
                                         r"--reward-model.scope response"):
        resolve_config(["--out", str(tmp_path / "run"), "--reward-model.scope", "response",
                        "--all-scenario-rl.reward.model-scope", "helpfulness", "summary"])
    cfg, _ = resolve_config(["--out", str(tmp_path / "run"), "--all-scenario-rl.reward.model-scope",
                             "helpfulness", "summary"])  # a run directory trained earlier on response
    with pytest.raises(ValueError, match="trained on scope 'response'"):
        Pipeline(cfg, None, tmp_path, None).reward_model_scopes({"helpfulness": str(rm)})


# --------------------------------------------------------------------------- off-the-shelf input (issue 26.5)
CHAT = "{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}<|endoftext|>\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_reward_dir(reward_dir, tmp_path_factory) -> Path:
    """The reward model of `reward_dir` with a chat template in its tokenizer and no record: an off-the-shelf one."""
    out = tmp_path_factory.mktemp("chat_rm")
    shutil.copytree(reward_dir, out, dirs_exist_ok=True)
    tokenizer = load_tokenizer(out)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(out)
    assert load_tokenizer(out).chat_template == CHAT
    return out


def test_an_off_the_shelf_reward_model_reads_its_own_chat_template(chat_reward_dir, tmp_path):
    from r1_engine.engine.reward_model import write_record

    question, policy_prompt = "12+35=?", PROMPT  # the raw question, and the policy's templated prompt
    responses = [READABLE, "<think>1+1=3</think> wrong <|summary|> 2+2=4"]
    with RewardModelSet([RewardModelSpec("helpful", str(chat_reward_dir))]) as models:
        assert models.scorers[0].input_format == "chat"
        got = models.score([policy_prompt] * 2, responses, [question] * 2)["helpful"]
        without_questions = models.score([policy_prompt], responses[:1])["helpful"]
    # user turn: the question; assistant turn: the summary, closed by the template's end of turn (<|endoftext|>,
    # the pad id too: the score is read at the last real token before it, as transformers reads an unpadded row)
    expected = [hf_score(chat_reward_dir, f"user> {question}<|endoftext|>\nassistant> {s}<|endoftext|>\n")
                for s in (" so the answer is 47.", " 2+2=4")]
    assert got == pytest.approx(expected, abs=1e-5)
    assert without_questions[0] == pytest.approx(hf_score(
        chat_reward_dir, f"user> {policy_prompt}<|endoftext|>\nassistant>  so the answer is 47.<|endoftext|>\n"),
        abs=1e-5)
    assert abs(got[0] - hf_score(chat_reward_dir, policy_prompt + " so the answer is 47.")) > 1e-3
    # a model trained here records the format it was trained with, and is read that way (no chat template)
    recorded = tmp_path / "recorded"
    shutil.copytree(chat_reward_dir, recorded)
    write_record(recorded, "summary", "text")
    with RewardModelSet([RewardModelSpec("helpful", str(recorded))]) as models:
        assert models.scorers[0].input_format == "text"
        got = models.score([policy_prompt], responses[:1], [question])["helpful"]
    assert got[0] == pytest.approx(hf_score(recorded, policy_prompt + " so the answer is 47."), abs=1e-5)


def test_group_normalisation_puts_reward_model_scores_on_the_rules_scale(reward_dir):
    """The tiny reward model's raw scores spread over several units; z-scored within each prompt's group, the
    general rows' totals have mean 0 and std 1 per group, whatever the head's scale."""
    from r1_engine.engine.rewards import build_reward_composer
    from r1_engine.engine.scoring import NORM_EPS, RolloutScorer

    G = 4
    completions = ["1", " so the answer is 4.", "<think>7+8=15</think> 85", "22",
                   "Hello", "Hi there", "<think>x</think> Hey.", "Good day to you"]
    rules = build_reward_composer({"accuracy": 1.0, "format": 0.5}, num_workers=0)
    with RewardModelSet([RewardModelSpec("helpful", str(reward_dir), weight=2.0)]) as models:
        raw = RolloutScorer(rules, models, {"helpful": 2.0}).score(["general"] * 8, [PROMPT] * 8, completions,
                                                                     [None] * 8, group_size=G)
        normed = RolloutScorer(rules, models, {"helpful": 2.0}, normalization="group").score(
            ["general"] * 8, [PROMPT] * 8, completions, [None] * 8, group_size=G)
    scores = raw.components["helpful"]
    assert raw.total == pytest.approx([2.0 * s for s in scores])
    assert max(scores) - min(scores) > 2.0  # raw logits would outweigh a 0/1 accuracy
    assert normed.components["helpful"] == scores  # the logged component stays the raw score
    for g in range(2):
        group = torch.tensor(scores[g * G:(g + 1) * G], dtype=torch.float64)
        z = (group - group.mean()) / (group.std(unbiased=False) + NORM_EPS)
        assert normed.total[g * G:(g + 1) * G] == pytest.approx((2.0 * z).tolist(), abs=1e-6)
