"""Prompt datasets for RL: loading (jsonl, parquet), validation, the prompt template, and a resumable sampler.

The flow is  file -> `load_prompts` -> list[PromptExample] -> `PromptDataset` (template + tokenise, drop
over-long prompts) -> `PromptSampler.next_batch()` -> list[TokenizedPrompt] for the rollout engine.

Every bad row is an error that names the file, the row (1-based line number for jsonl, 1-based row for
parquet) and the field, because a silently skipped or mangled prompt is a silently different experiment.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

# The DeepSeek-R1-Zero training template (GRPO_SPEC.md), with `{prompt}` where the question goes.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)

TEMPLATES = ("r1-zero", "chat", "none")


def apply_template(question: str, template: str = "r1-zero", tokenizer: Any = None) -> str:
    """Turn a dataset question into the text the policy sees.

    template: "r1-zero" (R1_ZERO_TEMPLATE), "chat" (the tokenizer's own chat template, one user turn,
    with the generation prompt appended), "none" (the question exactly as given), or any custom string
    containing the placeholder "{prompt}". The question is substituted with str.replace, not str.format,
    so braces in the question (LaTeX: \\boxed{...}) are kept as they are.
    """
    if template == "r1-zero":
        return R1_ZERO_TEMPLATE.replace("{prompt}", question)
    if template == "none":
        return question
    if template == "chat":
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("template='chat' needs a Hugging Face tokenizer with apply_chat_template")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template='chat' but the tokenizer has no chat_template; use 'r1-zero' or 'none'")
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "{prompt}" in template:
        return template.replace("{prompt}", question)
    raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES} or a string containing '{{prompt}}'")


@dataclass(frozen=True)
class CodeTests:
    """A code row's tests: (stdin, expected stdout) pairs and/or assert-style test code run after the program."""

    io: tuple[tuple[str, str], ...] = ()
    test_code: str | None = None

    @property
    def count(self) -> int:
        return len(self.io) + (self.test_code is not None)



def parse_code_tests(record: dict, where: str) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """A code row's (stdin, stdout) tests and test code, checked: a ValueError naming the field otherwise."""
    tests, test_code = record.get("tests"), record.get("test_code")
    shape = 'a non-empty list of {"stdin": str, "stdout": str} objects'
    if isinstance(tests, str):  # datasets often store the list as JSON text
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: field 'tests' is a string but not JSON ({err.msg}); expected {shape}") from None
    pairs = []
    if tests is not None:
        if not isinstance(tests, list) or not tests:
            raise ValueError(f"{where}: field 'tests' must be {shape}, got {str(tests)[:60]!r}")
        for j, test in enumerate(tests):
            ok = isinstance(test, dict) and isinstance(test.get("stdout"), str) and isinstance(test.get("stdin", ""), str)
            if not ok:
                raise ValueError(f"{where}: field 'tests'[{j}] must be an object with string 'stdin' (optional, default "
                                 f"empty) and 'stdout', got {str(test)[:60]!r}")
            pairs.append((test.get("stdin", ""), test["stdout"]))
    if test_code is not None and (not isinstance(test_code, str) or not test_code.strip()):
        raise ValueError(f"{where}: field 'test_code' must be non-empty code (asserts run after the program), got "
                         f"{str(test_code)[:60]!r}")
    return tuple(pairs), test_code


@dataclass(frozen=True)
class PromptExample:
    """One dataset row. index: 0-based position among the file's examples; source: "file:row" of its origin;
    kind: "reasoning" (rule rewards against the reference answer), "general" (reward models, no reference) or "code"
    (the program in the completion is judged against `tests`, (stdin, expected stdout) pairs, and/or `test_code`)."""

    prompt: str
    answer: str | None
    index: int
    source: str
    kind: str = "reasoning"
    tests: tuple[tuple[str, str], ...] = ()
    test_code: str | None = None

    @property
    def reference(self):
        """What the row's rewards check against: the answer, or for a code row its CodeTests."""
        if self.kind != "code":
            return self.answer
        return CodeTests(io=self.tests, test_code=self.test_code)


