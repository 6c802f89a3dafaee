"""engine.data: the template, file validation (every error names file, row and field), the dataset's
counted skips, the deterministic resumable sampler, and tokenizer checks. The tokenizer is a
character-level one built here (one token per character), so token counts are known exactly."""
import json
import sys
import types

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from r1_engine.engine.data import (
    R1_ZERO_TEMPLATE, PromptDataset, PromptExample, PromptSampler, apply_template, check_tokenizer_fits,
    load_prompts, load_tokenizer,
)

# Typed from GRPO_SPEC.md, independently of engine/data.py.
SPEC_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

CHARS = [chr(c) for c in range(32, 127)] + ["\n", "é", "{", "}"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()  # decode joins characters back without spaces (PromptDataset checks it)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    return tokenizer


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


# ---------------------------------------------------------------------------------------------------
# Template


def test_r1_zero_template_is_the_spec_text():
    assert R1_ZERO_TEMPLATE == SPEC_TEMPLATE
    question = r"What is \boxed{2+2}? {x}"
    assert apply_template(question) == SPEC_TEMPLATE.split("{prompt}")[0] + question + ". Assistant:"
    assert apply_template(question, "none") == question
    assert apply_template("7*6", "Q: {prompt}\nA:") == "Q: 7*6\nA:"


def test_chat_template_uses_the_tokenizer():
    assert apply_template("hi", "chat", char_tokenizer()) == "<user>hi<assistant>"
    with pytest.raises(ValueError, match="chat"):
        apply_template("hi", "chat")
    with pytest.raises(ValueError, match="unknown template 'r1'"):
        apply_template("hi", "r1")


# ---------------------------------------------------------------------------------------------------
# Loading and validation


def test_load_prompts_reads_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "1+1?", "answer": "2"}),
        "",
        json.dumps({"prompt": "héllo", "answer": 42, "extra": [1]}),
    ])
    examples = load_prompts(path)
    assert examples == [
        PromptExample(prompt="1+1?", answer="2", index=0, source=f"{path}:1"),
        PromptExample(prompt="héllo", answer="42", index=1, source=f"{path}:3"),
    ]
    custom = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "x?", "solution": "y"})])
    assert load_prompts(custom, prompt_key="question", answer_key="solution")[0].answer == "y"
    no_answer = write_jsonl(tmp_path / "r.jsonl", [json.dumps({"prompt": "say hi"})])
    assert load_prompts(no_answer, require_answer=False)[0].answer is None
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "q", "answer": "a"}).encode() + b"\n")
    assert load_prompts(with_bom)[0].prompt == "q"


BAD_ROWS = [
    # (bad line, expected message fragment after "line 2", field named)
    (json.dumps({"answer": "1"}), "missing field 'prompt'"),
    (json.dumps({"prompt": "   ", "answer": "1"}), "field 'prompt' is empty"),
    (json.dumps({"prompt": 5, "answer": "1"}), "field 'prompt' must be a string, got int"),
    (json.dumps({"prompt": "q"}), "field 'answer' is missing"),
    (json.dumps({"prompt": "q", "answer": None}), "field 'answer' is null"),
    (json.dumps({"prompt": "q", "answer": [1]}), "field 'answer' must be a string or a number"),
    (json.dumps({"prompt": "q", "answer": True}), "field 'answer' must be a string or a number"),
    ('{"prompt": "q", "answer": ', "invalid JSON"),
    (json.dumps(["q", "a"]), "expected a JSON object"),
    (json.dumps({"prompt": "q", "answer": "  "}), "field 'answer' cannot be used as a reference answer: it is empty"),
    (json.dumps({"prompt": "q", "answer": "\\frac{1}{2"}), "its braces are unbalanced"),
    (json.dumps({"prompt": "q", "answer": "x}{"}), "its braces are unbalanced"),
    (b'{"prompt": "caf\xe9", "answer": "1"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad_line, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "answer": "1"}), bad_line])
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    text = str(err.value)
    assert str(path) in text and "line 2" in text and message in text, text


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="p.csv.*unsupported"):
        load_prompts(csv)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        load_prompts(empty)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"p\.parquet needs pyarrow"):
        load_prompts(path)


def test_parquet_rows_are_validated_with_row_numbers(tmp_path, monkeypatch):
    """Exercises the parquet path with a stand-in pyarrow (the real one is optional)."""
    rows = [{"prompt": "a?", "answer": "1"}, {"prompt": "", "answer": "2"}]

    class Table:
        column_names = ["prompt", "answer"]

        def select(self, columns):
            assert columns == ["prompt", "answer"]
            return self

        def to_pylist(self):
            return rows

    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = lambda path: Table()
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", pyarrow)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"p\.parquet, row 2: field 'prompt' is empty"):
        load_prompts(path)
    rows[1]["prompt"] = "b?"
    assert [e.prompt for e in load_prompts(path)] == ["a?", "b?"]
    assert load_prompts(path)[1].source == f"{path}:2"


# ---------------------------------------------------------------------------------------------------
# Dataset


