"""R1's readable format for the cold start: `|special_token|<reasoning_process>|special_token|<summary>`.

    readable_completion("8+5=13, carry 1.", "The sum is \\boxed{139}.")
    -> "<|reasoning|>8+5=13, carry 1.<|summary|>The sum is \\boxed{139}."

The two markers are real special tokens of the tokenizer (one id each, never split, never merged with the text
around them): `add_readable_tokens` writes a copy of an HF model directory whose tokenizer has them and whose
embedding (and untied output) matrix has a row for each. The rollout engines decode completions keeping special
tokens (only EOS / padding are dropped), so the rewards see the markers: the format reward checks the layout,
the accuracy reward reads the answer from the summary only, the language reward the reasoning only, and a
reward model's helpfulness sees `summary_of(response)`.

The model directory is edited on its safetensors tensors directly (no model is built), so a 7B checkpoint costs
the memory of the shard holding the embedding, not of the model. New rows are the mean of the rows of the ids
the old tokenizer uses: a new token starts as an average token instead of a random vector with an outsized
logit.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REASONING_TOKEN = "<|reasoning|>"
SUMMARY_TOKEN = "<|summary|>"
READABLE_TOKENS = (REASONING_TOKEN, SUMMARY_TOKEN)

_THINK_CLOSE = "</think>"
# Spaces, newlines, digits, tags and non-ASCII: the saved tokenizer must encode text without markers as before.
_PROBE = "Q: 82+57\nA:  <think> 8+5 = 13, carry 1 </think>\n<answer> 139 </answer>\tÜber 東京"
_EMBEDDING_SUFFIX = "embed_tokens.weight"
_OUTPUT_NAME = "lm_head.weight"
# Weight files of the source that are not copied: the safetensors ones are rewritten, .bin copies would go stale.
_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------- the layout
def readable_completion(reasoning: str, summary: str) -> str:
    """The completion text of the readable layout (an SFT target of the cold start)."""
    return REASONING_TOKEN + reasoning + SUMMARY_TOKEN + summary


def split_readable(text: str) -> tuple[str, str] | None:
    """(reasoning, summary) of a text in the readable layout: each marker exactly once, in order, only whitespace
    before the reasoning marker. None otherwise (what else the parts hold is the format reward's concern)."""
    if text.count(REASONING_TOKEN) != 1 or text.count(SUMMARY_TOKEN) != 1:
        return None
    before, rest = text.split(REASONING_TOKEN)
    if before.strip() or SUMMARY_TOKEN not in rest:
        return None
    reasoning, summary = rest.split(SUMMARY_TOKEN)
    return reasoning, summary


def summary_of(response: str) -> str:
    """The part of a response a helpfulness reward model judges: the text after the last summary marker; else the
    answer part of R1-Zero tags (after the last `</think>`); else the whole response."""
    for marker in (SUMMARY_TOKEN, _THINK_CLOSE):
        if marker in response:
            return response.rsplit(marker, 1)[1]
    return response


# --------------------------------------------------------------------------- the model directory
def _weight_files(model_dir: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of a checkpoint and its index (None for a single file)."""
    from r1_engine.parallel.convert import SAFETENSORS_FILE, SAFETENSORS_INDEX

    index_file = model_dir / SAFETENSORS_INDEX
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_file}: not a safetensors index with a 'weight_map' ({err})") from None
        missing = [name for name in files if not (model_dir / name).is_file()]
        if missing:
            raise ValueError(f"{index_file}: shard file {missing[0]} is missing")
        return files, index
    if (model_dir / SAFETENSORS_FILE).is_file():
        return [SAFETENSORS_FILE], None
    raise ValueError(f"{model_dir}: no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}); "
                     f"add_readable_tokens edits safetensors checkpoints only")


def _check_model_dir(model_dir: Path) -> dict:
    from r1_engine.engine.data import TOKENIZER_FILES

    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: not a directory (an HF model directory is needed)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir}: no config.json in it (an HF model directory is needed)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        vocab_size = int(config["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: no integer vocab_size in it ({err})") from None
    if vocab_size < 1:
        raise ValueError(f"{config_file}: vocab_size must be >= 1, got {vocab_size}")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{model_dir}: no tokenizer files in it (looked for {', '.join(TOKENIZER_FILES)})")
    return config


def _special_token_list_key(config: dict) -> str:
    """Where tokenizer_config.json lists the extra special tokens: transformers 5 writes a list under
    "extra_special_tokens", 4.x under "additional_special_tokens" (its "extra_special_tokens" is a dict of named
    tokens); 5.x reads both lists, so a new entry goes where the file already keeps them."""
    return "extra_special_tokens" if isinstance(config.get("extra_special_tokens"), list) \
        else "additional_special_tokens"


def _add_to_tokenizer_files(model_dir: Path, work: Path, tokens: tuple[str, ...]) -> dict[str, int]:
    """Write the tokenizer files with `tokens` added as special tokens into `work`; returns token -> id.
    With tokenizer.json the files are edited at the `tokenizers` level (everything else byte for byte); without
    it transformers' add_special_tokens + save_pretrained writes them."""
    from tokenizers import AddedToken, Tokenizer

    if not (model_dir / "tokenizer.json").is_file():
        from r1_engine.engine.data import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
        tokenizer.save_pretrained(str(work))
        return {token: int(tokenizer.convert_tokens_to_ids(token)) for token in tokens}

    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    backend.save(str(work / "tokenizer.json"))
    ids = {token: backend.token_to_id(token) for token in tokens}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not readable JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object")
        if name == "special_tokens_map.json" and "additional_special_tokens" not in config:
            continue  # the list lives in tokenizer_config.json only
        key = _special_token_list_key(config)
        listed = config.setdefault(key, [])
        names = {t["content"] if isinstance(t, dict) else t for t in listed}
        listed.extend(t for t in tokens if t not in names)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for token in tokens:
                decoder.setdefault(str(ids[token]), {"content": token, "lstrip": False, "normalized": False,
                                                     "rstrip": False, "single_word": False, "special": True})
        (work / name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ids


def _vocab_tensors(model_dir: Path, files: list[str], vocab_size: int) -> dict[str, str]:
    """Tensor name -> file of the embedding and the output layer (absent when tied)."""
    from safetensors import safe_open

    found = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.endswith(_EMBEDDING_SUFFIX) or key == _OUTPUT_NAME:
                    rows = handle.get_slice(key).get_shape()[0]
                    if rows != vocab_size:
                        raise ValueError(f"{model_dir / name}: tensor {key!r} has {rows} rows but config.json's "
                                         f"vocab_size is {vocab_size}")
                    found[key] = name
    if not any(key.endswith(_EMBEDDING_SUFFIX) for key in found):
        raise ValueError(f"{model_dir}: no *{_EMBEDDING_SUFFIX} tensor in the weights (Qwen2 / Llama layout expected)")
    return found


def _with_mean_rows(weight, used_ids, rows: list[int], new_vocab: int):
    """`weight` grown to `new_vocab` rows, with `rows` (and every row past the old end) set to the mean of the
    rows of `used_ids`, computed in float64."""
    import torch

    old_vocab = weight.shape[0]
    mean = weight.index_select(0, used_ids).double().mean(dim=0).to(weight.dtype)
    out = torch.empty((new_vocab, *weight.shape[1:]), dtype=weight.dtype)
    out[:old_vocab] = weight
    out[old_vocab:] = mean
    if rows:
        out[torch.tensor(rows, dtype=torch.long)] = mean
    return out


def add_readable_tokens(model_dir: str | Path, out_dir: str | Path, tokens: tuple[str, ...] = READABLE_TOKENS,
                        pad_to_multiple: int = 64) -> Path:
    """Write a copy of the HF model directory `model_dir` to `out_dir` whose tokenizer has `tokens` as special
    tokens and whose embedding / untied lm_head has a row for each; returns out_dir.

    Tokens the tokenizer already has keep their id and rows (running it again adds nothing). New ids beyond
    config.json's vocab_size grow the vocabulary to the next multiple of `pad_to_multiple`; the rows of the new
    ids, and every added padding row, are the mean of the rows the old tokenizer uses. Everything else is copied
    byte for byte. `out_dir` must not exist or be empty; it appears complete or not at all (built beside it, then
    renamed). ValueError names the path when `model_dir` has no config.json, safetensors weights or tokenizer."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from r1_engine.engine.data import load_tokenizer
    from r1_engine.parallel.convert import CHAT_TEMPLATE_DIR, SAFETENSORS_INDEX

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokens = tuple(dict.fromkeys(tokens))
    if not tokens or any(not isinstance(t, str) or not t.strip() for t in tokens):
        raise ValueError(f"add_readable_tokens: tokens must be non-blank strings, got {tokens!r}")
    if pad_to_multiple < 1:
        raise ValueError(f"add_readable_tokens: pad_to_multiple must be >= 1, got {pad_to_multiple}")
    config = _check_model_dir(model_dir)
    files, index = _weight_files(model_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: already exists and is not an empty directory; choose a new output directory")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: the output must be a new directory, not the model directory itself")

    vocab_size = int(config["vocab_size"])
    old_tokenizer = load_tokenizer(model_dir)
    old_vocab = old_tokenizer.get_vocab()
    if max(old_vocab.values()) >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has ids up to {max(old_vocab.values())} but config.json's "
                         f"vocab_size is {vocab_size}; tokenizer and model do not match")
    vocab_tensors = _vocab_tensors(model_dir, files, vocab_size)
    if _OUTPUT_NAME not in vocab_tensors and config.get("tie_word_embeddings") is False:
        raise ValueError(f"{model_dir}: config.json says tie_word_embeddings=false but the weights hold no "
                         f"{_OUTPUT_NAME}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)  # left by a crashed run of this process id
    work.mkdir()
    try:
        ids = _add_to_tokenizer_files(model_dir, work, tokens)
        new_rows = sorted(ids[t] for t in tokens if t not in old_vocab)
        new_vocab = vocab_size
        if new_rows and new_rows[-1] >= vocab_size:
            new_vocab = -(-(new_rows[-1] + 1) // pad_to_multiple) * pad_to_multiple
        used_ids = torch.tensor(sorted(old_vocab.values()), dtype=torch.long)

        grown_bytes = 0
        for name in files:
            if name not in vocab_tensors.values() or not new_rows:
                shutil.copy2(model_dir / name, work / name)
                continue
            with safe_open(str(model_dir / name), framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(str(model_dir / name))
            for key in [k for k, f in vocab_tensors.items() if f == name]:
                before = tensors[key]
                tensors[key] = _with_mean_rows(before, used_ids, new_rows, new_vocab)
                grown_bytes += (tensors[key].numel() - before.numel()) * before.element_size()
            save_file(tensors, str(work / name), metadata=metadata)
            del tensors
        if index is not None:
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"]["total_size"] = int(index["metadata"]["total_size"]) + grown_bytes
            (work / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        if new_vocab != vocab_size:
            config["vocab_size"] = new_vocab
            (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for source in model_dir.iterdir():  # the rest (config, generation config, chat templates, ...) as it is
            if (work / source.name).exists() or any(source.match(p) for p in _WEIGHT_PATTERNS):
                continue
            if source.is_file():
                shutil.copy2(source, work / source.name)
            elif source.name == CHAT_TEMPLATE_DIR:
                shutil.copytree(source, work / source.name)

        new_tokenizer = load_tokenizer(work)  # the saved files must give every old token its old id, and old text
        new_vocab_ids = new_tokenizer.get_vocab()  # the same ids
        moved = next((t for t, i in old_vocab.items() if new_vocab_ids.get(t) != i), None)
        if moved is not None:
            raise RuntimeError(f"{model_dir}: the tokenizer saved with the new tokens gives {moved!r} the id "
                               f"{new_vocab_ids.get(moved)} instead of {old_vocab[moved]}")
        if new_tokenizer.encode(_PROBE, add_special_tokens=False) != old_tokenizer.encode(_PROBE,
                                                                                        add_special_tokens=False):
            raise RuntimeError(f"{model_dir}: the tokenizer saved with the new tokens encodes {_PROBE!r} differently "
                               f"from the original one")
        for token in tokens:
            encoded = new_tokenizer.encode(token, add_special_tokens=False)
            if list(encoded) != [ids[token]]:
                raise RuntimeError(f"{model_dir}: after adding {token!r} the saved tokenizer encodes it as "
                                   f"{list(encoded)}, not as the one id {ids[token]}")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir
