"""Reward models for the all-scenario RL stage (R1 stage 4): HF sequence-classification checkpoints that score
(prompt, response) texts for rows of kind "general".

    with RewardModelSet([RewardModelSpec("helpful", "rm/helpful/hf"),
                         RewardModelSpec("harmless", "rm/harmless/hf", scope="response")]) as models:
        scores = models.score(prompts, responses)      # {"helpful": [...], "harmless": [...]}
        total = models.weighted_total(scores)          # total[i] = sum_k weight_k * scores[k][i]

Helpfulness scores the summary only, harmlessness the whole response (GRPO_SPEC.md): a spec's `scope` picks
which, and `reward_ids` builds the tokens the same way for scoring and for training (engine.reward_model_train).

One scope per reward model: a model trained here records its scope and input format in RECORD_FILE beside its
weights (`write_record`); every RewardModelSpec of that directory reads it, and a scope given explicitly that
contradicts it is an error. Without a record (an off-the-shelf reward model) the scope is the one given, else
"summary".

Input format: "text" is the prompt followed by the scored text, as the models trained here read it (their record
says so). A reward model without a record is read the way it was trained: with its tokenizer's chat template when
it has one (user turn: the question, assistant turn: the scored text, closed by the template's end of turn), else
as "text".

Where the score is read: HF's sequence-classification heads take the logit at the rightmost token that is not
`config.pad_token_id`. When pad == eos (Qwen's <|endoftext|>, the tiny world's tokenizer) a text ending with eos
would be read one token early in a batch and, with no pad id configured, at the eos itself alone. So every text
loses its trailing pad tokens before the forward pass, rows are right-padded with that pad id (the model's, else
the tokenizer's pad, else its eos, also written into the model's config), and the score is read at the last real
token whatever the batch: batched scores equal one-text-at-a-time scores.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from r1_engine.engine.data import encode_text, load_tokenizer
from r1_engine.engine.preflight import check_model_dir
from r1_engine.engine.readable import summary_of

SCOPES = ("summary", "response")
INPUT_FORMATS = ("text", "chat")
RECORD_FILE = "r1_reward.json"  # beside a trained reward model's config.json: {"scope": ..., "input_format": ...}


def read_record(path: str | Path) -> dict:
    """What a reward model trained here recorded about itself ({} for a directory without RECORD_FILE)."""
    record = Path(path) / RECORD_FILE
    if not record.is_file():
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{record}: not readable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("scope") not in SCOPES \
            or data.get("input_format", "text") not in INPUT_FORMATS:
        raise ValueError(f"{record}: expected {{\"scope\": one of {SCOPES}, \"input_format\": one of "
                         f"{INPUT_FORMATS}}}, got {data!r}")
    return data


def write_record(model_dir: str | Path, scope: str, input_format: str = "text") -> None:
    """Record the scope and input format a reward model was trained with (read by every RewardModelSpec of it)."""
    if scope not in SCOPES or input_format not in INPUT_FORMATS:
        raise ValueError(f"write_record: scope {scope!r} / input_format {input_format!r} out of range")
    (Path(model_dir) / RECORD_FILE).write_text(json.dumps({"scope": scope, "input_format": input_format}) + "\n",
                                               encoding="utf-8")


def resolve_scope(name: str, path: str | Path, scope: str | None) -> str:
    """The scope a reward model is scored on: the recorded one (a contradicting explicit `scope` is an error), else
    `scope`, else "summary"."""
    recorded = read_record(path).get("scope")
    if scope is not None and recorded is not None and scope != recorded:
        raise ValueError(f"reward model {name!r} ({path}) was trained on scope {recorded!r} (recorded in "
                         f"{Path(path) / RECORD_FILE}) but reward.model_scope gives {name}={scope!r}: drop the "
                         f"setting, or train the reward model on {scope!r}")
    return recorded or scope or "summary"


@dataclass(frozen=True)
class RewardModelSpec:
    """One weighted reward model: `path` is an HF *ForSequenceClassification directory with num_labels 1;
    scope "summary" scores prompt + summary_of(response), "response" prompt + the whole response. scope None:
    the one the model recorded when it was trained here (RECORD_FILE), else "summary"; an explicit scope that
    contradicts the record is a ValueError."""

    name: str
    path: str
    weight: float = 1.0
    scope: Literal["summary", "response"] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"reward model {self.path}: the name is empty")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"reward model {self.name!r}: scope must be one of {SCOPES}, got {self.scope!r}")
        object.__setattr__(self, "scope", resolve_scope(self.name, self.path, self.scope))
        if not math.isfinite(self.weight):
            raise ValueError(f"reward model {self.name!r}: weight must be finite, got {self.weight}")


def scored_text(response: str, scope: str) -> str:
    """What of a response a reward model reads: its summary (scope "summary") or all of it ("response")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return summary_of(response) if scope == "summary" else response


