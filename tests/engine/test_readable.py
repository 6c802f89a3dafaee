"""The readable format (engine/readable.py): the layout helpers on hand-made texts, and add_readable_tokens on tiny
Qwen2 directories (tied / untied, with and without a vocabulary resize, single file and sharded), checked against
transformers' own loading, float64 forwards of the original model and means computed here from its weights."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r1_engine.engine.data import check_tokenizer_fits, load_tokenizer
from r1_engine.engine.readable import (
    READABLE_TOKENS,
    REASONING_TOKEN,
    SUMMARY_TOKEN,
    add_readable_tokens,
    readable_completion,
    split_readable,
    summary_of,
)

R, S = REASONING_TOKEN, SUMMARY_TOKEN
TEXT = "Q: 82+57\nA: <think>8+5=13, carry 1</think> <answer>139</answer>"  # no markers


# --------------------------------------------------------------------------- the layout
def test_readable_completion_and_split():
    text = readable_completion("8+5=13.", " So \\boxed{13}.")
    assert text == "<|reasoning|>8+5=13.<|summary|> So \\boxed{13}."
    assert split_readable(text) == ("8+5=13.", " So \\boxed{13}.")
    assert split_readable(" \n" + text) == ("8+5=13.", " So \\boxed{13}.")  # whitespace before the marker is fine


@pytest.mark.parametrize("text", [
    "plain text",
    f"{R}reasoning only",
    f"{S}summary only",
    f"{S}s{R}r",  # wrong order
    f"{R}a{R}b{S}c",  # a marker twice
    f"{R}a{S}b{S}c",
    f"Sure! {R}a{S}b",  # text before the reasoning marker
])
def test_split_readable_rejects(text):
    assert split_readable(text) is None


@pytest.mark.parametrize("response, expected", [
    (f"{R}think{S} The answer is 4.", " The answer is 4."),
    (f"{R}a{S}b{S}c", "c"),  # the last summary marker
    ("<think>r</think><answer>4</answer>", "<answer>4</answer>"),  # R1-Zero: the answer part
    ("<think>a</think>b</think>c", "c"),
    ("just an answer", "just an answer"),
    (f"<think>r</think>x{S}y", "y"),  # the summary marker wins over </think>
])
def test_summary_of(response, expected):
    assert summary_of(response) == expected


# --------------------------------------------------------------------------- add_readable_tokens
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from r1_engine.recipes.tiny.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


def write_model(out: Path, tokenizer_dir: Path, *, tie: bool, vocab: int | None, shard_bytes: int | None = None,
                seed: int = 0) -> Path:
    """A tiny Qwen2 with the tiny world's tokenizer; vocab None: the tokenizer's size, no padding rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    tok = load_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    kwargs = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    model.save_pretrained(out, **kwargs)
    return out