def _reference_problem(answer: str) -> str | None:
    """Why a reference answer cannot be checked against, or None. An empty or brace-broken reference would
    score every completion 0, silently: that is a data bug to report, not a reward."""
    if not answer.strip():
        return "it is empty"
    depth = 0
    for ch in answer:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            break
    if depth != 0:
        return "its braces are unbalanced"
    return None


def required_strings(record: dict, keys: Sequence[str], where: str) -> list[str]:
    """The values of `keys` in one data row, each a non-empty string, or a ValueError naming `where` and the field."""
    values = []
    for key in keys:
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(record)})")
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: field {key!r} is empty")
        values.append(value)
    return values


def _row_to_example(
    record: Any, *, path: Path, row: int, row_word: str, index: int, prompt_key: str, answer_key: str,
    require_answer: bool, kind: str = "reasoning",
) -> PromptExample:
    where = f"{path}, {row_word} {row}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object per row, got {type(record).__name__}")
    (prompt,) = required_strings(record, (prompt_key,), where)

    answer = record.get(answer_key)
    if answer is None:
        if require_answer:
            state = "is null" if answer_key in record else "is missing"
            raise ValueError(f"{where}: field {answer_key!r} {state}: the accuracy reward needs a reference "
                             f"answer per prompt (--data.answer-key names another field; in code, "
                             f"load_prompts(require_answer=False) reads prompts without answers)")
    elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        # bool is an int subclass; True as an answer is almost surely a data bug.
        raise ValueError(f"{where}: field {answer_key!r} must be a string or a number, got {type(answer).__name__}")
    else:
        answer = str(answer)  # integer answers are common in math sets (GSM8K-style); keep their text form
        problem = _reference_problem(answer)
        if problem:
            raise ValueError(f"{where}: field {answer_key!r} cannot be used as a reference answer: {problem} "
                             f"(got {answer[:80]!r})")
    return PromptExample(prompt=prompt, answer=answer, index=index, source=f"{path}:{row}", kind=kind)


CODE_FIELDS = ("tests", "test_code")  # a row with either is a code prompt


def _row(record: Any, *, path: Path, row: int, row_word: str, kind: str, **keys) -> PromptExample:
    """A row as an example; a row with `tests` or `test_code` is a code prompt (no reference answer needed)."""
    if isinstance(record, dict) and any(record.get(name) is not None for name in CODE_FIELDS):
        example = _row_to_example(record, path=path, row=row, row_word=row_word, **{**keys, "require_answer": False})
        tests, test_code = parse_code_tests(record, f"{path}, {row_word} {row}")
        return dataclasses.replace(example, kind="code", tests=tests, test_code=test_code)
    return _row_to_example(record, path=path, row=row, row_word=row_word, kind=kind, **keys)


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(1-based line number, parsed object) for each non-blank line. Decodes per line so errors name the line."""
    rows = []
    for line_number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, line {line_number}: not valid UTF-8 "
                             f"({err.reason} at byte {err.start})") from None
        if line_number == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is legal at the start of a file
        if not text.strip():
            continue
        try:
            rows.append((line_number, json.loads(text)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_number}: invalid JSON ({err.msg} at column {err.colno})") from None
    return rows


def read_parquet(path: Path, columns: Sequence[str]) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow "
                          f"(or convert the file to .jsonl)") from None
    table = pq.read_table(path)
    present = [c for c in columns if c in table.column_names]
    return list(enumerate(table.select(present).to_pylist(), start=1))


def load_prompts(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", require_answer: bool = True,
    kind: str = "reasoning",
) -> list[PromptExample]:
    """Read and validate a prompt file (.jsonl or .parquet).

    Each row needs a non-empty string `prompt_key`; `answer_key` must be a string or number (numbers are
    kept as their text) and, unless require_answer=False, present. Blank jsonl lines are skipped.
    Raises ValueError naming the file, row and field for the first bad row. kind="general": prompts for the
    reward models (R1's all-scenario RL), read without answers. Rows with `tests` (a list of {"stdin", "stdout"},
    or that list as JSON text) or `test_code` are code prompts (kind "code") in any file.
    """
    if kind not in ("reasoning", "general"):
        raise ValueError(f"load_prompts: kind must be 'reasoning' or 'general', got {kind!r}")
    require_answer = require_answer and kind == "reasoning"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, row_word = read_jsonl(path), "line"
    elif suffix == ".parquet":
        rows, row_word = read_parquet(path, [prompt_key, answer_key, *CODE_FIELDS]), "row"
    else:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; expected .jsonl or .parquet")
    examples = [
        _row(record, path=path, row=row, row_word=row_word, index=index, prompt_key=prompt_key,
             answer_key=answer_key, require_answer=require_answer, kind=kind)
        for index, (row, record) in enumerate(rows)
    ]
    if not examples:
        raise ValueError(f"{path}: no examples in file")
    return examples


# ----------------------------------------------------------------------------------------------------------
# Tokenisers


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` for a transformers tokenizer or a raw `tokenizers.Tokenizer`."""
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(encoded.ids) if hasattr(encoded, "ids") else list(encoded)


