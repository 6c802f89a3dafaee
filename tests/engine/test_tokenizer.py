"""engine.data.load_tokenizer loads the tokenizer a model directory's files describe, never one rebuilt from
config.json's model_type, and check_tokenizer_round_trip stops a run whose tokenizer loses prompt text.

The tokenizer is built here: character-level (WordLevel + a one-character Split pre-tokenizer), saved by
PreTrainedTokenizerFast.save_pretrained. Its ids are the raw `tokenizers` ids, computed independently.
transformers 5's AutoTokenizer turns it into a Qwen2Tokenizer (qwen2 dirs) or a LlamaTokenizer (llama dirs
whose tokenizer_config.json names LlamaTokenizerFast, as transformers 4 saved them), which drop spaces and
newlines: the tests below fail with such a loader."""
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1_engine.engine.data import (
    ROUND_TRIP_PROMPTS, PromptDataset, apply_template, check_tokenizer_round_trip, load_prompts, load_tokenizer,
)
from r1_engine.parallel.convert import copy_tokenizer_files

ROOT = Path(__file__).resolve().parents[2]
TINY_BASE = ROOT / "recipes" / "tiny" / "base"
EOS, UNK = "<|endoftext|>", "<unk>"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
TEXTS = ["Q: 82+57\nA: ", "  two  spaces\n\nand lines ", "x"]
# (config.json model_type, tokenizer_config.json tokenizer_class; None: as save_pretrained wrote it)
DIRS = [("qwen2", None), ("qwen2", "Qwen2TokenizerFast"), ("llama", "LlamaTokenizerFast")]


def char_backend(normalizer=None, vocab_chars=CHARS) -> Tokenizer:
    vocab = {EOS: 0, UNK: 1}
    for ch in vocab_chars:
        vocab.setdefault(ch, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." skips newlines
    raw.decoder = decoders.Fuse()
    return raw


def raw_ids(text: str) -> list[int]:
    return char_backend().encode(text, add_special_tokens=False).ids


def write_model_dir(path: Path, model_type: str, tokenizer_class: str | None = None, weights: bool = False) -> Path:
    """A model dir with the character tokenizer (+ chat_template.jinja); config only, or a tiny random model."""
    fast = PreTrainedTokenizerFast(tokenizer_object=char_backend(), eos_token=EOS, pad_token=EOS, unk_token=UNK)
    fast.chat_template = CHAT
    fast.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file() and (path / "tokenizer.json").is_file()
    if tokenizer_class is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    if not weights:
        (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 128}))
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_class, model_class = classes[model_type]
    torch.manual_seed(0)
    config = config_class(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=256, eos_token_id=0, bos_token_id=0)
    model_class(config).save_pretrained(path)
    return path