def load_f64(model_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


CASES = {  # name: (tied, config vocab (None: the tokenizer's 416, so the two new ids need a resize), shard bytes)
    "tied-padded": (True, 448, None),
    "untied-padded": (False, 448, None),
    "tied-resize": (True, None, None),
    "untied-resize-sharded": (False, None, 40_000),
}


@pytest.mark.parametrize("case", CASES)
def test_add_readable_tokens(tmp_path, tokenizer_dir, case):
    tie, vocab, shard_bytes = CASES[case]
    src = write_model(tmp_path / "src", tokenizer_dir, tie=tie, vocab=vocab, shard_bytes=shard_bytes)
    if shard_bytes is not None:
        assert (src / "model.safetensors.index.json").is_file()
    old_tok = load_tokenizer(src)
    old_size = len(old_tok)
    assert old_size == 416
    out = add_readable_tokens(src, tmp_path / "out")
    assert out == tmp_path / "out" and not list(tmp_path.glob(".out.tmp*"))

    # The tokenizer: each marker one special id, the old ids and texts unchanged.
    tok = load_tokenizer(out)
    new_ids = [old_size, old_size + 1]
    for token, new_id in zip(READABLE_TOKENS, new_ids):
        assert tok.encode(token, add_special_tokens=False) == [new_id]
        assert token in tok.all_special_tokens
    assert tok.encode(TEXT, add_special_tokens=False) == old_tok.encode(TEXT, add_special_tokens=False)
    text = readable_completion(" 8+5=13", " \\boxed{13}")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == new_ids[0] and new_ids[1] in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == " 8+5=13 \\boxed{13}"  # special, unlike the R1-Zero tags

    # The config: resized to the next multiple of 64 only when the new ids did not fit.
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 448
    check_tokenizer_fits(tok, config["vocab_size"], out)
    src_config = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "vocab_size"} == \
        {k: v for k, v in src_config.items() if k != "vocab_size"}

    # The weights: old rows bit for bit, new id rows (and added padding rows) the float64 mean of the used rows.
    old, new = load_f64(src), load_f64(out)
    old_vocab = src_config["vocab_size"]
    used = torch.tensor(sorted(old_tok.get_vocab().values()))
    mean_rows = torch.tensor(new_ids + list(range(old_vocab, 448)))
    keep_rows = torch.tensor([i for i in range(old_vocab) if i not in new_ids])
    layers = [("embed", lambda m: m.model.embed_tokens.weight)]
    if not tie:
        layers.append(("lm_head", lambda m: m.lm_head.weight))
    else:
        assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    for _, get in layers:
        old_w, new_w = get(old).detach(), get(new).detach()
        assert new_w.shape == (448, 32)
        assert torch.equal(new_w[keep_rows], old_w[keep_rows])
        # the checkpoint is float32: the mean is computed in float64 and stored in float32
        expected = old_w.float()[used].double().mean(0).float().double()
        assert torch.equal(new_w[mean_rows], expected.expand(len(mean_rows), -1))
    if not tie:  # the two matrices got their own means
        assert not torch.equal(new.lm_head.weight[new_ids[0]], new.model.embed_tokens.weight[new_ids[0]])

    # Old ids' logits on a text without markers are unchanged.
    x = torch.tensor([old_tok.encode(TEXT, add_special_tokens=False)])
    with torch.no_grad():
        old_logits, new_logits = old(input_ids=x).logits, new(input_ids=x).logits
    torch.testing.assert_close(new_logits[..., keep_rows], old_logits[..., keep_rows], rtol=0, atol=1e-12)

    if shard_bytes is not None:  # the index still maps every tensor, and its total size is the new one
        index = json.loads((out / "model.safetensors.index.json").read_text())
        total = sum(p.numel() * 4 for p in new.state_dict().values()) - (0 if not tie else 448 * 32 * 4)
        assert index["metadata"]["total_size"] == total
        assert set(index["weight_map"]) == set(json.loads((src / "model.safetensors.index.json").read_text())
                                              ["weight_map"])

    # Running it again adds nothing and changes nothing.
    again = add_readable_tokens(out, tmp_path / "again")
    assert len(load_tokenizer(again)) == len(tok) == 418
    assert json.loads((again / "config.json").read_text()) == config
    for name in [p.name for p in out.glob("*.safetensors")]:
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_add_readable_tokens_keeps_other_files(tmp_path, tokenizer_dir):
    src = write_model(tmp_path / "src", tokenizer_dir, tie=True, vocab=448)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = add_readable_tokens(src, tmp_path / "out")
    for name in ("chat_template.jinja", "generation_config.json", "config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["additional_special_tokens"] == list(READABLE_TOKENS)
    src_tok_config = json.loads((src / "tokenizer_config.json").read_text())
    assert {k: v for k, v in tok_config.items() if k != "additional_special_tokens"} == src_tok_config


END = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
       "special": True}


@pytest.mark.parametrize("layout", ["v5-list", "v4-decoder"])
def test_add_readable_tokens_extends_the_special_token_lists_already_there(tmp_path, tokenizer_dir, layout):
    """transformers 5 keeps the extra special tokens as a list under "extra_special_tokens"; 4.x under
    "additional_special_tokens", with every added token in "added_tokens_decoder" and the list repeated in
    special_tokens_map.json."""
    src = write_model(tmp_path / "src", tokenizer_dir, tie=True, vocab=448)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    if layout == "v5-list":
        tok_config["extra_special_tokens"] = [R]  # already special: keeps its id, listed once
        files = {"tokenizer_config.json": ("extra_special_tokens", [R, S])}
    else:
        tok_config |= {"additional_special_tokens": [], "added_tokens_decoder": {"0": END}}
        special_map = json.loads((src / "special_tokens_map.json").read_text()) | {"additional_special_tokens": []}
        (src / "special_tokens_map.json").write_text(json.dumps(special_map))
        files = {"tokenizer_config.json": ("additional_special_tokens", [R, S]),
                 "special_tokens_map.json": ("additional_special_tokens", [R, S])}
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    before = load_tokenizer(src)
    expected_ids = {t: before.convert_tokens_to_ids(t) if t in before.get_vocab() else None for t in READABLE_TOKENS}
    out = add_readable_tokens(src, tmp_path / "out")
    tok = load_tokenizer(out)
    for name, (key, listed) in files.items():
        assert json.loads((out / name).read_text())[key] == listed
    ids = [tok.convert_tokens_to_ids(t) for t in READABLE_TOKENS]
    if layout == "v5-list":
        assert ids[0] == expected_ids[R] == 416 and ids[1] == 417
    else:
        assert ids == [416, 417]
        decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        assert decoder["416"] == END | {"content": R} and decoder["417"] == END | {"content": S}
    for token, token_id in zip(READABLE_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id] and token in tok.all_special_tokens


def test_add_readable_tokens_without_tokenizer_json(tmp_path, tokenizer_dir):
    """vocab.json + merges.txt and a named class: transformers adds the tokens and saves the tokenizer."""
    src = write_model(tmp_path / "src", tokenizer_dir, tie=True, vocab=448)
    bpe = json.loads((src / "tokenizer.json").read_text())["model"]
    (src / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in bpe["merges"]))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer",
                                                           "eos_token": "<|endoftext|>"}))
    (src / "tokenizer.json").unlink()
    old_tok = load_tokenizer(src)
    out = add_readable_tokens(src, tmp_path / "out")
    tok = load_tokenizer(out)
    assert tok.encode(TEXT, add_special_tokens=False) == old_tok.encode(TEXT, add_special_tokens=False)
    size = len(old_tok)
    assert [tok.encode(t, add_special_tokens=False) for t in READABLE_TOKENS] == [[size], [size + 1]]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 448


def test_add_readable_tokens_errors(tmp_path, tokenizer_dir):
    src = write_model(tmp_path / "src", tokenizer_dir, tie=True, vocab=448)
    broken = tmp_path / "no_config"
    shutil.copytree(src, broken)
    (broken / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{broken}: no config.json"):
        add_readable_tokens(broken, tmp_path / "o1")
    broken = tmp_path / "no_weights"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"{broken}: no safetensors weights"):
        add_readable_tokens(broken, tmp_path / "o2")
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(src, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    with pytest.raises(ValueError, match=f"{broken}: no tokenizer files"):
        add_readable_tokens(broken, tmp_path / "o3")
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'}: not a directory"):
        add_readable_tokens(tmp_path / "missing", tmp_path / "o4")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="taken: already exists"):
        add_readable_tokens(src, tmp_path / "taken")
    assert not any(tmp_path.glob("o?"))  # nothing written by the failures


# --------------------------------------------------------------------------- decoding keeps the markers
def test_rollout_decoding_keeps_special_tokens_but_not_eos(tmp_path, tokenizer_dir):
    from r1_engine.engine.rollout.hf import HFRolloutEngine
    from r1_engine.engine.rollout.vllm import _text_ids

    out = add_readable_tokens(write_model(tmp_path / "src", tokenizer_dir, tie=True, vocab=448), tmp_path / "out")
    tok = load_tokenizer(out)
    eos = tok.eos_token_id
    engine = HFRolloutEngine(str(out), tok)
    assert eos in engine.eos_token_ids
    body = tok.encode(readable_completion(" 8+5=13", " \\boxed{13}"), add_special_tokens=False)
    assert engine._decode(body + [eos]) == readable_completion(" 8+5=13", " \\boxed{13}")
    assert engine._decode([eos] + body[:3] + [eos]) == tok.decode(body[:3], skip_special_tokens=False)

    # vLLM's text ids: the EOS that ended the completion (stop_reason None) and the tokenizer's EOS/pad go.
    stopped = SimpleNamespace(finish_reason="stop", stop_reason=None)
    by_string = SimpleNamespace(finish_reason="stop", stop_reason="</answer>")
    assert _text_ids(body + [eos], stopped, tok) == body
    assert _text_ids(body + [7], stopped, SimpleNamespace(eos_token_id=None, pad_token_id=None)) == body
    assert _text_ids(body, by_string, tok) == body
    assert _text_ids(body + [eos], SimpleNamespace(finish_reason="length", stop_reason=None), tok) == body
