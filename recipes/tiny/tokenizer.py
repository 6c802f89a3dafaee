"""The tiny world's tokenizer: byte-level BPE trained on our own corpus, in Qwen2's exact pipeline.

transformers (5.x) loads any model directory whose config says "qwen2" with its own Qwen2Tokenizer,
which keeps our vocabulary, merges and added tokens but rebuilds the pipeline around them (NFC
normalizer, Qwen2's pre-tokenizer regex, byte-level decoder). So we train with that very pipeline,
and `tokenizers.Tokenizer.from_file("tokenizer.json")` and `AutoTokenizer.from_pretrained(dir)` agree
token for token (tested).

- Qwen2's regex splits every digit on its own, so no token holds two digits ("85" is "8", "5"),
  which keeps column arithmetic learnable. A space before a digit becomes a token of its own, which
  is why the corpus writes "7+8=15" rather than "7 + 8 = 15".
- The four R1 tags are single tokens, and so is the fixed prefix of the R1-Zero template (everything
  up to "User:"), which turns a ~80-token prompt into ~13 tokens: rollouts and training are that
  much cheaper on a CPU. They are ordinary (non-special) added tokens, so decoding with
  skip_special_tokens=True keeps them.
- <|endoftext|> is the one special token: end of document, eos and pad.
- Byte-level, so any text encodes, and decode(encode(x)) == x for NFC text (all of ours).

`build_tokenizer(out_dir)` writes tokenizer.json, tokenizer_config.json and special_tokens_map.json,
which `transformers.AutoTokenizer.from_pretrained(out_dir)` loads offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from r1_engine.recipes.tiny.corpus import (
    EOS_TOKEN,
    R1_ZERO_TEMPLATE,
    TAGS,
    tokenizer_training_texts,
)

# Everything before " {prompt}" is the same in every prompt: one token.
TEMPLATE_PREFIX = R1_ZERO_TEMPLATE.split(" {prompt}")[0]

# Room for every byte, every word of the tiny world fully merged, and the added tokens; the trainer
# stops earlier once every word is a single token.
_BPE_VOCAB_LIMIT = 1024


def build_tokenizer_object() -> Tokenizer:
    """Train the tokenizer in memory (deterministic: same corpus, same merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_LIMIT,
        min_frequency=1,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_training_texts(), trainer=trainer)
    # Longest match wins among added tokens, so the template prefix beats the tags it contains.
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in TAGS])
    tokenizer.add_tokens([AddedToken(TEMPLATE_PREFIX, normalized=False, special=False)])
    return tokenizer


def build_tokenizer(out_dir: str | Path):
    """Train the tokenizer and save it as a transformers tokenizer in out_dir; returns it loaded back."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=256,
        padding_side="left",  # generation pads prompts on the left
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    special_map = out_dir / "special_tokens_map.json"
    if not special_map.exists():  # transformers 5 no longer writes it; older readers still look for it
        special_map.write_text(
            json.dumps({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, indent=2) + "\n", encoding="utf-8"
        )
    return AutoTokenizer.from_pretrained(out_dir)