def examples(n):
    return [PromptExample(prompt="q" * (i + 1), answer=str(i), index=i, source=f"gen.jsonl:{i + 1}") for i in range(n)]


def test_dataset_tokenises_with_the_template_and_counts_skips():
    tokenizer = char_tokenizer()
    data = examples(6)  # prompts of 1..6 characters
    base = len(apply_template("", "r1-zero"))
    with pytest.warns(UserWarning, match="gen.jsonl: skipped 2 of 6 prompts"):
        dataset = PromptDataset(data, tokenizer, "r1-zero", max_prompt_tokens=base + 4)
    assert dataset.num_skipped_too_long == 2 and len(dataset) == 4
    item = dataset[3]
    assert item.example is data[3] and item.text == apply_template("qqqq")
    assert item.prompt_ids == [tokenizer.convert_tokens_to_ids(ch) for ch in item.text]
    everything = PromptDataset(data, tokenizer, "none")
    assert everything.num_skipped_too_long == 0 and len(everything[5].prompt_ids) == 6
    with pytest.raises(ValueError, match="no prompts left"), pytest.warns(UserWarning):
        PromptDataset(data, tokenizer, "r1-zero", max_prompt_tokens=5)


# ---------------------------------------------------------------------------------------------------
# Sampler


def draw(sampler, batches):
    return [sampler.next_batch() for _ in range(batches)]


def test_sampler_epochs_are_reshuffled_permutations():
    sampler = PromptSampler(list(range(12)), batch_size=4, seed=7)
    epoch0, epoch1 = sum(draw(sampler, 3), []), sum(draw(sampler, 3), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    assert sampler.state_dict() == {"seed": 7, "epoch": 2, "position": 0, "dataset_size": 12}


def test_sampler_is_deterministic_and_seed_dependent():
    a = draw(PromptSampler(list(range(10)), 3, seed=1), 7)
    b = draw(PromptSampler(list(range(10)), 3, seed=1), 7)
    c = draw(PromptSampler(list(range(10)), 3, seed=2), 7)
    assert a == b and a != c
    assert all(len(batch) == 3 for batch in a)
    # Batches run across epoch boundaries without dropping anything: the first 10 draws are epoch 0.
    assert sorted(sum(a, [])[:10]) == list(range(10))


@pytest.mark.parametrize("stop_after", [0, 2, 3, 5])
def test_resumed_sampler_sees_the_same_prompts(stop_after):
    reference = PromptSampler(list(range(10)), 4, seed=3)
    expected = draw(reference, 8)
    first = PromptSampler(list(range(10)), 4, seed=3)
    seen = draw(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PromptSampler(list(range(10)), 4, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert seen + draw(resumed, 8 - stop_after) == expected


def test_sampler_rejects_a_state_for_another_dataset():
    state = PromptSampler(list(range(10)), 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="saved for 10 prompts but the dataset has 11"):
        PromptSampler(list(range(11)), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PromptSampler(list(range(10)), 4).load_state_dict({"seed": 0})


def test_sampler_over_a_prompt_dataset():
    dataset = PromptDataset(examples(5), char_tokenizer(), "none")
    batch = PromptSampler(dataset, 3, seed=0).next_batch()
    assert len(batch) == 3 and len({item.example.index for item in batch}) == 3
    assert all(len(item.prompt_ids) == len(item.example.prompt) for item in batch)


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def test_check_tokenizer_fits():
    tokenizer = char_tokenizer()
    size = len(tokenizer.get_vocab())
    check_tokenizer_fits(tokenizer, size, "models/tiny")
    check_tokenizer_fits(tokenizer, size + 64, "models/tiny")  # padded embedding rows are fine
    message = f"models/tiny: the tokenizer has token ids up to {size - 1}.*vocab_size is {size - 1}"
    with pytest.raises(ValueError, match=message):
        check_tokenizer_fits(tokenizer, size - 1, "models/tiny")
    check_tokenizer_fits(tokenizer.backend_tokenizer, size, "raw")  # a raw tokenizers.Tokenizer too
    with pytest.raises(ValueError, match="raw"):
        check_tokenizer_fits(tokenizer.backend_tokenizer, 10, "raw")


def test_load_tokenizer(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path / "full")
    loaded = load_tokenizer(tmp_path / "full")
    assert loaded.encode("a+b=c", add_special_tokens=False) == tokenizer.encode("a+b=c", add_special_tokens=False)
    assert loaded.eos_token_id == 0
    (tmp_path / "bare").mkdir()
    tokenizer.backend_tokenizer.save(str(tmp_path / "bare" / "tokenizer.json"))
    bare = load_tokenizer(tmp_path / "bare")
    assert bare.encode("xy", add_special_tokens=False) == tokenizer.encode("xy", add_special_tokens=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_real_parquet_round_trip_and_row_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["What is 1 + 2?", "What is 3 + 4?"], "answer": ["3", "7"]}), good)
    examples = load_prompts(good)
    assert [(e.prompt, e.answer) for e in examples] == [("What is 1 + 2?", "3"), ("What is 3 + 4?", "7")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["ok", ""], "answer": ["1", "2"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*2.*'prompt' is empty"):
        load_prompts(bad)