def _tokenizer_max_id(tokenizer: Any) -> int:
    ids = list(tokenizer.get_vocab().values())  # includes added tokens for both tokenizer kinds
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.append(value)
    return max(ids)


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, path: str | Path) -> None:
    """ValueError if some token id of `tokenizer` is >= the model's `vocab_size` (the embedding would index
    out of range, or worse, a resized vocabulary would silently map ids to the wrong rows). `path` names the
    model or tokenizer in the message. A model vocabulary larger than the tokenizer (padding rows) is fine."""
    max_id = _tokenizer_max_id(tokenizer)
    if max_id >= vocab_size:
        raise ValueError(f"{path}: the tokenizer has token ids up to {max_id} but the model's vocab_size is "
                         f"{vocab_size}; tokenizer and model do not match")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_class_named(model_dir: Path) -> Any:
    """The transformers class tokenizer_config.json names ("tokenizer_class"), or None."""
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file}: not a readable JSON object ({err})") from None
    if not isinstance(name, str):
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return tokenizer_class_from_name(name)


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load exactly the tokenizer a model directory's files describe (local files only, never a download).

    With tokenizer.json, that file is the tokenizer: `PreTrainedTokenizerFast.from_pretrained` wraps it as
    saved, with special tokens and chat template from tokenizer_config.json / chat_template.jinja. Never
    AutoTokenizer there: transformers 5 picks a class by config.json's model_type and rebuilds the pipeline
    around the vocabulary (Qwen2Tokenizer drops the spaces and newlines of a character-level tokenizer).
    Without tokenizer.json (tokenizer.model, vocab.json + merges.txt), the class tokenizer_config.json names
    builds it, and AutoTokenizer only when none is named. `check_tokenizer_round_trip` verifies the result.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (model_dir / "tokenizer.json").is_file():
        loader = PreTrainedTokenizerFast
    else:
        loader = _tokenizer_class_named(model_dir) or AutoTokenizer
    try:
        return loader.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # the Rust tokenizers library raises a bare Exception on a malformed file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{model_dir}: cannot load the tokenizer with {loader.__name__}: {detail}") from None


