"""The embedded default's tiny world: tokenizer, corpus, held-out split, and the pretrained base model.

Corpus statistics are recounted from the document text with our own regexes and sums, never from the
generator's bookkeeping."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from r1_engine.recipes.tiny import corpus
from r1_engine.recipes.tiny.corpus import CorpusConfig
from r1_engine.recipes.tiny.pretrain import (
    BASE_DIR,
    ModelShape,
    PretrainConfig,
    ensure_base_model,
    evaluate_base,
    is_valid_base_model,
    pretrain,
)
from r1_engine.recipes.tiny.tokenizer import TEMPLATE_PREFIX, build_tokenizer

QUESTION = re.compile(r"User: What is (\d+) \+ (\d+)\?\. Assistant:")
FINAL_ANSWER = re.compile(r"(?:<answer>(\d+)</answer>|so the answer is (\d+)\.)<\|endoftext\|>$")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_loads_offline_and_round_trips(tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = Path(tokenizer.name_or_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (directory / name).is_file(), name
    reloaded = AutoTokenizer.from_pretrained(directory)
    texts = corpus.pretraining_documents(300, seed=11) + [
        "free text: héllo wörld, 12345 + 0.5 = ? \n\t tabs  and  spaces",
        corpus.r1_zero_prompt("What is {47} + 38?"),
    ]
    for text in texts:
        ids = reloaded.encode(text, add_special_tokens=False)
        assert reloaded.decode(ids, skip_special_tokens=False) == text
    assert reloaded.eos_token == reloaded.pad_token == corpus.EOS_TOKEN
    assert reloaded.eos_token_id == reloaded.pad_token_id


def test_tags_digits_and_template_prefix_are_single_tokens(tokenizer):
    for text in (*corpus.TAGS, corpus.EOS_TOKEN, TEMPLATE_PREFIX, *"0123456789"):
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 1, text
    # No token holds two ASCII digits: every number is spelt digit by digit.
    assert not [token for token in tokenizer.get_vocab() if len(re.findall(r"[0-9]", token)) > 1]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12345", add_special_tokens=False)) == list("12345")
    # Tags stay when special tokens are skipped (rewards read decoded text).
    ids = tokenizer.encode(" <think>1+1=2.</think> <answer>2</answer>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == " <think>1+1=2.</think> <answer>2</answer>"


def test_prompt_tokens_are_a_prefix_of_the_document_tokens(tokenizer):
    """RL scores completions that were generated after the prompt's own tokens, so a document must
    tokenize as prompt tokens + completion tokens (no merge across "Assistant:")."""
    prompt = corpus.r1_zero_prompt("What is 47 + 38?")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(prompt_ids) <= 13  # the fixed template prefix is one token
    assert tokenizer.convert_ids_to_tokens(prompt_ids[0]) == TEMPLATE_PREFIX
    for a, b in ((47, 38), (10, 10), (99, 99), (50, 7 + 10)):
        prompt_ids = tokenizer.encode(corpus.r1_zero_prompt(corpus.question(a, b)), add_special_tokens=False)
        for slip in (False, True):
            for style in corpus.STYLES:
                text = corpus.r1_zero_prompt(corpus.question(a, b)) + corpus.completion(a, b, slip, style)
                ids = tokenizer.encode(text + corpus.EOS_TOKEN, add_special_tokens=False)
                assert ids[: len(prompt_ids)] == prompt_ids
                assert ids[-1] == tokenizer.eos_token_id
                assert 20 <= len(ids) - len(prompt_ids) <= 36  # completion + eos stays short


def test_auto_tokenizer_beside_a_qwen2_config_tokenizes_like_tokenizer_json(tokenizer, tmp_path):
    """transformers swaps in Qwen2Tokenizer (its own pipeline) for a qwen2 model directory: it must
    agree with our tokenizer.json token for token, or the model would be fed text it never saw."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2Config

    build_tokenizer(tmp_path)
    config = Qwen2Config(
        vocab_size=448,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.save_pretrained(tmp_path)
    beside_model = AutoTokenizer.from_pretrained(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = corpus.pretraining_documents(500, seed=5) + ["héllo, 12 + 345 = ? \n x"]
    expected = [encoding.ids for encoding in raw.encode_batch(texts, add_special_tokens=False)]
    assert beside_model(texts, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == expected


def test_engine_template_starts_with_the_tokenizers_prefix_token():
    """The tokenizer folds the template's fixed prefix into one token: a drifted engine template would hand
    the committed base model prompts it never saw."""
    from transformers import AutoTokenizer

    from r1_engine.engine.data import apply_template
    from r1_engine.recipes.tiny.pretrain import BASE_DIR
    from r1_engine.recipes.tiny.tokenizer import TEMPLATE_PREFIX

    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    ids = tok(apply_template("What is 47 + 38?", "r1-zero"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(TEMPLATE_PREFIX)
    assert tok.decode(ids[1:]) == " What is 47 + 38?. Assistant:"


# --------------------------------------------------------------------------- corpus
def test_completions_by_hand():
    assert corpus.completion(47, 38) == " <think>7+8=15, write 5 carry 1. 4+3+1=8.</think> <answer>85</answer>"
    assert corpus.completion(47, 38, slip=True) == " <think>7+8=15, write 5. 4+3=7.</think> <answer>75</answer>"
    assert corpus.completion(97, 38, style="untagged_answer") == (
        " <think>7+8=15, write 5 carry 1. 9+3+1=13. so the answer is 135."
    )
    assert corpus.completion(23, 45, slip=True, style="no_think") == (  # no carry: nothing to forget
        " 3+5=8, write 8. 2+4=6. so the answer is 68."
    )
    assert corpus.completion(60, 40, style="no_close_think") == " <think>0+0=0, write 0. 6+4=10.<answer>100</answer>"
    assert corpus.make_problem(47, 38) == {"prompt": "What is 47 + 38?", "answer": "85"}
    for bad in ((9, 50), (50, 100), (50.0, 20)):
        with pytest.raises(ValueError, match="operand"):
            corpus.make_problem(*bad)
    with pytest.raises(ValueError, match="style"):
        corpus.completion(47, 38, style="bogus")
    with pytest.raises(ValueError, match="slip_rate"):
        CorpusConfig(slip_rate=1.5)


def test_corpus_is_deterministic():
    assert corpus.pretraining_documents(300, seed=3) == corpus.pretraining_documents(300, seed=3)
    assert corpus.pretraining_documents(300, seed=3) != corpus.pretraining_documents(300, seed=4)
    assert corpus.rl_prompts(50, seed=9) == corpus.rl_prompts(50, seed=9)
    assert corpus.eval_prompts() == corpus.eval_prompts()
    with pytest.raises(ValueError, match="rl_prompts"):
        corpus.rl_prompts(10**6)


def test_shipped_data_files_regenerate_identically(tmp_path):
    train_path, eval_path = corpus.write_data_files(tmp_path)
    for fresh, shipped in ((train_path, corpus.DATA_DIR / "train.jsonl"), (eval_path, corpus.DATA_DIR / "eval.jsonl")):
        assert fresh.read_bytes() == shipped.read_bytes(), shipped
    rows = [json.loads(line) for line in (corpus.DATA_DIR / "train.jsonl").read_text().splitlines()]
    assert len(rows) == corpus.TRAIN_SIZE and len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
        assert row["answer"] == str(a + b)


def test_held_out_pairs_never_appear_in_training():
    eval_rows = [json.loads(line) for line in (corpus.DATA_DIR / "eval.jsonl").read_text().splitlines()]
    assert len(eval_rows) == corpus.EVAL_SIZE == len({row["prompt"] for row in eval_rows})
    held_out = set()
    for row in eval_rows:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
        assert row["answer"] == str(a + b)
        held_out |= {(a, b), (b, a)}  # the swapped question is held out too
    train_rows = [json.loads(line) for line in (corpus.DATA_DIR / "train.jsonl").read_text().splitlines()]
    train_rows += corpus.rl_prompts(3000, seed=1)
    for row in train_rows:
        pair = tuple(map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups()))
        assert pair not in held_out
    seen = set()
    for text in corpus.pretraining_documents(20_000, seed=0):
        pair = tuple(map(int, QUESTION.search(text).groups()))
        assert pair not in held_out
        seen.add(pair)
    assert len(seen) > 5000  # the documents do cover the training pairs


@pytest.mark.parametrize("config", [CorpusConfig(), CorpusConfig(slip_rate=0.15, no_think_rate=0.2)])
def test_slip_and_tag_rates_match_the_config(config):
    """Recount slips (answer != a + b) and broken tags from the text alone."""
    n = 20_000
    carry_docs = slipped = no_think = no_close = untagged = 0
    for text in corpus.pretraining_documents(n, seed=123, config=config):
        a, b = map(int, QUESTION.search(text).groups())
        answer = FINAL_ANSWER.search(text)
        assert answer is not None, text
        value = int(answer.group(1) or answer.group(2))
        completion = text.split("Assistant:", 1)[1]
        if (a % 10) + (b % 10) >= 10:
            carry_docs += 1
            if value != a + b:
                slipped += 1
                assert value == a + b - 10, text  # the slip is the forgotten carry, nothing else
        else:
            assert value == a + b, text
        if "<think>" not in completion:
            no_think += 1
            assert "<answer>" not in completion
        elif "</think>" not in completion:
            no_close += "<answer>" in completion
            untagged += "<answer>" not in completion
    assert abs(slipped / carry_docs - config.slip_rate) < 0.02
    assert abs(no_think / n - config.no_think_rate) < 0.01
    tagged_docs = n - no_think
    assert abs(no_close / tagged_docs - config.no_close_think_rate) < 0.015
    assert abs(untagged / tagged_docs - config.untagged_answer_rate) < 0.015
    assert 0.4 < carry_docs / n < 0.5  # 45 of the 100 units pairs carry


# --------------------------------------------------------------------------- the committed base model
def test_committed_checkpoint_is_the_stated_qwen2():
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert is_valid_base_model(BASE_DIR), f"{BASE_DIR} is missing or was pretrained with other settings"
    assert sum(f.stat().st_size for f in BASE_DIR.iterdir()) <= 20 * 2**20
    config = AutoConfig.from_pretrained(BASE_DIR)
    shape = ModelShape()
    assert config.model_type == "qwen2"
    assert (config.hidden_size, config.num_hidden_layers) == (shape.hidden_size, shape.num_layers)
    assert (config.num_attention_heads, config.num_key_value_heads) == (shape.num_heads, shape.num_kv_heads)
    assert config.intermediate_size == shape.intermediate_size and config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert config.eos_token_id == tokenizer.eos_token_id
    with safe_open(str(BASE_DIR / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR)
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert ensure_base_model(BASE_DIR) == BASE_DIR  # valid: returned as is, nothing rebuilt
    # The tokenizer as consumers load it matches tokenizer.json (and so the one the model trained with).
    from tokenizers import Tokenizer

    texts = corpus.pretraining_documents(200, seed=8)
    raw = Tokenizer.from_file(str(BASE_DIR / "tokenizer.json"))
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [
        encoding.ids for encoding in raw.encode_batch(texts, add_special_tokens=False)
    ]


def test_committed_checkpoint_knows_the_procedure_but_leaves_room_for_rl():
    torch.manual_seed(0)
    greedy = evaluate_base(BASE_DIR, n=100, temperature=0.0, samples_per_prompt=1)
    assert greedy["pass_at_1"] >= 0.9 and greedy["format_rate"] >= 0.9  # the majority path is right
    sampled = evaluate_base(BASE_DIR, n=200, temperature=1.0, samples_per_prompt=1, seed=1)
    assert 0.3 <= sampled["pass_at_1"] <= 0.65
    assert 0.4 <= sampled["format_rate"] <= 0.8
    assert sampled["carry_procedure_rate"] >= 0.4


# --------------------------------------------------------------------------- pretraining
def test_short_pretraining_lowers_the_loss_deterministically(tmp_path):
    config = PretrainConfig(
        steps=30,
        batch_size=16,
        lr=1e-2,
        warmup_steps=5,
        threads=1,  # a busy 2-core machine makes 2 threads wait on each other
        model=ModelShape(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
    )
    first = pretrain(config, tmp_path / "a", progress=False)
    second = pretrain(config, tmp_path / "b", progress=False)
    assert first["losses"] == second["losses"]  # same seed, same curve
    losses = first["losses"]
    assert losses[0] > 5.5  # about ln(vocab) at random init
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5
    assert is_valid_base_model(tmp_path / "a", config) and not is_valid_base_model(tmp_path / "a")
    # Reloaded from disk, the model scores fresh documents about as well as it trained: what was
    # saved (weights and tokenizer) is what was trained.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1_engine.recipes.tiny.pretrain import _batch

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    rows = tokenizer(corpus.pretraining_documents(64, seed=77), add_special_tokens=False)["input_ids"]
    input_ids, attention_mask, labels = _batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()
    assert abs(fresh - sum(losses[-5:]) / 5) < 0.25
    weights = tmp_path / "a" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_base_model(tmp_path / "a", config) == tmp_path / "a"
    assert weights.stat().st_mtime_ns == stamp  # not retrained
    assert not (tmp_path / "a.partial").exists()