def old_loader(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("model_type,tokenizer_class", DIRS)
def test_loads_the_files_own_tokenizer(tmp_path, model_type, tokenizer_class):
    model_dir = write_model_dir(tmp_path / "m", model_type, tokenizer_class)
    tokenizer = load_tokenizer(model_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == raw_ids(text) and len(ids) == len(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("Q: 8") == [CHARS.index(c) + 2 for c in "Q: 8"]  # no BOS or other added ids
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 0, 1)
    assert tokenizer.chat_template == CHAT
    chat = apply_template("82+57", "chat", tokenizer)
    assert chat == "user: 82+57\nassistant: "
    check_tokenizer_round_trip(tokenizer, TEXTS + [chat], model_dir)
    # What the old AutoTokenizer-based loader returned for this very directory: spaces and newlines gone.
    assert old_loader(model_dir).encode(TEXTS[0], add_special_tokens=False) != raw_ids(TEXTS[0])


def test_chat_template_inside_tokenizer_config_is_kept(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "qwen2")
    (model_dir / "chat_template.jinja").unlink()
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    assert load_tokenizer(model_dir).chat_template == CHAT


def test_without_tokenizer_json_the_named_class_loads_the_slow_files(tmp_path):
    """vocab.json + merges.txt only: the class tokenizer_config.json names builds the tokenizer."""
    shipped = json.loads((TINY_BASE / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(shipped["model"]["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in shipped["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer", "eos_token": EOS}))
    tokenizer = load_tokenizer(tmp_path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    reference = Tokenizer.from_file(str(TINY_BASE / "tokenizer.json"))
    text = "7+8=15 and 23+19=42"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token_id == reference.token_to_id(EOS)


def test_unloadable_files_are_one_line_naming_the_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: cannot load the tokenizer with TokenizersBackend: ")
    assert "\n" not in str(err.value)
    # A tokenizer.json the Rust library rejects (it raises a bare Exception) is one line too.
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {
        "type": "BPE", "vocab": 3}}))
    where = re.escape(str(tmp_path))
    with pytest.raises(ValueError, match=rf"^{where}: cannot load the tokenizer with TokenizersBackend: invalid"):
        load_tokenizer(tmp_path)


def test_tiny_base_round_trips_its_prompts():
    tokenizer = load_tokenizer(TINY_BASE)
    reference = Tokenizer.from_file(str(TINY_BASE / "tokenizer.json"))
    texts = [apply_template(e.prompt) for name in ("train.jsonl", "eval.jsonl")
             for e in load_prompts(TINY_BASE.parent / "data" / name)]
    check_tokenizer_round_trip(tokenizer, texts, TINY_BASE)
    for text in texts[:50]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == reference.token_to_id(EOS)


# ---------------------------------------------------------------------------------------------------
# The round-trip check


def test_round_trip_check_names_dir_source_and_first_difference(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "qwen2")
    lossy = old_loader(model_dir)
    with pytest.raises(ValueError) as err:
        check_tokenizer_round_trip(lossy, ["x", TEXTS[0]], model_dir, sources=["p.jsonl:1", "p.jsonl:2"])
    # "Q: 82+57\nA: " came back as "Q:82+57A:": they part at char 2.
    assert str(err.value) == (f"{model_dir}: the tokenizer does not round-trip the prompt text of p.jsonl:2: first "
                              f"difference at char 2: expected ' 82+57\\nA: ', got '82+57A:' "
                              f"(the text starts 'Q: 82+57\\nA: ')")
    with pytest.raises(ValueError, match=r"^where: .* of text 1: first difference at char 1: expected ' b', got 'b'"):
        check_tokenizer_round_trip(lossy, ["a b"], "where")


def test_round_trip_check_allows_the_tokenizers_own_normaliser():
    lower = char_backend(normalizers.Lowercase(), vocab_chars=[c for c in CHARS if c != "z"])
    check_tokenizer_round_trip(lower, ["Hello World"], "lower")  # decodes "hello world": normalised, kept
    # A real loss is still reported, against the normalised text (the reading that agrees longest).
    with pytest.raises(ValueError, match=r"of text 1: first difference at char 1: expected 'zb', got '<unk>b'"):
        check_tokenizer_round_trip(lower, ["AzB"], "lower")
    no_h = char_backend(vocab_chars=[c for c in CHARS if c != "H"])  # no normaliser: the raw text is expected
    with pytest.raises(ValueError, match=r"of text 1: first difference at char 0: expected 'Hi', got '<unk>i'"):
        check_tokenizer_round_trip(no_h, ["Hi"], "no_h")


def test_round_trip_check_ignores_added_bos_and_keeps_special_tokens():
    with_bos = char_backend()
    with_bos.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 0)])
    with_bos.add_special_tokens([EOS])
    assert with_bos.encode("ab").ids[0] == 0  # a BOS really is added by default
    check_tokenizer_round_trip(with_bos, ["ab", f"ab{EOS}c"], "bos")  # special tokens in the text decode back


def test_round_trip_check_sees_ids_not_decode_clean_up():
    """clean_up_tokenization_spaces is a cosmetic of decode ("a , b" -> "a, b"); the ids keep the text."""
    cleaning = PreTrainedTokenizerFast(tokenizer_object=char_backend(), clean_up_tokenization_spaces=True)
    text = "a , b ."
    assert cleaning.decode(cleaning.encode(text)) == "a, b."
    check_tokenizer_round_trip(cleaning, [text], "cleaning")


# ---------------------------------------------------------------------------------------------------
# The dataset, the export, the trainer


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def test_prompt_dataset_checks_its_first_prompts(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "qwen2")
    examples = load_prompts(write_prompts(tmp_path / "p.jsonl", ["82+57", "3 + 4", "1\n2"]))
    dataset = PromptDataset(examples, load_tokenizer(model_dir), "Q: {prompt}\nA: ")
    for item in dataset.items:
        assert item.prompt_ids == raw_ids(item.text) and item.text.startswith("Q: ")
    where, source = re.escape(str(model_dir)), re.escape(str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match=rf"^{where}: .* of {source}:1: first difference at char 2"):
        PromptDataset(examples, old_loader(model_dir), "Q: {prompt}\nA: ")
    # Only the first ROUND_TRIP_PROMPTS are checked: a loss in a later prompt alone passes.
    tokenizer = load_tokenizer(model_dir)
    late = load_prompts(write_prompts(tmp_path / "late.jsonl", ["1"] * ROUND_TRIP_PROMPTS + ["\u00e9"]))
    assert len(PromptDataset(late, tokenizer, "none")) == ROUND_TRIP_PROMPTS + 1
    early = load_prompts(write_prompts(tmp_path / "early.jsonl", ["1"] * (ROUND_TRIP_PROMPTS - 1) + ["\u00e9"]))
    with pytest.raises(ValueError, match=rf"early.jsonl:{ROUND_TRIP_PROMPTS}: first difference at char 0"):
        PromptDataset(early, tokenizer, "none")


def test_export_carries_the_shipped_tokenizer_files(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "llama", "LlamaTokenizerFast")
    (model_dir / "additional_chat_templates").mkdir()
    (model_dir / "additional_chat_templates" / "tool.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_tokenizer_files(model_dir, out)
    shipped = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "additional_chat_templates"}
    assert set(copied) >= shipped
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    assert (out / "additional_chat_templates" / "tool.jinja").read_text() == "{{ messages }}"
    shutil.copy(model_dir / "config.json", out / "config.json")
    exported = load_tokenizer(out)
    assert [exported.encode(t, add_special_tokens=False) for t in TEXTS] == [raw_ids(t) for t in TEXTS]
    assert exported.chat_template == {"default": CHAT, "tool": "{{ messages }}"}  # the named one is read too
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        copy_tokenizer_files(tmp_path / "none", out)


@pytest.mark.parametrize("model_type,tokenizer_class", [DIRS[0], DIRS[2]])
def test_a_run_trains_on_the_prompts_as_written(tmp_path, model_type, tokenizer_class):
    """The trainer, its rollout engine and its eval set share the one tokenizer; every prompt decodes back."""
    import dataclasses

    from r1_engine.engine.trainer import GRPOTrainer
    from tests.engine._trainer_common import tiny_config

    model_dir = write_model_dir(tmp_path / "m", model_type, tokenizer_class, weights=True)
    prompts = ["82+57", "3 + 4 =", "  12\n+ 30"]
    examples = load_prompts(write_prompts(tmp_path / "p.jsonl", prompts))
    cfg = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template="Q: {prompt}\nA: "))
    trainer = GRPOTrainer(cfg, model_dir, examples, examples)
    try:
        assert trainer.rollout_engine.tokenizer is trainer.tokenizer
        for dataset in (trainer.train_set, trainer.eval_set):
            texts = [apply_template(p, cfg.data.template) for p in prompts]
            assert [item.text for item in dataset.items] == texts
            assert [item.prompt_ids for item in dataset.items] == [raw_ids(t) for t in texts]
            assert [trainer.tokenizer.decode(item.prompt_ids) for item in dataset.items] == texts
    finally:
        trainer.close()


def test_vllm_backend_refuses_a_tokenizer_other_than_the_files(tmp_path):
    """vLLM builds its own tokenizer from the directory (AutoTokenizer rules): the engine compares its ids with the
    trainer's on a probe and stops with one line when they differ (the check runs without vLLM installed)."""
    from r1_engine.engine.rollout.vllm import check_same_tokenizer

    model_dir = write_model_dir(tmp_path / "m", "qwen2")
    ours = load_tokenizer(model_dir)
    check_same_tokenizer(load_tokenizer(model_dir), ours, model_dir)  # the same files: accepted
    with pytest.raises(ValueError, match=r"m: vLLM's tokenizer \(Qwen2Tokenizer\) gives other ids") as err:
        check_same_tokenizer(old_loader(model_dir), ours, model_dir)
    assert "\n" not in str(err.value).replace("\\n", "")