def _normalized(tokenizer: Any, text: str) -> str | None:
    """`text` through the tokenizer's own normalizer (NFC, NFKC, lowercasing, ...), or None without one."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    normalizer = getattr(backend, "normalizer", None)
    return normalizer.normalize_str(text) if normalizer is not None else None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def check_tokenizer_round_trip(
    tokenizer: Any, texts: Sequence[str], where: str | Path, sources: Sequence[str] | None = None,
) -> None:
    """ValueError (one line, naming `where` and the text's source) unless decode(encode(text)) gives each
    text back. sources: where each text came from ("file:row"); default "text 1", "text 2", ...

    Encoded without added special tokens (no BOS), decoded with special tokens kept and no clean-up, so the
    check sees exactly the ids the policy is given. A text equal to itself after the tokenizer's own
    normalizer counts as kept: normalising is documented behaviour, dropping characters is not.
    """
    from tokenizers import Tokenizer

    for number, text in enumerate(texts):
        ids = encode_text(tokenizer, text, add_special_tokens=False)
        if isinstance(tokenizer, Tokenizer):  # raw: no clean-up option
            got = tokenizer.decode(ids, skip_special_tokens=False)
        else:
            got = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        normalized = _normalized(tokenizer, text)
        if got == text or got == normalized:
            continue
        # Report against the reading (raw or normalised) that agrees longest, so the difference shown is real.
        expected = text
        if normalized is not None and _common_prefix(normalized, got) > _common_prefix(text, got):
            expected = normalized
        at = _common_prefix(expected, got)
        source = sources[number] if sources is not None else f"text {number + 1}"
        raise ValueError(f"{where}: the tokenizer does not round-trip the prompt text of {source}: first "
                         f"difference at char {at}: expected {expected[at:at + 20]!r}, got {got[at:at + 20]!r} "
                         f"(the text starts {text[:40]!r})")


# Prompts checked by PromptDataset: they all share the template, so a few cover it and the usual characters.
ROUND_TRIP_PROMPTS = 8


# ----------------------------------------------------------------------------------------------------------
# Dataset and sampler


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt ready for rollout: the example, the templated text and its token ids."""

    example: PromptExample
    text: str
    prompt_ids: list[int]


class PromptDataset:
    """Templated, tokenised prompts. Prompts longer than `max_prompt_tokens` are dropped and counted
    (`num_skipped_too_long`, plus one warning), since truncating a question changes its answer. The first
    ROUND_TRIP_PROMPTS templated prompts must survive `check_tokenizer_round_trip` (ValueError otherwise):
    a tokenizer that loses characters would otherwise train on text nobody wrote, silently."""

    def __init__(
        self, examples: Sequence[PromptExample], tokenizer: Any, template: str = "r1-zero",
        max_prompt_tokens: int | None = None,
    ):
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        # A chat template already writes the BOS/special tokens into the text.
        add_special_tokens = template != "chat"
        self.items: list[TokenizedPrompt] = []
        self.num_skipped_too_long = 0
        checked: list[tuple[str, str]] = []
        for example in examples:
            text = apply_template(example.prompt, template, tokenizer)
            if len(checked) < ROUND_TRIP_PROMPTS:
                checked.append((text, example.source))
            ids = encode_text(tokenizer, text, add_special_tokens=add_special_tokens)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                self.num_skipped_too_long += 1
                continue
            self.items.append(TokenizedPrompt(example=example, text=text, prompt_ids=ids))
        check_tokenizer_round_trip(tokenizer, [t for t, _ in checked], getattr(tokenizer, "name_or_path", "")
                                   or "the tokenizer", sources=[s for _, s in checked])
        source = examples[0].source.rsplit(":", 1)[0] if examples else "<no examples>"
        if self.num_skipped_too_long:
            warnings.warn(f"{source}: skipped {self.num_skipped_too_long} of {len(examples)} prompts longer than "
                          f"max_prompt_tokens={max_prompt_tokens}", stacklevel=2)
        if not self.items:
            raise ValueError(f"{source}: no prompts left (all {len(examples)} longer than "
                             f"max_prompt_tokens={max_prompt_tokens})" if examples else "PromptDataset: no examples")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TokenizedPrompt:
        return self.items[i]


class PromptSampler:
    """Deterministic, resumable batches of prompts.

    Epoch e visits the dataset in the order torch.randperm(N) seeded with (seed, e), so the order
    depends only on (seed, epoch) and never on call history: a resumed run that loads `state_dict()`
    sees exactly the prompts the uninterrupted run would have. A batch that reaches the end of an
    epoch continues with the next epoch's order (nothing is dropped; a tiny dataset may then place
    the same prompt twice in one batch, which GRPO tolerates).
    """

    def __init__(self, dataset: Sequence[Any], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("PromptSampler: empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
        return self._order

    def next_batch(self) -> list[Any]:
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(batch), len(order) - self.position)
            batch.extend(self.dataset[i] for i in order[self.position:self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"seed", "epoch", "position", "dataset_size"} - set(state)
        if missing:
            raise ValueError(f"PromptSampler state is missing {sorted(missing)}")
        if state["dataset_size"] != len(self.dataset):
            raise ValueError(f"PromptSampler state was saved for {state['dataset_size']} prompts but the dataset has "
                             f"{len(self.dataset)}; a resumed run would see different prompts")
        if not 0 <= state["position"] < len(self.dataset):
            raise ValueError(f"PromptSampler state position {state['position']} is out of range")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None