def reward_text(prompt: str, response: str, scope: str) -> str:
    """The text a reward model reads in the "text" format: the prompt followed by the summary (scope "summary") or
    the response."""
    return prompt + scored_text(response, scope)


def input_format_of(path: str | Path, tokenizer: Any) -> str:
    """How a reward model reads its input: what it recorded, else "chat" when its tokenizer has a chat template,
    else "text"."""
    recorded = read_record(path).get("input_format")
    if recorded is not None:
        return recorded
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def reward_ids(tokenizer: Any, prompt: str, response: str, scope: str, input_format: str, pad_id: int,
               max_length: int | None, question: str | None = None) -> tuple[list[int], bool]:
    """(token ids, truncated?) a reward model scores. "text": prompt + the scored text (encode_reward_text);
    "chat": the tokenizer's chat template over a user turn (`question`, else `prompt`) and an assistant turn (the
    scored text), the template's own special tokens and end of turn, no generation prompt."""
    if input_format == "text":
        return encode_reward_text(tokenizer, reward_text(prompt, response, scope), pad_id, max_length)
    if input_format != "chat":
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    messages = [{"role": "user", "content": prompt if question is None else question},
                {"role": "assistant", "content": scored_text(response, scope)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return encode_reward_text(tokenizer, text, pad_id, max_length, add_special_tokens=False)


# --------------------------------------------------------------------------- directories
def _num_labels(config: dict) -> int:
    """As transformers reads it: id2label's size when saved, else num_labels, else its default of 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def check_reward_model_dir(flag: str, path: str | Path) -> None:
    """ValueError (one line naming `flag` and `path`) unless `path` is an HF sequence-classification directory with
    one label, weights and tokenizer files; a causal LM (a policy checkpoint) is named as such."""
    model = Path(path)
    if model.is_dir() and not (model / "config.json").is_file() and (model / "hf" / "config.json").is_file():
        raise ValueError(f"{flag} {model}: no config.json in it; a reward-model run directory keeps its model in "
                         f"{model / 'hf'}")
    check_model_dir(flag, model)  # exists, config.json, tokenizer files
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        architectures = list(config.get("architectures") or [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{flag} {model}: config.json is not a readable JSON object ({err})") from None
    heads = [a for a in architectures if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if not heads:
        kind = "a causal LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else "not a reward model"
        raise ValueError(f"{flag} {model}: config.json's architectures {architectures} make it {kind}; a reward model "
                         f"is a *ForSequenceClassification checkpoint with num_labels 1 (train one from a causal LM "
                         f"with engine.reward_model_train.train_reward_model)")
    if _num_labels(config) != 1:
        raise ValueError(f"{flag} {model}: {heads[0]} with num_labels {_num_labels(config)}; a reward model has "
                         f"num_labels 1 (one scalar score)")
    check_model_dir(flag, model, need_weights=True)


# --------------------------------------------------------------------------- encoding and the forward pass
def resolve_pad_id(model_config: Any, tokenizer: Any) -> int:
    """The id rows are padded with and the head skips: the model's pad id, else the tokenizer's pad, else its eos."""
    for value in (getattr(model_config.get_text_config(), "pad_token_id", None),
                  getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no pad or eos token to pad rows with")


def set_pad_id(model: Any, pad_id: int) -> None:
    """Tell the classification head which id is padding (the saved config keeps it, so HF batches work too)."""
    model.config.pad_token_id = pad_id
    model.config.get_text_config().pad_token_id = pad_id


def encode_reward_text(tokenizer: Any, text: str, pad_id: int, max_length: int | None,
                       add_special_tokens: bool = True) -> tuple[list[int], bool]:
    """(token ids, truncated?) of a text to score: the tokenizer's own special tokens (a BOS for Llama; a prompt
    whose chat template already wrote one keeps just that one; add_special_tokens=False for a text the chat template
    wrote whole), no trailing pad tokens (see the module docstring), and at most `max_length` tokens, keeping the
    end, where the score is read and where responses differ."""
    ids = encode_text(tokenizer, text, add_special_tokens=add_special_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    while ids and ids[-1] == pad_id:
        ids.pop()
    if not ids:
        raise ValueError(f"nothing to score in {text[:60]!r}: no tokens besides padding")
    truncated = max_length is not None and len(ids) > max_length
    return (ids[-max_length:] if truncated else ids), truncated


def forward_scores(model: Any, rows: Sequence[Sequence[int]], pad_id: int, device: str | torch.device) -> torch.Tensor:
    """[len(rows)] float32 scores of token rows (none ending in pad_id), right-padded into one batch."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, :len(ids)] = torch.as_tensor(ids)
        attention_mask[row, :len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return logits[:, 0].float()


def default_max_length(model_config: Any) -> int | None:
    return getattr(model_config.get_text_config(), "max_position_embeddings", None)


# --------------------------------------------------------------------------- scoring
class RewardModelScorer:
    """One reward model on one device. Texts are sorted by length and scored `batch_size` at a time; a text longer
    than max_length (default: the model's max_position_embeddings) keeps its last tokens and counts in
    `num_truncated`."""

    def __init__(self, spec: RewardModelSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, max_length: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification

        if batch_size < 1:
            raise ValueError(f"reward model {spec.name!r}: batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"reward model {spec.name!r}: max_length must be >= 1, got {max_length}")
        check_reward_model_dir(f"reward model {spec.name!r}", spec.path)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(spec.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(spec.path, dtype=dtype).to(self.device).eval()
        self.pad_id = resolve_pad_id(self.model.config, self.tokenizer)
        set_pad_id(self.model, self.pad_id)
        self.max_length = max_length if max_length is not None else default_max_length(self.model.config)
        self.input_format = input_format_of(spec.path, self.tokenizer)
        self.num_truncated = 0

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str],
              questions: Sequence[str] | None = None) -> list[float]:
        """Scores of (prompt, response) pairs. prompts: what the policy read (its template applied); questions: the
        raw user questions, the user turn of a chat-format reward model (default: the prompts)."""
        if self.model is None:
            raise RuntimeError(f"reward model {self.spec.name!r}: score called after close()")
        if len(prompts) != len(responses) or (questions is not None and len(questions) != len(prompts)):
            raise ValueError(f"reward model {self.spec.name!r}: {len(prompts)} prompts but {len(responses)} responses"
                             + ("" if questions is None else f" and {len(questions)} questions"))
        rows = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, truncated = reward_ids(self.tokenizer, prompt, response, self.spec.scope, self.input_format,
                                        self.pad_id, self.max_length, None if questions is None else questions[i])
            rows.append(ids)
            self.num_truncated += truncated
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            values = forward_scores(self.model, [rows[i] for i in chunk], self.pad_id, self.device).tolist()
            for i, value in zip(chunk, values):
                if not math.isfinite(value):
                    raise RuntimeError(f"reward model {self.spec.name!r} ({self.spec.path}) gave a non-finite score "
                                       f"{value} to text {i}")
                scores[i] = value
        return scores

    def close(self) -> None:
        """Free the model (and its device memory)."""
        if self.model is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = self.tokenizer = None
        if on_cuda:
            torch.cuda.empty_cache()


class RewardModelSet:
    """The reward models of a run, each scored on its own scope; names are unique."""

    def __init__(self, specs: Sequence[RewardModelSpec], device: str | torch.device = "cpu", *,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, max_length: int | None = None) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("RewardModelSet: no reward models given")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardModelSet: duplicate reward model names in {names}")
        self.specs = specs
        self.scorers: list[RewardModelScorer] = []
        try:
            for spec in specs:
                self.scorers.append(RewardModelScorer(spec, device=device, dtype=dtype, batch_size=batch_size,
                                                      max_length=max_length))
        except BaseException:
            self.close()
            raise

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              questions: Sequence[str] | None = None) -> dict[str, list[float]]:
        """{name: per-row scores} (questions: the raw user questions, see RewardModelScorer.score)."""
        return {scorer.spec.name: scorer.score(prompts, responses, questions) for scorer in self.scorers}

    def weighted_total(self, scores: Mapping[str, Sequence[float]]) -> list[float]:
        """total[i] = sum over the models of weight * scores[name][i] (scores as `score` returns them)."""
        missing = [spec.name for spec in self.specs if spec.name not in scores]
        if missing:
            raise ValueError(f"RewardModelSet.weighted_total: no scores for {missing}")
        lengths = {len(scores[spec.name]) for spec in self.specs}
        if len(lengths) != 1:
            raise ValueError(f"RewardModelSet.weighted_total: score lists of different lengths {sorted(lengths)}")
        return [sum(spec.weight * scores[spec.name][i] for spec in self.specs) for i in range(lengths.pop())]

    @property
    def num_truncated(self) -> int:
        return sum(scorer.num_truncated for scorer in self.scorers)

    def close(self) -> None:
        for scorer in self.scorers:
            scorer.close()

    def __enter__(self) -> RewardModelSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
